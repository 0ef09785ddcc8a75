//! `idsync token inspect [TOKEN|-]`: decodes a token, verifies it against the configured issuers (or a
//! saved key set, with no network at all) and explains in words what idsync would do with it. The
//! signature itself is never printed.

use super::settings_or_exit;
use crate::config::ServeArgs;
use crate::http::auth::{forwarded_from_identity, unix_now};
use crate::http::headers::{HeaderNames, inject};
use crate::identity::{Identity, MappingRules, map_claims};
use crate::oidc::{IdpClient, IssuerKeys, KeySource, TrustedIssuer, Verifier};
use crate::provision::MissingTenant;
use clap::Args;
use serde_json::{Value, json};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    /// The token, or `-` (or nothing) to read it from standard input.
    pub token: Option<String>,
    /// text (for people) or json (one object: verdict, signature_valid, claims_valid, issuer, identity, headers, reasons).
    #[arg(long, default_value = "text")]
    pub output: String,
    /// Verify against this saved JWKS (or PEM) file instead of fetching keys: no network at all.
    #[arg(long)]
    pub jwks_file: Option<PathBuf>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

pub async fn run(mut args: InspectArgs) -> ExitCode {
    if args.output != "text" && args.output != "json" {
        eprintln!("idsync token inspect: --output must be text or json");
        return ExitCode::from(2);
    }
    let token = match args.token.as_deref() {
        Some(t) if t != "-" => t.trim().to_owned(),
        _ => {
            let mut s = String::new();
            if std::io::stdin().read_to_string(&mut s).is_err() {
                eprintln!("idsync token inspect: cannot read the token from standard input");
                return ExitCode::from(2);
            }
            s.trim().to_owned()
        }
    };
    let token = token.strip_prefix("Bearer ").unwrap_or(&token).to_owned();
    // Inspecting needs no upstream; keep validation from asking for one.
    if args.serve.upstream.is_none() {
        args.serve.upstream = Some("http://127.0.0.1:3000".into());
    }
    let settings = match settings_or_exit(&args.serve) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let report = explain(&settings, &token, args.jwks_file.as_ref()).await;
    if args.output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print_text(&report);
    }
    if report["signature_valid"] == true
        && report["claims_valid"] == true
        && report["identity"].is_object()
    {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn explain(
    settings: &crate::config::Settings,
    token: &str,
    jwks_file: Option<&PathBuf>,
) -> Value {
    let mut reasons: Vec<String> = Vec::new();
    let (header, claims) = match crate::oidc::decode_unverified(token) {
        Ok(x) => x,
        Err(e) => {
            return json!({"signature_valid": false, "claims_valid": false, "issuer": null, "identity": null, "headers": {}, "reasons": [e]});
        }
    };
    // The signature is deliberately left out of everything shown.
    let header_shown =
        json!({"alg": header.get("alg"), "kid": header.get("kid"), "typ": header.get("typ")});
    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let configured = settings.issuers.iter().find(|i| i.issuer == iss);
    if configured.is_none() {
        reasons.push(format!(
            "issuer `{iss}` is not configured (configured: {}); idsync refuses the token without contacting anyone",
            settings.issuers.iter().map(|i| i.issuer.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }

    let client = IdpClient::new(settings.issuer_ca_pem.as_deref(), settings.idp_timeout);
    let mut trusted = Vec::new();
    let mut rules = Vec::new();
    if let Ok(client) = client {
        for i in &settings.issuers {
            let source = jwks_file.map_or_else(|| i.source.clone(), |f| KeySource::File(f.clone()));
            let keys = Arc::new(IssuerKeys::new(
                i.issuer.clone(),
                source,
                client.clone(),
                settings.key_cache.clone(),
            ));
            if i.issuer == iss
                && let Err(e) = keys.load_now().await
            {
                reasons.push(format!("cannot load keys for {iss}: {e}"));
            }
            trusted.push(TrustedIssuer {
                issuer: i.issuer.clone(),
                audiences: i.audiences.clone(),
                keys,
            });
            rules.push(MappingRules {
                dialect: i.dialect,
                tenant_claim: i.tenant_claim.clone(),
                roles_claim: i.roles_claim.clone(),
            });
        }
    }
    let verifier = Verifier::new(trusted, settings.verify);
    let mut verdict: Option<&str> = None;
    let (signature_valid, claims_valid) = match verifier.verify(token, unix_now()).await {
        Ok(_) => (true, true),
        Err(e) => {
            reasons.push(e.to_string());
            verdict = Some(
                if matches!(e, crate::oidc::VerifyError::KeysUnavailable(_)) {
                    "refuse: 503 temporarily_unavailable"
                } else {
                    "refuse: 401 invalid_token"
                },
            );
            (e.signature_was_valid(), false)
        }
    };

    let mut identity_json = Value::Null;
    let mut headers = serde_json::Map::new();
    if let Some(index) = settings.issuers.iter().position(|i| i.issuer == iss) {
        match map_claims(iss.as_str(), &claims, &rules[index]) {
            Err(e) => {
                reasons.push(format!("identity: {e}"));
                verdict = verdict.or(Some("refuse: 401 invalid_token"));
            }
            Ok(identity) => {
                let (tenant, tenant_note) = tenant_of(&identity, &settings.sync.missing_tenant);
                if let Some(note) = &tenant_note {
                    reasons.push(note.clone());
                }
                if tenant.is_none()
                    && identity.subject.is_some()
                    && settings.sync.missing_tenant == MissingTenant::Reject
                {
                    verdict = verdict.or(Some("refuse: 403 missing_tenant_claim"));
                }
                let role = identity
                    .subject
                    .as_ref()
                    .and(tenant.as_ref())
                    .map(|_| settings.sync.roles.app_role(&identity.roles).to_owned());
                let mut forwarded = forwarded_from_identity(&identity, tenant.clone());
                forwarded.role = role.clone();
                if let Ok(names) = HeaderNames::new(&settings.header_prefix) {
                    let mut map = http::HeaderMap::new();
                    inject(&mut map, &names, &forwarded);
                    for (k, v) in &map {
                        headers
                            .insert(k.as_str().to_owned(), json!(v.to_str().unwrap_or_default()));
                    }
                }
                identity_json = json!({
                    "dialect": identity.dialect,
                    "user": identity.subject,
                    "tenant": tenant,
                    "tenant_looked_for": identity.tenant_sources,
                    "tenants": identity.tenants,
                    "role": role,
                    "idp_roles": identity.roles,
                    "email": identity.email,
                    "name": identity.name,
                });
            }
        }
    }
    if configured.is_none() {
        verdict = Some("refuse: 401 invalid_token");
    }
    json!({
        "verdict": verdict.unwrap_or("forward (after sync, which may still refuse a deactivated user or tenant)"),
        "signature_valid": signature_valid,
        "claims_valid": claims_valid,
        "issuer": iss,
        "header": header_shown,
        "expires_at": claims.get("exp"),
        "identity": identity_json,
        "headers": headers,
        "reasons": reasons,
    })
}

/// The tenant idsync would act in, and a sentence when there is none.
fn tenant_of(identity: &Identity, policy: &MissingTenant) -> (Option<String>, Option<String>) {
    if let Some(t) = &identity.tenant {
        return (Some(t.to_string()), None);
    }
    if identity.subject.is_none() {
        return (None, None);
    }
    let looked = identity
        .tenant_sources
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(" and ");
    match policy {
        MissingTenant::Reject => (
            None,
            Some(format!(
                "no tenant claim: looked for {looked}; set --tenant-claim or --missing-tenant (idsync answers 403 missing_tenant_claim)"
            )),
        ),
        MissingTenant::Personal => (
            None,
            Some(format!(
                "no tenant claim (looked for {looked}): --missing-tenant personal gives the user a personal organization"
            )),
        ),
        MissingTenant::Default(id) => (
            Some(id.clone()),
            Some(format!(
                "no tenant claim (looked for {looked}): --missing-tenant default joins {id}"
            )),
        ),
    }
}

fn print_text(r: &Value) {
    let yes = |v: &Value| if *v == true { "valid" } else { "INVALID" };
    println!("Token");
    println!(
        "  header     alg={} kid={} typ={}",
        r["header"]["alg"], r["header"]["kid"], r["header"]["typ"]
    );
    println!("  issuer     {}", r["issuer"]);
    if let Some(exp) = r["expires_at"].as_i64() {
        let left = exp - unix_now();
        println!(
            "  expires    {exp} ({})",
            if left >= 0 {
                format!("in {left}s")
            } else {
                format!("{}s ago", -left)
            }
        );
    }
    println!("Verdict      {}", r["verdict"].as_str().unwrap_or_default());
    println!("Verification");
    println!("  signature  {}", yes(&r["signature_valid"]));
    println!("  claims     {}", yes(&r["claims_valid"]));
    let id = &r["identity"];
    if id.is_object() {
        println!("What idsync would do");
        println!("  dialect    {}", id["dialect"]);
        println!(
            "  user       {}",
            if id["user"].is_null() {
                "none (tenant-level token)".into()
            } else {
                id["user"].to_string()
            }
        );
        println!(
            "  tenant     {}",
            if id["tenant"].is_null() {
                "none".into()
            } else {
                id["tenant"].to_string()
            }
        );
        println!(
            "  role       {}  (from IdP roles {})",
            id["role"], id["idp_roles"]
        );
        let forwarding = r["verdict"]
            .as_str()
            .is_some_and(|v| v.starts_with("forward"));
        println!(
            "{}",
            if forwarding {
                "Headers it would forward"
            } else {
                "Headers it would forward if it accepted the token"
            }
        );
        for (k, v) in r["headers"].as_object().into_iter().flatten() {
            println!("  {k}: {}", v.as_str().unwrap_or_default());
        }
    }
    let reasons = r["reasons"].as_array().cloned().unwrap_or_default();
    if !reasons.is_empty() {
        println!("Why");
        for reason in reasons {
            println!("  - {}", reason.as_str().unwrap_or_default());
        }
    }
}
