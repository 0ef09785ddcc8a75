//! Where an issuer's keys come from: OIDC discovery (openidconnect over our own reqwest client),
//! a fixed JWKS URL, or a local JWKS/PEM file.

use super::keys::KeySet;
use openidconnect::core::{CoreJsonWebKeySet, CoreProviderMetadata};
use openidconnect::{HttpRequest, HttpResponse, IssuerUrl, JsonWebKeySetUrl};
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// Largest discovery or JWKS document idsync reads; real ones are a few KiB.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `<issuer>/.well-known/openid-configuration`, then its `jwks_uri`.
    Discovery,
    /// A JWKS URL given by the operator; discovery is skipped.
    JwksUri(Url),
    /// A local JWKS or PEM file, re-read when it changes.
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(String);

/// The HTTP client for everything idsync asks of an IdP: no redirects (a redirect is a way to make
/// idsync fetch somewhere else), bounded time, bounded size.
#[derive(Clone)]
pub struct IdpClient {
    client: reqwest::Client,
}

impl IdpClient {
    pub fn new(extra_ca_pem: Option<&[u8]>, timeout: Duration) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("idsync/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("--issuer-ca-file is not a PEM bundle: {e}"))?;
            if certs.is_empty() {
                return Err("--issuer-ca-file holds no certificate".into());
            }
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the IdP HTTP client: {e}"))?;
        Ok(Self { client })
    }

    /// openidconnect's `AsyncHttpClient` is any `Fn(HttpRequest) -> Future`; the future owns a client
    /// handle (not a borrow) so it stays `Send` for `tokio::spawn`.
    fn adapter(
        &self,
    ) -> impl Fn(
        HttpRequest,
    )
        -> std::pin::Pin<Box<dyn Future<Output = Result<HttpResponse, FetchError>> + Send>> {
        let this = self.clone();
        move |request| {
            let this = this.clone();
            Box::pin(async move { this.call(request).await })
        }
    }

    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, FetchError> {
        let (parts, body) = request.into_parts();
        let mut response = self
            .client
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(|e| FetchError(describe(&e)))?;
        let mut out = http::Response::builder().status(response.status());
        for (name, value) in response.headers() {
            out = out.header(name, value);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError(describe(&e)))?
        {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(FetchError(format!(
                    "document is larger than {MAX_DOCUMENT_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        out.body(body).map_err(|e| FetchError(e.to_string()))
    }

    /// Discovery: the provider metadata (whose `issuer` must equal ours exactly) and the keys it points at.
    pub async fn discover(&self, issuer: &str) -> Result<(Url, KeySet), String> {
        let issuer_url =
            IssuerUrl::new(issuer.to_owned()).map_err(|e| format!("issuer URL: {e}"))?;
        let http = self.adapter();
        let metadata = CoreProviderMetadata::discover_async(issuer_url, &http)
            .await
            .map_err(|e| format!("discovery failed: {}", error_chain(&e)))?;
        let jwks_uri = metadata.jwks_uri().url().clone();
        let doc = serde_json::to_value(metadata.jwks()).map_err(|e| e.to_string())?;
        Ok((jwks_uri, KeySet::from_jwks(&doc)?))
    }

    pub async fn jwks(&self, uri: &Url) -> Result<KeySet, String> {
        let http = self.adapter();
        let set = CoreJsonWebKeySet::fetch_async(&JsonWebKeySetUrl::from_url(uri.clone()), &http)
            .await
            .map_err(|e| format!("JWKS fetch from {uri} failed: {}", error_chain(&e)))?;
        let doc = serde_json::to_value(&set).map_err(|e| e.to_string())?;
        KeySet::from_jwks(&doc)
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        format!("cannot connect: {}", error_chain(e))
    } else {
        error_chain(e)
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
