//! Token verification through the real proxy: every refusal is a 401 with an RFC 6750 challenge,
//! a JSON body with an `error_id`, and the upstream is never reached.

use crate::helpers::{app, assert_error};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use devkit::{LocalIssuer, SigningAlg};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

fn hmac_token(secret: &[u8], header: Value, claims: &Value) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{message}.{sig}")
}

#[tokio::test]
async fn bad_tokens_are_rejected_with_401_and_never_reach_the_upstream() {
    let t = app().issuer_options(",audience=web-app").start().await;
    let iss = t.issuer.issuer().to_owned();
    let now = devkit::unix_now();
    let good = |extra: Value| {
        let mut c = t.issuer.claims_for("user-1");
        c["aud"] = json!("web-app");
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let kid = t.issuer.jwks_document()["keys"][0]["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let public_pem = t.issuer.public_pem().unwrap();
    let n = t.issuer.jwks_document()["keys"][0]["n"]
        .as_str()
        .unwrap()
        .to_owned();

    let valid = t.issuer.mint(good(json!({})));
    let (head, rest) = valid.split_once('.').unwrap();
    let sig = rest.split_once('.').unwrap().1;
    let forged_payload = URL_SAFE_NO_PAD.encode(good(json!({"sub": "admin"})).to_string());
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(good(json!({})).to_string())
    );

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            t.issuer.mint(good(json!({"exp": now - 120}))),
            "expired",
        ),
        (
            "not yet valid",
            t.issuer.mint(good(json!({"nbf": now + 600}))),
            "not valid yet",
        ),
        (
            "issued in the future",
            t.issuer.mint(good(json!({"iat": now + 600}))),
            "future",
        ),
        (
            "wrong iss",
            t.issuer.mint(good(json!({"iss": format!("{iss}/other")}))),
            "not trusted",
        ),
        (
            "wrong aud string",
            t.issuer.mint(good(json!({"aud": "someone-else"}))),
            "audience",
        ),
        (
            "wrong aud array",
            t.issuer.mint(good(json!({"aud": ["a", "b"]}))),
            "audience",
        ),
        (
            "no aud",
            t.issuer.mint({
                let mut c = good(json!({}));
                c.as_object_mut().unwrap().remove("aud");
                c
            }),
            "audience",
        ),
        (
            "missing exp",
            t.issuer.mint({
                let mut c = good(json!({}));
                c.as_object_mut().unwrap().remove("exp");
                c
            }),
            "exp",
        ),
        (
            "exp as string",
            t.issuer.mint(good(json!({"exp": (now + 300).to_string()}))),
            "exp",
        ),
        (
            "bad signature",
            format!("{head}.{forged_payload}.{sig}"),
            "signature",
        ),
        (
            "unknown kid",
            t.issuer.sign_raw(
                &json!({"alg": "RS256", "kid": "not-a-key"}),
                &good(json!({})),
            ),
            "key",
        ),
        ("alg none", unsigned, "alg `none`"),
        (
            "HS256 with the RSA public key as PEM",
            hmac_token(
                public_pem.as_bytes(),
                json!({"alg": "HS256", "kid": kid}),
                &good(json!({})),
            ),
            "shared-secret",
        ),
        (
            "HS256 with the RSA modulus as secret",
            hmac_token(
                n.as_bytes(),
                json!({"alg": "HS256", "kid": kid}),
                &good(json!({})),
            ),
            "shared-secret",
        ),
        (
            "oversized",
            t.issuer.mint(good(json!({"pad": "x".repeat(20_000)}))),
            "larger than",
        ),
        ("garbage", "not-a-jwt".to_owned(), "segments"),
        (
            "keycloak refresh token",
            t.issuer.mint(good(json!({"typ": "Refresh"}))),
            "not an access token",
        ),
        (
            "keycloak id token",
            t.issuer.mint(good(json!({"typ": "ID"}))),
            "not an access token",
        ),
    ];
    for (name, token, reason) in cases {
        let r = t.get_with_token("/api/things", &token).await;
        let body = assert_error(r, 401, "invalid_token").await;
        let desc = body["error_description"].as_str().unwrap();
        assert!(
            desc.contains(reason),
            "{name}: description {desc:?} should mention {reason:?}"
        );
    }
    let r = t.http.get(t.url("/api/things")).send().await.unwrap();
    assert_error(r, 401, "invalid_token").await;
    assert_eq!(
        t.upstream.hits(),
        0,
        "no refused request may reach the upstream"
    );

    // And the same issuer's properly signed token does pass.
    let r = t.get_with_token("/api/things", &valid).await;
    assert_eq!(r.status(), 200);
    assert_eq!(t.upstream.hits(), 1);
}

#[tokio::test]
async fn token_from_an_unconfigured_issuer_causes_no_network_call() {
    let t = app().start().await;
    let stranger = LocalIssuer::start("/realms/evil", SigningAlg::RS256)
        .await
        .unwrap();
    let token = stranger.mint(stranger.claims_for("intruder"));
    let r = t.get_with_token("/", &token).await;
    let body = assert_error(r, 401, "invalid_token").await;
    assert_eq!(body["error_description"], "token issuer is not trusted");
    assert_eq!(
        stranger.discovery_fetches() + stranger.jwks_fetches(),
        0,
        "idsync must never fetch from an unconfigured iss"
    );

    // Key URLs in the header are ignored, not followed.
    let mut claims = t.issuer.claims_for("u");
    claims["iss"] = json!(t.issuer.issuer());
    let header = json!({"alg": "RS256", "kid": "attacker", "jku": stranger.jwks_uri(), "x5u": stranger.jwks_uri()});
    let token = stranger.sign_raw(&header, &claims);
    let r = t.get_with_token("/", &token).await;
    assert_error(r, 401, "invalid_token").await;
    assert_eq!(stranger.discovery_fetches() + stranger.jwks_fetches(), 0);
    assert_eq!(t.upstream.hits(), 0);
}

#[tokio::test]
async fn es256_eddsa_and_ps256_issuers_verify() {
    for alg in [
        SigningAlg::ES256,
        SigningAlg::ES384,
        SigningAlg::EdDSA,
        SigningAlg::PS256,
    ] {
        let t = app().alg(alg).start().await;
        let token = t.issuer.mint(t.issuer.claims_for("u-ec"));
        let echo = t.echo(t.http.get(t.url("/x")).bearer_auth(&token)).await;
        assert_eq!(echo.status, 200, "{alg:?}: {}", echo.body);
        assert_eq!(echo.header("x-user-id").as_deref(), Some("u-ec"), "{alg:?}");
    }
}

#[tokio::test]
async fn a_cached_token_is_not_verified_again() {
    let t = app().start().await;
    let token = t.issuer.mint(t.issuer.claims_for("cached"));
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    let verifications = t.counter("idsync_token_verifications_total", "").await;
    for _ in 0..5 {
        assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    }
    if crate::helpers::metrics_isolated() {
        assert_eq!(
            t.counter("idsync_token_verifications_total", "").await,
            verifications,
            "cache hits must not verify"
        );
    }
    assert!(
        t.counter("idsync_token_cache_total", r#"outcome="hit""#)
            .await
            >= 5.0
    );
}

#[tokio::test]
async fn with_the_token_cache_disabled_every_request_is_verified() {
    let t = app().arg("--token-cache-size").arg("0").start().await;
    let token = t.issuer.mint(t.issuer.claims_for("uncached"));
    let before = t.counter("idsync_token_verifications_total", "").await;
    for _ in 0..3 {
        assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    }
    let verified = t.counter("idsync_token_verifications_total", "").await - before;
    if crate::helpers::metrics_isolated() {
        assert_eq!(verified, 3.0);
    } else {
        assert!(verified >= 3.0, "{verified}");
    }
}
