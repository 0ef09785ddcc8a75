//! The admin API under `/admin/v1/` on the admin port: organizations, users, memberships and the audit
//! trail. Each change names its actor (`X-Admin-Actor`, else `admin-api`) in the audit event and drops the
//! affected cache entries on this replica at once; other replicas notice within `--sync-cache-ttl`.

use super::error::ApiError;
use crate::access::Gatekeeper;
use crate::directory::{AuditFilter, Directory, UserFilter};
use crate::identity::RoleSource;
use crate::provision::Affected;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

/// What the admin API needs.
#[derive(Clone)]
pub struct ApiState {
    pub directory: Arc<Directory>,
    pub gatekeeper: Arc<Gatekeeper>,
    pub admin_token: Option<Arc<String>>,
    pub app_roles: Arc<Vec<String>>,
    /// The admin listener's bound address: without a token, only requests addressed to it are served.
    pub admin_addr: std::net::SocketAddr,
}

type AdminState = ApiState;

/// The admin API's routes, behind the admin token when one is configured.
pub fn router(state: ApiState) -> Router {
    routes()
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
}

fn routes() -> Router<ApiState> {
    Router::new()
        .route("/organizations", get(list_orgs).post(create_org))
        .route(
            "/organizations/{id}",
            get(get_org).patch(rename_org).delete(delete_org),
        )
        .route(
            "/organizations/{id}/deactivate",
            post(|s, h, p| set_org(s, h, p, false)),
        )
        .route(
            "/organizations/{id}/reactivate",
            post(|s, h, p| set_org(s, h, p, true)),
        )
        .route("/users", get(list_users))
        .route("/users/{id}", get(get_user))
        .route(
            "/users/{id}/deactivate",
            post(|s, h, p| set_user(s, h, p, false)),
        )
        .route(
            "/users/{id}/reactivate",
            post(|s, h, p| set_user(s, h, p, true)),
        )
        .route("/memberships", post(add_membership))
        .route(
            "/memberships/{user}/{org}",
            patch(set_role).delete(remove_membership),
        )
        .route(
            "/memberships/{user}/{org}/deactivate",
            post(|s, h, p| set_membership(s, h, p, false)),
        )
        .route(
            "/memberships/{user}/{org}/reactivate",
            post(|s, h, p| set_membership(s, h, p, true)),
        )
        .route("/audit-events", get(list_audit))
}

/// Requires `Authorization: Bearer <admin token>` when a token is configured; compared in constant time.
/// Without one (loopback only), a browser is what an attacker would use to reach the API: a page on
/// another site posting a form (CSRF), or a name of the attacker's that resolves to 127.0.0.1 (DNS
/// rebinding). So the request must be addressed to the admin listener itself (`Host`), come from it if
/// it names an origin, and change things only with a JSON body, which no form can send cross-site.
pub async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    if state.admin_token.is_none()
        && let Err(why) = same_origin_json(&req, state.admin_addr)
    {
        return ApiError::Forbidden("forbidden_origin", why.into()).into_response();
    }
    if let Some(expected) = &state.admin_token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
            .map(|(_, t)| t.trim().as_bytes().to_vec())
            .unwrap_or_default();
        if aws_lc_rs::constant_time::verify_slices_are_equal(&given, expected.as_bytes()).is_err() {
            return ApiError::InvalidToken("the admin API needs the admin bearer token".into())
                .into_response();
        }
    }
    next.run(req).await
}

fn same_origin_json(req: &Request, admin: std::net::SocketAddr) -> Result<(), &'static str> {
    let port = admin.port();
    let hosts = [
        admin.to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ];
    let h = req.headers();
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .ok_or("the admin API needs a Host header naming the admin address")?;
    if !hosts.iter().any(|a| a.eq_ignore_ascii_case(host)) {
        return Err("the admin API answers only requests addressed to the admin listener");
    }
    if let Some(origin) = h.get(header::ORIGIN) {
        let ok = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|o| hosts.iter().any(|a| a.eq_ignore_ascii_case(o)));
        if !ok {
            return Err("cross-origin requests to the admin API are refused");
        }
    }
    if h.get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s == "cross-site" || s == "same-site")
    {
        return Err("cross-site requests to the admin API are refused");
    }
    let mutating = !matches!(
        *req.method(),
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    );
    let json = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if mutating && !json {
        return Err("changes through the admin API must be sent as application/json");
    }
    Ok(())
}

fn actor(headers: &HeaderMap) -> String {
    headers
        .get("x-admin-actor")
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.chars()
                .filter(|c| !c.is_control())
                .take(128)
                .collect::<String>()
        })
        .filter(|s| !s.is_empty())
        .map_or_else(|| "admin-api".to_owned(), |s| format!("admin:{s}"))
}

/// Drops what this replica remembers about the change and tells the other replicas.
async fn forget(state: &AdminState, affected: Affected) {
    state.gatekeeper.changed(&[affected], false).await;
}

#[derive(Deserialize)]
struct PageQuery {
    limit: Option<u64>,
    cursor: Option<String>,
}

type ApiResult = Result<Response, ApiError>;

fn ok<T: serde::Serialize>(v: T) -> ApiResult {
    Ok(Json(v).into_response())
}

async fn list_orgs(State(s): State<AdminState>, Query(q): Query<PageQuery>) -> ApiResult {
    ok(s.directory
        .list_organizations(q.limit, q.cursor.as_deref())
        .await?)
}

#[derive(Deserialize)]
struct CreateOrg {
    id: String,
    name: String,
    slug: Option<String>,
    /// Which configured issuer's tenant id this is; may be left out when only one issuer is configured.
    issuer: Option<String>,
}

async fn create_org(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Json(body): Json<CreateOrg>,
) -> ApiResult {
    let issuers: Vec<&str> = s.gatekeeper.registry().iter().map(|i| &*i.name).collect();
    let issuer = match (&body.issuer, issuers.as_slice()) {
        (Some(i), _) if issuers.contains(&i.as_str()) => i.clone(),
        (Some(i), _) => {
            return Err(ApiError::InvalidRequest(format!(
                "issuer {i} is not configured"
            )));
        }
        (None, [only]) => (*only).to_owned(),
        (None, _) => {
            return Err(ApiError::InvalidRequest(
                "several issuers are configured: say which with `issuer`".into(),
            ));
        }
    };
    let org = s
        .directory
        .create_organization(
            &actor(&headers),
            &body.id,
            &body.name,
            body.slug.as_deref(),
            &issuer,
        )
        .await?;
    forget(&s, Affected::Organization(org.id.clone())).await;
    Ok((StatusCode::CREATED, Json(org)).into_response())
}

async fn get_org(State(s): State<AdminState>, Path(id): Path<String>) -> ApiResult {
    ok(s.directory.get_organization(&id).await?)
}

#[derive(Deserialize)]
struct Rename {
    name: String,
}

async fn rename_org(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(body): Json<Rename>,
) -> ApiResult {
    let org = s
        .directory
        .rename_organization(&actor(&headers), &id, &body.name)
        .await?;
    forget(&s, Affected::Organization(id)).await;
    ok(org)
}

async fn set_org(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    active: bool,
) -> ApiResult {
    let org = s
        .directory
        .set_organization_active(&actor(&headers), &id, active)
        .await?;
    forget(&s, Affected::Organization(id)).await;
    ok(org)
}

#[derive(Deserialize)]
struct Force {
    #[serde(default)]
    force: bool,
}

async fn delete_org(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<Force>,
) -> ApiResult {
    s.directory
        .delete_organization(&actor(&headers), &id, q.force)
        .await?;
    forget(&s, Affected::Organization(id.clone())).await;
    ok(json!({"deleted": id}))
}

#[derive(Deserialize)]
struct UserQuery {
    email: Option<String>,
    organization: Option<String>,
    limit: Option<u64>,
    cursor: Option<String>,
}

async fn list_users(State(s): State<AdminState>, Query(q): Query<UserQuery>) -> ApiResult {
    let filter = UserFilter {
        email: q.email,
        organization: q.organization,
    };
    ok(s.directory
        .list_users(&filter, q.limit, q.cursor.as_deref())
        .await?)
}

async fn get_user(State(s): State<AdminState>, Path(id): Path<String>) -> ApiResult {
    ok(s.directory.get_user(&id).await?)
}

async fn set_user(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    active: bool,
) -> ApiResult {
    let user = s
        .directory
        .set_user_active(&actor(&headers), &id, active)
        .await?;
    forget(&s, Affected::User(id)).await;
    ok(user)
}

#[derive(Deserialize)]
struct AddMembership {
    user_id: String,
    organization_id: String,
    role: String,
}

/// `{"role": "viewer"}` sets the role as an operator's (the IdP no longer changes it);
/// `{"role_source": "idp"}` hands it back to the IdP; both at once set the role and its source.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRole {
    role: Option<String>,
    role_source: Option<String>,
}

fn check_role(s: &AdminState, role: &str) -> Result<(), ApiError> {
    if s.app_roles.iter().any(|r| r == role) {
        Ok(())
    } else {
        Err(ApiError::InvalidRequest(format!(
            "role `{role}` is not an app role (known: {})",
            s.app_roles.join(", ")
        )))
    }
}

async fn add_membership(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Json(body): Json<AddMembership>,
) -> ApiResult {
    check_role(&s, &body.role)?;
    let m = s
        .directory
        .add_membership(
            &actor(&headers),
            &body.user_id,
            &body.organization_id,
            &body.role,
        )
        .await?;
    forget(&s, Affected::Membership(body.user_id, body.organization_id)).await;
    Ok((StatusCode::CREATED, Json(m)).into_response())
}

async fn set_role(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path((user, org)): Path<(String, String)>,
    Json(body): Json<SetRole>,
) -> ApiResult {
    let source = match body.role_source.as_deref() {
        None => None,
        Some(v) => Some(RoleSource::parse(v).ok_or_else(|| {
            ApiError::InvalidRequest(format!("role_source `{v}` is not idp or operator"))
        })?),
    };
    let actor = actor(&headers);
    let m = match (&body.role, source) {
        (None, None) => {
            return Err(ApiError::InvalidRequest(
                "give `role`, `role_source`, or both".into(),
            ));
        }
        (Some(role), source) => {
            check_role(&s, role)?;
            let m = s
                .directory
                .set_membership_role(&actor, &user, &org, role)
                .await?;
            match source {
                Some(src) if src != RoleSource::Operator => {
                    s.directory
                        .set_membership_role_source(&actor, &user, &org, src)
                        .await?
                }
                _ => m,
            }
        }
        (None, Some(src)) => {
            s.directory
                .set_membership_role_source(&actor, &user, &org, src)
                .await?
        }
    };
    forget(&s, Affected::Membership(user, org)).await;
    ok(m)
}

async fn set_membership(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path((user, org)): Path<(String, String)>,
    active: bool,
) -> ApiResult {
    let m = s
        .directory
        .set_membership_active(&actor(&headers), &user, &org, active)
        .await?;
    forget(&s, Affected::Membership(user, org)).await;
    ok(m)
}

async fn remove_membership(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path((user, org)): Path<(String, String)>,
) -> ApiResult {
    s.directory
        .remove_membership(&actor(&headers), &user, &org)
        .await?;
    forget(&s, Affected::Membership(user.clone(), org.clone())).await;
    ok(json!({"removed": {"user_id": user, "organization_id": org}}))
}

#[derive(Deserialize)]
struct AuditQuery {
    user: Option<String>,
    organization: Option<String>,
    kind: Option<String>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    until: Option<chrono::DateTime<chrono::Utc>>,
    limit: Option<u64>,
    cursor: Option<String>,
}

async fn list_audit(State(s): State<AdminState>, Query(q): Query<AuditQuery>) -> ApiResult {
    let filter = AuditFilter {
        user: q.user,
        organization: q.organization,
        kind: q.kind,
        since: q.since,
        until: q.until,
    };
    ok(s.directory
        .list_audit_events(&filter, q.limit, q.cursor.as_deref())
        .await?)
}
