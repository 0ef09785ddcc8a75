//! `idsync check`: validates the configuration, loads every issuer's keys, connects to the database,
//! checks migrations and the upstream, and prints a report with a next step for each failure.

use super::settings_or_exit;
use crate::config::ServeArgs;
use crate::oidc::{IdpClient, IssuerKeys, KeySource};
use migration::{Migrator, MigratorTrait};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

struct Report {
    failures: usize,
}

impl Report {
    fn ok(&mut self, what: &str, detail: &str) {
        println!("ok    {what}: {detail}");
    }

    fn fail(&mut self, what: &str, detail: &str, next: &str) {
        self.failures += 1;
        println!("FAIL  {what}: {detail}\n      next step: {next}");
    }
}

/// A next step for a key-loading failure, from what the error says.
fn issuer_hint(error: &str, source: &KeySource) -> String {
    let e = error.to_ascii_lowercase();
    if e.contains("cannot connect") || e.contains("dns") || e.contains("timed out") {
        "check the URL, DNS and that egress from this pod to the IdP is allowed (NetworkPolicy, proxy)".into()
    } else if e.contains("issuer") && e.contains("does not match")
        || e.contains("unexpected issuer")
    {
        "the discovery document's `issuer` must equal --issuer exactly, including a trailing slash"
            .into()
    } else if e.contains("404") {
        match source {
            KeySource::Discovery => "no discovery document there: check the realm/tenant in the URL, or give jwks-uri=… (Frontegg: <iss>/.well-known/jwks.json)".into(),
            _ => "the JWKS URL answers 404: check jwks-uri".into(),
        }
    } else if e.contains("certificate") || e.contains("tls") {
        "the IdP's certificate is not trusted: add its CA with --issuer-ca-file".into()
    } else if e.contains("no usable signature keys") {
        "the key set has no RSA/EC/Ed25519 signature keys; HS256 (shared secret) token templates cannot be verified, switch the IdP to RS256".into()
    } else if e.contains("key file") {
        "check the key-file path and that it holds a JWKS document or a PEM public key".into()
    } else {
        "see the error above; `idsync token inspect` explains a failing token".into()
    }
}

pub async fn run(args: &ServeArgs) -> ExitCode {
    let settings = match settings_or_exit(args) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut report = Report { failures: 0 };
    report.ok(
        "configuration",
        &format!(
            "{} issuer(s), upstream {}",
            settings.issuers.len(),
            settings.upstream
        ),
    );

    match IdpClient::new(settings.issuer_ca_pem.as_deref(), settings.idp_timeout) {
        Err(e) => report.fail("IdP client", &e, "fix --issuer-ca-file"),
        Ok(client) => {
            for issuer in &settings.issuers {
                let keys = Arc::new(IssuerKeys::new(
                    issuer.issuer.clone(),
                    issuer.source.clone(),
                    client.clone(),
                    settings.key_cache.clone(),
                ));
                let what = format!("issuer {} ({})", issuer.issuer, issuer.dialect.as_str());
                match keys.load_now().await {
                    Ok(set) => {
                        let via = match (&issuer.source, keys.discovered_jwks_uri().await) {
                            (KeySource::Discovery, Some(uri)) => {
                                format!("discovery, jwks_uri {uri}")
                            }
                            (KeySource::JwksUri(u), _) => format!("jwks-uri {u}"),
                            (KeySource::File(p), _) => format!("key-file {}", p.display()),
                            (KeySource::Discovery, None) => "discovery".into(),
                        };
                        let mut detail =
                            format!("{} key(s) {:?} via {via}", set.keys.len(), set.kids());
                        if !set.skipped.is_empty() {
                            detail.push_str(&format!("; skipped {:?}", set.skipped));
                        }
                        report.ok(&what, &detail);
                    }
                    Err(e) => report.fail(&what, &e, &issuer_hint(&e, &issuer.source)),
                }
            }
        }
    }

    match crate::startup::connect_database(&settings).await {
        Err(e) => report.fail("database", &format!("{e:#}"), "check --database-url (host, credentials, database name) and that the database accepts connections"),
        Ok(db) => match db.ping().await {
            Err(e) => report.fail("database", &e.to_string(), "the database does not answer; check it is running"),
            Ok(()) => match Migrator::get_pending_migrations(&db).await {
                Ok(pending) if pending.is_empty() => report.ok("database", &format!("{} reachable; migrations up to date", settings.database_url)),
                Ok(pending) => {
                    let names: Vec<String> = pending.iter().map(|m| m.name().to_owned()).collect();
                    if settings.migrate {
                        report.ok("database", &format!("reachable; {} migration(s) pending, applied at start (--migrate auto): {names:?}", names.len()));
                    } else {
                        report.fail("database", &format!("{} migration(s) pending: {names:?}", names.len()), "run `idsync migrate up` (or the migration Job) before starting with --migrate skip");
                    }
                }
                Err(e) => report.fail("database", &format!("cannot read migrations: {e}"), "check the database user may read the seaql_migrations table"),
            },
        },
    }

    let host = settings.upstream.host_str().unwrap_or_default().to_owned();
    let port = settings.upstream.port_or_known_default().unwrap_or(80);
    match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(_)) => report.ok(
            "upstream",
            &format!("{} accepts connections", settings.upstream),
        ),
        Ok(Err(e)) => report.fail(
            "upstream",
            &format!("{}: {e}", settings.upstream),
            "start the app, or fix --upstream (the app must listen on that address)",
        ),
        Err(_) => report.fail(
            "upstream",
            &format!("{}: connect timed out", settings.upstream),
            "the app is not answering; check --upstream",
        ),
    }

    if report.failures == 0 {
        println!("\nall checks passed");
        ExitCode::SUCCESS
    } else {
        println!("\n{} check(s) failed", report.failures);
        ExitCode::FAILURE
    }
}
