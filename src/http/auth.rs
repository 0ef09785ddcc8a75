//! The authentication pipeline shared by the proxy and the forward-auth endpoint: take the tenant the
//! client asks for aside, strip owned headers, find the bearer token, verify it (or hit the token cache),
//! map it to an identity and resolve the active tenant. Only the last step differs between callers.

use super::error::ApiError;
use super::headers::{self, Forwarded, HeaderNames};
use crate::identity::{Identity, IdentityError, MappingRules, map_claims};
use crate::oidc::{Verifier, VerifyError};
use crate::provision::Provisioned;
use http::{HeaderMap, header};
use moka::Expiry;
use moka::future::Cache;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A verified token mapped to its identity; what the token cache holds.
#[derive(Debug)]
pub struct Authenticated {
    pub identity: Identity,
    pub issuer: usize,
    pub kid: Option<Arc<str>>,
    pub expires_at: i64,
}

type TokenKey = [u8; 32];

struct UntilExp;

impl Expiry<TokenKey, Arc<Authenticated>> for UntilExp {
    fn expire_after_create(
        &self,
        _: &TokenKey,
        value: &Arc<Authenticated>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        let remaining = value.expires_at.saturating_sub(unix_now()).max(0);
        Some(Duration::from_secs(remaining as u64))
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub struct Authenticator {
    verifier: Verifier,
    /// Mapping rules per issuer, same order as the verifier's issuers.
    rules: Vec<MappingRules>,
    /// Issuer names, same order; every identity of an issuer shares its one copy.
    issuer_names: Vec<Arc<str>>,
    /// `None` when `--token-cache-size 0`: every request pays the signature check.
    cache: Option<Cache<TokenKey, Arc<Authenticated>>>,
}

impl Authenticator {
    pub fn new(verifier: Verifier, rules: Vec<MappingRules>, cache_size: u64) -> Self {
        let cache = (cache_size > 0).then(|| {
            Cache::builder()
                .max_capacity(cache_size)
                .expire_after(UntilExp)
                .support_invalidation_closures()
                .build()
        });
        let issuer_names = verifier
            .issuers()
            .iter()
            .map(|i| Arc::from(i.issuer.as_str()))
            .collect();
        Self {
            verifier,
            rules,
            issuer_names,
            cache,
        }
    }

    /// Drops every cached token of `subject`, so its next request is verified and synced afresh.
    pub fn invalidate_subject(&self, subject: &str) {
        if let Some(cache) = &self.cache {
            let subject = subject.to_owned();
            cache
                .invalidate_entries_if(move |_, v| {
                    v.identity
                        .subject
                        .as_ref()
                        .is_some_and(|s| s.as_str() == subject)
                })
                .expect("the token cache is built with invalidation closures");
        }
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    pub async fn authenticate(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Arc<Authenticated>, ApiError> {
        let key = self.cache.as_ref().map(|_| token_key(token));
        if let (Some(cache), Some(key)) = (&self.cache, &key)
            && let Some(hit) = cache.get(key).await
        {
            // The cache may hold an entry a little past `exp`; time and key trust are re-checked for free.
            if hit.expires_at > now - self.verifier.options().leeway_secs
                && self
                    .verifier
                    .still_trusted(hit.issuer, hit.kid.as_deref())
                    .is_ok()
            {
                metrics::counter!("idsync_token_cache_total", "outcome" => "hit").increment(1);
                return Ok(hit);
            }
            cache.invalidate(key).await;
        }
        metrics::counter!("idsync_token_cache_total", "outcome" => "miss").increment(1);
        // Boxed for the same reason as sync's database path: a cache hit's future stays small.
        Box::pin(self.verify_and_map(token, now, key)).await
    }

    async fn verify_and_map(
        &self,
        token: &str,
        now: i64,
        key: Option<TokenKey>,
    ) -> Result<Arc<Authenticated>, ApiError> {
        let started = std::time::Instant::now();
        let verified = self.verifier.verify(token, now).await;
        metrics::histogram!("idsync_verify_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("idsync_token_verifications_total", "outcome" => if verified.is_ok() { "valid" } else { "invalid" })
            .increment(1);
        let verified = verified.map_err(verify_error)?;
        let identity = map_claims(
            self.issuer_names[verified.issuer].clone(),
            &verified.claims,
            &self.rules[verified.issuer],
        )
        .map_err(identity_error)?;
        let authenticated = Arc::new(Authenticated {
            identity,
            issuer: verified.issuer,
            kid: verified.kid,
            expires_at: verified.expires_at,
        });
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            cache.insert(key, authenticated.clone()).await;
        }
        Ok(authenticated)
    }
}

fn token_key(token: &str) -> TokenKey {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

fn verify_error(e: VerifyError) -> ApiError {
    match e {
        VerifyError::KeysUnavailable(reason) => ApiError::Unavailable(reason),
        other => ApiError::InvalidToken(other.to_string()),
    }
}

fn identity_error(e: IdentityError) -> ApiError {
    ApiError::InvalidToken(e.to_string())
}

/// What the client sent that idsync treats as a request, never as a fact.
#[derive(Debug, Default)]
pub struct ClientAsks {
    pub tenant: Option<String>,
}

/// Takes the client's tenant request aside, then strips every owned header. Must run before anything else.
pub fn take_and_strip(
    headers: &mut HeaderMap,
    names: &HeaderNames,
) -> Result<ClientAsks, ApiError> {
    let mut values = headers.get_all(&names.tenant_id).iter();
    let tenant = match (values.next(), values.next()) {
        (None, _) => None,
        (Some(v), None) => Some(
            v.to_str()
                .map_err(|_| ApiError::InvalidRequest("tenant header is not ASCII text".into()))?
                .trim()
                .to_owned(),
        ),
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidRequest(
                "several tenant headers were sent".into(),
            ));
        }
    };
    headers::strip(headers, names);
    Ok(ClientAsks {
        tenant: tenant.filter(|t| !t.is_empty()),
    })
}

/// The bearer token from the one `Authorization` header (RFC 6750 section 2.1; the scheme is
/// case-insensitive per RFC 9110 section 11.1). Tokens in the query string are never read.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return Err(ApiError::InvalidToken("missing bearer token".into())),
        (Some(v), None) => v,
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidRequest(
                "several Authorization headers were sent".into(),
            ));
        }
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::InvalidToken("Authorization header is not ASCII".into()))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::InvalidToken("Authorization is not a bearer token".into()))?;
    if !scheme.eq_ignore_ascii_case("Bearer") {
        return Err(ApiError::InvalidToken(
            "Authorization is not a bearer token".into(),
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(ApiError::InvalidToken("missing bearer token".into()));
    }
    Ok(token)
}

/// The active tenant: the token's own, or the one the client asked for if the token allows it.
pub fn resolve_tenant(identity: &Identity, asks: &ClientAsks) -> Result<Option<String>, ApiError> {
    match &asks.tenant {
        None => Ok(identity.tenant.as_ref().map(|t| t.to_string())),
        Some(wanted) if identity.allows_tenant(wanted) => Ok(Some(wanted.clone())),
        Some(_) => Err(ApiError::Forbidden(
            "tenant_not_permitted",
            "the requested tenant is not one the token allows".into(),
        )),
    }
}

/// What the upstream is told once the identity is synced: ids, slug and role from the rows.
pub fn forwarded_from_sync(identity: &Identity, synced: &Provisioned) -> Forwarded {
    Forwarded {
        user_id: synced.user_id.clone(),
        email: synced.email.clone(),
        name: synced.name.clone(),
        roles: identity.roles.clone(),
        role: synced.role.clone(),
        tenant_id: synced.tenant_id.clone(),
        tenant_ids: identity.tenants.iter().map(|t| t.to_string()).collect(),
        tenant_slug: synced.tenant_slug.clone(),
        tenant_schema: synced.tenant_schema.clone(),
        synced: None,
    }
}

/// What the upstream is told from the identity alone (when sync is skipped under `--on-db-error pass`).
pub fn forwarded_from_identity(identity: &Identity, tenant: Option<String>) -> Forwarded {
    Forwarded {
        user_id: identity.subject.as_ref().map(|s| s.to_string()),
        email: identity.email.clone(),
        name: identity.name.clone(),
        roles: identity.roles.clone(),
        role: None,
        tenant_id: tenant,
        tenant_ids: identity.tenants.iter().map(|t| t.to_string()).collect(),
        tenant_slug: None,
        tenant_schema: None,
        synced: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_auth(values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token(&with_auth(&["bearer abc"])).unwrap(), "abc");
        assert_eq!(bearer_token(&with_auth(&["BEARER abc"])).unwrap(), "abc");
    }

    #[test]
    fn missing_basic_or_duplicated_authorization_is_refused() {
        assert!(matches!(
            bearer_token(&with_auth(&[])),
            Err(ApiError::InvalidToken(_))
        ));
        assert!(matches!(
            bearer_token(&with_auth(&["Basic dXNlcjpwYXNz"])),
            Err(ApiError::InvalidToken(_))
        ));
        assert!(matches!(
            bearer_token(&with_auth(&["Bearer "])),
            Err(ApiError::InvalidToken(_))
        ));
        assert!(matches!(
            bearer_token(&with_auth(&["Bearer a", "Bearer b"])),
            Err(ApiError::InvalidRequest(_))
        ));
    }

    #[test]
    fn client_tenant_is_taken_aside_before_the_strip() {
        let names = HeaderNames::new("X-").unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-tenant-id", HeaderValue::from_static(" t-2 "));
        let asks = take_and_strip(&mut h, &names).unwrap();
        assert_eq!(asks.tenant.as_deref(), Some("t-2"));
        assert!(h.get("x-tenant-id").is_none());
    }
}
