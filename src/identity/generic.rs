//! Generic OIDC dialect: `sub`, standard profile claims, tenant and roles from configured claim paths.

use super::claims::{opt_subject, string_list, tenant_ids};
use super::{Identity, IdentityError, MappingRules, standard_profile};
use serde_json::{Map, Value};

pub(super) fn map(
    claims: &Map<String, Value>,
    rules: &MappingRules,
) -> Result<Identity, IdentityError> {
    let mut identity = standard_profile(claims)?;
    identity.subject = Some(
        opt_subject(claims, "sub")?.ok_or_else(|| IdentityError::MissingSubject("sub".into()))?,
    );
    if identity.name.is_none() {
        identity.name = identity.username.clone();
    }
    apply_tenant_claim(&mut identity, claims, rules)?;
    identity.roles =
        string_list(rules.roles_claim.lookup(claims), rules.roles_claim.as_str())?.into();
    Ok(identity)
}

/// Reads the configured tenant claim; shared with dialects that fall back to it.
pub(super) fn apply_tenant_claim(
    identity: &mut Identity,
    claims: &Map<String, Value>,
    rules: &MappingRules,
) -> Result<(), IdentityError> {
    let path = rules.tenant_claim.as_str();
    identity.extras_mut().tenant_sources.push(path.to_owned());
    let ids = tenant_ids(rules.tenant_claim.lookup(claims), path)?;
    identity.tenant = ids.first().cloned();
    identity.tenants = ids.into();
    Ok(())
}
