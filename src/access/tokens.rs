//! Verified tokens, remembered until their `exp` (keyed by SHA-256 of the token, so the token itself is
//! never kept). A hit is honoured only while the issuer still publishes the very key that verified it.

use super::issuers::Issuer;
use crate::identity::Identity;
use crate::oidc::{KeyFingerprint, VerifyError};
use crate::provision::CacheBudget;
use crate::provision::cache::{Bounded, HeapSize};
use std::sync::Arc;

/// A verified token mapped to its identity; what the token cache holds.
#[derive(Debug)]
pub struct Authenticated {
    pub identity: Identity,
    pub issuer: Arc<Issuer>,
    /// The key that verified the token.
    pub key: KeyFingerprint,
    /// `exp`, and `iat` for logouts that end every token of a user issued before them.
    pub lifetime: Lifetime,
    /// The IdP session the token belongs to (`sid`), for back-channel logout.
    pub sid: Option<SessionKey>,
    /// The last admission of this token, so a repeated request skips the decision and the sync lookup.
    pub memo: MemoSlot,
}

impl Authenticated {
    /// `exp`, Unix seconds.
    pub fn expires_at(&self) -> i64 {
        self.lifetime.expires_at()
    }

    /// `iat`, Unix seconds, if the token had a usable one.
    pub fn issued_at(&self) -> Option<i64> {
        self.lifetime.issued_at()
    }
}

/// A token's `exp` and `iat` as 32-bit Unix seconds (good until 2106): 8 bytes for both where an `i64`
/// and an `Option<i64>` took 24, which keeps a cached token in mimalloc's 160-byte class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    expires_at: u32,
    /// 0: none.
    issued_at: u32,
}

impl Lifetime {
    /// An `exp` past 2106 counts as 2106 (the cache keeps no token that long anyway). An `iat` at or
    /// before 1970 counts as one second past it: still present, and older than any logout or stored
    /// change it is compared with (0 is kept for "none", which the sync does not treat as older).
    pub fn new(expires_at: i64, issued_at: Option<i64>) -> Self {
        let clamp = |t: i64| u32::try_from(t.max(0)).unwrap_or(u32::MAX);
        Self {
            expires_at: clamp(expires_at),
            issued_at: issued_at.map_or(0, |t| clamp(t).max(1)),
        }
    }

    pub fn expires_at(self) -> i64 {
        i64::from(self.expires_at)
    }

    pub fn issued_at(self) -> Option<i64> {
        (self.issued_at != 0).then_some(i64::from(self.issued_at))
    }
}

/// What a token's last admission decided, valid while nothing was invalidated since (`epoch`) and the
/// synced entry is still trusted.
pub struct Memo {
    /// The tenant the request asked for (`X-Tenant-Id`), if any.
    pub requested: Option<crate::identity::TenantId>,
    pub epoch: u64,
    pub synced: crate::provision::Synced,
}

/// Inline in the cached token rather than a pointer to a separate allocation: one allocation fewer per
/// cached identity. The lock is held to compare the requested tenant and clone or swap the memo, never
/// while anything is freed.
#[derive(Default)]
pub struct MemoSlot(std::sync::Mutex<Option<Memo>>);

impl MemoSlot {
    /// The remembered admission, if it was for `requested` and made in `epoch`.
    pub fn recall(
        &self,
        epoch: u64,
        requested: Option<&crate::identity::TenantId>,
    ) -> Option<crate::provision::Synced> {
        let memo = self.0.lock().ok()?;
        let memo = memo.as_ref()?;
        (memo.epoch == epoch && memo.requested.as_ref() == requested).then(|| memo.synced.clone())
    }

    pub fn store(&self, memo: Memo) {
        // The memo replaced may hold the last reference to a sync entry: dropped after unlocking.
        let _replaced = self.0.lock().ok().and_then(|mut slot| slot.replace(memo));
    }
}

impl std::fmt::Debug for MemoSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoSlot")
    }
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer").field("name", &self.name).finish()
    }
}

/// The first 128 bits of the token's SHA-256: half a full digest in every slot, and a token that finds
/// another's entry still takes a second preimage of 128 bits. The token itself is never kept.
pub type TokenKey = [u8; 16];

/// A session id (`sid`) as a keyed 64-bit hash: 8 bytes inline instead of a copy of the string in every
/// cached token (Keycloak puts one in each). The key is random per process, so no one can make two
/// session ids collide on purpose; a chance collision only refuses a token of a session still open (401,
/// the client signs in again), never admits one whose session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey(std::num::NonZeroU64);

impl SessionKey {
    pub fn of(sid: &str) -> Self {
        use std::hash::BuildHasher;
        static KEY: std::sync::LazyLock<std::hash::RandomState> =
            std::sync::LazyLock::new(std::hash::RandomState::new);
        let h = KEY.hash_one(sid);
        Self(std::num::NonZeroU64::new(h).unwrap_or(std::num::NonZeroU64::MIN))
    }
}

pub fn token_key(token: &str) -> TokenKey {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest.as_ref()[..16]);
    key
}

/// Holds nothing with `--token-cache-size 0`: every request pays the signature check.
pub struct TokenCache {
    cache: Bounded<TokenKey, Arc<Authenticated>>,
    leeway_secs: i64,
}

impl HeapSize for Authenticated {
    fn heap_size(&self) -> usize {
        // The memo is inline and the synced entry it points to is the sync cache's; the tenant it was
        // asked for is the identity's own copy, or (a tenant reached through a stored membership
        // only) the request's: an allowance of a UUID's length for that.
        std::mem::size_of::<Self>() + self.identity.heap_size() + 56
    }
}

impl TokenCache {
    /// Disabled when the budget allows no entries (`--token-cache-size 0`).
    pub fn new(budget: CacheBudget, leeway_secs: i64) -> Self {
        Self {
            cache: Bounded::new(budget),
            leeway_secs,
        }
    }

    pub fn enabled(&self) -> bool {
        self.cache.enabled()
    }

    /// A cached verification still good at `now`: not expired and its key still published. A hit whose key
    /// is gone is dropped, so the token is verified afresh (and refused).
    pub fn get(&self, key: &TokenKey, now: i64) -> Result<Option<Arc<Authenticated>>, VerifyError> {
        let Some(hit) = self.cache.get(key) else {
            return Ok(None);
        };
        if hit.expires_at() <= now - self.leeway_secs {
            self.cache.remove(key);
            return Ok(None);
        }
        match crate::oidc::still_trusted(&hit.issuer.trust, hit.key) {
            Ok(()) => Ok(Some(hit)),
            Err(VerifyError::KeysUnavailable(k)) => Err(VerifyError::KeysUnavailable(k)),
            Err(_) => {
                self.cache.remove(key);
                Ok(None)
            }
        }
    }

    pub fn insert(&self, key: TokenKey, value: Arc<Authenticated>) {
        self.cache.insert(key, value);
    }

    /// Drops every cached token of `subject`, so its next request is verified and synced afresh.
    pub fn invalidate_subject(&self, subject: &str) {
        self.cache.retain(|_, v| {
            v.identity
                .subject
                .as_ref()
                .is_none_or(|s| s.as_str() != subject)
        });
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.len() as u64
    }

    /// Estimated bytes held.
    pub fn weight(&self) -> u64 {
        self.cache.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::issuers::{IssuerRegistry, IssuerSpec};
    use crate::identity::{ClaimPath, Dialect, map_claims};
    use crate::oidc::{IdpClient, KeyCacheOptions, KeySource, VerifyOptions};
    use std::time::Duration;

    /// A cached token, its identity's fixed part and its admission memo are one allocation of mimalloc's
    /// 160-byte class (with the `Arc`'s counters): a field that grows it costs every cached token 32 bytes.
    #[test]
    fn a_cached_token_fits_its_size_class() {
        assert!(16 + std::mem::size_of::<Authenticated>() <= 160);
    }

    #[test]
    fn lifetimes_keep_unix_seconds_until_2106_and_clamp_the_rest() {
        let l = Lifetime::new(1_800_000_000, Some(1_700_000_000));
        assert_eq!(
            (l.expires_at(), l.issued_at()),
            (1_800_000_000, Some(1_700_000_000))
        );
        let far = Lifetime::new(i64::MAX, Some(i64::MAX));
        let max = i64::from(u32::MAX);
        assert_eq!((far.expires_at(), far.issued_at()), (max, Some(max)));
        assert_eq!(Lifetime::new(1, None).issued_at(), None);
        // One at or before 1970 stays present (the sync treats a present `iat` as older than a stored
        // change, an absent one not), as early as can be.
        for iat in [0, -5, i64::MIN] {
            assert_eq!(Lifetime::new(1, Some(iat)).issued_at(), Some(1), "{iat}");
        }
        assert_eq!(Lifetime::new(-1, None).expires_at(), 0);
        assert_eq!(Lifetime::new(1, Some(1)).issued_at(), Some(1));
    }

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
            lifetime: Lifetime::new(crate::oidc::unix_now() + 3600, None),
            sid: None,
            memo: MemoSlot::default(),
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
            cache.insert(key, authenticated(&issuer, i, 10_000));
        }
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
            cache.insert(token_key(&format!("t-{i}")), authenticated(&issuer, i, 0));
        }
        assert!(cache.entry_count() <= 50, "{}", cache.entry_count());
    }
}
