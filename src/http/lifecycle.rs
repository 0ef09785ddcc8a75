//! The IdP's calls to idsync, on the proxy listener (the address the IdP can reach):
//! - `POST /.idsync/backchannel-logout`: OIDC Back-Channel Logout 1.0 (`logout_token` in a form body);
//!   200 when the session is revoked, 400 with a JSON error otherwise (section 2.8);
//! - `POST /.idsync/webhooks/frontegg`: Frontegg webhooks, `x-webhook-secret` a JWT signed with the
//!   shared secret;
//! - `POST /.idsync/webhooks/keycloak`: keycloak-events webhooks, `X-Keycloak-Signature` the hex
//!   HMAC-SHA256 of the body.
//!
//! A webhook whose signature does not verify is 401 and changes nothing; one idsync does not handle is
//! 200 and changes nothing.

use super::AppState;
use super::error::ApiError;
use crate::access::LifecycleError;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::{HeaderMap, StatusCode, header};
use std::sync::Arc;

/// Largest body accepted: a logout token is a few KiB, an IdP event some tens.
const MAX_BODY: usize = 1024 * 1024;

pub fn routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/.idsync/backchannel-logout", post(backchannel_logout))
        .route("/.idsync/webhooks/frontegg", post(frontegg))
        .route("/.idsync/webhooks/keycloak", post(keycloak))
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::Invalid(m) => Self::InvalidRequest(m),
            LifecycleError::BadSignature => Self::BadSignature,
            LifecycleError::Keys(k) => Self::KeysUnavailable(k.to_string()),
            LifecycleError::Database(db) => Self::DatabaseUnavailable(db.to_string()),
            LifecycleError::Internal(m) => Self::Internal(m),
        }
    }
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
}

async fn body(req: Request, want: &str) -> Result<(HeaderMap, Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    if media_type(&parts.headers).as_deref() != Some(want) {
        return Err(ApiError::InvalidRequest(format!("the body must be {want}")));
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::InvalidRequest(format!("the body is larger than {MAX_BODY} bytes"))
    })?;
    Ok((parts.headers, bytes))
}

fn one_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => v.to_str().map_err(|_| ApiError::BadSignature),
        (None, _) => Err(ApiError::BadSignature),
        _ => Err(ApiError::InvalidRequest(format!(
            "several {name} headers were sent"
        ))),
    }
}

async fn backchannel_logout(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let result = async {
        let (_, bytes) = body(req, "application/x-www-form-urlencoded").await?;
        let tokens: Vec<String> = url::form_urlencoded::parse(&bytes)
            .filter(|(k, _)| k == "logout_token")
            .map(|(_, v)| v.into_owned())
            .collect();
        let [token] = tokens.as_slice() else {
            return Err(ApiError::InvalidRequest(
                "the body must carry exactly one logout_token".into(),
            ));
        };
        let done = state
            .gatekeeper
            .backchannel_logout(token, crate::oidc::unix_now())
            .await?;
        tracing::info!(issuer = %done.issuer, revoked = ?done.revoked, "back-channel logout");
        Ok::<_, ApiError>(())
    }
    .await;
    // Section 2.8: every answer, refusals included, is not to be cached.
    let mut response = match result {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    };
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

async fn frontegg(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let result = async {
        let (headers, bytes) = body(req, "application/json").await?;
        let signed = one_header(&headers, "x-webhook-secret")?;
        Ok::<_, ApiError>(
            state
                .gatekeeper
                .frontegg_webhook(signed, &bytes, crate::oidc::unix_now())
                .await?,
        )
    }
    .await;
    match result {
        Ok(done) => Json(done).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn keycloak(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let result = async {
        let (headers, bytes) = body(req, "application/json").await?;
        let signature = one_header(&headers, "x-keycloak-signature")?;
        Ok::<_, ApiError>(state.gatekeeper.keycloak_webhook(signature, &bytes).await?)
    }
    .await;
    match result {
        Ok(done) => Json(done).into_response(),
        Err(e) => e.into_response(),
    }
}
