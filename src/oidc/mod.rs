//! Provider-agnostic token verification: parse a compact JWS and read its `iss`, then, against the keys of
//! the issuer the caller chose for that `iss`, check the signature and `exp`/`nbf`/`iat`/`aud`. Knows no
//! IdP dialect and no issuer list (the access layer's registry routes).
//!
//! Signatures are checked with jsonwebtoken on aws-lc-rs (about 40 us per RS256 verify here, against
//! about 300 us for openidconnect's RustCrypto path); openidconnect parses the discovery document.
//! See docs/architecture.md.

mod key_cache;
mod keys;
mod source;
mod token;

pub use key_cache::{IssuerKeys, KeyCacheOptions, KeysUnavailable, Trigger};
pub use keys::{KeyFingerprint, KeySet, KeySetError};
pub use source::{ClientError, FetchError, IdpClient, KeySource};

use serde::Deserialize;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// What idsync trusts about one issuer: its exact `iss`, accepted audiences and its keys.
pub struct IssuerTrust {
    /// The exact `iss` value tokens carry (a trailing slash matters).
    pub issuer: Arc<str>,
    /// Accepted `aud` values; empty means `aud` is not checked.
    pub audiences: Vec<String>,
    /// Accepted `azp` values (the client the token was issued to); empty means `azp` is not checked.
    pub authorized_parties: Vec<String>,
    /// When set, the JOSE header `typ` must be this (RFC 9068 access tokens say `at+jwt`), so an ID token
    /// cannot pass as an access token.
    pub require_typ: Option<String>,
    pub keys: Arc<IssuerKeys>,
}

#[derive(Clone, Copy, Debug)]
pub struct VerifyOptions {
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: i64,
    pub max_token_bytes: usize,
}

/// Seconds since the Unix epoch: the clock every token check uses.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A token split and its header judged, with the one claim read before any signature check: `iss`,
/// which picks the keys. Deriving `Deserialize` refuses a duplicated `iss`, so the routed and the
/// verified issuer cannot differ.
pub struct ParsedToken<'a> {
    parts: token::Parts<'a>,
    issuer: String,
}

impl<'a> ParsedToken<'a> {
    pub fn parse(token: &'a str, max_bytes: usize) -> Result<Self, VerifyError> {
        #[derive(Deserialize)]
        struct Routing<'a> {
            #[serde(borrow)]
            iss: Option<Cow<'a, str>>,
        }
        let parts = token::split(token, max_bytes)?;
        let routing: Routing<'_> = serde_json::from_slice(&parts.payload)
            .map_err(|e| VerifyError::Malformed(format!("payload is not a JSON object: {e}")))?;
        let issuer = routing
            .iss
            .ok_or_else(|| VerifyError::Malformed("token has no `iss` claim".into()))?
            .into_owned();
        Ok(Self { parts, issuer })
    }

    /// The unverified `iss`: only good for choosing which configured issuer's keys to try.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
}

/// A token whose signature and time/audience claims checked out.
#[derive(Debug)]
pub struct VerifiedToken {
    /// The key that verified it; a cached verification lives only as long as this key is published.
    pub key: KeyFingerprint,
    pub expires_at: i64,
    pub claims: Map<String, Value>,
}

/// Why a token is refused. All are 401 except [`VerifyError::KeysUnavailable`] (503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("{0}")]
    Algorithm(String),
    #[error("token issuer is not trusted")]
    UnknownIssuer,
    #[error("token is signed with a key the issuer does not publish")]
    UnknownKey,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token was issued in the future")]
    IssuedInFuture,
    #[error("token audience is not accepted")]
    Audience,
    #[error("token was issued to a client that is not accepted (`azp`)")]
    AuthorizedParty,
    #[error("token header `typ` is not `{0}`")]
    TokenType(String),
    #[error("claim `{0}` {1}")]
    InvalidClaim(&'static str, String),
    #[error("cannot verify tokens: {0}")]
    KeysUnavailable(KeysUnavailable),
}

/// What a token is being verified for. Explicit typing (RFC 8725 section 3.11) keeps one kind from
/// passing as another: a logout token (`typ: logout+jwt`) is never an access token.
#[derive(Clone, Copy, Debug)]
pub enum Purpose<'a> {
    Access,
    /// OIDC Back-Channel Logout 1.0: `aud` must be one of these client ids.
    Logout {
        audiences: &'a [String],
    },
}

/// Verifies `token` against `trust` (the configured issuer its `iss` named) as of `now`. May fetch keys
/// from that issuer, never from anywhere the token names.
pub async fn verify(
    trust: &IssuerTrust,
    token: &ParsedToken<'_>,
    now: i64,
    opts: &VerifyOptions,
    purpose: Purpose<'_>,
) -> Result<VerifiedToken, VerifyError> {
    let parts = &token.parts;
    let kid = parts.header.kid.as_deref();
    let typ = parts.header.typ.as_deref();
    let is = |want: &str| typ.is_some_and(|t| t.eq_ignore_ascii_case(want));
    match purpose {
        Purpose::Access if is("logout+jwt") => {
            return Err(VerifyError::TokenType("JWT` or `at+jwt".into()));
        }
        Purpose::Access => {
            if let Some(want) = &trust.require_typ
                && !is(want)
            {
                return Err(VerifyError::TokenType(want.clone()));
            }
        }
        Purpose::Logout { .. } if typ.is_some() && !is("logout+jwt") => {
            return Err(VerifyError::TokenType("logout+jwt".into()));
        }
        Purpose::Logout { .. } => {}
    }

    let mut generation = trust.keys.generation();
    let mut keys = match trust.keys.usable() {
        Ok(keys) => keys,
        Err(_) => {
            // No usable keys: one cooldown-limited attempt, so a recovered IdP heals on the next request.
            trust.keys.refetch(generation, Trigger::UnknownKid).await;
            generation = trust.keys.generation();
            trust.keys.usable().map_err(VerifyError::KeysUnavailable)?
        }
    };
    if !keys.has_kid(kid) && trust.keys.refetch(generation, Trigger::UnknownKid).await {
        keys = trust.keys.usable().map_err(VerifyError::KeysUnavailable)?;
    }
    let key = check_signature(&keys, parts)?;
    let claims = parse_claims(&parts.payload)?;
    let expires_at = check_claims(trust, &claims, now, opts, purpose)?;
    Ok(VerifiedToken {
        key,
        expires_at,
        claims,
    })
}

/// The key of `keys` whose signature over `parts` holds, under the algorithm policy.
fn check_signature(keys: &KeySet, parts: &token::Parts<'_>) -> Result<KeyFingerprint, VerifyError> {
    let (alg, kid) = (parts.header.alg, parts.header.kid.as_deref());
    let mut tried = false;
    for key in keys.candidates(kid, alg) {
        tried = true;
        if key.verify(alg, parts.signing_input.as_bytes(), parts.signature) {
            return Ok(key.fingerprint);
        }
    }
    Err(if tried {
        VerifyError::BadSignature
    } else if keys.has_kid(kid) {
        VerifyError::Algorithm(format!("algorithm {alg:?} is not allowed for this key"))
    } else {
        VerifyError::UnknownKey
    })
}

/// The signature layer alone: whether `jws` (compact) is signed by a key of `keys` under idsync's
/// header and algorithm policy. No claim is read; for test vectors whose payloads are not claim sets.
pub fn verify_signature(keys: &KeySet, jws: &str) -> Result<KeyFingerprint, VerifyError> {
    let parts = token::split(jws, usize::MAX)?;
    check_signature(keys, &parts)
}

/// A JWT signed with a shared secret (HS256/384/512), as Frontegg signs its webhook header. Only for
/// secrets idsync was given for that purpose: never a path for access tokens, which must be signed
/// with the issuer's public keys. `exp` is enforced when present, and `iat`, when present, must be
/// within `max_age` (the replay window). Returns the claims.
pub fn verify_hmac_jwt(
    secret: &[u8],
    token: &str,
    now: i64,
    leeway_secs: i64,
    max_age_secs: i64,
) -> Result<Map<String, Value>, VerifyError> {
    use aws_lc_rs::hmac;
    use base64::Engine as _;
    let b64 = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| VerifyError::Malformed("not base64url".into()))
    };
    let mut parts = token.trim().split('.');
    let (Some(h), Some(p), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::Malformed("not a compact JWS".into()));
    };
    let header: Value = serde_json::from_slice(&b64(h)?)
        .map_err(|_| VerifyError::Malformed("header is not JSON".into()))?;
    let algorithm = match header.get("alg").and_then(Value::as_str) {
        Some("HS256") => hmac::HMAC_SHA256,
        Some("HS384") => hmac::HMAC_SHA384,
        Some("HS512") => hmac::HMAC_SHA512,
        _ => {
            return Err(VerifyError::Algorithm(
                "a shared-secret JWT must be HS256/384/512".into(),
            ));
        }
    };
    let key = hmac::Key::new(algorithm, secret);
    let signing_input = &token.trim()[..h.len() + 1 + p.len()];
    hmac::verify(&key, signing_input.as_bytes(), &b64(sig)?)
        .map_err(|_| VerifyError::BadSignature)?;
    let claims = parse_claims(&b64(p)?)?;
    if let Some(exp) = numeric_date(&claims, "exp")?
        && exp <= now.saturating_sub(leeway_secs)
    {
        return Err(VerifyError::Expired);
    }
    if let Some(iat) = numeric_date(&claims, "iat")? {
        if iat > now.saturating_add(leeway_secs) {
            return Err(VerifyError::IssuedInFuture);
        }
        if iat < now.saturating_sub(max_age_secs + leeway_secs) {
            return Err(VerifyError::Expired);
        }
    }
    Ok(claims)
}

/// For a cached verification: the issuer still has usable keys and still publishes the very key that
/// verified the token.
pub fn still_trusted(trust: &IssuerTrust, key: KeyFingerprint) -> Result<(), VerifyError> {
    let keys = trust.keys.usable().map_err(VerifyError::KeysUnavailable)?;
    if keys.has_fingerprint(key) {
        Ok(())
    } else {
        Err(VerifyError::UnknownKey)
    }
}

fn check_claims(
    trust: &IssuerTrust,
    claims: &Map<String, Value>,
    now: i64,
    opts: &VerifyOptions,
    purpose: Purpose<'_>,
) -> Result<i64, VerifyError> {
    let leeway = opts.leeway_secs;
    let exp = numeric_date(claims, "exp")?
        .ok_or(VerifyError::InvalidClaim("exp", "is missing".into()))?;
    if exp <= now.saturating_sub(leeway) {
        return Err(VerifyError::Expired);
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && nbf > now.saturating_add(leeway)
    {
        return Err(VerifyError::NotYetValid);
    }
    if let Some(iat) = numeric_date(claims, "iat")?
        && iat > now.saturating_add(leeway)
    {
        return Err(VerifyError::IssuedInFuture);
    }
    let audiences = match purpose {
        Purpose::Access => trust.audiences.as_slice(),
        Purpose::Logout { audiences } => audiences,
    };
    if !audiences.is_empty() || matches!(purpose, Purpose::Logout { .. }) {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => audiences.iter().any(|x| x == a),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .any(|a| audiences.iter().any(|x| x == a)),
            _ => false,
        };
        if !ok {
            return Err(VerifyError::Audience);
        }
    }
    if matches!(purpose, Purpose::Access) && !trust.authorized_parties.is_empty() {
        let azp = claims.get("azp").and_then(Value::as_str);
        if !azp.is_some_and(|a| trust.authorized_parties.iter().any(|x| x == a)) {
            return Err(VerifyError::AuthorizedParty);
        }
    }
    Ok(exp)
}

/// Latest representable NumericDate idsync accepts (9999-12-31); beyond it a value is garbage, not a date.
const MAX_NUMERIC_DATE: f64 = 253_402_300_799.0;

/// RFC 7519 section 2: a JSON number of seconds, possibly fractional. Strings are refused.
fn numeric_date(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<i64>, VerifyError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            let v = n
                .as_f64()
                .filter(|v| v.is_finite() && v.abs() <= MAX_NUMERIC_DATE)
                .ok_or_else(|| VerifyError::InvalidClaim(name, "is out of range".into()))?;
            Ok(Some(v.floor() as i64))
        }
        Some(_) => Err(VerifyError::InvalidClaim(name, "is not a number".into())),
    }
}

/// Decodes a token's header and payload without verifying anything, for explaining a token to a human
/// (`idsync token inspect`). The signature is never returned.
pub fn decode_unverified(token: &str) -> Result<(Value, Map<String, Value>), String> {
    use base64::Engine as _;
    let mut parts = token.trim().split('.');
    let (Some(h), Some(p)) = (parts.next(), parts.next()) else {
        return Err("not a JWT: expected header.payload.signature".into());
    };
    let b64 = |s: &str, what: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| format!("the {what} is not base64url"))
    };
    let header: Value = serde_json::from_slice(&b64(h, "header")?)
        .map_err(|e| format!("the header is not JSON: {e}"))?;
    let payload = parse_claims(&b64(p, "payload")?).map_err(|e| e.to_string())?;
    Ok((header, payload))
}

/// A NumericDate claim, for callers that read more than `exp`.
pub fn numeric_claim(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<i64>, VerifyError> {
    numeric_date(claims, name)
}

impl VerifyError {
    /// Whether the signature was checked and held (so only a claim check failed).
    pub fn signature_was_valid(&self) -> bool {
        matches!(
            self,
            Self::Expired
                | Self::NotYetValid
                | Self::IssuedInFuture
                | Self::Audience
                | Self::AuthorizedParty
                | Self::InvalidClaim(..)
        )
    }
}

/// Parses the payload into a claims map, refusing duplicated names (RFC 7519 section 4 allows
/// refusing them, and two parsers reading different values is how confusion attacks start).
fn parse_claims(payload: &[u8]) -> Result<Map<String, Value>, VerifyError> {
    struct Unique(Map<String, Value>);
    impl<'de> Deserialize<'de> for Unique {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Unique;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut access: A,
                ) -> Result<Unique, A::Error> {
                    let mut map = Map::new();
                    while let Some((k, v)) = access.next_entry::<String, Value>()? {
                        if map.contains_key(&k) {
                            return Err(serde::de::Error::custom(format_args!(
                                "duplicate claim `{k}`"
                            )));
                        }
                        map.insert(k, v);
                    }
                    Ok(Unique(map))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Unique>(payload)
        .map(|u| u.0)
        .map_err(|e| VerifyError::Malformed(format!("payload: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_claims_are_refused() {
        assert!(parse_claims(br#"{"sub":"a","sub":"b"}"#).is_err());
        assert_eq!(parse_claims(br#"{"sub":"a"}"#).unwrap()["sub"], "a");
    }

    #[test]
    fn numeric_dates_accept_numbers_only() {
        let m = parse_claims(br#"{"a":1.9,"b":"1","c":1e300,"d":-5}"#).unwrap();
        assert_eq!(numeric_date(&m, "a"), Ok(Some(1)));
        assert!(numeric_date(&m, "b").is_err());
        assert!(numeric_date(&m, "c").is_err());
        assert_eq!(numeric_date(&m, "d"), Ok(Some(-5)));
        assert_eq!(numeric_date(&m, "missing"), Ok(None));
    }
}
