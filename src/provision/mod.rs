//! Identity -> rows. Applies an access decision (the tenant and how its role is decided) by upserting the
//! organization, user and membership in one transaction (see `store`). A moka cache keyed by (issuer,
//! user, tenant) remembers a fingerprint of what was synced, so an unchanged identity costs no database
//! work at all. Never sees HTTP and decides no policy of its own.

pub mod audit;
mod last_seen;
pub mod lifecycle;
pub mod naming;
pub mod notify;
pub mod revocations;
pub mod schemas;
pub mod store;

use crate::identity::{Identity, Origin, RolePlan, RoleSource, StoredMembership};
use audit::{AuditKind, Event};
use chrono::{DateTime, SubsecRound, Utc};
use entity::memberships;
use last_seen::{LastSeen, Stamp};
use moka::Expiry;
use moka::future::Cache;
use sea_orm::{DatabaseConnection, DbErr, EntityTrait};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::{StoreError, SyncRequest};

pub use store::{Refusal, TenantTarget};

/// A cache's bound: at most `bytes` of (estimated) memory and at most `entries` entries. Each entry
/// weighs its size, but never less than `bytes / entries`, so moka's one weight bound enforces both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheBudget {
    pub bytes: u64,
    pub entries: u64,
}

impl CacheBudget {
    /// moka's overhead per entry (measured with benches/memory.rs: about 290 bytes for a bare entry).
    pub const ENTRY_OVERHEAD: usize = 290;

    pub fn enabled(&self) -> bool {
        self.bytes > 0 && self.entries > 0
    }

    /// The weight moka is given for an entry holding `bytes`.
    pub fn weigh(&self, bytes: usize) -> u32 {
        let floor = self.bytes / self.entries.max(1);
        (bytes as u64 + Self::ENTRY_OVERHEAD as u64)
            .max(floor)
            .min(u32::MAX as u64) as u32
    }
}

#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// `--tenant-schema` template, PostgreSQL only.
    pub tenant_schema: Option<String>,
    /// The sync cache's bound; the membership cache gets a tenth of it.
    pub cache: CacheBudget,
    /// How long a synced identity is trusted without asking the database again; bounds how long an
    /// operator's change made through another replica takes to reach this one.
    pub cache_ttl: Duration,
    pub last_seen_interval: Duration,
}

/// How long "no active membership there" is remembered: short, so a membership an operator just made
/// works within seconds on every replica, long enough that a client repeating a refused tenant costs
/// no query per request.
const NEGATIVE_MEMBERSHIP_TTL: Duration = Duration::from_secs(5);
/// At most one `access_denied` event per (user, tenant, reason) in this window, per replica.
const REFUSAL_AUDIT_WINDOW: Duration = Duration::from_secs(60);

/// What one request's sync must achieve: the access decision, as data.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SyncPlan {
    /// The organization the request acts in, if any.
    pub tenant: Option<TenantTarget>,
    /// How the membership's role is decided; `None` when there is no user or no tenant.
    pub role: Option<RolePlan>,
    /// Whether the token's own roles speak for this tenant (and so may be forwarded as `X-User-Roles`).
    pub idp_roles_apply: bool,
    /// Where an organization or membership this request creates comes from.
    pub origin: Origin,
}

/// What the upstream is told about a caller: from the synced rows, or (pass mode) from the decision alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provisioned {
    pub user_id: Option<String>,
    pub email: Option<String>,
    pub name: Option<String>,
    pub tenant_id: Option<String>,
    pub tenant_name: Option<String>,
    pub tenant_slug: Option<String>,
    pub tenant_schema: Option<String>,
    /// The app role in the active tenant.
    pub role: Option<String>,
    pub idp_roles_apply: bool,
    /// `false` when the database was skipped (`--on-db-error pass`).
    pub synced: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("refused: {0:?}")]
    Refused(Refusal),
    #[error("{0}")]
    Naming(String),
    #[error("database: {0}")]
    Database(#[from] DbErr),
}

impl From<StoreError> for ProvisionError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Refused(r) => Self::Refused(r),
            StoreError::Naming(n) => Self::Naming(n),
            StoreError::Db(e) => Self::Database(e),
        }
    }
}

/// What an operator's (or a webhook's) change touched, so caches can drop what they hold about it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Affected {
    User(String),
    Organization(String),
    Membership(String, String),
}

impl Affected {
    fn covers(&self, user: Option<&str>, tenant: Option<&str>) -> bool {
        match self {
            Self::User(u) => user == Some(u.as_str()),
            Self::Organization(o) => tenant == Some(o.as_str()),
            Self::Membership(u, o) => user == Some(u.as_str()) && tenant == Some(o.as_str()),
        }
    }
}

type Key = [u8; 32];

struct Cached {
    fingerprint: u64,
    provisioned: Arc<Provisioned>,
    last_login: Stamp,
}

impl Cached {
    fn heap_size(&self) -> usize {
        let p = &self.provisioned;
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
        std::mem::size_of::<Self>()
            + std::mem::size_of::<Provisioned>()
            + 32
            + opt(&p.user_id)
            + opt(&p.email)
            + opt(&p.name)
            + opt(&p.tenant_id)
            + opt(&p.tenant_name)
            + opt(&p.tenant_slug)
            + opt(&p.tenant_schema)
            + opt(&p.role)
    }
}

/// A membership lookup's answer, remembered with the ids it is about (for invalidation).
struct Membership {
    user: String,
    tenant: String,
    stored: Option<StoredMembership>,
}

/// Positive answers live as long as synced identities; negative ones only briefly.
struct MembershipExpiry(Duration);

impl Expiry<Key, Arc<Membership>> for MembershipExpiry {
    fn expire_after_create(&self, _: &Key, v: &Arc<Membership>, _: Instant) -> Option<Duration> {
        Some(match &v.stored {
            Some(m) if m.is_active => self.0,
            _ => NEGATIVE_MEMBERSHIP_TTL,
        })
    }
}

pub struct Provisioner {
    db: DatabaseConnection,
    opts: SyncOptions,
    synced: Cache<Key, Arc<Cached>>,
    members: Cache<Key, Arc<Membership>>,
    /// Refusals recently audited (value: user, tenant), so a client repeating one cannot flood the table.
    refusals: Cache<Key, (String, String)>,
    last_seen: LastSeen,
    /// SQLite has one writer at a time: sync transactions queue here, in order, instead of polling in
    /// SQLite's busy handler (whose back-off made tail latency seconds long under concurrent first requests).
    sqlite_writer: Option<tokio::sync::Mutex<()>>,
}

impl Provisioner {
    pub fn new(db: DatabaseConnection, opts: SyncOptions) -> Self {
        let budget = opts.cache;
        let synced = Cache::builder()
            .max_capacity(if budget.enabled() { budget.bytes } else { 0 })
            .weigher(move |_, v: &Arc<Cached>| budget.weigh(v.heap_size()))
            .time_to_live(opts.cache_ttl)
            .support_invalidation_closures()
            .build();
        let small = CacheBudget {
            bytes: budget.bytes / 10,
            entries: budget.entries,
        };
        let members = Cache::builder()
            .max_capacity(small.bytes)
            .weigher(move |_, m: &Arc<Membership>| small.weigh(m.user.len() + m.tenant.len() + 96))
            .expire_after(MembershipExpiry(opts.cache_ttl))
            .support_invalidation_closures()
            .build();
        let refusals = Cache::builder()
            .max_capacity(small.bytes)
            .weigher(move |_, (u, t): &(String, String)| small.weigh(u.len() + t.len() + 48))
            .time_to_live(REFUSAL_AUDIT_WINDOW)
            .support_invalidation_closures()
            .build();
        let last_seen = LastSeen::new(opts.last_seen_interval);
        let sqlite_writer = (db.get_database_backend() == sea_orm::DatabaseBackend::Sqlite)
            .then(|| tokio::sync::Mutex::new(()));
        Self {
            db,
            opts,
            synced,
            members,
            refusals,
            last_seen,
            sqlite_writer,
        }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Makes sure the rows for this identity and decision exist and are current, and returns what to
    /// forward. `issued_at` is the token's `iat`: a token older than the last lifecycle event applied
    /// to the user does not write its profile back.
    pub async fn sync(
        &self,
        identity: &Identity,
        plan: &SyncPlan,
        issued_at: Option<i64>,
    ) -> Result<Arc<Provisioned>, ProvisionError> {
        let now = Utc::now().trunc_subsecs(6);
        let (cache_key, fingerprint) = cache_key(identity, plan);
        if let Some(hit) = self.hit(identity, &cache_key, fingerprint, now).await {
            return Ok(hit);
        }
        let issued_at =
            issued_at.and_then(|s| chrono::TimeZone::timestamp_opt(&Utc, s, 0).single());
        // Boxed: the database path's future is many kilobytes, and keeping it inline would make every
        // warm request's future (moved and copied by the HTTP stack) that large too.
        Box::pin(self.sync_uncached(identity, plan, cache_key, fingerprint, now, issued_at)).await
    }

    /// What an earlier sync of this identity and decision gave, without touching the database.
    pub async fn cached(&self, identity: &Identity, plan: &SyncPlan) -> Option<Arc<Provisioned>> {
        let (cache_key, fingerprint) = cache_key(identity, plan);
        self.hit(
            identity,
            &cache_key,
            fingerprint,
            Utc::now().trunc_subsecs(6),
        )
        .await
    }

    async fn hit(
        &self,
        identity: &Identity,
        cache_key: &Key,
        fingerprint: u64,
        now: DateTime<Utc>,
    ) -> Option<Arc<Provisioned>> {
        let hit = self.synced.get(cache_key).await?;
        if hit.fingerprint != fingerprint {
            return None;
        }
        metrics::counter!("idsync_sync_total", "outcome" => "cached").increment(1);
        if let Some(user) = &identity.subject {
            self.last_seen.touch(&hit.last_login, user.as_str(), now);
        }
        Some(hit.provisioned.clone())
    }

    async fn sync_uncached(
        &self,
        identity: &Identity,
        plan: &SyncPlan,
        cache_key: Key,
        fingerprint: u64,
        now: DateTime<Utc>,
        issued_at: Option<DateTime<Utc>>,
    ) -> Result<Arc<Provisioned>, ProvisionError> {
        let request = SyncRequest {
            identity,
            tenant: plan.tenant.as_ref(),
            role: plan.role.as_ref(),
            origin: plan.origin,
            tenant_schema: self.opts.tenant_schema.as_deref(),
            now,
            issued_at,
        };
        let started = std::time::Instant::now();
        let writer = match &self.sqlite_writer {
            Some(m) => Some(m.lock().await),
            None => None,
        };
        let outcome = store::sync(&self.db, &request).await;
        drop(writer);
        metrics::histogram!("idsync_sync_seconds").record(started.elapsed().as_secs_f64());
        let outcome = outcome.map_err(|e| {
            metrics::counter!("idsync_sync_total", "outcome" => "error").increment(1);
            ProvisionError::from(e)
        })?;
        metrics::counter!("idsync_sync_total", "outcome" => "synced").increment(1);
        let provisioned = Arc::new(Provisioned {
            user_id: outcome.user.as_ref().map(|u| u.id.clone()),
            email: outcome.user.as_ref().and_then(|u| u.email.clone()),
            name: outcome.user.as_ref().and_then(|u| u.name.clone()),
            tenant_id: outcome.organization.as_ref().map(|o| o.id.clone()),
            tenant_name: outcome.organization.as_ref().map(|o| o.name.clone()),
            tenant_slug: outcome.organization.as_ref().map(|o| o.slug.clone()),
            tenant_schema: outcome.schema,
            role: outcome.membership.as_ref().map(|m| m.role.clone()),
            idp_roles_apply: plan.idp_roles_apply,
            synced: true,
        });
        self.synced
            .insert(
                cache_key,
                Arc::new(Cached {
                    fingerprint,
                    provisioned: provisioned.clone(),
                    // The sync transaction just wrote last_login_at.
                    last_login: Stamp::written_at(now),
                }),
            )
            .await;
        Ok(provisioned)
    }

    /// The user's membership in `tenant` as stored (remembered for the sync-cache TTL when active, for a
    /// few seconds when absent or inactive).
    pub async fn membership(
        &self,
        user: &str,
        tenant: &str,
    ) -> Result<Option<StoredMembership>, DbErr> {
        let key = naming::digest_parts(&[user, tenant, "membership"]);
        if let Some(hit) = self.members.get(&key).await {
            return Ok(hit.stored.clone());
        }
        let stored = Box::pin(
            memberships::Entity::find_by_id((user.to_owned(), tenant.to_owned())).one(&self.db),
        )
        .await?
        .map(|m| stored_membership(&m));
        self.members
            .insert(
                key,
                Arc::new(Membership {
                    user: user.to_owned(),
                    tenant: tenant.to_owned(),
                    stored: stored.clone(),
                }),
            )
            .await;
        Ok(stored)
    }

    /// Records that `identity` was refused `tenant` for `reason`, at most once per minute per (user,
    /// tenant, reason) on this replica: a client repeating a refused request cannot flood the audit table.
    pub async fn record_refusal(
        &self,
        identity: &Identity,
        tenant: Option<&str>,
        reason: &'static str,
    ) -> Result<(), DbErr> {
        let user = identity.subject.as_ref().map(|s| s.as_str()).unwrap_or("");
        let key = naming::digest_parts(&[&identity.issuer, user, tenant.unwrap_or(""), reason]);
        let entry = self
            .refusals
            .entry(key)
            .or_insert_with(async { (user.to_owned(), tenant.unwrap_or("").to_owned()) })
            .await;
        if !entry.is_fresh() {
            return Ok(());
        }
        let recorded = audit::record(
            &self.db,
            vec![Event {
                kind: AuditKind::AccessDenied,
                issuer: Some(&identity.issuer),
                user: identity.subject.as_ref().map(|s| s.as_str()),
                organization: tenant,
                actor: audit::ACTOR,
                details: serde_json::json!({"reason": reason}),
                at: Utc::now(),
            }],
        )
        .await;
        if recorded.is_err() {
            // Not recorded: let the next refusal try again.
            self.refusals.invalidate(&key).await;
        }
        recorded
    }

    /// Forgets everything synced (after change notices may have been missed).
    pub fn invalidate_all(&self) {
        self.synced.invalidate_all();
        self.members.invalidate_all();
    }

    /// Forgets what was synced for an affected user, organization or membership, so the next request
    /// reads the database again (and meets, say, a deactivation at once).
    pub fn invalidate(&self, affected: &Affected) {
        let a = affected.clone();
        self.synced
            .invalidate_entries_if(move |_, v| {
                let p = &v.provisioned;
                a.covers(p.user_id.as_deref(), p.tenant_id.as_deref())
            })
            .expect("the sync cache is built with invalidation closures");
        let a = affected.clone();
        self.members
            .invalidate_entries_if(move |_, m| a.covers(Some(&m.user), Some(&m.tenant)))
            .expect("the membership cache is built with invalidation closures");
        let a = affected.clone();
        self.refusals
            .invalidate_entries_if(move |_, (u, t)| a.covers(Some(u), Some(t)))
            .expect("the refusal cache is built with invalidation closures");
    }

    /// Writes pending last-login times (called periodically and at shutdown).
    pub async fn flush_last_seen(&self) -> Result<usize, DbErr> {
        self.last_seen.flush(&self.db).await
    }

    /// The background writer of last-login times; runs until aborted.
    pub async fn run_last_seen(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.flush_last_seen().await {
                tracing::warn!(error = %e, "could not write last-login times; will retry");
            }
        }
    }
}

pub fn stored_membership(m: &memberships::Model) -> StoredMembership {
    StoredMembership {
        role: m.role.clone(),
        // An unknown value (a newer idsync wrote it) is treated as an operator's: never overwritten.
        source: RoleSource::parse(&m.role_source).unwrap_or(RoleSource::Operator),
        is_active: m.is_active,
    }
}

/// The sync cache's key, (issuer, user, tenant), and the fingerprint its entry must match.
fn cache_key(identity: &Identity, plan: &SyncPlan) -> (Key, u64) {
    let key = naming::digest_parts(&[
        &identity.issuer,
        identity.subject.as_ref().map_or("", |s| s.as_str()),
        plan.tenant.as_ref().map_or("", |t| t.id.as_str()),
    ]);
    (key, fingerprint(identity, plan))
}

/// What the cache compares: every synced field the token supplies, plus the access decision.
fn fingerprint(identity: &Identity, plan: &SyncPlan) -> u64 {
    let mut h = DefaultHasher::new();
    identity.email.hash(&mut h);
    identity.email_verified.hash(&mut h);
    identity.name.hash(&mut h);
    identity.username.hash(&mut h);
    identity.given_name.hash(&mut h);
    identity.family_name.hash(&mut h);
    identity.avatar_url.hash(&mut h);
    identity.roles.hash(&mut h);
    plan.hash(&mut h);
    h.finish()
}
