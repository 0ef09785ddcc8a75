//! The operator surface against a real sidecar and database: `/.idsync/me` and `/.idsync/tenant`, CORS,
//! and the admin API (auth, pagination, deactivation taking effect on the next request, delete rules).

use crate::db::TestDb;
use crate::helpers::{TestApp, app, assert_error};
use serde_json::{Value, json};

on_both_databases!(
    me_and_tenant_describe_the_caller_and_where_they_may_switch,
    admin_deactivation_takes_effect_on_the_very_next_request,
    admin_api_manages_organizations_memberships_and_audit,
);

fn claims(t: &TestApp, sub: &str) -> Value {
    let mut c = t.issuer.claims_for(sub);
    c.as_object_mut().unwrap().remove("tenant_id");
    c["email"] = json!(format!("{sub}@example.com"));
    c["realm_access"] = json!({"roles": ["admin"]});
    c["organization"] = json!({"Acme": {"id": "org-acme"}, "Globex": {"id": "org-globex"}});
    c
}

async fn admin(
    t: &TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    t.admin(method, path, body).await
}

async fn me_and_tenant_describe_the_caller_and_where_they_may_switch(db: TestDb) {
    let t = app().database(&db.url).start().await;
    let token = t.issuer.mint(claims(&t, "me-user"));
    let r = t.get_with_token("/.idsync/me", &token).await;
    assert_eq!(r.status(), 200);
    let me: Value = r.json().await.unwrap();
    assert_eq!(me["user"]["id"], "me-user");
    assert_eq!(me["user"]["email"], "me-user@example.com");
    assert_eq!(
        me["tenant"],
        json!({"id": "org-acme", "name": "Acme", "slug": "acme", "is_active": true, "role": "admin"})
    );
    let ids: Vec<&str> = me["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["org-acme", "org-globex"]);
    assert_eq!(t.upstream.hits(), 0, "/.idsync/* is never proxied");

    let r = t
        .http
        .get(t.url("/.idsync/tenant"))
        .bearer_auth(&token)
        .header("X-Tenant-Id", "org-globex")
        .send()
        .await
        .unwrap();
    let tenant: Value = r.json().await.unwrap();
    assert_eq!(
        tenant,
        json!({"tenant_id": "org-globex", "name": "Globex", "slug": "globex", "is_active": true, "role": "admin"})
    );
    assert_error(
        t.http.get(t.url("/.idsync/me")).send().await.unwrap(),
        401,
        "invalid_token",
    )
    .await;
}

async fn admin_deactivation_takes_effect_on_the_very_next_request(db: TestDb) {
    let t = app().database(&db.url).start().await;
    let token = t.issuer.mint(claims(&t, "soon-gone"));
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    assert_eq!(t.get_with_token("/", &token).await.status(), 200, "warm");

    let (status, user) = admin(
        &t,
        reqwest::Method::POST,
        "/users/soon-gone/deactivate",
        None,
    )
    .await;
    assert_eq!((status, user["is_active"].clone()), (200, json!(false)));
    assert_error(t.get_with_token("/", &token).await, 403, "user_inactive").await;
    admin(
        &t,
        reqwest::Method::POST,
        "/users/soon-gone/reactivate",
        None,
    )
    .await;
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);

    admin(
        &t,
        reqwest::Method::POST,
        "/organizations/org-acme/deactivate",
        None,
    )
    .await;
    assert_error(t.get_with_token("/", &token).await, 403, "tenant_inactive").await;
    admin(
        &t,
        reqwest::Method::POST,
        "/organizations/org-acme/reactivate",
        None,
    )
    .await;

    admin(
        &t,
        reqwest::Method::POST,
        "/memberships/soon-gone/org-acme/deactivate",
        None,
    )
    .await;
    assert_error(
        t.get_with_token("/", &token).await,
        403,
        "membership_inactive",
    )
    .await;
    admin(
        &t,
        reqwest::Method::POST,
        "/memberships/soon-gone/org-acme/reactivate",
        None,
    )
    .await;

    let (status, _) = admin(
        &t,
        reqwest::Method::PATCH,
        "/memberships/soon-gone/org-acme",
        Some(json!({"role": "viewer"})),
    )
    .await;
    assert_eq!(status, 200);
    let echo = t.echo(t.http.get(t.url("/")).bearer_auth(&token)).await;
    assert_eq!(
        echo.header("x-user-role").as_deref(),
        Some("viewer"),
        "an operator's role stays while the IdP roles are unchanged"
    );

    let (_, events) = admin(
        &t,
        reqwest::Method::GET,
        "/audit-events?user=soon-gone&limit=50",
        None,
    )
    .await;
    let by_alice: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == "admin:alice")
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        by_alice,
        [
            "role_changed",
            "membership_reactivated",
            "membership_deactivated",
            "user_reactivated",
            "user_deactivated"
        ]
    );
}

async fn admin_api_manages_organizations_memberships_and_audit(db: TestDb) {
    let t = app().database(&db.url).start().await;
    let (status, org) = admin(
        &t,
        reqwest::Method::POST,
        "/organizations",
        Some(json!({"id": "org-new", "name": "New Co"})),
    )
    .await;
    assert_eq!(status, 201, "{org}");
    assert_eq!(
        (org["slug"].as_str(), org["issuer"].as_str()),
        (Some("new-co"), Some(t.issuer.issuer()))
    );
    let (status, err) = admin(
        &t,
        reqwest::Method::POST,
        "/organizations",
        Some(json!({"id": "org-new", "name": "Again"})),
    )
    .await;
    assert_eq!((status, err["error"].as_str()), (409, Some("conflict")));
    let (status, err) = admin(
        &t,
        reqwest::Method::POST,
        "/organizations",
        Some(json!({"id": "x", "name": "X", "slug": "Not A Slug"})),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, _) = admin(&t, reqwest::Method::GET, "/organizations/nope", None).await;
    assert_eq!(status, 404);

    let (_, renamed) = admin(
        &t,
        reqwest::Method::PATCH,
        "/organizations/org-new",
        Some(json!({"name": "Newer Co"})),
    )
    .await;
    assert_eq!(
        (renamed["name"].as_str(), renamed["slug"].as_str()),
        (Some("Newer Co"), Some("new-co")),
        "the slug is stable"
    );

    for i in 0..3 {
        assert_eq!(
            t.get_with_token("/", &t.issuer.mint(claims(&t, &format!("u{i}"))))
                .await
                .status(),
            200
        );
    }
    let (status, m) = admin(
        &t,
        reqwest::Method::POST,
        "/memberships",
        Some(json!({"user_id": "u0", "organization_id": "org-new", "role": "member"})),
    )
    .await;
    assert_eq!((status, m["role"].as_str()), (201, Some("member")));
    let (status, err) = admin(
        &t,
        reqwest::Method::POST,
        "/memberships",
        Some(json!({"user_id": "u0", "organization_id": "org-new", "role": "owner"})),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // Pagination walks every user exactly once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/users?limit=2&cursor={c}"),
            None => "/users?limit=2".into(),
        };
        let (_, page) = admin(&t, reqwest::Method::GET, &path, None).await;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["u0", "u1", "u2"]);
    let (_, filtered) = admin(
        &t,
        reqwest::Method::GET,
        "/users?organization=org-new",
        None,
    )
    .await;
    assert_eq!(filtered["items"].as_array().unwrap().len(), 1);
    let (_, by_email) = admin(
        &t,
        reqwest::Method::GET,
        "/users?email=u2@example.com",
        None,
    )
    .await;
    assert_eq!(by_email["items"][0]["id"], "u2");
    let (_, user) = admin(&t, reqwest::Method::GET, "/users/u0", None).await;
    let orgs: Vec<&str> = user["memberships"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["organization_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        orgs,
        ["org-acme", "org-new"],
        "the synced active tenant and the one added by the operator"
    );

    let (status, err) = admin(&t, reqwest::Method::DELETE, "/organizations/org-new", None).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (409, Some("conflict")),
        "refused while it has members"
    );
    let (status, _) = admin(
        &t,
        reqwest::Method::DELETE,
        "/organizations/org-new?force=true",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (_, user) = admin(&t, reqwest::Method::GET, "/users/u0", None).await;
    assert!(
        user["memberships"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["organization_id"] != "org-new"),
        "memberships cascade"
    );
    let (status, _) = admin(
        &t,
        reqwest::Method::DELETE,
        "/memberships/u1/org-acme",
        None,
    )
    .await;
    assert_eq!(status, 200);

    let (_, page) = admin(
        &t,
        reqwest::Method::GET,
        "/audit-events?kind=organization_deleted",
        None,
    )
    .await;
    assert_eq!(page["items"][0]["actor"], "admin:alice");
    assert_eq!(page["items"][0]["organization_id"], "org-new");
}

#[tokio::test]
async fn admin_api_requires_the_token_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin-token");
    std::fs::write(&file, "s3cret-admin-token-0123456789\n").unwrap();
    let t = app()
        .arg("--admin-token-file")
        .arg(file.to_str().unwrap())
        .start()
        .await;
    let url = format!("{}/admin/v1/organizations", t.app.admin_url());
    assert_error(t.http.get(&url).send().await.unwrap(), 401, "invalid_token").await;
    assert_error(
        t.http
            .get(&url)
            .bearer_auth("wrong-token-0123456789")
            .send()
            .await
            .unwrap(),
        401,
        "invalid_token",
    )
    .await;
    let r = t
        .http
        .get(&url)
        .bearer_auth("s3cret-admin-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ready = t
        .http
        .get(format!("{}/readyz", t.app.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "probes need no token");
}

#[tokio::test]
async fn without_a_token_the_admin_api_refuses_cross_site_and_rebound_requests() {
    let t = app().start().await;
    let token = t.issuer.mint(t.issuer.claims_for("victim"));
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    let url = format!("{}/admin/v1/users/victim/deactivate", t.app.admin_url());
    // A page on another site posting a form at the loopback admin port.
    let r = t
        .http
        .post(&url)
        .header("Origin", "https://evil.example")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("x=1")
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "forbidden_origin").await;
    // The same form without an Origin (older browsers, some navigations): not JSON, refused.
    let r = t
        .http
        .post(&url)
        .header("Content-Type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "forbidden_origin").await;
    // DNS rebinding: the attacker's name resolving to 127.0.0.1, so the Host is theirs.
    let r = t
        .http
        .get(format!("{}/admin/v1/users", t.app.admin_url()))
        .header("Host", "rebind.evil.example")
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "forbidden_origin").await;
    assert_eq!(
        t.get_with_token("/", &token).await.status(),
        200,
        "none of those changed anything"
    );
    // The operator's own call, as curl or the CLI would make it.
    let r = t
        .http
        .post(&url)
        .header("Content-Type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_error(t.get_with_token("/", &token).await, 403, "user_inactive").await;
}

#[test]
fn a_non_loopback_admin_port_without_a_token_file_refuses_to_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .args([
            "--upstream",
            "http://127.0.0.1:3000",
            "--issuer",
            "https://sso.example.com/realms/a",
            "--admin-listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --admin-token-file"));
}

#[tokio::test]
async fn cors_preflight_is_answered_and_a_disallowed_origin_gets_no_cors_headers() {
    let t = app()
        .arg("--cors-allow-origin")
        .arg("https://app.example.com")
        .start()
        .await;
    let preflight = |origin: &'static str| {
        t.http
            .request(reqwest::Method::OPTIONS, t.url("/api/things"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization, x-tenant-id",
            )
            .send()
    };
    let r = preflight("https://app.example.com").await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    assert!(
        r.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("x-tenant-id")
    );
    assert_eq!(r.headers()["access-control-max-age"], "600");

    let r = preflight("https://evil.example.com").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert_eq!(t.upstream.hits(), 0, "preflights never reach the app");

    let token = t.issuer.mint(t.issuer.claims_for("browser"));
    let r = t
        .http
        .get(t.url("/api"))
        .bearer_auth(&token)
        .header("Origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let r = t
        .http
        .get(t.url("/api"))
        .bearer_auth(&token)
        .header("Origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // Errors carry CORS headers too, so a browser app can read the 401.
    let r = t
        .http
        .get(t.url("/api"))
        .header("Origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
}
