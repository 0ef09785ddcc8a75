//! Test harness: starts an issuer, an echo upstream and idsync with a temporary SQLite database.

use clap::Parser;
use devkit::{EchoUpstream, LocalIssuer, SigningAlg};
use idsync::cli::Cli;
use idsync::startup::{Application, Running};
use serde_json::Value;
use std::time::Duration;

pub struct TestApp {
    pub app: Running,
    pub issuer: LocalIssuer,
    pub upstream: EchoUpstream,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

/// What an echo of the upstream looks like.
pub struct Echo {
    pub status: u16,
    pub body: Value,
}

impl Echo {
    /// The single value of a header the upstream received.
    pub fn header(&self, name: &str) -> Option<String> {
        let values = self.body["headers"][name].as_array()?;
        assert_eq!(
            values.len(),
            1,
            "header {name} reached the upstream {} times",
            values.len()
        );
        values[0].as_str().map(str::to_owned)
    }
}

pub struct Builder {
    realm_path: String,
    alg: SigningAlg,
    issuer_options: String,
    args: Vec<String>,
    start_issuer_down: bool,
    upstream: Option<String>,
    database: Option<String>,
    issuer: Option<LocalIssuer>,
}

pub fn app() -> Builder {
    Builder {
        realm_path: "/realms/acme".into(),
        alg: SigningAlg::RS256,
        issuer_options: String::new(),
        args: Vec::new(),
        start_issuer_down: false,
        upstream: None,
        database: None,
        issuer: None,
    }
}

impl Builder {
    pub fn realm_path(mut self, path: &str) -> Self {
        self.realm_path = path.into();
        self
    }

    pub fn alg(mut self, alg: SigningAlg) -> Self {
        self.alg = alg;
        self
    }

    /// Appended to the `--issuer` spec, e.g. `,dialect=frontegg,audience=x`.
    pub fn issuer_options(mut self, opts: &str) -> Self {
        self.issuer_options = opts.into();
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.into());
        self
    }

    /// Uses this database URL instead of a fresh SQLite file.
    pub fn database(mut self, url: &str) -> Self {
        self.database = Some(url.into());
        self
    }

    /// Trusts an existing issuer instead of starting a new one (several sidecars, one IdP).
    pub fn with_issuer(mut self, issuer: &LocalIssuer) -> Self {
        self.issuer = Some(issuer.clone());
        self
    }

    /// Points idsync at another upstream than the echo server (e.g. a closed port).
    pub fn upstream(mut self, url: &str) -> Self {
        self.upstream = Some(url.into());
        self
    }

    pub fn issuer_down_at_start(mut self) -> Self {
        self.start_issuer_down = true;
        self
    }

    pub async fn start(self) -> TestApp {
        idsync::telemetry::init_for_tests();
        let issuer = match self.issuer {
            Some(i) => i,
            None => LocalIssuer::start(&self.realm_path, self.alg)
                .await
                .unwrap(),
        };
        if self.start_issuer_down {
            issuer.set_mode(devkit::IssuerMode::Down);
        }
        let upstream = EchoUpstream::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let options = self
            .issuer_options
            .replace("{dir}", dir.path().to_str().unwrap());
        let mut argv: Vec<String> = vec![
            "idsync".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
            "--upstream".into(),
            self.upstream.clone().unwrap_or_else(|| upstream.url()),
            "--issuer".into(),
            format!("{}{}", issuer.issuer(), options),
            "--database-url".into(),
            self.database
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}/idsync.db?mode=rwc", dir.path().display())),
        ];
        // A short default keeps timeout tests fast; a test that streams a lot sets its own.
        if !self.args.iter().any(|a| a == "--upstream-timeout") {
            argv.extend(["--upstream-timeout".into(), "2s".into()]);
        }
        argv.extend(self.args);
        let settings = Cli::try_parse_from(&argv)
            .unwrap()
            .serve_settings()
            .unwrap();
        let app = Application::build(&settings).await.unwrap().spawn();
        let test = TestApp {
            app,
            issuer,
            upstream,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            dir,
        };
        if !self.start_issuer_down {
            test.wait_ready().await;
        }
        test
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.app.proxy_url(), path)
    }

    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = self
                .http
                .get(format!("{}/readyz", self.app.admin_url()))
                .send()
                .await;
            if r.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "idsync did not become ready in 10s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn get_with_token(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path` with `token` until the answer is `status` (what a background task, e.g. a key
    /// refresh, is expected to bring about), at most 10 s; returns the last response.
    pub async fn get_until(&self, path: &str, token: &str, status: u16) -> reqwest::Response {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.get_with_token(path, token).await;
            if r.status() == status || std::time::Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET through the proxy and parse the echo.
    pub async fn echo(&self, req: reqwest::RequestBuilder) -> Echo {
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.json::<Value>().await.unwrap_or(Value::Null);
        Echo { status, body }
    }

    /// Calls the admin API as operator `alice`; returns the status and the JSON body.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}/admin/v1{path}", self.app.admin_url()))
            .header("X-Admin-Actor", "alice")
            .header("content-type", "application/json");
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Sends `GET <path>` exactly as written (HTTP clients normalise `..` and `%2e` away before sending)
    /// and returns the status.
    pub async fn raw_get(&self, path: &str, token: Option<&str>) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.app.proxy_addr)
            .await
            .unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: app\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let head = String::from_utf8_lossy(&out);
        head.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.app.admin_url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The sum of a counter's samples whose label set contains `labels` (e.g. `outcome="hit"`).
    /// Metrics are process-wide: only exact when this test has the process to itself (see
    /// [`metrics_isolated`]).
    pub async fn counter(&self, name: &str, labels: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#') && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Asserts an idsync error response: status, `error` code, an `error_id`, and for 401 the RFC 6750 challenge.
pub async fn assert_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "status");
    if status == 401 && code == "invalid_token" {
        let challenge = r
            .headers()
            .get("www-authenticate")
            .expect("401 carries WWW-Authenticate")
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            challenge.starts_with("Bearer ") && challenge.contains(r#"error="invalid_token""#),
            "{challenge}"
        );
    }
    let body: Value = r.json().await.expect("error body is JSON");
    assert_eq!(body["error"], code, "{body}");
    assert_eq!(body["error_id"].as_str().map(str::len), Some(16), "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    body
}

/// Starts the real `idsync` binary (JSON logs, ports chosen by the OS) and returns it with its proxy
/// address, read from its "idsync listening" log line; its output keeps being drained.
pub async fn spawn_binary(args: &[String]) -> (tokio::process::Child, String) {
    let (child, listening) = spawn_binary_env(args, &[]).await;
    (child, listening["proxy"].as_str().unwrap().to_owned())
}

/// [`spawn_binary`] with `IDSYNC_*` variables set, returning the whole "idsync listening" log line.
pub async fn spawn_binary_env(
    args: &[String],
    env: &[(&str, &str)],
) -> (tokio::process::Child, Value) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .envs(env.iter().copied())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "idsync listening" {
                return v;
            }
        }
        panic!("idsync exited before listening");
    })
    .await
    .expect("idsync started within 20s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, listening)
}

/// Whether this test runs alone in its process (nextest's process-per-test), so process-wide metrics
/// count only its own work. Under `cargo test`, tests share the process and run concurrently: an exact
/// assertion on a counter is then skipped (with a note), the rest of the test still runs; `.ci/run` runs
/// the suite both ways.
pub fn metrics_isolated() -> bool {
    let alone = std::env::var("NEXTEST_EXECUTION_MODE").is_ok_and(|m| m == "process-per-test");
    if !alone {
        eprintln!(
            "note: tests share this process; exact metric assertions skipped (run with nextest)"
        );
    }
    alone
}
