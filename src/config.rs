//! Command line and environment: clap derive, where each doc comment is the `--help` text and every flag
//! has an `IDSYNC_*` twin. Raw values are parsed in [`ServeArgs::validate`], which reports every problem at once.

use crate::identity::RoleMap;
use crate::identity::{ClaimPath, Dialect};
use crate::oidc::{KeyCacheOptions, KeySource, VerifyOptions};
use crate::provision::{MissingTenant, SyncOptions};
use clap::{Args, Parser, Subcommand};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// idsync: an OIDC identity-sync sidecar. Verifies bearer JWTs against your IdP's keys, syncs users and
/// tenants into your database, and forwards requests to your app with a trusted identity in headers.
#[derive(Debug, Parser)]
#[command(name = "idsync", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no subcommand, idsync serves.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar: proxy port and admin port (the default).
    Serve(Box<ServeArgs>),
    /// Apply, revert or list database migrations.
    ///
    /// Examples: `idsync migrate up` (apply all pending), `idsync migrate down` (revert the last one),
    /// `idsync migrate status`.
    Migrate(MigrateArgs),
    /// Check the configuration, every issuer's keys, the database and the upstream; exit 0 only if all is well.
    ///
    /// Takes the same flags and environment as `serve`. Example: `idsync check --upstream http://127.0.0.1:3000 --issuer https://sso.example.com/realms/acme`
    Check(Box<ServeArgs>),
    /// Work with tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Organizations, straight on the database.
    Orgs(crate::cli::OrgsCommand),
    /// Users, straight on the database.
    Users(crate::cli::UsersCommand),
    /// Memberships, straight on the database.
    Memberships(crate::cli::MembershipsCommand),
    /// Exit 0 when the local idsync is ready (for exec probes in images without a shell).
    Healthcheck(crate::cli::HealthcheckArgs),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Decode a token, verify it, and explain what idsync would do with it (never prints the signature).
    ///
    /// Takes the same flags and environment as `serve`. Examples:
    /// `idsync token inspect eyJ…`, `pbpaste | idsync token inspect - --output json`,
    /// `idsync token inspect --jwks-file saved-jwks.json eyJ…` (no network at all).
    Inspect(Box<crate::cli::InspectArgs>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert the most recent migration.
    Down,
    /// List applied and pending migrations.
    Status,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    pub action: MigrateAction,
    /// Database: sqlite://PATH?mode=rwc or postgres://USER:PASS@HOST/DB.
    #[arg(
        long,
        env = "IDSYNC_DATABASE_URL",
        default_value = "sqlite://idsync.db?mode=rwc",
        hide_env_values = true
    )]
    pub database_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the proxy port (what the Service points at).
    #[arg(long, env = "IDSYNC_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,

    /// The app behind idsync, usually http://127.0.0.1:3000. Required.
    #[arg(long, env = "IDSYNC_UPSTREAM")]
    pub upstream: Option<String>,

    /// A trusted issuer (repeatable; in the environment, separate several with `;`):
    /// URL[,dialect=keycloak|frontegg|generic][,audience=AUD]...[,jwks-uri=URL][,key-file=PATH]
    /// [,tenant-claim=PATH][,roles-claim=PATH]. The dialect defaults to keycloak when the URL path
    /// contains /realms/, else generic. jwks-uri skips discovery; key-file reads a local JWKS or PEM
    /// file (re-read when it changes) instead of the network.
    #[arg(long = "issuer", env = "IDSYNC_ISSUER", value_delimiter = ';')]
    pub issuers: Vec<String>,

    /// Address of the admin port: /livez, /readyz, /metrics.
    #[arg(long, env = "IDSYNC_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: String,

    /// File holding the bearer token the admin API requires. Required when --admin-listen is not a
    /// loopback address.
    #[arg(long, env = "IDSYNC_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Database for synced users and tenants: sqlite://PATH?mode=rwc or postgres://USER:PASS@HOST/DB.
    #[arg(
        long,
        env = "IDSYNC_DATABASE_URL",
        default_value = "sqlite://idsync.db?mode=rwc",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Most database connections in the pool.
    #[arg(long, env = "IDSYNC_DATABASE_MAX_CONNECTIONS", default_value = "10")]
    pub database_max_connections: String,

    /// How long a request waits for a database connection before answering 503.
    #[arg(long, env = "IDSYNC_DATABASE_TIMEOUT", default_value = "3s")]
    pub database_timeout: String,

    /// Log format: text or json.
    #[arg(long, env = "IDSYNC_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// Log level or tracing filter directives (e.g. `info,idsync=debug`).
    #[arg(long, env = "IDSYNC_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Allow http:// issuers and JWKS URLs on non-loopback hosts (never do this in production).
    #[arg(long, env = "IDSYNC_ALLOW_INSECURE_ISSUERS")]
    pub allow_insecure_issuers: bool,

    /// PEM file with extra CA certificates trusted for IdP connections (private IdPs).
    #[arg(long, env = "IDSYNC_ISSUER_CA_FILE")]
    pub issuer_ca_file: Option<PathBuf>,

    /// Timeout of one request to an IdP (discovery, JWKS).
    #[arg(long, env = "IDSYNC_IDP_TIMEOUT", default_value = "10s")]
    pub idp_timeout: String,

    /// How often issuer keys are refreshed in the background.
    #[arg(long, env = "IDSYNC_JWKS_REFRESH_INTERVAL", default_value = "10m")]
    pub jwks_refresh_interval: String,

    /// Least time between two key refetches caused by tokens with an unknown `kid`.
    #[arg(long, env = "IDSYNC_JWKS_REFETCH_COOLDOWN", default_value = "30s")]
    pub jwks_refetch_cooldown: String,

    /// How long the last good keys stay in use while the IdP cannot be reached; then requests get 503.
    #[arg(long, env = "IDSYNC_JWKS_MAX_STALE", default_value = "24h")]
    pub jwks_max_stale: String,

    /// How often a key-file is checked for changes.
    #[arg(long, env = "IDSYNC_KEY_FILE_POLL", default_value = "5s")]
    pub key_file_poll: String,

    /// Clock skew tolerated on exp, nbf and iat.
    #[arg(long, env = "IDSYNC_LEEWAY", default_value = "60s")]
    pub leeway: String,

    /// Largest bearer token accepted, in bytes.
    #[arg(long, env = "IDSYNC_MAX_TOKEN_BYTES", default_value = "16384")]
    pub max_token_bytes: String,

    /// Most verified tokens kept in memory (0 disables the cache: every request is verified).
    #[arg(long, env = "IDSYNC_TOKEN_CACHE_SIZE", default_value = "100000")]
    pub token_cache_size: String,

    /// Claim holding the tenant id (dotted path, or a literal claim name such as a URL).
    #[arg(long, env = "IDSYNC_TENANT_CLAIM", default_value = "tenant_id")]
    pub tenant_claim: String,

    /// Claim holding roles for generic issuers (dotted path; an array or a space/comma separated string).
    #[arg(long, env = "IDSYNC_ROLES_CLAIM", default_value = "roles")]
    pub roles_claim: String,

    /// Path prefix proxied without a token (repeatable, or comma separated); owned headers are still stripped.
    #[arg(long, env = "IDSYNC_SKIP_AUTH", value_delimiter = ',')]
    pub skip_auth: Vec<String>,

    /// Browser origin allowed to call through idsync (repeatable, or comma separated; exact origins such as
    /// https://app.example.com). Preflights are answered by idsync without a token.
    #[arg(long, env = "IDSYNC_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,

    /// Request headers browsers may send cross-origin.
    #[arg(
        long,
        env = "IDSYNC_CORS_ALLOW_HEADERS",
        default_value = "authorization,content-type,x-tenant-id,x-request-id"
    )]
    pub cors_allow_headers: String,

    /// How long browsers may cache a preflight answer.
    #[arg(long, env = "IDSYNC_CORS_MAX_AGE", default_value = "10m")]
    pub cors_max_age: String,

    /// Prefix of the identity headers: X- gives X-User-Id, X-Tenant-Id, X-Idsync-Synced...
    #[arg(long, env = "IDSYNC_HEADER_PREFIX", default_value = "X-")]
    pub header_prefix: String,

    /// Time to connect to the upstream before answering 502.
    #[arg(long, env = "IDSYNC_UPSTREAM_CONNECT_TIMEOUT", default_value = "5s")]
    pub upstream_connect_timeout: String,

    /// Time for the upstream to send response headers before answering 504.
    #[arg(long, env = "IDSYNC_UPSTREAM_TIMEOUT", default_value = "60s")]
    pub upstream_timeout: String,

    /// Time a client has to send a request's headers (slowloris protection; also closes idle keep-alive
    /// connections).
    #[arg(long, env = "IDSYNC_HEADER_READ_TIMEOUT", default_value = "30s")]
    pub header_read_timeout: String,

    /// On SIGTERM, how long in-flight requests get to finish.
    #[arg(long, env = "IDSYNC_SHUTDOWN_TIMEOUT", default_value = "30s")]
    pub shutdown_timeout: String,

    /// Run database migrations at start (auto) or leave them to `idsync migrate up` / a migration Job (skip).
    #[arg(long, env = "IDSYNC_MIGRATE", default_value = "auto")]
    pub migrate: String,

    /// Map an IdP role to an app role, IDP_ROLE=APP_ROLE (repeatable, or comma separated). Built in:
    /// Admin/admin=admin, Member/member=member, Viewer/ReadOnly/viewer=viewer.
    #[arg(long, env = "IDSYNC_ROLE_MAP", value_delimiter = ',')]
    pub role_map: Vec<String>,

    /// The app roles, strongest first; when several IdP roles map, the strongest wins.
    #[arg(
        long,
        env = "IDSYNC_APP_ROLES",
        value_delimiter = ',',
        default_value = "admin,member,viewer"
    )]
    pub app_roles: Vec<String>,

    /// App role for users none of whose IdP roles map.
    #[arg(long, env = "IDSYNC_DEFAULT_ROLE", default_value = "member")]
    pub default_role: String,

    /// A user token with no tenant: reject (403 missing_tenant_claim), personal (one organization per
    /// user) or default=ID (join organization ID).
    #[arg(long, env = "IDSYNC_MISSING_TENANT", default_value = "reject")]
    pub missing_tenant: String,

    /// Write users.last_login_at at most this often per user and tenant they act in.
    #[arg(long, env = "IDSYNC_LAST_SEEN_INTERVAL", default_value = "5m")]
    pub last_seen_interval: String,

    /// Most synced identities remembered (an unchanged identity then costs no database work).
    #[arg(long, env = "IDSYNC_SYNC_CACHE_SIZE", default_value = "100000")]
    pub sync_cache_size: String,

    /// How long a synced identity is remembered; also how long an operator's change made on another
    /// replica can take to reach this one.
    #[arg(long, env = "IDSYNC_SYNC_CACHE_TTL", default_value = "5m")]
    pub sync_cache_ttl: String,

    /// When the database fails: fail (503) or pass (forward the token's identity with X-Idsync-Synced: false).
    #[arg(long, env = "IDSYNC_ON_DB_ERROR", default_value = "fail")]
    pub on_db_error: String,

    /// PostgreSQL only: create this schema for each new organization, e.g. `tenant_{slug}` ({slug} and {id}
    /// are substituted), and forward it as X-Tenant-Schema.
    #[arg(long, env = "IDSYNC_TENANT_SCHEMA")]
    pub tenant_schema: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDbError {
    Fail,
    Pass,
}

/// The admin API's bearer token; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(REDACTED)")
    }
}

/// A database URL whose password never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_sqlite(&self) -> bool {
        self.0.starts_with("sqlite:")
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Url::parse(&self.0) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("REDACTED"));
                write!(f, "{u}")
            }
            Ok(u) => write!(f, "{u}"),
            Err(_) => f.write_str("<unparsable database URL>"),
        }
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct IssuerSettings {
    pub issuer: String,
    pub dialect: Dialect,
    pub audiences: Vec<String>,
    pub source: KeySource,
    pub tenant_claim: ClaimPath,
    pub roles_claim: ClaimPath,
}

/// Validated configuration; only `startup` reads all of it.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The admin API's bearer token, if configured.
    pub admin_token: Option<AdminToken>,
    pub upstream: Url,
    pub upstream_connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub issuers: Vec<IssuerSettings>,
    pub issuer_ca_pem: Option<Vec<u8>>,
    pub idp_timeout: Duration,
    pub key_cache: KeyCacheOptions,
    pub verify: VerifyOptions,
    pub token_cache_size: u64,
    pub skip_auth: Vec<String>,
    pub header_prefix: String,
    pub cors: crate::http::cors::CorsPolicy,
    pub database_url: DatabaseUrl,
    pub database_max_connections: u32,
    pub database_timeout: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub shutdown_timeout: Duration,
    pub header_read_timeout: Duration,
    pub migrate: bool,
    pub sync: SyncOptions,
    pub on_db_error: OnDbError,
}

/// Parses `500ms`, `30s`, `10m`, `24h`, `7d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 30s, 10m, 24h)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86400),
        _ => {
            return Err(format!(
                "`{s}` has an unknown unit `{unit}` (use ms, s, m, h or d)"
            ));
        }
    };
    Ok(d)
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Collects problems instead of stopping at the first one.
struct Problems(Vec<String>);

impl Problems {
    fn take<T>(&mut self, flag: &str, r: Result<T, String>) -> Option<T> {
        r.map_err(|e| self.0.push(format!("{flag}: {e}"))).ok()
    }
}

impl ServeArgs {
    /// Parses and checks everything; on failure returns every problem found.
    pub fn validate(&self) -> Result<Settings, Vec<String>> {
        let mut p = Problems(Vec::new());
        let addr = |s: &str| {
            s.parse::<SocketAddr>()
                .map_err(|_| format!("`{s}` is not HOST:PORT (e.g. 0.0.0.0:8080)"))
        };
        let dur = |s: &str| parse_duration(s);
        let listen = p.take("--listen", addr(&self.listen));
        let admin_listen = p.take("--admin-listen", addr(&self.admin_listen));
        let upstream = match &self.upstream {
            None => {
                p.0.push(
                    "--upstream: required (the app behind idsync, e.g. http://127.0.0.1:3000)"
                        .into(),
                );
                None
            }
            Some(u) => p.take(
                "--upstream",
                Url::parse(u)
                    .map_err(|e| format!("`{u}`: {e}"))
                    .and_then(|u| {
                        if u.scheme() != "http" {
                            Err("must be an http:// URL (the app runs next to idsync)".into())
                        } else if u.host().is_none() {
                            Err("has no host".into())
                        } else {
                            Ok(u)
                        }
                    }),
            ),
        };
        let admin_token = self.admin_token_file.as_ref().and_then(|path| {
            p.take(
                "--admin-token-file",
                std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))
                    .and_then(|t| {
                        let t = t.trim().to_owned();
                        if t.len() < 16 {
                            Err("the token must be at least 16 characters".into())
                        } else {
                            Ok(AdminToken(t))
                        }
                    }),
            )
        });
        if let Some(addr) = &admin_listen
            && !is_loopback(addr)
            && self.admin_token_file.is_none()
        {
            p.0.push(format!(
                "--admin-listen: {addr} is not a loopback address, so the admin API needs --admin-token-file (or listen on 127.0.0.1)"
            ));
        }
        let tenant_claim = p.take("--tenant-claim", ClaimPath::new(self.tenant_claim.clone()));
        let roles_claim = p.take("--roles-claim", ClaimPath::new(self.roles_claim.clone()));
        let mut issuers = Vec::new();
        if self.issuers.is_empty() {
            p.0.push("--issuer: at least one is required (e.g. --issuer https://sso.example.com/realms/acme)".into());
        }
        for spec in &self.issuers {
            if let (Some(t), Some(r)) = (&tenant_claim, &roles_claim) {
                match parse_issuer(spec, self.allow_insecure_issuers, t, r) {
                    Ok(i)
                        if issuers
                            .iter()
                            .any(|x: &IssuerSettings| x.issuer == i.issuer) =>
                    {
                        p.0.push(format!("--issuer: `{}` is configured twice", i.issuer));
                    }
                    Ok(i) => issuers.push(i),
                    Err(errs) => {
                        p.0.extend(errs.into_iter().map(|e| format!("--issuer `{spec}`: {e}")))
                    }
                }
            }
        }
        let issuer_ca_pem = self.issuer_ca_file.as_ref().and_then(|path| {
            p.take(
                "--issuer-ca-file",
                std::fs::read(path).map_err(|e| format!("{}: {e}", path.display())),
            )
        });
        let idp_timeout = p.take("--idp-timeout", dur(&self.idp_timeout));
        let refresh = p.take("--jwks-refresh-interval", dur(&self.jwks_refresh_interval));
        let cooldown = p.take("--jwks-refetch-cooldown", dur(&self.jwks_refetch_cooldown));
        let max_stale = p.take("--jwks-max-stale", dur(&self.jwks_max_stale));
        let file_poll = p.take("--key-file-poll", dur(&self.key_file_poll));
        let leeway = p.take("--leeway", dur(&self.leeway));
        let max_token_bytes = p.take(
            "--max-token-bytes",
            self.max_token_bytes
                .parse::<usize>()
                .map_err(|_| "not a number of bytes".to_string())
                .and_then(|n| {
                    if (256..=1024 * 1024).contains(&n) {
                        Ok(n)
                    } else {
                        Err("must be between 256 and 1048576".into())
                    }
                }),
        );
        let token_cache_size = p.take(
            "--token-cache-size",
            self.token_cache_size
                .parse::<u64>()
                .map_err(|_| "not a number".into()),
        );
        let db_max = p.take(
            "--database-max-connections",
            self.database_max_connections
                .parse::<u32>()
                .map_err(|_| "not a number".to_string())
                .and_then(|n| {
                    if n == 0 {
                        Err("must be at least 1".into())
                    } else {
                        Ok(n)
                    }
                }),
        );
        let cors_max_age = p.take("--cors-max-age", dur(&self.cors_max_age));
        let cors = cors_max_age.and_then(|max_age| {
            p.take(
                "--cors-allow-origin",
                crate::http::cors::CorsPolicy::new(
                    &self.cors_allow_origin,
                    &self.cors_allow_headers,
                    max_age,
                ),
            )
        });
        let header_read_timeout = p.take("--header-read-timeout", dur(&self.header_read_timeout));
        let database_timeout = p.take("--database-timeout", dur(&self.database_timeout));
        let upstream_connect_timeout = p.take(
            "--upstream-connect-timeout",
            dur(&self.upstream_connect_timeout),
        );
        let upstream_timeout = p.take("--upstream-timeout", dur(&self.upstream_timeout));
        let shutdown_timeout = p.take("--shutdown-timeout", dur(&self.shutdown_timeout));
        let log_format = p.take(
            "--log-format",
            match self.log_format.as_str() {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                other => Err(format!("`{other}` is not one of: text, json")),
            },
        );
        let log_level = p.take(
            "--log-level",
            tracing_subscriber::EnvFilter::try_new(&self.log_level)
                .map(|_| self.log_level.clone())
                .map_err(|e| e.to_string()),
        );
        let mut skip_auth = Vec::new();
        for prefix in &self.skip_auth {
            if !prefix.starts_with('/') {
                p.0.push(format!("--skip-auth: `{prefix}` must start with /"));
            } else {
                skip_auth.push(prefix.clone());
            }
        }
        p.take(
            "--header-prefix",
            crate::http::headers::HeaderNames::new(&self.header_prefix).map(|_| ()),
        );
        let database_url = DatabaseUrl::new(self.database_url.clone());
        if !(database_url.is_sqlite()
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            p.0.push(
                "--database-url: must start with sqlite:, postgres:// or postgresql://".into(),
            );
        }
        let migrate = p.take(
            "--migrate",
            match self.migrate.as_str() {
                "auto" => Ok(true),
                "skip" => Ok(false),
                other => Err(format!("`{other}` is not one of: auto, skip")),
            },
        );
        let roles = match RoleMap::new(&self.app_roles, &self.role_map, &self.default_role) {
            Ok(r) => Some(r),
            Err(errs) => {
                p.0.extend(errs);
                None
            }
        };
        let missing_tenant = p.take(
            "--missing-tenant",
            MissingTenant::parse(&self.missing_tenant),
        );
        let last_seen_interval = p.take("--last-seen-interval", dur(&self.last_seen_interval));
        let sync_cache_size = p.take(
            "--sync-cache-size",
            self.sync_cache_size
                .parse::<u64>()
                .map_err(|_| "not a number".into()),
        );
        let sync_cache_ttl = p.take("--sync-cache-ttl", dur(&self.sync_cache_ttl));
        let on_db_error = p.take(
            "--on-db-error",
            match self.on_db_error.as_str() {
                "fail" => Ok(OnDbError::Fail),
                "pass" => Ok(OnDbError::Pass),
                other => Err(format!("`{other}` is not one of: fail, pass")),
            },
        );
        if let Some(template) = &self.tenant_schema {
            if DatabaseUrl::new(self.database_url.clone()).is_sqlite() {
                p.0.push("--tenant-schema: schemas per tenant need PostgreSQL; SQLite has no schemas (remove the flag or use a postgres:// --database-url)".into());
            } else {
                p.take(
                    "--tenant-schema",
                    crate::provision::naming::schema_name(template, "example", "example")
                        .map(|_| ()),
                );
            }
        }
        if !p.0.is_empty() {
            return Err(p.0);
        }
        let (Some(database_timeout), Some(cors), Some(header_read_timeout)) =
            (database_timeout, cors, header_read_timeout)
        else {
            return Err(vec!["internal: a setting was not parsed".into()]);
        };
        let (
            Some(migrate),
            Some(roles),
            Some(missing_tenant),
            Some(last_seen_interval),
            Some(sync_cache_size),
            Some(sync_cache_ttl),
            Some(on_db_error),
        ) = (
            migrate,
            roles,
            missing_tenant,
            last_seen_interval,
            sync_cache_size,
            sync_cache_ttl,
            on_db_error,
        )
        else {
            return Err(vec!["internal: a setting was not parsed".into()]);
        };
        // Every `take` above succeeded, so every Option is Some.
        let (
            Some(listen),
            Some(admin_listen),
            Some(upstream),
            Some(idp_timeout),
            Some(refresh),
            Some(cooldown),
            Some(max_stale),
            Some(file_poll),
            Some(leeway),
            Some(max_token_bytes),
            Some(token_cache_size),
            Some(db_max),
            Some(upstream_connect_timeout),
            Some(upstream_timeout),
            Some(shutdown_timeout),
            Some(log_format),
            Some(log_level),
        ) = (
            listen,
            admin_listen,
            upstream,
            idp_timeout,
            refresh,
            cooldown,
            max_stale,
            file_poll,
            leeway,
            max_token_bytes,
            token_cache_size,
            db_max,
            upstream_connect_timeout,
            upstream_timeout,
            shutdown_timeout,
            log_format,
            log_level,
        )
        else {
            return Err(vec!["internal: a setting was not parsed".into()]);
        };
        Ok(Settings {
            listen,
            admin_listen,
            admin_token,
            upstream,
            upstream_connect_timeout,
            upstream_timeout,
            issuers,
            issuer_ca_pem,
            idp_timeout,
            key_cache: KeyCacheOptions {
                refresh_interval: refresh,
                refetch_cooldown: cooldown,
                max_stale,
                file_poll,
            },
            verify: VerifyOptions {
                leeway_secs: leeway.as_secs() as i64,
                max_token_bytes,
            },
            token_cache_size,
            skip_auth,
            header_prefix: self.header_prefix.clone(),
            cors,
            database_url,
            database_max_connections: db_max,
            database_timeout,
            log_format,
            log_level,
            shutdown_timeout,
            header_read_timeout,
            migrate,
            sync: SyncOptions {
                roles,
                missing_tenant,
                tenant_schema: self.tenant_schema.clone(),
                cache_size: sync_cache_size,
                cache_ttl: sync_cache_ttl,
                last_seen_interval,
            },
            on_db_error,
        })
    }
}

fn check_fetch_url(what: &str, raw: &str, allow_insecure: bool) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("{what} `{raw}`: {e}"))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_host(&url) || allow_insecure => Ok(url),
        "http" => Err(format!(
            "{what} `{raw}` must be https:// (http:// only for loopback hosts or with --allow-insecure-issuers)"
        )),
        other => Err(format!("{what} `{raw}` has unsupported scheme `{other}`")),
    }
}

fn parse_issuer(
    spec: &str,
    allow_insecure: bool,
    tenant: &ClaimPath,
    roles: &ClaimPath,
) -> Result<IssuerSettings, Vec<String>> {
    let mut errors = Vec::new();
    let mut parts = spec.split(',').map(str::trim);
    let raw_url = parts.next().unwrap_or_default();
    let url = check_fetch_url("issuer URL", raw_url, allow_insecure)
        .map_err(|e| errors.push(e))
        .ok();
    let mut dialect = None;
    let mut audiences = Vec::new();
    let mut jwks_uri = None;
    let mut key_file = None;
    let mut tenant_claim = tenant.clone();
    let mut roles_claim = roles.clone();
    for part in parts.filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            errors.push(format!("`{part}` is not key=value"));
            continue;
        };
        match k {
            "dialect" => match Dialect::parse(v) {
                Some(d) => dialect = Some(d),
                None => errors.push(format!("dialect `{v}` is not one of: keycloak, frontegg, generic")),
            },
            "audience" | "aud" => audiences.push(v.to_owned()),
            "jwks-uri" => match check_fetch_url("jwks-uri", v, allow_insecure) {
                Ok(u) => jwks_uri = Some(u),
                Err(e) => errors.push(e),
            },
            "key-file" => {
                let path = PathBuf::from(v);
                match std::fs::read(&path) {
                    Ok(bytes) => match crate::oidc::KeySet::from_file_bytes(&bytes) {
                        Ok(_) => key_file = Some(path),
                        Err(e) => errors.push(format!("key-file {v}: {e}")),
                    },
                    Err(e) => errors.push(format!("key-file {v}: {e}")),
                }
            }
            "tenant-claim" => match ClaimPath::new(v) {
                Ok(c) => tenant_claim = c,
                Err(e) => errors.push(e),
            },
            "roles-claim" => match ClaimPath::new(v) {
                Ok(c) => roles_claim = c,
                Err(e) => errors.push(e),
            },
            other => errors.push(format!("unknown option `{other}` (known: dialect, audience, jwks-uri, key-file, tenant-claim, roles-claim)")),
        }
    }
    if jwks_uri.is_some() && key_file.is_some() {
        errors.push("jwks-uri and key-file cannot both be set".into());
    }
    let Some(url) = url else { return Err(errors) };
    if !errors.is_empty() {
        return Err(errors);
    }
    let dialect = dialect.unwrap_or(if url.path().contains("/realms/") {
        Dialect::Keycloak
    } else {
        Dialect::Generic
    });
    let source = match (jwks_uri, key_file) {
        (Some(u), _) => KeySource::JwksUri(u),
        (_, Some(f)) => KeySource::File(f),
        _ => KeySource::Discovery,
    };
    // The issuer is matched against `iss` verbatim, so keep the operator's spelling, not the parsed URL's.
    Ok(IssuerSettings {
        issuer: raw_url.to_owned(),
        dialect,
        audiences,
        source,
        tenant_claim,
        roles_claim,
    })
}

/// True when `addr` is a loopback address (admin port exposure checks).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => ip.is_loopback(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["idsync"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().serve
    }

    #[test]
    fn valid_flags_produce_settings_with_dialect_defaults() {
        let s = args(&[
            "--upstream", "http://127.0.0.1:3000",
            "--issuer", "https://sso.example.com/realms/acme,audience=account,audience=web",
            "--issuer", "https://acme.frontegg.com,dialect=frontegg,jwks-uri=https://acme.frontegg.com/.well-known/jwks.json",
        ])
        .validate()
        .unwrap();
        assert_eq!(s.issuers[0].dialect, Dialect::Keycloak);
        assert_eq!(s.issuers[0].audiences, ["account", "web"]);
        assert_eq!(s.issuers[0].source, KeySource::Discovery);
        assert_eq!(s.issuers[1].dialect, Dialect::Frontegg);
        assert!(matches!(s.issuers[1].source, KeySource::JwksUri(_)));
        assert_eq!(s.key_cache.refetch_cooldown, Duration::from_secs(30));
        assert_eq!(s.verify.leeway_secs, 60);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let errs = args(&[
            "--listen",
            "nonsense",
            "--issuer",
            "http://idp.example.com,dialect=okta,colour=blue",
            "--leeway",
            "5 parsecs",
            "--log-format",
            "xml",
        ])
        .validate()
        .unwrap_err();
        let all = errs.join("\n");
        for needle in [
            "--listen",
            "--upstream: required",
            "must be https://",
            "dialect `okta`",
            "unknown option `colour`",
            "--leeway",
            "--log-format",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn http_issuers_are_allowed_only_on_loopback_or_when_insecure_is_allowed() {
        let base = ["--upstream", "http://127.0.0.1:3000", "--issuer"];
        let with = |iss: &str, insecure: bool| {
            let mut v: Vec<&str> = base.to_vec();
            v.push(iss);
            if insecure {
                v.push("--allow-insecure-issuers");
            }
            args(&v).validate()
        };
        assert!(with("http://127.0.0.1:8081/realms/x", false).is_ok());
        assert!(with("http://localhost:8081", false).is_ok());
        assert!(with("http://idp.internal", false).is_err());
        assert!(with("http://idp.internal", true).is_ok());
    }

    #[test]
    fn a_non_loopback_admin_port_needs_a_token_file_and_the_token_never_prints() {
        let base = [
            "--upstream",
            "http://127.0.0.1:3000",
            "--issuer",
            "https://a.example.com",
            "--admin-listen",
            "0.0.0.0:9090",
        ];
        let errs = args(&base).validate().unwrap_err();
        assert!(
            errs.iter().any(|e| e.contains("needs --admin-token-file")),
            "{errs:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "a-very-secret-admin-token\n").unwrap();
        let mut with_file = base.to_vec();
        with_file.extend(["--admin-token-file", file.to_str().unwrap()]);
        let s = args(&with_file).validate().unwrap();
        assert_eq!(
            s.admin_token.as_ref().unwrap().expose(),
            "a-very-secret-admin-token"
        );
        assert!(
            !format!("{s:?}").contains("a-very-secret"),
            "settings Debug must not show the token"
        );
    }

    #[test]
    fn tenant_schema_is_refused_on_sqlite_with_a_clear_message() {
        let errs = args(&[
            "--upstream",
            "http://127.0.0.1:3000",
            "--issuer",
            "https://a.example.com",
            "--tenant-schema",
            "tenant_{slug}",
        ])
        .validate()
        .unwrap_err();
        assert!(
            errs.iter().any(|e| e.contains("need PostgreSQL")),
            "{errs:?}"
        );
    }

    #[test]
    fn sync_policies_are_parsed() {
        let s = args(&[
            "--upstream",
            "http://127.0.0.1:3000",
            "--issuer",
            "https://a.example.com",
            "--missing-tenant",
            "default=org-1",
            "--role-map",
            "ops=admin,billing=viewer",
            "--on-db-error",
            "pass",
        ])
        .validate()
        .unwrap();
        assert_eq!(
            s.sync.missing_tenant,
            MissingTenant::Default("org-1".into())
        );
        assert_eq!(s.sync.roles.app_role(&["ops".to_string()]), "admin");
        assert_eq!(s.on_db_error, OnDbError::Pass);
        let errs = args(&[
            "--upstream",
            "http://127.0.0.1:3000",
            "--issuer",
            "https://a.example.com",
            "--missing-tenant",
            "maybe",
            "--role-map",
            "x=owner",
        ])
        .validate()
        .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert!(parse_duration("10 minutes").is_err());
    }

    #[test]
    fn database_password_is_redacted_in_debug_and_display() {
        let url = DatabaseUrl::new("postgres://idsync:s3cret-pw@db.internal:5432/app");
        assert!(!format!("{url:?}").contains("s3cret-pw"));
        assert!(!format!("{url}").contains("s3cret-pw"));
        assert!(format!("{url:?}").contains("db.internal"));
    }

    #[test]
    fn every_flag_has_an_idsync_env_twin() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        for arg in cmd.get_arguments().filter(|a| a.get_long().is_some()) {
            let long = arg.get_long().unwrap();
            if ["help", "version"].contains(&long) {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{long} has no env twin"));
            let want = format!("IDSYNC_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(env.to_str().unwrap(), want, "--{long}");
        }
    }
}
