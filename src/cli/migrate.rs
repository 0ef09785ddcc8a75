//! `idsync migrate up|down|status`: the schema by hand (or from a Kubernetes Job before replicas start).

use crate::config::DatabaseArgs;
use clap::Args;
use migration::{Migrator, MigratorTrait};
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert the most recent migration.
    Down,
    /// List applied and pending migrations.
    Status,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    pub action: MigrateAction,
}

pub async fn run(args: MigrateArgs, db: &DatabaseArgs) -> ExitCode {
    let url = match db.url() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("idsync migrate: {e}");
            return ExitCode::from(2);
        }
    };
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
