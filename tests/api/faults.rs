//! Faults and concurrency across processes: two idsync processes on one PostgreSQL database, a slow IdP
//! under a stampede, and last-login writes that must land on graceful shutdown.

use crate::db::TestDb;
use crate::helpers::app;
use devkit::{EchoUpstream, LocalIssuer, SigningAlg};
use entity::{audit_events, memberships, organizations, users};
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_idsync_processes_on_one_postgres_make_each_identity_exactly_once() {
    let Some(db) = TestDb::postgres().await else {
        eprintln!("IDSYNC_TEST_POSTGRES_URL is not set: not run");
        return;
    };
    let issuer = LocalIssuer::start("/realms/acme", SigningAlg::ES256)
        .await
        .unwrap();
    let upstream = EchoUpstream::start().await.unwrap();
    let migrate = tokio::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .args(["migrate", "up", "--database-url", &db.url])
        .output()
        .await
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let args: Vec<String> = [
        "--upstream",
        &upstream.url(),
        "--issuer",
        issuer.issuer(),
        "--database-url",
        &db.url,
        "--migrate",
        "skip",
    ]
    .map(String::from)
    .to_vec();
    let (_a, proxy_a) = crate::helpers::spawn_binary(&args).await;
    let (_b, proxy_b) = crate::helpers::spawn_binary(&args).await;

    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = issuer.claims_for(&format!("user-{}", i % 20));
        c.as_object_mut().unwrap().remove("tenant_id");
        c["organization"] = json!({format!("Org {}", i % 4): {"id": format!("org-{}", i % 4)}});
        c["jti"] = json!(i);
        let token = issuer.mint(c);
        let url = format!("http://{}/", if i % 2 == 0 { &proxy_a } else { &proxy_b });
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            // Keys load in the background at start; retry briefly until they are there.
            for _ in 0..100 {
                let status = http
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16();
                if status != 503 {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            503
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let conn = db.connect().await;
    assert_eq!(users::Entity::find().count(&conn).await.unwrap(), 20);
    assert_eq!(organizations::Entity::find().count(&conn).await.unwrap(), 4);
    assert_eq!(
        memberships::Entity::find().count(&conn).await.unwrap(),
        20,
        "user-N is always in org-(N mod 4)"
    );
    let evs = audit_events::Entity::find().all(&conn).await.unwrap();
    let n = |k: &str| evs.iter().filter(|e| e.kind == k).count();
    assert_eq!(
        (
            n("user_created"),
            n("organization_created"),
            n("membership_created"),
            evs.len()
        ),
        (20, 4, 20, 44)
    );
}

#[tokio::test]
async fn pending_last_login_writes_land_on_graceful_shutdown() {
    let t = app().arg("--last-seen-interval").arg("1s").start().await;
    let token = t.issuer.mint(t.issuer.claims_for("leaving"));
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    let db_url = format!("sqlite://{}/idsync.db?mode=rwc", t.dir.path().display());
    let conn = sea_orm::Database::connect(&db_url).await.unwrap();
    let first = users::Entity::find_by_id("leaving")
        .one(&conn)
        .await
        .unwrap()
        .unwrap()
        .last_login_at
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        t.get_with_token("/", &token).await.status(),
        200,
        "queues a last-login write"
    );
    // Stop at once: the background writer (every 250 ms here) may not have run; shutdown must flush.
    let crate::helpers::TestApp { app, dir: _dir, .. } = t;
    app.stop().await.unwrap();
    let last = users::Entity::find_by_id("leaving")
        .one(&conn)
        .await
        .unwrap()
        .unwrap()
        .last_login_at
        .unwrap();
    assert!(last > first, "the pending write landed ({first} -> {last})");
}

#[tokio::test]
async fn a_slow_idp_during_a_kid_stampede_gets_one_fetch_and_requests_answer_in_bounded_time() {
    let t = app().arg("--idp-timeout").arg("1s").start().await;
    t.issuer.set_delay(Duration::from_secs(3));
    let before = t.issuer.jwks_fetches();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..30 {
        let token = t.issuer.sign_raw(
            &json!({"alg": "RS256", "kid": format!("rotated-{i}")}),
            &t.issuer.claims_for("x"),
        );
        let (http, url) = (t.http.clone(), t.url("/"));
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
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded by --idp-timeout, took {:?}",
        started.elapsed()
    );
    assert!(
        t.issuer.jwks_fetches() - before <= 1,
        "single-flight: {} fetches",
        t.issuer.jwks_fetches() - before
    );
    // Known keys keep working while the IdP is slow.
    t.issuer.set_delay(Duration::ZERO);
    assert_eq!(
        t.get_with_token("/", &t.issuer.mint(t.issuer.claims_for("ok")))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn an_upstream_that_resets_connections_gives_502_and_idsync_keeps_serving() {
    use tokio::io::AsyncReadExt;
    // Accepts, reads a little, then closes without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let t = app().upstream(&format!("http://{addr}")).start().await;
    let token = t.issuer.mint(t.issuer.claims_for("u"));
    for _ in 0..5 {
        crate::helpers::assert_error(
            t.get_with_token("/", &token).await,
            502,
            "upstream_unavailable",
        )
        .await;
    }
    let live = t
        .http
        .get(format!("{}/livez", t.app.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
}

#[tokio::test]
async fn clients_disconnecting_mid_upload_and_mid_download_do_not_disturb_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = app().start().await;
    let token = t.issuer.mint(t.issuer.claims_for("flaky"));
    for _ in 0..10 {
        // Announce 100 MiB, send 1 MiB, vanish.
        let mut up = tokio::net::TcpStream::connect(t.app.proxy_addr)
            .await
            .unwrap();
        up.write_all(format!("PUT /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 104857600\r\n\r\n").as_bytes()).await.unwrap();
        up.write_all(&vec![b'z'; 1024 * 1024]).await.unwrap();
        drop(up);
        // Ask for 100 MiB, read a little, vanish.
        let mut down = tokio::net::TcpStream::connect(t.app.proxy_addr)
            .await
            .unwrap();
        down.write_all(
            format!("GET /stream/100 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let _ = down.read(&mut buf).await.unwrap();
        drop(down);
    }
    let echo = t
        .echo(t.http.get(t.url("/after")).bearer_auth(&token))
        .await;
    assert_eq!(echo.status, 200, "idsync still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_websockets_pass_through() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let t = app().start().await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let token = t.issuer.mint(t.issuer.claims_for(&format!("ws-{i}")));
        let addr = t.app.proxy_addr;
        tasks.push(tokio::spawn(async move {
            let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
            req.headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
            let hello = ws.next().await.unwrap().unwrap();
            ws.send(Message::Text(format!("msg-{i}").into()))
                .await
                .unwrap();
            let echoed = ws.next().await.unwrap().unwrap();
            (hello, echoed, ws)
        }));
    }
    let mut open = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let (hello, echoed, ws) = task.await.unwrap();
        assert_eq!(hello, Message::Text(format!("hello ws-{i}").into()));
        assert_eq!(echoed, Message::Text(format!("msg-{i}").into()));
        open.push(ws);
    }
    assert_eq!(open.len(), 100, "all 100 were open at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_database_and_an_exhausted_pool_answer_503_quickly() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let Some(db) = TestDb::postgres().await else {
        eprintln!("IDSYNC_TEST_POSTGRES_URL is not set: not run");
        return;
    };
    let t = app()
        .database(&db.url)
        .arg("--database-max-connections")
        .arg("1")
        .arg("--database-timeout")
        .arg("1s")
        .start()
        .await;
    // Another client holds an exclusive lock on `users`: the first sync stalls holding the only connection.
    let conn = db.connect().await;
    let lock = conn.begin().await.unwrap();
    lock.execute_unprepared("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let token = t.issuer.mint(t.issuer.claims_for(&format!("stalled-{i}")));
        let (http, url) = (t.http.clone(), t.url("/"));
        tasks.push(tokio::spawn(async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            (r.status().as_u16(), Instant::now())
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    lock.rollback().await.unwrap();
    let results: Vec<(u16, Instant)> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let quick_503s = results
        .iter()
        .filter(|(s, at)| *s == 503 && at.duration_since(started) < Duration::from_millis(2500))
        .count();
    assert!(
        quick_503s >= 8,
        "requests waiting for the pool get 503 within the database timeout: {:?}",
        results
            .iter()
            .map(|(s, at)| (s, at.duration_since(started)))
            .collect::<Vec<_>>()
    );
    assert!(
        results.iter().all(|(s, _)| *s == 503 || *s == 200),
        "only 503 or, once the lock is gone, 200"
    );
    // And the sidecar recovers by itself.
    assert_eq!(
        t.get_with_token("/", &t.issuer.mint(t.issuer.claims_for("after-stall")))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_finishes_every_in_flight_request() {
    let t = app().start().await;
    let token = t.issuer.mint(t.issuer.claims_for("busy"));
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (http, url, token) = (t.http.clone(), t.url("/slow/1500"), token.clone());
        tasks.push(tokio::spawn(async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    // Stop once every request is in flight at the upstream (not after a guess at how long that takes).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while t.upstream.hits() < 51 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(t.upstream.hits(), 51, "all 50 reached the upstream");
    let crate::helpers::TestApp {
        app,
        issuer: _issuer,
        upstream: _upstream,
        ..
    } = t;
    app.stop().await.unwrap();
    for task in tasks {
        assert_eq!(
            task.await.unwrap().unwrap(),
            200,
            "no request fails because of the shutdown itself"
        );
    }
}
