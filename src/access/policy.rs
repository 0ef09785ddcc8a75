//! The one access decision: identity + the tenant the client asks for + the tenant policy + what is known
//! of the user's stored membership -> the tenant the request acts in and how its role is decided, or a
//! refusal. Pure: the proxy, forward-auth, `/.idsync/me`, pass mode and `token inspect` all ask it.
//!
//! | where the tenant comes from | may act there | role |
//! |---|---|---|
//! | the token asserts it (Frontegg `tenantId`; Keycloak `organization`; generic tenant claim) | yes | operator's if set, else the IdP roles mapped |
//! | the token only lists it (Frontegg `tenantIds`) | yes | stored role, else `--default-role` |
//! | the token does not name it | only with an active stored membership | stored role |
//! | no tenant, `--missing-tenant personal` | yes | the strongest role |
//! | no tenant, `--missing-tenant default=ID` | yes | operator's if set, else the IdP roles mapped |

use super::error::Refusal;
use crate::identity::{Identity, Origin, RoleMap, RolePlan, StoredMembership, TenantId};
use crate::provision::naming::short_hash;
use crate::provision::{Provisioned, Scope, SyncPlan, TenantTarget};

/// What to do with a user token that names no tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MissingTenant {
    /// 403 `missing_tenant_claim`.
    Reject,
    /// One organization per user, keyed from issuer and `sub`, with the user as its strongest role.
    Personal,
    /// Join this organization; the token's roles apply there (single-tenant deployments).
    Default(TenantId),
}

impl MissingTenant {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "reject" => Ok(Self::Reject),
            "personal" => Ok(Self::Personal),
            other => match other.strip_prefix("default=") {
                Some(id) => TenantId::parse("default", id)
                    .map(Self::Default)
                    .map_err(|e| format!("`{s}`: {e}")),
                None => Err(format!("`{s}` is not reject, personal or default=ID")),
            },
        }
    }
}

/// The operator's tenant and role policy.
#[derive(Clone, Debug)]
pub struct TenantPolicy {
    pub missing: MissingTenant,
    pub roles: RoleMap,
}

/// Why the request may act in its tenant; decides whose word sets the role there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// The token asserts membership here: its roles speak for this tenant.
    Asserted,
    /// The token lists the tenant as one the user may switch to, without roles for it.
    Listed,
    /// The token says nothing of it; only an active stored membership lets the user in.
    Membership,
    /// `--missing-tenant personal`.
    Personal,
    /// `--missing-tenant default=ID`.
    Default,
}

/// Where a request acts, before any stored membership is consulted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A tenant-level token without a tenant, which cannot happen for mapped identities, or a
    /// tenant-less identity whose policy gives none.
    NoTenant,
    Tenant {
        tenant: TenantTarget,
        basis: Basis,
    },
}

impl Target {
    /// The stored membership the decision needs, if any: (user, tenant) when only a membership can let
    /// the user in.
    pub fn needs_membership<'a>(&'a self, identity: &'a Identity) -> Option<(&'a str, &'a str)> {
        match (self, &identity.subject) {
            (
                Target::Tenant {
                    tenant,
                    basis: Basis::Membership,
                },
                Some(user),
            ) => Some((user.as_str(), tenant.id.as_str())),
            _ => None,
        }
    }
}

/// What the caller knows of the user's stored membership in the target tenant.
#[derive(Clone, Copy, Debug)]
pub enum Known<'a> {
    /// Not looked up (pass mode, `token inspect`, or not needed).
    Nothing,
    /// Looked up: the row, or `None` when there is none.
    Membership(Option<&'a StoredMembership>),
}

/// The decision: what to sync, and the role as far as `known` tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub plan: SyncPlan,
    /// The role given what the caller knew (the sync transaction applies the same plan to the row it reads).
    pub role: Option<String>,
}

/// Step one: which tenant the request acts in, from the token, the client's request and the policy.
pub fn target(
    identity: &Identity,
    requested: Option<&TenantId>,
    policy: &TenantPolicy,
) -> Result<Target, Refusal> {
    let named = |id: &str, basis| Target::Tenant {
        tenant: TenantTarget {
            id: id.to_owned(),
            name: identity.tenant_name(id).unwrap_or(id).to_owned(),
        },
        basis,
    };
    if let Some(wanted) = requested {
        let wanted = wanted.as_str();
        let basis = if identity.asserts_tenant(wanted) {
            Basis::Asserted
        } else if identity.allows_tenant(wanted) {
            Basis::Listed
        } else if identity.subject.is_some() {
            Basis::Membership
        } else {
            // A tenant-level token speaks for its own tenant only.
            return Err(Refusal::TenantNotPermitted);
        };
        return Ok(named(wanted, basis));
    }
    if let Some(t) = &identity.tenant {
        return Ok(named(t.as_str(), Basis::Asserted));
    }
    let Some(user) = &identity.subject else {
        return Ok(Target::NoTenant);
    };
    match &policy.missing {
        MissingTenant::Reject => Err(Refusal::MissingTenant {
            looked_for: identity.tenant_sources().to_vec(),
        }),
        MissingTenant::Personal => {
            let owner = identity
                .username()
                .or(identity.email.as_deref())
                .unwrap_or(user.as_str());
            Ok(Target::Tenant {
                tenant: TenantTarget {
                    id: format!(
                        "personal-{}",
                        short_hash(&[&identity.issuer, user.as_str()], 24)
                    ),
                    name: format!("Personal ({owner})"),
                },
                basis: Basis::Personal,
            })
        }
        MissingTenant::Default(id) => Ok(named(id.as_str(), Basis::Default)),
    }
}

/// Step two: may the request act there, and how is its role decided.
pub fn decide(
    identity: &Identity,
    target: Target,
    known: Known<'_>,
    policy: &TenantPolicy,
) -> Result<Decision, Refusal> {
    let (tenant, basis) = match target {
        Target::NoTenant => {
            return Ok(Decision {
                plan: SyncPlan {
                    tenant: None,
                    role: None,
                    idp_roles_apply: true,
                    origin: Origin::Idp,
                },
                role: None,
            });
        }
        Target::Tenant { tenant, basis } => (tenant, basis),
    };
    let stored = match known {
        Known::Membership(m) => m,
        Known::Nothing => None,
    };
    if basis == Basis::Membership && !stored.is_some_and(|m| m.is_active) {
        return Err(Refusal::TenantNotPermitted);
    }
    let plan = identity.subject.as_ref().map(|_| RolePlan {
        from_idp: match basis {
            Basis::Asserted | Basis::Default => {
                Some(policy.roles.app_role(&identity.roles).to_owned())
            }
            Basis::Personal => Some(policy.roles.strongest().to_owned()),
            Basis::Listed | Basis::Membership => None,
        },
        fallback: policy.roles.default_role().to_owned(),
    });
    let role = plan.as_ref().map(|p| p.resolve(stored).to_owned());
    Ok(Decision {
        plan: SyncPlan {
            tenant: Some(tenant),
            role: plan,
            idp_roles_apply: matches!(basis, Basis::Asserted | Basis::Default | Basis::Personal),
            origin: match basis {
                Basis::Asserted | Basis::Listed | Basis::Membership => Origin::Idp,
                Basis::Personal | Basis::Default => Origin::Idsync,
            },
        },
        role,
    })
}

/// The decision without a database (pass mode, `token inspect`): tenant switching only to what the
/// token allows, the role from the token or the default, and the view the upstream is told.
pub fn decide_offline(
    identity: &Identity,
    requested: Option<&TenantId>,
    policy: &TenantPolicy,
) -> Result<(Decision, Provisioned), Refusal> {
    let decision = decide(
        identity,
        target(identity, requested, policy)?,
        Known::Nothing,
        policy,
    )?;
    let view = Provisioned {
        user_id: identity.subject.as_ref().map(|s| s.as_shared().clone()),
        email: identity.email.clone(),
        name: identity.name.clone(),
        scope: Scope {
            tenant_id: decision.plan.tenant.as_ref().map(|t| t.id.as_str().into()),
            tenant_name: decision
                .plan
                .tenant
                .as_ref()
                .map(|t| t.name.as_str().into()),
            tenant_slug: None,
            tenant_schema: None,
            role: decision.role.as_deref().map(Into::into),
        }
        .into_shared(),
        idp_roles_apply: decision.plan.idp_roles_apply,
        synced: false,
    };
    Ok((decision, view))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ClaimPath, Dialect, MappingRules, RoleSource, map_claims};
    use serde_json::json;

    fn policy(missing: MissingTenant) -> TenantPolicy {
        let roles = ["admin", "member", "viewer"].map(String::from);
        TenantPolicy {
            missing,
            roles: RoleMap::new(&roles, &[], "member").unwrap(),
        }
    }

    fn identity(dialect: Dialect, claims: serde_json::Value) -> Identity {
        let rules = MappingRules {
            dialect,
            tenant_claim: ClaimPath::new("tenant_id").unwrap(),
            roles_claim: ClaimPath::new("roles").unwrap(),
            id_prefix: None,
        };
        map_claims("iss", claims.as_object().unwrap(), &rules).unwrap()
    }

    fn frontegg() -> Identity {
        identity(
            Dialect::Frontegg,
            json!({"sub": "u", "tenantId": "t1", "tenantIds": ["t1", "t2"], "roles": ["Admin"]}),
        )
    }

    fn tid(s: &str) -> TenantId {
        TenantId::parse("test", s).unwrap()
    }

    fn run(
        id: &Identity,
        requested: Option<&str>,
        stored: Option<&StoredMembership>,
    ) -> Result<Decision, Refusal> {
        let p = policy(MissingTenant::Reject);
        let t = target(id, requested.map(tid).as_ref(), &p)?;
        decide(id, t, Known::Membership(stored), &p)
    }

    fn stored(role: &str, source: RoleSource) -> StoredMembership {
        StoredMembership {
            role: role.into(),
            source,
            is_active: true,
        }
    }

    #[test]
    fn frontegg_roles_speak_only_for_the_token_tenant() {
        let id = frontegg();
        let own = run(&id, None, None).unwrap();
        assert_eq!(own.role.as_deref(), Some("admin"));
        assert!(own.plan.idp_roles_apply);
        let switched = run(&id, Some("t2"), None).unwrap();
        assert_eq!(
            switched.role.as_deref(),
            Some("member"),
            "default role, not t1's Admin"
        );
        assert!(!switched.plan.idp_roles_apply);
        assert_eq!(switched.plan.role.unwrap().from_idp, None);
        let viewer = stored("viewer", RoleSource::Idp);
        assert_eq!(
            run(&id, Some("t2"), Some(&viewer)).unwrap().role.as_deref(),
            Some("viewer"),
            "the stored role in t2"
        );
    }

    #[test]
    fn keycloak_realm_roles_set_only_memberships_the_token_asserts() {
        let id = identity(
            Dialect::Keycloak,
            json!({"sub": "u", "typ": "Bearer", "realm_access": {"roles": ["admin"]},
                   "organization": {"acme": {"id": "o1"}, "globex": {"id": "o2"}}}),
        );
        assert_eq!(
            run(&id, Some("o2"), None).unwrap().role.as_deref(),
            Some("admin")
        );
        let op = stored("viewer", RoleSource::Operator);
        assert_eq!(
            run(&id, Some("o9"), Some(&op)).unwrap().role.as_deref(),
            Some("viewer"),
            "an organization reached through an operator's membership keeps its role"
        );
        assert_eq!(run(&id, Some("o9"), None), Err(Refusal::TenantNotPermitted));
        let inactive = StoredMembership {
            is_active: false,
            ..op
        };
        assert_eq!(
            run(&id, Some("o9"), Some(&inactive)),
            Err(Refusal::TenantNotPermitted)
        );
    }

    #[test]
    fn an_operator_role_wins_even_where_the_token_speaks() {
        let id = frontegg();
        let op = stored("viewer", RoleSource::Operator);
        assert_eq!(
            run(&id, None, Some(&op)).unwrap().role.as_deref(),
            Some("viewer")
        );
    }

    #[test]
    fn missing_tenant_policies_decide_the_same_offline() {
        let id = identity(Dialect::Generic, json!({"sub": "u", "roles": ["viewer"]}));
        let offline = |m| decide_offline(&id, None, &policy(m));
        assert_eq!(
            offline(MissingTenant::Reject).unwrap_err(),
            Refusal::MissingTenant {
                looked_for: vec!["tenant_id".into()]
            }
        );
        let (_, personal) = offline(MissingTenant::Personal).unwrap();
        assert!(personal.tenant_id().unwrap().starts_with("personal-"));
        assert_eq!(personal.role(), Some("admin"));
        let (_, joined) = offline(MissingTenant::Default(tid("main"))).unwrap();
        assert_eq!(joined.tenant_id(), Some("main"));
        assert_eq!(joined.role(), Some("viewer"));
        assert!(!joined.synced);
    }

    #[test]
    fn offline_switching_goes_only_where_the_token_allows() {
        let id = frontegg();
        let p = policy(MissingTenant::Reject);
        assert!(decide_offline(&id, Some(&tid("t2")), &p).is_ok());
        assert_eq!(
            decide_offline(&id, Some(&tid("t3")), &p).unwrap_err(),
            Refusal::TenantNotPermitted
        );
    }

    #[test]
    fn a_tenant_token_cannot_switch_tenants() {
        let id = identity(
            Dialect::Frontegg,
            json!({"type": "tenantApiToken", "tenantId": "t1"}),
        );
        let p = policy(MissingTenant::Reject);
        assert_eq!(
            target(&id, Some(&tid("t2")), &p),
            Err(Refusal::TenantNotPermitted)
        );
        let d = decide(&id, target(&id, None, &p).unwrap(), Known::Nothing, &p).unwrap();
        assert_eq!(d.role, None, "no user, no role");
    }
}
