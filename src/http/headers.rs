//! The headers idsync owns: stripped from every incoming request, then set from the verified identity.
//! Pure functions over a `HeaderMap`, so the security-critical list is unit-tested on its own.
//!
//! Names are compared canonically: lowercase (HTTP names are case-insensitive) and with `_` folded to
//! `-`, because CGI, WSGI and Rack servers fold both into one `HTTP_X_USER_ID` variable (the Puma
//! CVE-2024-45614 class): `X_User_Id: evil` must never reach an app next to the real `X-User-Id`.

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
    /// `<prefix>Idsync-Synced` and friends live under these prefixes (canonical form).
    idsync_prefixes: Vec<String>,
    /// Every owned name in canonical form: the configured set, and the default `X-` set too, so an app
    /// that still reads `X-User-Id` after a prefix change cannot be fed a client's copy.
    owned: Vec<String>,
}

/// The form names are compared in: lowercase, `_` folded to `-`. Borrows when nothing needs folding.
pub fn canonical(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().any(|b| b == b'_' || b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase().replace('_', "-"))
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

impl HeaderNames {
    pub fn new(prefix: &str) -> Result<Self, String> {
        let name = |suffix: &str| {
            let n = HeaderName::try_from(format!("{prefix}{suffix}"))
                .map_err(|_| "does not make valid header names".to_string())?;
            // Made static (a few bytes, once per configuration): every admitted request clones these
            // names into its headers, and a static name's clone and drop are free where a shared one's
            // are two atomic operations.
            Ok::<_, String>(HeaderName::from_static(Box::leak(
                n.as_str().to_owned().into_boxed_str(),
            )))
        };
        let mut owned = Vec::new();
        for p in [prefix, DEFAULT_PREFIX] {
            for suffix in OWNED {
                let n = HeaderName::try_from(format!("{p}{suffix}"))
                    .map_err(|_| "does not make valid header names".to_string())?;
                let n = canonical(n.as_str()).into_owned();
                if !owned.contains(&n) {
                    owned.push(n);
                }
            }
        }
        let mut idsync_prefixes = vec![canonical(&format!("{prefix}idsync-")).into_owned()];
        if canonical(prefix) != canonical(DEFAULT_PREFIX) {
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
            owned,
        })
    }

    /// Whether `name`, in any spelling (case, `_` for `-`), is one idsync sets, under the configured
    /// prefix or the default one.
    pub fn owns(&self, name: &str) -> bool {
        let name = canonical(name);
        self.owned.iter().any(|n| *n == name)
            || self
                .idsync_prefixes
                .iter()
                .any(|p| name.starts_with(p.as_str()))
    }

    pub fn idsync(&self, suffix: &str) -> HeaderName {
        HeaderName::try_from(format!(
            "{}{}",
            self.idsync_prefixes[0],
            suffix.to_ascii_lowercase()
        ))
        .expect("prefix validated at construction")
    }

    /// Every owned header in its canonical spelling (for proxies that must be told which to clear).
    pub fn all_owned(&self) -> impl Iterator<Item = &str> {
        self.owned.iter().map(String::as_str)
    }
}

/// Removes every header idsync owns, and applies the client's hop-by-hop list now, before anything is
/// injected. Runs first, on every request, authenticated or not.
///
/// RFC 9110 section 7.6.1 makes every header `Connection` names hop-by-hop; removed after injection, a
/// client's `Connection: X-User-Id` would delete what idsync set. So the named headers go here, and
/// `Connection` keeps only `upgrade` (what the proxy needs to splice an upgrade). One pass over the
/// handful of headers a client sent; the list to remove stays empty (no allocation) on an honest request.
pub fn strip(headers: &mut HeaderMap, names: &HeaderNames) {
    let mut remove: Vec<HeaderName> = headers
        .keys()
        .filter(|k| names.owns(k.as_str()))
        .cloned()
        .collect();
    let mut upgrade = false;
    let mut nominated = false;
    for value in headers.get_all(http::header::CONNECTION) {
        for token in value.to_str().unwrap_or_default().split(',') {
            let token = token.trim();
            if token.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
                continue;
            }
            nominated = true;
            if let Ok(n) = HeaderName::try_from(token)
                && !matches!(n.as_str(), "keep-alive" | "close")
            {
                remove.push(n);
            }
        }
    }
    if nominated {
        headers.remove(http::header::CONNECTION);
        if upgrade {
            headers.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
        }
    }
    for n in remove {
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
    set(&names.user_role, v.role().map(value));
    set(&names.tenant_id, v.tenant_id().map(value));
    set(&names.tenant_ids, list(tenant_ids));
    set(&names.tenant_slug, v.tenant_slug().map(value));
    set(&names.tenant_schema, v.tenant_schema().map(value));
    if !v.synced {
        headers.insert(names.idsync("Synced"), HeaderValue::from_static("false"));
    }
}

/// A header value that is always safe: printable ASCII passes as is; any other byte, and `%` itself, is
/// percent-encoded (RFC 3986 style), so CR/LF can never split a header and the upstream can decode exactly.
pub fn value(s: &str) -> HeaderValue {
    encode(s)
}

fn list<'a, S: AsRef<str> + ?Sized + 'a>(
    items: impl Iterator<Item = &'a S>,
) -> Option<HeaderValue> {
    let mut joined = String::new();
    let mut any = false;
    for item in items {
        if any {
            joined.push(',');
        }
        any = true;
        encode_into(&mut joined, item.as_ref(), true);
    }
    any.then(|| HeaderValue::from_str(&joined).expect("encoded values are visible ASCII"))
}

fn encode(s: &str) -> HeaderValue {
    // Nearly every id, name and role is plain already: one check and one copy, no String in between.
    if s.bytes().all(|b| plain(b, false)) {
        return HeaderValue::from_str(s).expect("plain bytes are visible ASCII");
    }
    let mut out = String::with_capacity(s.len() + 8);
    encode_into(&mut out, s, false);
    HeaderValue::from_str(&out).expect("encoded values are visible ASCII")
}

/// Passes unencoded: printable ASCII but `%` (and `,` in a list, where it separates items).
fn plain(b: u8, in_list: bool) -> bool {
    (0x20..0x7f).contains(&b) && b != b'%' && !(in_list && b == b',')
}

fn encode_into(out: &mut String, s: &str, in_list: bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut rest = s.as_bytes();
    loop {
        let run = rest
            .iter()
            .position(|&b| !plain(b, in_list))
            .unwrap_or(rest.len());
        // A run of plain bytes is ASCII, so UTF-8 on its own: copied whole.
        out.push_str(std::str::from_utf8(&rest[..run]).expect("plain bytes are ASCII"));
        let Some(&b) = rest.get(run) else {
            return;
        };
        out.push('%');
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
        rest = &rest[run + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::Scope;
    use std::sync::Arc;

    fn tenant(id: &str, role: Option<&str>) -> Option<Arc<Scope>> {
        Scope {
            tenant_id: Some(id.into()),
            role: role.map(Into::into),
            ..Default::default()
        }
        .into_shared()
    }

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
    fn underscore_and_case_twins_of_owned_names_are_stripped() {
        let names = HeaderNames::new("X-").unwrap();
        let mut h = HeaderMap::new();
        for n in [
            "x_user_id",
            "X_Tenant_Id",
            "x-user_role",
            "x_idsync_synced",
            "X_IDSYNC-Whatever",
        ] {
            h.append(
                HeaderName::try_from(n).unwrap(),
                HeaderValue::from_static("evil"),
            );
        }
        h.insert("x_request_id", HeaderValue::from_static("kept: not ours"));
        strip(&mut h, &names);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(names.owns("X_USER_ID") && names.owns("x-tenant_ids"));
        assert!(!names.owns("x-user-idx") && !names.owns("x_request_id"));
    }

    #[test]
    fn connection_cannot_name_an_injected_header_away() {
        let names = HeaderNames::new("X-").unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-User-Id, x_tenant_id, X-Trace, Upgrade"),
        );
        h.insert("x-trace", HeaderValue::from_static("hop"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip(&mut h, &names);
        assert_eq!(
            h[http::header::CONNECTION],
            "upgrade",
            "only the upgrade token is left"
        );
        assert!(
            h.get("x-trace").is_none(),
            "a nominated header is hop-by-hop"
        );
        assert_eq!(h["upgrade"], "websocket");
        let view = Provisioned {
            user_id: Some("u-1".into()),
            scope: tenant("t-1", None),
            synced: false,
            ..Default::default()
        };
        set_identity(&mut h, &names, &view, &[], std::iter::empty());
        // What the proxy does next: hop-by-hop removal by the (now clean) Connection header.
        let listed: Vec<String> = h
            .get_all(http::header::CONNECTION)
            .iter()
            .flat_map(|v| {
                v.to_str()
                    .unwrap()
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
            })
            .collect();
        assert!(listed.iter().all(|t| !names.owns(t)), "{listed:?}");
        assert_eq!(h["x-user-id"], "u-1");
        assert_eq!(h["x-idsync-synced"], "false");
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
            scope: tenant("t-1", None),
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
            scope: tenant("t-2", Some("viewer")),
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
        assert_eq!(
            list(["a,b", "\u{e9}%", "plain", "\u{1F600}x"].iter()).unwrap(),
            "a%2Cb,%C3%A9%25,plain,%F0%9F%98%80x"
        );
        // Byte by byte, as encoding was first written: the runs copied whole give the same text.
        let by_byte = |s: &str, in_list: bool| -> String {
            s.bytes()
                .map(|b| {
                    if plain(b, in_list) {
                        char::from(b).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        };
        for s in [
            "",
            "%",
            "a%b,c",
            "\r\n",
            "tr\u{e8}s,\u{fc}ber%",
            "\u{7f}\u{80}",
            "x,",
        ] {
            for in_list in [false, true] {
                let mut out = String::new();
                encode_into(&mut out, s, in_list);
                assert_eq!(out, by_byte(s, in_list), "{s:?}");
            }
            assert_eq!(value(s), by_byte(s, false).as_str());
        }
    }

    #[test]
    fn an_invalid_prefix_is_refused() {
        assert!(HeaderNames::new("X Bad ").is_err());
    }
}
