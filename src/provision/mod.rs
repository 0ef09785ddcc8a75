//! Identity -> rows. Applies an access decision (the tenant and how its role is decided) by upserting the
//! organization, user and membership in one transaction (see `store`). A moka cache keyed by (issuer,
//! user, tenant) remembers a fingerprint of what was synced, so an unchanged identity costs no database
//! work at all. Never sees HTTP and decides no policy of its own.

pub mod audit;
mod batch;
mod bulk;
pub mod cache;
mod group;
mod last_seen;
pub mod lifecycle;
pub mod naming;
pub mod notify;
pub mod revocations;
pub mod schemas;
pub mod store;

use crate::identity::{Identity, Origin, RolePlan, RoleSource, SharedStr, StoredMembership};
use audit::{AuditKind, Event};
use cache::{Bounded, HeapSize};
use chrono::{DateTime, SubsecRound, Utc};
use entity::memberships;
use last_seen::{LastSeen, Stamp};
use sea_orm::{DatabaseConnection, DbErr, EntityTrait};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::StoreError;

pub use store::{Refusal, TenantTarget};

/// A cache's bound: at most `bytes` of (estimated) memory and at most `entries` entries. Each entry
/// weighs its size, but never less than `bytes / entries`, so the cache's one weight bound enforces both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheBudget {
    pub bytes: u64,
    pub entries: u64,
}

impl CacheBudget {
    /// The cache's own cost per entry: key, value slot, hash table and list links. quick_cache with
    /// 16-byte keys: 87 bytes measured by benches/memory.rs (tables grown by doubling, part-filled), about
    /// 106 just after a doubling, and a cache that evicts also keeps its recently evicted keys (ghosts)
    /// in the same slots; 128 covers the worst of these. The value's `Arc` counters are its own `HeapSize`.
    pub const ENTRY_OVERHEAD: usize = 128;

    pub fn enabled(&self) -> bool {
        self.bytes > 0 && self.entries > 0
    }

    /// The weight an entry holding `bytes` is given.
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
    /// The longest a request waits for its sync to be written (`--database-timeout`): a batch stalled
    /// behind a lock answers its requests 503 in time, and the rows are written when it gets through.
    pub write_timeout: Duration,
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
    /// The user's strings: usually the token's own, shared rather than copied.
    pub user_id: Option<SharedStr>,
    pub email: Option<SharedStr>,
    pub name: Option<SharedStr>,
    /// Where the caller acts and as what; `None` when neither. One record per tenant and role, shared
    /// by every member's view, so a cached view holds one pointer for it rather than five strings.
    pub scope: Option<Arc<Scope>>,
    pub idp_roles_apply: bool,
    /// `false` when the database was skipped (`--on-db-error pass`).
    pub synced: bool,
}

/// The active tenant's values and the caller's app role in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Scope {
    pub tenant_id: Option<SharedStr>,
    pub tenant_name: Option<SharedStr>,
    pub tenant_slug: Option<SharedStr>,
    pub tenant_schema: Option<SharedStr>,
    /// The app role in the active tenant.
    pub role: Option<SharedStr>,
}

impl Scope {
    /// `None` for a scope that says nothing, so a view without one holds a null pointer.
    pub fn into_shared(self) -> Option<Arc<Scope>> {
        (self != Self::default()).then(|| Arc::new(self))
    }
}

impl Provisioned {
    fn scoped(&self, part: impl FnOnce(&Scope) -> Option<&SharedStr>) -> Option<&str> {
        self.scope.as_deref().and_then(part).map(|s| &**s)
    }

    pub fn tenant_id(&self) -> Option<&str> {
        self.scoped(|s| s.tenant_id.as_ref())
    }

    pub fn tenant_name(&self) -> Option<&str> {
        self.scoped(|s| s.tenant_name.as_ref())
    }

    pub fn tenant_slug(&self) -> Option<&str> {
        self.scoped(|s| s.tenant_slug.as_ref())
    }

    pub fn tenant_schema(&self) -> Option<&str> {
        self.scoped(|s| s.tenant_schema.as_ref())
    }

    pub fn role(&self) -> Option<&str> {
        self.scoped(|s| s.role.as_ref())
    }
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

/// A cache key: the first 128 bits of SHA-256 over the key's parts. Half the bytes of the whole digest in
/// every slot of the sync, membership and refusal caches; making another caller's key still takes a second
/// preimage of 128 bits, which no one computes.
type Key = [u8; 16];

fn digest_key(parts: &[&str]) -> Key {
    let digest = naming::digest_parts(parts);
    let mut key = [0; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// The view and its bookkeeping in one allocation (one sync-cache entry per identity and tenant).
struct Cached {
    view: Provisioned,
    fingerprint: u64,
    last_login: Stamp,
    /// When this stops being trusted (`--sync-cache-ttl` after the sync).
    until: Deadline,
}

/// An instant in 8 bytes where `Instant` takes 16: nanoseconds since a base taken once per process
/// (584 years of range). Keeps a sync-cache entry in mimalloc's 80-byte class rather than the 96-byte one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline(u64);

impl Deadline {
    fn base() -> Instant {
        static BASE: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
        *BASE
    }

    /// `ttl` from now.
    fn after(ttl: Duration) -> Self {
        let base = Self::base();
        let at = Instant::now()
            .saturating_duration_since(base)
            .saturating_add(ttl);
        Self(u64::try_from(at.as_nanos()).unwrap_or(u64::MAX))
    }

    fn passed(self) -> bool {
        Self::after(Duration::ZERO) >= self
    }
}

/// A synced identity as the sync cache holds it: the view (what the upstream is told), until when it is
/// trusted, and its last-login stamp. The access layer keeps one beside a cached token, so a repeated
/// request skips the lookup.
#[derive(Clone)]
pub struct Synced(Arc<Cached>);

impl Synced {
    /// A view decided without the database (pass mode): never trusted as a sync.
    pub fn detached(view: Provisioned) -> Self {
        Self(Arc::new(Cached {
            view,
            fingerprint: 0,
            last_login: Stamp::written_at(Utc::now()),
            until: Deadline::after(Duration::ZERO),
        }))
    }

    pub fn view(&self) -> &Provisioned {
        &self.0.view
    }

    /// Whether it is still within its `--sync-cache-ttl`; past it, the database is asked again.
    pub fn trusted(&self) -> bool {
        !self.0.until.passed()
    }
}

impl std::ops::Deref for Synced {
    type Target = Provisioned;

    fn deref(&self) -> &Provisioned {
        &self.0.view
    }
}

impl std::fmt::Debug for Synced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.view.fmt(f)
    }
}

impl HeapSize for Cached {
    fn heap_size(&self) -> usize {
        let p = &self.view;
        let opt = |s: &Option<SharedStr>| s.as_ref().map_or(0, |s| s.len() + 16);
        // The scope is usually shared by every member of a tenant with the same role, and the user's
        // strings with the token entry; each is counted here all the same: the bound must hold when
        // they are not (one tenant per user, `--missing-tenant personal`).
        let scope = p.scope.as_deref().map_or(0, |s| {
            16 + std::mem::size_of::<Scope>()
                + opt(&s.tenant_id)
                + opt(&s.tenant_name)
                + opt(&s.tenant_slug)
                + opt(&s.tenant_schema)
                + opt(&s.role)
        });
        std::mem::size_of::<Self>() + opt(&p.user_id) + opt(&p.email) + opt(&p.name) + scope
    }
}

/// A membership lookup's answer, remembered with the ids it is about (for invalidation). Positive
/// answers live as long as synced identities; negative ones only briefly.
struct Membership {
    user: String,
    tenant: String,
    stored: Option<StoredMembership>,
    until: Instant,
}

impl HeapSize for Membership {
    fn heap_size(&self) -> usize {
        std::mem::size_of::<Self>() + self.user.len() + self.tenant.len() + 32
    }
}

/// A refusal recently audited: who, where, and until when another is not.
struct Refused {
    user: String,
    tenant: String,
    until: Instant,
}

impl HeapSize for Refused {
    fn heap_size(&self) -> usize {
        std::mem::size_of::<Self>() + self.user.len() + self.tenant.len()
    }
}

pub struct Provisioner {
    db: DatabaseConnection,
    opts: SyncOptions,
    synced: Bounded<Key, Arc<Cached>>,
    members: Bounded<Key, Arc<Membership>>,
    /// Refusals recently audited, so a client repeating one cannot flood the table.
    refusals: Bounded<Key, Arc<Refused>>,
    last_seen: LastSeen,
    /// Tenant values and roles, one copy each however many views carry them.
    interner: crate::identity::shared::Interner<SharedStr>,
    scopes: crate::identity::shared::Interner<Arc<Scope>>,
    /// Bumped by every invalidation: what was remembered from an earlier epoch is looked up again.
    epoch: std::sync::atomic::AtomicU64,
    /// First requests' syncs, group-committed. SQLite has one writer at a time: its syncs queue here, in
    /// order, instead of polling in SQLite's busy handler (whose back-off made tail latency seconds long).
    batcher: batch::Batcher,
}

impl Provisioner {
    pub fn new(db: DatabaseConnection, opts: SyncOptions) -> Self {
        let budget = opts.cache;
        let synced = Bounded::new(budget);
        // Memberships and refusals are looked up only when a request switches tenant: a tenth of the
        // bytes (and always some room, for the refusal limit to hold even with the sync cache off).
        let small = CacheBudget {
            bytes: (budget.bytes / 10).max(1 << 20),
            entries: budget.entries.max(1024),
        };
        let members = Bounded::new(small);
        let refusals = Bounded::new(small);
        let last_seen = LastSeen::new(opts.last_seen_interval);
        let writers = match db.get_database_backend() {
            sea_orm::DatabaseBackend::Sqlite => 1,
            _ => 8,
        };
        let batcher = batch::Batcher::start(db.clone(), opts.tenant_schema.clone(), writers);
        Self {
            db,
            opts,
            synced,
            members,
            refusals,
            last_seen,
            epoch: std::sync::atomic::AtomicU64::new(0),
            interner: Default::default(),
            scopes: Default::default(),
            batcher,
        }
    }

    /// Whether synced identities are remembered at all (`--sync-cache-size 0` turns it off).
    pub fn caching(&self) -> bool {
        self.synced.enabled()
    }

    /// Entries and estimated bytes of the synced-identity cache, for the `idsync_cache_*` gauges.
    pub fn cache_stats(&self) -> (u64, u64) {
        (self.synced.len() as u64, self.synced.weight())
    }

    /// Changes whenever something synced may have been invalidated: what a caller remembers from a sync
    /// made after reading epoch E is current while the epoch is still E.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    fn next_epoch(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// A request by `identity` used `synced` (remembered by the caller): keep its last login current.
    pub fn touch(&self, synced: &Synced, identity: &Identity) {
        if let Some(user) = &identity.subject {
            self.last_seen
                .touch(&synced.0.last_login, user.as_str(), Utc::now());
        }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Makes sure the rows for this identity and decision exist and are current, and returns what to
    /// forward (the cache entry itself, for callers that remember it). `issued_at` is the token's `iat`:
    /// a token older than the last lifecycle event applied to the user does not write its profile back.
    pub async fn sync(
        &self,
        identity: &Identity,
        plan: &SyncPlan,
        issued_at: Option<i64>,
    ) -> Result<Synced, ProvisionError> {
        let now = Utc::now().trunc_subsecs(6);
        let (cache_key, fingerprint) = cache_key(identity, plan);
        if let Some(hit) = self.hit(identity, &cache_key, fingerprint, now) {
            return Ok(hit);
        }
        let issued_at =
            issued_at.and_then(|s| chrono::TimeZone::timestamp_opt(&Utc, s, 0).single());
        // Boxed: the database path's future is many kilobytes, and keeping it inline would make every
        // warm request's future (moved and copied by the HTTP stack) that large too.
        Box::pin(self.sync_uncached(identity, plan, cache_key, fingerprint, now, issued_at)).await
    }

    /// What an earlier sync of this identity and decision gave, without touching the database.
    pub async fn cached(&self, identity: &Identity, plan: &SyncPlan) -> Option<Synced> {
        let (cache_key, fingerprint) = cache_key(identity, plan);
        self.hit(
            identity,
            &cache_key,
            fingerprint,
            Utc::now().trunc_subsecs(6),
        )
    }

    fn hit(
        &self,
        identity: &Identity,
        cache_key: &Key,
        fingerprint: u64,
        now: DateTime<Utc>,
    ) -> Option<Synced> {
        let hit = self.synced.get(cache_key)?;
        if hit.fingerprint != fingerprint {
            return None;
        }
        if hit.until.passed() {
            self.synced.remove(cache_key);
            return None;
        }
        static CACHED: std::sync::LazyLock<metrics::Counter> = std::sync::LazyLock::new(
            || metrics::counter!("idsync_sync_total", "outcome" => "cached"),
        );
        CACHED.increment(1);
        if let Some(user) = &identity.subject {
            self.last_seen.touch(&hit.last_login, user.as_str(), now);
        }
        Some(Synced(hit))
    }

    async fn sync_uncached(
        &self,
        identity: &Identity,
        plan: &SyncPlan,
        cache_key: Key,
        fingerprint: u64,
        now: DateTime<Utc>,
        issued_at: Option<DateTime<Utc>>,
    ) -> Result<Synced, ProvisionError> {
        let started = std::time::Instant::now();
        // An invalidation while this sync is in flight may have removed entries before this one was
        // inserted: what the sync read may be from before the change. Such a result is answered but not
        // remembered (checked after the insert; `invalidate` bumps the epoch before it removes).
        let epoch = self.epoch();
        let job = self.batcher.sync(batch::Job {
            identity: identity.clone(),
            tenant: plan.tenant.clone(),
            role: plan.role.clone(),
            origin: plan.origin,
            now,
            issued_at,
            reply: tokio::sync::oneshot::channel().0,
        });
        let outcome = match tokio::time::timeout(self.opts.write_timeout, job).await {
            Ok(o) => o,
            Err(_) => Err(StoreError::Db(DbErr::Custom(
                "the sync was not written within the database timeout".into(),
            ))),
        };
        metrics::histogram!("idsync_sync_seconds").record(started.elapsed().as_secs_f64());
        let outcome = outcome.map_err(|e| {
            metrics::counter!("idsync_sync_total", "outcome" => "error").increment(1);
            ProvisionError::from(e)
        })?;
        metrics::counter!("idsync_sync_total", "outcome" => "synced").increment(1);
        let shared = |s: &str| self.interner.intern(s, |s| SharedStr::from(s));
        let user = outcome.user.as_ref();
        let view = Provisioned {
            user_id: user.map(|u| reuse(identity.subject.as_ref().map(|s| s.as_shared()), &u.id)),
            email: user.and_then(|u| Some(reuse(identity.email.as_ref(), u.email.as_deref()?))),
            name: user.and_then(|u| Some(reuse(identity.name.as_ref(), u.name.as_deref()?))),
            scope: self.scope(Scope {
                tenant_id: outcome.organization.as_ref().map(|o| shared(&o.id)),
                tenant_name: outcome.organization.as_ref().map(|o| shared(&o.name)),
                tenant_slug: outcome.organization.as_ref().map(|o| shared(&o.slug)),
                tenant_schema: outcome.schema.as_deref().map(shared),
                role: outcome.membership.as_ref().map(|m| shared(&m.role)),
            }),
            idp_roles_apply: plan.idp_roles_apply,
            synced: true,
        };
        let cached = Arc::new(Cached {
            view,
            fingerprint,
            // The sync transaction just wrote last_login_at.
            last_login: Stamp::written_at(now),
            until: Deadline::after(self.opts.cache_ttl),
        });
        self.synced.insert(cache_key, cached.clone());
        if self.epoch() != epoch {
            self.synced
                .remove_if(&cache_key, |v| Arc::ptr_eq(v, &cached));
        }
        Ok(Synced(cached))
    }

    /// The shared copy of `scope` (`None` when it says nothing).
    fn scope(&self, scope: Scope) -> Option<Arc<Scope>> {
        if scope == Scope::default() {
            return None;
        }
        Some(self.scopes.intern(&scope, |s| Arc::new(s.clone())))
    }

    /// The user's membership in `tenant` as stored (remembered for the sync-cache TTL when active, for a
    /// few seconds when absent or inactive).
    pub async fn membership(
        &self,
        user: &str,
        tenant: &str,
    ) -> Result<Option<StoredMembership>, DbErr> {
        let key = digest_key(&[user, tenant, "membership"]);
        if let Some(hit) = self.members.get(&key) {
            if Instant::now() < hit.until {
                return Ok(hit.stored.clone());
            }
            self.members.remove(&key);
        }
        // As for syncs: a lookup that overlapped an invalidation is answered, not remembered.
        let epoch = self.epoch();
        let stored = Box::pin(
            memberships::Entity::find_by_id((user.to_owned(), tenant.to_owned())).one(&self.db),
        )
        .await?
        .map(|m| stored_membership(&m));
        let ttl = match &stored {
            Some(m) if m.is_active => self.opts.cache_ttl,
            _ => NEGATIVE_MEMBERSHIP_TTL,
        };
        let entry = Arc::new(Membership {
            user: user.to_owned(),
            tenant: tenant.to_owned(),
            stored: stored.clone(),
            until: Instant::now() + ttl,
        });
        self.members.insert(key, entry.clone());
        if self.epoch() != epoch {
            self.members.remove_if(&key, |v| Arc::ptr_eq(v, &entry));
        }
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
        let key = digest_key(&[&identity.issuer, user, tenant.unwrap_or(""), reason]);
        if let Some(r) = self.refusals.get(&key)
            && Instant::now() >= r.until
        {
            self.refusals.remove(&key);
        }
        let first = self
            .refusals
            .insert_if_absent(
                key,
                Arc::new(Refused {
                    user: user.to_owned(),
                    tenant: tenant.unwrap_or("").to_owned(),
                    until: Instant::now() + REFUSAL_AUDIT_WINDOW,
                }),
            )
            .await;
        if !first {
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
            self.refusals.remove(&key);
        }
        recorded
    }

    /// Forgets everything synced (after change notices may have been missed).
    pub fn invalidate_all(&self) {
        self.next_epoch();
        self.synced.clear();
        self.members.clear();
        self.next_epoch();
    }

    /// Forgets what was synced for an affected user, organization or membership, so the next request
    /// reads the database again (and meets, say, a deactivation at once).
    pub fn invalidate(&self, affected: &Affected) {
        // Before: a sync in flight that inserts after the removal sees the epoch moved and takes its
        // entry back out. After (below): see there.
        self.next_epoch();
        let a = affected;
        self.synced.retain(|_, v| {
            let p = &v.view;
            !a.covers(p.user_id.as_deref(), p.tenant_id())
        });
        self.members
            .retain(|_, m| !a.covers(Some(&m.user), Some(&m.tenant)));
        self.refusals
            .retain(|_, r| !a.covers(Some(&r.user), Some(&r.tenant)));
        // After the entries are gone, not before: a request that reads the new epoch can then no longer
        // find them, so nothing it remembers under that epoch is stale.
        self.next_epoch();
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

/// The token's copy of a stored string when they agree (the usual case), else a copy of the stored one.
fn reuse(token: Option<&SharedStr>, stored: &str) -> SharedStr {
    match token {
        Some(t) if **t == *stored => t.clone(),
        _ => SharedStr::from(stored),
    }
}

/// The sync cache's key, (issuer, user, tenant), and the fingerprint its entry must match.
fn cache_key(identity: &Identity, plan: &SyncPlan) -> (Key, u64) {
    let key = digest_key(&[
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
    identity.username().hash(&mut h);
    identity.given_name().hash(&mut h);
    identity.family_name().hash(&mut h);
    identity.avatar_url().hash(&mut h);
    identity.roles.hash(&mut h);
    plan.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ClaimPath, Dialect, MappingRules, map_claims};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A provisioner over a fresh SQLite file (and its URL, for a second connection); a PostgreSQL
    /// database `databases` also made is dropped.
    async fn sqlite_provisioner() -> (Arc<Provisioner>, String, tempfile::TempDir) {
        let mut dbs = bulk::tests::databases().await;
        let (db, _, dir) = dbs.remove(0);
        for (pg, admin, _) in dbs {
            pg.close().await.unwrap();
            if let Some((admin, name)) = admin {
                let conn = sea_orm::Database::connect(&admin).await.unwrap();
                sea_orm::ConnectionTrait::execute_unprepared(
                    &conn,
                    &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                )
                .await
                .unwrap();
            }
        }
        let url = format!("sqlite://{}/bulk.db?mode=rwc", dir.path().display());
        let provisioner = Arc::new(Provisioner::new(
            db,
            SyncOptions {
                tenant_schema: None,
                cache: CacheBudget {
                    bytes: 1 << 30,
                    entries: 1 << 20,
                },
                cache_ttl: Duration::from_secs(300),
                last_seen_interval: Duration::from_secs(300),
                write_timeout: Duration::from_secs(10),
            },
        ));
        (provisioner, url, dir)
    }

    fn user_identity(sub: &str) -> Identity {
        let rules = MappingRules {
            dialect: Dialect::Generic,
            tenant_claim: ClaimPath::new("tenant_id").unwrap(),
            roles_claim: ClaimPath::new("roles").unwrap(),
            id_prefix: None,
        };
        let claims = serde_json::json!({ "sub": sub });
        map_claims("iss", claims.as_object().unwrap(), &rules).unwrap()
    }

    fn no_tenant() -> SyncPlan {
        SyncPlan {
            tenant: None,
            role: None,
            idp_roles_apply: false,
            origin: Origin::Idp,
        }
    }

    fn member_of(tenant: &str, role: &str) -> SyncPlan {
        SyncPlan {
            tenant: Some(TenantTarget {
                id: tenant.into(),
                name: format!("{tenant} Inc."),
            }),
            role: Some(crate::identity::RolePlan {
                from_idp: Some(role.into()),
                fallback: "member".into(),
            }),
            idp_roles_apply: true,
            origin: Origin::Idp,
        }
    }

    /// Every member of a tenant with the same role holds one shared record of where and as what, not
    /// its own five strings; another role is another record, and what the upstream is told is the same.
    #[tokio::test]
    async fn members_with_the_same_role_share_one_scope() {
        let (provisioner, _url, _dir) = sqlite_provisioner().await;
        let sync = |sub: &'static str, role: &'static str| {
            let p = provisioner.clone();
            async move {
                p.sync(&user_identity(sub), &member_of("acme", role), None)
                    .await
                    .unwrap()
            }
        };
        let (a, b, c) = (
            sync("u1", "admin").await,
            sync("u2", "admin").await,
            sync("u3", "viewer").await,
        );
        let (sa, sb, sc) = (a.scope.as_ref(), b.scope.as_ref(), c.scope.as_ref());
        assert!(Arc::ptr_eq(sa.unwrap(), sb.unwrap()));
        assert!(!Arc::ptr_eq(sa.unwrap(), sc.unwrap()));
        assert_eq!(
            (a.tenant_id(), a.tenant_name(), a.role()),
            (Some("acme"), Some("acme Inc."), Some("admin"))
        );
        assert_eq!((c.tenant_id(), c.role()), (Some("acme"), Some("viewer")));
        assert!(a.tenant_slug().is_some() && a.tenant_schema().is_none());
        let none = provisioner
            .sync(&user_identity("u5"), &no_tenant(), None)
            .await
            .unwrap();
        assert!(none.scope.is_none(), "no tenant, no role: a null pointer");
    }

    /// A view's scope is shared by the members of a tenant with the same role, but a tenant per user
    /// (`--missing-tenant personal`) gives each view its own: the weight counts it, so the byte bound
    /// holds either way.
    #[test]
    fn a_synced_view_weighs_its_scope() {
        let cached = |scope: Option<Arc<Scope>>| Cached {
            view: Provisioned {
                scope,
                ..Default::default()
            },
            fingerprint: 0,
            last_login: Stamp::written_at(Utc::now()),
            until: Deadline::after(Duration::ZERO),
        };
        let long = |c: char| Some(SharedStr::from(c.to_string().repeat(200)));
        let scope = Scope {
            tenant_id: long('i'),
            tenant_name: long('n'),
            tenant_slug: long('s'),
            tenant_schema: long('c'),
            role: long('r'),
        };
        let (bare, scoped) = (cached(None), cached(scope.into_shared()));
        assert!(
            scoped.heap_size() >= bare.heap_size() + std::mem::size_of::<Scope>() + 5 * 200,
            "{} vs {}",
            scoped.heap_size(),
            bare.heap_size()
        );
    }

    /// A deadline saturates rather than overflowing the clock; one of now has passed.
    #[test]
    fn deadlines_saturate_and_now_has_passed() {
        assert!(!Deadline::after(Duration::MAX).passed());
        assert!(Deadline::after(Duration::ZERO).passed());
        assert!(!Deadline::after(Duration::from_secs(60)).passed());
    }

    /// A sync-cache entry is one allocation of mimalloc's 80-byte class (with the `Arc`'s counters):
    /// a field that grows it costs every cached identity 16 bytes or more.
    #[test]
    fn a_sync_cache_entry_fits_its_size_class() {
        assert!(16 + std::mem::size_of::<Cached>() <= 80);
    }

    /// A sync in flight while its user is invalidated may have read the rows from before the change;
    /// it inserted its result after the invalidation had removed everything about the user, and that
    /// entry then served the user's other tokens until the TTL. Here the sync waits on SQLite's write
    /// lock (held by another connection) while the invalidation runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sync_in_flight_during_an_invalidation_is_not_remembered() {
        let (provisioner, url, _dir) = sqlite_provisioner().await;
        let identity = user_identity("u1");
        let mut opts = sea_orm::ConnectOptions::new(url);
        opts.max_connections(1).sqlx_logging(false);
        let blocker = sea_orm::Database::connect(opts).await.unwrap();
        sea_orm::ConnectionTrait::execute_unprepared(&blocker, "BEGIN IMMEDIATE")
            .await
            .unwrap();
        let sync = tokio::spawn({
            let p = provisioner.clone();
            let identity = identity.clone();
            async move { p.sync(&identity, &no_tenant(), None).await }
        });
        // The sync has read the epoch and waits on the lock (SQLite's busy timeout is 5 s).
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!sync.is_finished(), "the sync did not wait on the lock");
        provisioner.invalidate(&Affected::User("u1".into()));
        sea_orm::ConnectionTrait::execute_unprepared(&blocker, "ROLLBACK")
            .await
            .unwrap();
        let synced = sync.await.unwrap().unwrap();
        assert_eq!(
            synced.user_id.as_deref(),
            Some("u1"),
            "the request is answered"
        );
        assert!(
            provisioner.cached(&identity, &no_tenant()).await.is_none(),
            "a sync that overlapped the invalidation was remembered"
        );
        // The next one, after the invalidation, is remembered as usual.
        provisioner
            .sync(&identity, &no_tenant(), None)
            .await
            .unwrap();
        assert!(provisioner.cached(&identity, &no_tenant()).await.is_some());
    }

    /// A caller that remembers a sync under the epoch it read first (the token memo) must never hold a
    /// stale entry under the current epoch. The epoch was bumped before the entries were removed, so a
    /// request between the two read the new epoch and still found the old entry: its memo stayed valid
    /// after the invalidation (a deactivated user kept being admitted until the cache TTL). A full sync
    /// cache makes the removal scan long enough for a concurrent reader to land in that window.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_found_under_the_new_epoch_is_what_the_invalidation_removed() {
        let (provisioner, _url, _dir) = sqlite_provisioner().await;
        for i in 0u64..300_000 {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&i.to_le_bytes());
            provisioner.synced.insert(
                key,
                Arc::new(Cached {
                    fingerprint: 0,
                    view: Provisioned::default(),
                    last_login: Stamp::written_at(Utc::now()),
                    until: Deadline::after(Duration::from_secs(300)),
                }),
            );
        }
        let (identity, plan) = (Arc::new(user_identity("u1")), no_tenant());
        for round in 0..10 {
            let old = provisioner.sync(&identity, &plan, None).await.unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let reads = Arc::new(AtomicUsize::new(0));
            // An OS thread of its own, so it reads while the invalidation runs (a task could wait for
            // the invalidating one's worker).
            let reader = std::thread::spawn({
                let (p, identity, plan, stop, reads) = (
                    provisioner.clone(),
                    identity.clone(),
                    plan.clone(),
                    stop.clone(),
                    reads.clone(),
                );
                let runtime = tokio::runtime::Handle::current();
                move || {
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::Acquire) {
                        let epoch = p.epoch();
                        let s = runtime.block_on(p.sync(&identity, &plan, None)).unwrap();
                        seen.push((epoch, s));
                        reads.fetch_add(1, Ordering::Release);
                    }
                    seen
                }
            });
            // Once the reader is hitting the entry, invalidate the user.
            while reads.load(Ordering::Acquire) < 100 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            provisioner.invalidate(&Affected::User("u1".into()));
            let current = provisioner.epoch();
            stop.store(true, Ordering::Release);
            let seen = tokio::task::spawn_blocking(move || reader.join().unwrap())
                .await
                .unwrap();
            let stale = seen
                .iter()
                .filter(|(e, s)| *e == current && Arc::ptr_eq(&s.0, &old.0))
                .count();
            assert_eq!(
                stale, 0,
                "round {round}: {stale} reads under the new epoch found the removed entry"
            );
        }
    }
}
