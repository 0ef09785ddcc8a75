//! Calling an IdP's admin API politely: a bearer token fetched once and again when it is about to expire
//! or is refused, rate limits honoured (429 and 503 with `Retry-After`, or Frontegg's
//! `X-Rate-Limit-Reset`), transient failures retried with backoff, and a bounded number of attempts:
//! after that the page counts as failed, and the run changes nothing.

use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Attempts per request before the page counts as failed.
const ATTEMPTS: u32 = 6;
/// The longest idsync waits on one rate-limit answer.
const MAX_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{what}: {cause}")]
    Failed { what: String, cause: String },
    #[error("the IdP refused the credentials: {0}")]
    Credentials(String),
    #[error("unexpected answer: {0}")]
    Shape(String),
}

/// Counts pages and items read, for the progress line.
#[derive(Default)]
pub struct Progress {
    pub pages: AtomicUsize,
    pub users: AtomicUsize,
    pub organizations: AtomicUsize,
    pub memberships: AtomicUsize,
    pub retries: AtomicUsize,
}

impl Progress {
    pub fn line(&self) -> String {
        let g = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        format!(
            "pages {}, users {}, organizations {}, memberships {}, retries {}",
            g(&self.pages),
            g(&self.users),
            g(&self.organizations),
            g(&self.memberships),
            g(&self.retries)
        )
    }
}

/// How to get a bearer token.
pub enum TokenRequest {
    /// OAuth 2.0 client credentials (Keycloak's service account).
    ClientCredentials {
        url: String,
        client_id: String,
        secret: String,
    },
    /// Frontegg's vendor token: `POST /auth/vendor` with `{clientId, secret}`.
    FronteggVendor {
        url: String,
        client_id: String,
        secret: String,
    },
}

struct Token {
    value: String,
    renew_at: Instant,
}

pub struct AdminClient {
    http: reqwest::Client,
    token_request: TokenRequest,
    token: Mutex<Option<Token>>,
    pub progress: std::sync::Arc<Progress>,
}

/// The reason a wait is needed, from a 429/503 answer.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(secs) = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some(Duration::from_secs(secs));
    }
    // Frontegg: the reset time of the window, as an RFC 3339 date.
    let reset = headers
        .get("x-rate-limit-reset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| chrono::DateTime::parse_from_rfc3339(v.trim()).ok())?;
    let wait = reset.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

impl AdminClient {
    pub fn new(http: reqwest::Client, token_request: TokenRequest) -> Self {
        Self {
            http,
            token_request,
            token: Mutex::new(None),
            progress: Default::default(),
        }
    }

    async fn token(&self, renew: bool) -> Result<String, FetchError> {
        let mut held = self.token.lock().await;
        if !renew
            && let Some(t) = held.as_ref()
            && Instant::now() < t.renew_at
        {
            return Ok(t.value.clone());
        }
        let (request, field, ttl_field) = match &self.token_request {
            TokenRequest::ClientCredentials {
                url,
                client_id,
                secret,
            } => (
                self.http.post(url).form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    ("client_secret", secret.as_str()),
                ]),
                "access_token",
                "expires_in",
            ),
            TokenRequest::FronteggVendor {
                url,
                client_id,
                secret,
            } => (
                self.http
                    .post(url)
                    .json(&serde_json::json!({"clientId": client_id, "secret": secret})),
                "token",
                "expiresIn",
            ),
        };
        // The token endpoint is retried like any page: a blip there must not fail the run.
        let mut backoff = Duration::from_millis(200);
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let sent = request
                .try_clone()
                .expect("form and JSON bodies can be cloned")
                .send()
                .await;
            let cause = match sent {
                Ok(r) if !(r.status().is_server_error() || r.status().as_u16() == 429) => break r,
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => e.to_string(),
            };
            if attempt >= ATTEMPTS {
                return Err(FetchError::Failed {
                    what: "token".into(),
                    cause: format!("{cause} after {ATTEMPTS} attempts"),
                });
            }
            self.progress.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        };
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(FetchError::Credentials(format!("HTTP {status}")));
        }
        let value = body[field]
            .as_str()
            .ok_or_else(|| FetchError::Shape(format!("the token answer has no `{field}`")))?
            .to_owned();
        let ttl = body[ttl_field].as_u64().unwrap_or(60);
        // Renew at four fifths of the lifetime.
        let renew_at = Instant::now() + Duration::from_secs(ttl * 4 / 5);
        *held = Some(Token {
            value: value.clone(),
            renew_at,
        });
        Ok(value)
    }

    /// GETs `url` as JSON, with `headers`; `Ok(None)` for a 404 (the caller decides what it means).
    pub async fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Option<Value>, FetchError> {
        let mut backoff = Duration::from_millis(200);
        let mut renewed = false;
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                self.progress.retries.fetch_add(1, Ordering::Relaxed);
            }
            let token = self.token(false).await?;
            let mut req = self.http.get(url).bearer_auth(&token);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let response = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = e.to_string();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            let status = response.status();
            match status.as_u16() {
                200..=299 => {
                    let v = response
                        .json()
                        .await
                        .map_err(|e| FetchError::Shape(format!("{url}: {e}")))?;
                    return Ok(Some(v));
                }
                404 => return Ok(None),
                401 if !renewed => {
                    renewed = true;
                    self.token(true).await?;
                }
                429 | 503 => {
                    let wait = retry_after(response.headers())
                        .unwrap_or(backoff)
                        .min(MAX_WAIT);
                    last = format!("HTTP {status}");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                500..=599 => {
                    last = format!("HTTP {status}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                _ => {
                    return Err(FetchError::Failed {
                        what: url.to_owned(),
                        cause: format!("HTTP {status}"),
                    });
                }
            }
        }
        Err(FetchError::Failed {
            what: url.to_owned(),
            cause: format!("{last} after {ATTEMPTS} attempts"),
        })
    }
}
