//! `users.last_login_at`, written at most once per interval per user, off the request path: requests only
//! note the time in memory; a background task writes the batch, and shutdown flushes what is pending.

use super::store::write_transaction;
use chrono::{DateTime, Utc};
use entity::users;
use moka::sync::Cache;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, ExprTrait, QueryFilter, TransactionTrait,
};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

pub struct LastSeen {
    /// Users whose last login was written (or queued) within the interval.
    recent: Cache<String, ()>,
    pending: Mutex<HashMap<String, DateTime<Utc>>>,
}

impl LastSeen {
    pub fn new(interval: Duration, capacity: u64) -> Self {
        Self {
            recent: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(interval)
                .build(),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// A request by `user` happened now; queue a write if none was made within the interval.
    pub fn touch(&self, user: &str, now: DateTime<Utc>) {
        if self.recent.contains_key(user) {
            return;
        }
        self.recent.insert(user.to_owned(), ());
        if let Ok(mut p) = self.pending.lock() {
            p.insert(user.to_owned(), now);
        }
    }

    /// The sync transaction just wrote `last_login_at` for `user`.
    pub fn written(&self, user: &str) {
        self.recent.insert(user.to_owned(), ());
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
