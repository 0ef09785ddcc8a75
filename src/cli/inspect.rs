//! `idsync token inspect [TOKEN|-]`: decodes a token, verifies it against the configured issuers (or a
//! saved key set, with no network at all) and explains in words what idsync would do with it: the same
//! registry and the same access decision as `serve`, without the database. The signature itself is never
//! printed.

use super::settings_or_exit;
use crate::access::{IssuerRegistry, policy};
use crate::config::{DatabaseArgs, ServeArgs, Settings};
use crate::http::headers::{HeaderNames, set_identity};
use crate::identity::{TenantId, map_claims};
use crate::oidc::{IdpClient, KeySource, VerifyError, unix_now};
use clap::Args;
use serde_json::{Value, json};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Explain the request as if the client asked for this tenant (the `X-Tenant-Id` header).
    #[arg(long)]
    pub tenant: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

pub async fn run(mut args: InspectArgs, db: &DatabaseArgs) -> ExitCode {
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
    let requested = match args
        .tenant
        .as_deref()
        .map(|t| TenantId::parse("--tenant", t))
    {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            eprintln!("idsync token inspect: {e}");
            return ExitCode::from(2);
        }
    };
    // Inspecting needs no upstream; keep validation from asking for one.
    if args.serve.upstream.is_none() {
        args.serve.upstream = Some("http://127.0.0.1:3000".into());
    }
    let settings = match settings_or_exit(&args.serve, db) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let report = explain(
        &settings,
        &token,
        args.jwks_file.as_ref(),
        requested.as_ref(),
    )
    .await;
    if args.output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print_text(&report);
    }
    if report["verdict"]
        .as_str()
        .is_some_and(|v| v.starts_with("forward"))
    {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn explain(
    settings: &Settings,
    token: &str,
    jwks_file: Option<&PathBuf>,
    requested: Option<&TenantId>,
) -> Value {
    let mut reasons: Vec<String> = Vec::new();
    let (header, claims) = match crate::oidc::decode_unverified(token) {
        Ok(x) => x,
        Err(e) => {
            return json!({"verdict": "refuse: 401 invalid_token", "signature_valid": false, "claims_valid": false, "issuer": null, "identity": null, "headers": {}, "reasons": [e]});
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
    let client = match IdpClient::new(settings.issuer_ca_pem.as_deref(), settings.idp_timeout) {
        Ok(c) => c,
        Err(e) => {
            return json!({"verdict": "refuse: 503 temporarily_unavailable", "signature_valid": false, "claims_valid": false, "issuer": iss, "identity": null, "headers": {}, "reasons": [format!("the issuer CA file: {e}")]});
        }
    };
    let keys_from = jwks_file.map(|f| KeySource::File(f.clone()));
    let registry = IssuerRegistry::new(
        &settings.issuers,
        &client,
        &settings.key_cache,
        settings.verify,
        keys_from.as_ref(),
    );
    let issuer = registry.get(&iss).cloned();
    let mut verdict: Option<String> = None;
    match &issuer {
        None => {
            reasons.push(format!(
                "issuer `{iss}` is not configured (configured: {}); idsync refuses the token without contacting anyone",
                registry.iter().map(|i| &*i.name).collect::<Vec<_>>().join(", ")
            ));
            verdict = Some("refuse: 401 invalid_token".into());
        }
        Some(i) => {
            if let Err(e) = i.keys().load_now().await {
                reasons.push(format!("cannot load keys for {iss}: {e}"));
            }
        }
    }
    let (signature_valid, claims_valid) = match registry.verify(token, unix_now()).await {
        Ok(_) => (true, true),
        Err(e) => {
            reasons.push(e.to_string());
            verdict = verdict.or(Some(
                if matches!(e, VerifyError::KeysUnavailable(_)) {
                    "refuse: 503 temporarily_unavailable"
                } else {
                    "refuse: 401 invalid_token"
                }
                .into(),
            ));
            (e.signature_was_valid(), false)
        }
    };

    let mut identity_json = Value::Null;
    let mut headers = serde_json::Map::new();
    if let Some(issuer) = &issuer {
        match map_claims(issuer.name.clone(), &claims, &issuer.rules) {
            Err(e) => {
                reasons.push(format!("identity: {e}"));
                verdict = verdict.or(Some("refuse: 401 invalid_token".into()));
            }
            Ok(identity) => {
                let decided = policy::decide_offline(&identity, requested, &settings.policy);
                let view = match &decided {
                    Ok((_, view)) => Some(view),
                    Err(refusal) => {
                        reasons.push(refusal.to_string());
                        if matches!(refusal, crate::access::Refusal::MissingTenant { .. }) {
                            reasons.push("to accept it, point --tenant-claim at the claim that holds the tenant, or set --missing-tenant personal|default=ID".into());
                        }
                        if matches!(refusal, crate::access::Refusal::TenantNotPermitted)
                            && identity.subject.is_some()
                        {
                            reasons.push("serve would still let the user in if they have an active membership in that tenant (inspect does not read the database)".into());
                        }
                        verdict = verdict.or(Some(format!("refuse: 403 {}", refusal.code())));
                        None
                    }
                };
                if let (Some(view), Ok(names)) = (view, HeaderNames::new(&settings.header_prefix)) {
                    let mut map = http::HeaderMap::new();
                    let mut synced = view.clone();
                    // What serve forwards once synced; slug and schema come from the rows.
                    synced.synced = true;
                    set_identity(
                        &mut map,
                        &names,
                        &synced,
                        &identity.roles,
                        identity.tenants.iter().map(|t| t.as_str()),
                    );
                    for (k, v) in &map {
                        headers
                            .insert(k.as_str().to_owned(), json!(v.to_str().unwrap_or_default()));
                    }
                }
                identity_json = json!({
                    "dialect": identity.dialect,
                    "user": identity.subject,
                    "tenant": view.and_then(|v| v.tenant_id()),
                    "tenant_looked_for": identity.tenant_sources(),
                    "tenants": identity.tenants,
                    "role": view.and_then(|v| v.role()),
                    "idp_roles": identity.roles,
                    "email": identity.email,
                    "name": identity.name,
                });
            }
        }
    }
    json!({
        "verdict": verdict.unwrap_or_else(|| "forward (after sync, which may still refuse a deactivated user or tenant, and where an operator's role wins)".into()),
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
