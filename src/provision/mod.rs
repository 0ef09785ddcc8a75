//! Identity -> rows. Resolves the active tenant under the tenant policy, then upserts the organization,
//! user and membership in one transaction (see `store`). A moka cache keyed by (issuer, user, tenant)
//! remembers a fingerprint of what was synced, so an unchanged identity costs no database work at all.
//! Never sees HTTP.

mod last_seen;
pub mod naming;
pub mod store;

use crate::directory::Affected;
use crate::identity::{Identity, RoleMap};
use chrono::{DateTime, SubsecRound, Utc};
use entity::memberships;
use last_seen::{LastSeen, Stamp};
use moka::future::Cache;
use sea_orm::{DatabaseConnection, DbErr, EntityTrait};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;
use store::{Refusal, StoreError, SyncRequest, TenantTarget};

/// What to do with a user token that names no tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MissingTenant {
    /// 403 `missing_tenant_claim`.
    Reject,
    /// One organization per user, keyed from issuer and `sub`, with the user as its strongest role.
    Personal,
    /// Join this organization.
    Default(String),
}

impl MissingTenant {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "reject" => Ok(Self::Reject),
            "personal" => Ok(Self::Personal),
            other => match other.strip_prefix("default=") {
                Some(id) if !id.is_empty() => Ok(Self::Default(id.to_owned())),
                _ => Err(format!("`{s}` is not reject, personal or default=ID")),
            },
        }
    }
}

#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub roles: RoleMap,
    pub missing_tenant: MissingTenant,
    /// `--tenant-schema` template, PostgreSQL only.
    pub tenant_schema: Option<String>,
    pub cache_size: u64,
    /// How long a synced identity is trusted without asking the database again; bounds how long an
    /// operator's change made through another replica takes to reach this one.
    pub cache_ttl: Duration,
    pub last_seen_interval: Duration,
}

/// The synced view of a caller, what the upstream is told.
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
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("the requested tenant is not one the token allows or the user belongs to")]
    TenantNotPermitted,
    #[error("{0}")]
    MissingTenant(String),
    #[error("identity conflict: {0}")]
    IdentityConflict(String),
    #[error("the user is deactivated")]
    UserInactive,
    #[error("the tenant is deactivated")]
    TenantInactive,
    #[error("the user's membership in this tenant is deactivated")]
    MembershipInactive,
    #[error("{0}")]
    Naming(String),
    #[error("database: {0}")]
    Database(#[from] DbErr),
}

impl From<StoreError> for ProvisionError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Refused(Refusal::IdentityConflict(what)) => Self::IdentityConflict(what),
            StoreError::Refused(Refusal::UserInactive) => Self::UserInactive,
            StoreError::Refused(Refusal::TenantInactive) => Self::TenantInactive,
            StoreError::Refused(Refusal::MembershipInactive) => Self::MembershipInactive,
            StoreError::Naming(n) => Self::Naming(n),
            StoreError::Db(e) => Self::Database(e),
        }
    }
}

type Key = [u8; 32];

struct Cached {
    fingerprint: u64,
    provisioned: Arc<Provisioned>,
    last_login: Stamp,
}

pub struct Provisioner {
    db: DatabaseConnection,
    opts: SyncOptions,
    synced: Cache<Key, Arc<Cached>>,
    /// Positive answers to "does this user have an active membership in that tenant?" (value: user, tenant).
    members: Cache<Key, (String, String)>,
    last_seen: LastSeen,
    /// SQLite has one writer at a time: sync transactions queue here, in order, instead of polling in
    /// SQLite's busy handler (whose back-off made tail latency seconds long under concurrent first requests).
    sqlite_writer: Option<tokio::sync::Mutex<()>>,
}

impl Provisioner {
    pub fn new(db: DatabaseConnection, opts: SyncOptions) -> Self {
        let synced = Cache::builder()
            .max_capacity(opts.cache_size)
            .time_to_live(opts.cache_ttl)
            .support_invalidation_closures()
            .build();
        let members = Cache::builder()
            .max_capacity(opts.cache_size)
            .time_to_live(opts.cache_ttl)
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
            last_seen,
            sqlite_writer,
        }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Makes sure the rows for this identity exist and are current, and returns what to forward.
    /// `requested` is the tenant the client asked for (a request, not a fact).
    pub async fn sync(
        &self,
        identity: &Identity,
        requested: Option<&str>,
    ) -> Result<Arc<Provisioned>, ProvisionError> {
        let now = Utc::now().trunc_subsecs(6);
        let subject = identity.subject.as_ref().map(|s| s.as_str());
        let tenant = self.resolve_tenant(identity, requested, now).await?;
        let role = match (&tenant, subject) {
            (Some((_, personal)), Some(_)) if *personal => Some(self.opts.roles.strongest()),
            (Some(_), Some(_)) => Some(self.opts.roles.app_role(&identity.roles)),
            _ => None,
        };
        let tenant_id = tenant.as_ref().map(|(t, _)| t.id.as_str());
        let cache_key = naming::digest_parts(&[
            &identity.issuer,
            subject.unwrap_or(""),
            tenant_id.unwrap_or(""),
        ]);
        let fingerprint = fingerprint(identity, tenant.as_ref().map(|(t, _)| t), role);

        if let Some(hit) = self.synced.get(&cache_key).await
            && hit.fingerprint == fingerprint
        {
            metrics::counter!("idsync_sync_total", "outcome" => "cached").increment(1);
            if let Some(user) = subject {
                self.last_seen.touch(&hit.last_login, user, now);
            }
            return Ok(hit.provisioned.clone());
        }

        // Boxed: the database path's future is many kilobytes, and keeping it inline would make every
        // warm request's future (moved and copied by the HTTP stack) that large too.
        Box::pin(self.sync_uncached(identity, tenant, role, cache_key, fingerprint, now)).await
    }

    async fn sync_uncached(
        &self,
        identity: &Identity,
        tenant: Option<(TenantTarget, bool)>,
        role: Option<&str>,
        cache_key: Key,
        fingerprint: u64,
        now: DateTime<Utc>,
    ) -> Result<Arc<Provisioned>, ProvisionError> {
        let target = tenant.as_ref().map(|(t, _)| t);
        let request = SyncRequest {
            identity,
            tenant: target,
            role,
            tenant_schema: self.opts.tenant_schema.as_deref(),
            now,
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

    /// The active tenant: the token's, or the requested one if the token lists it or the user already has
    /// an active membership there; else the missing-tenant policy. The flag says "personal organization".
    async fn resolve_tenant(
        &self,
        identity: &Identity,
        requested: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Option<(TenantTarget, bool)>, ProvisionError> {
        let subject = identity.subject.as_ref().map(|s| s.as_str());
        let target = |id: &str| TenantTarget {
            id: id.to_owned(),
            name: identity.tenant_name(id).unwrap_or(id).to_owned(),
        };
        if let Some(wanted) = requested {
            if identity.allows_tenant(wanted) {
                return Ok(Some((target(wanted), false)));
            }
            if let Some(user) = subject
                && Box::pin(self.has_active_membership(&identity.issuer, user, wanted)).await?
            {
                return Ok(Some((target(wanted), false)));
            }
            Box::pin(store::record(
                &self.db,
                store::event(
                    "access_denied",
                    Some(&identity.issuer),
                    subject,
                    Some(wanted),
                    store::ACTOR,
                    serde_json::json!({"reason": "tenant_not_permitted"}),
                    now,
                ),
            ))
            .await?;
            return Err(ProvisionError::TenantNotPermitted);
        }
        if let Some(t) = &identity.tenant {
            return Ok(Some((target(t.as_str()), false)));
        }
        let Some(user) = subject else { return Ok(None) };
        match &self.opts.missing_tenant {
            MissingTenant::Reject => Err(ProvisionError::MissingTenant(format!(
                "token has no tenant: looked for {}; set --tenant-claim or --missing-tenant",
                identity
                    .tenant_sources
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ))),
            MissingTenant::Personal => {
                let id = format!(
                    "personal-{}",
                    naming::short_hash(&[&identity.issuer, user], 24)
                );
                let owner = identity
                    .username
                    .as_deref()
                    .or(identity.email.as_deref())
                    .unwrap_or(user);
                Ok(Some((
                    TenantTarget {
                        id,
                        name: format!("Personal ({owner})"),
                    },
                    true,
                )))
            }
            MissingTenant::Default(id) => Ok(Some((target(id), false))),
        }
    }

    async fn has_active_membership(
        &self,
        issuer: &str,
        user: &str,
        tenant: &str,
    ) -> Result<bool, DbErr> {
        let k = naming::digest_parts(&[issuer, user, tenant, "member"]);
        if self.members.contains_key(&k) {
            return Ok(true);
        }
        let found = memberships::Entity::find_by_id((user.to_owned(), tenant.to_owned()))
            .one(&self.db)
            .await?
            .is_some_and(|m| m.is_active);
        if found {
            self.members
                .insert(k, (user.to_owned(), tenant.to_owned()))
                .await;
        }
        Ok(found)
    }

    /// Forgets what was synced for an affected user, organization or membership, so the next request
    /// reads the database again (and meets, say, a deactivation at once).
    pub fn invalidate(&self, affected: &Affected) {
        let a = affected.clone();
        self.synced
            .invalidate_entries_if(move |_, v| {
                let p = &v.provisioned;
                invalidates(&a, p.user_id.as_deref(), p.tenant_id.as_deref())
            })
            .expect("the sync cache is built with invalidation closures");
        let a = affected.clone();
        self.members
            .invalidate_entries_if(move |_, (u, t)| invalidates(&a, Some(u), Some(t)))
            .expect("the membership cache is built with invalidation closures");
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

fn invalidates(affected: &Affected, user: Option<&str>, tenant: Option<&str>) -> bool {
    match affected {
        Affected::User(u) => user == Some(u.as_str()),
        Affected::Organization(o) => tenant == Some(o.as_str()),
        Affected::Membership(u, o) => user == Some(u.as_str()) && tenant == Some(o.as_str()),
    }
}

/// What the cache compares: every synced field the token supplies, plus the resolved tenant and role.
fn fingerprint(identity: &Identity, tenant: Option<&TenantTarget>, role: Option<&str>) -> u64 {
    let mut h = DefaultHasher::new();
    identity.email.hash(&mut h);
    identity.email_verified.hash(&mut h);
    identity.name.hash(&mut h);
    identity.username.hash(&mut h);
    identity.given_name.hash(&mut h);
    identity.family_name.hash(&mut h);
    identity.avatar_url.hash(&mut h);
    identity.roles.hash(&mut h);
    tenant.map(|t| (&t.id, &t.name)).hash(&mut h);
    role.hash(&mut h);
    h.finish()
}
