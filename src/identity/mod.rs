//! Pure identity core: verified claims + the issuer's dialect -> [`Identity`].
//! No I/O and no clock: everything here is a function of its inputs, so every IdP shape is unit-tested from fixtures.

mod claims;
mod frontegg;
mod generic;
mod keycloak;
pub mod lifecycle;
mod membership;
mod roles;
pub mod shared;

use serde::Serialize;
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;

/// An immutable shared string in one pointer (8 bytes, its length in the allocation) where `Arc<str>`
/// takes two: the ids, email, name and username of a cached identity and the strings of a synced view
/// are one, so each such field costs half as much in every cache entry. (The rarer profile parts in
/// [`Extras`] and the list items stay owned strings: they are boxed or shared already.)
pub type SharedStr = arcstr::ArcStr;

pub use claims::ClaimPath;
pub use membership::{Origin, RolePlan, RoleSource, StoredMembership};
pub use roles::{RoleMap, RoleMapError};
pub use shared::SharedList;

/// Longest identifier (subject, tenant id) idsync accepts; longer ones are not ids but payloads.
pub const MAX_ID_BYTES: usize = 255;
/// Longest profile string (email, name, ...) idsync accepts.
pub const MAX_PROFILE_BYTES: usize = 1024;
/// Most roles (or permissions, or tenants) one token may carry.
pub const MAX_LIST_ITEMS: usize = 256;

/// Which IdP's claim conventions a token follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    Generic,
    Keycloak,
    Frontegg,
}

impl Dialect {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "generic" => Some(Self::Generic),
            "keycloak" => Some(Self::Keycloak),
            "frontegg" => Some(Self::Frontegg),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Generic => "generic",
            Self::Keycloak => "keycloak",
            Self::Frontegg => "frontegg",
        }
    }
}

/// How one issuer's claims become an [`Identity`].
#[derive(Clone, Debug)]
pub struct MappingRules {
    pub dialect: Dialect,
    /// Where the tenant lives when the dialect has no native tenant claim (or as Keycloak's fallback).
    pub tenant_claim: ClaimPath,
    /// Where generic roles live.
    pub roles_claim: ClaimPath,
    /// Put before every user and tenant id of this issuer (`id-prefix=`), so two issuers whose ids
    /// overlap can share one database.
    pub id_prefix: Option<Box<str>>,
}

impl MappingRules {
    /// `raw` as this issuer's id is stored and forwarded.
    pub fn scoped<'a>(&self, raw: &'a str) -> std::borrow::Cow<'a, str> {
        match &self.id_prefix {
            Some(p) => std::borrow::Cow::Owned(format!("{p}{raw}")),
            None => std::borrow::Cow::Borrowed(raw),
        }
    }

    pub fn subject(&self, claim: &str, raw: &str) -> Result<Subject, IdentityError> {
        Subject::parse(claim, &self.scoped(raw))
    }

    pub fn tenant_id(&self, claim: &str, raw: &str) -> Result<TenantId, IdentityError> {
        TenantId::parse(claim, &self.scoped(raw))
    }
}

/// Checks an identifier the IdP owns (a `sub`, a tenant id): non-empty, at most [`MAX_ID_BYTES`], no
/// control characters.
fn check_id(claim: &str, raw: &str) -> Result<(), IdentityError> {
    if raw.is_empty() {
        return Err(IdentityError::invalid(claim, "is empty"));
    }
    if raw.len() > MAX_ID_BYTES {
        return Err(IdentityError::invalid(
            claim,
            format!("is longer than {MAX_ID_BYTES} bytes"),
        ));
    }
    if raw.chars().any(char::is_control) {
        return Err(IdentityError::invalid(claim, "contains control characters"));
    }
    Ok(())
}

/// Distinct types for the IdP's ids, so a user id can never be passed where a tenant id is meant.
/// Reference-counted: a tenant id is shared by every identity of the tenant ([`shared::SharedParts`]),
/// a user id by the token entry and the synced view.
macro_rules! idp_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(SharedStr);

        impl $name {
            /// Validates `raw` as read from `claim` (named in the error).
            pub fn parse(claim: &str, raw: &str) -> Result<Self, IdentityError> {
                check_id(claim, raw)?;
                Ok(Self(raw.into()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The shared string itself.
            pub fn as_shared(&self) -> &SharedStr {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }
    };
}

idp_id!(
    /// The user's id at the IdP (`sub`, or Frontegg's `userId`/`createdByUserId`).
    Subject
);
idp_id!(
    /// The tenant's id at the IdP (Frontegg `tenantId`, Keycloak organization id, or the configured claim).
    TenantId
);

/// Who is calling, as the IdP says, in one shape whatever the IdP.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Identity {
    /// Shared by every identity of the same issuer.
    pub issuer: SharedStr,
    pub dialect: Dialect,
    /// `None` only for tenant-level tokens (Frontegg `tenantApiToken`/`tenantAccessToken`).
    pub subject: Option<Subject>,
    /// The tenant the token is for, if it names one.
    pub tenant: Option<TenantId>,
    /// Every tenant the token allows the caller to act in (includes `tenant`). Lists, like the role
    /// lists, are shared by every identity that carries the same one ([`shared::SharedParts`]).
    pub tenants: SharedList<TenantId>,
    /// Reference-counted so the synced view can share them rather than copy.
    pub email: Option<SharedStr>,
    pub email_verified: Option<bool>,
    pub name: Option<SharedStr>,
    /// Every Keycloak token has one; `name` falls back to it (the same string, shared).
    pub username: Option<SharedStr>,
    /// Raw IdP roles, in token order, without duplicates.
    pub roles: SharedList<String>,
    /// The rest of the profile and the rarer parts; `None` when the token carries none of them, so a
    /// cached identity does not hold a row of empty fields (a token lives in the cache for its lifetime).
    #[serde(flatten)]
    pub extras: Option<Box<Extras>>,
}

/// The parts of an [`Identity`] many tokens leave out.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Extras {
    pub given_name: Option<Box<str>>,
    pub family_name: Option<Box<str>>,
    pub avatar_url: Option<Box<str>>,
    /// Display names the token gives for tenants (Keycloak organization aliases).
    /// Shared like the tenant lists: the members of the same organizations hold one copy.
    pub tenant_names: Arc<[(TenantId, String)]>,
    pub permissions: SharedList<String>,
    /// Boxed: a JSON value is larger than all the other fields together.
    pub metadata: Option<Box<Value>>,
    /// Where the tenant was looked for, to explain a missing one; empty when a tenant was found.
    #[serde(skip)]
    pub tenant_sources: Vec<String>,
}

impl Default for Identity {
    fn default() -> Self {
        Self {
            issuer: SharedStr::default(),
            dialect: Dialect::Generic,
            subject: None,
            tenant: None,
            tenants: SharedList::default(),
            email: None,
            email_verified: None,
            name: None,
            username: None,
            roles: SharedList::default(),
            extras: None,
        }
    }
}

impl Identity {
    /// The rarer parts, made on first write.
    pub fn extras_mut(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Default::default)
    }

    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    pub fn given_name(&self) -> Option<&str> {
        self.extras.as_ref()?.given_name.as_deref()
    }

    pub fn family_name(&self) -> Option<&str> {
        self.extras.as_ref()?.family_name.as_deref()
    }

    pub fn avatar_url(&self) -> Option<&str> {
        self.extras.as_ref()?.avatar_url.as_deref()
    }

    pub fn tenant_names(&self) -> &[(TenantId, String)] {
        self.extras.as_ref().map_or(&[], |e| &e.tenant_names)
    }

    pub fn permissions(&self) -> &[String] {
        self.extras.as_ref().map_or(&[], |e| &e.permissions)
    }

    pub fn metadata(&self) -> Option<&Value> {
        self.extras.as_ref()?.metadata.as_deref()
    }

    /// Where the tenant was looked for, to explain a missing one; empty when a tenant was found.
    pub fn tenant_sources(&self) -> &[String] {
        self.extras.as_ref().map_or(&[], |e| &e.tenant_sources)
    }

    /// The display name the token gives `tenant` (a Keycloak organization alias), if any.
    pub fn tenant_name(&self, tenant: &str) -> Option<&str> {
        self.tenant_names()
            .iter()
            .find(|(id, _)| id.as_str() == tenant)
            .map(|(_, n)| n.as_str())
    }

    /// An estimate of the heap memory this identity holds (strings, lists, metadata), for byte-bounded
    /// caches. Tenant ids and lists are usually shared with other identities ([`shared::SharedParts`]),
    /// but are counted as if owned: the bound must hold even when every cached token carries a list of
    /// its own (a user in 200 tenants of their own, say).
    pub fn heap_size(&self) -> usize {
        let shared = |s: &Option<SharedStr>| s.as_ref().map_or(0, |s| s.len() + 16);
        let id = |t: &TenantId| t.as_str().len() + 16;
        // A shared list: nothing when empty, else its counters and boxed slice (32 bytes) and the items.
        let items = |n: usize| if n == 0 { 0 } else { 32 };
        let tenants = items(self.tenants.len())
            + (self.tenants.iter())
                .map(|t| std::mem::size_of::<TenantId>() + id(t))
                .sum::<usize>();
        let list = |l: &[String]| items(l.len()) + l.iter().map(|r| r.len() + 24).sum::<usize>();
        let username = match (&self.username, &self.name) {
            (Some(u), Some(n)) if SharedStr::ptr_eq(u, n) => 0,
            _ => shared(&self.username),
        };
        shared(&self.email)
            + shared(&self.name)
            + username
            + self.subject.as_ref().map_or(0, |s| s.as_str().len() + 16)
            + self.tenant.as_ref().map_or(0, id)
            + tenants
            + list(&self.roles)
            + self.extras.as_ref().map_or(0, |e| e.heap_size())
    }

    /// Whether the token lets the caller act in `tenant` (its own tenant or one of its listed tenants).
    pub fn allows_tenant(&self, tenant: &str) -> bool {
        self.tenant.as_ref().is_some_and(|t| t.as_str() == tenant)
            || self.tenants.iter().any(|t| t.as_str() == tenant)
    }

    /// Whether the token's roles speak for `tenant`. Frontegg scopes `roles` to the token's `tenantId`
    /// alone (`tenantIds` only lists where the user may switch); Keycloak and generic tokens assert every
    /// tenant in their tenant claim, and realm-wide roles apply to those memberships only.
    pub fn asserts_tenant(&self, tenant: &str) -> bool {
        match self.dialect {
            Dialect::Frontegg => self.tenant.as_ref().is_some_and(|t| t.as_str() == tenant),
            Dialect::Keycloak | Dialect::Generic => {
                self.tenants.iter().any(|t| t.as_str() == tenant)
            }
        }
    }
}

impl Extras {
    fn heap_size(&self) -> usize {
        let boxed = |s: &Option<Box<str>>| s.as_ref().map_or(0, |s| s.len());
        std::mem::size_of::<Self>()
            + boxed(&self.given_name)
            + boxed(&self.family_name)
            + boxed(&self.avatar_url)
            + 16
            + self
                .tenant_names
                .iter()
                .map(|(t, n)| {
                    t.as_str().len() + 16 + n.capacity() + std::mem::size_of::<(TenantId, String)>()
                })
                .sum::<usize>()
            // A shared list: nothing when empty, else its counters and boxed slice.
            + if self.permissions.is_empty() { 0 } else { 32 }
            + self.permissions.iter().map(|p| p.len() + 24).sum::<usize>()
            + self.tenant_sources.iter().map(|r| r.capacity() + 24).sum::<usize>()
            // serde_json keeps a map node per key and a String per value: about twice the text size.
            + self.metadata.as_ref().map_or(0, |m| m.to_string().len() * 2)
    }
}

/// Why verified claims do not make an identity; every variant is a 401 at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("claim `{claim}` {reason}")]
    InvalidClaim { claim: String, reason: String },
    #[error("token has no `{0}` claim (Keycloak lightweight tokens need the `basic` scope)")]
    MissingSubject(String),
    #[error("token type `{0}` is not an access token")]
    NotAnAccessToken(String),
    #[error("Frontegg token type `{0}` is not supported")]
    UnsupportedTokenType(String),
}

impl IdentityError {
    fn invalid(claim: &str, reason: impl Into<String>) -> Self {
        Self::InvalidClaim {
            claim: claim.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Maps verified claims to an identity under `rules`. `issuer` is the configured issuer the token matched.
pub fn map_claims(
    issuer: impl Into<SharedStr>,
    claims: &Map<String, Value>,
    rules: &MappingRules,
) -> Result<Identity, IdentityError> {
    let mut identity = match rules.dialect {
        Dialect::Generic => generic::map(claims, rules)?,
        Dialect::Keycloak => keycloak::map(claims, rules)?,
        Dialect::Frontegg => frontegg::map(claims)?,
    };
    identity.issuer = issuer.into();
    identity.dialect = rules.dialect;
    if let Some(prefix) = &rules.id_prefix {
        if let Some(s) = &identity.subject {
            identity.subject = Some(Subject::parse("sub", &format!("{prefix}{s}"))?);
        }
        let tenant = |t: &TenantId| TenantId::parse("tenant", &format!("{prefix}{t}"));
        identity.tenant = identity.tenant.as_ref().map(tenant).transpose()?;
        identity.tenants = identity
            .tenants
            .iter()
            .map(tenant)
            .collect::<Result<Vec<_>, _>>()?
            .into();
        if let Some(extras) = &mut identity.extras {
            extras.tenant_names = extras
                .tenant_names
                .iter()
                .map(|(t, n)| Ok((tenant(t)?, n.clone())))
                .collect::<Result<Vec<_>, IdentityError>>()?
                .into();
        }
    }
    // Kept only to explain a missing tenant; a found one makes it noise in every cached identity.
    if identity.tenant.is_some()
        && let Some(extras) = &mut identity.extras
    {
        extras.tenant_sources = Vec::new();
    }
    if let Some(tenant) = &identity.tenant
        && !identity.tenants.contains(tenant)
    {
        let mut tenants = Vec::with_capacity(identity.tenants.len() + 1);
        tenants.push(tenant.clone());
        tenants.extend(identity.tenants.iter().cloned());
        identity.tenants = tenants.into();
    }
    if identity.tenants.len() > MAX_LIST_ITEMS {
        return Err(IdentityError::invalid(
            "tenants",
            format!("lists more than {MAX_LIST_ITEMS} tenants"),
        ));
    }
    // Cached for the token's lifetime: no spare capacity (a one-item Vec grows to room for four), and
    // no box of empty fields.
    if let Some(extras) = &mut identity.extras {
        if **extras == Extras::default() {
            identity.extras = None;
        } else {
            extras.tenant_sources.shrink_to_fit();
        }
    }
    Ok(identity)
}

/// The OIDC standard claims every dialect shares; dialects override what they know better.
fn standard_profile(claims: &Map<String, Value>) -> Result<Identity, IdentityError> {
    use claims::{opt_bool, opt_profile};
    let extras = Extras {
        given_name: opt_profile(claims, "given_name")?,
        family_name: opt_profile(claims, "family_name")?,
        avatar_url: opt_profile(claims, "picture")?,
        ..Extras::default()
    };
    Ok(Identity {
        email: opt_profile(claims, "email")?,
        email_verified: opt_bool(claims, "email_verified")?,
        name: opt_profile(claims, "name")?,
        username: opt_profile(claims, "preferred_username")?,
        extras: Some(Box::new(extras)),
        ..Identity::default()
    })
}

#[cfg(test)]
mod tests;
