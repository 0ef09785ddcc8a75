//! What the IdP says happened, in one shape whatever the IdP: webhook payloads (Frontegg's, and the
//! `keycloak-events` extension's for Keycloak) become a list of [`Change`]s. Pure: the signature is
//! checked before (`access`), the changes are applied after (`provision::lifecycle`).
//!
//! Frontegg events handled: `frontegg.user.created|updated|activated|deleted|invitedToTenant|
//! removedFromTenant`, `frontegg.tenant.created|updated|deleted`. Keycloak (keycloak-events `type`):
//! `admin.USER-CREATE|UPDATE|DELETE`, `admin.ORGANIZATION-CREATE|UPDATE|DELETE`,
//! `admin.ORGANIZATION_MEMBERSHIP-CREATE|DELETE`, `access.LOGOUT`, `access.DELETE_ACCOUNT`. Anything
//! else is not an error: it is ignored (`None`).

use super::claims::{opt_profile, opt_str};
use super::{IdentityError, MappingRules, Subject, TenantId};
use serde_json::{Map, Value};

/// A user's profile as an event carries it; `None` fields are left as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub email: Option<String>,
    pub name: Option<String>,
    pub username: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub avatar_url: Option<String>,
}

/// Who a membership event is about: Keycloak's membership-created event names only the username.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserRef {
    Id(Subject),
    Username(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The user exists with this profile (created if idsync has no row yet).
    User {
        user: Subject,
        profile: Profile,
    },
    /// The user is enabled (`true`) or disabled/deleted (`false`) at the IdP.
    UserActive {
        user: Subject,
        active: bool,
    },
    /// The organization exists, with this name when the event gives one.
    Organization {
        tenant: TenantId,
        name: Option<String>,
    },
    OrganizationActive {
        tenant: TenantId,
        active: bool,
    },
    /// The user is (`active`) or is no longer a member; `idp_roles` when the event says which.
    Membership {
        user: UserRef,
        tenant: TenantId,
        active: bool,
        idp_roles: Option<Vec<String>>,
    },
    /// A session ended at the IdP (Keycloak `access.LOGOUT`): its tokens are refused.
    SessionEnded {
        user: Subject,
        sid: String,
    },
}

/// One delivery's meaning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The IdP's name for it (`frontegg.user.deleted`, `admin.USER-UPDATE`), for the audit trail.
    pub kind: String,
    /// When it happened at the IdP (ms since the epoch), when the payload says.
    pub at_ms: Option<i64>,
    /// The realm the event comes from (Keycloak), to check against the issuer.
    pub realm: Option<String>,
    pub changes: Vec<Change>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("the body is not a JSON object")]
    NotAnObject,
    #[error("`{0}` is missing or not a string")]
    Missing(&'static str),
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("`representation` is not JSON: {0}")]
    Representation(String),
}

fn field<'a>(obj: &'a Map<String, Value>, path: &[&str]) -> Option<&'a Value> {
    let mut v = obj.get(path[0])?;
    for p in &path[1..] {
        v = v.get(p)?;
    }
    Some(v)
}

fn string<'a>(obj: &'a Map<String, Value>, path: &[&str]) -> Option<&'a str> {
    field(obj, path).and_then(Value::as_str)
}

/// A Frontegg webhook body (the default payload: `eventKey`, `eventContext`, `user`).
pub fn frontegg(body: &Value, rules: &MappingRules) -> Result<Option<Event>, EventError> {
    let obj = body.as_object().ok_or(EventError::NotAnObject)?;
    let kind = string(obj, &["eventKey"]).ok_or(EventError::Missing("eventKey"))?;
    let context_tenant = || -> Result<TenantId, EventError> {
        let raw = string(obj, &["eventContext", "tenantId"])
            .or_else(|| string(obj, &["tenant", "tenantId"]))
            .ok_or(EventError::Missing("eventContext.tenantId"))?;
        Ok(rules.tenant_id("eventContext.tenantId", raw)?)
    };
    let user_obj = || obj.get("user").and_then(Value::as_object);
    let user_id = || -> Result<Subject, EventError> {
        let raw = user_obj()
            .and_then(|u| string(u, &["id"]))
            .ok_or(EventError::Missing("user.id"))?;
        Ok(rules.subject("user.id", raw)?)
    };
    let profile = || -> Result<Profile, EventError> {
        let Some(u) = user_obj() else {
            return Ok(Profile::default());
        };
        Ok(Profile {
            email: opt_profile::<String>(u, "email")?,
            name: opt_profile::<String>(u, "name")?,
            avatar_url: opt_profile::<String>(u, "profilePictureUrl")?,
            ..Profile::default()
        })
    };
    // Frontegg sends role objects (`{key, name, ...}`); tokens carry the keys.
    let roles = || -> Option<Vec<String>> {
        let list = user_obj()?.get("roles")?.as_array()?;
        Some(
            list.iter()
                .filter_map(|r| r.get("key").and_then(Value::as_str).or(r.as_str()))
                .map(str::to_owned)
                .collect(),
        )
    };
    let changes = match kind {
        "frontegg.user.created" | "frontegg.user.updated" | "frontegg.user.activated" => {
            let user = user_id()?;
            let mut changes = vec![Change::User {
                user: user.clone(),
                profile: profile()?,
            }];
            if kind == "frontegg.user.created"
                && let Ok(tenant) = context_tenant()
            {
                changes.push(Change::Membership {
                    user: UserRef::Id(user),
                    tenant,
                    active: true,
                    idp_roles: roles(),
                });
            }
            changes
        }
        "frontegg.user.deleted" => vec![Change::UserActive {
            user: user_id()?,
            active: false,
        }],
        "frontegg.user.invitedToTenant" => {
            let user = user_id()?;
            vec![
                Change::User {
                    user: user.clone(),
                    profile: profile()?,
                },
                Change::Membership {
                    user: UserRef::Id(user),
                    tenant: context_tenant()?,
                    active: true,
                    idp_roles: roles(),
                },
            ]
        }
        "frontegg.user.removedFromTenant" => vec![Change::Membership {
            user: UserRef::Id(user_id()?),
            tenant: context_tenant()?,
            active: false,
            idp_roles: None,
        }],
        "frontegg.tenant.created" | "frontegg.tenant.updated" => vec![Change::Organization {
            tenant: context_tenant()?,
            name: string(obj, &["tenant", "name"]).map(str::to_owned),
        }],
        "frontegg.tenant.deleted" => vec![Change::OrganizationActive {
            tenant: context_tenant()?,
            active: false,
        }],
        _ => return Ok(None),
    };
    Ok(Some(Event {
        kind: kind.to_owned(),
        at_ms: None,
        realm: None,
        changes,
    }))
}

/// A `keycloak-events` (p2-inc) webhook body: admin events `admin.<RESOURCE>-<OP>` with `resourcePath`
/// and a JSON-text `representation`, user events `access.<EVENT>` with `authDetails`.
pub fn keycloak(body: &Value, rules: &MappingRules) -> Result<Option<Event>, EventError> {
    let obj = body.as_object().ok_or(EventError::NotAnObject)?;
    let kind = string(obj, &["type"]).ok_or(EventError::Missing("type"))?;
    let path: Vec<&str> = string(obj, &["resourcePath"])
        .unwrap_or_default()
        .split('/')
        .collect();
    let representation: Option<Map<String, Value>> = match field(obj, &["representation"]) {
        Some(Value::String(text)) => Some(
            serde_json::from_str(text).map_err(|e| EventError::Representation(e.to_string()))?,
        ),
        Some(Value::Object(m)) => Some(m.clone()),
        _ => None,
    };
    let rep = representation.as_ref();
    let enabled = rep.and_then(|r| r.get("enabled")).and_then(Value::as_bool);
    let user_at = |i: usize| -> Result<Subject, EventError> {
        let raw = path
            .get(i)
            .filter(|s| !s.is_empty())
            .ok_or(EventError::Missing("resourcePath"))?;
        Ok(rules.subject("resourcePath", raw)?)
    };
    let org_at = |i: usize| -> Result<TenantId, EventError> {
        let raw = path
            .get(i)
            .filter(|s| !s.is_empty())
            .ok_or(EventError::Missing("resourcePath"))?;
        Ok(rules.tenant_id("resourcePath", raw)?)
    };
    let subject_of_user_event = || -> Result<Subject, EventError> {
        let raw = string(obj, &["authDetails", "userId"])
            .ok_or(EventError::Missing("authDetails.userId"))?;
        Ok(rules.subject("authDetails.userId", raw)?)
    };
    let mut changes = Vec::new();
    match (kind, path.first().copied(), path.len()) {
        ("admin.USER-CREATE" | "admin.USER-UPDATE", Some("users"), 2) => {
            let user = user_at(1)?;
            if let Some(r) = rep {
                let given = opt_profile::<String>(r, "firstName")?;
                let family = opt_profile::<String>(r, "lastName")?;
                let name = match (&given, &family) {
                    (Some(g), Some(f)) => Some(format!("{g} {f}")),
                    (g, f) => g.clone().or(f.clone()),
                };
                changes.push(Change::User {
                    user: user.clone(),
                    profile: Profile {
                        email: opt_profile::<String>(r, "email")?,
                        username: opt_profile::<String>(r, "username")?,
                        name,
                        given_name: given,
                        family_name: family,
                        avatar_url: None,
                    },
                });
            }
            if let Some(active) = enabled {
                changes.push(Change::UserActive { user, active });
            }
        }
        ("admin.USER-DELETE", Some("users"), 2) => changes.push(Change::UserActive {
            user: user_at(1)?,
            active: false,
        }),
        ("admin.ORGANIZATION-CREATE" | "admin.ORGANIZATION-UPDATE", Some("organizations"), 2) => {
            let tenant = org_at(1)?;
            // idsync names a Keycloak organization by its alias, as the token's `organization` claim does.
            let name = rep
                .and_then(|r| {
                    opt_str(r, "alias")
                        .ok()
                        .flatten()
                        .or(opt_str(r, "name").ok().flatten())
                })
                .map(str::to_owned);
            changes.push(Change::Organization {
                tenant: tenant.clone(),
                name,
            });
            if let Some(active) = enabled {
                changes.push(Change::OrganizationActive { tenant, active });
            }
        }
        ("admin.ORGANIZATION-DELETE", Some("organizations"), 2) => {
            changes.push(Change::OrganizationActive {
                tenant: org_at(1)?,
                active: false,
            })
        }
        // Keycloak names the member only by username on creation (`organizations/{id}/members`).
        ("admin.ORGANIZATION_MEMBERSHIP-CREATE", Some("organizations"), 3) => {
            let username = string(obj, &["details", "username"])
                .ok_or(EventError::Missing("details.username"))?;
            changes.push(Change::Membership {
                user: UserRef::Username(username.to_owned()),
                tenant: org_at(1)?,
                active: true,
                idp_roles: None,
            });
        }
        ("admin.ORGANIZATION_MEMBERSHIP-DELETE", Some("organizations"), 4) => {
            changes.push(Change::Membership {
                user: UserRef::Id(user_at(3)?),
                tenant: org_at(1)?,
                active: false,
                idp_roles: None,
            })
        }
        ("access.LOGOUT", _, _) => {
            let sid = string(obj, &["authDetails", "sessionId"])
                .ok_or(EventError::Missing("authDetails.sessionId"))?;
            changes.push(Change::SessionEnded {
                user: subject_of_user_event()?,
                sid: sid.to_owned(),
            });
        }
        ("access.DELETE_ACCOUNT", _, _) => changes.push(Change::UserActive {
            user: subject_of_user_event()?,
            active: false,
        }),
        _ => return Ok(None),
    }
    Ok(Some(Event {
        kind: kind.to_owned(),
        at_ms: field(obj, &["time"]).and_then(Value::as_i64),
        realm: string(obj, &["realmName"]).map(str::to_owned),
        changes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ClaimPath, Dialect};
    use serde_json::json;

    fn rules(prefix: Option<&str>) -> MappingRules {
        MappingRules {
            dialect: Dialect::Frontegg,
            tenant_claim: ClaimPath::new("tenant_id").unwrap(),
            roles_claim: ClaimPath::new("roles").unwrap(),
            id_prefix: prefix.map(Into::into),
        }
    }

    fn sub(s: &str) -> Subject {
        Subject::parse("t", s).unwrap()
    }

    fn tid(s: &str) -> TenantId {
        TenantId::parse("t", s).unwrap()
    }

    #[test]
    fn frontegg_removal_from_a_tenant_is_a_membership_change() {
        let body = json!({
            "eventKey": "frontegg.user.removedFromTenant",
            "eventContext": {"tenantId": "t-1", "userId": "actor"},
            "user": {"id": "u-1", "email": "u@example.com", "roles": []}
        });
        let e = frontegg(&body, &rules(None)).unwrap().unwrap();
        assert_eq!(
            e.changes,
            [Change::Membership {
                user: UserRef::Id(sub("u-1")),
                tenant: tid("t-1"),
                active: false,
                idp_roles: None
            }]
        );
    }

    #[test]
    fn frontegg_invitations_carry_role_keys_and_ids_get_the_issuers_prefix() {
        let body = json!({
            "eventKey": "frontegg.user.invitedToTenant",
            "eventContext": {"tenantId": "t-2"},
            "user": {"id": "u-1", "name": "Ann", "roles": [{"key": "Admin", "name": "Admin"}]}
        });
        let e = frontegg(&body, &rules(Some("fe:"))).unwrap().unwrap();
        assert_eq!(
            e.changes[1],
            Change::Membership {
                user: UserRef::Id(sub("fe:u-1")),
                tenant: tid("fe:t-2"),
                active: true,
                idp_roles: Some(vec!["Admin".into()])
            }
        );
    }

    #[test]
    fn unknown_events_are_ignored_and_broken_ones_refused() {
        let r = rules(None);
        assert_eq!(
            frontegg(&json!({"eventKey": "frontegg.user.authenticated"}), &r),
            Ok(None)
        );
        assert_eq!(keycloak(&json!({"type": "access.LOGIN"}), &r), Ok(None));
        assert!(frontegg(&json!({"eventKey": "frontegg.user.deleted"}), &r).is_err());
        assert!(frontegg(&json!([1]), &r).is_err());
    }

    #[test]
    fn keycloak_admin_events_map_to_changes() {
        let r = rules(None);
        let disabled = json!({
            "type": "admin.USER-UPDATE", "time": 1_700_000_000_123_i64, "realmName": "acme",
            "resourceType": "USER", "operationType": "UPDATE", "resourcePath": "users/u-9",
            "representation": "{\"enabled\":false,\"email\":\"x@example.com\"}"
        });
        let e = keycloak(&disabled, &r).unwrap().unwrap();
        assert_eq!(e.at_ms, Some(1_700_000_000_123));
        assert_eq!(e.realm.as_deref(), Some("acme"));
        assert!(e.changes.contains(&Change::UserActive {
            user: sub("u-9"),
            active: false
        }));
        let joined = json!({
            "type": "admin.ORGANIZATION_MEMBERSHIP-CREATE", "resourcePath": "organizations/o-1/members",
            "details": {"username": "ann", "email": "ann@example.com"}
        });
        assert_eq!(
            keycloak(&joined, &r).unwrap().unwrap().changes,
            [Change::Membership {
                user: UserRef::Username("ann".into()),
                tenant: tid("o-1"),
                active: true,
                idp_roles: None
            }]
        );
        let left = json!({"type": "admin.ORGANIZATION_MEMBERSHIP-DELETE", "resourcePath": "organizations/o-1/members/u-9"});
        assert!(matches!(
            &keycloak(&left, &r).unwrap().unwrap().changes[0],
            Change::Membership { active: false, .. }
        ));
        let logout =
            json!({"type": "access.LOGOUT", "authDetails": {"userId": "u-9", "sessionId": "s-1"}});
        assert_eq!(
            keycloak(&logout, &r).unwrap().unwrap().changes,
            [Change::SessionEnded {
                user: sub("u-9"),
                sid: "s-1".into()
            }]
        );
    }
}
