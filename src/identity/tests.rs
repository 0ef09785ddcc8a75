//! Identity mapping from claim fixtures in the shapes Keycloak 26 and Frontegg really issue.

use super::*;
use serde_json::json;

const KEYCLOAK: &str = include_str!("../../tests/fixtures/claims/keycloak-26-access-token.json");
const FRONTEGG: &str = include_str!("../../tests/fixtures/claims/frontegg-user-token.json");
const ORG_SHAPES: &str =
    include_str!("../../tests/fixtures/claims/keycloak-organization-claim-shapes.json");

fn rules(dialect: Dialect) -> MappingRules {
    MappingRules {
        dialect,
        tenant_claim: ClaimPath::new("tenant_id").unwrap(),
        roles_claim: ClaimPath::new("roles").unwrap(),
        id_prefix: None,
    }
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn fixture(s: &str) -> Map<String, Value> {
    serde_json::from_str(s).unwrap()
}

fn ids(list: &[TenantId]) -> Vec<&str> {
    list.iter().map(TenantId::as_str).collect()
}

#[test]
fn keycloak_access_token_maps_user_roles_and_organization_id() {
    let id = map_claims(
        "https://sso.example.com/realms/acme",
        &fixture(KEYCLOAK),
        &rules(Dialect::Keycloak),
    )
    .unwrap();
    assert_eq!(
        id.subject.as_ref().unwrap().as_str(),
        "b2433b81-188f-4c01-b2ed-053bee5391d3"
    );
    assert_eq!(
        id.tenant.as_ref().unwrap().as_str(),
        "38394337-9aff-503a-b737-e711338283d4"
    );
    assert_eq!(id.email.as_deref(), Some("grace.turing@example.com"));
    assert_eq!(id.email_verified, Some(true));
    assert_eq!(id.name.as_deref(), Some("Grace Turing"));
    assert_eq!(id.username(), Some("grace.turing"));
    assert_eq!(id.given_name(), Some("Grace"));
    assert_eq!(id.family_name(), Some("Turing"));
    // Realm roles, then the roles of the client the token was issued to (azp), not other clients'.
    assert_eq!(
        id.roles[..],
        [
            "default-roles-acme",
            "offline_access",
            "uma_authorization",
            "admin",
            "editor"
        ]
    );
    assert_eq!(&*id.issuer, "https://sso.example.com/realms/acme");
}

#[test]
fn keycloak_organization_claim_is_read_in_every_shape() {
    let shapes = fixture(ORG_SHAPES);
    let tenants = |shape: &str| {
        let mut claims = obj(json!({"sub": "u1", "typ": "Bearer"}));
        if let Some(org) = shapes[shape].get("organization") {
            claims.insert("organization".into(), org.clone());
        }
        let id = map_claims("iss", &claims, &rules(Dialect::Keycloak)).unwrap();
        (id.tenant.map(|t| t.to_string()), ids(&id.tenants).join(","))
    };
    assert_eq!(
        tenants("list_of_aliases_default_multivalued"),
        (Some("acme".into()), "acme,globex".into())
    );
    assert_eq!(
        tenants("map_with_ids_add_organization_id_on"),
        (
            Some("38394337-9aff-503a-b737-e711338283d4".into()),
            "38394337-9aff-503a-b737-e711338283d4,5a0e8e43-8c2e-4a5e-9d0c-1f1b2f0d9c11".into()
        )
    );
    assert_eq!(
        tenants("single_string_not_multivalued"),
        (Some("acme".into()), "acme".into())
    );
    assert_eq!(
        tenants("keycloak_25_empty_map"),
        (Some("acme".into()), "acme".into())
    );
    assert_eq!(tenants("absent_scope_not_requested"), (None, String::new()));
}

#[test]
fn keycloak_falls_back_to_the_configured_tenant_claim() {
    let claims = obj(json!({"sub": "u1", "typ": "Bearer", "tenant_id": "t-9"}));
    let id = map_claims("iss", &claims, &rules(Dialect::Keycloak)).unwrap();
    assert_eq!(id.tenant.as_ref().unwrap().as_str(), "t-9");
    assert!(
        id.tenant_sources().is_empty(),
        "only a missing tenant is explained"
    );

    let claims = obj(json!({"sub": "u1", "typ": "Bearer"}));
    let id = map_claims("iss", &claims, &rules(Dialect::Keycloak)).unwrap();
    assert!(id.tenant.is_none());
    assert_eq!(id.tenant_sources(), ["organization", "tenant_id"]);
}

#[test]
fn keycloak_id_and_refresh_tokens_are_refused() {
    for typ in ["ID", "Refresh", "Offline"] {
        let claims = obj(json!({"sub": "u1", "typ": typ}));
        assert_eq!(
            map_claims("iss", &claims, &rules(Dialect::Keycloak)),
            Err(IdentityError::NotAnAccessToken(typ.into()))
        );
    }
}

#[test]
fn keycloak_lightweight_token_without_sub_is_refused() {
    let claims = obj(json!({"typ": "Bearer", "azp": "web"}));
    assert_eq!(
        map_claims("iss", &claims, &rules(Dialect::Keycloak)),
        Err(IdentityError::MissingSubject("sub".into()))
    );
}

#[test]
fn frontegg_user_token_maps_tenant_allowed_tenants_and_profile() {
    let id = map_claims(
        "https://acme.frontegg.com",
        &fixture(FRONTEGG),
        &rules(Dialect::Frontegg),
    )
    .unwrap();
    assert_eq!(
        id.subject.as_ref().unwrap().as_str(),
        "a588e5d5-e07d-400b-bad8-7a78303da014"
    );
    assert_eq!(
        id.tenant.as_ref().unwrap().as_str(),
        "449e423c-2dc6-5f23-805d-76fed08c5a4b"
    );
    assert_eq!(
        ids(&id.tenants),
        [
            "449e423c-2dc6-5f23-805d-76fed08c5a4b",
            "0f6c1a52-77c4-4f0c-8f3e-2b7a0e5d9a10"
        ]
    );
    assert_eq!(id.roles[..], ["Admin"]);
    assert_eq!(
        id.permissions(),
        ["fe.secure.read.*", "fe.account-settings.read.*"]
    );
    assert_eq!(id.email_verified, Some(true));
    assert_eq!(
        id.avatar_url(),
        Some("https://www.gravatar.com/avatar/6f95f3426d5f501097a0bac63f5164c1?d=identicon")
    );
    assert_eq!(id.metadata(), Some(&json!({"plan": "pro"})));
}

#[test]
fn frontegg_token_types_pick_the_right_user() {
    let base = json!({"sub": "sub-1", "userId": "user-2", "createdByUserId": "creator-3", "tenantId": "t1"});
    let user_of = |kind: &str| {
        let mut claims = obj(base.clone());
        claims.insert("type".into(), json!(kind));
        map_claims("iss", &claims, &rules(Dialect::Frontegg))
            .unwrap()
            .subject
            .map(|s| s.to_string())
    };
    assert_eq!(user_of("userToken").as_deref(), Some("sub-1"));
    assert_eq!(user_of("userApiToken").as_deref(), Some("creator-3"));
    assert_eq!(user_of("userAccessToken").as_deref(), Some("user-2"));
    assert_eq!(user_of("tenantApiToken"), None);
    assert_eq!(user_of("tenantAccessToken"), None);
}

#[test]
fn frontegg_unknown_token_type_is_refused() {
    let claims = obj(json!({"sub": "s", "type": "mysteryToken", "tenantId": "t"}));
    assert_eq!(
        map_claims("iss", &claims, &rules(Dialect::Frontegg)),
        Err(IdentityError::UnsupportedTokenType("mysteryToken".into()))
    );
}

#[test]
fn frontegg_tenant_token_without_tenant_is_refused() {
    let claims = obj(json!({"type": "tenantApiToken"}));
    assert!(matches!(
        map_claims("iss", &claims, &rules(Dialect::Frontegg)),
        Err(IdentityError::InvalidClaim { claim, .. }) if claim == "tenantId"
    ));
}

#[test]
fn generic_reads_nested_tenant_claim_and_string_roles() {
    let mut r = rules(Dialect::Generic);
    r.tenant_claim = ClaimPath::new("org.id").unwrap();
    r.roles_claim = ClaimPath::new("scope").unwrap();
    let claims = obj(
        json!({"sub": "u", "org": {"id": "o-1"}, "scope": "read write,admin", "preferred_username": "ada"}),
    );
    let id = map_claims("iss", &claims, &r).unwrap();
    assert_eq!(id.tenant.as_ref().unwrap().as_str(), "o-1");
    assert_eq!(id.roles[..], ["read", "write", "admin"]);
    assert_eq!(
        id.name.as_deref(),
        Some("ada"),
        "name falls back to preferred_username"
    );
}

#[test]
fn generic_claim_path_prefers_a_literal_url_style_key() {
    let mut r = rules(Dialect::Generic);
    r.tenant_claim = ClaimPath::new("https://example.com/tenant").unwrap();
    let claims = obj(json!({"sub": "u", "https://example.com/tenant": "t-url"}));
    assert_eq!(
        map_claims("iss", &claims, &r)
            .unwrap()
            .tenant
            .unwrap()
            .as_str(),
        "t-url"
    );
}

#[test]
fn identifiers_with_control_characters_or_huge_sizes_are_refused() {
    for bad in ["a\r\nX-User-Id: admin", "nul\0", ""] {
        let claims = obj(json!({"sub": bad}));
        assert!(
            matches!(
                map_claims("iss", &claims, &rules(Dialect::Generic)),
                Err(IdentityError::InvalidClaim { claim, .. }) if claim == "sub"
            ),
            "{bad:?}"
        );
    }
    let claims = obj(json!({"sub": "u", "tenant_id": "t".repeat(MAX_ID_BYTES + 1)}));
    assert!(map_claims("iss", &claims, &rules(Dialect::Generic)).is_err());
    let claims = obj(json!({"sub": "u", "name": "n".repeat(MAX_PROFILE_BYTES + 1)}));
    assert!(map_claims("iss", &claims, &rules(Dialect::Generic)).is_err());
}

#[test]
fn non_string_sub_is_refused() {
    let claims = obj(json!({"sub": 42}));
    assert_eq!(
        map_claims("iss", &claims, &rules(Dialect::Generic)),
        Err(IdentityError::InvalidClaim {
            claim: "sub".into(),
            reason: "is not a string".into()
        })
    );
}

#[test]
fn huge_role_lists_are_refused() {
    let roles: Vec<String> = (0..10_000).map(|i| format!("r{i}")).collect();
    let claims = obj(json!({"sub": "u", "roles": roles}));
    assert!(matches!(
        map_claims("iss", &claims, &rules(Dialect::Generic)),
        Err(IdentityError::InvalidClaim { claim, .. }) if claim == "roles"
    ));
}

#[test]
fn non_ascii_profile_values_are_kept_verbatim() {
    let claims = obj(json!({"sub": "u", "name": "Zoë Ångström 李"}));
    let id = map_claims("iss", &claims, &rules(Dialect::Generic)).unwrap();
    assert_eq!(id.name.as_deref(), Some("Zoë Ångström 李"));
}

#[test]
fn allows_tenant_covers_the_active_and_listed_tenants() {
    let id = map_claims("iss", &fixture(FRONTEGG), &rules(Dialect::Frontegg)).unwrap();
    assert!(id.allows_tenant("0f6c1a52-77c4-4f0c-8f3e-2b7a0e5d9a10"));
    assert!(!id.allows_tenant("someone-elses-tenant"));
}
