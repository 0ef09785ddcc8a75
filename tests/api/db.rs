//! Test databases: a SQLite file in a temp dir always; a fresh PostgreSQL database per test when
//! `IDSYNC_TEST_POSTGRES_URL` is set (CI sets it), dropped when the test ends.

use sea_orm::{
    ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, TransactionTrait,
};

pub struct TestDb {
    pub url: String,
    pub is_postgres: bool,
    /// (admin URL, database name) to drop on exit.
    pg: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

/// Runs a scenario on SQLite and, when configured, on PostgreSQL, as two tests `sqlite` and `postgres`.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::db::TestDb::sqlite()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                match $crate::db::TestDb::postgres().await {
                    Some(db) => super::$name(db).await,
                    None => eprintln!("IDSYNC_TEST_POSTGRES_URL is not set: PostgreSQL variant not run"),
                }
            }
        }
    )*};
}

impl TestDb {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/idsync.db?mode=rwc", dir.path().display());
        Self {
            url,
            is_postgres: false,
            pg: None,
            _dir: Some(dir),
        }
    }

    pub async fn postgres() -> Option<Self> {
        let admin = std::env::var("IDSYNC_TEST_POSTGRES_URL").ok()?;
        let name = format!("idsync_test_{}", uuid::Uuid::new_v4().simple());
        let conn = Database::connect(&admin)
            .await
            .expect("IDSYNC_TEST_POSTGRES_URL must reach PostgreSQL");
        conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        conn.close().await.ok();
        let mut url = url::Url::parse(&admin).unwrap();
        url.set_path(&format!("/{name}"));
        Some(Self {
            url: url.to_string(),
            is_postgres: true,
            pg: Some((admin, name)),
            _dir: None,
        })
    }

    pub async fn connect(&self) -> DatabaseConnection {
        Database::connect(&self.url).await.unwrap()
    }

    /// Blocks idsync's writes (not its reads) until the hold is released: on SQLite by holding the
    /// write lock, on PostgreSQL by locking `users` against inserts. A burst sent meanwhile queues up
    /// behind the blocked writer, so what is batched does not depend on how fast this machine is.
    pub async fn hold_writes(&self) -> WriteHold {
        let conn = self.connect().await;
        if !self.is_postgres {
            conn.execute_unprepared("CREATE TABLE IF NOT EXISTS test_write_hold (x INTEGER)")
                .await
                .unwrap();
        }
        let txn = conn.begin().await.unwrap();
        let sql = if self.is_postgres {
            "LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE"
        } else {
            "INSERT INTO test_write_hold VALUES (1)"
        };
        txn.execute_unprepared(sql).await.unwrap();
        WriteHold { txn, _conn: conn }
    }
}

pub struct WriteHold {
    txn: DatabaseTransaction,
    _conn: DatabaseConnection,
}

impl WriteHold {
    pub async fn release(self) {
        self.txn.rollback().await.unwrap();
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg.take() {
            // Drop runs inside a runtime; a separate thread with its own runtime may block.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(conn) = Database::connect(&admin).await {
                        let _ = conn
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}
