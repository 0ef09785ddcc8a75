//! The `idsync` binary: parse the command line, set up telemetry, build the application, serve until
//! SIGTERM (or run one subcommand).

use clap::Parser;
use idsync::cli::{self, Cli, Command, TokenCommand};
use idsync::startup::{Application, shutdown_signal};
use idsync::telemetry::LogFormat;
use std::process::ExitCode;

// mimalloc over glibc malloc: glibc's malloc/free and arena locks were 13 % of a warm request's CPU;
// before/after figures are in BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let db = &cli.db;
    let args = match cli.command {
        Some(Command::Serve(args)) => *args,
        Some(Command::Migrate(args)) => return cli::migrate(args, db).await,
        Some(Command::Check(args)) => {
            idsync::telemetry::init(LogFormat::Text, "error");
            return cli::check(&args, db).await;
        }
        Some(Command::Token {
            command: TokenCommand::Inspect(args),
        }) => {
            idsync::telemetry::init(LogFormat::Text, "error");
            return cli::inspect(*args, db).await;
        }
        Some(Command::Orgs(cmd)) => return cli::run_orgs(cmd, db).await,
        Some(Command::Users(cmd)) => return cli::run_users(cmd, db).await,
        Some(Command::Memberships(cmd)) => return cli::run_memberships(cmd, db).await,
        Some(Command::Healthcheck(args)) => return cli::healthcheck(args).await,
        Some(Command::Reconcile(args)) => {
            idsync::telemetry::init(LogFormat::Text, "warn");
            return cli::reconcile(*args, db).await;
        }
        None => cli.serve,
    };
    let settings = match cli::settings_or_exit(&args, db) {
        Ok(s) => s,
        Err(code) => return code,
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
