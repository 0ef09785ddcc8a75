//! The HTTP edge: the proxy listener (reverse proxy, forward-auth and `/.idsync/me|tenant` on one
//! pipeline, CORS) and the admin listener. Builds no SQL and holds no policy of its own: it reads what a
//! request carries, asks `access`, and maps the answer to a status and headers.

pub mod admin;
pub mod admin_api;
pub mod auth;
pub mod cors;
pub mod error;
pub mod forwarded;
pub mod grpc;
pub mod headers;
pub mod lifecycle;
pub mod paths;
pub mod proxy;
pub mod server;

use crate::access::{Admission, Gatekeeper};
use crate::directory::Directory;
use crate::telemetry::trace;
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use error::{ApiError, ErrorId};
use headers::HeaderNames;
use http::{HeaderMap, StatusCode};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use tower::ServiceExt as _;

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
    /// Set when traces are exported (`--otlp-endpoint`, `OTEL_EXPORTER_OTLP_*`).
    pub tracer: Option<Arc<trace::Tracer>>,
}

/// Who a request was for, for the access log: the view the request was admitted with.
#[derive(Clone, Debug)]
struct LogIdentity(crate::provision::Synced);

impl LogIdentity {
    fn of(admission: &Admission) -> Self {
        Self(admission.view.clone())
    }
}

/// The proxy listener: every request not under `/.idsync/` goes straight to the reverse proxy (no router,
/// no middleware stack: this is the path every request of the app takes); idsync's own endpoints go
/// through `router`. Both are CORS-wrapped and access-logged here.
pub struct Edge {
    state: Arc<AppState>,
    router: Router,
}

impl Edge {
    pub fn new(state: Arc<AppState>) -> Arc<Self> {
        Arc::new(Self {
            router: router(state.clone()),
            state,
        })
    }
}

fn is_idsync_path(path: &str) -> bool {
    path.strip_prefix("/.idsync")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl server::Handler for Edge {
    fn call(
        self: Arc<Self>,
        req: http::Request<hyper::body::Incoming>,
        peer: SocketAddr,
        lane: Option<Arc<proxy::Lane>>,
    ) -> impl std::future::Future<Output = Response> + Send + 'static {
        let edge = self;
        async move {
            let started = std::time::Instant::now();
            // Cheap copies (a reference count), kept for the log line after the request is gone.
            let method = req.method().clone();
            let uri = req.uri().clone();
            let span = edge
                .state
                .tracer
                .as_ref()
                .map(|t| t.request(&method, uri.path(), req.headers(), req.version()));
            let trace_id = match &span {
                Some(s) => Some(s.trace_id()),
                None => trace::incoming_trace_id(req.headers()),
            };
            // Noted before the request is handed on: a refused gRPC call is answered in gRPC's shape,
            // after the log line and the span have recorded the HTTP status it stands for.
            let grpc = !is_idsync_path(uri.path()) && grpc::is_grpc(req.headers());
            // Who was admitted, for the log line and the span: set by the reverse proxy here (a response
            // extension would cost a map allocated per request), by idsync's own endpoints as an extension.
            let admitted = std::sync::OnceLock::new();
            // Built and awaited in one expression: a request future kept in a local first would be
            // laid out twice in this one (rust-lang/rust#62958), and hyper moves it whole per request.
            let response = trace::traced(
                trace_id,
                span.as_ref().map(|s| s.context().clone()),
                edge.handle(
                    req.map(Body::new),
                    peer,
                    lane.as_deref(),
                    uri.path(),
                    &admitted,
                ),
            )
            .await;
            let error = response.extensions().get::<ErrorId>();
            let who = admitted
                .get()
                .or_else(|| response.extensions().get::<LogIdentity>());
            if let Some(span) = span {
                span.finish(
                    response.status().as_u16(),
                    error.map(|e| e.code),
                    who.and_then(|w| w.0.user_id.as_deref()),
                    who.and_then(|w| w.0.tenant_id()),
                );
            }
            log_request(&method, uri.path(), &response, who, started, trace_id);
            if grpc {
                grpc::refusal(response)
            } else {
                response
            }
        }
    }
}

impl Edge {
    async fn handle(
        &self,
        mut req: Request,
        peer: SocketAddr,
        lane: Option<&proxy::Lane>,
        path: &str,
        admitted: &std::sync::OnceLock<LogIdentity>,
    ) -> Response {
        if is_idsync_path(path) {
            req.extensions_mut().insert(ConnectInfo(peer));
            // Boxed: the router's future is large and idsync's own endpoints are rare next to the
            // proxied requests whose future would otherwise carry its size.
            match Box::pin(self.router.clone().oneshot(req)).await {
                Ok(r) => r,
                Err(e) => match e {},
            }
        } else {
            let state = &self.state;
            cors::around(&state.cors, req, |req| {
                reverse_proxy(state, peer, lane, req, admitted)
            })
            .await
        }
    }
}

/// One line per request (`telemetry::access`) and the request counter; the query string is never
/// logged (it may carry secrets).
fn log_request(
    method: &http::Method,
    path: &str,
    response: &Response,
    who: Option<&LogIdentity>,
    started: std::time::Instant,
    trace_id: Option<trace::TraceId>,
) {
    use std::sync::LazyLock;
    static FORWARDED: LazyLock<metrics::Counter> =
        LazyLock::new(|| metrics::counter!("idsync_requests_total", "outcome" => "forwarded"));
    let error = response.extensions().get::<ErrorId>();
    match error {
        None => FORWARDED.increment(1),
        Some(e) => metrics::counter!("idsync_requests_total", "outcome" => e.code).increment(1),
    }
    crate::telemetry::access::record(&crate::telemetry::access::Line {
        method: method.as_str(),
        path,
        status: response.status().as_u16(),
        user_id: who.and_then(|w| w.0.user_id.as_deref()),
        tenant_id: who.and_then(|w| w.0.tenant_id()),
        latency_us: started.elapsed().as_micros() as u64,
        error_id: error.map(|e| e.id.as_str()),
        trace_id,
    });
}

/// idsync's own endpoints under `/.idsync/`; anything else that reaches it is proxied.
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
        .fallback(proxy_fallback)
        .layer(middleware::from_fn_with_state(state.clone(), cors::layer))
        .with_state(state)
}

async fn proxy_fallback(
    State(state): State<Arc<AppState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let admitted = std::sync::OnceLock::new();
    let mut response = reverse_proxy(&state, client, None, req, &admitted).await;
    if let Some(who) = admitted.into_inner() {
        response.extensions_mut().insert(who);
    }
    response
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
        for t in identity.tenants.iter() {
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
    let Some(id) = view.tenant_id() else {
        return Ok(None);
    };
    if !view.synced {
        return Ok(Some(
            json!({"id": id, "name": view.tenant_name(), "slug": null, "is_active": null, "role": view.role()}),
        ));
    }
    let org = state.directory.get_organization(id).await?.organization;
    Ok(Some(json!({
        "id": org.id, "name": org.name, "slug": org.slug, "is_active": org.is_active, "role": view.role(),
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
    state: &AppState,
    client: SocketAddr,
    lane: Option<&proxy::Lane>,
    mut req: Request,
    admitted_as: &std::sync::OnceLock<LogIdentity>,
) -> Response {
    let path = match paths::canonical(req.uri().path()) {
        Ok(p) => p,
        Err(e) => return ApiError::InvalidRequest(e.to_string()).into_response(),
    };
    let admitted = match pipeline(state, req.headers_mut(), Some(&path)).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    if let Some(a) = &admitted {
        headers::inject(req.headers_mut(), &state.names, a);
    }
    let valid_until = admitted.as_ref().map(|a| a.authenticated.expires_at());
    let span = trace::client_child("idsync.upstream");
    span.inject(req.headers_mut());
    let response = match state.upstream.forward(req, client, lane, valid_until).await {
        Ok(r) => r,
        Err(e) => {
            span.fail(e.code());
            e.into_response()
        }
    };
    drop(span);
    if let Some(a) = &admitted {
        let _ = admitted_as.set(LogIdentity::of(a));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper moves each request's future whole (into its connection's slot, through the service
    /// call): at 15-25 KB, before the database path, the router and the trace wrappers were boxed or
    /// awaited once, memmove was 8.5 % of a warm request's CPU samples, most of it these copies (4.3 %
    /// after).
    #[test]
    fn a_proxied_requests_future_stays_small() {
        fn output_size<F, Fut>(_: F) -> usize
        where
            F: FnOnce(
                Arc<Edge>,
                http::Request<hyper::body::Incoming>,
                SocketAddr,
                Option<Arc<proxy::Lane>>,
            ) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let size = output_size(<Edge as server::Handler>::call);
        eprintln!("a proxied request's future: {size} bytes");
        assert!(size <= 6 * 1024, "{size} bytes");
    }
}
