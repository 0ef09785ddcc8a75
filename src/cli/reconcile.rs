//! `idsync reconcile`: one run of `reconcile` against the IdP named by `--issuer`, with a progress line on
//! a terminal and a summary at the end; `--dry-run` prints what would change and changes nothing. Exit 0
//! when the run completed, 1 when the IdP could not be read completely (nothing changed then).

use crate::config::{DatabaseArgs, parse_issuer};
use crate::identity::{ClaimPath, Dialect};
use crate::reconcile::{self, Outcome, Target, frontegg::Frontegg, keycloak::Keycloak};
use clap::Args;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    /// The issuer to reconcile, as given to `serve` (URL[,dialect=...][,id-prefix=...]...).
    #[arg(long, env = "IDSYNC_RECONCILE_ISSUER")]
    pub issuer: String,
    /// Keycloak: the service-account client (client credentials; realm-management roles view-users and,
    /// for organizations, manage-realm).
    #[arg(long, env = "IDSYNC_RECONCILE_CLIENT_ID")]
    pub client_id: String,
    /// File holding that client's secret (Keycloak) or the environment's API key (Frontegg).
    #[arg(long, env = "IDSYNC_RECONCILE_SECRET_FILE")]
    pub secret_file: PathBuf,
    /// Where the admin API is. Keycloak: its base URL when it differs from the issuer's (an internal
    /// address; default: the issuer URL without /realms/...). Frontegg: the vendor API host of your
    /// region (default https://api.frontegg.com; api.us.frontegg.com, api.ca.frontegg.com, ...).
    #[arg(long, env = "IDSYNC_RECONCILE_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// Print what would change, change nothing.
    #[arg(long, env = "IDSYNC_RECONCILE_DRY_RUN")]
    pub dry_run: bool,
    /// Items per page asked of the IdP.
    #[arg(long, env = "IDSYNC_RECONCILE_PAGE_SIZE", default_value = "100")]
    pub page_size: usize,
    /// The role new memberships get (the IdP's listings carry no roles; the next token sets them).
    #[arg(long, env = "IDSYNC_DEFAULT_ROLE", default_value = "member")]
    pub default_role: String,
    /// As for `serve`: schemas for organizations reconcile creates (PostgreSQL).
    #[arg(long, env = "IDSYNC_TENANT_SCHEMA")]
    pub tenant_schema: Option<String>,
    /// Allow http:// IdP URLs on non-loopback hosts.
    #[arg(long, env = "IDSYNC_ALLOW_INSECURE_ISSUERS")]
    pub allow_insecure_issuers: bool,
    /// PEM file of extra CA certificates to trust for the IdP (as for `serve`).
    #[arg(long, env = "IDSYNC_ISSUER_CA_FILE")]
    pub issuer_ca_file: Option<PathBuf>,
    /// Timeout of one request to the IdP.
    #[arg(long, env = "IDSYNC_IDP_TIMEOUT", default_value = "10s")]
    pub idp_timeout: String,
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("idsync reconcile: {message}");
    ExitCode::from(2)
}

pub async fn run(args: ReconcileArgs, db: &DatabaseArgs) -> ExitCode {
    let claim = |c: &str| ClaimPath::new(c).expect("a literal claim path");
    let spec = match parse_issuer(
        &args.issuer,
        args.allow_insecure_issuers,
        &claim("tenant_id"),
        &claim("roles"),
    ) {
        Ok(s) => s,
        Err(errors) => return fail(errors.join("; ")),
    };
    let secret = match std::fs::read_to_string(&args.secret_file) {
        Ok(s) => s.trim().to_owned(),
        Err(e) => return fail(format!("{}: {e}", args.secret_file.display())),
    };
    let timeout = match crate::config::parse_duration(&args.idp_timeout) {
        Ok(t) => t,
        Err(e) => return fail(format!("--idp-timeout: {e}")),
    };
    let url = match db.url() {
        Ok(u) => u,
        Err(e) => return fail(e),
    };
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("idsync/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &args.issuer_ca_file {
        let certs = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|pem| reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string()));
        match certs {
            Ok(certs) => {
                for c in certs {
                    builder = builder.add_root_certificate(c);
                }
            }
            Err(e) => return fail(format!("--issuer-ca-file {}: {e}", path.display())),
        }
    }
    let http = match builder.build() {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    // A database that does not answer is a passing condition, not a configuration error: exit 1, so a
    // CronJob retries.
    let mut options = sea_orm::ConnectOptions::new(url.expose());
    options
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    let conn = match sea_orm::Database::connect(options).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("idsync reconcile: cannot connect to {url}: {e}; nothing was changed");
            return ExitCode::FAILURE;
        }
    };
    let rules = crate::identity::MappingRules {
        dialect: spec.dialect,
        tenant_claim: spec.tenant_claim.clone(),
        roles_claim: spec.roles_claim.clone(),
        id_prefix: spec.id_prefix.as_deref().map(Into::into),
    };
    let started = chrono::Utc::now();
    let (actor, fetched, progress) = match spec.dialect {
        Dialect::Keycloak => {
            let source = match Keycloak::new(
                http,
                &spec.issuer,
                args.admin_url.as_deref(),
                &args.client_id,
                &secret,
                rules,
                args.page_size.max(1),
            ) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            let progress = source.progress();
            let ticker = tick(progress.clone());
            let fetched = async {
                let mut snap = source.snapshot().await?;
                // The listing leaves service accounts out: ask for each unseen user by id.
                let unseen = unseen_users(&conn, &spec.issuer, &snap)
                    .await
                    .map_err(|e| reconcile::FetchError::Failed {
                        what: "the users idsync holds".into(),
                        cause: e.to_string(),
                    })?;
                snap.users.extend(source.confirm(&unseen).await?);
                Ok::<_, reconcile::FetchError>(snap)
            }
            .await;
            ticker.abort();
            ("reconcile:keycloak", fetched, progress)
        }
        Dialect::Frontegg => {
            let source = Frontegg::new(
                http,
                args.admin_url
                    .as_deref()
                    .unwrap_or("https://api.frontegg.com"),
                &args.client_id,
                &secret,
                rules,
                args.page_size.max(1),
            );
            let progress = source.progress();
            let ticker = tick(progress.clone());
            let fetched = source.snapshot().await;
            ticker.abort();
            ("reconcile:frontegg", fetched, progress)
        }
        Dialect::Generic => {
            return fail(
                "reconcile reads Keycloak's or Frontegg's admin API; a generic issuer has none",
            );
        }
    };
    if std::io::stderr().is_terminal() {
        eprintln!("\rread {}", progress.line());
    }
    let snapshot = match fetched {
        Ok(s) => s,
        Err(e) => {
            eprintln!("idsync reconcile: reading the IdP failed; nothing was changed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let target = Target {
        db: &conn,
        issuer: &spec.issuer,
        actor,
        tenant_schema: args.tenant_schema.as_deref(),
        default_role: &args.default_role,
        dry_run: args.dry_run,
    };
    match reconcile::apply(&target, &snapshot, started).await {
        Ok(outcome) => {
            print_summary(&outcome, &progress.line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("idsync reconcile: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Users idsync holds as active for `issuer` that the IdP's listing did not show.
async fn unseen_users(
    db: &sea_orm::DatabaseConnection,
    issuer: &str,
    snap: &reconcile::Snapshot,
) -> Result<Vec<String>, sea_orm::DbErr> {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    let seen: std::collections::HashSet<&str> = snap.users.iter().map(|u| u.id.as_str()).collect();
    Ok(entity::users::Entity::find()
        .filter(entity::users::Column::Issuer.eq(issuer))
        .filter(entity::users::Column::IsActive.eq(true))
        .all(db)
        .await?
        .into_iter()
        .filter(|u| !seen.contains(u.id.as_str()))
        .map(|u| u.id)
        .collect())
}

/// The progress line, rewritten in place while a person watches (never into a log).
fn tick(progress: Arc<reconcile::Progress>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !std::io::stderr().is_terminal() {
            return;
        }
        loop {
            eprint!("\rreading the IdP: {}", progress.line());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

fn print_summary(o: &Outcome, read: &str) {
    let a = &o.applied;
    if o.dry_run {
        println!("dry run: nothing was changed. These changes would be made:");
    }
    for line in &a.lines {
        println!("  {line}");
    }
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for line in &a.lines {
        let key: Vec<&str> = line.split_whitespace().take(2).collect();
        *counts.entry(key.join(" ")).or_default() += 1;
    }
    println!(
        "{}: read {read}; IdP has {} users, {} organizations, {} memberships",
        if o.dry_run {
            "would change"
        } else {
            "reconciled"
        },
        o.seen_users,
        o.seen_organizations
            .map_or("(organizations not enabled)".to_owned(), |n| n.to_string()),
        o.seen_memberships,
    );
    let changes: Vec<String> = counts.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    println!(
        "changes: {}; unchanged newer than this run: {}; not idsync's to change: {}",
        if changes.is_empty() {
            "none".into()
        } else {
            changes.join(", ")
        },
        a.stale,
        a.skipped
    );
}
