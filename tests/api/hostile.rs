//! Hostile tokens and requests: each refusal has an exact status and error code, never reaches the
//! upstream, and writes no row. Hostile-looking values that are legitimate go through safely.

use crate::helpers::app;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use devkit::{LocalIssuer, SigningAlg};
use jsonwebtoken::{Algorithm, EncodingKey};
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::{Value, json};

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

fn hmac(alg: Algorithm, secret: &[u8], header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &EncodingKey::from_secret(secret), alg)
        .unwrap();
    format!("{input}.{sig}")
}

fn with_signature(token: &str, sig: &[u8]) -> String {
    let (input, _) = token.rsplit_once('.').unwrap();
    format!("{input}.{}", b64(sig))
}

fn raw(header: &str, payload: &str, sig: &str) -> String {
    format!(
        "{}.{}.{}",
        b64(header.as_bytes()),
        b64(payload.as_bytes()),
        sig
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_hostile_tokens_and_requests_are_refused_without_side_effects() {
    let issuer = LocalIssuer::start("/realms/acme", SigningAlg::RS256)
        .await
        .unwrap();
    let rs = issuer.jwks_document()["keys"][0].clone();
    let rs_kid = rs["kid"].as_str().unwrap().to_owned();
    let es_kid = issuer.add_key(SigningAlg::ES256);
    let t = app()
        .with_issuer(&issuer)
        .issuer_options(",audience=web-app")
        .start()
        .await;
    let iss = issuer.issuer().to_owned();
    let now = devkit::unix_now();
    let good = || {
        let mut c = issuer.claims_for("victim");
        c["aud"] = json!("web-app");
        c
    };
    let with = |k: &str, v: Value| {
        let mut c = good();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = good();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    let rsa_header = |extra: Value| {
        let mut h = json!({"alg": "RS256", "kid": rs_kid, "typ": "JWT"});
        for (k, v) in extra.as_object().unwrap() {
            h[k] = v.clone();
        }
        h
    };
    // Every token is properly signed with the configured RSA key, so a refusal can only come from the
    // header or claim check under test, never from a broken signature.
    let signed_rsa = |header: Value, claims: Value| issuer.sign_raw_with(&rs_kid, &header, &claims);
    let rsa = |c: Value| signed_rsa(rsa_header(json!({})), c);
    let pem = issuer.public_pem().unwrap();
    let es_valid = issuer.mint_with_kid(&es_kid, good());
    let rs_valid = rsa(good());
    let rs_sig = URL_SAFE_NO_PAD
        .decode(rs_valid.rsplit_once('.').unwrap().1)
        .unwrap();
    let unsigned = |alg: &str| {
        raw(
            &format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#),
            &good().to_string(),
            "",
        )
    };
    let nested = format!("{}{}", "[".repeat(300), "]".repeat(300));
    let attacker = LocalIssuer::start("/realms/evil", SigningAlg::RS256)
        .await
        .unwrap();
    let attacker_jwk = attacker.jwks_document()["keys"][0].clone();

    let mut cases: Vec<(&str, String, u16, &str)> = vec![
        ("alg none", unsigned("none"), 401, "invalid_token"),
        ("alg None", unsigned("None"), 401, "invalid_token"),
        ("alg NONE", unsigned("NONE"), 401, "invalid_token"),
        (
            "alg none with a signature",
            raw(r#"{"alg":"none"}"#, &good().to_string(), "c2ln"),
            401,
            "invalid_token",
        ),
        (
            "HS256 with the RSA public key PEM",
            hmac(
                Algorithm::HS256,
                pem.as_bytes(),
                &rsa_header(json!({"alg": "HS256"})),
                &good(),
            ),
            401,
            "invalid_token",
        ),
        (
            "HS384 with the RSA public key PEM",
            hmac(
                Algorithm::HS384,
                pem.as_bytes(),
                &rsa_header(json!({"alg": "HS384"})),
                &good(),
            ),
            401,
            "invalid_token",
        ),
        (
            "HS512 with the RSA public key PEM",
            hmac(
                Algorithm::HS512,
                pem.as_bytes(),
                &rsa_header(json!({"alg": "HS512"})),
                &good(),
            ),
            401,
            "invalid_token",
        ),
        (
            "HS256 with the RSA JWK",
            hmac(
                Algorithm::HS256,
                rs.to_string().as_bytes(),
                &rsa_header(json!({"alg": "HS256"})),
                &good(),
            ),
            401,
            "invalid_token",
        ),
        (
            "HS256 with the RSA modulus",
            hmac(
                Algorithm::HS256,
                rs["n"].as_str().unwrap().as_bytes(),
                &rsa_header(json!({"alg": "HS256"})),
                &good(),
            ),
            401,
            "invalid_token",
        ),
        (
            "HS256 with the PEM body",
            hmac(
                Algorithm::HS256,
                &STANDARD
                    .decode(
                        pem.lines()
                            .filter(|l| !l.starts_with("-----"))
                            .collect::<String>(),
                    )
                    .unwrap(),
                &rsa_header(json!({"alg": "HS256"})),
                &good(),
            ),
            401,
            "invalid_token",
        ),
        (
            "ES256 with r and s zero",
            with_signature(&es_valid, &[0u8; 64]),
            401,
            "invalid_token",
        ),
        (
            "ES256 with r zero",
            with_signature(&es_valid, &[[0u8; 32], [7u8; 32]].concat()),
            401,
            "invalid_token",
        ),
        (
            "ES256 with s zero",
            with_signature(&es_valid, &[[7u8; 32], [0u8; 32]].concat()),
            401,
            "invalid_token",
        ),
        (
            "ES256 with r and s out of range",
            with_signature(&es_valid, &[0xFFu8; 64]),
            401,
            "invalid_token",
        ),
        (
            "ES256 signature too short",
            with_signature(&es_valid, &[1u8; 63]),
            401,
            "invalid_token",
        ),
        (
            "ES256 signed token relabelled RS256",
            raw(
                &json!({"alg": "RS256", "kid": es_kid}).to_string(),
                &good().to_string(),
                es_valid.rsplit_once('.').unwrap().1,
            ),
            401,
            "invalid_token",
        ),
        (
            "RSA signature one byte short",
            with_signature(&rs_valid, &rs_sig[..rs_sig.len() - 1]),
            401,
            "invalid_token",
        ),
        (
            "RSA signature one byte long",
            with_signature(&rs_valid, &[rs_sig.clone(), vec![0]].concat()),
            401,
            "invalid_token",
        ),
        (
            "RSA signature all zero",
            with_signature(&rs_valid, &vec![0u8; rs_sig.len()]),
            401,
            "invalid_token",
        ),
        (
            "RSA token relabelled PS256",
            raw(
                &json!({"alg": "PS256", "kid": rs_kid}).to_string(),
                &good().to_string(),
                rs_valid.rsplit_once('.').unwrap().1,
            ),
            401,
            "invalid_token",
        ),
        (
            "kid path traversal",
            signed_rsa(rsa_header(json!({"kid": "../../../../etc/passwd"})), good()),
            401,
            "invalid_token",
        ),
        (
            "kid SQL",
            signed_rsa(rsa_header(json!({"kid": "' OR '1'='1"})), good()),
            401,
            "invalid_token",
        ),
        (
            "kid NUL",
            signed_rsa(rsa_header(json!({"kid": "key\u{0}1"})), good()),
            401,
            "invalid_token",
        ),
        (
            "kid of 10 KB",
            signed_rsa(rsa_header(json!({"kid": "k".repeat(10_240)})), good()),
            401,
            "invalid_token",
        ),
        (
            "kid not a string",
            signed_rsa(rsa_header(json!({"kid": 7})), good()),
            401,
            "invalid_token",
        ),
        (
            "jku to attacker keys",
            signed_rsa(
                rsa_header(json!({"kid": "attacker", "jku": attacker.jwks_uri()})),
                good(),
            ),
            401,
            "invalid_token",
        ),
        (
            "x5u to attacker",
            signed_rsa(
                rsa_header(json!({"kid": "attacker", "x5u": attacker.jwks_uri()})),
                good(),
            ),
            401,
            "invalid_token",
        ),
        (
            "x5c with an attacker chain",
            signed_rsa(
                rsa_header(json!({"kid": "attacker", "x5c": ["MIIB"]})),
                good(),
            ),
            401,
            "invalid_token",
        ),
        (
            "embedded attacker jwk",
            attacker.sign_raw(
                &json!({"alg": "RS256", "kid": attacker_jwk["kid"], "jwk": attacker_jwk}),
                &good(),
            ),
            401,
            "invalid_token",
        ),
        (
            "unknown crit",
            signed_rsa(
                rsa_header(json!({"crit": ["exp-extension"], "exp-extension": 1})),
                good(),
            ),
            401,
            "invalid_token",
        ),
        (
            "typ JWE",
            signed_rsa(rsa_header(json!({"typ": "JWE"})), good()),
            401,
            "invalid_token",
        ),
        (
            "wrong iss",
            rsa(with("iss", json!(format!("{iss}/other")))),
            401,
            "invalid_token",
        ),
        ("missing iss", rsa(without("iss")), 401, "invalid_token"),
        (
            "iss as array",
            rsa(with("iss", json!([iss]))),
            401,
            "invalid_token",
        ),
        (
            "iss of an unconfigured host",
            attacker.mint(attacker.claims_for("victim")),
            401,
            "invalid_token",
        ),
        (
            "aud mismatch string",
            rsa(with("aud", json!("other-app"))),
            401,
            "invalid_token",
        ),
        (
            "aud mismatch array",
            rsa(with("aud", json!(["a", "b"]))),
            401,
            "invalid_token",
        ),
        ("aud missing", rsa(without("aud")), 401, "invalid_token"),
        ("missing exp", rsa(without("exp")), 401, "invalid_token"),
        (
            "exp as string",
            rsa(with("exp", json!((now + 300).to_string()))),
            401,
            "invalid_token",
        ),
        (
            "exp huge",
            rsa(with("exp", json!(1e300))),
            401,
            "invalid_token",
        ),
        (
            "exp negative",
            rsa(with("exp", json!(-1))),
            401,
            "invalid_token",
        ),
        (
            "exp in the past",
            rsa(with("exp", json!(now - 3600))),
            401,
            "invalid_token",
        ),
        (
            "nbf as string",
            rsa(with("nbf", json!("0"))),
            401,
            "invalid_token",
        ),
        (
            "nbf in the future",
            rsa(with("nbf", json!(now + 3600))),
            401,
            "invalid_token",
        ),
        (
            "iat as string",
            rsa(with("iat", json!("now"))),
            401,
            "invalid_token",
        ),
        (
            "iat in the future",
            rsa(with("iat", json!(now + 3600))),
            401,
            "invalid_token",
        ),
        (
            "iat huge float",
            rsa(with("iat", json!(1.0e20))),
            401,
            "invalid_token",
        ),
        (
            "duplicate sub",
            issuer.sign_text_with(
                &rs_kid,
                &rsa_header(json!({})).to_string(),
                &good().to_string().replacen('{', r#"{"sub":"admin","#, 1),
            ),
            401,
            "invalid_token",
        ),
        (
            "sub not a string",
            rsa(with("sub", json!(12345))),
            401,
            "invalid_token",
        ),
        (
            "sub with CR/LF",
            rsa(with("sub", json!("victim\r\nX-User-Id: admin"))),
            401,
            "invalid_token",
        ),
        (
            "sub with NUL",
            rsa(with("sub", json!("vic\u{0}tim"))),
            401,
            "invalid_token",
        ),
        (
            "sub of 64 KB",
            rsa(with("sub", json!("s".repeat(12_000)))),
            401,
            "invalid_token",
        ),
        (
            "tenant id with CR/LF",
            rsa(with("tenant_id", json!("t\r\nX-Tenant-Id: other"))),
            401,
            "invalid_token",
        ),
        (
            "name of 2 KB",
            rsa(with("name", json!("n".repeat(2048)))),
            401,
            "invalid_token",
        ),
        (
            "email with NUL",
            rsa(with("email", json!("a\u{0}@example.com"))),
            401,
            "invalid_token",
        ),
        (
            "10,000 realm roles",
            rsa(with(
                "realm_access",
                json!({"roles": (0..10_000).map(|i| format!("r{i}")).collect::<Vec<_>>()}),
            )),
            401,
            "invalid_token",
        ),
        (
            "deeply nested claim",
            raw(
                &rsa_header(json!({})).to_string(),
                &format!(r#"{{"iss":"{iss}","deep":{nested}}}"#),
                "c2ln",
            ),
            401,
            "invalid_token",
        ),
        (
            "padded base64",
            {
                let (h, rest) = rs_valid.split_once('.').unwrap();
                format!("{h}==.{rest}")
            },
            401,
            "invalid_token",
        ),
        (
            "standard base64 alphabet",
            rs_valid.replacen('-', "+", 1).replacen('_', "/", 1),
            401,
            "invalid_token",
        ),
        (
            "two segments",
            rs_valid.rsplit_once('.').unwrap().0.to_owned(),
            401,
            "invalid_token",
        ),
        (
            "four segments",
            format!("{rs_valid}.extra"),
            401,
            "invalid_token",
        ),
        (
            "empty header segment",
            format!(".{}", rs_valid.split_once('.').unwrap().1),
            401,
            "invalid_token",
        ),
        (
            "JWE (five segments)",
            "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d".to_owned(),
            401,
            "invalid_token",
        ),
        (
            "over the size limit",
            rsa(with("pad", json!("x".repeat(20_000)))),
            401,
            "invalid_token",
        ),
        (
            "payload not JSON",
            raw(&rsa_header(json!({})).to_string(), "not json", "c2ln"),
            401,
            "invalid_token",
        ),
        (
            "Keycloak refresh token",
            rsa(with("typ", json!("Refresh"))),
            401,
            "invalid_token",
        ),
    ];
    // Signed properly by the configured key but with a forged payload: the signature no longer holds.
    let (h, rest) = rs_valid.split_once('.').unwrap();
    let sig = rest.split_once('.').unwrap().1;
    cases.push((
        "payload swapped after signing",
        format!(
            "{h}.{}.{sig}",
            b64(with("sub", json!("admin")).to_string().as_bytes())
        ),
        401,
        "invalid_token",
    ));

    let hits_before = t.upstream.hits();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    for (name, token, status, code) in &cases {
        let r = t
            .http
            .get(t.url("/api"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let got = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (got, body["error"].as_str()),
            (*status, Some(*code)),
            "{name}: {body}"
        );
        assert!(
            body["error_id"].as_str().is_some_and(|id| !id.is_empty()),
            "{name}"
        );
        if *name == "duplicate sub" {
            assert!(
                body["error_description"]
                    .as_str()
                    .unwrap()
                    .contains("duplicate claim"),
                "refused for the duplicate, not the signature: {body}"
            );
        }
    }
    // Requests that are hostile in shape rather than token.
    let rs_valid2 = rs_valid.clone();
    let requests: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "two Authorization headers",
            t.http
                .get(t.url("/api"))
                .header("authorization", format!("Bearer {rs_valid2}"))
                .header("authorization", "Bearer other"),
            400,
            "invalid_request",
        ),
        (
            "Basic credentials",
            t.http.get(t.url("/api")).basic_auth("admin", Some("admin")),
            401,
            "invalid_token",
        ),
        (
            "token only in the query string",
            t.http.get(t.url(&format!("/api?access_token={rs_valid}"))),
            401,
            "invalid_token",
        ),
        (
            "two tenant headers",
            t.http
                .get(t.url("/api"))
                .bearer_auth(&rs_valid)
                .header("x-tenant-id", "a")
                .header("x-tenant-id", "b"),
            400,
            "invalid_request",
        ),
        (
            "tenant header for a foreign tenant",
            t.http
                .get(t.url("/api"))
                .bearer_auth(&rs_valid)
                .header("x-tenant-id", "someone-else"),
            403,
            "tenant_not_permitted",
        ),
    ];
    for (name, req, status, code) in requests {
        let r = req.send().await.unwrap();
        let got = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(code)),
            "{name}: {body}"
        );
    }
    assert_eq!(
        t.upstream.hits(),
        hits_before,
        "no hostile request may reach the upstream"
    );
    let db = sea_orm::Database::connect(format!(
        "sqlite://{}/idsync.db?mode=rwc",
        t.dir.path().display()
    ))
    .await
    .unwrap();
    assert_eq!(
        entity::users::Entity::find().count(&db).await.unwrap(),
        0,
        "no user row was written"
    );
    assert_eq!(
        entity::organizations::Entity::find()
            .count(&db)
            .await
            .unwrap(),
        0,
        "no organization row was written"
    );
    assert_eq!(
        attacker.jwks_fetches() + attacker.discovery_fetches(),
        0,
        "no key was fetched from anywhere a token named"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_looking_but_legitimate_values_go_through_safely() {
    let t = app().start().await;
    let mut claims = t.issuer.claims_for("bob");
    claims["organization"] =
        json!({"Robert'); DROP TABLE users;--": {"id": "t'; DROP SCHEMA public CASCADE; --"}});
    claims["name"] = json!("Bob\r\nX-User-Id: admin");
    claims["email"] = json!("bob+ü@example.com");
    claims["realm_access"] = json!({"roles": ["a,b", "admin\r\n"]});
    let echo = t
        .echo(t.http.get(t.url("/")).bearer_auth(t.issuer.mint(claims)))
        .await;
    assert_eq!(echo.status, 200, "{}", echo.body);
    assert_eq!(
        echo.header("x-tenant-id").as_deref(),
        Some("t'; DROP SCHEMA public CASCADE; --")
    );
    assert_eq!(
        echo.header("x-user-name").as_deref(),
        Some("Bob%0D%0AX-User-Id: admin"),
        "CR/LF cannot split a header"
    );
    assert_eq!(echo.header("x-user-id").as_deref(), Some("bob"));
    assert_eq!(
        echo.header("x-user-email").as_deref(),
        Some("bob+%C3%BC@example.com")
    );
    assert_eq!(
        echo.header("x-user-roles").as_deref(),
        Some("a%2Cb,admin%0D%0A")
    );
    assert_eq!(
        echo.header("x-tenant-slug").as_deref(),
        Some("robert-drop-table-users")
    );
    let db = sea_orm::Database::connect(format!(
        "sqlite://{}/idsync.db?mode=rwc",
        t.dir.path().display()
    ))
    .await
    .unwrap();
    assert_eq!(
        entity::users::Entity::find().count(&db).await.unwrap(),
        1,
        "the users table is intact"
    );
}
