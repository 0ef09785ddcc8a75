//! Verified tokens, remembered until their `exp` (moka, keyed by SHA-256 of the token, so the token
//! itself is never kept). A hit is honoured only while the issuer still publishes the very key that
//! verified it.

use super::issuers::Issuer;
use crate::identity::Identity;
use crate::oidc::{KeyFingerprint, VerifyError};
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

impl TokenCache {
    pub fn new(size: u64, leeway_secs: i64) -> Self {
        let cache = (size > 0).then(|| {
            Cache::builder()
                .max_capacity(size)
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
