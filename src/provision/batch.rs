//! Group commit for first requests: syncs that miss the cache are queued and written a batch at a time
//! (`store::sync_batch`), so a burst of new identities costs one transaction, one audit insert and one
//! commit per batch instead of per identity. A batch is what is queued when a writer is free; under load
//! a writer waits up to `WINDOW` for more (up to `MAX_BATCH`), while a lone request goes at once.
//! PostgreSQL gets several writers (batches in parallel on the pool), SQLite one (its single writer).

use super::store::{self, StoreError, SyncOutcome, SyncRequest, TenantTarget};
use crate::identity::{Identity, Origin, RolePlan};
use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, mpsc, oneshot};

const MAX_BATCH: usize = 64;
const WINDOW: Duration = Duration::from_millis(1);
const QUEUE: usize = 4096;

/// One queued sync, owning what the request borrowed.
pub(super) struct Job {
    pub identity: Identity,
    pub tenant: Option<TenantTarget>,
    pub role: Option<RolePlan>,
    pub origin: Origin,
    pub now: DateTime<Utc>,
    pub issued_at: Option<DateTime<Utc>>,
    pub reply: oneshot::Sender<Result<SyncOutcome, StoreError>>,
}

pub(super) struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts `writers` writer tasks on `db`. They stop when the batcher is dropped.
    pub fn start(db: DatabaseConnection, tenant_schema: Option<String>, writers: usize) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let tenant_schema: Arc<Option<String>> = Arc::new(tenant_schema);
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(db.clone(), rx.clone(), tenant_schema.clone()));
        }
        Self { tx }
    }

    /// Queues `job`'s sync and waits for its outcome.
    pub async fn sync(&self, job: Job) -> Result<SyncOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { reply, ..job };
        if self.tx.send(job).await.is_err() {
            return Err(StoreError::Db(sea_orm::DbErr::Custom(
                "the sync writer stopped".into(),
            )));
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Db(sea_orm::DbErr::Custom(
                "the sync writer stopped".into(),
            )))
        })
    }
}

async fn write_batches(
    db: DatabaseConnection,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    tenant_schema: Arc<Option<String>>,
) {
    let mut last_size = 0;
    loop {
        let mut jobs = Vec::new();
        {
            // One writer gathers at a time; the others are writing meanwhile.
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            jobs.push(first);
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            // Busy lately: give a burst a moment to arrive and share the commit.
            if last_size > 1 && jobs.len() < MAX_BATCH {
                let deadline = tokio::time::Instant::now() + WINDOW;
                while jobs.len() < MAX_BATCH {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(j)) => jobs.push(j),
                        _ => break,
                    }
                }
            }
        }
        last_size = jobs.len();
        metrics::histogram!("idsync_sync_batch_size").record(jobs.len() as f64);
        let requests: Vec<SyncRequest<'_>> = jobs
            .iter()
            .map(|j| SyncRequest {
                identity: &j.identity,
                tenant: j.tenant.as_ref(),
                role: j.role.as_ref(),
                origin: j.origin,
                tenant_schema: tenant_schema.as_deref(),
                now: j.now,
                issued_at: j.issued_at,
            })
            .collect();
        let results = store::sync_batch(&db, &requests).await;
        drop(requests);
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
    }
}
