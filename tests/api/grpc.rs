//! HTTP/2 and gRPC through idsync: HTTP/2 with prior knowledge on the proxy port, an `h2c://` upstream
//! with trailers passed back, gRPC-shaped refusals, and a real grpcio client and server (PyPI `grpcio`,
//! `tests/grpc/peer.py`) for unary, client/server/bidi streaming, upstream statuses, deadlines and
//! cancellation. `.ci/run` installs grpcio and sets `IDSYNC_TEST_GRPC_PYTHON`; without it (and without
//! `IDSYNC_REQUIRE_PROXIES`) only the grpcio test is skipped.

use crate::helpers::app;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::time::Duration;

fn h2_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

fn request(url: &str, token: Option<&str>, grpc: bool) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::builder().uri(url);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if grpc {
        b = b
            .method("POST")
            .header("content-type", "application/grpc")
            .header("te", "trailers");
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn http2_prior_knowledge_is_served_and_refused_grpc_calls_get_grpc_statuses() {
    let t = app().start().await;
    let client = h2_client();
    let token = t.issuer.mint(t.issuer.claims_for("h2-user"));

    // An HTTP/2 client reaches an HTTP/1.1 app, with the identity and its own host.
    let r = client
        .request(request(&t.url("/hello"), Some(&token), false))
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let echo: Value =
        serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echo["headers"]["x-tenant-id"], json!(["acme"]), "{echo}");
    assert!(echo["headers"]["x-user-id"][0].is_string(), "{echo}");
    assert_eq!(
        echo["headers"]["x-forwarded-host"],
        json!([t.app.proxy_addr.to_string()]),
        "{echo}"
    );

    // Refused gRPC calls: HTTP 200, trailers-only, the gRPC status and idsync's error id.
    let hits = t.upstream.hits();
    for (token, tenant, code) in [
        (None, None, "16"),
        (Some("not.a.jwt"), None, "16"),
        (Some(token.as_str()), Some("not-mine"), "7"),
    ] {
        let mut req = request(&t.url("/pkg.Widgets/Get"), token, true);
        if let Some(tenant) = tenant {
            req.headers_mut()
                .insert("x-tenant-id", tenant.parse().unwrap());
        }
        let r = client.request(req).await.unwrap();
        assert_eq!(r.status(), 200);
        let h = r.headers().clone();
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-status"], code, "{h:?}");
        let message = h["grpc-message"].to_str().unwrap();
        let id = h["idsync-error-id"].to_str().unwrap();
        assert_eq!(id.len(), 16);
        assert!(message.contains(&format!("(error_id {id})")), "{message}");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty(), "a trailers-only answer has no body");
    }
    assert_eq!(t.upstream.hits(), hits, "no refused call reached the app");

    // The same refusal to a plain HTTP/2 request stays JSON.
    let r = client
        .request(request(&t.url("/hello"), None, false))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
}

/// An HTTP/2-only upstream that answers every request with the headers it got and a trailer.
async fn h2c_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let headers: serde_json::Map<String, Value> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("?"))))
                            .collect();
                        let version = format!("{:?}", req.version());
                        // `/slow/<ms>` answers after that long.
                        if let Some(ms) = req.uri().path().strip_prefix("/slow/") {
                            let ms: u64 = ms.parse().unwrap_or(0);
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let received = req.into_body().collect().await.ok();
                        let request_trailers: Vec<String> = received
                            .as_ref()
                            .and_then(|c| c.trailers())
                            .map(|t| t.keys().map(|k| k.to_string()).collect())
                            .unwrap_or_default();
                        let body = json!({"version": version, "headers": headers, "request_trailers": request_trailers});
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        trailers.insert("x-checksum", "abc".parse().unwrap());
                        let frames = futures_util::stream::iter([
                            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(
                                body.to_string(),
                            ))),
                            Ok(hyper::body::Frame::trailers(trailers)),
                        ]);
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                // HTTP/1.1 clients get only declared trailers.
                                .header("trailer", "grpc-status, x-checksum")
                                .body(http_body_util::StreamBody::new(frames))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn an_h2c_upstream_gets_http2_and_its_trailers_come_back() {
    let (addr, server) = h2c_upstream().await;
    let t = app().upstream(&format!("h2c://{addr}")).start().await;
    let token = t.issuer.mint(t.issuer.claims_for("h2c-user"));
    for client_http2 in [false, true] {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(client_http2)
            .build_http();
        let r = client
            .request(request(&t.url("/pkg.Widgets/Get"), Some(&token), true))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let head = format!("{:?}", r.headers());
        let collected = r.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_else(|| {
            panic!("trailers came back (client HTTP/2: {client_http2}): {head}")
        });
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-checksum"], "abc");
        let seen: Value = serde_json::from_slice(&collected.to_bytes()).unwrap();
        assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
        assert_eq!(seen["headers"]["te"], "trailers", "{seen}");
        assert_eq!(seen["headers"]["x-tenant-id"], "acme", "{seen}");
        assert!(seen["headers"].get("connection").is_none(), "{seen}");
    }
    server.abort();
}

fn grpc_python() -> Option<std::path::PathBuf> {
    let candidates = [
        std::env::var_os("IDSYNC_TEST_GRPC_PYTHON").map(std::path::PathBuf::from),
        Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/.venv/bin/python")),
    ];
    candidates.into_iter().flatten().find(|p| {
        p.exists()
            && std::process::Command::new(p)
                .args(["-c", "import grpc, grpc_health"])
                .output()
                .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test]
async fn a_real_grpc_client_and_server_work_through_idsync() {
    let Some(python) = grpc_python() else {
        if std::env::var_os("IDSYNC_REQUIRE_PROXIES").is_some() {
            panic!("grpcio is not installed but IDSYNC_REQUIRE_PROXIES is set");
        }
        eprintln!("grpcio is not installed: the real gRPC test did not run");
        return;
    };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc/peer.py");
    let mut server = tokio::process::Command::new(&python)
        .arg(&script)
        .arg("server")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(server.stdout.take().unwrap()));
    let port = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the gRPC server starts")
        .unwrap()
        .and_then(|l| l.strip_prefix("listening ").map(str::to_owned))
        .expect("the gRPC server prints its port");
    let t = app()
        .upstream(&format!("h2c://127.0.0.1:{port}"))
        .arg("--upstream-timeout")
        .arg("10s")
        .start()
        .await;
    let token = t.issuer.mint(t.issuer.claims_for("grpc-user"));
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&python)
            .arg(&script)
            .args(["client", &t.app.proxy_addr.to_string(), &token, "not-mine"])
            .output(),
    )
    .await
    .expect("the gRPC client finishes")
    .unwrap();
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(r["health"], "SERVING", "{r}");
    assert_eq!(r["no_token"]["code"], "UNAUTHENTICATED", "{r}");
    assert_eq!(r["bad_token"]["code"], "UNAUTHENTICATED", "{r}");
    assert!(
        r["bad_token"]["details"]
            .as_str()
            .unwrap()
            .contains("error_id"),
        "{r}"
    );
    assert_eq!(r["forbidden_tenant"]["code"], "PERMISSION_DENIED", "{r}");

    let unary = &r["unary"];
    assert_eq!(unary["echo"], "hello");
    assert!(unary["user"].is_string(), "the app got the identity: {r}");
    assert_eq!(unary["tenant"], "acme");
    let left = unary["grpc_timeout_left"]
        .as_f64()
        .expect("the deadline reached the app");
    // grpcio rounds the remaining time up to its timer granularity.
    assert!(left > 1.0 && left < 6.0, "{r}");
    assert_eq!(r["unary_trailers"]["x-upstream-trailer"], "kept", "{r}");

    assert_eq!(r["client_stream"], "a|b|c");
    assert_eq!(r["server_stream"], json!(["0", "1", "2", "3", "4"]));
    assert_eq!(r["bidi"], json!(["X", "Y"]));
    assert_eq!(
        r["fail"]["code"], "NOT_FOUND",
        "the app's own status passes: {r}"
    );
    assert_eq!(r["fail"]["details"], "no such widget");
    assert_eq!(r["deadline"]["code"], "DEADLINE_EXCEEDED", "{r}");
    let cancelled: Vec<&str> = r["stats"]["cancelled"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        cancelled.contains(&"slow"),
        "the app saw the expired deadline end the call: {r}"
    );
    assert!(
        cancelled.contains(&"server_stream"),
        "the app saw the cancelled stream end: {r}"
    );
    drop(server.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(5), server.wait()).await;
}

type Frames =
    futures_util::stream::Iter<std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, Infallible>>>;

/// A request body of `data` followed by these trailers.
fn body_with_trailers(
    data: &'static [u8],
    trailers: &[(&'static str, &'static str)],
) -> http_body_util::StreamBody<Frames> {
    let mut map = http::HeaderMap::new();
    for (k, v) in trailers {
        map.insert(*k, v.parse().unwrap());
    }
    http_body_util::StreamBody::new(futures_util::stream::iter(vec![
        Ok(hyper::body::Frame::data(Bytes::from_static(data))),
        Ok(hyper::body::Frame::trailers(map)),
    ]))
}

#[tokio::test]
async fn request_trailers_never_reach_the_app() {
    // Regression: with `Trailer` no longer stripped, a client's trailer named X-User-Id went past the
    // header policy to an h2c app.
    let (addr, server) = h2c_upstream().await;
    let t = app().upstream(&format!("h2c://{addr}")).start().await;
    let token = t.issuer.mint(t.issuer.claims_for("honest"));
    for http2 in [true, false] {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build_http();
        let req = http::Request::builder()
            .method("POST")
            .uri(t.url("/upload"))
            .header("authorization", format!("Bearer {token}"))
            .header("te", "trailers")
            .header("trailer", "x-user-id, x-tenant-id")
            .body(body_with_trailers(
                b"payload",
                &[("x-user-id", "victim"), ("x-tenant-id", "victims-tenant")],
            ))
            .unwrap();
        let r = client.request(req).await.unwrap();
        assert_eq!(r.status(), 200);
        let seen: Value =
            serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(
            seen["request_trailers"],
            json!([]),
            "HTTP/2 client {http2}: {seen}"
        );
        assert_ne!(seen["headers"]["x-user-id"], "victim", "{seen}");
        assert!(seen["headers"].get("trailer").is_none(), "{seen}");
    }
    server.abort();
}

#[tokio::test]
async fn grpc_calls_wait_for_their_own_deadline_not_the_upstream_timeout() {
    // Regression: --upstream-timeout (here 1 s) cut gRPC calls whose client allowed longer.
    let (addr, server) = h2c_upstream().await;
    let t = app()
        .upstream(&format!("h2c://{addr}"))
        .arg("--upstream-timeout")
        .arg("1s")
        .start()
        .await;
    let token = t.issuer.mint(t.issuer.claims_for("patient-grpc"));
    let client = h2_client();
    let call = |path: &str, deadline: &str| {
        let mut req = request(&t.url(path), Some(&token), true);
        req.headers_mut()
            .insert("grpc-timeout", deadline.parse().unwrap());
        client.request(req)
    };
    let r = call("/slow/2500", "10S").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("grpc-status").is_none(),
        "answered by the app"
    );
    // A deadline shorter than the app's answer: idsync gives up a second after it, in gRPC's terms.
    let started = std::time::Instant::now();
    let r = call("/slow/5000", "500m").await.unwrap();
    assert_eq!(r.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // Plain HTTP keeps --upstream-timeout.
    let r = client
        .request(request(&t.url("/slow/2500"), Some(&token), false))
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    server.abort();
}

#[tokio::test]
async fn the_request_target_names_the_host_not_a_second_host_header() {
    // Regression: an absolute-form target (or HTTP/2 `:authority`) with a different `Host` made the
    // `Host` header win, so X-Forwarded-Host named what the target did not.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = app().start().await;
    let token = t.issuer.mint(t.issuer.claims_for("host-user"));
    let mut s = tokio::net::TcpStream::connect(t.app.proxy_addr)
        .await
        .unwrap();
    s.write_all(
        format!(
            "GET http://good.example/x HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body: Value = serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(
        body["headers"]["x-forwarded-host"],
        json!(["good.example"]),
        "{body}"
    );
    assert_eq!(body["headers"]["host"], json!(["good.example"]), "{body}");
}

#[tokio::test]
async fn a_client_that_sends_nothing_or_half_a_preface_is_disconnected() {
    // Regression: with one listener for both protocols, the first bytes were awaited without the
    // header-read timeout, so a silent connection stayed open for ever.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = app().arg("--header-read-timeout").arg("1s").start().await;
    for first in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut s = tokio::net::TcpStream::connect(t.app.proxy_addr)
            .await
            .unwrap();
        s.write_all(first).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "the server must close the connection ({first:?})"
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }
    let token = t.issuer.mint(t.issuer.claims_for("after-silence"));
    let r = h2_client()
        .request(request(&t.url("/"), Some(&token), false))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "HTTP/2 still served");
}
