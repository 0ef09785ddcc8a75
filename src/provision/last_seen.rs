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
    /// Milliseconds: whole seconds would let two requests a few milliseconds apart, on either side of a
    /// second boundary, count as an interval of one second.
    interval_ms: i64,
    pending: Mutex<HashMap<String, DateTime<Utc>>>,
}

/// When a synced identity's last login was last written or queued, kept in its sync-cache entry rather
/// than in a cache of its own (which cost a lookup per request and about 300 bytes per user).
#[derive(Debug)]
pub struct Stamp(AtomicI64);

impl Stamp {
    pub fn written_at(now: DateTime<Utc>) -> Self {
        Self(AtomicI64::new(now.timestamp_millis()))
    }
}

impl LastSeen {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval_ms: interval.as_millis() as i64,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// A request by `user` happened now; queue a write if none was made within the interval. Of several
    /// concurrent requests, only the one that moves the stamp queues.
    pub fn touch(&self, stamp: &Stamp, user: &str, now: DateTime<Utc>) {
        let (then, now_ms) = (stamp.0.load(Relaxed), now.timestamp_millis());
        if now_ms - then < self.interval_ms
            || stamp
                .0
                .compare_exchange(then, now_ms, Relaxed, Relaxed)
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn requests_either_side_of_a_second_boundary_do_not_make_an_interval() {
        let seen = LastSeen::new(Duration::from_secs(1));
        let at = |ms| Utc.timestamp_millis_opt(ms).unwrap();
        let stamp = Stamp::written_at(at(10_990));
        seen.touch(&stamp, "u", at(11_010));
        assert!(
            seen.pending.lock().unwrap().is_empty(),
            "20 ms is not a second"
        );
        seen.touch(&stamp, "u", at(11_990));
        assert_eq!(
            seen.pending.lock().unwrap().len(),
            1,
            "a whole second later it is"
        );
    }
}
