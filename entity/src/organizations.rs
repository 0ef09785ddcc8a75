//! `organizations`: one row per tenant, keyed by the IdP's tenant id verbatim.

use sea_orm::entity::prelude::*;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "organizations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub issuer: String,
    pub name: String,
    /// URL-safe, unique, derived from the name (or id) at creation and never changed by sync.
    #[sea_orm(unique)]
    pub slug: String,
    pub is_active: bool,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub metadata: Option<Json>,
    /// The PostgreSQL schema idsync created for this tenant (`--tenant-schema`), if any; unique.
    #[sea_orm(unique)]
    pub schema_name: Option<String>,
    /// When the last IdP lifecycle event (webhook, reconcile) applied to this row happened; an older one
    /// arriving later is ignored.
    pub lifecycle_at: Option<DateTimeUtc>,
    /// Who set `is_active` false: `idp` (a webhook or reconcile) or `operator`. The IdP's events
    /// reactivate only what the IdP deactivated.
    pub deactivated_by: Option<String>,
    /// Where the row came from: `idp` (a token, webhook or reconcile), `idsync` (a personal or default
    /// organization) or `operator` (admin API or CLI). Reconcile deactivates only `idp` rows the IdP no
    /// longer has.
    pub origin: String,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::memberships::Entity")]
    Memberships,
}

impl Related<super::memberships::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Memberships.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
