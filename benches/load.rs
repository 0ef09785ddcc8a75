//! The load benchmark: run with `bench/load.sh` (it builds the release binaries and installs wrk).
//! Starts, on loopback only, a fast upstream, a local issuer with generated keys, the pass-through
//! baseline and idsync (as separate processes, so their CPU and memory are their own), pre-mints tokens
//! for N users across M tenants, and drives each scenario with wrk for a bounded time. Prints requests/s,
//! latency percentiles, errors, idsync's CPU seconds and peak RSS, and ratios against the baseline.

use idsync::devkit::{LocalIssuer, SigningAlg};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Opts {
    duration: u64,
    connections: u32,
    threads: u32,
    users: usize,
    tenants: usize,
    cold_tokens: usize,
    postgres: Option<String>,
}

fn opts() -> Opts {
    let mut o = Opts {
        duration: 10,
        connections: 64,
        threads: 2,
        users: 1000,
        tenants: 50,
        cold_tokens: 40_000,
        postgres: std::env::var("IDSYNC_BENCH_POSTGRES_URL").ok(),
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--duration" => o.duration = v.parse().unwrap_or(o.duration),
            "--connections" => o.connections = v.parse().unwrap_or(o.connections),
            "--users" => o.users = v.parse().unwrap_or(o.users),
            "--tenants" => o.tenants = v.parse().unwrap_or(o.tenants),
            "--cold-tokens" => o.cold_tokens = v.parse().unwrap_or(o.cold_tokens),
            "--postgres" => o.postgres = Some(v),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

const LUA: &str = r#"
local tokens = {}
local counter = 0
local threads = {}
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end
function init(args)
  id = wrk.thread:get("id")
  nthreads = tonumber(os.getenv("WRK_THREADS"))
  local path = os.getenv("TOKENS")
  if path ~= nil and path ~= "" then
    for line in io.lines(path) do tokens[#tokens + 1] = line end
  end
  i = 0
end
function request()
  i = i + 1
  if #tokens == 0 then return wrk.format("GET", "/") end
  -- Threads take disjoint tokens, so a cold run never repeats one until the list is used up.
  local n = ((i - 1) * nthreads + id) % #tokens + 1
  return wrk.format("GET", "/", {["Authorization"] = "Bearer " .. tokens[n]})
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests":%d,"duration_us":%d,"socket_errors":%d,"non2xx":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release")
}

/// CPU seconds (user + system) and peak RSS (KiB) of a process, from /proc.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields after the command name start at index 3 (state); utime and stime are the 14th and 15th.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (cpu, hwm)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_http(url: &str) {
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not come up");
}

fn spawn_idsync(upstream: &str, issuer: &str, db: &str, extra: &[&str]) -> (Proc, String) {
    let (port, admin) = (free_port(), free_port());
    let child = Command::new(target_dir().join("idsync"))
        .env_clear()
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
        ])
        .args([
            "--upstream",
            upstream,
            "--issuer",
            issuer,
            "--database-url",
            db,
            "--log-level",
            "warn",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("target/release/idsync: run bench/load.sh, which builds it");
    (Proc(child), format!("127.0.0.1:{port}|127.0.0.1:{admin}"))
}

#[derive(Clone, Debug)]
struct Run {
    name: String,
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    errors: u64,
    cpu: Option<f64>,
    rss_mib: Option<f64>,
}

fn wrk(
    name: &str,
    url: &str,
    tokens: Option<&Path>,
    o: &Opts,
    pid: Option<u32>,
    script: &Path,
) -> Run {
    let before = pid.map(usage);
    let out = Command::new("wrk")
        .args([
            "-t",
            &o.threads.to_string(),
            "-c",
            &o.connections.to_string(),
            "-d",
            &format!("{}s", o.duration),
            "--timeout",
            "5s",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .env(
            "TOKENS",
            tokens
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        )
        .env("WRK_THREADS", o.threads.to_string())
        .output()
        .expect("wrk is installed by bench/load.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("wrk said: {text}"));
    let r: Value = serde_json::from_str(line).unwrap();
    let after = pid.map(usage);
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    Run {
        name: name.into(),
        rps: f("requests") / (f("duration_us") / 1e6),
        p50: f("p50"),
        p90: f("p90"),
        p99: f("p99"),
        max: f("max"),
        errors: (f("socket_errors") + f("non2xx")) as u64,
        cpu: before.zip(after).map(|(b, a)| a.0 - b.0),
        rss_mib: after.map(|a| a.1 as f64 / 1024.0),
    }
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

/// Sends every token once so their identities are synced and their verifications cached.
async fn prime(url: &str, tokens: &[String]) {
    let http = reqwest::Client::new();
    for chunk in tokens.chunks(64) {
        let mut set = tokio::task::JoinSet::new();
        for t in chunk {
            let (http, url, t) = (http.clone(), url.to_owned(), t.clone());
            set.spawn(async move {
                http.get(url)
                    .bearer_auth(t)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().unwrap(), 200, "priming failed");
        }
    }
}

async fn fresh_postgres(admin_url: &str) -> String {
    use sea_orm::ConnectionTrait;
    let name = format!("idsync_bench_{}", uuid::Uuid::new_v4().simple());
    let conn = sea_orm::Database::connect(admin_url).await.unwrap();
    conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let mut u = url::Url::parse(admin_url).unwrap();
    u.set_path(&format!("/{name}"));
    u.to_string()
}

#[tokio::main]
async fn main() {
    let o = opts();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("bench.lua");
    std::fs::write(&script, LUA).unwrap();

    // A fast upstream: 200 with a small body.
    let up_port = free_port();
    let upstream_url = format!("http://127.0.0.1:{up_port}");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", up_port))
        .await
        .unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(|| async { "ok" });
        axum::serve(listener, app).await.unwrap();
    });

    let issuer = LocalIssuer::start("/realms/bench", SigningAlg::RS256)
        .await
        .unwrap();
    let rs_kid = issuer.jwks_document()["keys"][0]["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    issuer.add_key(SigningAlg::ES256); // cheap to mint: used for the many warm and cold tokens
    let claims = |sub: String, tenant: usize| {
        let mut c = issuer.claims_for(&sub);
        c["exp"] = json!(idsync::http::auth::unix_now() + 3600);
        c["tenant_id"] = json!(format!("tenant-{tenant}"));
        c["email"] = json!(format!("{sub}@example.com"));
        c["realm_access"] = json!({"roles": ["member"]});
        c
    };
    let warm: Vec<String> = (0..o.users)
        .map(|u| issuer.mint(claims(format!("user-{u}"), u % o.tenants)))
        .collect();
    let uncached: Vec<String> = (0..o.users)
        .map(|u| issuer.mint_with_kid(&rs_kid, claims(format!("user-{u}"), u % o.tenants)))
        .collect();
    println!("minting {} cold tokens...", o.cold_tokens);
    let cold: Vec<String> = (0..o.cold_tokens)
        .map(|u| issuer.mint(claims(format!("cold-{u}"), u % o.tenants)))
        .collect();
    let (warm_file, uncached_file, cold_file) = (
        dir.path().join("warm"),
        dir.path().join("uncached"),
        dir.path().join("cold"),
    );
    write_lines(&warm_file, &warm);
    write_lines(&uncached_file, &uncached);
    write_lines(&cold_file, &cold);

    let mut runs: Vec<Run> = Vec::new();
    println!("1. direct");
    runs.push(wrk(
        "1 direct to upstream",
        &upstream_url,
        None,
        &o,
        None,
        &script,
    ));

    println!("2. pass-through baseline");
    let pt_port = free_port();
    let pt = Proc(
        Command::new(target_dir().join("examples/passthrough"))
            .args([format!("127.0.0.1:{pt_port}"), upstream_url.clone()])
            .stdout(Stdio::null())
            .spawn()
            .expect("run bench/load.sh, which builds the passthrough example"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    runs.push(wrk(
        "2 pass-through baseline",
        &format!("http://127.0.0.1:{pt_port}"),
        None,
        &o,
        Some(pt.0.id()),
        &script,
    ));
    drop(pt);

    let mut databases = vec![(
        "SQLite",
        format!("sqlite://{}/bench.db?mode=rwc", dir.path().display()),
    )];
    if let Some(pg) = &o.postgres {
        databases.push(("PostgreSQL", fresh_postgres(pg).await));
    }
    for (label, db) in &databases {
        println!("3. idsync warm path on {label}");
        let (p, addrs) = spawn_idsync(&upstream_url, issuer.issuer(), db, &[]);
        let (proxy, admin) = addrs.split_once('|').unwrap();
        wait_http(&format!("http://{admin}/readyz")).await;
        prime(&format!("http://{proxy}/"), &warm).await;
        runs.push(wrk(
            &format!("3 idsync warm ({label})"),
            &format!("http://{proxy}"),
            Some(&warm_file),
            &o,
            Some(p.0.id()),
            &script,
        ));
    }

    println!("4. idsync, token cache disabled (RS256 verify per request)");
    {
        let db = format!(
            "sqlite://{}/bench-nocache.db?mode=rwc",
            dir.path().display()
        );
        let (p, addrs) = spawn_idsync(
            &upstream_url,
            issuer.issuer(),
            &db,
            &["--token-cache-size", "0"],
        );
        let (proxy, admin) = addrs.split_once('|').unwrap();
        wait_http(&format!("http://{admin}/readyz")).await;
        prime(&format!("http://{proxy}/"), &uncached).await;
        runs.push(wrk(
            "4 idsync no token cache (SQLite)",
            &format!("http://{proxy}"),
            Some(&uncached_file),
            &o,
            Some(p.0.id()),
            &script,
        ));
    }

    for (label, _) in &databases {
        println!("5. idsync cold path on {label}");
        let db = if *label == "SQLite" {
            format!("sqlite://{}/bench-cold.db?mode=rwc", dir.path().display())
        } else {
            fresh_postgres(o.postgres.as_ref().unwrap()).await
        };
        let (p, addrs) = spawn_idsync(&upstream_url, issuer.issuer(), &db, &[]);
        let (proxy, admin) = addrs.split_once('|').unwrap();
        wait_http(&format!("http://{admin}/readyz")).await;
        let run = wrk(
            &format!("5 idsync cold, new identities ({label})"),
            &format!("http://{proxy}"),
            Some(&cold_file),
            &o,
            Some(p.0.id()),
            &script,
        );
        if run.rps * o.duration as f64 > o.cold_tokens as f64 {
            println!(
                "   note: more requests than cold tokens; the tail of this run reused identities"
            );
        }
        runs.push(run);
    }

    println!();
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .unwrap_or("")
            .trim_start_matches("model name\t: ")
    );
    println!(
        "wrk -t{} -c{} -d{}s per scenario; {} users across {} tenants; latencies in microseconds",
        o.threads, o.connections, o.duration, o.users, o.tenants
    );
    println!();
    let baseline = runs
        .iter()
        .find(|r| r.name.starts_with('2'))
        .map(|r| r.rps)
        .unwrap_or(1.0);
    println!(
        "{:<42} {:>10} {:>7} {:>8} {:>8} {:>8} {:>9} {:>7} {:>8} {:>8}",
        "scenario", "req/s", "x base", "p50", "p90", "p99", "max", "errors", "cpu s", "RSS MiB"
    );
    for r in &runs {
        println!(
            "{:<42} {:>10.0} {:>7.2} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>7} {:>8} {:>8}",
            r.name,
            r.rps,
            r.rps / baseline,
            r.p50,
            r.p90,
            r.p99,
            r.max,
            r.errors,
            r.cpu.map_or("-".into(), |c| format!("{c:.1}")),
            r.rss_mib.map_or("-".into(), |m| format!("{m:.1}")),
        );
    }
}
