//! Keycloak 24-26 dialect: realm and client roles, the `organization` claim in all its shapes, access tokens only.

use super::claims::{opt_str, opt_subject, push_unique, string_list};
use super::generic::apply_tenant_claim;
use super::{Identity, IdentityError, MappingRules, TenantId, standard_profile};
use serde_json::{Map, Value};

pub(super) fn map(
    claims: &Map<String, Value>,
    rules: &MappingRules,
) -> Result<Identity, IdentityError> {
    // Keycloak stamps every token with its purpose; only `Bearer` (access) tokens authorise requests.
    if let Some(typ) = opt_str(claims, "typ")?
        && !typ.eq_ignore_ascii_case("Bearer")
    {
        return Err(IdentityError::NotAnAccessToken(typ.to_owned()));
    }
    let mut identity = standard_profile(claims)?;
    identity.subject = Some(
        opt_subject(claims, "sub")?.ok_or_else(|| IdentityError::MissingSubject("sub".into()))?,
    );
    if identity.name.is_none() {
        identity.name = identity.username.clone();
    }

    let mut roles = string_list(
        claims.get("realm_access").and_then(|r| r.get("roles")),
        "realm_access.roles",
    )?;
    if let Some(azp) = opt_str(claims, "azp")? {
        let client_roles = string_list(
            claims
                .get("resource_access")
                .and_then(|r| r.get(azp))
                .and_then(|c| c.get("roles")),
            "resource_access.roles",
        )?;
        push_unique(&mut roles, client_roles);
    }
    identity.roles = roles.into();

    identity
        .extras_mut()
        .tenant_sources
        .push("organization".into());
    let orgs = organizations(claims.get("organization"))?;
    if orgs.is_empty() {
        apply_tenant_claim(&mut identity, claims, rules)?;
    } else {
        identity.tenant = orgs.first().map(|(id, _)| id.clone());
        identity.tenants = orgs.iter().map(|(id, _)| id.clone()).collect();
        identity.extras_mut().tenant_names = orgs
            .into_iter()
            .filter_map(|(id, alias)| Some((id, alias?)))
            .collect::<Vec<_>>()
            .into();
    }
    Ok(identity)
}

/// The Keycloak Organizations claim: a list of aliases, a map of alias -> `{ "id": .. }` (the id wins,
/// an alias can be renamed), or one alias string. Order follows the token. Each id comes with its alias
/// when the alias is not the id itself.
fn organizations(value: Option<&Value>) -> Result<Vec<(TenantId, Option<String>)>, IdentityError> {
    const CLAIM: &str = "organization";
    let mut out: Vec<(TenantId, Option<String>)> = Vec::new();
    let mut push = |id: TenantId, alias: Option<String>| {
        if !out.iter().any(|(x, _)| *x == id) {
            out.push((id, alias));
        }
    };
    match value {
        None | Some(Value::Null) => {}
        Some(Value::String(alias)) => push(TenantId::parse(CLAIM, alias)?, None),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(alias) => push(TenantId::parse(CLAIM, alias)?, None),
                    _ => {
                        return Err(IdentityError::InvalidClaim {
                            claim: CLAIM.into(),
                            reason: "holds a non-string item".into(),
                        });
                    }
                }
            }
        }
        Some(Value::Object(map)) => {
            for (alias, details) in map {
                let id = match details.get("id") {
                    Some(Value::String(id)) => id.as_str(),
                    None | Some(Value::Null) => alias.as_str(),
                    Some(_) => {
                        return Err(IdentityError::InvalidClaim {
                            claim: "organization.id".into(),
                            reason: "is not a string".into(),
                        });
                    }
                };
                let alias = (id != alias.as_str()).then(|| alias.clone());
                push(TenantId::parse(CLAIM, id)?, alias);
            }
        }
        Some(_) => {
            return Err(IdentityError::InvalidClaim {
                claim: CLAIM.into(),
                reason: "is neither a list, a map nor a string".into(),
            });
        }
    }
    if out.len() > super::MAX_LIST_ITEMS {
        return Err(IdentityError::InvalidClaim {
            claim: CLAIM.into(),
            reason: format!("lists more than {} organizations", super::MAX_LIST_ITEMS),
        });
    }
    Ok(out)
}
