//! Frontegg dialect: who the caller is depends on the token `type`; tenant from `tenantId`, allowed list from `tenantIds`.

use super::claims::{opt_profile, opt_str, opt_subject, opt_tenant, string_list, tenant_ids};
use super::{Identity, IdentityError, standard_profile};
use serde_json::{Map, Value};

pub(super) fn map(claims: &Map<String, Value>) -> Result<Identity, IdentityError> {
    let mut identity = standard_profile(claims)?;
    let kind = opt_str(claims, "type")?.unwrap_or("userToken");
    identity.subject = match kind {
        "userToken" => Some(required(claims, "sub")?),
        "userApiToken" => Some(match opt_subject(claims, "createdByUserId")? {
            Some(id) => id,
            None => required(claims, "userId")?,
        }),
        "userAccessToken" => Some(required(claims, "userId")?),
        "tenantApiToken" | "tenantAccessToken" => None,
        other => return Err(IdentityError::UnsupportedTokenType(other.to_owned())),
    };
    identity.extras_mut().avatar_url = opt_profile(claims, "profilePictureUrl")?;
    identity.roles = string_list(claims.get("roles"), "roles")?.into();
    identity.extras_mut().permissions =
        string_list(claims.get("permissions"), "permissions")?.into();
    identity.extras_mut().metadata = match claims.get("metadata") {
        None | Some(Value::Null) => None,
        Some(v) => Some(Box::new(v.clone())),
    };
    identity.extras_mut().tenant_sources.push("tenantId".into());
    identity.tenant = opt_tenant(claims, "tenantId")?;
    identity.tenants = tenant_ids(claims.get("tenantIds"), "tenantIds")?.into();
    if identity.tenant.is_none() && identity.subject.is_none() {
        // A tenant-level token that names no tenant identifies nobody.
        return Err(IdentityError::InvalidClaim {
            claim: "tenantId".into(),
            reason: format!("is required for `{kind}` tokens"),
        });
    }
    Ok(identity)
}

fn required(claims: &Map<String, Value>, claim: &str) -> Result<super::Subject, IdentityError> {
    opt_subject(claims, claim)?.ok_or_else(|| IdentityError::MissingSubject(claim.to_owned()))
}
