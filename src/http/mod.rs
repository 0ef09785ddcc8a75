//! The HTTP edge: the proxy listener (reverse proxy, forward-auth and `/.idsync/me|tenant` on one
//! pipeline, CORS) and the admin listener. Builds no SQL and holds no policy of its own: it reads what a
//! request carries, asks `access`, and maps the answer to a status and headers.

pub mod admin;
pub mod admin_api;
pub mod auth;
pub mod cors;
pub mod error;
pub mod forwarded;
pub mod headers;
pub mod lifecycle;
pub mod paths;
pub mod proxy;
pub mod server;

use crate::access::{Admission, Gatekeeper};
use crate::directory::Directory;
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use error::{ApiError, ErrorId};
use headers::HeaderNames;
use http::{HeaderMap, StatusCode};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;

/// Everything a request needs; built once by `startup`.
pub struct AppState {
    pub gatekeeper: Arc<Gatekeeper>,
    pub upstream: proxy::Upstream,
    pub names: HeaderNames,
    /// Path prefixes proxied without a token (still stripped), canonical (`paths`).
    pub skip_auth: Vec<String>,
    /// The one header a proxy in front carries the original URI in, for forward-auth (`/.idsync/auth`);
    /// without it, forward-auth never treats a path as public.
    pub forward_auth_uri_header: Option<http::HeaderName>,
    pub directory: Arc<Directory>,
    pub cors: cors::CorsPolicy,
}

/// Who a request was for, for the access log.
#[derive(Clone, Debug, Default)]
struct LogIdentity {
    user_id: Option<String>,
    tenant_id: Option<String>,
}

impl LogIdentity {
    fn of(admission: &Admission) -> Self {
        Self {
            user_id: admission.view.user_id.clone(),
            tenant_id: admission.view.tenant_id.clone(),
        }
    }
}

/// The main listener's routes: forward-auth under `/.idsync/`, everything else proxied.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/.idsync/auth", any(forward_auth))
        // Envoy ext_authz (HTTP service) appends the original path to its `path_prefix`.
        .route("/.idsync/auth/{*rest}", any(forward_auth))
        .route("/.idsync/me", get(me))
        .route("/.idsync/tenant", get(tenant))
        .merge(lifecycle::routes())
        // The namespace is idsync's: an unknown path here is never proxied to the app.
        .route(
            "/.idsync/{*rest}",
            any(|| async { ApiError::NotFound("no such idsync endpoint".into()) }),
        )
        .fallback(reverse_proxy)
        .layer(middleware::from_fn_with_state(state.clone(), cors::layer))
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

/// `GET /.idsync/me`: the caller's synced profile, the active tenant and every tenant they may switch to.
async fn me(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let admitted = match pipeline(&state, req.headers_mut(), None).await {
        Ok(Some(a)) => a,
        Ok(None) => return ApiError::InvalidToken("missing bearer token".into()).into_response(),
        Err(e) => return e.into_response(),
    };
    let result = async {
        let identity = &admitted.authenticated.identity;
        let view = &admitted.view;
        let user = match (&view.user_id, view.synced) {
            (Some(id), true) => Some(state.directory.get_user(id).await?.user),
            _ => None,
        };
        let active = active_tenant(&state, &admitted).await?;
        let mut tenants: Vec<serde_json::Value> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if let (Some(uid), true) = (&view.user_id, view.synced) {
            for (org, m) in state.directory.active_organizations_of(uid).await? {
                seen.insert(org.id.clone());
                tenants.push(json!({"id": org.id, "name": org.name, "slug": org.slug, "role": m.role, "role_source": m.role_source, "source": "membership"}));
            }
        }
        for t in &identity.tenants {
            if seen.insert(t.to_string()) {
                tenants.push(json!({"id": t, "name": identity.tenant_name(t.as_str()), "slug": null, "role": null, "role_source": null, "source": "token"}));
            }
        }
        Ok::<_, ApiError>(json!({
            "user": user,
            "issuer": identity.issuer,
            "idp_roles": identity.roles,
            "tenant": active,
            "tenants": tenants,
            "synced": view.synced,
        }))
    }
    .await;
    match result {
        Ok(body) => (
            StatusCode::OK,
            [(http::header::CACHE_CONTROL, "no-store")],
            Json(body),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /.idsync/tenant`: the active tenant alone.
async fn tenant(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let admitted = match pipeline(&state, req.headers_mut(), None).await {
        Ok(Some(a)) => a,
        Ok(None) => return ApiError::InvalidToken("missing bearer token".into()).into_response(),
        Err(e) => return e.into_response(),
    };
    match active_tenant(&state, &admitted).await {
        Ok(Some(t)) => (StatusCode::OK, [(http::header::CACHE_CONTROL, "no-store")], Json(json!({
            "tenant_id": t["id"], "name": t["name"], "slug": t["slug"], "is_active": t["is_active"], "role": t["role"],
        }))).into_response(),
        Ok(None) => ApiError::NotFound("the request has no active tenant".into()).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn active_tenant(
    state: &AppState,
    admitted: &Admission,
) -> Result<Option<serde_json::Value>, ApiError> {
    let view = &admitted.view;
    let Some(id) = &view.tenant_id else {
        return Ok(None);
    };
    if !view.synced {
        return Ok(Some(
            json!({"id": id, "name": view.tenant_name, "slug": null, "is_active": null, "role": view.role}),
        ));
    }
    let org = state.directory.get_organization(id).await?.organization;
    Ok(Some(json!({
        "id": org.id, "name": org.name, "slug": org.slug, "is_active": org.is_active, "role": view.role,
    })))
}

/// Runs the shared pipeline: take the tenant request aside, strip, skip-auth (when `path` is given) or
/// ask the access layer. Returns `None` for a public path.
async fn pipeline(
    state: &AppState,
    headers: &mut HeaderMap,
    path: Option<&paths::RequestPath>,
) -> Result<Option<Admission>, ApiError> {
    let asks = auth::take_and_strip(headers, &state.names)?;
    if path.is_some_and(|p| paths::is_public(&state.skip_auth, p)) {
        return Ok(None);
    }
    let token = auth::bearer_token(headers)?;
    let admitted = state
        .gatekeeper
        .admit(token, asks.tenant.as_ref(), crate::oidc::unix_now())
        .await?;
    Ok(Some(admitted))
}

async fn reverse_proxy(
    State(state): State<Arc<AppState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let path = match paths::canonical(req.uri().path()) {
        Ok(p) => p,
        Err(e) => return ApiError::InvalidRequest(e.to_string()).into_response(),
    };
    let admitted = match pipeline(&state, req.headers_mut(), Some(&path)).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    if let Some(a) = &admitted {
        headers::inject(req.headers_mut(), &state.names, a);
    }
    let valid_until = admitted.as_ref().map(|a| a.authenticated.expires_at);
    let mut response = match state.upstream.forward(req, client, valid_until).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    if let Some(a) = &admitted {
        response.extensions_mut().insert(LogIdentity::of(a));
    }
    response
}

/// Forward-auth for nginx `auth_request` / ingress-nginx `auth-url`, Traefik ForwardAuth and Envoy
/// ext_authz (HTTP service): the same pipeline, answering exactly 200 (Envoy takes any other 2xx as a
/// denial) with the identity headers instead of proxying, any method.
async fn forward_auth(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let original = match original_uri(&state, &req) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    match pipeline(&state, req.headers_mut(), original.as_ref()).await {
        Err(e) => e.into_response(),
        Ok(admitted) => {
            let mut response = (StatusCode::OK, Body::empty()).into_response();
            let h = response.headers_mut();
            if let Some(a) = &admitted {
                headers::inject(h, &state.names, a);
            }
            // Envoy copies only the headers an answer carries, leaving a client's copies of the others
            // in place: name every owned header this answer does not set, for Envoy to remove.
            let unset: Vec<&str> = state
                .names
                .all_owned()
                .filter(|n| !h.contains_key(*n))
                .collect();
            if let Ok(v) = http::HeaderValue::from_str(&unset.join(",")) {
                h.insert("x-envoy-auth-headers-to-remove", v);
            }
            if let Some(a) = &admitted {
                response.extensions_mut().insert(LogIdentity::of(a));
            }
            response
        }
    }
}

/// The original request's path, for skip-auth: from Envoy's request line (`/.idsync/auth/<path>`) or
/// from the one header the operator named; never from a header the client could have chosen instead.
fn original_uri(state: &AppState, req: &Request) -> Result<Option<paths::RequestPath>, ApiError> {
    let bad = |e: paths::PathError| ApiError::InvalidRequest(format!("original URI: {e}"));
    if let Some(rest) = req.uri().path().strip_prefix("/.idsync/auth/") {
        let path = format!("/{rest}");
        return paths::canonical(&path).map(Some).map_err(bad);
    }
    let Some(name) = &state.forward_auth_uri_header else {
        return Ok(None);
    };
    let mut values = req.headers().get_all(name).iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return Ok(None),
        (Some(v), None) => v,
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidRequest(format!(
                "several {name} headers were sent"
            )));
        }
    };
    let uri = value
        .to_str()
        .map_err(|_| ApiError::InvalidRequest(format!("{name} is not ASCII text")))?;
    let path = uri.split(['?', '#']).next().unwrap_or_default();
    paths::canonical(path).map(Some).map_err(bad)
}

/// One structured line per request; the query string is never logged (it may carry secrets).
async fn access_log(req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let who = response
        .extensions()
        .get::<LogIdentity>()
        .cloned()
        .unwrap_or_default();
    let error = response.extensions().get::<ErrorId>();
    let outcome = error.map_or("forwarded", |e| e.code);
    metrics::counter!("idsync_requests_total", "outcome" => outcome).increment(1);
    tracing::info!(
        target: "idsync::access",
        %method,
        path,
        status,
        user_id = who.user_id.as_deref(),
        tenant_id = who.tenant_id.as_deref(),
        latency_us = started.elapsed().as_micros() as u64,
        error_id = error.map(|e| e.id.as_str()),
        "request"
    );
    response
}
