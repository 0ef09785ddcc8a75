//! `/.idsync/auth`: the same pipeline as the proxy, answering with headers instead of proxying, at the
//! header level for each proxy's contract (nginx `auth_request`, Envoy ext_authz HTTP service, Traefik
//! forwardAuth). The real nginx and Envoy are in `real_proxies.rs`.

use crate::helpers::{TestApp, app, assert_error};

async fn nginx_style(t: &TestApp, original: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = t
        .http
        .get(t.url("/.idsync/auth"))
        .header("X-Original-URI", original);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn forward_auth_answers_200_with_identity_headers_and_never_proxies() {
    let t = app()
        .arg("--skip-auth")
        .arg("/healthz")
        .arg("--forward-auth-uri-header")
        .arg("X-Original-URI")
        .start()
        .await;
    let mut claims = t.issuer.claims_for("fa-user");
    claims["tenant_id"] = serde_json::json!("t-fa");
    let token = t.issuer.mint(claims);

    let r = nginx_style(&t, "/api/x?y=1", Some(&token)).await;
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
        .header("X-Original-URI", "/healthz")
        .header("X-User-Id", "spoof")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-user-id").is_none());

    assert_eq!(t.upstream.hits(), 0, "forward-auth never proxies");
}

#[tokio::test]
async fn forward_auth_reads_the_original_uri_only_from_the_configured_header() {
    let t = app()
        .arg("--skip-auth")
        .arg("/public")
        .arg("--forward-auth-uri-header")
        .arg("X-Forwarded-Uri")
        .start()
        .await;
    // nginx copies every client header into the subrequest: a client's own X-Original-URI must not make
    // a private path public when the proxy sends the real one as X-Forwarded-Uri.
    let r = t
        .http
        .get(t.url("/.idsync/auth"))
        .header("X-Original-URI", "/public/x")
        .header("X-Forwarded-Uri", "/private")
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "invalid_token").await;
    let r = t
        .http
        .get(t.url("/.idsync/auth"))
        .header("X-Forwarded-Uri", "/public/x?page=2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Path tricks on the forwarded URI: resolved the way the app resolves them.
    for trick in [
        "/public/..;/private",
        "/public/%2e%2e/private",
        "/public%2f..%2fprivate",
    ] {
        let r = t
            .http
            .get(t.url("/.idsync/auth"))
            .header("X-Forwarded-Uri", trick)
            .send()
            .await
            .unwrap();
        assert_error(r, 401, "invalid_token").await;
    }
    let r = t
        .http
        .get(t.url("/.idsync/auth"))
        .header("X-Forwarded-Uri", "/public/x")
        .header("X-Forwarded-Uri", "/private")
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_request").await;
    let r = t
        .http
        .get(t.url("/.idsync/auth"))
        .header("X-Forwarded-Uri", "/../etc/passwd")
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_request").await;
}

#[tokio::test]
async fn without_a_configured_uri_header_forward_auth_never_skips_auth() {
    let t = app().arg("--skip-auth").arg("/public").start().await;
    for header in ["X-Original-URI", "X-Forwarded-Uri"] {
        let r = t
            .http
            .get(t.url("/.idsync/auth"))
            .header(header, "/public/x")
            .send()
            .await
            .unwrap();
        assert_error(r, 401, "invalid_token").await;
    }
}

#[tokio::test]
async fn envoy_ext_authz_requests_keep_their_method_and_path_after_the_prefix() {
    let t = app().arg("--skip-auth").arg("/public").start().await;
    let mut claims = t.issuer.claims_for("envoy-user");
    claims["tenant_id"] = serde_json::json!("t-1");
    let token = t.issuer.mint(claims);
    // What Envoy sends for `POST /api/x?q=1`: the method kept, the path appended, no body.
    let r = t
        .http
        .post(t.url("/.idsync/auth/api/x?q=1"))
        .header("Content-Length", "0")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "exactly 200: Envoy denies on any other 2xx"
    );
    assert_eq!(r.headers()["x-user-id"], "envoy-user");
    // Envoy leaves a client's copy of any owned header the answer does not carry: name them for removal.
    let remove = r.headers()["x-envoy-auth-headers-to-remove"]
        .to_str()
        .unwrap();
    assert!(
        remove.contains("x-tenant-schema") && remove.contains("x-user-name"),
        "{remove}"
    );
    assert!(!remove.contains("x-user-id"), "{remove}");

    let r = t
        .http
        .delete(t.url("/.idsync/auth/public/logo.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let remove = r.headers()["x-envoy-auth-headers-to-remove"]
        .to_str()
        .unwrap();
    assert!(
        remove.contains("x-user-id"),
        "an anonymous answer clears every owned header"
    );

    let r = t
        .http
        .post(t.url("/.idsync/auth/public/..;/private"))
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "invalid_token").await;
    let r = t
        .http
        .post(t.url("/.idsync/auth/api/x"))
        .bearer_auth(&token)
        .header("X-Tenant-Id", "not-mine")
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "tenant_not_permitted").await;
}

#[tokio::test]
async fn traefik_forward_auth_contract() {
    // Traefik sets X-Forwarded-Method/-Proto/-Host/-Uri on its GET to the auth address and copies the
    // client's headers; with trustForwardHeader off (its default) its own values replace the client's.
    let t = app()
        .arg("--skip-auth")
        .arg("/assets")
        .arg("--forward-auth-uri-header")
        .arg("X-Forwarded-Uri")
        .start()
        .await;
    let traefik = |uri: &str| {
        t.http
            .get(t.url("/.idsync/auth"))
            .header("X-Forwarded-Method", "POST")
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Host", "app.example.com")
            .header("X-Forwarded-Uri", uri)
            .header("X-Forwarded-For", "203.0.113.7")
    };
    assert_eq!(
        traefik("/assets/app.js").send().await.unwrap().status(),
        200
    );
    let r = traefik("/api/orders").send().await.unwrap();
    assert_error(r, 401, "invalid_token").await;
    let mut claims = t.issuer.claims_for("traefik-user");
    claims["tenant_id"] = serde_json::json!("t-9");
    let r = traefik("/api/orders")
        .bearer_auth(t.issuer.mint(claims))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-user-id"], "traefik-user");
    assert_eq!(r.headers()["x-tenant-id"], "t-9");
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

#[test]
fn the_forward_auth_uri_header_cannot_be_one_idsync_owns() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .args([
            "--upstream",
            "http://127.0.0.1:3000",
            "--issuer",
            "https://sso.example.com/realms/a",
            "--forward-auth-uri-header",
            "X_Tenant_Id",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("a header idsync owns"));
}
