//! `idsync check`: validates the configuration, loads every issuer's keys, connects to the database,
//! checks migrations and the upstream, and prints a report with a next step for each failure.

use super::settings_or_exit;
use crate::access::IssuerRegistry;
use crate::config::{DatabaseArgs, ServeArgs};
use crate::oidc::{FetchError, IdpClient, KeySetError, KeySource};
use migration::{Migrator, MigratorTrait};
use std::process::ExitCode;
use std::time::Duration;

struct Report {
    failures: usize,
}

impl Report {
    fn ok(&mut self, what: &str, detail: &str) {
        println!("ok    {what}: {detail}");
    }

    fn warn(&mut self, what: &str, detail: &str) {
        println!("warn  {what}: {detail}");
    }

    fn fail(&mut self, what: &str, detail: &str, next: &str) {
        self.failures += 1;
        println!("FAIL  {what}: {detail}\n      next step: {next}");
    }
}

/// A next step for a key-loading failure, by what kind of failure it is.
fn issuer_hint(error: &FetchError, source: &KeySource) -> &'static str {
    match error {
        FetchError::Connect { .. } | FetchError::Timeout { .. } => {
            "check the URL, DNS and that egress from this pod to the IdP is allowed (NetworkPolicy, proxy)"
        }
        FetchError::IssuerMismatch { .. } => {
            "the discovery document's `issuer` must equal --issuer exactly, including a trailing slash"
        }
        FetchError::Status { status: 404, .. } => match source {
            KeySource::Discovery => {
                "no discovery document there: check the realm/tenant in the URL, or give jwks-uri=… (Frontegg: <iss>/.well-known/jwks.json)"
            }
            _ => "the JWKS URL answers 404: check jwks-uri",
        },
        FetchError::Status { .. } => "the IdP answered with an error: check its health and the URL",
        FetchError::Tls { .. } => {
            "the IdP's certificate is not trusted: add its CA with --issuer-ca-file"
        }
        FetchError::Keys {
            source: KeySetError::NoUsableKeys { .. },
            ..
        } => {
            "the key set has no RSA/EC/Ed25519 signature keys; HS256 (shared secret) token templates cannot be verified, switch the IdP to RS256"
        }
        FetchError::Keys { .. } | FetchError::NotDiscovery { .. } | FetchError::TooLarge { .. } => {
            "the URL does not serve what idsync expects: check jwks-uri or the issuer URL"
        }
        FetchError::KeyFile { .. } => {
            "check the key-file path and that it holds a JWKS document or a PEM public key"
        }
        FetchError::Transport { .. } => {
            "see the error above; `idsync token inspect` explains a failing token"
        }
    }
}

pub async fn run(args: &ServeArgs, db: &DatabaseArgs) -> ExitCode {
    let settings = match settings_or_exit(args, db) {
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
        Err(e) => report.fail("IdP client", &e.to_string(), "fix --issuer-ca-file"),
        Ok(client) => {
            let registry = IssuerRegistry::new(
                &settings.issuers,
                &client,
                &settings.key_cache,
                settings.verify,
                None,
            );
            for issuer in registry.iter() {
                let keys = issuer.keys();
                let what = format!("issuer {} ({})", issuer.name, issuer.rules.dialect.as_str());
                if issuer.trust.audiences.is_empty() && issuer.trust.authorized_parties.is_empty() {
                    report.warn(
                        &what,
                        "neither audience= nor authorized-party= is set: a token this issuer minted for any client (an ID token too) is accepted; add authorized-party=<your client id> (Keycloak) or audience=<API>",
                    );
                }
                match keys.load_now().await {
                    Ok(set) => {
                        let via = match (keys.source(), keys.discovered_jwks_uri().await) {
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
                    Err(e) => report.fail(&what, &e.to_string(), issuer_hint(&e, keys.source())),
                }
            }
        }
    }

    match crate::startup::connect_database(&settings, false).await {
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
