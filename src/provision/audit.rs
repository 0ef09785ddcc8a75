//! The audit trail's vocabulary and writer: every kind of event is a variant here, so sync, operators,
//! webhooks and reconcile name the same change the same way.

use chrono::{DateTime, Utc};
use entity::audit_events;
use sea_orm::{ActiveValue::NotSet, ActiveValue::Set, ConnectionTrait, DbErr};
use serde_json::Value;

/// Who sync writes audit events as.
pub const ACTOR: &str = "idsync";

/// What happened. Stored as the snake_case name in `audit_events.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuditKind {
    OrganizationCreated,
    OrganizationRenamed,
    OrganizationDeactivated,
    OrganizationReactivated,
    OrganizationDeleted,
    UserCreated,
    UserDeactivated,
    UserReactivated,
    ProfileUpdated,
    MembershipCreated,
    MembershipDeactivated,
    MembershipReactivated,
    MembershipRemoved,
    RoleChanged,
    RoleSourceChanged,
    AccessDenied,
    IdentityConflict,
    /// A session ended at the IdP (back-channel logout with `sid`, a logout event).
    SessionRevoked,
    /// Every session of a user ended (back-channel logout with `sub` only).
    UserSessionsRevoked,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OrganizationCreated => "organization_created",
            Self::OrganizationRenamed => "organization_renamed",
            Self::OrganizationDeactivated => "organization_deactivated",
            Self::OrganizationReactivated => "organization_reactivated",
            Self::OrganizationDeleted => "organization_deleted",
            Self::UserCreated => "user_created",
            Self::UserDeactivated => "user_deactivated",
            Self::UserReactivated => "user_reactivated",
            Self::ProfileUpdated => "profile_updated",
            Self::MembershipCreated => "membership_created",
            Self::MembershipDeactivated => "membership_deactivated",
            Self::MembershipReactivated => "membership_reactivated",
            Self::MembershipRemoved => "membership_removed",
            Self::RoleChanged => "role_changed",
            Self::RoleSourceChanged => "role_source_changed",
            Self::AccessDenied => "access_denied",
            Self::IdentityConflict => "identity_conflict",
            Self::SessionRevoked => "session_revoked",
            Self::UserSessionsRevoked => "user_sessions_revoked",
        }
    }
}

/// One audit event about a user and/or an organization.
pub struct Event<'a> {
    pub kind: AuditKind,
    pub issuer: Option<&'a str>,
    pub user: Option<&'a str>,
    pub organization: Option<&'a str>,
    pub actor: &'a str,
    pub details: Value,
    pub at: DateTime<Utc>,
}

impl Event<'_> {
    pub fn into_model(self) -> audit_events::ActiveModel {
        audit_events::ActiveModel {
            id: NotSet,
            occurred_at: Set(self.at),
            kind: Set(self.kind.as_str().to_owned()),
            user_id: Set(self.user.map(str::to_owned)),
            organization_id: Set(self.organization.map(str::to_owned)),
            issuer: Set(self.issuer.map(str::to_owned)),
            actor: Set(self.actor.to_owned()),
            details: Set(self.details),
        }
    }
}

/// Records events (in the caller's transaction, if it is one).
pub async fn record(db: &impl ConnectionTrait, events: Vec<Event<'_>>) -> Result<(), DbErr> {
    if events.is_empty() {
        return Ok(());
    }
    super::bulk::insert(db, events.into_iter().map(Event::into_model).collect()).await
}
