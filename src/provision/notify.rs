//! Telling every replica about a change at once (PostgreSQL `LISTEN/NOTIFY`): an operator's change,
//! a webhook, a logout or a reconcile run on one replica (or from the CLI) invalidates the matching cache
//! entries everywhere within a second, instead of waiting out `--sync-cache-ttl`. A replica whose
//! listening connection dropped may have missed notices: when it is back it flushes its caches (and the
//! TTL bounds staleness meanwhile). SQLite is single-process: nothing to tell.

use super::Affected;
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, Statement};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub const CHANNEL: &str = "idsync_changes";

/// PostgreSQL refuses payloads of 8000 bytes or more; notices are batched under that.
const MAX_PAYLOAD: usize = 7000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Notice {
    User {
        u: String,
    },
    Organization {
        t: String,
    },
    Membership {
        u: String,
        t: String,
    },
    /// The revocation set changed: reload it.
    Revocations,
}

impl From<&Affected> for Notice {
    fn from(a: &Affected) -> Self {
        match a {
            Affected::User(u) => Notice::User { u: u.clone() },
            Affected::Organization(t) => Notice::Organization { t: t.clone() },
            Affected::Membership(u, t) => Notice::Membership {
                u: u.clone(),
                t: t.clone(),
            },
        }
    }
}

/// What a listening replica hears.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heard {
    Notice(Notice),
    /// The connection was (re)established: notices may have been missed; flush everything.
    Missed,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    /// The sending process, so it does not act on its own notices twice.
    o: String,
    n: Vec<Notice>,
}

/// Publishes notices on PostgreSQL (nothing on SQLite). `origin` identifies the sending process.
pub async fn publish(
    db: &DatabaseConnection,
    origin: &str,
    notices: &[Notice],
) -> Result<(), DbErr> {
    if db.get_database_backend() != DatabaseBackend::Postgres || notices.is_empty() {
        return Ok(());
    }
    let mut batch: Vec<Notice> = Vec::new();
    let mut size = 0;
    for n in notices {
        let len = serde_json::to_string(n).map(|s| s.len()).unwrap_or(0) + 1;
        if size + len > MAX_PAYLOAD && !batch.is_empty() {
            send(db, origin, std::mem::take(&mut batch)).await?;
            size = 0;
        }
        size += len;
        batch.push(n.clone());
    }
    send(db, origin, batch).await
}

async fn send(db: &DatabaseConnection, origin: &str, n: Vec<Notice>) -> Result<(), DbErr> {
    if n.is_empty() {
        return Ok(());
    }
    let payload = serde_json::to_string(&Envelope {
        o: origin.to_owned(),
        n,
    })
    .map_err(|e| DbErr::Custom(e.to_string()))?;
    db.execute_raw(Statement::from_sql_and_values(
        DatabaseBackend::Postgres,
        "SELECT pg_notify($1, $2)",
        [CHANNEL.into(), payload.into()],
    ))
    .await
    .map(|_| ())
}

/// Listens on a dedicated connection until aborted, calling `on` for every notice from another process
/// and with [`Heard::Missed`] after every reconnection, and after a first connection that took retries
/// (only one made at once follows start-up closely enough to have missed nothing).
pub async fn listen(url: String, origin: String, on: impl Fn(Heard) + Send + Sync + 'static) {
    use sea_orm::sqlx::postgres::PgListener;
    let mut backoff = Duration::from_millis(200);
    let mut first = true;
    loop {
        let mut listener = match PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for changes from other replicas; retrying");
                first = false;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "cannot listen for changes from other replicas; retrying");
            first = false;
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(200);
        metrics::counter!("idsync_notify_connections_total").increment(1);
        if !std::mem::take(&mut first) {
            on(Heard::Missed);
        }
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    let Ok(env) = serde_json::from_str::<Envelope>(n.payload()) else {
                        tracing::debug!("ignoring a change notice that is not idsync's");
                        continue;
                    };
                    if env.o == origin {
                        continue;
                    }
                    metrics::counter!("idsync_notify_received_total").increment(env.n.len() as u64);
                    for notice in env.n {
                        on(Heard::Notice(notice));
                    }
                }
                // The connection dropped. Reconnect from scratch, so the flush (`Missed`) comes after
                // listening again and covers everything sent while it was down.
                Ok(None) => {
                    tracing::warn!("lost the change-notice connection; reconnecting");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the change-notice connection failed; reconnecting");
                    break;
                }
            }
        }
    }
}
