//! Per-tenant PostgreSQL schemas (`--tenant-schema`). A schema belongs to the tenant whose organization row
//! records it: created with the organization (never `IF NOT EXISTS`, so a schema left behind or another
//! tenant's is refused, not adopted), forwarded from the row, and dropped by the name the row records.

use super::naming;
use entity::organizations;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DbErr, EntityTrait, QueryFilter, Statement,
};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{0}")]
    Naming(String),
    #[error(
        "schema `{0}` already exists and is not recorded for this tenant; idsync does not adopt it"
    )]
    Taken(String),
    #[error(transparent)]
    Db(#[from] DbErr),
}

/// The name a new organization's schema gets.
pub fn name_for(template: &str, slug: &str, id: &str) -> Result<String, SchemaError> {
    naming::schema_name(template, slug, id).map_err(SchemaError::Naming)
}

async fn exists(db: &impl ConnectionTrait, name: &str) -> Result<bool, DbErr> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT 1 AS one FROM pg_namespace WHERE nspname = $1",
            [name.into()],
        ))
        .await?;
    Ok(row.is_some())
}

/// Creates `name` for a new organization, in the caller's transaction. A schema of that name that already
/// exists is refused: it is not this tenant's (nothing records it for a tenant that is being created).
pub async fn create(db: &impl ConnectionTrait, name: &str) -> Result<(), SchemaError> {
    if exists(db, name).await? {
        return Err(SchemaError::Taken(name.to_owned()));
    }
    // The name matches ^[a-z_][a-z0-9_]{0,62}$ (naming::schema_name); quoting is belt and braces.
    db.execute_unprepared(&format!("CREATE SCHEMA \"{name}\""))
        .await?;
    Ok(())
}

/// Drops the schema an organization records, if any.
pub async fn drop_recorded(
    db: &impl ConnectionTrait,
    org: &organizations::Model,
) -> Result<Option<String>, DbErr> {
    let Some(name) = &org.schema_name else {
        return Ok(None);
    };
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return Ok(None);
    }
    naming::check_schema(name).map_err(DbErr::Custom)?;
    db.execute_unprepared(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
        .await?;
    Ok(Some(name.clone()))
}

/// Before names were recorded, idsync created schemas by a formula and forwarded them by recomputing it.
/// For organizations that record none, record the formula's schema when it exists and no other
/// organization claims that name (two tenants whose ids normalised alike stay unrecorded: ambiguous).
/// Returns how many were recorded.
pub async fn backfill(db: &impl ConnectionTrait, template: &str) -> Result<usize, DbErr> {
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return Ok(0);
    }
    let unrecorded = organizations::Entity::find()
        .filter(organizations::Column::SchemaName.is_null())
        .all(db)
        .await?;
    let mut by_name: HashMap<String, Vec<String>> = HashMap::new();
    for org in &unrecorded {
        if let Some(name) = naming::legacy_schema_name(template, &org.slug, &org.id) {
            by_name.entry(name).or_default().push(org.id.clone());
        }
    }
    let mut recorded = 0;
    for (name, ids) in by_name {
        let [id] = ids.as_slice() else {
            tracing::warn!(schema = %name, tenants = ?ids, "several tenants map to one legacy schema name; none is recorded (forwarding no X-Tenant-Schema for them)");
            continue;
        };
        let claimed = organizations::Entity::find()
            .filter(organizations::Column::SchemaName.eq(name.as_str()))
            .one(db)
            .await?
            .is_some();
        if !claimed && exists(db, &name).await? {
            organizations::Entity::update_many()
                .col_expr(
                    organizations::Column::SchemaName,
                    sea_orm::sea_query::Expr::value(name.as_str()),
                )
                .filter(organizations::Column::Id.eq(id.as_str()))
                .filter(organizations::Column::SchemaName.is_null())
                .exec(db)
                .await?;
            recorded += 1;
        }
    }
    Ok(recorded)
}
