//! `users.last_login_at`, written at most once per interval per user, off the request path: requests only
//! note the time in memory; a background task writes the batch, and shutdown flushes what is pending.

use super::store::write_transaction;
use chrono::{DateTime, Utc};
use entity::users;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, ExprTrait, QueryFilter, TransactionTrait,
};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::Duration;

pub struct LastSeen {
    interval_secs: i64,
    pending: Mutex<HashMap<String, DateTime<Utc>>>,
}

/// When a synced identity's last login was last written or queued, kept in its sync-cache entry rather
/// than in a cache of its own (which cost a lookup per request and about 300 bytes per user).
#[derive(Debug)]
pub struct Stamp(AtomicI64);

impl Stamp {
    pub fn written_at(now: DateTime<Utc>) -> Self {
        Self(AtomicI64::new(now.timestamp()))
    }
}

impl LastSeen {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval_secs: interval.as_secs() as i64,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// A request by `user` happened now; queue a write if none was made within the interval. Of several
    /// concurrent requests, only the one that moves the stamp queues.
    pub fn touch(&self, stamp: &Stamp, user: &str, now: DateTime<Utc>) {
        let (then, now_secs) = (stamp.0.load(Relaxed), now.timestamp());
        if now_secs - then < self.interval_secs
            || stamp
                .0
                .compare_exchange(then, now_secs, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        if let Ok(mut p) = self.pending.lock() {
            p.insert(user.to_owned(), now);
        }
    }

    /// Writes every queued time in one transaction; a time never moves `last_login_at` backwards.
    /// On failure the batch is queued again.
    pub async fn flush(&self, db: &DatabaseConnection) -> Result<usize, sea_orm::DbErr> {
        let batch: HashMap<String, DateTime<Utc>> = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return Ok(0),
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let result = async {
            let txn = db.begin_with_options(write_transaction()).await?;
            for (user, at) in &batch {
                users::Entity::update_many()
                    .col_expr(users::Column::LastLoginAt, Expr::value(*at))
                    .filter(users::Column::Id.eq(user.as_str()))
                    .filter(
                        users::Column::LastLoginAt
                            .is_null()
                            .or(users::Column::LastLoginAt.lt(*at)),
                    )
                    .exec(&txn)
                    .await?;
            }
            txn.commit().await
        }
        .await;
        match result {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                if let Ok(mut p) = self.pending.lock() {
                    for (user, at) in batch {
                        p.entry(user).or_insert(at);
                    }
                }
                Err(e)
            }
        }
    }
}
