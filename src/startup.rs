//! The composition root: the one place that reads all of [`Settings`], connects the database, runs
//! migrations, builds the key caches and the pipeline, binds both listeners and owns background tasks.

use crate::access::{Gatekeeper, IssuerRegistry, LifecycleOptions, OnDbError};
use crate::config::Settings;
use crate::directory::Directory;
use crate::http::admin::{self, AdminState};
use crate::http::admin_api::ApiState;
use crate::http::headers::HeaderNames;
use crate::http::proxy::Upstream;
use crate::http::{self as edge, AppState};
use crate::oidc::IdpClient;
use crate::provision::Provisioner;
use anyhow::Context;
use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, Database, DatabaseConnection};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub struct Application {
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    state: Arc<AppState>,
    admin: AdminState,
    api: ApiState,
    background: Vec<JoinHandle<()>>,
    shutdown_timeout: Duration,
    header_read_timeout: Duration,
}

/// Connects with pool limits that fail fast: a request waiting on a dead database gets 503 in seconds.
/// `lazy` opens no connection now (pass mode starts without its database).
pub async fn connect_database(
    settings: &Settings,
    lazy: bool,
) -> anyhow::Result<DatabaseConnection> {
    let url = settings.database_url.expose();
    let mut opts = ConnectOptions::new(url.to_owned());
    let max = if url.contains(":memory:") {
        1
    } else {
        settings.database_max_connections
    };
    // SQLite: WAL lets readers run beside the one writer; synchronous=NORMAL is crash-consistent in WAL
    // mode and may only lose the last commits on power loss (sync re-creates them on the next request).
    opts.map_sqlx_sqlite_opts(|o| {
        o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
    });
    // Group commit's statements take a batch's rows as arrays (`provision::bulk`), whose length a generic
    // plan cannot know: PostgreSQL would then keep planning each execution afresh (a custom plan looks
    // cheaper than one for a guessed 100 rows), costing more CPU than the statement itself. idsync's
    // queries are all lookups by key, for which the generic plan is the custom plan. Not asked for with
    // no statements kept: a statement prepared anew is planned anew anyway, and a pooler (the reason for
    // 0) may refuse the startup parameter.
    let statement_cache = settings.database_statement_cache;
    opts.map_sqlx_postgres_opts(move |o| {
        let o = o.statement_cache_capacity(statement_cache);
        if statement_cache > 0 {
            o.options([
                ("plan_cache_mode", "force_generic_plan"),
                ("enable_seqscan", "off"),
            ])
        } else {
            o
        }
    });
    opts.max_connections(max)
        .min_connections(0)
        .connect_timeout(settings.database_timeout)
        .acquire_timeout(settings.database_timeout)
        .connect_lazy(lazy)
        .sqlx_logging(false);
    if lazy && settings.database_url.is_sqlite() {
        // sea-orm's SQLite connector asks the server version even when lazy; build the lazy pool here.
        use sea_orm::sqlx::ConnectOptions as _;
        use sea_orm::sqlx::sqlite::SqliteConnectOptions;
        let sqlite: SqliteConnectOptions = url
            .parse::<SqliteConnectOptions>()
            .with_context(|| format!("the database URL {}", settings.database_url))?
            .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .disable_statement_logging();
        let pool = opts
            .sqlx_pool_options::<sea_orm::sqlx::Sqlite>()
            .connect_lazy_with(sqlite);
        return Ok(sea_orm::SqlxSqliteConnector::from_sqlx_sqlite_pool(pool));
    }
    Database::connect(opts)
        .await
        .with_context(|| format!("cannot connect to the database {}", settings.database_url))
}

/// Reloads the revocation set now and then (a safety net under the change notices, and the only way
/// revocations made elsewhere reach a replica on SQLite) and purges expired rows.
async fn keep_revocations(gatekeeper: Arc<Gatekeeper>) {
    let mut ticks = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        gatekeeper.reload_revocations().await;
        ticks += 1;
        if ticks.is_multiple_of(20)
            && let Err(e) = crate::provision::revocations::purge(
                gatekeeper.provisioner().db(),
                chrono::Utc::now(),
            )
            .await
        {
            tracing::debug!(error = %e, "could not purge expired revocations");
        }
    }
}

/// Migrations per `--migrate`: applied (auto), or checked to be applied (skip); then tenant schemas made
/// before names were recorded are recorded.
async fn prepare_schema(
    db: &DatabaseConnection,
    migrate: bool,
    tenant_schema: Option<&str>,
) -> anyhow::Result<()> {
    if migrate {
        Migrator::up(db, None)
            .await
            .context("database migrations failed")?;
    } else if !Migrator::get_pending_migrations(db)
        .await
        .context("cannot read migration status")?
        .is_empty()
    {
        anyhow::bail!(
            "the database has pending migrations and --migrate skip is set: run `idsync migrate up` first"
        );
    }
    if let Some(template) = tenant_schema {
        let recorded = crate::provision::schemas::backfill(db, template)
            .await
            .context("recording existing tenant schemas")?;
        if recorded > 0 {
            tracing::info!(
                recorded,
                "recorded tenant schemas created before names were recorded"
            );
        }
    }
    Ok(())
}

impl Application {
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        // The recorder first: metrics registered while building (counters exposed at zero) must land in it.
        let metrics = crate::telemetry::metrics();
        let mut background = Vec::new();
        let pass = settings.on_db_error == OnDbError::Pass;
        let mut db = connect_database(settings, pass).await?;
        // Counts every statement, so "the warm path touches no database" is measurable, not assumed.
        db.set_metric_callback(|_| metrics::counter!("idsync_db_statements_total").increment(1));
        let template = settings.sync.tenant_schema.clone();
        match prepare_schema(&db, settings.migrate, template.as_deref()).await {
            Ok(()) => {}
            Err(e) if pass => {
                // Pass mode serves without its database; the schema is prepared once it answers.
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the database is not ready; serving without it (--on-db-error pass) and retrying in the background"
                );
                let (db, migrate) = (db.clone(), settings.migrate);
                background.push(tokio::spawn(async move {
                    let mut backoff = Duration::from_millis(500);
                    while let Err(e) = prepare_schema(&db, migrate, template.as_deref()).await {
                        tracing::debug!(error = format!("{e:#}"), "database still not ready");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                    tracing::info!("the database is ready");
                }));
            }
            Err(e) => return Err(e),
        }
        let provisioner = Arc::new(Provisioner::new(db.clone(), settings.sync.clone()));

        let client = IdpClient::new(settings.issuer_ca_pem.as_deref(), settings.idp_timeout)
            .context("--issuer-ca-file")?;
        let registry = Arc::new(IssuerRegistry::new(
            &settings.issuers,
            &client,
            &settings.key_cache,
            settings.verify,
            None,
        ));
        background.extend(registry.spawn_key_refresh());
        let lifecycle = LifecycleOptions {
            logout_retention: chrono::Duration::from_std(settings.logout_retention)
                .unwrap_or(chrono::Duration::hours(24)),
            tenant_schema: settings.sync.tenant_schema.clone(),
            ..LifecycleOptions::default()
        };
        let origin = lifecycle.origin.clone();
        let gatekeeper = Arc::new(
            Gatekeeper::new(
                registry,
                settings.token_cache,
                settings.policy.clone(),
                provisioner.clone(),
                settings.on_db_error,
            )
            .with_lifecycle(lifecycle),
        );
        gatekeeper.reload_revocations().await;
        background.push(tokio::spawn(keep_revocations(gatekeeper.clone())));
        if !settings.database_url.is_sqlite() {
            // Changes made on other replicas (or by the CLI) reach this one within a second.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            background.push(tokio::spawn(crate::provision::notify::listen(
                settings.database_url.expose().to_owned(),
                origin,
                move |heard| {
                    let _ = tx.send(heard);
                },
            )));
            let listener = gatekeeper.clone();
            background.push(tokio::spawn(async move {
                while let Some(heard) = rx.recv().await {
                    listener.heard(heard).await;
                }
            }));
        }
        let upstream = Upstream::new(
            &settings.upstream,
            settings.upstream_connect_timeout,
            settings.upstream_timeout,
            settings.trusted_proxies.clone(),
            settings.websocket_max_lifetime,
        )
        .context("--upstream")?;
        let names = HeaderNames::new(&settings.header_prefix).map_err(anyhow::Error::msg)?;
        let directory = Arc::new(Directory::new(
            db.clone(),
            settings.sync.tenant_schema.clone(),
        ));
        let tracer = match &settings.trace {
            None => None,
            Some(t) => {
                let tracer = crate::telemetry::trace::Tracer::start(t)
                    .context("--otlp-endpoint: the OTLP exporter")?;
                tracing::info!(endpoint = %t.endpoint, service = %t.service_name, "exporting traces over OTLP/HTTP");
                Some(Arc::new(tracer))
            }
        };
        let state = Arc::new(AppState {
            tracer,
            gatekeeper: gatekeeper.clone(),
            upstream,
            names,
            skip_auth: settings.skip_auth.clone(),
            forward_auth_uri_header: settings.forward_auth_uri_header.clone(),
            directory: directory.clone(),
            cors: settings.cors.clone(),
        });
        let flush_every = (settings.sync.last_seen_interval / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        background.push(tokio::spawn(provisioner.clone().run_last_seen(flush_every)));

        let upkeep = metrics.clone();
        let caches = gatekeeper.clone();
        background.push(tokio::spawn(async move {
            loop {
                // What the caches hold against --cache-max-memory, for sizing the memory limit.
                let tokens = caches.tokens();
                let (synced, synced_bytes) = caches.provisioner().cache_stats();
                for (cache, entries, bytes) in [
                    ("tokens", tokens.entry_count(), tokens.weight()),
                    ("identities", synced, synced_bytes),
                ] {
                    metrics::gauge!("idsync_cache_entries", "cache" => cache).set(entries as f64);
                    metrics::gauge!("idsync_cache_bytes", "cache" => cache).set(bytes as f64);
                }
                upkeep.run_upkeep();
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }));

        let proxy_listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let admin_listener = TcpListener::bind(settings.admin_listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.admin_listen))?;
        let admin = AdminState {
            gatekeeper: gatekeeper.clone(),
            db,
            metrics,
            on_db_error: settings.on_db_error,
        };
        let api = ApiState {
            directory,
            gatekeeper,
            admin_token: settings
                .admin_token
                .as_ref()
                .map(|t| Arc::new(t.expose().to_owned())),
            app_roles: Arc::new(settings.policy.roles.app_roles().to_vec()),
            admin_addr: admin_listener.local_addr()?,
        };
        Ok(Self {
            proxy_listener,
            admin_listener,
            state,
            admin,
            api,
            background,
            shutdown_timeout: settings.shutdown_timeout,
            header_read_timeout: settings.header_read_timeout,
        })
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish
    /// (up to the shutdown timeout).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let proxy = crate::http::server::serve(
            self.proxy_listener,
            edge::Edge::new(self.state.clone()),
            self.header_read_timeout,
            rx.clone(),
        );
        let admin = crate::http::server::serve(
            self.admin_listener,
            Arc::new(crate::http::server::Routes(admin::router(
                self.admin.clone(),
                self.api.clone(),
            ))),
            self.header_read_timeout,
            rx.clone(),
        );
        let mut proxy = tokio::spawn(proxy);
        let mut admin = tokio::spawn(admin);
        let access_log = tokio::spawn(crate::telemetry::access::flush_periodically());

        tokio::select! {
            _ = shutdown => {}
            r = &mut proxy => { r?; anyhow::bail!("the proxy server stopped unexpectedly") }
        }
        tracing::info!("shutting down: draining in-flight requests");
        let _ = tx.send(true);
        let drained = tokio::time::timeout(self.shutdown_timeout, async {
            let _ = (&mut proxy).await;
            let _ = (&mut admin).await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown timeout reached; closing remaining connections");
            proxy.abort();
            admin.abort();
        }
        for task in &self.background {
            task.abort();
        }
        access_log.abort();
        crate::telemetry::access::flush();
        match self.state.gatekeeper.provisioner().flush_last_seen().await {
            Ok(n) if n > 0 => tracing::info!(users = n, "pending last-login times written"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pending last-login times could not be written"),
        }
        if let Some(tracer) = self.state.tracer.clone() {
            // Sends what is still batched; bounded by the exporter's timeout.
            let _ = tokio::task::spawn_blocking(move || tracer.shutdown()).await;
        }
        tracing::info!("stopped");
        Ok(())
    }

    /// Runs in the background; for tests, the demo and benchmarks.
    pub fn spawn(self) -> Running {
        let proxy_addr = self.proxy_addr();
        let admin_addr = self.admin_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(self.run_until(async move {
            let _ = stopped.await;
        }));
        Running {
            proxy_addr,
            admin_addr,
            stop: Some(stop),
            handle,
        }
    }
}

/// A running application; stops when told or when dropped.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy_addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Graceful stop; resolves when in-flight requests are done.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.handle).await?
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
