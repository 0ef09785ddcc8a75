//! Schema migrations for the tables idsync owns; `Migrator::up` runs at start (unless `--migrate skip`),
//! and `idsync migrate up|down|status` runs them by hand. Migrations do not depend on `entity`.

pub use sea_orm_migration::prelude::*;

mod m20261122_000001_identity_tables;
mod m20261201_000002_membership_role_source;
mod m20261201_000003_organization_schema_name;
mod m20261201_000004_lifecycle;

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261122_000001_identity_tables::Migration),
            Box::new(m20261201_000002_membership_role_source::Migration),
            Box::new(m20261201_000003_organization_schema_name::Migration),
            Box::new(m20261201_000004_lifecycle::Migration),
        ]
    }
}
