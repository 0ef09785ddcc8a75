//! Verified tokens, remembered until their `exp` (moka, keyed by SHA-256 of the token, so the token
//! itself is never kept). A hit is honoured only while the issuer still publishes the very key that
//! verified it.

use super::issuers::Issuer;
use crate::identity::Identity;
use crate::oidc::{KeyFingerprint, VerifyError};
use crate::provision::CacheBudget;
use moka::Expiry;
use moka::future::Cache;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A verified token mapped to its identity; what the token cache holds.
#[derive(Debug)]
pub struct Authenticated {
    pub identity: Identity,
    pub issuer: Arc<Issuer>,
    /// The key that verified the token.
    pub key: KeyFingerprint,
    pub expires_at: i64,
    /// The IdP session the token belongs to (`sid`), for back-channel logout.
    pub sid: Option<Box<str>>,
    /// `iat`, for logouts that end every token of a user issued before them.
    pub issued_at: Option<i64>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer").field("name", &self.name).finish()
    }
}

pub type TokenKey = [u8; 32];

pub fn token_key(token: &str) -> TokenKey {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

struct UntilExp;

impl Expiry<TokenKey, Arc<Authenticated>> for UntilExp {
    fn expire_after_create(
        &self,
        _: &TokenKey,
        value: &Arc<Authenticated>,
        _: Instant,
    ) -> Option<Duration> {
        let remaining = value
            .expires_at
            .saturating_sub(crate::oidc::unix_now())
            .max(0);
        Some(Duration::from_secs(remaining as u64))
    }
}

/// `None` inside when `--token-cache-size 0`: every request pays the signature check.
pub struct TokenCache {
    cache: Option<Cache<TokenKey, Arc<Authenticated>>>,
    leeway_secs: i64,
}

impl Authenticated {
    fn heap_size(&self) -> usize {
        std::mem::size_of::<Self>() + 32 + self.identity.heap_size()
    }
}

impl TokenCache {
    /// Disabled when the budget allows no entries (`--token-cache-size 0`).
    pub fn new(budget: CacheBudget, leeway_secs: i64) -> Self {
        let cache = budget.enabled().then(|| {
            Cache::builder()
                .max_capacity(budget.bytes)
                .weigher(move |_, v: &Arc<Authenticated>| budget.weigh(v.heap_size()))
                .expire_after(UntilExp)
                .support_invalidation_closures()
                .build()
        });
        Self { cache, leeway_secs }
    }

    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// A cached verification still good at `now`: not expired and its key still published. A hit whose key
    /// is gone is dropped, so the token is verified afresh (and refused).
    pub async fn get(
        &self,
        key: &TokenKey,
        now: i64,
    ) -> Result<Option<Arc<Authenticated>>, VerifyError> {
        let Some(cache) = &self.cache else {
            return Ok(None);
        };
        let Some(hit) = cache.get(key).await else {
            return Ok(None);
        };
        // moka's expiry has second granularity and may hold an entry a little past `exp`; time and
        // key trust are re-checked for free.
        if hit.expires_at <= now - self.leeway_secs {
            cache.invalidate(key).await;
            return Ok(None);
        }
        match crate::oidc::still_trusted(&hit.issuer.trust, hit.key) {
            Ok(()) => Ok(Some(hit)),
            Err(VerifyError::KeysUnavailable(k)) => Err(VerifyError::KeysUnavailable(k)),
            Err(_) => {
                cache.invalidate(key).await;
                Ok(None)
            }
        }
    }

    pub async fn insert(&self, key: TokenKey, value: Arc<Authenticated>) {
        if let Some(cache) = &self.cache {
            cache.insert(key, value).await;
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

    pub fn entry_count(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.entry_count())
    }

    pub async fn run_pending_tasks(&self) {
        if let Some(c) = &self.cache {
            c.run_pending_tasks().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::issuers::{IssuerRegistry, IssuerSpec};
    use crate::identity::{ClaimPath, Dialect, map_claims};
    use crate::oidc::{IdpClient, KeyCacheOptions, KeySource, VerifyOptions};
    use std::time::Duration;

    fn issuer() -> Arc<Issuer> {
        let spec = IssuerSpec {
            issuer: "https://acme.frontegg.com".into(),
            dialect: Dialect::Frontegg,
            audiences: vec![],
            authorized_parties: vec![],
            require_typ: None,
            source: KeySource::Discovery,
            tenant_claim: ClaimPath::new("tenant_id").unwrap(),
            roles_claim: ClaimPath::new("roles").unwrap(),
            id_prefix: None,
            logout_audiences: vec![],
            webhook_secret: None,
        };
        let opts = KeyCacheOptions {
            refresh_interval: Duration::from_secs(600),
            refetch_cooldown: Duration::from_secs(5),
            max_stale: Duration::from_secs(3600),
            file_poll: Duration::from_secs(5),
        };
        let client = IdpClient::new(None, Duration::from_secs(1)).unwrap();
        let verify = VerifyOptions {
            leeway_secs: 60,
            max_token_bytes: 16384,
        };
        IssuerRegistry::new(&[spec], &client, &opts, verify, None)
            .iter()
            .next()
            .unwrap()
            .clone()
    }

    fn authenticated(issuer: &Arc<Issuer>, i: usize, metadata_bytes: usize) -> Arc<Authenticated> {
        let claims = serde_json::json!({
            "sub": format!("user-{i}"), "tenantId": "t", "roles": ["Admin"],
            "metadata": {"blob": "x".repeat(metadata_bytes)},
        });
        let identity = map_claims(
            issuer.name.clone(),
            claims.as_object().unwrap(),
            &issuer.rules,
        )
        .unwrap();
        Arc::new(Authenticated {
            identity,
            issuer: issuer.clone(),
            key: KeyFingerprint::default(),
            expires_at: crate::oidc::unix_now() + 3600,
            sid: None,
            issued_at: None,
        })
    }

    #[tokio::test]
    async fn big_identities_cannot_push_the_cache_past_its_bytes() {
        let issuer = issuer();
        let budget = CacheBudget {
            bytes: 1 << 20,
            entries: 100_000,
        };
        let cache = TokenCache::new(budget, 60);
        // 500 tokens each carrying 10 KB of Frontegg metadata: 5 MB if counted by entries.
        for i in 0..500 {
            let key = token_key(&format!("token-{i}"));
            cache.insert(key, authenticated(&issuer, i, 10_000)).await;
        }
        cache.run_pending_tasks().await;
        let held = cache.entry_count();
        assert!(
            held <= (1 << 20) / 10_000,
            "{held} entries of 10 KB held in 1 MiB"
        );
        assert!(held > 0);
    }

    #[tokio::test]
    async fn small_identities_stop_at_the_entry_bound() {
        let issuer = issuer();
        let cache = TokenCache::new(
            CacheBudget {
                bytes: 1 << 30,
                entries: 50,
            },
            60,
        );
        for i in 0..200 {
            cache
                .insert(token_key(&format!("t-{i}")), authenticated(&issuer, i, 0))
                .await;
        }
        cache.run_pending_tasks().await;
        assert!(cache.entry_count() <= 50, "{}", cache.entry_count());
    }
}
