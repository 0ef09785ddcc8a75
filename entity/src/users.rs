//! `users`: one row per IdP user, keyed by the token's `sub` verbatim (never a new UUID).

use sea_orm::entity::prelude::*;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "users")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub issuer: String,
    pub email: Option<String>,
    pub email_verified: Option<bool>,
    pub username: Option<String>,
    pub name: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub avatar_url: Option<String>,
    /// The IdP's roles as the token carried them.
    #[sea_orm(column_type = "JsonBinary")]
    pub idp_roles: Json,
    pub is_active: bool,
    pub last_login_at: Option<DateTimeUtc>,
    /// When the last IdP lifecycle event (webhook, reconcile) applied to this row happened; an older one
    /// arriving later is ignored.
    pub lifecycle_at: Option<DateTimeUtc>,
    /// Who set `is_active` false: `idp` (a webhook or reconcile) or `operator`. The IdP's events
    /// reactivate only what the IdP deactivated.
    pub deactivated_by: Option<String>,
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
