//! The headers idsync owns: stripped from every incoming request, then set from the verified identity.
//! Pure functions over a `HeaderMap`, so the security-critical list is unit-tested on its own.

use crate::access::Admission;
use crate::provision::Provisioned;
use http::{HeaderMap, HeaderName, HeaderValue};

/// Header suffixes idsync controls; each is prefixed with the configured prefix (default `X-`).
const OWNED: &[&str] = &[
    "User-Id",
    "User-Email",
    "User-Name",
    "User-Roles",
    "User-Role",
    "Tenant-Id",
    "Tenant-Ids",
    "Tenant-Slug",
    "Tenant-Schema",
];
const DEFAULT_PREFIX: &str = "X-";

/// The concrete header names for one prefix.
#[derive(Clone, Debug)]
pub struct HeaderNames {
    pub user_id: HeaderName,
    pub user_email: HeaderName,
    pub user_name: HeaderName,
    pub user_roles: HeaderName,
    pub user_role: HeaderName,
    pub tenant_id: HeaderName,
    pub tenant_ids: HeaderName,
    pub tenant_slug: HeaderName,
    pub tenant_schema: HeaderName,
    /// `<prefix>Idsync-Synced` and friends live under this lowercase prefix.
    idsync_prefixes: Vec<String>,
    /// Everything stripped by exact name: the configured set, and the default `X-` set too, so an app
    /// that still reads `X-User-Id` after a prefix change cannot be fed a client's copy.
    strip_exact: Vec<HeaderName>,
}

impl HeaderNames {
    pub fn new(prefix: &str) -> Result<Self, String> {
        let name = |suffix: &str| {
            HeaderName::try_from(format!("{prefix}{suffix}"))
                .map_err(|_| "does not make valid header names".to_string())
        };
        let mut strip_exact = Vec::new();
        for p in [prefix, DEFAULT_PREFIX] {
            for suffix in OWNED {
                let n = HeaderName::try_from(format!("{p}{suffix}"))
                    .map_err(|_| "does not make valid header names".to_string())?;
                if !strip_exact.contains(&n) {
                    strip_exact.push(n);
                }
            }
        }
        let mut idsync_prefixes = vec![format!("{prefix}idsync-").to_ascii_lowercase()];
        if !prefix.eq_ignore_ascii_case(DEFAULT_PREFIX) {
            idsync_prefixes.push("x-idsync-".into());
        }
        Ok(Self {
            user_id: name("User-Id")?,
            user_email: name("User-Email")?,
            user_name: name("User-Name")?,
            user_roles: name("User-Roles")?,
            user_role: name("User-Role")?,
            tenant_id: name("Tenant-Id")?,
            tenant_ids: name("Tenant-Ids")?,
            tenant_slug: name("Tenant-Slug")?,
            tenant_schema: name("Tenant-Schema")?,
            idsync_prefixes,
            strip_exact,
        })
    }

    /// Whether `name` is one idsync sets, under the configured prefix or the default one.
    fn owns(&self, name: &HeaderName) -> bool {
        let s = name.as_str();
        self.strip_exact.iter().any(|n| n.as_str() == s)
            || self
                .idsync_prefixes
                .iter()
                .any(|p| s.starts_with(p.as_str()))
    }

    pub fn idsync(&self, suffix: &str) -> HeaderName {
        HeaderName::try_from(format!(
            "{}{}",
            self.idsync_prefixes[0],
            suffix.to_ascii_lowercase()
        ))
        .expect("prefix validated at construction")
    }
}

/// Removes every header idsync owns. Runs first, on every request, authenticated or not. One pass over
/// the handful of headers a client sent, rather than a hash lookup for each of the 18 owned names; the
/// list to remove stays empty (no allocation) on an honest request.
pub fn strip(headers: &mut HeaderMap, names: &HeaderNames) {
    let owned: Vec<HeaderName> = headers.keys().filter(|k| names.owns(k)).cloned().collect();
    for n in owned {
        headers.remove(n);
    }
}

/// Sets the identity headers for an admitted request. Call after [`strip`]; values are always single,
/// never appended. `X-User-Roles` carries the token's IdP roles only where they speak for the active
/// tenant (a Frontegg token's roles are its own tenant's, not the one switched to).
pub fn inject(headers: &mut HeaderMap, names: &HeaderNames, admitted: &Admission) {
    let identity = &admitted.authenticated.identity;
    set_identity(
        headers,
        names,
        &admitted.view,
        &identity.roles,
        identity.tenants.iter().map(|t| t.as_str()),
    );
}

/// The identity headers from a view and the token's roles and tenants (what `inject` sets; also what
/// `token inspect` prints).
pub fn set_identity<'a>(
    headers: &mut HeaderMap,
    names: &HeaderNames,
    v: &Provisioned,
    idp_roles: &[String],
    tenant_ids: impl Iterator<Item = &'a str>,
) {
    let mut set = |name: &HeaderName, value: Option<HeaderValue>| {
        if let Some(v) = value {
            headers.insert(name.clone(), v);
        }
    };
    set(&names.user_id, v.user_id.as_deref().map(value));
    set(&names.user_email, v.email.as_deref().map(value));
    set(&names.user_name, v.name.as_deref().map(value));
    if v.idp_roles_apply {
        set(&names.user_roles, list(idp_roles.iter()));
    }
    set(&names.user_role, v.role.as_deref().map(value));
    set(&names.tenant_id, v.tenant_id.as_deref().map(value));
    set(&names.tenant_ids, list(tenant_ids));
    set(&names.tenant_slug, v.tenant_slug.as_deref().map(value));
    set(&names.tenant_schema, v.tenant_schema.as_deref().map(value));
    if !v.synced {
        headers.insert(names.idsync("Synced"), HeaderValue::from_static("false"));
    }
}

/// A header value that is always safe: printable ASCII passes as is; any other byte, and `%` itself, is
/// percent-encoded (RFC 3986 style), so CR/LF can never split a header and the upstream can decode exactly.
pub fn value(s: &str) -> HeaderValue {
    encode(s, false)
}

fn list<'a, S: AsRef<str> + ?Sized + 'a>(
    items: impl Iterator<Item = &'a S>,
) -> Option<HeaderValue> {
    let joined: Vec<String> = items
        .map(|i| {
            encode(i.as_ref(), true)
                .to_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    if joined.is_empty() {
        return None;
    }
    Some(HeaderValue::from_str(&joined.join(",")).expect("encoded values are visible ASCII"))
}

fn encode(s: &str, in_list: bool) -> HeaderValue {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let plain = (0x20..0x7f).contains(&b) && b != b'%' && !(in_list && b == b',');
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).expect("encoded values are visible ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spoofed() -> HeaderMap {
        let mut h = HeaderMap::new();
        for n in [
            "x-user-id",
            "X-Tenant-Id",
            "x-tenant-ids",
            "x-user-role",
            "x-user-roles",
            "x-user-email",
            "x-user-name",
            "x-tenant-slug",
            "x-tenant-schema",
            "x-idsync-synced",
            "X-Idsync-Anything",
        ] {
            h.append(
                HeaderName::try_from(n).unwrap(),
                HeaderValue::from_static("spoofed"),
            );
        }
        h.append("x-user-id", HeaderValue::from_static("second-copy"));
        h.insert("accept", HeaderValue::from_static("text/html"));
        h
    }

    #[test]
    fn strip_removes_every_owned_header_and_keeps_the_rest() {
        let mut h = spoofed();
        strip(&mut h, &HeaderNames::new("X-").unwrap());
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["accept"], "text/html");
    }

    #[test]
    fn custom_prefix_strips_both_its_own_and_the_default_names() {
        let names = HeaderNames::new("X-Auth-").unwrap();
        let mut h = spoofed();
        h.insert("x-auth-user-id", HeaderValue::from_static("spoofed"));
        h.insert("x-auth-idsync-synced", HeaderValue::from_static("spoofed"));
        strip(&mut h, &names);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(names.user_id.as_str(), "x-auth-user-id");
    }

    #[test]
    fn inject_sets_single_values_after_strip() {
        let names = HeaderNames::new("X-").unwrap();
        let mut h = spoofed();
        strip(&mut h, &names);
        let view = Provisioned {
            user_id: Some("u-1".into()),
            tenant_id: Some("t-1".into()),
            idp_roles_apply: true,
            synced: false,
            ..Default::default()
        };
        let roles = ["admin".to_string(), "a,b".to_string()];
        set_identity(&mut h, &names, &view, &roles, ["t-1", "t-2"].into_iter());
        assert_eq!(h.get_all("x-user-id").iter().count(), 1);
        assert_eq!(h["x-user-id"], "u-1");
        assert_eq!(h["x-user-roles"], "admin,a%2Cb");
        assert_eq!(h["x-tenant-ids"], "t-1,t-2");
        assert_eq!(h["x-idsync-synced"], "false");
        assert!(h.get("x-user-email").is_none());
    }

    #[test]
    fn idp_roles_are_forwarded_only_where_they_speak_for_the_tenant() {
        let names = HeaderNames::new("X-").unwrap();
        let mut h = HeaderMap::new();
        let view = Provisioned {
            tenant_id: Some("t-2".into()),
            role: Some("viewer".into()),
            idp_roles_apply: false,
            synced: true,
            ..Default::default()
        };
        set_identity(
            &mut h,
            &names,
            &view,
            &["Admin".to_string()],
            std::iter::empty(),
        );
        assert!(h.get("x-user-roles").is_none(), "{h:?}");
        assert_eq!(h["x-user-role"], "viewer");
        assert!(
            h.get("x-idsync-synced").is_none(),
            "synced requests carry no marker"
        );
    }

    #[test]
    fn values_with_crlf_nul_or_non_ascii_are_percent_encoded() {
        assert_eq!(value("a\r\nX-User-Id: admin"), "a%0D%0AX-User-Id: admin");
        assert_eq!(value("nul\0"), "nul%00");
        assert_eq!(value("Zoë"), "Zo%C3%AB");
        assert_eq!(value("100%"), "100%25");
        assert_eq!(value("plain@example.com"), "plain@example.com");
    }

    #[test]
    fn an_invalid_prefix_is_refused() {
        assert!(HeaderNames::new("X Bad ").is_err());
    }
}
