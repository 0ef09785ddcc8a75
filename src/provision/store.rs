//! The sync transaction. Writes are single-statement upserts guarded by `issuer = excluded.issuer`, so a
//! concurrent or foreign writer can never be merged into; events come only from what a write reports
//! (`created_at`/`updated_at` equal to this transaction's `now`), so each is recorded exactly once however
//! many replicas race. One read of the three rows by primary key, before the writes, refuses deactivated or
//! foreign rows without writing anything and gives audit diffs their "from" side.

use super::audit::{self, ACTOR, AuditKind, Event};
use super::naming;
use super::schemas::{self, SchemaError};
use crate::identity::{Identity, Origin, RolePlan, RoleSource};
use chrono::{DateTime, Utc};
use entity::{memberships, organizations, users};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict, Query, SelectStatement};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    FromQueryResult, IdenStatic, Iterable, QueryResult, SqliteTransactionMode, TransactionOptions,
    TransactionTrait,
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

/// The organization a request acts in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TenantTarget {
    pub id: String,
    pub name: String,
}

#[derive(Clone, Copy)]
pub struct SyncRequest<'a> {
    pub identity: &'a Identity,
    pub tenant: Option<&'a TenantTarget>,
    /// How the membership's role is decided.
    pub role: Option<&'a RolePlan>,
    /// Where an organization or membership this request creates comes from.
    pub origin: Origin,
    /// `--tenant-schema` template (PostgreSQL only).
    pub tenant_schema: Option<&'a str>,
    /// This transaction's time, truncated to microseconds (what PostgreSQL stores).
    pub now: DateTime<Utc>,
    /// When the token was issued (`iat`), if it says.
    pub issued_at: Option<DateTime<Utc>>,
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

impl From<SchemaError> for StoreError {
    fn from(e: SchemaError) -> Self {
        match e {
            SchemaError::Db(db) => Self::Db(db),
            other => Self::Naming(other.to_string()),
        }
    }
}

pub async fn sync(
    db: &DatabaseConnection,
    req: &SyncRequest<'_>,
) -> Result<SyncOutcome, StoreError> {
    let txn = db.begin_with_options(write_transaction()).await?;
    match sync_in(&txn, req, &mut false).await {
        Ok((outcome, events)) => {
            audit::record(&txn, events).await?;
            txn.commit().await?;
            Ok(outcome)
        }
        Err(StoreError::Refused(refusal)) => {
            txn.rollback().await?;
            audit::record(db, vec![refusal_event(req, &refusal)]).await?;
            Err(StoreError::Refused(refusal))
        }
        Err(e) => {
            let _ = txn.rollback().await;
            Err(e)
        }
    }
}

/// The audit event of a refused sync (recorded on its own: the refused transaction wrote nothing).
pub(super) fn refusal_event<'r>(req: &'r SyncRequest<'_>, refusal: &Refusal) -> Event<'r> {
    let id = req.identity;
    let (kind, details) = match refusal {
        Refusal::IdentityConflict(what) => (AuditKind::IdentityConflict, json!({"reason": what})),
        Refusal::UserInactive => (AuditKind::AccessDenied, json!({"reason": "user_inactive"})),
        Refusal::TenantInactive => (
            AuditKind::AccessDenied,
            json!({"reason": "tenant_inactive"}),
        ),
        Refusal::MembershipInactive => (
            AuditKind::AccessDenied,
            json!({"reason": "membership_inactive"}),
        ),
    };
    Event {
        kind,
        issuer: Some(&id.issuer),
        user: id.subject.as_ref().map(|s| s.as_str()),
        organization: req.tenant.map(|t| t.id.as_str()),
        actor: ACTOR,
        details,
        at: req.now,
    }
}

/// Group commit: several first requests in one transaction, each exactly as [`sync`] would run it, in
/// a fixed order (tenant, then user) so concurrent batches take row locks in the same order. One
/// BEGIN, one audit insert and one COMMIT (one WAL flush) for them all. A request refused before it
/// wrote anything is answered and the batch goes on; anything else (a refusal after a write, a database
/// error, a failed commit) rolls the batch back and each request runs again on its own, so one
/// identity's failure never fails another's request and nothing is half-written.
pub async fn sync_batch(
    db: &DatabaseConnection,
    reqs: &[SyncRequest<'_>],
) -> Vec<Result<SyncOutcome, StoreError>> {
    if reqs.len() > 1 {
        match try_batch(db, reqs).await {
            Ok(results) => return results,
            Err(e) => {
                metrics::counter!("idsync_sync_batch_fallbacks_total").increment(1);
                tracing::debug!(error = %e, batch = reqs.len(), "group commit fell back to one transaction per request");
            }
        }
    }
    let mut results = Vec::with_capacity(reqs.len());
    for r in reqs {
        results.push(sync(db, r).await);
    }
    results
}

async fn try_batch(
    db: &DatabaseConnection,
    reqs: &[SyncRequest<'_>],
) -> Result<Vec<Result<SyncOutcome, StoreError>>, StoreError> {
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |r: &SyncRequest<'_>| {
            (
                r.tenant.map(|t| t.id.clone()),
                r.identity.subject.as_ref().map(|s| s.as_str().to_owned()),
            )
        };
        key(&reqs[a]).cmp(&key(&reqs[b]))
    });
    // One request per user goes into the multi-row statements; a second request of a user in the same
    // batch runs after them, alone, in the same transaction (it sees what the first wrote).
    let mut seen = std::collections::HashSet::new();
    let (first, again): (Vec<usize>, Vec<usize>) = order.into_iter().partition(|&i| {
        reqs[i]
            .identity
            .subject
            .as_ref()
            .is_none_or(|s| seen.insert(s.as_str()))
    });
    let together: Vec<SyncRequest<'_>> = first.iter().map(|&i| reqs[i]).collect();
    let txn = db.begin_with_options(write_transaction()).await?;
    let mut results: Vec<Option<Result<SyncOutcome, StoreError>>> =
        (0..reqs.len()).map(|_| None).collect();
    let mut events = Vec::new();
    let answers = match super::group::sync_many(&txn, &together).await {
        Ok(a) => a,
        Err(e) => {
            let _ = txn.rollback().await;
            return Err(e);
        }
    };
    for (&i, answer) in first.iter().zip(answers) {
        match answer {
            Ok((outcome, evs)) => {
                events.extend(evs);
                results[i] = Some(Ok(outcome));
            }
            Err(StoreError::Refused(refusal)) => {
                events.push(refusal_event(&reqs[i], &refusal));
                results[i] = Some(Err(StoreError::Refused(refusal)));
            }
            Err(e) => {
                let _ = txn.rollback().await;
                return Err(e);
            }
        }
    }
    for i in again {
        let req = &reqs[i];
        let mut wrote = false;
        match sync_in(&txn, req, &mut wrote).await {
            Ok((outcome, evs)) => {
                events.extend(evs);
                results[i] = Some(Ok(outcome));
            }
            Err(StoreError::Refused(refusal)) if !wrote => {
                events.push(refusal_event(req, &refusal));
                results[i] = Some(Err(StoreError::Refused(refusal)));
            }
            Err(e) => {
                let _ = txn.rollback().await;
                return Err(e);
            }
        }
    }
    if let Err(e) = audit::record(&txn, events).await {
        let _ = txn.rollback().await;
        return Err(e.into());
    }
    txn.commit().await?;
    Ok(results
        .into_iter()
        .map(|r| r.expect("every request answered"))
        .collect())
}

async fn sync_in<'r>(
    txn: &impl ConnectionTrait,
    req: &'r SyncRequest<'_>,
    wrote: &mut bool,
) -> Result<(SyncOutcome, Vec<Event<'r>>), StoreError> {
    let identity = req.identity;
    let issuer: &str = &identity.issuer;
    let subject = identity.subject.as_ref().map(|s| s.as_str());
    let tenant_id = req.tenant.map(|t| t.id.as_str());
    let mut events = Vec::new();
    let ev = |kind: AuditKind, details: Value| Event {
        kind,
        issuer: Some(issuer),
        user: subject,
        organization: tenant_id,
        actor: ACTOR,
        details,
        at: req.now,
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
            *wrote = true;
            let (org, created) =
                create_organization(txn, target, issuer, req.origin, req.tenant_schema, req.now)
                    .await?;
            if created {
                events.push(ev(
                    AuditKind::OrganizationCreated,
                    json!({"name": org.name, "slug": org.slug, "schema": org.schema_name}),
                ));
            }
            Some(org)
        }
    };

    let user = match subject {
        None => None,
        Some(id) => {
            // A token issued before the last lifecycle event applied to the user (a webhook's newer
            // profile) does not write its older profile back.
            let older = match (&user_before, req.issued_at) {
                (Some(u), Some(iat)) => u.lifecycle_at.is_some_and(|l| iat < l),
                _ => false,
            };
            *wrote = true;
            let after = upsert_user(txn, id, identity, !older, req.now).await?;
            if after.issuer != issuer {
                // A foreign row appeared between our read and our write; the guarded upsert left it alone.
                return Err(StoreError::Refused(Refusal::IdentityConflict(format!(
                    "user id is owned by issuer {}",
                    after.issuer
                ))));
            }
            if after.created_at == req.now {
                events.push(ev(
                    AuditKind::UserCreated,
                    json!({"email": after.email, "name": after.name}),
                ));
            } else if after.updated_at == req.now {
                let changes = profile_changes(user_before.as_ref(), &after);
                events.push(ev(AuditKind::ProfileUpdated, json!({"changes": changes})));
            }
            Some(after)
        }
    };

    let membership = match (subject, &organization, req.role) {
        (Some(user_id), Some(org), Some(plan)) => {
            let stored = membership_before.as_ref().map(super::stored_membership);
            let write = MembershipWrite {
                user_id,
                org_id: &org.id,
                role: plan.resolve(stored.as_ref()),
                // Only a token that speaks for this tenant may set its role (and its IdP roles).
                idp_roles: plan.from_idp.is_some().then_some(&identity.roles[..]),
                origin: req.origin,
                now: req.now,
            };
            *wrote = true;
            let after = upsert_membership(txn, &write).await?;
            if !after.is_active {
                return Err(StoreError::Refused(Refusal::MembershipInactive));
            }
            if after.created_at == req.now {
                events.push(ev(
                    AuditKind::MembershipCreated,
                    json!({"role": after.role, "role_source": after.role_source, "idp_roles": after.idp_roles}),
                ));
            } else if let Some(before) = membership_before.as_ref().filter(|b| b.role != after.role)
            {
                events.push(ev(
                    AuditKind::RoleChanged,
                    json!({"from": before.role, "to": after.role, "idp_roles": after.idp_roles}),
                ));
            }
            Some(after)
        }
        _ => None,
    };

    // Forwarded only when the organization records it (and so owns it).
    let schema = organization.as_ref().and_then(|o| o.schema_name.clone());
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

pub(super) fn check_org(o: &organizations::Model, issuer: &str) -> Result<(), StoreError> {
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

/// Creates an organization with its tenant schema (when configured); `true` when this call created it,
/// `false` when a concurrent creator's row was found.
pub(super) async fn create_organization(
    txn: &impl ConnectionTrait,
    target: &TenantTarget,
    issuer: &str,
    origin: Origin,
    tenant_schema: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(organizations::Model, bool), StoreError> {
    let (org, created) =
        insert_organization(txn, target, issuer, origin, tenant_schema, now).await?;
    if created && let Some(schema) = &org.schema_name {
        schemas::create(txn, schema).await?;
    }
    Ok((org, created))
}

/// Inserts a new organization; `ON CONFLICT DO NOTHING` covers both a concurrent creator (then its row is
/// read back and checked) and a slug already taken by another organization (then the next candidate).
async fn insert_organization(
    txn: &impl ConnectionTrait,
    target: &TenantTarget,
    issuer: &str,
    origin: Origin,
    tenant_schema: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(organizations::Model, bool), StoreError> {
    for slug in naming::slug_candidates(&target.name, &target.id) {
        let schema_name = match tenant_schema {
            Some(t) => Some(schemas::name_for(t, &slug, &target.id)?),
            None => None,
        };
        let row = organizations::ActiveModel {
            id: Set(target.id.clone()),
            issuer: Set(issuer.to_owned()),
            name: Set(target.name.clone()),
            slug: Set(slug),
            is_active: Set(true),
            metadata: Set(None),
            schema_name: Set(schema_name),
            lifecycle_at: Set(None),
            deactivated_by: Set(None),
            origin: Set(origin.as_str().to_owned()),
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
/// `profile` false: the token is older than the last lifecycle event applied to the row (a webhook told
/// idsync about a newer profile), so only the login time is written.
async fn upsert_user(
    txn: &impl ConnectionTrait,
    id: &str,
    identity: &Identity,
    profile: bool,
    now: DateTime<Utc>,
) -> Result<users::Model, DbErr> {
    users::Entity::insert(user_row(id, identity, now))
        .on_conflict(user_conflict(profile, !identity.roles.is_empty()))
        .exec_with_returning(txn)
        .await
}

/// The row a sync writes for a user.
pub(super) fn user_row(id: &str, identity: &Identity, now: DateTime<Utc>) -> users::ActiveModel {
    users::ActiveModel {
        id: Set(id.to_owned()),
        issuer: Set(identity.issuer.to_string()),
        email: Set(identity.email.as_deref().map(str::to_owned)),
        email_verified: Set(identity.email_verified),
        username: Set(identity.username().map(str::to_owned)),
        name: Set(identity.name.as_deref().map(str::to_owned)),
        given_name: Set(identity.given_name().map(str::to_owned)),
        family_name: Set(identity.family_name().map(str::to_owned)),
        avatar_url: Set(identity.avatar_url().map(str::to_owned)),
        idp_roles: Set(json!(identity.roles)),
        is_active: Set(true),
        last_login_at: Set(Some(now)),
        lifecycle_at: Set(None),
        deactivated_by: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    }
}

/// What an existing user row becomes (see [`upsert_user`]); `roles`: the token carries roles (an empty
/// list is taken for "no roles claim").
pub(super) fn user_conflict(profile: bool, roles: bool) -> OnConflict {
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
    for col in PROFILE.iter().filter(|_| profile) {
        let new = format!(r#"COALESCE("excluded"."{col}", "users"."{col}")"#);
        changed.push(format!(r#""users"."{col}" IS DISTINCT FROM {new}"#));
        sets.push((
            col,
            format!(r#"CASE WHEN {mine} THEN {new} ELSE "users"."{col}" END"#),
        ));
    }
    if profile && roles {
        changed.push(r#""users"."idp_roles" IS DISTINCT FROM "excluded"."idp_roles""#.to_owned());
        sets.push((
            "idp_roles",
            format!(r#"CASE WHEN {mine} THEN "excluded"."idp_roles" ELSE "users"."idp_roles" END"#),
        ));
    }
    if !changed.is_empty() {
        sets.push(("updated_at", format!(r#"CASE WHEN {mine} AND ({}) THEN "excluded"."updated_at" ELSE "users"."updated_at" END"#, changed.join(" OR "))));
    }
    sets.push((
        "last_login_at",
        format!(
            r#"CASE WHEN {mine} THEN "excluded"."last_login_at" ELSE "users"."last_login_at" END"#
        ),
    ));
    OnConflict::column(users::Column::Id)
        .values(
            sets.into_iter()
                .map(|(c, e)| (Alias::new(c), Expr::cust(e))),
        )
        .to_owned()
}

pub(super) struct MembershipWrite<'a> {
    pub user_id: &'a str,
    pub org_id: &'a str,
    /// The role the decision gives, as of the row read before this write.
    pub role: &'a str,
    /// The token's IdP roles when the token speaks for this tenant; `None` when it does not.
    pub idp_roles: Option<&'a [String]>,
    pub origin: Origin,
    pub now: DateTime<Utc>,
}

/// Inserts the membership, or updates it as the decision allows. Provenance is enforced in the statement
/// itself (`role_source = 'idp'`), so an operator's concurrent change is never overwritten; a token that
/// does not speak for the tenant leaves an existing row exactly as it is. `is_active` is never touched
/// (sync never re-activates).
async fn upsert_membership(
    txn: &impl ConnectionTrait,
    w: &MembershipWrite<'_>,
) -> Result<memberships::Model, DbErr> {
    memberships::Entity::insert(membership_row(w))
        .on_conflict(membership_conflict(w.idp_roles.is_some()))
        .exec_with_returning(txn)
        .await
}

pub(super) fn membership_row(w: &MembershipWrite<'_>) -> memberships::ActiveModel {
    memberships::ActiveModel {
        user_id: Set(w.user_id.to_owned()),
        organization_id: Set(w.org_id.to_owned()),
        role: Set(w.role.to_owned()),
        role_source: Set(RoleSource::Idp.as_str().to_owned()),
        idp_roles: Set(json!(w.idp_roles.unwrap_or_default())),
        is_active: Set(true),
        lifecycle_at: Set(None),
        deactivated_by: Set(None),
        origin: Set(w.origin.as_str().to_owned()),
        created_at: Set(w.now),
        updated_at: Set(w.now),
    }
}

/// What an existing membership becomes: `speaks`, the token's roles speak for the tenant.
pub(super) fn membership_conflict(speaks: bool) -> OnConflict {
    let sets: Vec<(&str, String)> = if speaks {
        let idp_owned = r#""memberships"."role_source" = 'idp'"#;
        let role = format!(
            r#"CASE WHEN {idp_owned} THEN "excluded"."role" ELSE "memberships"."role" END"#
        );
        let changed = format!(
            r#"("memberships"."role" IS DISTINCT FROM {role}) OR ("memberships"."idp_roles" IS DISTINCT FROM "excluded"."idp_roles")"#
        );
        vec![
            ("role", role),
            (
                "updated_at",
                format!(
                    r#"CASE WHEN {changed} THEN "excluded"."updated_at" ELSE "memberships"."updated_at" END"#
                ),
            ),
            ("idp_roles", r#""excluded"."idp_roles""#.to_owned()),
        ]
    } else {
        // A no-op update rather than DO NOTHING, so RETURNING gives the existing row on both databases.
        vec![("role", r#""memberships"."role""#.to_owned())]
    };
    OnConflict::columns([
        memberships::Column::UserId,
        memberships::Column::OrganizationId,
    ])
    .values(
        sets.into_iter()
            .map(|(c, e)| (Alias::new(c), Expr::cust(e))),
    )
    .to_owned()
}

pub(super) fn profile_changes(before: Option<&users::Model>, after: &users::Model) -> Value {
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
