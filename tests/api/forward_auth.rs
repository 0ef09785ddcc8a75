//! `/.idsync/auth`: the same pipeline as the proxy, answering with headers instead of proxying.

use crate::helpers::{app, assert_error};

#[tokio::test]
async fn forward_auth_answers_200_with_identity_headers_and_never_proxies() {
    let t = app().arg("--skip-auth").arg("/healthz").start().await;
    let mut claims = t.issuer.claims_for("fa-user");
    claims["tenant_id"] = serde_json::json!("t-fa");
    let token = t.issuer.mint(claims);

    let r = t
        .http
        .get(t.url("/.idsync/auth"))
        .bearer_auth(&token)
        .header("X-Original-URI", "/api/x?y=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-user-id"], "fa-user");
    assert_eq!(r.headers()["x-tenant-id"], "t-fa");

    let r = t
        .http
        .get(t.url("/.idsync/auth"))
        .header("X-Original-URI", "/api/x")
        .header("X-User-Id", "spoof")
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "invalid_token").await;

    let r = t
        .http
        .get(t.url("/.idsync/auth"))
        .header("X-Forwarded-Uri", "/healthz")
        .header("X-User-Id", "spoof")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-user-id").is_none());

    assert_eq!(t.upstream.hits(), 0, "forward-auth never proxies");
}

#[tokio::test]
async fn unknown_idsync_paths_are_404_and_never_proxied() {
    let t = app().start().await;
    let token = t.issuer.mint(t.issuer.claims_for("u"));
    let r = t
        .http
        .get(t.url("/.idsync/admin"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "not_found").await;
    assert_eq!(t.upstream.hits(), 0);
}
