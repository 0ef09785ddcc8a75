//! The access layer, between the HTTP edge and {`oidc`, `identity`, `provision`}: the issuer registry,
//! the token cache, verify-then-map, and the one access decision (`policy`). Every entry point (proxy,
//! forward-auth, `/.idsync/me`, pass mode, `token inspect`) asks it the same question and gets the same
//! answer. No HTTP types, no SQL; its errors are its own and become statuses only at the edge.

pub mod error;
pub mod issuers;
pub mod lifecycle;
pub mod policy;
pub mod revocation;
pub mod tokens;

pub use error::{AccessError, Refusal, TokenRejection};
pub use issuers::{Issuer, IssuerRegistry, IssuerSpec, WebhookSecret};
pub use lifecycle::{Delivered, LifecycleError, LoggedOut};
pub use policy::{MissingTenant, TenantPolicy};
pub use tokens::Authenticated;

use crate::identity::shared::SharedParts;
use crate::identity::{TenantId, map_claims};
use crate::provision::{Affected, CacheBudget, ProvisionError, Provisioner, Synced};
use policy::Known;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::Duration;
use tokens::{TokenCache, token_key};

/// What to do when the database fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDbError {
    /// 503.
    Fail,
    /// The same decision without the database: forward with `X-Idsync-Synced: false`.
    Pass,
}

/// A request let in: who, and what the upstream is told.
pub struct Admission {
    pub authenticated: Arc<Authenticated>,
    pub view: Synced,
}

/// How lifecycle changes are handled.
#[derive(Clone, Debug)]
pub struct LifecycleOptions {
    /// How long a revoked session or user stays revoked: as long as tokens issued before the logout
    /// may still be presented (`--logout-retention`).
    pub logout_retention: chrono::Duration,
    /// `--tenant-schema`, for organizations an IdP event creates.
    pub tenant_schema: Option<String>,
    /// This process, in change notices (so it skips its own).
    pub origin: String,
}

impl Default for LifecycleOptions {
    fn default() -> Self {
        Self {
            logout_retention: chrono::Duration::hours(24),
            tenant_schema: None,
            origin: uuid::Uuid::new_v4().to_string(),
        }
    }
}

pub struct Gatekeeper {
    registry: Arc<IssuerRegistry>,
    tokens: TokenCache,
    policy: TenantPolicy,
    provisioner: Arc<Provisioner>,
    on_db_error: OnDbError,
    revocations: revocation::RevocationSet,
    lifecycle: LifecycleOptions,
    /// Pass mode only: until when (ms since the epoch) the database is not asked again after a failure,
    /// so a request meeting a dead database does not wait its timeout (synced identities still come
    /// from the cache meanwhile).
    db_quiet_until_ms: AtomicI64,
    /// Tenant ids and role lists, one copy however many cached tokens carry them.
    shared: SharedParts,
}

/// How long pass mode leaves a failed database alone before trying it again.
const DB_RETRY_AFTER: Duration = Duration::from_secs(2);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Gatekeeper {
    pub fn new(
        registry: Arc<IssuerRegistry>,
        token_cache: CacheBudget,
        policy: TenantPolicy,
        provisioner: Arc<Provisioner>,
        on_db_error: OnDbError,
    ) -> Self {
        let leeway = registry.verify_options().leeway_secs;
        Self {
            registry,
            tokens: TokenCache::new(token_cache, leeway),
            policy,
            provisioner,
            on_db_error,
            revocations: revocation::RevocationSet::default(),
            lifecycle: LifecycleOptions::default(),
            db_quiet_until_ms: AtomicI64::new(0),
            shared: SharedParts::default(),
        }
    }

    pub fn with_lifecycle(mut self, lifecycle: LifecycleOptions) -> Self {
        self.lifecycle = lifecycle;
        self
    }

    pub fn revocations(&self) -> &revocation::RevocationSet {
        &self.revocations
    }

    /// Pass mode with the database recently failed: decide without it.
    fn database_resting(&self) -> bool {
        self.on_db_error == OnDbError::Pass && now_ms() < self.db_quiet_until_ms.load(Relaxed)
    }

    pub fn registry(&self) -> &Arc<IssuerRegistry> {
        &self.registry
    }

    pub fn provisioner(&self) -> &Arc<Provisioner> {
        &self.provisioner
    }

    pub fn policy(&self) -> &TenantPolicy {
        &self.policy
    }

    pub fn tokens(&self) -> &TokenCache {
        &self.tokens
    }

    /// Who the token says the caller is: verified (or remembered) and mapped, unless its session or
    /// user was logged out at the IdP since.
    pub async fn authenticate(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Arc<Authenticated>, AccessError> {
        let key = self.tokens.enabled().then(|| token_key(token));
        let hit = match &key {
            Some(k) => self.tokens.get(k, now)?,
            None => None,
        };
        let authenticated = match hit {
            Some(hit) => {
                static HITS: std::sync::LazyLock<metrics::Counter> = std::sync::LazyLock::new(
                    || metrics::counter!("idsync_token_cache_total", "outcome" => "hit"),
                );
                HITS.increment(1);
                hit
            }
            None => {
                if key.is_some() {
                    metrics::counter!("idsync_token_cache_total", "outcome" => "miss").increment(1);
                }
                // Boxed for the same reason as sync's database path: a cache hit's future stays small.
                Box::pin(self.verify_and_map(token, now, key)).await?
            }
        };
        if self.revocations.revoked(&authenticated, now) {
            metrics::counter!("idsync_token_revoked_total").increment(1);
            return Err(AccessError::InvalidToken(TokenRejection::SessionEnded));
        }
        Ok(authenticated)
    }

    async fn verify_and_map(
        &self,
        token: &str,
        now: i64,
        key: Option<tokens::TokenKey>,
    ) -> Result<Arc<Authenticated>, AccessError> {
        let _span = crate::telemetry::trace::child("idsync.verify");
        let started = std::time::Instant::now();
        let verified = self.registry.verify(token, now).await;
        metrics::histogram!("idsync_verify_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("idsync_token_verifications_total", "outcome" => if verified.is_ok() { "valid" } else { "invalid" })
            .increment(1);
        let (issuer, verified) = verified?;
        let mut identity = map_claims(issuer.name.clone(), &verified.claims, &issuer.rules)?;
        self.shared.share(&mut identity);
        let sid = verified
            .claims
            .get("sid")
            .and_then(serde_json::Value::as_str)
            .filter(|s| s.len() <= 256)
            .map(tokens::SessionKey::of);
        let issued_at = crate::oidc::numeric_claim(&verified.claims, "iat")
            .ok()
            .flatten();
        let authenticated = Arc::new(Authenticated {
            identity,
            issuer,
            key: verified.key,
            lifetime: tokens::Lifetime::new(verified.expires_at, issued_at),
            sid,
            memo: tokens::MemoSlot::default(),
        });
        if let Some(key) = key {
            self.tokens.insert(key, authenticated.clone());
        }
        Ok(authenticated)
    }

    /// The whole question: may this token act, in which tenant, with which role. Syncs the rows (or,
    /// under `--on-db-error pass` with the database down, decides without them).
    pub async fn admit(
        &self,
        token: &str,
        requested: Option<&TenantId>,
        now: i64,
    ) -> Result<Admission, AccessError> {
        let authenticated = self.authenticate(token, now).await?;
        // The same token asking for the same tenant as last time, nothing invalidated since: the same
        // answer, without deciding again or looking the sync cache up.
        let epoch = self.provisioner.epoch();
        if let Some(synced) = authenticated.memo.recall(epoch, requested)
            && synced.trusted()
        {
            self.provisioner.touch(&synced, &authenticated.identity);
            return Ok(Admission {
                view: synced,
                authenticated,
            });
        }
        // Boxed: the decision's database work is a large future, and every warm request's future
        // would otherwise carry (and hyper move) its size.
        Box::pin(self.decide_and_sync(authenticated, requested, epoch)).await
    }

    /// `admit` past the memo: the decision, the membership lookup and the sync.
    async fn decide_and_sync(
        &self,
        authenticated: Arc<Authenticated>,
        requested: Option<&TenantId>,
        epoch: u64,
    ) -> Result<Admission, AccessError> {
        if self.database_resting() {
            return self.pass_resting(authenticated, requested).await;
        }
        // The decision and the rows, from the membership lookup to the write (or the sync-cache hit).
        let _span = crate::telemetry::trace::child("idsync.sync");
        let identity = &authenticated.identity;
        let target = policy::target(identity, requested, &self.policy)?;
        let stored = match target.needs_membership(identity) {
            None => None,
            Some((user, tenant)) => match self.provisioner.membership(user, tenant).await {
                Ok(m) => Some(m),
                Err(e) if self.on_db_error == OnDbError::Pass => {
                    return self.pass(authenticated, requested, &e.to_string());
                }
                Err(e) => return Err(e.into()),
            },
        };
        let known = match &stored {
            None => Known::Nothing,
            Some(m) => Known::Membership(m.as_ref()),
        };
        let decision = match policy::decide(identity, target, known, &self.policy) {
            Ok(d) => d,
            Err(refusal) => {
                let tenant = requested.map(|t| t.as_str());
                if let Err(e) = self
                    .provisioner
                    .record_refusal(identity, tenant, refusal.code())
                    .await
                {
                    tracing::warn!(error = %e, "the refusal could not be audited");
                }
                return Err(refusal.into());
            }
        };
        match self
            .provisioner
            .sync(identity, &decision.plan, authenticated.issued_at())
            .await
        {
            Ok(synced) => {
                let view = synced.clone();
                if self.provisioner.caching() {
                    authenticated.memo.store(tokens::Memo {
                        // The identity's shared copy when the token lists the tenant, rather than
                        // keeping this request's header copy alive for the token's lifetime.
                        requested: requested.map(|r| {
                            let listed = identity.tenants.iter().find(|t| *t == r);
                            listed.unwrap_or(r).clone()
                        }),
                        epoch,
                        synced,
                    });
                }
                Ok(Admission {
                    authenticated,
                    view,
                })
            }
            Err(ProvisionError::Database(e)) if self.on_db_error == OnDbError::Pass => {
                self.pass(authenticated, requested, &e.to_string())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Pass mode: the same decision without the database.
    fn pass(
        &self,
        authenticated: Arc<Authenticated>,
        requested: Option<&TenantId>,
        cause: &str,
    ) -> Result<Admission, AccessError> {
        tracing::warn!(error = %cause, "database unavailable; deciding without it (pass mode)");
        self.db_quiet_until_ms
            .store(now_ms() + DB_RETRY_AFTER.as_millis() as i64, Relaxed);
        self.decide_without_database(authenticated, requested)
    }

    /// While the database rests: an identity synced before keeps its synced view, others pass.
    async fn pass_resting(
        &self,
        authenticated: Arc<Authenticated>,
        requested: Option<&TenantId>,
    ) -> Result<Admission, AccessError> {
        let identity = &authenticated.identity;
        let target = policy::target(identity, requested, &self.policy)?;
        if target.needs_membership(identity).is_none() {
            let decision = policy::decide(identity, target, Known::Nothing, &self.policy)?;
            if let Some(view) = self.provisioner.cached(identity, &decision.plan).await {
                return Ok(Admission {
                    authenticated,
                    view,
                });
            }
        }
        self.decide_without_database(authenticated, requested)
    }

    fn decide_without_database(
        &self,
        authenticated: Arc<Authenticated>,
        requested: Option<&TenantId>,
    ) -> Result<Admission, AccessError> {
        metrics::counter!("idsync_sync_total", "outcome" => "passed").increment(1);
        let (_, view) = policy::decide_offline(&authenticated.identity, requested, &self.policy)?;
        Ok(Admission {
            authenticated,
            view: Synced::detached(view),
        })
    }

    /// Drops what this replica remembers about an affected user, organization or membership.
    pub fn forget(&self, affected: &Affected) {
        if let Affected::User(u) = affected {
            self.tokens.invalidate_subject(u);
        }
        self.provisioner.invalidate(affected);
    }
}
