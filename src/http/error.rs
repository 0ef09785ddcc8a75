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
    /// 401 without a bearer challenge: an IdP's webhook whose signature does not verify.
    #[error("the signature does not verify")]
    BadSignature,
    /// 403: tenant policy refuses the identity; the code names the rule (`tenant_not_permitted`,
    /// `missing_tenant_claim`, `identity_conflict`, `user_inactive`, `tenant_inactive`, `membership_inactive`).
    #[error("{1}")]
    Forbidden(&'static str, String),
    /// 404: an admin API resource does not exist.
    #[error("{0}")]
    NotFound(String),
    /// 409: an admin API change conflicts with the current state (e.g. deleting a tenant with members).
    #[error("{0}")]
    Conflict(String),
    /// 502: the upstream could not be reached or broke the connection.
    #[error("{0}")]
    UpstreamUnavailable(String),
    /// 504: the upstream did not answer in time.
    #[error("upstream did not respond in time")]
    UpstreamTimeout,
    /// 503: the token's issuer has no usable keys; the detail (URLs, causes) goes to the log only.
    #[error("the token cannot be verified right now; try again later")]
    KeysUnavailable(String),
    /// 503: the database failed; the detail goes to the log, not to the client.
    #[error("the identity database is unavailable")]
    DatabaseUnavailable(String),
    /// 500: a bug or a misconfiguration; the detail goes to the log, not to the client.
    #[error("internal error")]
    Internal(String),
}

impl From<crate::directory::DirectoryError> for ApiError {
    fn from(e: crate::directory::DirectoryError) -> Self {
        use crate::directory::DirectoryError as D;
        match e {
            D::NotFound(what) => Self::NotFound(format!("{what} not found")),
            D::Conflict(m) => Self::Conflict(m),
            D::Invalid(m) => Self::InvalidRequest(m),
            D::Db(db) => Self::DatabaseUnavailable(db.to_string()),
        }
    }
}

impl From<crate::access::AccessError> for ApiError {
    fn from(e: crate::access::AccessError) -> Self {
        use crate::access::AccessError as A;
        match e {
            A::InvalidToken(reason) => Self::InvalidToken(reason.to_string()),
            A::KeysUnavailable(k) => Self::KeysUnavailable(k.to_string()),
            A::Refused(r) => Self::Forbidden(r.code(), r.to_string()),
            A::Database(db) => Self::DatabaseUnavailable(db.to_string()),
            A::Internal(detail) => Self::Internal(detail),
        }
    }
}

/// Put on every error response so the access log can name the same id.
#[derive(Clone, Debug)]
pub struct ErrorId {
    pub id: String,
    pub code: &'static str,
    /// The `error_description` the client was given (for a gRPC client, its `grpc-message`).
    pub message: Box<str>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::BadSignature => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Forbidden(..) => StatusCode::FORBIDDEN,
            Self::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::KeysUnavailable(_) | Self::DatabaseUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidToken(_) => "invalid_token",
            Self::InvalidRequest(_) => "invalid_request",
            Self::BadSignature => "invalid_signature",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Forbidden(code, _) => code,
            Self::UpstreamUnavailable(_) => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::KeysUnavailable(_) | Self::DatabaseUnavailable(_) => "temporarily_unavailable",
            Self::Internal(_) => "internal_error",
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
        let detail = match &self {
            Self::KeysUnavailable(d) | Self::DatabaseUnavailable(d) | Self::Internal(d) => {
                Some(d.as_str())
            }
            _ => None,
        };
        let trace_id = crate::telemetry::trace::current_trace_id().map(|t| t.to_string());
        if status.is_server_error() {
            tracing::warn!(error_id, trace_id, error = self.code(), status = status.as_u16(), reason = %description, detail, "request failed");
        } else {
            tracing::info!(error_id, trace_id, error = self.code(), status = status.as_u16(), reason = %description, "request refused");
        }
        let mut body = serde_json::json!({
            "error": self.code(),
            "error_description": description,
            "error_id": error_id,
        });
        if let Some(t) = trace_id {
            body["trace_id"] = serde_json::Value::String(t);
        }
        let message = description.clone().into_boxed_str();
        let mut response = (status, Json(body)).into_response();
        if matches!(self, Self::InvalidToken(_)) {
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
        response.extensions_mut().insert(ErrorId {
            id: error_id,
            code,
            message,
        });
        response
    }
}
