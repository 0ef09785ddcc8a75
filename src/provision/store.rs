//! The sync transaction. Writes are single-statement upserts guarded by `issuer = excluded.issuer`, so a
//! concurrent or foreign writer can never be merged into; events come only from what a write reports
//! (`created_at`/`updated_at` equal to this transaction's `now`), so each is recorded exactly once however
//! many replicas race. One read of the three rows by primary key, before the writes, refuses deactivated or
//! foreign rows without writing anything and gives audit diffs their "from" side.

use super::naming;
use crate::identity::Identity;
use chrono::{DateTime, Utc};
use entity::{audit_events, memberships, organizations, users};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict, Query, SelectStatement};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, FromQueryResult,
    IdenStatic, Iterable, QueryResult, SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use serde_json::{Value, json};

/// A transaction that will write. On SQLite it takes the write lock at `BEGIN` (IMMEDIATE), so concurrent
/// syncs queue on the busy timeout instead of failing when a reader tries to upgrade; PostgreSQL ignores it.
pub fn write_transaction() -> TransactionOptions {
    TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..Default::default()
    }
}

/// Who sync writes audit events as.
pub const ACTOR: &str = "idsync";

/// The organization a request acts in.
#[derive(Clone, Debug)]
pub struct TenantTarget {
    pub id: String,
    pub name: String,
}

pub struct SyncRequest<'a> {
    pub identity: &'a Identity,
    pub tenant: Option<&'a TenantTarget>,
    /// The app role for the membership.
    pub role: Option<&'a str>,
    /// `--tenant-schema` template (PostgreSQL only).
    pub tenant_schema: Option<&'a str>,
    /// This transaction's time, truncated to microseconds (what PostgreSQL stores).
    pub now: DateTime<Utc>,
}

#[derive(Debug)]
pub struct SyncOutcome {
    pub user: Option<users::Model>,
    pub organization: Option<organizations::Model>,
    pub membership: Option<memberships::Model>,
    pub schema: Option<String>,
}

/// Why sync refuses a request; the refusal itself is recorded as an audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    IdentityConflict(String),
    UserInactive,
    TenantInactive,
    MembershipInactive,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("refused: {0:?}")]
    Refused(Refusal),
    #[error("{0}")]
    Naming(String),
    #[error(transparent)]
    Db(#[from] DbErr),
}

pub fn event(
    kind: &str,
    issuer: Option<&str>,
    user: Option<&str>,
    org: Option<&str>,
    actor: &str,
    details: Value,
    now: DateTime<Utc>,
) -> audit_events::ActiveModel {
    audit_events::ActiveModel {
        id: NotSet,
        occurred_at: Set(now),
        kind: Set(kind.to_owned()),
        user_id: Set(user.map(str::to_owned)),
        organization_id: Set(org.map(str::to_owned)),
        issuer: Set(issuer.map(str::to_owned)),
        actor: Set(actor.to_owned()),
        details: Set(details),
    }
}

/// Records an event on its own (refusals, which change nothing else).
pub async fn record(db: &impl ConnectionTrait, e: audit_events::ActiveModel) -> Result<(), DbErr> {
    audit_events::Entity::insert(e).exec(db).await.map(|_| ())
}

pub async fn sync(
    db: &DatabaseConnection,
    req: &SyncRequest<'_>,
) -> Result<SyncOutcome, StoreError> {
    let txn = db.begin_with_options(write_transaction()).await?;
    match sync_in(&txn, req).await {
        Ok((outcome, events)) => {
            if !events.is_empty() {
                audit_events::Entity::insert_many(events).exec(&txn).await?;
            }
            txn.commit().await?;
            Ok(outcome)
        }
        Err(StoreError::Refused(refusal)) => {
            txn.rollback().await?;
            let id = req.identity;
            let (kind, details) = match &refusal {
                Refusal::IdentityConflict(what) => ("identity_conflict", json!({"reason": what})),
                Refusal::UserInactive => ("access_denied", json!({"reason": "user_inactive"})),
                Refusal::TenantInactive => ("access_denied", json!({"reason": "tenant_inactive"})),
                Refusal::MembershipInactive => {
                    ("access_denied", json!({"reason": "membership_inactive"}))
                }
            };
            record(
                db,
                event(
                    kind,
                    Some(&id.issuer),
                    id.subject.as_ref().map(|s| s.as_str()),
                    req.tenant.map(|t| t.id.as_str()),
                    ACTOR,
                    details,
                    req.now,
                ),
            )
            .await?;
            Err(StoreError::Refused(refusal))
        }
        Err(e) => {
            let _ = txn.rollback().await;
            Err(e)
        }
    }
}

type Events = Vec<audit_events::ActiveModel>;

async fn sync_in(
    txn: &impl ConnectionTrait,
    req: &SyncRequest<'_>,
) -> Result<(SyncOutcome, Events), StoreError> {
    let identity = req.identity;
    let issuer: &str = &identity.issuer;
    let subject = identity.subject.as_ref().map(|s| s.as_str());
    let tenant_id = req.tenant.map(|t| t.id.as_str());
    let mut events = Vec::new();
    let ev = |kind: &str, details: Value| {
        event(
            kind,
            Some(issuer),
            subject,
            tenant_id,
            ACTOR,
            details,
            req.now,
        )
    };

    // Refuse before writing: a foreign or deactivated row stops the request with nothing changed.
    let Before {
        user: user_before,
        organization: org_before,
        membership: membership_before,
    } = read_before(txn, subject, tenant_id).await?;
    if let Some(u) = &user_before {
        if u.issuer != issuer {
            return Err(StoreError::Refused(Refusal::IdentityConflict(format!(
                "user id is owned by issuer {}",
                u.issuer
            ))));
        }
        if !u.is_active {
            return Err(StoreError::Refused(Refusal::UserInactive));
        }
    }
    if let Some(o) = &org_before {
        check_org(o, issuer)?;
    }
    if membership_before.as_ref().is_some_and(|m| !m.is_active) {
        return Err(StoreError::Refused(Refusal::MembershipInactive));
    }

    let organization = match (req.tenant, org_before) {
        (None, _) => None,
        (Some(_), Some(existing)) => Some(existing),
        (Some(target), None) => {
            let (org, created) = insert_organization(txn, target, issuer, req.now).await?;
            if created {
                events.push(ev(
                    "organization_created",
                    json!({"name": org.name, "slug": org.slug}),
                ));
                if let Some(template) = req.tenant_schema {
                    let schema = naming::schema_name(template, &org.slug, &org.id)
                        .map_err(StoreError::Naming)?;
                    // The name is validated against ^[a-z_][a-z0-9_]{0,62}$ above; quoting is belt and braces.
                    txn.execute_unprepared(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                        .await?;
                }
            }
            Some(org)
        }
    };

    let user = match subject {
        None => None,
        Some(id) => {
            let after = upsert_user(txn, id, identity, req.now).await?;
            if after.issuer != issuer {
                // A foreign row appeared between our read and our write; the guarded upsert left it alone.
                return Err(StoreError::Refused(Refusal::IdentityConflict(format!(
                    "user id is owned by issuer {}",
                    after.issuer
                ))));
            }
            if after.created_at == req.now {
                events.push(ev(
                    "user_created",
                    json!({"email": after.email, "name": after.name}),
                ));
            } else if after.updated_at == req.now {
                let changes = profile_changes(user_before.as_ref(), &after);
                events.push(ev("profile_updated", json!({"changes": changes})));
            }
            Some(after)
        }
    };

    let membership = match (subject, &organization, req.role) {
        (Some(user_id), Some(org), Some(role)) => {
            let after =
                upsert_membership(txn, user_id, &org.id, role, &identity.roles, req.now).await?;
            if !after.is_active {
                return Err(StoreError::Refused(Refusal::MembershipInactive));
            }
            if after.created_at == req.now {
                events.push(ev(
                    "membership_created",
                    json!({"role": after.role, "idp_roles": after.idp_roles}),
                ));
            } else if let Some(before) = membership_before.as_ref().filter(|b| b.role != after.role)
            {
                events.push(ev(
                    "role_changed",
                    json!({"from": before.role, "to": after.role, "idp_roles": after.idp_roles}),
                ));
            }
            Some(after)
        }
        _ => None,
    };

    let schema = match (req.tenant_schema, &organization) {
        (Some(template), Some(org)) => {
            Some(naming::schema_name(template, &org.slug, &org.id).map_err(StoreError::Naming)?)
        }
        _ => None,
    };
    Ok((
        SyncOutcome {
            user,
            organization,
            membership,
            schema,
        },
        events,
    ))
}

/// The rows a sync may touch, as they were.
#[derive(Default)]
struct Before {
    user: Option<users::Model>,
    organization: Option<organizations::Model>,
    membership: Option<memberships::Model>,
}

/// Reads the user, organization and membership in one round trip, not three: a one-row probe left-joined to
/// each table by primary key, each table's columns prefixed so the models decode from the same row.
async fn read_before(
    txn: &impl ConnectionTrait,
    subject: Option<&str>,
    tenant: Option<&str>,
) -> Result<Before, DbErr> {
    if subject.is_none() && tenant.is_none() {
        return Ok(Before::default());
    }
    let mut q = Query::select();
    q.from_subquery(
        Query::select()
            .expr_as(Expr::val(1), Alias::new("one"))
            .to_owned(),
        Alias::new("probe"),
    );
    if let Some(user) = subject {
        select_prefixed::<users::Entity>(&mut q, "u_");
        q.left_join(users::Entity, users::Column::Id.eq(user));
    }
    if let Some(org) = tenant {
        select_prefixed::<organizations::Entity>(&mut q, "o_");
        q.left_join(organizations::Entity, organizations::Column::Id.eq(org));
    }
    if let (Some(user), Some(org)) = (subject, tenant) {
        select_prefixed::<memberships::Entity>(&mut q, "m_");
        q.left_join(
            memberships::Entity,
            memberships::Column::UserId
                .eq(user)
                .and(memberships::Column::OrganizationId.eq(org)),
        );
    }
    let row = txn
        .query_one(&q)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("the probe row".into()))?;
    Ok(Before {
        user: decode_if_present(&row, "u_", "id", subject.is_some())?,
        organization: decode_if_present(&row, "o_", "id", tenant.is_some())?,
        membership: decode_if_present(
            &row,
            "m_",
            "user_id",
            subject.is_some() && tenant.is_some(),
        )?,
    })
}

fn select_prefixed<E: EntityTrait>(q: &mut SelectStatement, prefix: &str) {
    for col in E::Column::iter() {
        q.expr_as(
            Expr::col((E::default(), col)),
            Alias::new(format!("{prefix}{}", col.as_str())),
        );
    }
}

/// A left join gives NULL primary keys for a missing row; only a present row is decoded, so a decoding
/// error is reported rather than mistaken for "no row".
fn decode_if_present<M: FromQueryResult>(
    row: &QueryResult,
    prefix: &str,
    key: &str,
    joined: bool,
) -> Result<Option<M>, DbErr> {
    if !joined || row.try_get::<Option<String>>(prefix, key)?.is_none() {
        return Ok(None);
    }
    M::from_query_result(row, prefix).map(Some)
}

fn check_org(o: &organizations::Model, issuer: &str) -> Result<(), StoreError> {
    if o.issuer != issuer {
        return Err(StoreError::Refused(Refusal::IdentityConflict(format!(
            "tenant id is owned by issuer {}",
            o.issuer
        ))));
    }
    if !o.is_active {
        return Err(StoreError::Refused(Refusal::TenantInactive));
    }
    Ok(())
}

/// Inserts a new organization; `ON CONFLICT DO NOTHING` covers both a concurrent creator (then its row is
/// read back and checked) and a slug already taken by another organization (then the next candidate).
async fn insert_organization(
    txn: &impl ConnectionTrait,
    target: &TenantTarget,
    issuer: &str,
    now: DateTime<Utc>,
) -> Result<(organizations::Model, bool), StoreError> {
    for slug in naming::slug_candidates(&target.name, &target.id) {
        let row = organizations::ActiveModel {
            id: Set(target.id.clone()),
            issuer: Set(issuer.to_owned()),
            name: Set(target.name.clone()),
            slug: Set(slug),
            is_active: Set(true),
            metadata: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        };
        match organizations::Entity::insert(row)
            .on_conflict(OnConflict::new().do_nothing().to_owned())
            .exec_with_returning(txn)
            .await
        {
            Ok(org) => return Ok((org, true)),
            // SQLite reports a do-nothing conflict as RecordNotInserted, PostgreSQL's RETURNING as RecordNotFound.
            Err(DbErr::RecordNotInserted | DbErr::RecordNotFound(_)) => {
                if let Some(existing) = organizations::Entity::find_by_id(target.id.clone())
                    .one(txn)
                    .await?
                {
                    check_org(&existing, issuer)?;
                    return Ok((existing, false));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Naming(format!(
        "no free slug for organization {}",
        target.id
    )))
}

/// `INSERT ... ON CONFLICT (id) DO UPDATE`: profile fields the token carries replace the stored ones
/// (absent ones are kept), only for the same issuer; `updated_at` moves only when something changed.
async fn upsert_user(
    txn: &impl ConnectionTrait,
    id: &str,
    identity: &Identity,
    now: DateTime<Utc>,
) -> Result<users::Model, DbErr> {
    const PROFILE: &[&str] = &[
        "email",
        "email_verified",
        "username",
        "name",
        "given_name",
        "family_name",
        "avatar_url",
    ];
    let mine = r#""users"."issuer" = "excluded"."issuer""#;
    let mut sets: Vec<(&str, String)> = Vec::new();
    let mut changed: Vec<String> = Vec::new();
    for col in PROFILE {
        let new = format!(r#"COALESCE("excluded"."{col}", "users"."{col}")"#);
        changed.push(format!(r#""users"."{col}" IS DISTINCT FROM {new}"#));
        sets.push((
            col,
            format!(r#"CASE WHEN {mine} THEN {new} ELSE "users"."{col}" END"#),
        ));
    }
    // An empty role list is treated as "the token does not carry roles".
    if !identity.roles.is_empty() {
        changed.push(r#""users"."idp_roles" IS DISTINCT FROM "excluded"."idp_roles""#.to_owned());
        sets.push((
            "idp_roles",
            format!(r#"CASE WHEN {mine} THEN "excluded"."idp_roles" ELSE "users"."idp_roles" END"#),
        ));
    }
    sets.push(("updated_at", format!(r#"CASE WHEN {mine} AND ({}) THEN "excluded"."updated_at" ELSE "users"."updated_at" END"#, changed.join(" OR "))));
    sets.push((
        "last_login_at",
        format!(
            r#"CASE WHEN {mine} THEN "excluded"."last_login_at" ELSE "users"."last_login_at" END"#
        ),
    ));

    let row = users::ActiveModel {
        id: Set(id.to_owned()),
        issuer: Set(identity.issuer.to_string()),
        email: Set(identity.email.clone()),
        email_verified: Set(identity.email_verified),
        username: Set(identity.username.clone()),
        name: Set(identity.name.clone()),
        given_name: Set(identity.given_name.clone()),
        family_name: Set(identity.family_name.clone()),
        avatar_url: Set(identity.avatar_url.clone()),
        idp_roles: Set(json!(identity.roles)),
        is_active: Set(true),
        last_login_at: Set(Some(now)),
        created_at: Set(now),
        updated_at: Set(now),
    };
    users::Entity::insert(row)
        .on_conflict(
            OnConflict::column(users::Column::Id)
                .values(
                    sets.into_iter()
                        .map(|(c, e)| (Alias::new(c), Expr::cust(e))),
                )
                .to_owned(),
        )
        .exec_with_returning(txn)
        .await
}

/// The membership follows the IdP's roles only when they change, so a role an operator set by hand stays
/// until the IdP says something new; `is_active` is never touched (sync never re-activates).
async fn upsert_membership(
    txn: &impl ConnectionTrait,
    user_id: &str,
    org_id: &str,
    role: &str,
    idp_roles: &[String],
    now: DateTime<Utc>,
) -> Result<memberships::Model, DbErr> {
    let changed = r#""memberships"."idp_roles" IS DISTINCT FROM "excluded"."idp_roles""#;
    let sets = [
        (
            "role",
            format!(r#"CASE WHEN {changed} THEN "excluded"."role" ELSE "memberships"."role" END"#),
        ),
        (
            "updated_at",
            format!(
                r#"CASE WHEN {changed} THEN "excluded"."updated_at" ELSE "memberships"."updated_at" END"#
            ),
        ),
        ("idp_roles", r#""excluded"."idp_roles""#.to_owned()),
    ];
    let row = memberships::ActiveModel {
        user_id: Set(user_id.to_owned()),
        organization_id: Set(org_id.to_owned()),
        role: Set(role.to_owned()),
        idp_roles: Set(json!(idp_roles)),
        is_active: Set(true),
        created_at: Set(now),
        updated_at: Set(now),
    };
    memberships::Entity::insert(row)
        .on_conflict(
            OnConflict::columns([
                memberships::Column::UserId,
                memberships::Column::OrganizationId,
            ])
            .values(
                sets.into_iter()
                    .map(|(c, e)| (Alias::new(c), Expr::cust(e))),
            )
            .to_owned(),
        )
        .exec_with_returning(txn)
        .await
}

fn profile_changes(before: Option<&users::Model>, after: &users::Model) -> Value {
    let mut changes = serde_json::Map::new();
    let mut diff = |field: &str, from: Value, to: Value| {
        if from != to {
            changes.insert(field.to_owned(), json!({"from": from, "to": to}));
        }
    };
    let b = before
        .map(|b| serde_json::to_value(b).unwrap_or_default())
        .unwrap_or_default();
    let a = serde_json::to_value(after).unwrap_or_default();
    for field in [
        "email",
        "email_verified",
        "username",
        "name",
        "given_name",
        "family_name",
        "avatar_url",
        "idp_roles",
    ] {
        diff(field, b[field].clone(), a[field].clone());
    }
    Value::Object(changes)
}
