//! The migration CLI (`cargo run -p migration -- up|down|status`), sea-orm-cli's standard entry point.

#[tokio::main]
async fn main() {
    sea_orm_migration::cli::run_cli(migration::Migrator).await;
}
