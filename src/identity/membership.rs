//! Who sets a membership's role, and the one rule that picks the role in a tenant: an operator's role
//! wins; else the IdP's, but only in a tenant the token's roles speak for; else what is stored; else the
//! default. Pure, so the access decision, pass mode, `token inspect` and the sync transaction apply the
//! same function.

use serde::{Deserialize, Serialize};

/// Who set a membership's role. Stored in `memberships.role_source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleSource {
    /// Mapped from the IdP's roles; the next token that speaks for the tenant may change it.
    Idp,
    /// Set by an operator (admin API or CLI); the IdP never changes it until an operator hands it back.
    Operator,
}

impl RoleSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idp => "idp",
            Self::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "idp" => Some(Self::Idp),
            "operator" => Some(Self::Operator),
            _ => None,
        }
    }
}

/// Where an organization or membership row came from. Stored in `origin`; reconcile deactivates only
/// what came from the IdP, so a personal organization or an operator's grant is never taken for one the
/// IdP deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A token asserted or listed it, or a webhook or reconcile brought it.
    Idp,
    /// idsync's own policy made it: a personal organization, the `--missing-tenant default=` one.
    Idsync,
    /// The admin API or CLI made it.
    Operator,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idp => "idp",
            Self::Idsync => "idsync",
            Self::Operator => "operator",
        }
    }
}

/// A membership as the database holds it, as far as the access decision needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMembership {
    pub role: String,
    pub source: RoleSource,
    pub is_active: bool,
}

/// How the role in one tenant is decided, before the stored membership is known.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RolePlan {
    /// The app role the token's IdP roles map to, when the token speaks for this tenant; `None` when it
    /// does not (a Frontegg tenant switched to from `tenantIds`, an organization reached only through an
    /// operator's membership).
    pub from_idp: Option<String>,
    /// The role when neither the IdP nor a stored membership says anything (`--default-role`).
    pub fallback: String,
}

impl RolePlan {
    /// The role in the tenant given what is stored there (`None`: no membership yet, or not looked up).
    pub fn resolve<'a>(&'a self, stored: Option<&'a StoredMembership>) -> &'a str {
        match stored {
            Some(m) if m.source == RoleSource::Operator => &m.role,
            Some(m) => self.from_idp.as_deref().unwrap_or(&m.role),
            None => self.from_idp.as_deref().unwrap_or(&self.fallback),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(role: &str, source: RoleSource) -> StoredMembership {
        StoredMembership {
            role: role.into(),
            source,
            is_active: true,
        }
    }

    #[test]
    fn an_operator_role_wins_over_the_idp() {
        let plan = RolePlan {
            from_idp: Some("admin".into()),
            fallback: "member".into(),
        };
        assert_eq!(
            plan.resolve(Some(&stored("viewer", RoleSource::Operator))),
            "viewer"
        );
        assert_eq!(
            plan.resolve(Some(&stored("viewer", RoleSource::Idp))),
            "admin"
        );
        assert_eq!(plan.resolve(None), "admin");
    }

    #[test]
    fn a_tenant_the_token_does_not_speak_for_keeps_its_stored_role_or_gets_the_default() {
        let plan = RolePlan {
            from_idp: None,
            fallback: "member".into(),
        };
        assert_eq!(
            plan.resolve(Some(&stored("viewer", RoleSource::Idp))),
            "viewer"
        );
        assert_eq!(
            plan.resolve(Some(&stored("admin", RoleSource::Operator))),
            "admin"
        );
        assert_eq!(plan.resolve(None), "member");
    }
}
