//! `audit_events`: what sync (and operators) changed or refused, written in the same transaction as the
//! change. Ids are plain columns, not foreign keys: history outlives the rows it mentions.

use sea_orm::entity::prelude::*;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "audit_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub occurred_at: DateTimeUtc,
    /// `user_created`, `organization_created`, `membership_created`, `role_changed`, `profile_updated`,
    /// `access_denied`, `identity_conflict`, ...
    pub kind: String,
    pub user_id: Option<String>,
    pub organization_id: Option<String>,
    pub issuer: Option<String>,
    /// Who did it: `idsync` for sync, the admin's name for operator actions.
    pub actor: String,
    #[sea_orm(column_type = "JsonBinary")]
    pub details: Json,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
