//! `idsync migrate up|down|status`: the schema by hand (or from a Kubernetes Job before replicas start).

use crate::config::{DatabaseUrl, MigrateAction, MigrateArgs};
use migration::{Migrator, MigratorTrait};
use std::process::ExitCode;

pub async fn run(args: MigrateArgs) -> ExitCode {
    let url = DatabaseUrl::new(args.database_url);
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
