//! CORS for browser apps calling through idsync: exact allowed origins only (never a reflected `*`),
//! preflights answered here without a token, CORS headers added to every answer for an allowed origin.
//! With no origins configured idsync does not touch CORS and the app's own headers pass through.

use super::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Method, StatusCode, header};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct CorsPolicy {
    origins: Vec<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
}

const METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";

impl CorsPolicy {
    pub fn new(origins: &[String], allow_headers: &str, max_age: Duration) -> Result<Self, String> {
        let mut parsed = Vec::new();
        for o in origins {
            let url = url::Url::parse(o)
                .map_err(|_| format!("`{o}` is not an origin such as https://app.example.com"))?;
            let origin = url.origin().ascii_serialization();
            if o == "*" || !url.origin().is_tuple() || origin != o.trim_end_matches('/') {
                return Err(format!(
                    "`{o}` is not an exact origin (scheme://host[:port], no path; `*` is never allowed)"
                ));
            }
            parsed.push(HeaderValue::from_str(&origin).map_err(|e| e.to_string())?);
        }
        Ok(Self {
            origins: parsed,
            allow_headers: Some(
                HeaderValue::from_str(allow_headers)
                    .map_err(|_| "the allowed headers are not header text".to_string())?,
            ),
            max_age: Some(HeaderValue::from(max_age.as_secs())),
        })
    }

    pub fn enabled(&self) -> bool {
        !self.origins.is_empty()
    }

    fn allowed(&self, origin: &HeaderValue) -> bool {
        self.origins.iter().any(|o| o == origin)
    }
}

/// As middleware, for idsync's own endpoints.
pub async fn layer(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    around(&state.cors, req, |req| next.run(req)).await
}

/// Runs `inner` for `req` under `policy`: preflights answered here, CORS headers added or stripped.
/// `inner` is awaited in one place only, so its (large) future is laid out once in this one.
pub async fn around<F, Fut>(policy: &CorsPolicy, req: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let after = match before(policy, &req) {
        Ok(after) => after,
        Err(answered) => return *answered,
    };
    let mut response = inner(req).await;
    match after {
        After::Untouched => {}
        After::Allowed(origin) => grant(response.headers_mut(), origin),
        After::Stripped => {
            strip_cors(&mut response);
            response
                .headers_mut()
                .append(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
    response
}

/// What `around` does to the answer once `inner` has given it.
enum After {
    /// CORS is not configured: the app's own headers pass.
    Untouched,
    /// An allowed origin: idsync's CORS headers.
    Allowed(HeaderValue),
    /// No origin, or one not allowed: nothing granted, the app's CORS headers removed.
    Stripped,
}

/// The decision before `inner` runs; `Err` is a preflight answered here (boxed: rare, and large).
fn before(policy: &CorsPolicy, req: &Request) -> Result<After, Box<Response>> {
    if !policy.enabled() {
        return Ok(After::Untouched);
    }
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    match req.headers().get(header::ORIGIN) {
        Some(origin) if policy.allowed(origin) => {
            if !preflight {
                return Ok(After::Allowed(origin.clone()));
            }
            let mut r = (StatusCode::NO_CONTENT, Body::empty()).into_response();
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(METHODS),
            );
            if let Some(v) = &policy.allow_headers {
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
            }
            if let Some(v) = &policy.max_age {
                h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
            }
            grant(h, origin.clone());
            Err(Box::new(r))
        }
        // A preflight from an origin that is not allowed gets no CORS headers, so the browser refuses.
        Some(_) if preflight => Err(Box::new(
            (StatusCode::FORBIDDEN, Body::empty()).into_response(),
        )),
        _ => Ok(After::Stripped),
    }
}

/// The headers that let an allowed origin read the answer.
fn grant(h: &mut http::HeaderMap, origin: HeaderValue) {
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("x-request-id, www-authenticate"),
    );
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// idsync owns CORS when it is configured: the app's own CORS headers must not grant what idsync refused.
fn strip_cors(response: &mut Response) {
    for h in [
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        header::ACCESS_CONTROL_ALLOW_METHODS,
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
    ] {
        response.headers_mut().remove(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_origins_are_accepted() {
        let ok = CorsPolicy::new(
            &[
                "https://app.example.com".into(),
                "http://localhost:5173".into(),
            ],
            "authorization",
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(ok.allowed(&HeaderValue::from_static("https://app.example.com")));
        assert!(!ok.allowed(&HeaderValue::from_static("https://evil.example.com")));
        assert!(!ok.allowed(&HeaderValue::from_static("null")));
        for bad in [
            "*",
            "https://app.example.com/path",
            "app.example.com",
            "null",
        ] {
            assert!(
                CorsPolicy::new(&[bad.into()], "a", Duration::from_secs(1)).is_err(),
                "{bad}"
            );
        }
    }
}
