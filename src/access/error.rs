//! Why access is not granted, in the access layer's own terms; the HTTP edge maps each to a status and
//! a JSON body (`From<AccessError> for ApiError`). Messages name no flags and no internal detail: they
//! may reach the client. Details (URLs, causes) stay in the variants for the log.

use crate::identity::IdentityError;
use crate::oidc::{KeysUnavailable, VerifyError};
use crate::provision::{ProvisionError, Refusal as StoreRefusal};
use sea_orm::DbErr;

/// Why a token does not authenticate anyone (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("{0}")]
    Verify(VerifyError),
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// The token's session (or every session of its user) was logged out at the IdP.
    #[error("the session ended: it was logged out at the identity provider")]
    SessionEnded,
}

/// Why an authenticated caller may not act (403). Each has a stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the requested tenant is not one the token allows or the user belongs to")]
    TenantNotPermitted,
    #[error("the token names no tenant (looked for {})", looked(.looked_for))]
    MissingTenant { looked_for: Vec<String> },
    /// The detail (which issuer owns the id) is for the audit trail, never for the client.
    #[error("the user or tenant id already belongs to another issuer")]
    IdentityConflict { detail: String },
    #[error("the user is deactivated")]
    UserInactive,
    #[error("the tenant is deactivated")]
    TenantInactive,
    #[error("the user's membership in this tenant is deactivated")]
    MembershipInactive,
}

fn looked(claims: &[String]) -> String {
    claims
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(" and ")
}

impl Refusal {
    /// The machine-readable `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TenantNotPermitted => "tenant_not_permitted",
            Self::MissingTenant { .. } => "missing_tenant_claim",
            Self::IdentityConflict { .. } => "identity_conflict",
            Self::UserInactive => "user_inactive",
            Self::TenantInactive => "tenant_inactive",
            Self::MembershipInactive => "membership_inactive",
        }
    }
}

impl From<StoreRefusal> for Refusal {
    fn from(r: StoreRefusal) -> Self {
        match r {
            StoreRefusal::IdentityConflict(detail) => Self::IdentityConflict { detail },
            StoreRefusal::UserInactive => Self::UserInactive,
            StoreRefusal::TenantInactive => Self::TenantInactive,
            StoreRefusal::MembershipInactive => Self::MembershipInactive,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// 401.
    #[error(transparent)]
    InvalidToken(TokenRejection),
    /// 503: the token's issuer has no usable keys.
    #[error(transparent)]
    KeysUnavailable(KeysUnavailable),
    /// 403.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// 503: the database failed.
    #[error("database: {0}")]
    Database(#[from] DbErr),
    /// 500: a bug or a misconfiguration.
    #[error("{0}")]
    Internal(String),
}

impl From<VerifyError> for AccessError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::KeysUnavailable(k) => Self::KeysUnavailable(k),
            other => Self::InvalidToken(TokenRejection::Verify(other)),
        }
    }
}

impl From<IdentityError> for AccessError {
    fn from(e: IdentityError) -> Self {
        Self::InvalidToken(TokenRejection::Identity(e))
    }
}

impl From<ProvisionError> for AccessError {
    fn from(e: ProvisionError) -> Self {
        match e {
            ProvisionError::Refused(r) => Self::Refused(r.into()),
            ProvisionError::Naming(n) => Self::Internal(n),
            ProvisionError::Database(db) => Self::Database(db),
        }
    }
}
