//! Group commit's statements: the syncs of a batch of first requests, each decided exactly as
//! `store::sync` decides it alone, but written with one statement per table for the whole batch (three
//! reads, one insert of new organizations, one upsert of users and one of memberships per kind of
//! update, one audit insert in the caller), instead of four or five statements per request. The same
//! guards are in the statements (`issuer = excluded.issuer`, `role_source = 'idp'`), and events still
//! come only from what the writes returned.
//!
//! The batch must have at most one request per user. Anything the single-request path handles by
//! looking again (a slug taken, a row that appeared between read and write and turned out to be foreign
//! or inactive) makes this return `Err`: the caller rolls back and runs each request on its own.

use super::audit::{ACTOR, AuditKind, Event};
use super::bulk;
use super::naming;
use super::schemas;
use super::store::{
    MembershipWrite, Refusal, StoreError, SyncOutcome, SyncRequest, check_org, membership_conflict,
    membership_row, profile_changes, user_conflict, user_row,
};
use entity::{memberships, organizations, users};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, ConnectionTrait, DbErr};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Per request: its outcome and events, or its refusal (decided before anything of its own was written).
pub(super) type Answer<'r> = Result<(SyncOutcome, Vec<Event<'r>>), StoreError>;

fn bail(what: &str) -> StoreError {
    StoreError::Db(DbErr::Custom(format!("group commit: {what}")))
}

pub(super) async fn sync_many<'r>(
    txn: &impl ConnectionTrait,
    reqs: &'r [SyncRequest<'_>],
) -> Result<Vec<Answer<'r>>, StoreError> {
    let subject = |r: &'r SyncRequest<'_>| r.identity.subject.as_ref().map(|s| s.as_str());
    let tenant = |r: &'r SyncRequest<'_>| r.tenant.map(|t| t.id.as_str());

    // Reads: the rows every request may touch, by primary key.
    let user_ids: Vec<&str> = reqs.iter().filter_map(subject).collect();
    if user_ids.len() != user_ids.iter().collect::<HashSet<_>>().len() {
        return Err(bail("a user twice in one batch"));
    }
    let org_ids: Vec<&str> = reqs
        .iter()
        .filter_map(tenant)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let users_before: HashMap<String, users::Model> =
        bulk::find_in::<users::Entity, _>(txn, users::Column::Id, &user_ids)
            .await?
            .into_iter()
            .map(|u| (u.id.clone(), u))
            .collect();
    let mut orgs: HashMap<String, organizations::Model> =
        bulk::find_in::<organizations::Entity, _>(txn, organizations::Column::Id, &org_ids)
            .await?
            .into_iter()
            .map(|o| (o.id.clone(), o))
            .collect();
    let pairs: Vec<(&str, &str)> = reqs
        .iter()
        .filter_map(|r| subject(r).zip(tenant(r)))
        .collect();
    // By user only, then the pairs kept: a user has few memberships, and the lookup can only use an index
    // led by `user_id` (a plan for both columns may pick the organization's index, thousands of rows).
    let pair_set: HashSet<(&str, &str)> = pairs.iter().copied().collect();
    let pair_users: Vec<&str> = pairs.iter().map(|p| p.0).collect();
    let members_before: HashMap<(String, String), memberships::Model> =
        bulk::find_in::<memberships::Entity, _>(txn, memberships::Column::UserId, &pair_users)
            .await?
            .into_iter()
            .filter(|m| pair_set.contains(&(m.user_id.as_str(), m.organization_id.as_str())))
            .map(|m| ((m.user_id.clone(), m.organization_id.clone()), m))
            .collect();

    // Refusals before any write, as `sync_in` makes them.
    let mut answers: Vec<Option<Answer<'r>>> = (0..reqs.len()).map(|_| None).collect();
    for (i, r) in reqs.iter().enumerate() {
        let issuer: &str = &r.identity.issuer;
        let refusal = if let Some(u) = subject(r).and_then(|s| users_before.get(s)) {
            if u.issuer != issuer {
                Some(Refusal::IdentityConflict(format!(
                    "user id is owned by issuer {}",
                    u.issuer
                )))
            } else if !u.is_active {
                Some(Refusal::UserInactive)
            } else {
                None
            }
        } else {
            None
        };
        let refusal = refusal.or_else(|| {
            let o = tenant(r).and_then(|t| orgs.get(t))?;
            match check_org(o, issuer) {
                Err(StoreError::Refused(refusal)) => Some(refusal),
                _ => None,
            }
        });
        let refusal = refusal.or_else(|| {
            let key = (subject(r)?.to_owned(), tenant(r)?.to_owned());
            members_before
                .get(&key)
                .filter(|m| !m.is_active)
                .map(|_| Refusal::MembershipInactive)
        });
        if let Some(refusal) = refusal {
            answers[i] = Some(Err(StoreError::Refused(refusal)));
        }
    }
    let live = |answers: &[Option<Answer<'r>>]| -> Vec<usize> {
        (0..answers.len())
            .filter(|i| answers[*i].is_none())
            .collect()
    };
    let mut events: Vec<Vec<Event<'r>>> = (0..reqs.len()).map(|_| Vec::new()).collect();
    let ev = |r: &'r SyncRequest<'_>, kind: AuditKind, details: Value| Event {
        kind,
        issuer: Some(&r.identity.issuer),
        user: subject(r),
        organization: tenant(r),
        actor: ACTOR,
        details,
        at: r.now,
    };

    // Organizations no one has yet: one insert, the first request naming each one creating it. Every
    // write takes its rows in key order, so batches written at the same time that share rows wait for
    // each other in one order and never deadlock.
    let mut creators: BTreeMap<&str, usize> = BTreeMap::new();
    for i in live(&answers) {
        if let Some(t) = reqs[i].tenant
            && !orgs.contains_key(&t.id)
        {
            creators.entry(t.id.as_str()).or_insert(i);
        }
    }
    if !creators.is_empty() {
        let mut rows = Vec::new();
        for &i in creators.values() {
            let r = &reqs[i];
            let target = r.tenant.expect("creators name a tenant");
            let [slug, _] = naming::slug_candidates(&target.name, &target.id);
            let schema_name = match r.tenant_schema {
                Some(t) => Some(schemas::name_for(t, &slug, &target.id)?),
                None => None,
            };
            rows.push(organizations::ActiveModel {
                id: Set(target.id.clone()),
                issuer: Set(r.identity.issuer.to_string()),
                name: Set(target.name.clone()),
                slug: Set(slug),
                is_active: Set(true),
                metadata: Set(None),
                schema_name: Set(schema_name),
                lifecycle_at: Set(None),
                deactivated_by: Set(None),
                origin: Set(r.origin.as_str().to_owned()),
                created_at: Set(r.now),
                updated_at: Set(r.now),
            });
        }
        let created =
            bulk::insert_returning(txn, rows, Some(OnConflict::new().do_nothing().to_owned()))
                .await?;
        for org in created {
            let i = creators[org.id.as_str()];
            if let Some(schema) = &org.schema_name {
                schemas::create(txn, schema).await?;
            }
            events[i].push(ev(
                &reqs[i],
                AuditKind::OrganizationCreated,
                json!({"name": org.name, "slug": org.slug, "schema": org.schema_name}),
            ));
            orgs.insert(org.id.clone(), org);
        }
        // Not created: made meanwhile by another transaction, or its slug is taken (which the request
        // alone resolves with its next candidate).
        let missing: Vec<&str> = creators
            .keys()
            .copied()
            .filter(|id| !orgs.contains_key(*id))
            .collect();
        if !missing.is_empty() {
            for o in
                bulk::find_in::<organizations::Entity, _>(txn, organizations::Column::Id, &missing)
                    .await?
            {
                orgs.insert(o.id.clone(), o);
            }
            if missing.iter().any(|id| !orgs.contains_key(*id)) {
                return Err(bail("an organization's slug is taken"));
            }
        }
        for i in live(&answers) {
            if let Some(o) = tenant(&reqs[i]).and_then(|t| orgs.get(t))
                && let Err(StoreError::Refused(refusal)) = check_org(o, &reqs[i].identity.issuer)
            {
                answers[i] = Some(Err(StoreError::Refused(refusal)));
            }
        }
    }

    // Users: in key order, one upsert per run of the same kind of update (usually one in all). Runs,
    // not one statement per kind: two batches holding the same users under different kinds would
    // otherwise each lock one first.
    let mut after_users: HashMap<String, users::Model> = HashMap::new();
    let mut writes: Vec<(usize, (bool, bool))> = Vec::new();
    for i in live(&answers) {
        let r = &reqs[i];
        let Some(id) = subject(r) else { continue };
        // A token issued before the last lifecycle event applied to the user keeps its older profile out.
        let older = match (users_before.get(id), r.issued_at) {
            (Some(u), Some(iat)) => u.lifecycle_at.is_some_and(|l| iat < l),
            _ => false,
        };
        writes.push((i, (!older, !r.identity.roles.is_empty())));
    }
    writes.sort_by_key(|&(i, _)| subject(&reqs[i]));
    for run in writes.chunk_by(|a, b| a.1 == b.1) {
        let (profile, roles) = run[0].1;
        let rows = run.iter().map(|&(i, _)| {
            let r = &reqs[i];
            user_row(subject(r).expect("user writes have one"), r.identity, r.now)
        });
        for u in
            bulk::insert_returning(txn, rows.collect(), Some(user_conflict(profile, roles))).await?
        {
            after_users.insert(u.id.clone(), u);
        }
    }
    for i in live(&answers) {
        let r = &reqs[i];
        let Some(id) = subject(r) else { continue };
        let after = after_users
            .get(id)
            .ok_or_else(|| bail("a user row was not returned"))?;
        if after.issuer != *r.identity.issuer {
            // Appeared between the read and the write: the request alone refuses it cleanly.
            return Err(bail("a user row turned out to be another issuer's"));
        }
        if after.created_at == r.now {
            events[i].push(ev(
                r,
                AuditKind::UserCreated,
                json!({"email": after.email, "name": after.name}),
            ));
        } else if after.updated_at == r.now {
            let changes = profile_changes(users_before.get(id), after);
            events[i].push(ev(
                r,
                AuditKind::ProfileUpdated,
                json!({"changes": changes}),
            ));
        }
    }

    // Memberships: in key order, one upsert per run of the same kind (the token speaks for the tenant
    // or not).
    let mut roles: Vec<Option<String>> = vec![None; reqs.len()];
    let mut writes: Vec<(usize, bool)> = Vec::new();
    for i in live(&answers) {
        let r = &reqs[i];
        let (Some(user), Some(org), Some(plan)) = (subject(r), tenant(r), r.role) else {
            continue;
        };
        let stored = members_before
            .get(&(user.to_owned(), org.to_owned()))
            .map(super::stored_membership);
        roles[i] = Some(plan.resolve(stored.as_ref()).to_owned());
        writes.push((i, plan.from_idp.is_some()));
    }
    writes.sort_by_key(|&(i, _)| (subject(&reqs[i]), tenant(&reqs[i])));
    let mut after_members: HashMap<(String, String), memberships::Model> = HashMap::new();
    for run in writes.chunk_by(|a, b| a.1 == b.1) {
        let speaks = run[0].1;
        let rows: Vec<memberships::ActiveModel> = run
            .iter()
            .map(|&(i, _)| {
                let r = &reqs[i];
                membership_row(&MembershipWrite {
                    user_id: subject(r).expect("membership writes have users"),
                    org_id: tenant(r).expect("membership writes have tenants"),
                    role: roles[i].as_deref().expect("membership writes have roles"),
                    idp_roles: speaks.then_some(&r.identity.roles[..]),
                    origin: r.origin,
                    now: r.now,
                })
            })
            .collect();
        for m in bulk::insert_returning(txn, rows, Some(membership_conflict(speaks))).await? {
            after_members.insert((m.user_id.clone(), m.organization_id.clone()), m);
        }
    }

    // Outcomes, from what the writes returned.
    for i in 0..reqs.len() {
        if answers[i].is_some() {
            continue;
        }
        let r = &reqs[i];
        let user = subject(r).and_then(|id| after_users.get(id)).cloned();
        let organization = tenant(r).and_then(|t| orgs.get(t)).cloned();
        let membership = match (subject(r), tenant(r), roles[i].is_some()) {
            (Some(u), Some(o), true) => {
                let key = (u.to_owned(), o.to_owned());
                let after = after_members
                    .get(&key)
                    .ok_or_else(|| bail("a membership row was not returned"))?;
                if !after.is_active {
                    return Err(bail("a membership turned out to be inactive"));
                }
                if after.created_at == r.now {
                    events[i].push(ev(
                        r,
                        AuditKind::MembershipCreated,
                        json!({"role": after.role, "role_source": after.role_source, "idp_roles": after.idp_roles}),
                    ));
                } else if let Some(before) =
                    members_before.get(&key).filter(|b| b.role != after.role)
                {
                    events[i].push(ev(
                        r,
                        AuditKind::RoleChanged,
                        json!({"from": before.role, "to": after.role, "idp_roles": after.idp_roles}),
                    ));
                }
                Some(after.clone())
            }
            _ => None,
        };
        let schema = organization.as_ref().and_then(|o| o.schema_name.clone());
        answers[i] = Some(Ok((
            SyncOutcome {
                user,
                organization,
                membership,
                schema,
            },
            std::mem::take(&mut events[i]),
        )));
    }
    Ok(answers
        .into_iter()
        .map(|a| a.expect("every request answered"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ClaimPath, Dialect, MappingRules, Origin, map_claims};
    use chrono::DurationRound;
    use sea_orm::{Database, Statement, TransactionTrait};
    use std::time::Duration;

    fn identity(sub: &str, roles: &[&str]) -> crate::identity::Identity {
        let rules = MappingRules {
            dialect: Dialect::Generic,
            tenant_claim: ClaimPath::new("tenant_id").unwrap(),
            roles_claim: ClaimPath::new("roles").unwrap(),
            id_prefix: None,
        };
        let claims = json!({"sub": sub, "email": format!("{sub}@example.com"), "roles": roles});
        map_claims(
            "https://idp.example.com",
            claims.as_object().unwrap(),
            &rules,
        )
        .unwrap()
    }

    fn request(identity: &crate::identity::Identity) -> SyncRequest<'_> {
        SyncRequest {
            identity,
            tenant: None,
            role: None,
            origin: Origin::Idp,
            tenant_schema: None,
            now: chrono::Utc::now()
                .duration_trunc(chrono::TimeDelta::microseconds(1))
                .unwrap(),
            issued_at: None,
        }
    }

    async fn write(
        db: &sea_orm::DatabaseConnection,
        reqs: &[SyncRequest<'_>],
    ) -> Result<(), StoreError> {
        let txn = db.begin().await?;
        for answer in sync_many(&txn, reqs).await? {
            answer?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Two batches that hold the same users under different kinds of update (one token with roles, one
    /// without) lock them in one order. They did not: each kind was its own statement, in kind order, so
    /// batch A locked `u2` (its no-roles kind) while B locked `u1`, and each then waited for the other
    /// until PostgreSQL's deadlock detector failed one. Here a third transaction holds both rows while the
    /// two batches queue on them, then lets go. (PostgreSQL only: SQLite has one writer.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_holding_the_same_users_under_different_kinds_never_deadlock() {
        let Some((db, Some((admin, name)), _dir)) = bulk::tests::databases().await.pop() else {
            eprintln!("IDSYNC_TEST_POSTGRES_URL is not set: not run");
            return;
        };
        let (u1_roles, u2_plain) = (identity("u1", &["admin"]), identity("u2", &[]));
        let (u1_plain, u2_roles) = (identity("u1", &[]), identity("u2", &["admin"]));
        write(&db, &[request(&u1_plain), request(&u2_plain)])
            .await
            .unwrap();

        let holder = db.begin().await.unwrap();
        holder
            .execute_unprepared("SELECT id FROM users WHERE id IN ('u1', 'u2') FOR UPDATE")
            .await
            .unwrap();
        let a = [request(&u1_roles), request(&u2_plain)];
        let b = [request(&u1_plain), request(&u2_roles)];
        let release = async {
            // Until both batches wait on the held rows (or 10 s).
            let started = std::time::Instant::now();
            let mut most = 0;
            while started.elapsed() < Duration::from_secs(10) {
                let waiting = db
                    .query_one_raw(Statement::from_string(
                        sea_orm::DatabaseBackend::Postgres,
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    ))
                    .await
                    .unwrap()
                    .unwrap()
                    .try_get_by_index::<i64>(0)
                    .unwrap();
                most = most.max(waiting);
                if waiting >= 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            holder.rollback().await.unwrap();
            most
        };
        let (ra, rb, most) = tokio::join!(write(&db, &a), write(&db, &b), release);
        assert_eq!(most, 2, "both batches waited on the held rows");
        assert!(ra.is_ok() && rb.is_ok(), "{ra:?} / {rb:?}");

        db.close().await.unwrap();
        let conn = Database::connect(&admin).await.unwrap();
        conn.execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
    }
}
