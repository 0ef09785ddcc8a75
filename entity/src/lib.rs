//! SeaORM entities for the tables idsync owns. Ids are the IdP's own: `users.id` is the token's `sub`,
//! `organizations.id` the tenant id, so the app's foreign keys point at them directly.

pub mod audit_events;
pub mod memberships;
pub mod organizations;
pub mod revocations;
pub mod users;

pub mod prelude {
    pub use super::audit_events::Entity as AuditEvents;
    pub use super::memberships::Entity as Memberships;
    pub use super::organizations::Entity as Organizations;
    pub use super::revocations::Entity as Revocations;
    pub use super::users::Entity as Users;
}
