//! `idsync reconcile`: pulls users, organizations and memberships through the IdP's admin API and makes
//! the rows agree: what the IdP has is created or updated, what it disabled or no longer has is marked
//! inactive (never deleted), what it re-enabled comes back if the IdP had deactivated it. Webhooks can be
//! missed (Keycloak's are not retried on a connection error, Frontegg's retry policy is undocumented);
//! this is the backstop.
//!
//! Everything is fetched before anything is written: a page that still fails after retries aborts the
//! run with nothing changed, so a partial read can never look like a mass deletion. The changes go
//! through `provision::lifecycle` in one transaction, so a webhook newer than the run wins, an
//! operator's deactivation is kept, and every change is audited as `reconcile:<idp>`.

mod client;
pub mod frontegg;
pub mod keycloak;

use crate::identity::lifecycle::{Change, Event, Profile, UserRef};
use crate::identity::{MappingRules, Origin, Subject, TenantId};
use crate::provision::lifecycle::{Applied, Apply};
use crate::provision::{notify, store};
use chrono::{DateTime, Utc};
use entity::{memberships, organizations, users};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, TransactionTrait};
use std::collections::HashSet;

pub use client::{FetchError, Progress};

/// A user as the IdP lists it.
#[derive(Clone, Debug)]
pub struct IdpUser {
    pub id: Subject,
    pub profile: Profile,
    pub active: bool,
}

/// An organization (tenant) as the IdP lists it.
#[derive(Clone, Debug)]
pub struct IdpOrganization {
    pub id: TenantId,
    pub name: String,
    pub active: bool,
}

/// Everything the IdP has, read completely.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub users: Vec<IdpUser>,
    /// `None` when the IdP has no organizations to reconcile (a Keycloak realm without the feature):
    /// then organizations and memberships are left alone, not taken for "all gone".
    pub organizations: Option<Vec<IdpOrganization>>,
    pub memberships: Vec<(Subject, TenantId, bool)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("reading the IdP failed, nothing was changed: {0}")]
    Fetch(#[from] FetchError),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error("{0}")]
    Apply(String),
}

/// What a run found and did.
#[derive(Debug)]
pub struct Outcome {
    pub seen_users: usize,
    pub seen_organizations: Option<usize>,
    pub seen_memberships: usize,
    pub applied: Applied,
    pub dry_run: bool,
}

/// The changes that make the database agree with `snapshot`, for `issuer`'s rows.
pub async fn plan(
    db: &DatabaseConnection,
    issuer: &str,
    snapshot: &Snapshot,
) -> Result<Vec<Change>, sea_orm::DbErr> {
    let mut changes = Vec::new();
    let seen_users: HashSet<&str> = snapshot.users.iter().map(|u| u.id.as_str()).collect();
    for u in &snapshot.users {
        changes.push(Change::User {
            user: u.id.clone(),
            profile: u.profile.clone(),
        });
        changes.push(Change::UserActive {
            user: u.id.clone(),
            active: u.active,
        });
    }
    let known_users = users::Entity::find()
        .filter(users::Column::Issuer.eq(issuer))
        .filter(users::Column::IsActive.eq(true))
        .all(db)
        .await?;
    for u in known_users
        .iter()
        .filter(|u| !seen_users.contains(u.id.as_str()))
    {
        if let Ok(id) = Subject::parse("id", &u.id) {
            changes.push(Change::UserActive {
                user: id,
                active: false,
            });
        }
    }
    let Some(orgs) = &snapshot.organizations else {
        return Ok(changes);
    };
    let seen_orgs: HashSet<&str> = orgs.iter().map(|o| o.id.as_str()).collect();
    for o in orgs {
        changes.push(Change::Organization {
            tenant: o.id.clone(),
            name: Some(o.name.clone()),
        });
        changes.push(Change::OrganizationActive {
            tenant: o.id.clone(),
            active: o.active,
        });
    }
    // Only what came from the IdP can have disappeared from it: personal and default organizations and
    // an operator's grants are idsync's and the operator's, never the IdP's to remove.
    let known_orgs = organizations::Entity::find()
        .filter(organizations::Column::Issuer.eq(issuer))
        .filter(organizations::Column::Origin.eq(Origin::Idp.as_str()))
        .all(db)
        .await?;
    for o in known_orgs
        .iter()
        .filter(|o| o.is_active && !seen_orgs.contains(o.id.as_str()))
    {
        if let Ok(id) = TenantId::parse("id", &o.id) {
            changes.push(Change::OrganizationActive {
                tenant: id,
                active: false,
            });
        }
    }
    let seen_members: HashSet<(&str, &str)> = snapshot
        .memberships
        .iter()
        .map(|(u, t, _)| (u.as_str(), t.as_str()))
        .collect();
    for (u, t, active) in &snapshot.memberships {
        changes.push(Change::Membership {
            user: UserRef::Id(u.clone()),
            tenant: t.clone(),
            active: *active,
            idp_roles: None,
        });
    }
    let org_ids: Vec<&str> = known_orgs.iter().map(|o| o.id.as_str()).collect();
    let known_members = memberships::Entity::find()
        .filter(memberships::Column::OrganizationId.is_in(org_ids))
        .filter(memberships::Column::IsActive.eq(true))
        .filter(memberships::Column::Origin.eq(Origin::Idp.as_str()))
        .all(db)
        .await?;
    for m in known_members
        .iter()
        .filter(|m| !seen_members.contains(&(m.user_id.as_str(), m.organization_id.as_str())))
    {
        if let (Ok(u), Ok(t)) = (
            Subject::parse("user_id", &m.user_id),
            TenantId::parse("organization_id", &m.organization_id),
        ) {
            changes.push(Change::Membership {
                user: UserRef::Id(u),
                tenant: t,
                active: false,
                idp_roles: None,
            });
        }
    }
    Ok(changes)
}

/// How a run writes.
pub struct Target<'a> {
    pub db: &'a DatabaseConnection,
    pub issuer: &'a str,
    pub actor: &'a str,
    pub tenant_schema: Option<&'a str>,
    /// The role new memberships get (the IdP's admin listings carry no roles).
    pub default_role: &'a str,
    pub dry_run: bool,
}

/// Applies `snapshot` (read completely before this is called): one transaction, rolled back on a dry run.
pub async fn apply(
    t: &Target<'_>,
    snapshot: &Snapshot,
    started: DateTime<Utc>,
) -> Result<Outcome, ReconcileError> {
    let changes = plan(t.db, t.issuer, snapshot).await?;
    let role_for = |_: Option<&[String]>| t.default_role.to_owned();
    let event = Event {
        kind: "reconcile".into(),
        at_ms: Some(started.timestamp_millis()),
        realm: None,
        changes,
    };
    let how = Apply {
        issuer: t.issuer,
        actor: t.actor,
        cause: &event.kind,
        at: started,
        tenant_schema: t.tenant_schema,
        role_for: &role_for,
    };
    let txn = t.db.begin_with_options(store::write_transaction()).await?;
    let applied = crate::provision::lifecycle::apply(&txn, &how, &event.changes)
        .await
        .map_err(|e| ReconcileError::Apply(e.to_string()))?;
    if t.dry_run {
        txn.rollback().await?;
    } else {
        txn.commit().await?;
        let notices: Vec<notify::Notice> = applied.affected.iter().map(Into::into).collect();
        let origin = uuid::Uuid::new_v4().to_string();
        if let Err(e) = notify::publish(t.db, &origin, &notices).await {
            tracing::warn!(error = %e, "running replicas were not told; they catch up within --sync-cache-ttl");
        }
    }
    Ok(Outcome {
        seen_users: snapshot.users.len(),
        seen_organizations: snapshot.organizations.as_ref().map(Vec::len),
        seen_memberships: snapshot.memberships.len(),
        applied,
        dry_run: t.dry_run,
    })
}

/// Keeps only ids the rules accept (a malformed id at the IdP is reported, not fatal).
fn scoped_user(rules: &MappingRules, raw: &str) -> Result<Subject, FetchError> {
    rules
        .subject("id", raw)
        .map_err(|e| FetchError::Shape(format!("user id `{raw}`: {e}")))
}

fn scoped_tenant(rules: &MappingRules, raw: &str) -> Result<TenantId, FetchError> {
    rules
        .tenant_id("id", raw)
        .map_err(|e| FetchError::Shape(format!("tenant id `{raw}`: {e}")))
}
