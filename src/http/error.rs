//! The one error type at the HTTP edge. Each variant's doc names its status; every response carries a JSON
//! body with an `error_id` that is also in the log line, and 401s carry an RFC 6750 `WWW-Authenticate`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401: the bearer token is missing, malformed, or fails verification.
    #[error("{0}")]
    InvalidToken(String),
    /// 400: the request itself is malformed (e.g. several `Authorization` headers).
    #[error("{0}")]
    InvalidRequest(String),
    /// 403: the caller asked for a tenant the token does not allow.
    #[error("{0}")]
    TenantNotPermitted(String),
    /// 403: the token names no tenant and the policy requires one.
    #[error("{0}")]
    MissingTenant(String),
    /// 502: the upstream could not be reached or broke the connection.
    #[error("{0}")]
    UpstreamUnavailable(String),
    /// 504: the upstream did not answer in time.
    #[error("upstream did not respond in time")]
    UpstreamTimeout,
    /// 503: a dependency (the IdP's keys, the database) is unavailable.
    #[error("{0}")]
    Unavailable(String),
}

/// Put on every error response so the access log can name the same id.
#[derive(Clone, Debug)]
pub struct ErrorId {
    pub id: String,
    pub code: &'static str,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::TenantNotPermitted(_) | Self::MissingTenant(_) => StatusCode::FORBIDDEN,
            Self::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The machine-readable `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidToken(_) => "invalid_token",
            Self::InvalidRequest(_) => "invalid_request",
            Self::TenantNotPermitted(_) => "tenant_not_permitted",
            Self::MissingTenant(_) => "missing_tenant_claim",
            Self::UpstreamUnavailable(_) => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::Unavailable(_) => "temporarily_unavailable",
        }
    }
}

fn new_error_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error_id = new_error_id();
        let status = self.status();
        let code = self.code();
        let description = self.to_string();
        if status.is_server_error() {
            tracing::warn!(error_id, error = self.code(), status = status.as_u16(), reason = %description, "request failed");
        } else {
            tracing::info!(error_id, error = self.code(), status = status.as_u16(), reason = %description, "request refused");
        }
        let body = serde_json::json!({
            "error": self.code(),
            "error_description": description,
            "error_id": error_id,
        });
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750 section 3: the description is a quoted-string, so `"` and `\` must not appear raw.
            let safe: String = description
                .chars()
                .map(|c| {
                    if c == '"' || c == '\\' || !(' '..='~').contains(&c) {
                        '\''
                    } else {
                        c
                    }
                })
                .collect();
            let challenge = format!(
                r#"Bearer realm="idsync", error="invalid_token", error_description="{safe}""#
            );
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
            .extensions_mut()
            .insert(ErrorId { id: error_id, code });
        response
    }
}
