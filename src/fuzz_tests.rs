//! Bounded property tests (proptest, in CI) over the parsers that see attacker input: token splitting and
//! claim parsing, identity mapping from arbitrary JSON, and header value encoding.

use crate::http::headers;
use crate::identity::{ClaimPath, Dialect, MappingRules, map_claims};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Claims that use the names the dialects read, with arbitrary values, plus arbitrary extra keys.
fn claims() -> impl Strategy<Value = Map<String, Value>> {
    let names = prop::sample::select(vec![
        "sub",
        "iss",
        "email",
        "email_verified",
        "name",
        "preferred_username",
        "typ",
        "type",
        "azp",
        "realm_access",
        "resource_access",
        "organization",
        "tenant_id",
        "tenantId",
        "tenantIds",
        "roles",
        "permissions",
        "userId",
        "createdByUserId",
        "metadata",
        "profilePictureUrl",
    ]);
    prop::collection::vec((names, json_value()), 0..12)
        .prop_map(|pairs| pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).expect("valid escape"));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn token_splitting_never_panics_on_any_input(s in ".{0,300}") {
        let _ = crate::oidc::decode_unverified(&s);
    }

    #[test]
    fn token_splitting_never_panics_on_jwt_shaped_input(h in "[A-Za-z0-9_=+/-]{0,60}", p in "[A-Za-z0-9_=+/-]{0,60}", sig in "[A-Za-z0-9_-]{0,40}") {
        let _ = crate::oidc::decode_unverified(&format!("{h}.{p}.{sig}"));
    }

    #[test]
    fn identity_mapping_never_panics_and_respects_its_limits(c in claims(), dialect in prop::sample::select(vec![Dialect::Generic, Dialect::Keycloak, Dialect::Frontegg])) {
        let rules = MappingRules { dialect, tenant_claim: ClaimPath::new("tenant_id").unwrap(), roles_claim: ClaimPath::new("roles").unwrap(), id_prefix: None };
        if let Ok(id) = map_claims("https://issuer.example.com", &c, &rules) {
            prop_assert!(id.roles.len() <= crate::identity::MAX_LIST_ITEMS);
            prop_assert!(id.tenants.len() <= crate::identity::MAX_LIST_ITEMS);
            if let Some(s) = &id.subject {
                prop_assert!(!s.as_str().is_empty() && !s.as_str().chars().any(char::is_control));
            }
            if let Some(t) = &id.tenant {
                prop_assert!(id.tenants.contains(t));
            }
        }
    }

    #[test]
    fn header_values_are_always_printable_and_decode_back_exactly(s in "\\PC{0,80}|[\\x00-\\x7f]{0,40}") {
        let v = headers::value(&s);
        let text = v.to_str().expect("visible ASCII");
        prop_assert!(text.bytes().all(|b| (0x20..0x7f).contains(&b)));
        prop_assert!(!text.contains('\r') && !text.contains('\n'));
        prop_assert_eq!(percent_decode(text), s.as_bytes().to_vec());
    }
}
