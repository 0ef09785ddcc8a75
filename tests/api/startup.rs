//! The real binary's start-up contract: every configuration problem at once, exit code 2.

use std::process::Command;

#[test]
fn bad_configuration_lists_every_problem_and_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_idsync"))
        .args([
            "--listen",
            "nope",
            "--issuer",
            "http://idp.example.com,dialect=okta",
            "--leeway",
            "soon",
            "--database-statement-cache",
            "lots",
        ])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "--listen",
        "--upstream: required",
        "must be https://",
        "dialect `okta`",
        "--leeway",
        "--database-statement-cache: `lots` is not a number",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn every_flag_reads_its_idsync_env_twin() {
    let out = Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .env("IDSYNC_LISTEN", "still-nope")
        .env("IDSYNC_UPSTREAM", "http://127.0.0.1:3000")
        .env(
            "IDSYNC_ISSUER",
            "https://a.example.com/realms/x;https://b.example.com,dialect=frontegg",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--listen: `still-nope`"), "{err}");
    assert!(!err.contains("--upstream"), "{err}");
    assert!(!err.contains("--issuer"), "{err}");
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_and_exits_0() {
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    serves_and_drains_on_sigterm(&[], &[], workers).await;
}

/// One thread (the current-thread scheduler) and a set number (the multi-threaded one, through the
/// variable) serve, wake on SIGTERM and drain alike.
#[tokio::test]
async fn worker_threads_choose_the_scheduler_and_both_serve_and_drain() {
    serves_and_drains_on_sigterm(&["--worker-threads", "1"], &[], 1).await;
    serves_and_drains_on_sigterm(&[], &[("IDSYNC_WORKER_THREADS", "3")], 3).await;
    // Out of range: listed with the other problems (not a parse error that hides them), exit 2.
    let out = Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .args(["--worker-threads", "1025", "--listen", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--worker-threads: must be between 0 and 1024"),
        "{err}"
    );
    assert!(err.contains("--listen: `nope`"), "{err}");
    // A subcommand that does not serve is not stopped by the serve flag's variable.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .env("IDSYNC_WORKER_THREADS", "many")
        .env(
            "IDSYNC_DATABASE_URL",
            format!("sqlite://{}/db.sqlite?mode=rwc", dir.path().display()),
        )
        .args(["migrate", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// mimalloc hands freed pages back at once (less RSS after a burst), unless the operator says otherwise.
/// Read from mimalloc's own report of its options at start (`MIMALLOC_VERBOSE`).
#[cfg(target_os = "linux")]
#[test]
fn freed_memory_is_purged_at_once_unless_the_operator_says_otherwise() {
    let purge_delay = |env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_idsync"))
            .env_clear()
            .env("MIMALLOC_VERBOSE", "1")
            .envs(env.iter().copied())
            .arg("--version")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (err.lines())
            .find_map(|l| l.trim().strip_prefix("option 'purge_delay': "))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("mimalloc reported no purge_delay: {err}"))
    };
    assert_eq!(purge_delay(&[]), "0");
    assert_eq!(purge_delay(&[("MIMALLOC_PURGE_DELAY", "250")]), "250");
}

async fn serves_and_drains_on_sigterm(extra: &[&str], env: &[(&str, &str)], workers: usize) {
    use devkit::{EchoUpstream, LocalIssuer, SigningAlg};

    let issuer = LocalIssuer::start("/realms/acme", SigningAlg::RS256)
        .await
        .unwrap();
    let upstream = EchoUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/db.sqlite?mode=rwc", dir.path().display());
    let args: Vec<String> = [
        "--upstream",
        &upstream.url(),
        "--issuer",
        issuer.issuer(),
        "--database-url",
        &db,
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .map(String::from)
    .collect();
    let (mut child, listening) = crate::helpers::spawn_binary_env(&args, env).await;
    assert_eq!(listening["workers"], workers, "{listening}");
    let proxy = listening["proxy"].as_str().unwrap();

    let token = issuer.mint(issuer.claims_for("drain-me"));
    let http = reqwest::Client::new();
    // Keys load in the background; wait until a request passes.
    let mut ok = false;
    for _ in 0..100 {
        if http
            .get(format!("http://{proxy}/"))
            .bearer_auth(&token)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(ok, "idsync never served a request");

    let before = upstream.hits();
    let inflight = tokio::spawn({
        let http = http.clone();
        let url = format!("http://{proxy}/slow/700");
        async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while upstream.hits() == before && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let pid = child.id().unwrap().to_string();
    // The running binary opted out of transparent huge pages (its idle RSS depends on it).
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    match status.lines().find_map(|l| l.strip_prefix("THP_enabled:")) {
        Some(v) => assert_eq!(v.trim(), "0", "transparent huge pages are off for idsync"),
        None => eprintln!("no /proc/PID/status with THP_enabled here: not checked"),
    }
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(
        inflight.await.unwrap().unwrap(),
        200,
        "the in-flight request finishes"
    );
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn migrate_subcommand_applies_and_reports_migrations() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/m.db?mode=rwc", dir.path().display());
    let run = |action: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_idsync"))
            .env_clear()
            .args(["migrate", action, "--database-url", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(run("status").contains("pending  m20261122_000001_identity_tables"));
    run("up");
    let status = run("status");
    assert!(status.contains("applied  m20261122_000001_identity_tables"));
    assert!(status.contains("applied  m20261201_000002_membership_role_source"));
    assert!(status.contains("applied  m20261201_000003_organization_schema_name"));
    assert!(status.contains("applied  m20261201_000004_lifecycle"));
    run("down");
    let status = run("status");
    assert!(
        status.contains("applied  m20261201_000003_organization_schema_name"),
        "down reverts one"
    );
    assert!(status.contains("pending  m20261201_000004_lifecycle"));
}

/// docs/configuration.md is the `--help` text of every command; this fails when they drift.
/// `IDSYNC_BLESS=1 cargo nextest run configuration_reference` rewrites it.
#[test]
fn configuration_reference_matches_the_help_text() {
    let commands: &[&[&str]] = &[
        &["--help"],
        &["check", "--help"],
        &["token", "inspect", "--help"],
        &["migrate", "--help"],
        &["orgs", "--help"],
        &["users", "--help"],
        &["memberships", "--help"],
        &["healthcheck", "--help"],
        &["reconcile", "--help"],
    ];
    let mut doc = String::from(
        "# Configuration reference\n\nGenerated from `idsync --help` (a test keeps it in step: `IDSYNC_BLESS=1 cargo nextest run configuration_reference` regenerates it). Every flag can also be set through the `IDSYNC_*` variable shown with it.\n",
    );
    for args in commands {
        let out = Command::new(env!("CARGO_BIN_EXE_idsync"))
            .env_clear()
            .env("COLUMNS", "100")
            .args(*args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        doc.push_str(&format!(
            "\n## `idsync {}`\n\n```text\n{}```\n",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
    if std::env::var_os("IDSYNC_BLESS").is_some() {
        std::fs::write(path, &doc).unwrap();
    }
    let current = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        current == doc,
        "docs/configuration.md is out of date with --help; run: IDSYNC_BLESS=1 cargo nextest run configuration_reference"
    );
}
