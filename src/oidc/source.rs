//! Where an issuer's keys come from: OIDC discovery (the provider metadata parsed by openidconnect), a
//! fixed JWKS URL, or a local JWKS/PEM file. Every failure is a typed [`FetchError`], so callers pick
//! their advice by variant, never by searching a message.

use super::keys::{KeySet, KeySetError};
use openidconnect::core::CoreProviderMetadata;
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// Largest discovery or JWKS document idsync reads; real ones are a few KiB.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `<issuer>/.well-known/openid-configuration`, then its `jwks_uri`.
    Discovery,
    /// A JWKS URL given by the operator; discovery is skipped.
    JwksUri(Url),
    /// A local JWKS or PEM file, re-read when it changes.
    File(PathBuf),
}

/// Why keys could not be loaded. The message names URLs and causes: it is for logs and operators, never
/// for API clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect to {url}: {cause}")]
    Connect { url: String, cause: String },
    #[error("{url} did not answer in time")]
    Timeout { url: String },
    #[error("TLS with {url} failed: {cause}")]
    Tls { url: String, cause: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: the document is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge { url: String },
    #[error("{url}: {cause}")]
    Transport { url: String, cause: String },
    #[error("{url} is not an OpenID provider configuration: {cause}")]
    NotDiscovery { url: String, cause: String },
    #[error("the discovery document names issuer `{found}`, not `{expected}`")]
    IssuerMismatch { expected: String, found: String },
    #[error("{url}: {source}")]
    Keys { url: String, source: KeySetError },
    #[error("key file {path}: {cause}")]
    KeyFile { path: String, cause: String },
}

/// The IdP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the CA file is not a PEM bundle: {0}")]
    BadCaBundle(String),
    #[error("the CA file holds no certificate")]
    NoCertificate,
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

/// A JWKS answer: new keys (with the validator to send next time) or "unchanged since your copy".
pub enum JwksFetch {
    Keys { set: KeySet, etag: Option<String> },
    NotModified,
}

/// The HTTP client for everything idsync asks of an IdP: no redirects (a redirect is a way to make
/// idsync fetch somewhere else), bounded time, bounded size.
#[derive(Clone)]
pub struct IdpClient {
    client: reqwest::Client,
}

impl IdpClient {
    pub fn new(extra_ca_pem: Option<&[u8]>, timeout: Duration) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("idsync/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ClientError::BadCaBundle(e.to_string()))?;
            if certs.is_empty() {
                return Err(ClientError::NoCertificate);
            }
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(Self { client })
    }

    /// The underlying client, for other calls to the IdP (reconcile, webhooks' lookups).
    pub fn http(&self) -> &reqwest::Client {
        &self.client
    }

    /// GET `url` as JSON bytes; `etag` makes it conditional (`None` body means 304 Not Modified).
    async fn get(&self, url: &Url, etag: Option<&str>) -> Result<Fetched, FetchError> {
        let shown = url.to_string();
        let mut request = self
            .client
            .get(url.clone())
            .header(http::header::ACCEPT, "application/json");
        if let Some(tag) = etag {
            request = request.header(http::header::IF_NONE_MATCH, tag);
        }
        let mut response = request.send().await.map_err(|e| transport(&shown, &e))?;
        if response.status() == http::StatusCode::NOT_MODIFIED && etag.is_some() {
            return Ok(Fetched {
                body: None,
                etag: None,
            });
        }
        if !response.status().is_success() {
            return Err(FetchError::Status {
                url: shown,
                status: response.status().as_u16(),
            });
        }
        let etag = response
            .headers()
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| transport(&shown, &e))? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(FetchError::TooLarge { url: shown });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched {
            body: Some(body),
            etag,
        })
    }

    /// Discovery: the provider metadata (whose `issuer` must equal ours exactly) and its `jwks_uri`.
    pub async fn discover(&self, issuer: &str) -> Result<Url, FetchError> {
        let url = discovery_url(issuer)?;
        let body = self.get(&url, None).await?.body.unwrap_or_default();
        let metadata: CoreProviderMetadata =
            serde_json::from_slice(&body).map_err(|e| FetchError::NotDiscovery {
                url: url.to_string(),
                cause: e.to_string(),
            })?;
        let found = metadata.issuer().as_str();
        if found != issuer {
            return Err(FetchError::IssuerMismatch {
                expected: issuer.to_owned(),
                found: found.to_owned(),
            });
        }
        Ok(metadata.jwks_uri().url().clone())
    }

    /// The key set at `uri`; with `etag`, a conditional request that may answer [`JwksFetch::NotModified`].
    pub async fn jwks(&self, uri: &Url, etag: Option<&str>) -> Result<JwksFetch, FetchError> {
        let fetched = self.get(uri, etag).await?;
        let Some(body) = fetched.body else {
            return Ok(JwksFetch::NotModified);
        };
        let keys = |source| FetchError::Keys {
            url: uri.to_string(),
            source,
        };
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| keys(KeySetError::NotAJwks(e.to_string())))?;
        Ok(JwksFetch::Keys {
            set: KeySet::from_jwks(&doc).map_err(keys)?,
            etag: fetched.etag,
        })
    }
}

struct Fetched {
    body: Option<Vec<u8>>,
    etag: Option<String>,
}

/// `<issuer>/.well-known/openid-configuration` (OpenID Connect Discovery 1.0 section 4: appended to the
/// issuer's path, so a realm path is kept).
fn discovery_url(issuer: &str) -> Result<Url, FetchError> {
    let joined = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    Url::parse(&joined).map_err(|e| FetchError::NotDiscovery {
        url: joined,
        cause: e.to_string(),
    })
}

fn transport(url: &str, e: &reqwest::Error) -> FetchError {
    let url = url.to_owned();
    if e.is_timeout() {
        return FetchError::Timeout { url };
    }
    let cause = error_chain(e);
    let tls = std::iter::successors(Some(e as &dyn std::error::Error), |e| e.source())
        .any(|e| e.downcast_ref::<rustls::Error>().is_some());
    if tls {
        FetchError::Tls { url, cause }
    } else if e.is_connect() {
        FetchError::Connect { url, cause }
    } else {
        FetchError::Transport { url, cause }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_is_appended_to_the_issuer_path() {
        assert_eq!(
            discovery_url("https://sso.example.com/realms/acme")
                .unwrap()
                .as_str(),
            "https://sso.example.com/realms/acme/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://acme.frontegg.com/")
                .unwrap()
                .as_str(),
            "https://acme.frontegg.com/.well-known/openid-configuration"
        );
    }
}
