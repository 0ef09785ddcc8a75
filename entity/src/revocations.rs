//! `revocations`: sessions and users whose tokens are refused before their `exp` (OIDC back-channel
//! logout), and the ids of logout tokens already used. Each row stops mattering at `expires_at` and is
//! purged after it; every replica loads the live ones.

use sea_orm::entity::prelude::*;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "revocations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub issuer: String,
    /// `sid`, `sub` or `jti`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub kind: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub value: String,
    /// For `sub`: tokens issued (`iat`) before this second are refused.
    pub not_before: Option<i64>,
    pub expires_at: DateTimeUtc,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
