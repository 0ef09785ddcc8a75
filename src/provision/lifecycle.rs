//! Applies what the IdP says happened (webhooks, reconcile) to the rows, in the caller's transaction.
//! Three rules make deliveries safe to repeat and to receive out of order:
//! - every row remembers the time of the last lifecycle event applied to it (`lifecycle_at`); an event
//!   no newer than that is ignored, so a replayed or late delivery never undoes a newer one;
//! - the IdP's events reactivate only what the IdP deactivated (`deactivated_by = 'idp'`), never an
//!   operator's decision;
//! - rows owned by another issuer are never touched.
//!
//! Each change is audited with the actor (`webhook:frontegg`, `reconcile:keycloak`, ...).

use super::Affected;
use super::audit::{self, AuditKind, Event};
use super::store::{StoreError, TenantTarget, create_organization};
use crate::identity::lifecycle::{Change, Profile, UserRef};
use crate::identity::{Origin, RoleSource};
use chrono::{DateTime, Utc};
use entity::{memberships, organizations, users};
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};

/// Who deactivated a row.
pub const BY_IDP: &str = "idp";
pub const BY_OPERATOR: &str = "operator";

/// How to apply one event.
pub struct Apply<'a> {
    pub issuer: &'a str,
    /// Named in every audit event (`webhook:keycloak`).
    pub actor: &'a str,
    /// What the IdP called the event, for the audit details.
    pub cause: &'a str,
    /// When it happened at the IdP (or when it was received, when the IdP does not say).
    pub at: DateTime<Utc>,
    pub tenant_schema: Option<&'a str>,
    /// The app role of a membership the IdP creates, from the IdP roles it names.
    pub role_for: &'a (dyn Fn(Option<&[String]>) -> String + Sync),
}

/// What applying did.
#[derive(Debug, Default)]
pub struct Applied {
    pub affected: Vec<Affected>,
    /// Sessions the IdP ended (user, sid): their tokens must be refused.
    pub ended_sessions: Vec<(String, String)>,
    pub changed: usize,
    /// Older than what the row already reflects: ignored.
    pub stale: usize,
    /// About rows idsync does not have (or another issuer's): nothing to do.
    pub skipped: usize,
    /// Human-readable lines, one per change (what `reconcile --dry-run` prints).
    pub lines: Vec<String>,
}

/// Whether an event at `at` may change a row last changed by an event at `stored`. Equal times apply:
/// one event makes several changes to a row (a profile, then `enabled`), and re-applying a repeated
/// delivery sets the same state again.
fn newer(stored: Option<DateTime<Utc>>, at: DateTime<Utc>) -> bool {
    stored.is_none_or(|s| s <= at)
}

/// The version filter every update carries, so a concurrent, newer event wins atomically.
fn version_ok<C: ColumnTrait>(col: C, at: DateTime<Utc>) -> sea_orm::Condition {
    sea_orm::Condition::any()
        .add(col.is_null())
        .add(col.lte(at))
}

impl Apply<'_> {
    fn event<'e>(
        &'e self,
        kind: AuditKind,
        user: Option<&'e str>,
        organization: Option<&'e str>,
        mut details: Value,
    ) -> Event<'e> {
        details["cause"] = json!(self.cause);
        Event {
            kind,
            issuer: Some(self.issuer),
            user,
            organization,
            actor: self.actor,
            details,
            at: Utc::now(),
        }
    }
}

/// Applies `changes` in order.
pub async fn apply(
    db: &impl ConnectionTrait,
    a: &Apply<'_>,
    changes: &[Change],
) -> Result<Applied, StoreError> {
    let mut out = Applied::default();
    for change in changes {
        match change {
            Change::User { user, profile } => {
                user_profile(db, a, user.as_str(), profile, &mut out).await?
            }
            Change::UserActive { user, active } => {
                user_active(db, a, user.as_str(), *active, &mut out).await?
            }
            Change::Organization { tenant, name } => {
                organization(db, a, tenant.as_str(), name.as_deref(), &mut out).await?
            }
            Change::OrganizationActive { tenant, active } => {
                organization_active(db, a, tenant.as_str(), *active, &mut out).await?
            }
            Change::Membership {
                user,
                tenant,
                active,
                idp_roles,
            } => {
                let user_id = match user {
                    UserRef::Id(id) => Some(id.to_string()),
                    UserRef::Username(name) => users::Entity::find()
                        .filter(users::Column::Username.eq(name.as_str()))
                        .filter(users::Column::Issuer.eq(a.issuer))
                        .one(db)
                        .await?
                        .map(|u| u.id),
                };
                match user_id {
                    None => out.skipped += 1,
                    Some(u) => {
                        membership(
                            db,
                            a,
                            &u,
                            tenant.as_str(),
                            *active,
                            idp_roles.as_deref(),
                            &mut out,
                        )
                        .await?
                    }
                }
            }
            Change::SessionEnded { user, sid } => {
                out.ended_sessions.push((user.to_string(), sid.clone()));
            }
        }
    }
    Ok(out)
}

async fn record(db: &impl ConnectionTrait, e: Event<'_>) -> Result<(), StoreError> {
    Ok(audit::record(db, vec![e]).await?)
}

async fn user_profile(
    db: &impl ConnectionTrait,
    a: &Apply<'_>,
    id: &str,
    p: &Profile,
    out: &mut Applied,
) -> Result<(), StoreError> {
    let now = Utc::now();
    let Some(row) = users::Entity::find_by_id(id.to_owned()).one(db).await? else {
        let inserted = users::Entity::insert(users::ActiveModel {
            id: Set(id.to_owned()),
            issuer: Set(a.issuer.to_owned()),
            email: Set(p.email.clone()),
            email_verified: Set(None),
            username: Set(p.username.clone()),
            name: Set(p.name.clone()),
            given_name: Set(p.given_name.clone()),
            family_name: Set(p.family_name.clone()),
            avatar_url: Set(p.avatar_url.clone()),
            idp_roles: Set(json!([])),
            is_active: Set(true),
            last_login_at: Set(None),
            lifecycle_at: Set(Some(a.at)),
            deactivated_by: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .on_conflict(
            sea_orm::sea_query::OnConflict::column(users::Column::Id)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
        if inserted == 1 {
            out.changed += 1;
            out.affected.push(Affected::User(id.to_owned()));
            out.lines.push(format!("create user {id}"));
            record(
                db,
                a.event(
                    AuditKind::UserCreated,
                    Some(id),
                    None,
                    json!({"email": p.email, "name": p.name}),
                ),
            )
            .await?;
        }
        return Ok(());
    };
    if row.issuer != a.issuer {
        out.skipped += 1;
        return Ok(());
    }
    if !newer(row.lifecycle_at, a.at) {
        out.stale += 1;
        return Ok(());
    }
    let mut changes = serde_json::Map::new();
    let mut next = |field: &str, old: &Option<String>, new: &Option<String>| -> Option<String> {
        match new {
            Some(n) if Some(n) != old.as_ref() => {
                changes.insert(field.into(), json!({"from": old, "to": n}));
                Some(n.clone())
            }
            _ => old.clone(),
        }
    };
    let email = next("email", &row.email, &p.email);
    let username = next("username", &row.username, &p.username);
    let name = next("name", &row.name, &p.name);
    let given = next("given_name", &row.given_name, &p.given_name);
    let family = next("family_name", &row.family_name, &p.family_name);
    let avatar = next("avatar_url", &row.avatar_url, &p.avatar_url);
    let changed = !changes.is_empty();
    let done = users::Entity::update_many()
        .col_expr(users::Column::Email, Expr::value(email))
        .col_expr(users::Column::Username, Expr::value(username))
        .col_expr(users::Column::Name, Expr::value(name))
        .col_expr(users::Column::GivenName, Expr::value(given))
        .col_expr(users::Column::FamilyName, Expr::value(family))
        .col_expr(users::Column::AvatarUrl, Expr::value(avatar))
        .col_expr(users::Column::LifecycleAt, Expr::value(a.at))
        .col_expr(
            users::Column::UpdatedAt,
            Expr::value(if changed { now } else { row.updated_at }),
        )
        .filter(users::Column::Id.eq(id))
        .filter(version_ok(users::Column::LifecycleAt, a.at))
        .exec(db)
        .await?;
    if done.rows_affected == 0 {
        out.stale += 1;
    } else if changed {
        out.changed += 1;
        out.affected.push(Affected::User(id.to_owned()));
        out.lines.push(format!(
            "update user {id}: {}",
            Value::Object(changes.clone())
        ));
        record(
            db,
            a.event(
                AuditKind::ProfileUpdated,
                Some(id),
                None,
                json!({"changes": changes}),
            ),
        )
        .await?;
    }
    Ok(())
}

/// The new `(is_active, deactivated_by)` of a row, or `None` when the event changes nothing: the IdP
/// deactivates what is active and reactivates only what it deactivated itself.
fn next_state(
    is_active: bool,
    deactivated_by: &Option<String>,
    active: bool,
) -> Option<(bool, Option<String>)> {
    match (is_active, active) {
        (true, false) => Some((false, Some(BY_IDP.into()))),
        (false, true) if deactivated_by.as_deref() == Some(BY_IDP) => Some((true, None)),
        _ => None,
    }
}

async fn user_active(
    db: &impl ConnectionTrait,
    a: &Apply<'_>,
    id: &str,
    active: bool,
    out: &mut Applied,
) -> Result<(), StoreError> {
    let Some(row) = users::Entity::find_by_id(id.to_owned()).one(db).await? else {
        out.skipped += 1;
        return Ok(());
    };
    if row.issuer != a.issuer {
        out.skipped += 1;
        return Ok(());
    }
    if !newer(row.lifecycle_at, a.at) {
        out.stale += 1;
        return Ok(());
    }
    let next = next_state(row.is_active, &row.deactivated_by, active);
    let (is_active, by) = next
        .clone()
        .unwrap_or((row.is_active, row.deactivated_by.clone()));
    let done = users::Entity::update_many()
        .col_expr(users::Column::IsActive, Expr::value(is_active))
        .col_expr(users::Column::DeactivatedBy, Expr::value(by))
        .col_expr(users::Column::LifecycleAt, Expr::value(a.at))
        .filter(users::Column::Id.eq(id))
        .filter(version_ok(users::Column::LifecycleAt, a.at))
        .exec(db)
        .await?;
    if done.rows_affected == 0 {
        out.stale += 1;
    } else if next.is_some() {
        out.changed += 1;
        out.affected.push(Affected::User(id.to_owned()));
        let kind = if is_active {
            AuditKind::UserReactivated
        } else {
            AuditKind::UserDeactivated
        };
        out.lines.push(format!(
            "{} user {id}",
            if is_active {
                "reactivate"
            } else {
                "deactivate"
            }
        ));
        record(db, a.event(kind, Some(id), None, json!({}))).await?;
    }
    Ok(())
}

async fn ensure_organization(
    db: &impl ConnectionTrait,
    a: &Apply<'_>,
    id: &str,
    name: Option<&str>,
    out: &mut Applied,
) -> Result<Option<organizations::Model>, StoreError> {
    if let Some(org) = organizations::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
    {
        return Ok(Some(org));
    }
    let target = TenantTarget {
        id: id.to_owned(),
        name: name.unwrap_or(id).to_owned(),
    };
    let (org, created) = create_organization(
        db,
        &target,
        a.issuer,
        Origin::Idp,
        a.tenant_schema,
        Utc::now(),
    )
    .await?;
    if created {
        out.changed += 1;
        out.affected.push(Affected::Organization(id.to_owned()));
        out.lines
            .push(format!("create organization {id} ({})", org.name));
        record(
            db,
            a.event(
                AuditKind::OrganizationCreated,
                None,
                Some(id),
                json!({"name": org.name, "slug": org.slug}),
            ),
        )
        .await?;
    }
    Ok(Some(org))
}

async fn organization(
    db: &impl ConnectionTrait,
    a: &Apply<'_>,
    id: &str,
    name: Option<&str>,
    out: &mut Applied,
) -> Result<(), StoreError> {
    let existed = organizations::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?;
    let Some(row) = existed else {
        if let Some(org) = ensure_organization(db, a, id, name, out).await? {
            organizations::Entity::update_many()
                .col_expr(organizations::Column::LifecycleAt, Expr::value(a.at))
                .filter(organizations::Column::Id.eq(org.id))
                .exec(db)
                .await?;
        }
        return Ok(());
    };
    if row.issuer != a.issuer {
        out.skipped += 1;
        return Ok(());
    }
    if !newer(row.lifecycle_at, a.at) {
        out.stale += 1;
        return Ok(());
    }
    let rename = name.filter(|n| *n != row.name);
    let done = organizations::Entity::update_many()
        .col_expr(
            organizations::Column::Name,
            Expr::value(rename.unwrap_or(&row.name).to_owned()),
        )
        .col_expr(organizations::Column::LifecycleAt, Expr::value(a.at))
        .filter(organizations::Column::Id.eq(id))
        .filter(version_ok(organizations::Column::LifecycleAt, a.at))
        .exec(db)
        .await?;
    if done.rows_affected == 0 {
        out.stale += 1;
    } else if let Some(n) = rename {
        out.changed += 1;
        out.affected.push(Affected::Organization(id.to_owned()));
        out.lines
            .push(format!("rename organization {id}: {} -> {n}", row.name));
        record(
            db,
            a.event(
                AuditKind::OrganizationRenamed,
                None,
                Some(id),
                json!({"from": row.name, "to": n}),
            ),
        )
        .await?;
    }
    Ok(())
}

async fn organization_active(
    db: &impl ConnectionTrait,
    a: &Apply<'_>,
    id: &str,
    active: bool,
    out: &mut Applied,
) -> Result<(), StoreError> {
    let Some(row) = organizations::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
    else {
        out.skipped += 1;
        return Ok(());
    };
    if row.issuer != a.issuer {
        out.skipped += 1;
        return Ok(());
    }
    if !newer(row.lifecycle_at, a.at) {
        out.stale += 1;
        return Ok(());
    }
    let next = next_state(row.is_active, &row.deactivated_by, active);
    let (is_active, by) = next
        .clone()
        .unwrap_or((row.is_active, row.deactivated_by.clone()));
    let done = organizations::Entity::update_many()
        .col_expr(organizations::Column::IsActive, Expr::value(is_active))
        .col_expr(organizations::Column::DeactivatedBy, Expr::value(by))
        .col_expr(organizations::Column::LifecycleAt, Expr::value(a.at))
        .filter(organizations::Column::Id.eq(id))
        .filter(version_ok(organizations::Column::LifecycleAt, a.at))
        .exec(db)
        .await?;
    if done.rows_affected == 0 {
        out.stale += 1;
    } else if next.is_some() {
        out.changed += 1;
        out.affected.push(Affected::Organization(id.to_owned()));
        let kind = if is_active {
            AuditKind::OrganizationReactivated
        } else {
            AuditKind::OrganizationDeactivated
        };
        out.lines.push(format!(
            "{} organization {id}",
            if is_active {
                "reactivate"
            } else {
                "deactivate"
            }
        ));
        record(db, a.event(kind, None, Some(id), json!({}))).await?;
    }
    Ok(())
}

async fn membership(
    db: &impl ConnectionTrait,
    a: &Apply<'_>,
    user: &str,
    org: &str,
    active: bool,
    idp_roles: Option<&[String]>,
    out: &mut Applied,
) -> Result<(), StoreError> {
    let row = memberships::Entity::find_by_id((user.to_owned(), org.to_owned()))
        .one(db)
        .await?;
    let Some(row) = row else {
        if !active {
            out.skipped += 1;
            return Ok(());
        }
        let user_ok = users::Entity::find_by_id(user.to_owned())
            .one(db)
            .await?
            .is_some_and(|u| u.issuer == a.issuer);
        // An unknown (or another issuer's) user gets no membership, and so no organization made for it.
        if !user_ok {
            out.skipped += 1;
            return Ok(());
        }
        let org_ok = ensure_organization(db, a, org, None, out)
            .await?
            .is_some_and(|o| o.issuer == a.issuer);
        if !org_ok {
            out.skipped += 1;
            return Ok(());
        }
        let now = Utc::now();
        let role = (a.role_for)(idp_roles);
        let inserted = memberships::Entity::insert(memberships::ActiveModel {
            user_id: Set(user.to_owned()),
            organization_id: Set(org.to_owned()),
            role: Set(role.clone()),
            role_source: Set(RoleSource::Idp.as_str().into()),
            idp_roles: Set(json!(idp_roles.unwrap_or_default())),
            is_active: Set(true),
            lifecycle_at: Set(Some(a.at)),
            deactivated_by: Set(None),
            origin: Set(Origin::Idp.as_str().into()),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .on_conflict(
            sea_orm::sea_query::OnConflict::columns([
                memberships::Column::UserId,
                memberships::Column::OrganizationId,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
        if inserted == 1 {
            out.changed += 1;
            out.affected
                .push(Affected::Membership(user.to_owned(), org.to_owned()));
            out.lines
                .push(format!("add membership {user} in {org} as {role}"));
            record(
                db,
                a.event(
                    AuditKind::MembershipCreated,
                    Some(user),
                    Some(org),
                    json!({"role": role, "role_source": "idp"}),
                ),
            )
            .await?;
        }
        return Ok(());
    };
    // Another issuer's organization (ids overlap across IdPs): its memberships are not this IdP's.
    let owned = organizations::Entity::find_by_id(org.to_owned())
        .one(db)
        .await?
        .is_some_and(|o| o.issuer == a.issuer);
    if !owned {
        out.skipped += 1;
        return Ok(());
    }
    if !newer(row.lifecycle_at, a.at) {
        out.stale += 1;
        return Ok(());
    }
    let next = next_state(row.is_active, &row.deactivated_by, active);
    let (is_active, by) = next
        .clone()
        .unwrap_or((row.is_active, row.deactivated_by.clone()));
    // Roles the IdP names for this tenant set the role, unless an operator set it.
    let role = match idp_roles {
        Some(r) if active && row.role_source == RoleSource::Idp.as_str() => (a.role_for)(Some(r)),
        _ => row.role.clone(),
    };
    let done = memberships::Entity::update_many()
        .col_expr(memberships::Column::IsActive, Expr::value(is_active))
        .col_expr(memberships::Column::DeactivatedBy, Expr::value(by))
        .col_expr(memberships::Column::Role, Expr::value(role.clone()))
        .col_expr(memberships::Column::LifecycleAt, Expr::value(a.at))
        .filter(memberships::Column::UserId.eq(user))
        .filter(memberships::Column::OrganizationId.eq(org))
        .filter(version_ok(memberships::Column::LifecycleAt, a.at))
        .exec(db)
        .await?;
    if done.rows_affected == 0 {
        out.stale += 1;
        return Ok(());
    }
    if next.is_some() || role != row.role {
        out.changed += 1;
        out.affected
            .push(Affected::Membership(user.to_owned(), org.to_owned()));
    }
    if next.is_some() {
        let kind = if is_active {
            AuditKind::MembershipReactivated
        } else {
            AuditKind::MembershipDeactivated
        };
        out.lines.push(format!(
            "{} membership {user} in {org}",
            if is_active {
                "reactivate"
            } else {
                "deactivate"
            }
        ));
        record(db, a.event(kind, Some(user), Some(org), json!({}))).await?;
    }
    if role != row.role {
        out.lines.push(format!(
            "change role {user} in {org}: {} -> {role}",
            row.role
        ));
        record(
            db,
            a.event(
                AuditKind::RoleChanged,
                Some(user),
                Some(org),
                json!({"from": row.role, "to": role}),
            ),
        )
        .await?;
    }
    Ok(())
}
