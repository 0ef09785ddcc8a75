//! The key cache against a live issuer: rotation without restart, outages, a forged-`kid` flood,
//! readiness while the issuer is unreachable, and local key files.

use crate::helpers::{app, assert_error};
use devkit::{IssuerMode, SigningAlg};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn a_rotated_key_is_picked_up_without_restart() {
    let t = app().start().await;
    let old_kid = t.issuer.jwks_document()["keys"][0]["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let old_token = t.issuer.mint(t.issuer.claims_for("before"));
    assert_eq!(t.get_with_token("/", &old_token).await.status(), 200);

    let new_kid = t.issuer.add_key(SigningAlg::ES256);
    let new_token = t.issuer.mint(t.issuer.claims_for("after"));
    assert_eq!(
        t.get_with_token("/", &new_token).await.status(),
        200,
        "new key used from its first token"
    );
    assert_eq!(
        t.get_with_token("/", &old_token).await.status(),
        200,
        "old key valid during the overlap"
    );

    // The old key leaves the JWKS; after the next refresh its tokens are refused, even cached ones.
    t.issuer.remove_key(&old_kid);
    let another_new = t
        .issuer
        .mint_with_kid(&new_kid, t.issuer.claims_for("after-2"));
    assert_eq!(t.get_with_token("/", &another_new).await.status(), 200);
    let t2 = app()
        .arg("--jwks-refresh-interval")
        .arg("200ms")
        .start()
        .await;
    let kid = t2.issuer.jwks_document()["keys"][0]["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = t2.issuer.mint(t2.issuer.claims_for("cached-then-revoked"));
    assert_eq!(t2.get_with_token("/", &token).await.status(), 200);
    t2.issuer.add_key(SigningAlg::RS256);
    t2.issuer.remove_key(&kid);
    let r = t2.get_until("/", &token, 401).await;
    assert_error(r, 401, "invalid_token").await;
}

#[tokio::test]
async fn an_issuer_outage_after_start_keeps_serving_cached_keys() {
    let t = app()
        .arg("--jwks-refresh-interval")
        .arg("100ms")
        .start()
        .await;
    t.issuer.set_mode(IssuerMode::Down);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let token = t.issuer.mint(t.issuer.claims_for("during-outage"));
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    let ready = t
        .http
        .get(format!("{}/readyz", t.app.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "stale-but-valid keys keep the pod ready"
    );
    assert!(
        t.counter("idsync_jwks_fetch_total", r#"outcome="error""#)
            .await
            >= 1.0
    );

    for mode in [IssuerMode::Garbage, IssuerMode::EmptyKeys] {
        t.issuer.set_mode(mode);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let token = t
            .issuer
            .mint(t.issuer.claims_for(&format!("during-{mode:?}")));
        assert_eq!(
            t.get_with_token("/", &token).await.status(),
            200,
            "{mode:?} must not replace good keys"
        );
    }
}

#[tokio::test]
async fn keys_past_their_maximum_age_give_503() {
    let t = app()
        .arg("--jwks-refresh-interval")
        .arg("100ms")
        .arg("--jwks-max-stale")
        .arg("1s")
        .start()
        .await;
    t.issuer.set_mode(IssuerMode::Down);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let token = t.issuer.mint(t.issuer.claims_for("too-late"));
    let body = assert_error(
        t.get_with_token("/", &token).await,
        503,
        "temporarily_unavailable",
    )
    .await;
    // The client learns it may retry, never where the keys come from or why they failed.
    let shown = body["error_description"].as_str().unwrap();
    assert!(
        !shown.contains("maximum age") && !shown.contains("http") && !shown.contains("127.0.0.1"),
        "{body}"
    );
    // The operator sees the cause where operators look.
    let ready = t
        .http
        .get(format!("{}/readyz", t.app.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert!(ready.to_string().contains("maximum age"), "{ready}");
    assert_eq!(t.upstream.hits(), 0);
}

#[tokio::test]
async fn a_forged_kid_flood_causes_at_most_one_jwks_fetch_per_cooldown() {
    let t = app().start().await;
    let fetches_before = t.issuer.jwks_fetches() + t.issuer.discovery_fetches();
    let claims = t.issuer.claims_for("flood");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let token = t.issuer.sign_raw(
            &json!({"alg": "RS256", "kid": format!("forged-{i}")}),
            &claims,
        );
        let http = t.http.clone();
        let url = t.url("/");
        tasks.push(tokio::spawn(async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 401);
    }
    // A second wave inside the cooldown is refused without asking the issuer at all.
    for i in 0..20 {
        let token = t.issuer.sign_raw(
            &json!({"alg": "RS256", "kid": format!("later-{i}")}),
            &claims,
        );
        assert_eq!(t.get_with_token("/", &token).await.status(), 401);
    }
    let fetches = t.issuer.jwks_fetches() + t.issuer.discovery_fetches() - fetches_before;
    assert!(fetches <= 1, "{fetches} fetches for 70 forged kids");
    assert!(t.counter("idsync_jwks_refetch_suppressed_total", "").await >= 1.0);
}

#[tokio::test]
async fn an_unreachable_issuer_at_start_is_not_fatal_and_readiness_recovers() {
    let t = app().issuer_down_at_start().start().await;
    let r = t
        .http
        .get(format!("{}/readyz", t.app.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    let reason = body["checks"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("no keys loaded"), "{body}");
    let live = t
        .http
        .get(format!("{}/livez", t.app.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);

    let token = t.issuer.mint(t.issuer.claims_for("early"));
    assert_error(
        t.get_with_token("/", &token).await,
        503,
        "temporarily_unavailable",
    )
    .await;

    t.issuer.set_mode(IssuerMode::Up);
    t.wait_ready().await;
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
}

#[tokio::test]
async fn a_pem_key_file_verifies_without_any_network() {
    let seed = app().start().await;
    let pem = seed.issuer.public_pem().unwrap();
    let path = seed.dir.path().join("frontegg.pem");
    std::fs::write(&path, pem).unwrap();
    // The file is the only key source: the issuer is down the whole time.
    seed.issuer.set_mode(IssuerMode::Down);
    let t = app()
        .realm_path("")
        .issuer_options(&format!(",dialect=frontegg,key-file={}", path.display()))
        .start()
        .await;
    // A different issuer process, but the file holds the seed's key: sign with the seed and claim t's issuer.
    let mut claims = seed.issuer.claims_for("fe-user");
    claims["iss"] = json!(t.issuer.issuer());
    claims["tenantId"] = json!("t-pem");
    let token = seed.issuer.mint(claims);
    let echo = t.echo(t.http.get(t.url("/")).bearer_auth(&token)).await;
    assert_eq!(echo.status, 200, "{}", echo.body);
    assert_eq!(echo.header("x-tenant-id").as_deref(), Some("t-pem"));
    assert_eq!(t.issuer.jwks_fetches() + t.issuer.discovery_fetches(), 0);
}

#[tokio::test]
async fn a_jwks_key_file_is_reread_when_it_changes() {
    let seed = app().start().await;
    let path = seed.dir.path().join("keys.json");
    std::fs::write(&path, seed.issuer.jwks_document().to_string()).unwrap();
    let t = app()
        .issuer_options(&format!(",key-file={}", path.display()))
        .arg("--key-file-poll")
        .arg("100ms")
        .start()
        .await;
    let claims = |sub: &str| {
        let mut c = seed.issuer.claims_for(sub);
        c["iss"] = json!(t.issuer.issuer());
        c
    };
    assert_eq!(
        t.get_with_token("/", &seed.issuer.mint(claims("one")))
            .await
            .status(),
        200
    );

    seed.issuer.add_key(SigningAlg::ES256);
    let rotated = seed.issuer.mint(claims("two"));
    std::fs::write(&path, seed.issuer.jwks_document().to_string()).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(t.get_with_token("/", &rotated).await.status(), 200);
}

#[tokio::test]
async fn jwks_uri_skips_discovery() {
    let seed = app().start().await;
    let t = app()
        .issuer_options(&format!(",jwks-uri={}", seed.issuer.jwks_uri()))
        .start()
        .await;
    let mut claims = seed.issuer.claims_for("direct");
    claims["iss"] = json!(t.issuer.issuer());
    assert_eq!(
        t.get_with_token("/", &seed.issuer.mint(claims))
            .await
            .status(),
        200
    );
    assert_eq!(t.issuer.discovery_fetches(), 0);
}
