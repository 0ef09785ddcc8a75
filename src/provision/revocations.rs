//! Revoked sessions and users in the database, so every replica refuses them (OIDC Back-Channel Logout
//! 1.0 section 2.7), and the ids of logout tokens already used (section 2.6, replay). Rows expire: a
//! revocation matters only as long as tokens issued before it can still be presented.

use chrono::{DateTime, Utc};
use entity::revocations;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, TransactionTrait,
};

/// What is refused.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Revoked {
    /// Every token carrying this session id.
    Session(String),
    /// Every token of this user issued (`iat`) before `not_before` (Unix seconds).
    User { sub: String, not_before: i64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub issuer: String,
    pub revoked: Revoked,
    pub expires_at: DateTime<Utc>,
}

impl Revocation {
    fn row(&self, now: DateTime<Utc>) -> revocations::ActiveModel {
        let (kind, value, not_before) = match &self.revoked {
            Revoked::Session(sid) => ("sid", sid.clone(), None),
            Revoked::User { sub, not_before } => ("sub", sub.clone(), Some(*not_before)),
        };
        revocations::ActiveModel {
            issuer: Set(self.issuer.clone()),
            kind: Set(kind.to_owned()),
            value: Set(value),
            not_before: Set(not_before),
            expires_at: Set(self.expires_at),
            created_at: Set(now),
        }
    }
}

/// A logout token's id, kept until it could no longer be replayed (its `exp`).
pub struct UsedToken<'a> {
    pub issuer: &'a str,
    pub jti: &'a str,
    pub until: DateTime<Utc>,
}

/// Records `revocations` for a logout token, in one transaction with its `jti`. Returns `false`, with
/// nothing recorded, when that `jti` was used before (a replay).
pub async fn record_logout(
    db: &DatabaseConnection,
    used: &UsedToken<'_>,
    revocations: &[Revocation],
) -> Result<bool, DbErr> {
    let now = Utc::now();
    let txn = db
        .begin_with_options(super::store::write_transaction())
        .await?;
    let fresh = revocations::Entity::insert(revocations::ActiveModel {
        issuer: Set(used.issuer.to_owned()),
        kind: Set("jti".into()),
        value: Set(used.jti.to_owned()),
        not_before: Set(None),
        expires_at: Set(used.until),
        created_at: Set(now),
    })
    .on_conflict(
        OnConflict::columns([
            revocations::Column::Issuer,
            revocations::Column::Kind,
            revocations::Column::Value,
        ])
        .do_nothing()
        .to_owned(),
    )
    .exec_without_returning(&txn)
    .await?;
    if fresh == 0 {
        txn.rollback().await?;
        return Ok(false);
    }
    record(&txn, revocations, now).await?;
    txn.commit().await?;
    Ok(true)
}

const WIDER_NOT_BEFORE: &str = r#"CASE WHEN "excluded"."not_before" > "revocations"."not_before" THEN "excluded"."not_before" ELSE "revocations"."not_before" END"#;
const LATER_EXPIRY: &str = r#"CASE WHEN "excluded"."expires_at" > "revocations"."expires_at" THEN "excluded"."expires_at" ELSE "revocations"."expires_at" END"#;

/// Records revocations (a session ended by a webhook, say); a repeat widens, never narrows, one.
pub async fn record(
    db: &impl ConnectionTrait,
    revocations: &[Revocation],
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    for r in revocations {
        revocations::Entity::insert(r.row(now))
            .on_conflict(
                OnConflict::columns([
                    revocations::Column::Issuer,
                    revocations::Column::Kind,
                    revocations::Column::Value,
                ])
                // The later cut-off and the later expiry of the two: a logout delivered late or twice
                // never shortens what an earlier one revoked.
                .values([
                    (revocations::Column::NotBefore, Expr::cust(WIDER_NOT_BEFORE)),
                    (revocations::Column::ExpiresAt, Expr::cust(LATER_EXPIRY)),
                ])
                .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// Every revocation still in force.
pub async fn live(db: &impl ConnectionTrait, now: DateTime<Utc>) -> Result<Vec<Revocation>, DbErr> {
    let rows = revocations::Entity::find()
        .filter(revocations::Column::ExpiresAt.gt(now))
        .filter(revocations::Column::Kind.ne("jti"))
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let revoked = match (r.kind.as_str(), r.not_before) {
                ("sid", _) => Revoked::Session(r.value),
                ("sub", Some(not_before)) => Revoked::User {
                    sub: r.value,
                    not_before,
                },
                _ => return None,
            };
            Some(Revocation {
                issuer: r.issuer,
                revoked,
                expires_at: r.expires_at,
            })
        })
        .collect())
}

/// Drops rows past their expiry.
pub async fn purge(db: &impl ConnectionTrait, now: DateTime<Utc>) -> Result<u64, DbErr> {
    Ok(revocations::Entity::delete_many()
        .filter(revocations::Column::ExpiresAt.lte(now))
        .exec(db)
        .await?
        .rows_affected)
}
