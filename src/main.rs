//! The `idsync` binary: parse config, set up telemetry, build the application, serve until SIGTERM.

use clap::Parser;
use idsync::config::{Cli, Command};
use idsync::startup::{Application, shutdown_signal};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
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
