//! Command-line flags and their `IDSYNC_*` twins for `serve` (and the subcommands that take the same
//! flags), parsed into [`Settings`]. clap derive, where each doc comment is the `--help` text. Every raw
//! value is parsed on its own and every problem is reported at once; [`Settings`] is built only when there
//! are none, so it can never be half-built.

use crate::access::{IssuerSpec, MissingTenant, OnDbError, TenantPolicy};
use crate::http::cors::CorsPolicy;
use crate::identity::{ClaimPath, Dialect, RoleMap, RoleMapError};
use crate::oidc::{KeyCacheOptions, KeySource, VerifyOptions};
use crate::provision::SyncOptions;
use crate::telemetry::LogFormat;
use clap::Args;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// The database, for every subcommand that touches it (declared once, global to all of them).
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Database for synced users and tenants: sqlite://PATH?mode=rwc or postgres://USER:PASS@HOST/DB.
    #[arg(
        long,
        env = "IDSYNC_DATABASE_URL",
        default_value = "sqlite://idsync.db?mode=rwc",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,
}

impl DatabaseArgs {
    /// The URL, checked for a scheme idsync speaks.
    pub fn url(&self) -> Result<DatabaseUrl, String> {
        let url = DatabaseUrl::new(self.database_url.clone());
        if url.is_sqlite()
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
        {
            Ok(url)
        } else {
            Err("--database-url: must start with sqlite:, postgres:// or postgresql://".into())
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the proxy port (what the Service points at).
    #[arg(long, env = "IDSYNC_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,

    /// The app behind idsync, usually http://127.0.0.1:3000 (HTTP/1.1; requests that came in over HTTP/2
    /// are re-spoken as 1.1). `h2c://127.0.0.1:50051` speaks HTTP/2 with prior knowledge to the app
    /// instead: what a gRPC server needs. Required.
    #[arg(long, env = "IDSYNC_UPSTREAM")]
    pub upstream: Option<String>,

    /// A trusted issuer (repeatable; in the environment, separate several with `;`):
    /// URL[,dialect=keycloak|frontegg|generic][,audience=AUD]...[,authorized-party=CLIENT]...[,typ=at+jwt]
    /// [,jwks-uri=URL][,key-file=PATH][,tenant-claim=PATH][,roles-claim=PATH][,id-prefix=STR]
    /// [,logout-audience=CLIENT]...[,webhook-secret-file=PATH]. The dialect defaults to keycloak when
    /// the URL path contains /realms/, else generic. audience= checks `aud`; authorized-party= checks `azp`
    /// (the client the token was issued to: with neither, a token issued to any client of the issuer
    /// passes); typ=at+jwt requires RFC 9068 access tokens. jwks-uri skips discovery; key-file reads a local
    /// JWKS or PEM file (re-read when it changes) instead of the network. id-prefix= stores and forwards
    /// this issuer's user and tenant ids as STR + the IdP's id (two issuers with overlapping ids can share
    /// one database). logout-audience= enables OIDC back-channel logout for tokens addressed to that
    /// client id; webhook-secret-file= holds the secret the IdP signs its webhooks with (docs/lifecycle.md).
    #[arg(long = "issuer", env = "IDSYNC_ISSUER", value_delimiter = ';')]
    pub issuers: Vec<String>,

    /// Address of the admin port: /livez, /readyz, /metrics.
    #[arg(long, env = "IDSYNC_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: String,

    /// File holding the bearer token the admin API requires. Required when --admin-listen is not a
    /// loopback address.
    #[arg(long, env = "IDSYNC_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Most database connections in the pool.
    #[arg(long, env = "IDSYNC_DATABASE_MAX_CONNECTIONS", default_value = "10")]
    pub database_max_connections: String,

    /// Prepared statements kept per PostgreSQL connection. Group commit sends a batch's rows as arrays,
    /// so each statement has one text whatever the batch size, prepared and planned once per connection
    /// (idsync's sessions use generic plans and no sequential scans: every query is a lookup by key).
    /// 0 prepares nothing and leaves the session's planner settings alone (for poolers that cannot hold
    /// prepared statements or refuse startup parameters).
    #[arg(long, env = "IDSYNC_DATABASE_STATEMENT_CACHE", default_value = "512")]
    pub database_statement_cache: String,

    /// How long a request waits for a database connection before answering 503.
    #[arg(long, env = "IDSYNC_DATABASE_TIMEOUT", default_value = "3s")]
    pub database_timeout: String,

    /// Threads that serve requests; 0 takes the CPUs this process may use (its affinity and its
    /// cgroup's CPU quota, so a pod limited to 1 CPU gets 1). With 1, every task runs on one thread
    /// (tokio's current-thread scheduler), which measured less CPU per request than one worker of the
    /// multi-threaded scheduler.
    #[arg(long, env = "IDSYNC_WORKER_THREADS", default_value = "0")]
    pub worker_threads: String,

    /// Log format: text or json.
    #[arg(long, env = "IDSYNC_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// Log level or tracing filter directives (e.g. `info,idsync=debug`).
    #[arg(long, env = "IDSYNC_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Export traces over OTLP/HTTP (protobuf) to this collector, a base URL (`/v1/traces` is appended),
    /// e.g. http://otel-collector:4318. Unset: the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (used as
    /// is) or OTEL_EXPORTER_OTLP_ENDPOINT (a base URL) are read instead; none set (or OTEL_SDK_DISABLED=true):
    /// no spans are made. Headers (OTEL_EXPORTER_OTLP_HEADERS) and the sampler (OTEL_TRACES_SAMPLER) follow
    /// the standard variables.
    #[arg(long, env = "IDSYNC_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// `service.name` on exported spans. Unset: OTEL_SERVICE_NAME, else `idsync`.
    #[arg(long, env = "IDSYNC_OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,

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

    /// Least time between two key refetches caused by tokens with an unknown `kid` (a flood of forged
    /// `kid`s costs the IdP at most one fetch per cooldown); an unknown `kid` seen during the cooldown is
    /// refetched for as soon as it ends.
    #[arg(long, env = "IDSYNC_JWKS_REFETCH_COOLDOWN", default_value = "5s")]
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

    /// Most verified tokens kept in memory (0 disables the cache: every request is verified). The caches
    /// are also bounded in bytes by --cache-max-memory, whichever is reached first.
    #[arg(long, env = "IDSYNC_TOKEN_CACHE_SIZE", default_value = "100000")]
    pub token_cache_size: String,

    /// Memory all caches together may hold (verified tokens 56 %, synced identities 36 %, membership
    /// lookups and audited refusals 4 % each), e.g. 64MiB, 1GiB; no traffic pattern can grow the caches
    /// past it. Size the container's memory limit at 40 MiB + twice this (measured: README).
    #[arg(long, env = "IDSYNC_CACHE_MAX_MEMORY", default_value = "64MiB")]
    pub cache_max_memory: String,

    /// Claim holding the tenant id (dotted path, or a literal claim name such as a URL).
    #[arg(long, env = "IDSYNC_TENANT_CLAIM", default_value = "tenant_id")]
    pub tenant_claim: String,

    /// Claim holding roles for generic issuers (dotted path; an array or a space/comma separated string).
    #[arg(long, env = "IDSYNC_ROLES_CLAIM", default_value = "roles")]
    pub roles_claim: String,

    /// Path prefix proxied without a token (repeatable, or comma separated); owned headers are still
    /// stripped. Matched on whole segments of the canonical path (`;` parameters cut, `%2e` decoded, `..`
    /// resolved); a path that could mean something else to the app (`%2f`, `\`, `//`) is never public.
    #[arg(long, env = "IDSYNC_SKIP_AUTH", value_delimiter = ',')]
    pub skip_auth: Vec<String>,

    /// Forward-auth (`/.idsync/auth`): the one request header in which the proxy in front sends the
    /// original URI, e.g. X-Original-URI (nginx auth_request, ingress-nginx with auth-method) or
    /// X-Forwarded-Uri (Traefik). Only then does forward-auth apply --skip-auth; Envoy ext_authz needs
    /// none (the original path follows /.idsync/auth in its request line).
    #[arg(long, env = "IDSYNC_FORWARD_AUTH_URI_HEADER")]
    pub forward_auth_uri_header: Option<String>,

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

    /// Peers whose X-Forwarded-*, Forwarded and X-Real-IP headers idsync believes and appends to
    /// (comma separated addresses or CIDR blocks, e.g. the ingress pods' range 10.0.0.0/8). From any other
    /// peer those headers are replaced with what idsync itself saw.
    #[arg(long, env = "IDSYNC_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// How long a back-channel logout keeps the session (or user) it ended refused: at least the lifetime
    /// of the IdP's access tokens.
    #[arg(long, env = "IDSYNC_LOGOUT_RETENTION", default_value = "24h")]
    pub logout_retention: String,

    /// The longest a WebSocket stays open, token or not (e.g. 1h; 0 = no bound beyond the token). A
    /// WebSocket is always closed when the token that opened it expires.
    #[arg(long, env = "IDSYNC_WEBSOCKET_MAX_LIFETIME", default_value = "0")]
    pub websocket_max_lifetime: String,

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
    pub trusted_proxies: crate::http::forwarded::TrustedProxies,
    /// `None`: only the token's `exp` closes a WebSocket.
    pub websocket_max_lifetime: Option<Duration>,
    pub issuers: Vec<IssuerSpec>,
    pub issuer_ca_pem: Option<Vec<u8>>,
    pub idp_timeout: Duration,
    pub key_cache: KeyCacheOptions,
    pub verify: VerifyOptions,
    /// The token cache's bound.
    pub token_cache: crate::provision::CacheBudget,
    pub skip_auth: Vec<String>,
    pub forward_auth_uri_header: Option<http::HeaderName>,
    pub header_prefix: String,
    pub cors: CorsPolicy,
    pub database_url: DatabaseUrl,
    pub database_max_connections: u32,
    pub database_statement_cache: usize,
    pub database_timeout: Duration,
    /// `--worker-threads` (0: one per usable CPU). `main` reads the flag before the settings exist (the
    /// runtime comes first); validated here with the rest, so a bad value is listed with every other.
    pub worker_threads: u16,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Where traces go; `None`: tracing off.
    pub trace: Option<crate::telemetry::trace::TraceSettings>,
    pub shutdown_timeout: Duration,
    pub header_read_timeout: Duration,
    pub migrate: bool,
    pub policy: TenantPolicy,
    pub sync: SyncOptions,
    pub on_db_error: OnDbError,
    pub logout_retention: Duration,
}

/// The longest duration a flag takes.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86400);

/// Parses `500ms`, `30s`, `10m`, `24h`, `7d`, or a bare number of seconds, up to 100 years.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 30s, 10m, 24h)"))?;
    let (per_unit, millis) = match unit {
        "ms" => (1, true),
        "" | "s" => (1, false),
        "m" => (60, false),
        "h" => (3600, false),
        "d" => (86400, false),
        _ => {
            return Err(format!(
                "`{s}` has an unknown unit `{unit}` (use ms, s, m, h or d)"
            ));
        }
    };
    // Durations are added to clock readings (a cache entry's deadline): one past what a clock can hold
    // would overflow there, on a request, instead of being refused here.
    let d = n
        .checked_mul(per_unit)
        .map(|n| {
            if millis {
                Duration::from_millis(n)
            } else {
                Duration::from_secs(n)
            }
        })
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| format!("`{s}` is longer than 100 years"))?;
    Ok(d)
}

/// Parses a byte size: `65536`, `512KiB`, `64MiB`, `1GiB` (also `K`/`Ki`/`KB`, `M`…, `G`…; powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 64MiB, 1GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "ki" | "kb" | "kib" => 10,
        "m" | "mi" | "mb" | "mib" => 20,
        "g" | "gi" | "gb" | "gib" => 30,
        _ => return Err(format!("`{s}` has an unknown unit (use KiB, MiB or GiB)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Collects every problem instead of stopping at the first one. A parse that fails yields `None` only
/// after recording why, so "some value is missing" always comes with a non-empty list.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn take<T>(&mut self, flag: &str, r: Result<T, String>) -> Option<T> {
        r.map_err(|e| self.0.push(format!("{flag}: {e}"))).ok()
    }

    fn extend<T>(&mut self, r: Result<T, Vec<String>>) -> Option<T> {
        r.map_err(|e| self.0.extend(e)).ok()
    }

    fn push(&mut self, problem: String) {
        self.0.push(problem);
    }

    fn duration(&mut self, flag: &str, raw: &str) -> Option<Duration> {
        self.take(flag, parse_duration(raw))
    }

    fn number<T: std::str::FromStr + PartialOrd + fmt::Display>(
        &mut self,
        flag: &str,
        raw: &str,
        range: std::ops::RangeInclusive<T>,
    ) -> Option<T> {
        let r = raw
            .parse::<T>()
            .map_err(|_| format!("`{raw}` is not a number"))
            .and_then(|n| {
                if range.contains(&n) {
                    Ok(n)
                } else {
                    Err(format!(
                        "must be between {} and {}",
                        range.start(),
                        range.end()
                    ))
                }
            });
        self.take(flag, r)
    }

    fn addr(&mut self, flag: &str, raw: &str) -> Option<SocketAddr> {
        self.take(
            flag,
            raw.parse::<SocketAddr>()
                .map_err(|_| format!("`{raw}` is not HOST:PORT (e.g. 0.0.0.0:8080)")),
        )
    }

    fn choice<T: Copy>(&mut self, flag: &str, raw: &str, choices: &[(&str, T)]) -> Option<T> {
        let found = choices
            .iter()
            .find(|(name, _)| *name == raw)
            .map(|(_, v)| *v);
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        self.take(
            flag,
            found.ok_or_else(|| format!("`{raw}` is not one of: {}", names.join(", "))),
        )
    }
}

/// The listeners and the admin token.
struct Listeners {
    listen: SocketAddr,
    admin_listen: SocketAddr,
    admin_token: Option<AdminToken>,
    header_read_timeout: Duration,
    shutdown_timeout: Duration,
}

/// The most `--worker-threads` takes.
pub const MAX_WORKERS: u16 = 1024;

impl ServeArgs {
    /// `--worker-threads` as far as it reads, for building the runtime before the settings are validated:
    /// a value out of range counts as 0 here and is refused by [`ServeArgs::validate`].
    pub fn worker_threads_hint(&self) -> u16 {
        (self.worker_threads.trim().parse::<u16>().ok())
            .filter(|n| *n <= MAX_WORKERS)
            .unwrap_or(0)
    }

    /// Parses and checks everything; on failure returns every problem found.
    pub fn validate(&self, db: &DatabaseArgs) -> Result<Settings, Vec<String>> {
        let mut p = Problems::default();
        let settings = self.build(db, &mut p);
        match settings {
            Some(s) if p.0.is_empty() => Ok(s),
            _ => Err(p.0),
        }
    }

    /// Every group is parsed before any is combined, so every problem is recorded.
    fn build(&self, db: &DatabaseArgs, p: &mut Problems) -> Option<Settings> {
        let listeners = self.listeners(p);
        let upstream = self.upstream(p);
        let upstream_connect_timeout =
            p.duration("--upstream-connect-timeout", &self.upstream_connect_timeout);
        let upstream_timeout = p.duration("--upstream-timeout", &self.upstream_timeout);
        let mut blocks = Vec::new();
        for raw in self.trusted_proxies.iter().filter(|r| !r.trim().is_empty()) {
            if let Some(c) = p.take(
                "--trusted-proxies",
                crate::http::forwarded::Cidr::parse(raw),
            ) {
                blocks.push(c);
            }
        }
        let websocket_max_lifetime = p
            .duration("--websocket-max-lifetime", &self.websocket_max_lifetime)
            .map(|d| (!d.is_zero()).then_some(d));
        let issuers = self.issuers(p);
        let issuer_ca_pem = match &self.issuer_ca_file {
            None => Some(None),
            Some(path) => p
                .take(
                    "--issuer-ca-file",
                    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display())),
                )
                .map(Some),
        };
        let idp_timeout = p.duration("--idp-timeout", &self.idp_timeout);
        let key_cache = self.key_cache(p);
        let verify = self.verify(p);
        let token_cache_size = p.number("--token-cache-size", &self.token_cache_size, 0..=u64::MAX);
        let cache_bytes = p.take("--cache-max-memory", parse_size(&self.cache_max_memory));
        let edge = self.edge(p);
        let database_url = p.take("--database-url", db.url());
        let database_max_connections = p.number(
            "--database-max-connections",
            &self.database_max_connections,
            1..=10_000,
        );
        let database_statement_cache = p.number(
            "--database-statement-cache",
            &self.database_statement_cache,
            0..=100_000,
        );
        let database_timeout = p.duration("--database-timeout", &self.database_timeout);
        let worker_threads = p.number("--worker-threads", &self.worker_threads, 0..=MAX_WORKERS);
        let log_format = p.choice(
            "--log-format",
            &self.log_format,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        );
        let log_level = p.take(
            "--log-level",
            tracing_subscriber::EnvFilter::try_new(&self.log_level)
                .map(|_| self.log_level.clone())
                .map_err(|e| e.to_string()),
        );
        let trace = self.trace(p);
        let migrate = p.choice(
            "--migrate",
            &self.migrate,
            &[("auto", true), ("skip", false)],
        );
        let policy = self.policy(p);
        let sync = self.sync(database_url.as_ref(), cache_bytes, p);
        let logout_retention = p.duration("--logout-retention", &self.logout_retention);
        let on_db_error = p.choice(
            "--on-db-error",
            &self.on_db_error,
            &[("fail", OnDbError::Fail), ("pass", OnDbError::Pass)],
        );

        let listeners = listeners?;
        let (skip_auth, forward_auth_uri_header, header_prefix, cors) = edge?;
        Some(Settings {
            listen: listeners.listen,
            admin_listen: listeners.admin_listen,
            admin_token: listeners.admin_token,
            upstream: upstream?,
            upstream_connect_timeout: upstream_connect_timeout?,
            upstream_timeout: upstream_timeout?,
            trusted_proxies: crate::http::forwarded::TrustedProxies::new(blocks),
            websocket_max_lifetime: websocket_max_lifetime?,
            issuers: issuers?,
            issuer_ca_pem: issuer_ca_pem?,
            idp_timeout: idp_timeout?,
            key_cache: key_cache?,
            verify: verify?,
            token_cache: crate::provision::CacheBudget {
                bytes: cache_bytes? / 100 * 56,
                entries: token_cache_size?,
            },
            skip_auth,
            forward_auth_uri_header,
            header_prefix,
            cors,
            database_url: database_url?,
            database_max_connections: database_max_connections?,
            database_statement_cache: database_statement_cache?,
            database_timeout: database_timeout?,
            worker_threads: worker_threads?,
            log_format: log_format?,
            log_level: log_level?,
            trace: trace?,
            shutdown_timeout: listeners.shutdown_timeout,
            header_read_timeout: listeners.header_read_timeout,
            migrate: migrate?,
            policy: policy?,
            sync: {
                let mut sync = sync?;
                sync.write_timeout = database_timeout?;
                sync
            },
            on_db_error: on_db_error?,
            logout_retention: logout_retention?,
        })
    }

    fn listeners(&self, p: &mut Problems) -> Option<Listeners> {
        let listen = p.addr("--listen", &self.listen);
        let admin_listen = p.addr("--admin-listen", &self.admin_listen);
        let admin_token = match &self.admin_token_file {
            None => Some(None),
            Some(path) => p
                .take(
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
                .map(Some),
        };
        if let Some(addr) = &admin_listen
            && !is_loopback(addr)
            && self.admin_token_file.is_none()
        {
            p.push(format!(
                "--admin-listen: {addr} is not a loopback address, so the admin API needs --admin-token-file (or listen on 127.0.0.1)"
            ));
        }
        let header_read_timeout = p.duration("--header-read-timeout", &self.header_read_timeout);
        let shutdown_timeout = p.duration("--shutdown-timeout", &self.shutdown_timeout);
        Some(Listeners {
            listen: listen?,
            admin_listen: admin_listen?,
            admin_token: admin_token?,
            header_read_timeout: header_read_timeout?,
            shutdown_timeout: shutdown_timeout?,
        })
    }

    /// Trace export: the flag, else the standard OpenTelemetry variables (read here, once).
    fn trace(&self, p: &mut Problems) -> Option<Option<crate::telemetry::trace::TraceSettings>> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let disabled =
            env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let base = |u: &str| format!("{}/v1/traces", u.trim_end_matches('/'));
        let (endpoint, from) = match (
            &self.otlp_endpoint,
            env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            env("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(u), _, _) => (base(u), "--otlp-endpoint"),
            (None, Some(u), _) => (u, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            (None, None, Some(u)) => (base(&u), "OTEL_EXPORTER_OTLP_ENDPOINT"),
            (None, None, None) => return Some(None),
        };
        if disabled && self.otlp_endpoint.is_none() {
            return Some(None);
        }
        let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
        if let Some(proto) = protocol.filter(|v| v != "http/protobuf") {
            p.push(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={proto}: idsync exports OTLP over HTTP with protobuf only (http/protobuf, port 4318 on a collector)"
            ));
            return None;
        }
        let endpoint = p.take(
            from,
            Url::parse(&endpoint)
                .map_err(|e| format!("`{endpoint}`: {e}"))
                .and_then(|u| match u.scheme() {
                    "http" | "https" if u.host().is_some() => Ok(u.to_string()),
                    _ => Err(format!("`{endpoint}`: must be an http:// or https:// URL")),
                }),
        )?;
        let service_name = self
            .otel_service_name
            .clone()
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| "idsync".into());
        Some(Some(crate::telemetry::trace::TraceSettings {
            endpoint,
            service_name,
        }))
    }

    /// The upstream URL, validated here once: `http://` with a host (the app runs next to idsync).
    fn upstream(&self, p: &mut Problems) -> Option<Url> {
        let Some(raw) = &self.upstream else {
            p.push(
                "--upstream: required (the app behind idsync, e.g. http://127.0.0.1:3000)".into(),
            );
            return None;
        };
        p.take(
            "--upstream",
            Url::parse(raw)
                .map_err(|e| format!("`{raw}`: {e}"))
                .and_then(|u| {
                    if u.scheme() != "http" && u.scheme() != "h2c" {
                        Err("must be an http:// or h2c:// URL (the app runs next to idsync)".into())
                    } else if u.host().is_none() {
                        Err("has no host".into())
                    } else if u.query().is_some() || u.fragment().is_some() {
                        Err("must not have a query or a fragment".into())
                    } else {
                        Ok(u)
                    }
                }),
        )
    }

    fn issuers(&self, p: &mut Problems) -> Option<Vec<IssuerSpec>> {
        let tenant_claim = p.take("--tenant-claim", ClaimPath::new(self.tenant_claim.clone()));
        let roles_claim = p.take("--roles-claim", ClaimPath::new(self.roles_claim.clone()));
        if self.issuers.is_empty() {
            p.push("--issuer: at least one is required (e.g. --issuer https://sso.example.com/realms/acme)".into());
        }
        let (tenant_claim, roles_claim) = (tenant_claim?, roles_claim?);
        let mut issuers: Vec<IssuerSpec> = Vec::new();
        for spec in &self.issuers {
            match parse_issuer(
                spec,
                self.allow_insecure_issuers,
                &tenant_claim,
                &roles_claim,
            ) {
                Ok(i) if issuers.iter().any(|x| x.issuer == i.issuer) => {
                    p.push(format!("--issuer: `{}` is configured twice", i.issuer));
                }
                // A webhook is routed to the issuer whose secret verifies it: a shared secret would let
                // one IdP's events change another's rows.
                Ok(i)
                    if i.webhook_secret.as_ref().is_some_and(|s| {
                        issuers.iter().any(|x| {
                            x.webhook_secret
                                .as_ref()
                                .is_some_and(|o| o.expose() == s.expose())
                        })
                    }) =>
                {
                    p.push(format!(
                        "--issuer `{}`: its webhook-secret-file holds the same secret as another issuer's; give each issuer its own",
                        i.issuer
                    ));
                }
                Ok(i) => issuers.push(i),
                Err(errs) => {
                    for e in errs {
                        p.push(format!("--issuer `{spec}`: {e}"));
                    }
                }
            }
        }
        Some(issuers)
    }

    fn key_cache(&self, p: &mut Problems) -> Option<KeyCacheOptions> {
        let refresh_interval = p.duration("--jwks-refresh-interval", &self.jwks_refresh_interval);
        let refetch_cooldown = p.duration("--jwks-refetch-cooldown", &self.jwks_refetch_cooldown);
        let max_stale = p.duration("--jwks-max-stale", &self.jwks_max_stale);
        let file_poll = p.duration("--key-file-poll", &self.key_file_poll);
        Some(KeyCacheOptions {
            refresh_interval: refresh_interval?,
            refetch_cooldown: refetch_cooldown?,
            max_stale: max_stale?,
            file_poll: file_poll?,
        })
    }

    fn verify(&self, p: &mut Problems) -> Option<VerifyOptions> {
        let leeway = p.duration("--leeway", &self.leeway);
        let max_token_bytes = p.number(
            "--max-token-bytes",
            &self.max_token_bytes,
            256..=1024 * 1024,
        );
        Some(VerifyOptions {
            leeway_secs: leeway?.as_secs() as i64,
            max_token_bytes: max_token_bytes?,
        })
    }

    /// Skip-auth prefixes, the forward-auth URI header, the header prefix and CORS.
    #[allow(clippy::type_complexity)]
    fn edge(
        &self,
        p: &mut Problems,
    ) -> Option<(Vec<String>, Option<http::HeaderName>, String, CorsPolicy)> {
        use crate::http::paths::{RequestPath, canonical};
        let mut skip_auth = Vec::new();
        for prefix in &self.skip_auth {
            match canonical(prefix) {
                Ok(RequestPath::Clean(c)) if c == "/" => p.push(format!(
                    "--skip-auth: `{prefix}` would make every path public"
                )),
                Ok(RequestPath::Clean(c)) if c.trim_end_matches('/') == prefix.trim_end_matches('/') => {
                    skip_auth.push(c)
                }
                Ok(_) => p.push(format!(
                    "--skip-auth: `{prefix}` is not a plain path (no `..`, `.`, `;`, `//`, `\\` or percent-encoding)"
                )),
                Err(e) => p.push(format!("--skip-auth: `{prefix}`: {e}")),
            }
        }
        let names = p.take(
            "--header-prefix",
            crate::http::headers::HeaderNames::new(&self.header_prefix)
                .map_err(|e| format!("`{}`: {e}", self.header_prefix)),
        );
        let forward_auth_uri_header = match &self.forward_auth_uri_header {
            None => Some(None),
            Some(raw) => p
                .take(
                    "--forward-auth-uri-header",
                    http::HeaderName::try_from(raw.as_str())
                        .map_err(|_| format!("`{raw}` is not a header name"))
                        .and_then(|h| match &names {
                            Some(n) if n.owns(h.as_str()) => {
                                Err(format!("`{raw}` is a header idsync owns"))
                            }
                            _ => Ok(h),
                        }),
                )
                .map(Some),
        };
        let cors = p
            .duration("--cors-max-age", &self.cors_max_age)
            .and_then(|max_age| {
                p.take(
                    "--cors-allow-origin",
                    CorsPolicy::new(&self.cors_allow_origin, &self.cors_allow_headers, max_age),
                )
            });
        Some((
            skip_auth,
            forward_auth_uri_header?,
            self.header_prefix.clone(),
            cors?,
        ))
    }

    fn policy(&self, p: &mut Problems) -> Option<TenantPolicy> {
        let roles = p.extend(
            RoleMap::new(&self.app_roles, &self.role_map, &self.default_role).map_err(|errors| {
                errors
                    .into_iter()
                    .map(|e| {
                        let flag = match e {
                            RoleMapError::NoAppRoles => "--app-roles",
                            RoleMapError::MappedToUnknown { .. } | RoleMapError::NotAMapping(_) => {
                                "--role-map"
                            }
                            RoleMapError::UnknownDefault { .. } => "--default-role",
                        };
                        format!("{flag}: {e}")
                    })
                    .collect()
            }),
        );
        let missing = p.take(
            "--missing-tenant",
            MissingTenant::parse(&self.missing_tenant),
        );
        Some(TenantPolicy {
            missing: missing?,
            roles: roles?,
        })
    }

    fn sync(
        &self,
        database: Option<&DatabaseUrl>,
        cache_bytes: Option<u64>,
        p: &mut Problems,
    ) -> Option<SyncOptions> {
        let last_seen_interval = p.duration("--last-seen-interval", &self.last_seen_interval);
        let cache_size = p.number("--sync-cache-size", &self.sync_cache_size, 0..=u64::MAX);
        let cache_ttl = p.duration("--sync-cache-ttl", &self.sync_cache_ttl);
        if let Some(template) = &self.tenant_schema {
            if database.is_some_and(DatabaseUrl::is_sqlite) {
                p.push("--tenant-schema: schemas per tenant need PostgreSQL; SQLite has no schemas (remove the flag or use a postgres:// --database-url)".into());
            } else {
                p.take(
                    "--tenant-schema",
                    crate::provision::naming::schema_name(template, "example", "example")
                        .map(|_| ()),
                );
            }
        }
        Some(SyncOptions {
            tenant_schema: self.tenant_schema.clone(),
            cache: crate::provision::CacheBudget {
                bytes: cache_bytes? / 100 * 36,
                entries: cache_size?,
            },
            cache_ttl: cache_ttl?,
            last_seen_interval: last_seen_interval?,
            // Set from --database-timeout when the settings are assembled.
            write_timeout: Duration::from_secs(3),
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

pub fn parse_issuer(
    spec: &str,
    allow_insecure: bool,
    tenant: &ClaimPath,
    roles: &ClaimPath,
) -> Result<IssuerSpec, Vec<String>> {
    let mut errors = Vec::new();
    let mut parts = spec.split(',').map(str::trim);
    let raw_url = parts.next().unwrap_or_default();
    let url = check_fetch_url("issuer URL", raw_url, allow_insecure)
        .map_err(|e| errors.push(e))
        .ok();
    let mut dialect = None;
    let mut audiences = Vec::new();
    let mut authorized_parties = Vec::new();
    let mut require_typ = None;
    let mut id_prefix = None;
    let mut logout_audiences = Vec::new();
    let mut webhook_secret = None;
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
            "authorized-party" | "azp" => authorized_parties.push(v.to_owned()),
            "logout-audience" => logout_audiences.push(v.to_owned()),
            "id-prefix" => {
                if v.is_empty() || v.len() > 64 || v.chars().any(|c| c.is_control()) {
                    errors.push(format!("id-prefix `{v}` must be 1-64 printable characters"));
                } else {
                    id_prefix = Some(v.to_owned());
                }
            }
            "webhook-secret-file" => match std::fs::read(v) {
                Ok(bytes) => {
                    let secret = bytes.trim_ascii().to_vec();
                    if secret.len() < 16 {
                        errors.push(format!(
                            "webhook-secret-file {v}: the secret must be at least 16 bytes"
                        ));
                    } else {
                        webhook_secret = Some(crate::access::WebhookSecret::new(secret));
                    }
                }
                Err(e) => errors.push(format!("webhook-secret-file {v}: {e}")),
            },
            "typ" => match v.strip_prefix("application/").unwrap_or(v) {
                t if t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("JWT") => {
                    require_typ = Some(t.to_owned())
                }
                _ => errors.push(format!("typ `{v}` is not at+jwt or JWT")),
            },
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
            other => errors.push(format!("unknown option `{other}` (known: dialect, audience, authorized-party, typ, jwks-uri, key-file, tenant-claim, roles-claim, id-prefix, logout-audience, webhook-secret-file)")),
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
    Ok(IssuerSpec {
        issuer: raw_url.to_owned(),
        dialect,
        audiences,
        authorized_parties,
        require_typ,
        source,
        tenant_claim,
        roles_claim,
        id_prefix,
        logout_audiences,
        webhook_secret,
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
    use crate::identity::TenantId;
    use clap::Parser;

    /// The serve flags as the binary declares them: the global database flag beside the serve flags.
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        serve: ServeArgs,
    }

    struct Parsed(Flags);

    impl Parsed {
        fn validate(&self) -> Result<Settings, Vec<String>> {
            self.0.serve.validate(&self.0.db)
        }
    }

    fn args(extra: &[&str]) -> Parsed {
        let mut argv = vec!["idsync"];
        argv.extend_from_slice(extra);
        Parsed(Flags::try_parse_from(argv).unwrap())
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
        assert_eq!(s.key_cache.refetch_cooldown, Duration::from_secs(5));
        assert_eq!(s.verify.leeway_secs, 60);
    }

    #[test]
    fn two_issuers_may_not_share_a_webhook_secret() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "one-secret-of-twenty-bytes").unwrap();
        std::fs::write(&b, "one-secret-of-twenty-bytes\n").unwrap();
        let spec = |realm: &str, file: &std::path::Path| {
            format!(
                "https://sso.example.com/realms/{realm},webhook-secret-file={}",
                file.display()
            )
        };
        let errs = args(&[
            "--upstream",
            "http://127.0.0.1:3000",
            "--issuer",
            &spec("a", &a),
            "--issuer",
            &spec("b", &b),
        ])
        .validate()
        .unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("same secret as another issuer")),
            "{errs:?}"
        );
        std::fs::write(&b, "another-secret-of-20-bytes").unwrap();
        assert!(
            args(&[
                "--upstream",
                "http://127.0.0.1:3000",
                "--issuer",
                &spec("a", &a),
                "--issuer",
                &spec("b", &b),
            ])
            .validate()
            .is_ok()
        );
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
            s.policy.missing,
            MissingTenant::Default(TenantId::parse("t", "org-1").unwrap())
        );
        assert_eq!(s.policy.roles.app_role(&["ops".to_string()]), "admin");
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
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_size("512kb").unwrap(), 512 << 10);
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert!(parse_duration("10 minutes").is_err());
    }

    /// `18446744073709551615m` overflowed the multiplication (a panic, or a wrong duration in a release
    /// build), and a duration of `u64::MAX` seconds panicked when the first sync added it to the clock.
    #[test]
    fn durations_past_a_century_are_refused() {
        for raw in [
            "18446744073709551615m",
            "18446744073709551615s",
            "36501d",
            "1000000h",
        ] {
            let e = parse_duration(raw).unwrap_err();
            assert!(e.contains("longer than 100 years"), "{raw}: {e}");
        }
        assert_eq!(
            parse_duration("36500d").unwrap(),
            Duration::from_secs(36500 * 86400)
        );
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
        let cmd = Flags::command();
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
