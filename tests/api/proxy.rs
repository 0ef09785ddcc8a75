//! Forwarding with identity: headers the upstream sees for Keycloak and Frontegg tokens, spoofed
//! headers stripped, tenant requests honoured only when the token allows them, upstream failures.

use crate::helpers::{app, assert_error};
use devkit::SigningAlg;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn keycloak_token_reaches_the_upstream_with_identity_headers() {
    let t = app().start().await;
    let mut claims = t.issuer.claims_for("b2433b81-188f-4c01-b2ed-053bee5391d3");
    claims["email"] = json!("grace.turing@example.com");
    claims["name"] = json!("Grace Turing");
    claims["realm_access"] = json!({"roles": ["default-roles-acme", "admin"]});
    claims["resource_access"] =
        json!({"web-app": {"roles": ["editor"]}, "account": {"roles": ["view-profile"]}});
    claims["organization"] = json!({"acme": {"id": "38394337-9aff-503a-b737-e711338283d4"}});
    let token = t.issuer.mint(claims);
    let echo = t
        .echo(
            t.http
                .post(t.url("/api/v1/items?page=2"))
                .bearer_auth(&token)
                .body("hello"),
        )
        .await;
    assert_eq!(echo.status, 200);
    assert_eq!(echo.body["method"], "POST");
    assert_eq!(echo.body["path"], "/api/v1/items");
    assert_eq!(echo.body["query"], "page=2");
    assert_eq!(echo.body["body_bytes"], 5);
    assert_eq!(
        echo.header("x-user-id").as_deref(),
        Some("b2433b81-188f-4c01-b2ed-053bee5391d3")
    );
    assert_eq!(
        echo.header("x-tenant-id").as_deref(),
        Some("38394337-9aff-503a-b737-e711338283d4")
    );
    assert_eq!(
        echo.header("x-user-email").as_deref(),
        Some("grace.turing@example.com")
    );
    assert_eq!(echo.header("x-user-name").as_deref(), Some("Grace Turing"));
    assert_eq!(
        echo.header("x-user-roles").as_deref(),
        Some("default-roles-acme,admin,editor")
    );
    assert_eq!(echo.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(echo.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert!(echo.header("x-request-id").is_some_and(|id| !id.is_empty()));
}

#[tokio::test]
async fn frontegg_token_forwards_tenant_and_allows_switching_only_to_listed_tenants() {
    let t = app()
        .realm_path("")
        .alg(SigningAlg::ES256)
        .issuer_options(",dialect=frontegg")
        .start()
        .await;
    let mut claims = t.issuer.claims_for("a588e5d5-e07d-400b-bad8-7a78303da014");
    claims.as_object_mut().unwrap().remove("typ");
    claims["type"] = json!("userToken");
    claims["tenantId"] = json!("449e423c-2dc6-5f23-805d-76fed08c5a4b");
    claims["tenantIds"] = json!([
        "449e423c-2dc6-5f23-805d-76fed08c5a4b",
        "0f6c1a52-77c4-4f0c-8f3e-2b7a0e5d9a10"
    ]);
    claims["roles"] = json!(["Admin"]);
    claims["email"] = json!("linus@example.com");
    let token = t.issuer.mint(claims);

    let echo = t.echo(t.http.get(t.url("/")).bearer_auth(&token)).await;
    assert_eq!(
        echo.header("x-user-id").as_deref(),
        Some("a588e5d5-e07d-400b-bad8-7a78303da014")
    );
    assert_eq!(
        echo.header("x-tenant-id").as_deref(),
        Some("449e423c-2dc6-5f23-805d-76fed08c5a4b")
    );
    assert_eq!(
        echo.header("x-tenant-ids").as_deref(),
        Some("449e423c-2dc6-5f23-805d-76fed08c5a4b,0f6c1a52-77c4-4f0c-8f3e-2b7a0e5d9a10")
    );
    assert_eq!(echo.header("x-user-roles").as_deref(), Some("Admin"));

    let echo = t
        .echo(
            t.http
                .get(t.url("/"))
                .bearer_auth(&token)
                .header("X-Tenant-Id", "0f6c1a52-77c4-4f0c-8f3e-2b7a0e5d9a10"),
        )
        .await;
    assert_eq!(echo.status, 200);
    assert_eq!(
        echo.header("x-tenant-id").as_deref(),
        Some("0f6c1a52-77c4-4f0c-8f3e-2b7a0e5d9a10")
    );

    let hits = t.upstream.hits();
    let r = t
        .http
        .get(t.url("/"))
        .bearer_auth(&token)
        .header("X-Tenant-Id", "someone-elses-tenant")
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "tenant_not_permitted").await;
    assert_eq!(t.upstream.hits(), hits);
}

#[tokio::test]
async fn frontegg_tenant_token_forwards_the_tenant_without_a_user() {
    let t = app()
        .realm_path("")
        .issuer_options(",dialect=frontegg")
        .start()
        .await;
    let now = devkit::unix_now();
    let token = t.issuer.mint(json!({"type": "tenantApiToken", "tenantId": "t-42", "createdByUserId": "u-1", "exp": now + 60}));
    let echo = t.echo(t.http.get(t.url("/")).bearer_auth(&token)).await;
    assert_eq!(echo.status, 200);
    assert_eq!(echo.header("x-tenant-id").as_deref(), Some("t-42"));
    assert_eq!(echo.header("x-user-id"), None);
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let t = app().arg("--skip-auth").arg("/public").start().await;
    let token = t.issuer.mint(t.issuer.claims_for("real-user"));
    let spoof = |rb: reqwest::RequestBuilder| {
        rb.header("X-User-Id", "admin")
            .header("x-user-email", "root@example.com")
            .header("X-User-Roles", "superuser")
            .header("X-User-Role", "admin")
            .header("X-Tenant-Ids", "all")
            .header("X-Idsync-Synced", "true")
            .header("X-Idsync-Whatever", "1")
    };
    let echo = t
        .echo(spoof(t.http.get(t.url("/private")).bearer_auth(&token)))
        .await;
    assert_eq!(echo.status, 200);
    assert_eq!(echo.header("x-user-id").as_deref(), Some("real-user"));
    assert_eq!(
        echo.header("x-user-role").as_deref(),
        Some("member"),
        "the synced role, not the client's"
    );
    assert_eq!(
        echo.header("x-tenant-id").as_deref(),
        Some("acme"),
        "the token's tenant"
    );
    assert_eq!(echo.header("x-tenant-ids").as_deref(), Some("acme"));
    for h in [
        "x-user-email",
        "x-user-roles",
        "x-idsync-synced",
        "x-idsync-whatever",
    ] {
        assert_eq!(echo.header(h), None, "{h} must not be forwarded");
    }

    // Public paths are proxied without a token, and still stripped.
    let echo = t
        .echo(spoof(t.http.get(t.url("/public/logo.png"))).header("X-Tenant-Id", "t1"))
        .await;
    assert_eq!(echo.status, 200);
    for h in [
        "x-user-id",
        "x-user-email",
        "x-user-roles",
        "x-tenant-id",
        "x-idsync-synced",
    ] {
        assert_eq!(
            echo.header(h),
            None,
            "{h} must not be forwarded on a public path"
        );
    }
    // A path that normalises out of the public prefix still needs a token.
    let r = t.http.get(t.url("/public/../admin")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_upstream_is_504() {
    let t = app().start().await;
    let token = t.issuer.mint(t.issuer.claims_for("u"));
    let r = t.get_with_token("/slow/5000", &token).await;
    assert_error(r, 504, "upstream_timeout").await;

    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let t2 = app().upstream(&dead).start().await;
    let token = t2.issuer.mint(t2.issuer.claims_for("u"));
    let r = t2.get_with_token("/", &token).await;
    assert_error(r, 502, "upstream_unavailable").await;
}

#[tokio::test]
async fn client_request_id_is_kept() {
    let t = app().start().await;
    let token = t.issuer.mint(t.issuer.claims_for("u"));
    let echo = t
        .echo(
            t.http
                .get(t.url("/"))
                .bearer_auth(&token)
                .header("X-Request-Id", "req-123"),
        )
        .await;
    assert_eq!(echo.header("x-request-id").as_deref(), Some("req-123"));
}

/// From its second request on, a keep-alive client's requests go over an upstream connection of its
/// own (a lane, driven by the task serving the client); bodies stream through it both ways.
#[tokio::test]
async fn a_keep_alive_client_gets_an_upstream_connection_of_its_own() {
    let t = app().start().await;
    let token = t.issuer.mint(t.issuer.claims_for("u"));
    let mut peers = Vec::new();
    for i in 0..6 {
        let echo = t
            .echo(
                t.http
                    .post(t.url(&format!("/items/{i}")))
                    .bearer_auth(&token)
                    .body(vec![b'x'; 100_000 * i]),
            )
            .await;
        assert_eq!(echo.status, 200, "{}", echo.body);
        assert_eq!(echo.body["path"], format!("/items/{i}"));
        assert_eq!(echo.body["body_bytes"], 100_000 * i);
        peers.push(echo.body["peer"].as_str().unwrap().to_owned());
    }
    assert!(
        peers[2..].iter().all(|p| *p == peers[1]),
        "the lane carries every request after the first: {peers:?}"
    );
    assert_ne!(peers[0], peers[1], "the first request used the shared pool");

    // A second client connection has a lane of its own.
    let other = reqwest::Client::new();
    let mut theirs = Vec::new();
    for _ in 0..2 {
        let echo = t.echo(other.get(t.url("/")).bearer_auth(&token)).await;
        theirs.push(echo.body["peer"].as_str().unwrap().to_owned());
    }
    assert!(!peers.contains(&theirs[1]), "{peers:?} {theirs:?}");
}

/// An app that answers one request per connection and then closes it (a short keep-alive timeout), or
/// answers `Connection: close`: the client's next request still gets through, over a new connection.
#[tokio::test]
async fn a_lane_closed_by_the_app_is_replaced() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                // Every other connection says it closes; the rest close quietly a moment later.
                let close = if n.is_multiple_of(2) {
                    "connection: close\r\n"
                } else {
                    ""
                };
                let answer = format!("HTTP/1.1 200 OK\r\n{close}content-length: 2\r\n\r\nok");
                let _ = s.write_all(answer.as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            });
        }
    });
    let t = app().upstream(&upstream).start().await;
    let token = t.issuer.mint(t.issuer.claims_for("u"));
    for i in 0..8 {
        let r = t.get_with_token("/", &token).await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
        // Well after the app has closed: a close racing a request is HTTP/1.1's, pool or lane.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 8);
    server.abort();
}

/// An app that answers every request but the `close_on`th (counted from 0 across connections), which it
/// reads whole and then closes the connection on without a word: what a keep-alive timer firing as the
/// request arrives looks like from idsync's side. Returns the URL and the methods it answered.
async fn app_closing_on(
    close_on: usize,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let log = answered.clone();
    let server = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let (seen, log) = (seen.clone(), log.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == close_on {
                        return;
                    }
                    log.lock()
                        .unwrap()
                        .push(head.split(' ').next().unwrap_or_default().to_owned());
                    let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, answered, server)
}

/// The app closes a kept-alive lane connection just as the client's next request is written on it (its
/// keep-alive timer): a bodiless GET is sent again on another connection and the client never sees it.
/// Never sent twice: a request with a body or a method that is not idempotent, a request on a
/// connection used within the last second (no copy is kept on a busy connection), and a request that
/// failed on a new connection (the app crashed on it: a second copy would crash it again).
#[tokio::test]
async fn a_request_meeting_the_apps_keep_alive_close_is_replayed_only_when_safe() {
    struct Case {
        what: &'static str,
        close_on: usize,
        method: reqwest::Method,
        body: &'static str,
        idle: bool,
        replayed: bool,
    }
    let case = |what, close_on, method, body, idle, replayed| Case {
        what,
        close_on,
        method,
        body,
        idle,
        replayed,
    };
    use reqwest::Method;
    for c in [
        // Request 0 goes through the pool, request 1 opens the client's lane, request 2 meets the close.
        case("GET", 2, Method::GET, "", true, true),
        case("PUT with a body", 2, Method::PUT, "x", true, false),
        case("POST", 2, Method::POST, "", true, false),
        case("recently used", 2, Method::GET, "", false, false),
        // Request 1 is the first on the lane's new connection.
        case("new connection", 1, Method::GET, "", false, false),
    ] {
        let (upstream, answered, server) = app_closing_on(c.close_on).await;
        let t = app().upstream(&upstream).start().await;
        let token = t.issuer.mint(t.issuer.claims_for("u"));
        for _ in 0..c.close_on {
            let r = t.get_with_token("/", &token).await;
            assert_eq!(r.status(), 200, "{}", c.what);
        }
        if c.idle {
            // Past the idle time after which a lane's request is copied before it is sent.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let r = t
            .http
            .request(c.method.clone(), t.url("/items"))
            .bearer_auth(&token)
            .body(c.body)
            .send()
            .await
            .unwrap();
        let mut expected = vec!["GET"; c.close_on];
        if c.replayed {
            assert_eq!(r.status(), 200, "{}", c.what);
            assert_eq!(r.text().await.unwrap(), "ok");
            expected.push(c.method.as_str());
        } else {
            assert_error(r, 502, "upstream_unavailable").await;
        }
        assert_eq!(*answered.lock().unwrap(), expected, "{}", c.what);
        if crate::helpers::metrics_isolated() {
            // Process-wide: the GET's one replay, and none in the cases after it.
            assert_eq!(
                t.counter("idsync_upstream_replays_total", "").await,
                1.0,
                "{}",
                c.what
            );
        }
        // The client's connection goes on.
        assert_eq!(
            t.get_with_token("/", &token).await.status(),
            200,
            "{}",
            c.what
        );
        server.abort();
    }
}

/// A lane whose request timed out (504) is not reused for the next request on that client connection.
#[tokio::test]
async fn a_timed_out_request_does_not_poison_the_clients_next_one() {
    let t = app().arg("--upstream-timeout").arg("300ms").start().await;
    let token = t.issuer.mint(t.issuer.claims_for("u"));
    let first = t.echo(t.http.get(t.url("/")).bearer_auth(&token)).await;
    assert_eq!(first.status, 200);
    let r = t.get_with_token("/slow/2000", &token).await;
    assert_error(r, 504, "upstream_timeout").await;
    for path in ["/after", "/slow/10", "/again"] {
        let echo = t.echo(t.http.get(t.url(path)).bearer_auth(&token)).await;
        assert_eq!(echo.status, 200, "{path}: {}", echo.body);
    }
}

/// Clients that send a few requests per connection and leave (a CLI, a batch job) do not cost the app
/// a new connection each: an idle lane connection outlives its client as a spare for the next lane.
#[tokio::test]
async fn a_leaving_clients_upstream_connection_serves_the_next_client() {
    let t = app().start().await;
    let token = t.issuer.mint(t.issuer.claims_for("u"));
    let mut peers = std::collections::HashSet::new();
    for _ in 0..8 {
        let client = reqwest::Client::new();
        for _ in 0..3 {
            let echo = t.echo(client.get(t.url("/")).bearer_auth(&token)).await;
            assert_eq!(echo.status, 200, "{}", echo.body);
            peers.insert(echo.body["peer"].as_str().unwrap().to_owned());
        }
        drop(client);
        // The client's connection is closed; idsync's task for it ends and parks its lane.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        peers.len() <= 3,
        "8 clients of 3 requests each opened {} upstream connections",
        peers.len()
    );
}
