//! A local OIDC issuer: serves `/.well-known/openid-configuration` and a JWKS, mints tokens with
//! real keys, rotates keys, and can be switched down, slow or broken to exercise idsync's key cache.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair as _;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::StatusCode;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigningAlg {
    RS256,
    PS256,
    ES256,
    ES384,
    EdDSA,
}

impl SigningAlg {
    fn jwt(self) -> Algorithm {
        match self {
            Self::RS256 => Algorithm::RS256,
            Self::PS256 => Algorithm::PS256,
            Self::ES256 => Algorithm::ES256,
            Self::ES384 => Algorithm::ES384,
            Self::EdDSA => Algorithm::EdDSA,
        }
    }
}

/// How the issuer answers key requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssuerMode {
    Up,
    /// 503 on every endpoint.
    Down,
    /// 200 with a body that is not JSON.
    Garbage,
    /// A JWKS with no keys.
    EmptyKeys,
}

struct Key {
    kid: String,
    alg: SigningAlg,
    encoding: EncodingKey,
    public_jwk: Value,
    /// SubjectPublicKeyInfo PEM (RSA only), as Frontegg's portal hands out.
    public_pem: Option<String>,
}

struct Inner {
    issuer: String,
    keys: Mutex<Vec<Arc<Key>>>,
    mode: Mutex<IssuerMode>,
    delay_ms: AtomicU64,
    jwks_fetches: AtomicUsize,
    /// JWKS requests answered 304 because the client's `If-None-Match` matched.
    jwks_not_modified: AtomicUsize,
    discovery_fetches: AtomicUsize,
    next_kid: AtomicUsize,
}

/// A running local issuer; stops when dropped.
#[derive(Clone)]
pub struct LocalIssuer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    _server: Arc<ServerGuard>,
}

struct ServerGuard(tokio::task::JoinHandle<()>);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl LocalIssuer {
    /// Starts an issuer on a loopback port whose `iss` is `http://127.0.0.1:PORT{path}` (e.g. `/realms/acme`),
    /// with one key of `alg`.
    pub async fn start(path: &str, alg: SigningAlg) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            issuer: format!("http://{addr}{path}"),
            keys: Mutex::new(Vec::new()),
            mode: Mutex::new(IssuerMode::Up),
            delay_ms: AtomicU64::new(0),
            jwks_fetches: AtomicUsize::new(0),
            jwks_not_modified: AtomicUsize::new(0),
            discovery_fetches: AtomicUsize::new(0),
            next_kid: AtomicUsize::new(1),
        });
        let router = Router::new()
            .route(
                &format!("{path}/.well-known/openid-configuration"),
                get(discovery),
            )
            .route(&format!("{path}/protocol/openid-connect/certs"), get(jwks))
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let issuer = Self {
            inner,
            addr,
            _server: Arc::new(ServerGuard(server)),
        };
        issuer.add_key(alg);
        Ok(issuer)
    }

    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/protocol/openid-connect/certs", self.inner.issuer)
    }

    /// Generates a key and publishes it; new tokens are signed with the newest key. Returns its `kid`.
    pub fn add_key(&self, alg: SigningAlg) -> String {
        let kid = format!(
            "key-{}",
            self.inner.next_kid.fetch_add(1, Ordering::Relaxed)
        );
        let key = Arc::new(generate(&kid, alg));
        self.inner.keys.lock().expect("keys lock").push(key);
        kid
    }

    /// Stops publishing a key (the end of a rotation overlap).
    pub fn remove_key(&self, kid: &str) {
        self.inner
            .keys
            .lock()
            .expect("keys lock")
            .retain(|k| k.kid != kid);
    }

    pub fn set_mode(&self, mode: IssuerMode) {
        *self.inner.mode.lock().expect("mode lock") = mode;
    }

    /// Delays every answer (a slow IdP).
    pub fn set_delay(&self, delay: Duration) {
        self.inner
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn jwks_fetches(&self) -> usize {
        self.inner.jwks_fetches.load(Ordering::Relaxed)
    }

    pub fn jwks_not_modified(&self) -> usize {
        self.inner.jwks_not_modified.load(Ordering::Relaxed)
    }

    pub fn discovery_fetches(&self) -> usize {
        self.inner.discovery_fetches.load(Ordering::Relaxed)
    }

    /// The published JWKS document.
    pub fn jwks_document(&self) -> Value {
        let keys = self.inner.keys.lock().expect("keys lock");
        json!({ "keys": keys.iter().map(|k| k.public_jwk.clone()).collect::<Vec<_>>() })
    }

    /// The newest RSA key's public key as PEM, if there is one.
    pub fn public_pem(&self) -> Option<String> {
        let keys = self.inner.keys.lock().expect("keys lock");
        keys.iter().rev().find_map(|k| k.public_pem.clone())
    }

    fn newest(&self) -> Arc<Key> {
        self.inner
            .keys
            .lock()
            .expect("keys lock")
            .last()
            .cloned()
            .expect("issuer has a key")
    }

    fn key(&self, kid: &str) -> Arc<Key> {
        self.inner
            .keys
            .lock()
            .expect("keys lock")
            .iter()
            .find(|k| k.kid == kid)
            .cloned()
            .unwrap_or_else(|| panic!("no key {kid}"))
    }

    /// Mints a token over `claims` with the newest key. `iss` is filled in when absent.
    pub fn mint(&self, claims: Value) -> String {
        let key = self.newest();
        let header = json!({"alg": format!("{:?}", key.alg.jwt()), "kid": key.kid, "typ": "JWT"});
        self.sign_with(&key, &header, &self.with_iss(claims))
    }

    /// Mints with a given key.
    pub fn mint_with_kid(&self, kid: &str, claims: Value) -> String {
        let key = self.key(kid);
        let header = json!({"alg": format!("{:?}", key.alg.jwt()), "kid": key.kid, "typ": "JWT"});
        self.sign_with(&key, &header, &self.with_iss(claims))
    }

    /// Signs an arbitrary header and payload with the newest key (the header's `alg` is not consulted),
    /// for hostile-token tests.
    pub fn sign_raw(&self, header: &Value, claims: &Value) -> String {
        self.sign_with(&self.newest(), header, claims)
    }

    /// Signs an arbitrary header and payload, exactly as given, with the key `kid` (the header's `alg` is
    /// not consulted), for hostile-token tests that need a valid signature over a hostile header or payload.
    pub fn sign_raw_with(&self, kid: &str, header: &Value, claims: &Value) -> String {
        self.sign_with(&self.key(kid), header, claims)
    }

    /// A typical set of claims for a user in tenant `acme`, valid for five minutes from now.
    pub fn claims_for(&self, sub: &str) -> Value {
        let now = crate::unix_now();
        json!({"iss": self.issuer(), "sub": sub, "iat": now, "exp": now + 300, "typ": "Bearer", "azp": "web-app", "tenant_id": "acme"})
    }

    fn with_iss(&self, mut claims: Value) -> Value {
        if let Some(obj) = claims.as_object_mut() {
            obj.entry("iss").or_insert_with(|| json!(self.issuer()));
        }
        claims
    }

    /// Signs header and payload text byte for byte (e.g. JSON with duplicate keys, which `Value` cannot hold).
    pub fn sign_text_with(&self, kid: &str, header: &str, payload: &str) -> String {
        sign_text(&self.key(kid), header, payload)
    }

    fn sign_with(&self, key: &Key, header: &Value, claims: &Value) -> String {
        sign_text(key, &header.to_string(), &claims.to_string())
    }
}

/// Compact JWS over the given header and payload text.
fn sign_text(key: &Key, header: &str, payload: &str) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key.encoding, key.alg.jwt())
        .expect("signing with a generated key works");
    format!("{message}.{signature}")
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

fn generate(kid: &str, alg: SigningAlg) -> Key {
    use aws_lc_rs::signature as sig;
    let (encoding, public_pem, okp_x) = match alg {
        SigningAlg::RS256 | SigningAlg::PS256 => {
            let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .expect("RSA keygen");
            let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp).expect("RSA PKCS#8");
            let spki = AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(kp.public_key())
                .expect("RSA SPKI");
            (
                EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes())
                    .expect("RSA PEM"),
                Some(pem("PUBLIC KEY", spki.as_ref())),
                None,
            )
        }
        SigningAlg::ES256 | SigningAlg::ES384 => {
            let curve = if alg == SigningAlg::ES256 {
                &sig::ECDSA_P256_SHA256_FIXED_SIGNING
            } else {
                &sig::ECDSA_P384_SHA384_FIXED_SIGNING
            };
            let kp = sig::EcdsaKeyPair::generate(curve).expect("EC keygen");
            let pkcs8 = kp.to_pkcs8v1().expect("EC PKCS#8");
            (EncodingKey::from_ec_der(pkcs8.as_ref()), None, None)
        }
        SigningAlg::EdDSA => {
            let kp = sig::Ed25519KeyPair::generate().expect("Ed25519 keygen");
            let pkcs8 = kp.to_pkcs8v1().expect("Ed25519 PKCS#8");
            let x = URL_SAFE_NO_PAD.encode(kp.public_key().as_ref());
            (EncodingKey::from_ed_der(pkcs8.as_ref()), None, Some(x))
        }
    };
    // jsonwebtoken cannot derive an Ed25519 public JWK from PKCS#8, so OKP keys are written out directly.
    let mut public_jwk = match okp_x {
        Some(x) => json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "x": x}),
        None => {
            let jwk =
                Jwk::from_encoding_key(&encoding, alg.jwt()).expect("public JWK from private key");
            serde_json::to_value(&jwk).expect("JWK serialises")
        }
    };
    public_jwk["kid"] = json!(kid);
    public_jwk["use"] = json!("sig");
    Key {
        kid: kid.to_owned(),
        alg,
        encoding,
        public_jwk,
        public_pem,
    }
}

async fn gate(inner: &Inner) -> Option<Response> {
    let delay = inner.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    match *inner.mode.lock().expect("mode lock") {
        IssuerMode::Down => Some((StatusCode::SERVICE_UNAVAILABLE, "issuer down").into_response()),
        IssuerMode::Garbage => Some(
            (
                [(http::header::CONTENT_TYPE, "application/json")],
                "<html>oops",
            )
                .into_response(),
        ),
        IssuerMode::Up | IssuerMode::EmptyKeys => None,
    }
}

async fn discovery(State(inner): State<Arc<Inner>>) -> Response {
    inner.discovery_fetches.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = gate(&inner).await {
        return r;
    }
    let iss = &inner.issuer;
    Json(json!({
        "issuer": iss,
        "authorization_endpoint": format!("{iss}/protocol/openid-connect/auth"),
        "token_endpoint": format!("{iss}/protocol/openid-connect/token"),
        "jwks_uri": format!("{iss}/protocol/openid-connect/certs"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "PS256", "ES256", "ES384", "EdDSA"],
    }))
    .into_response()
}

/// The JWKS, with an `ETag` (a digest of the document) and `If-None-Match` answered 304, as Keycloak and
/// CDNs in front of IdPs do.
async fn jwks(State(inner): State<Arc<Inner>>, headers: http::HeaderMap) -> Response {
    inner.jwks_fetches.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = gate(&inner).await {
        return r;
    }
    let doc = if *inner.mode.lock().expect("mode lock") == IssuerMode::EmptyKeys {
        json!({"keys": []})
    } else {
        let keys = inner.keys.lock().expect("keys lock");
        json!({ "keys": keys.iter().map(|k| k.public_jwk.clone()).collect::<Vec<_>>() })
    };
    let body = doc.to_string();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body.as_bytes());
    let etag = format!("\"{}\"", URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12]));
    if headers
        .get(http::header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        inner.jwks_not_modified.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::NOT_MODIFIED, [(http::header::ETAG, etag)]).into_response();
    }
    (
        [
            (http::header::CONTENT_TYPE, "application/json".to_owned()),
            (http::header::ETAG, etag),
        ],
        body,
    )
        .into_response()
}
