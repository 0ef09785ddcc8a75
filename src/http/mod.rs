//! The HTTP edge: the proxy listener (reverse proxy, forward-auth and `/.idsync/me|tenant` on one
//! pipeline, CORS) and the admin listener. Builds no SQL and holds no policy of its own: it reads what a
//! request carries, asks `access`, and maps the answer to a status and headers.

pub mod admin;
pub mod admin_api;
pub mod auth;
pub mod cors;
pub mod error;
pub mod headers;
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
    /// Path prefixes proxied without a token (still stripped).
    pub skip_auth: Vec<String>,
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
        .route("/.idsync/me", get(me))
        .route("/.idsync/tenant", get(tenant))
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
    path: Option<&str>,
) -> Result<Option<Admission>, ApiError> {
    let asks = auth::take_and_strip(headers, &state.names)?;
    if path.is_some_and(|p| is_public(&state.skip_auth, p)) {
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
    let path = req.uri().path().to_owned();
    let admitted = match pipeline(&state, req.headers_mut(), Some(&path)).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    if let Some(a) = &admitted {
        headers::inject(req.headers_mut(), &state.names, a);
    }
    let mut response = match state.upstream.forward(req, client).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    if let Some(a) = &admitted {
        response.extensions_mut().insert(LogIdentity::of(a));
    }
    response
}

/// Forward-auth for ingress-nginx `auth-url`, Traefik ForwardAuth and Envoy ext_authz (HTTP): the same
/// pipeline, answering 200 with the identity headers instead of proxying.
async fn forward_auth(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let original = ["x-original-uri", "x-forwarded-uri"]
        .iter()
        .find_map(|h| req.headers().get(*h).and_then(|v| v.to_str().ok()))
        .map(|uri| uri.split('?').next().unwrap_or("/").to_owned())
        .unwrap_or_else(|| "/".to_owned());
    match pipeline(&state, req.headers_mut(), Some(&original)).await {
        Err(e) => e.into_response(),
        Ok(admitted) => {
            let mut response = (StatusCode::OK, Body::empty()).into_response();
            if let Some(a) = &admitted {
                headers::inject(response.headers_mut(), &state.names, a);
                response.extensions_mut().insert(LogIdentity::of(a));
            }
            response
        }
    }
}

/// Whether `path` falls under a skip-auth prefix. A path with dot-segments or encoded `.`/`/` never
/// matches: the upstream may normalise `/public/../admin` into `/admin`, which must not skip auth.
pub fn is_public(prefixes: &[String], path: &str) -> bool {
    if prefixes.is_empty() {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    let ambiguous = lower.contains("%2e")
        || lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains('\\')
        || path.split('/').any(|seg| seg == "." || seg == "..")
        || path.contains("//");
    if ambiguous {
        return false;
    }
    prefixes.iter().any(|p| {
        path == p
            || (path.starts_with(p.as_str())
                && (p.ends_with('/') || path.as_bytes().get(p.len()) == Some(&b'/')))
    })
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

#[cfg(test)]
mod tests {
    use super::is_public;

    #[test]
    fn skip_auth_matches_whole_segments_only() {
        let p = vec!["/public".to_string(), "/assets/".to_string()];
        assert!(is_public(&p, "/public"));
        assert!(is_public(&p, "/public/logo.png"));
        assert!(is_public(&p, "/assets/app.js"));
        assert!(!is_public(&p, "/publicity"));
        assert!(!is_public(&p, "/api"));
    }

    #[test]
    fn skip_auth_never_matches_paths_that_normalise_elsewhere() {
        let p = vec!["/public".to_string()];
        for path in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/..%2Fadmin",
            "/public//x",
            "/public/./x",
            "/public\\..\\admin",
        ] {
            assert!(!is_public(&p, path), "{path}");
        }
    }
}
