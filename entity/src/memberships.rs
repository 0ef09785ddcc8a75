//! `memberships`: a user in an organization with an app role; both keys cascade on delete.

use sea_orm::entity::prelude::*;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "memberships")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub user_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub organization_id: String,
    /// The app role (`admin`, `member`, `viewer` by default).
    pub role: String,
    /// Who set `role`: `idp` (mapped from the IdP's roles by sync) or `operator` (admin API or CLI; sync
    /// never changes it until an operator hands it back to `idp`).
    pub role_source: String,
    /// The IdP roles of the last token that spoke for this tenant.
    #[sea_orm(column_type = "JsonBinary")]
    pub idp_roles: Json,
    pub is_active: bool,
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
    #[sea_orm(
        belongs_to = "super::users::Entity",
        from = "Column::UserId",
        to = "super::users::Column::Id",
        on_delete = "Cascade"
    )]
    User,
    #[sea_orm(
        belongs_to = "super::organizations::Entity",
        from = "Column::OrganizationId",
        to = "super::organizations::Column::Id",
        on_delete = "Cascade"
    )]
    Organization,
}

impl Related<super::users::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::User.def()
    }
}

impl Related<super::organizations::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Organization.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
