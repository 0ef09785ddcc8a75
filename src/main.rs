//! The `idsync` binary: parse config, set up telemetry, build the application, serve until SIGTERM.

use clap::Parser;
use idsync::config::{Cli, Command, MigrateAction, MigrateArgs};
use idsync::startup::{Application, shutdown_signal};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => *args,
        Some(Command::Migrate(args)) => return migrate(args).await,
        None => cli.serve,
    };
    let settings = match args.validate() {
        Ok(s) => s,
        Err(problems) => {
            eprintln!(
                "idsync: the configuration has {} problem(s):",
                problems.len()
            );
            for p in &problems {
                eprintln!("  - {p}");
            }
            eprintln!("Run `idsync --help` for the flag reference.");
            return ExitCode::from(2);
        }
    };
    idsync::telemetry::init(settings.log_format, &settings.log_level);
    let app = match Application::build(&settings).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "idsync failed to start");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        proxy = %app.proxy_addr(),
        admin = %app.admin_addr(),
        upstream = %settings.upstream,
        issuers = ?settings.issuers.iter().map(|i| i.issuer.as_str()).collect::<Vec<_>>(),
        database = %settings.database_url,
        "idsync listening"
    );
    match app.run_until(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "idsync stopped with an error");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(args: MigrateArgs) -> ExitCode {
    use migration::{Migrator, MigratorTrait};
    idsync::telemetry::init(idsync::config::LogFormat::Text, "warn");
    let url = idsync::config::DatabaseUrl::new(args.database_url);
    let db = match sea_orm::Database::connect(url.expose()).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("idsync migrate: cannot connect to {url}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.action {
        MigrateAction::Up => Migrator::up(&db, None)
            .await
            .map(|()| println!("migrations applied")),
        MigrateAction::Down => Migrator::down(&db, Some(1))
            .await
            .map(|()| println!("last migration reverted")),
        MigrateAction::Status => {
            async {
                for m in Migrator::get_applied_migrations(&db).await? {
                    println!("applied  {}", m.name());
                }
                for m in Migrator::get_pending_migrations(&db).await? {
                    println!("pending  {}", m.name());
                }
                Ok(())
            }
            .await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idsync migrate: {e}");
            ExitCode::FAILURE
        }
    }
}
