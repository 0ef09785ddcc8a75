//! Heap bytes per cached identity: `cargo bench --bench memory [-- N]`. A counting allocator measures,
//! exactly and without the allocator's own slack, what N verified tokens (token cache) and N admitted
//! identities (sync cache, last-login bookkeeping, each token's memo of its admission) hold, so a change
//! to either cache shows up as bytes per entry rather than as a noisy RSS figure. The load benchmark's scenario 7 gives the RSS side.

use devkit::unix_now;
use devkit::{LocalIssuer, SigningAlg};
use idsync::access::{
    Gatekeeper, IssuerRegistry, IssuerSpec, MissingTenant, OnDbError, TenantPolicy,
};
use idsync::identity::{ClaimPath, Dialect, RoleMap};
use idsync::oidc::{IdpClient, KeyCacheOptions, KeySource, VerifyOptions};
use idsync::provision::cache::{Bounded, HeapSize};
use idsync::provision::{CacheBudget, Provisioner, SyncOptions};
use serde_json::json;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::time::Duration;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
/// What idsync's allocator (mimalloc, `src/main.rs`) takes for the same requests: no header, each
/// request rounded up to its size class (multiples of 8 bytes up to 64, then four classes per doubling).
/// Closer to RSS than the requested bytes, without its noise.
static CHUNKS: AtomicIsize = AtomicIsize::new(0);

fn chunk(size: usize) -> isize {
    let size = size.max(8);
    let rounded = if size <= 64 {
        size.div_ceil(8) * 8
    } else {
        let step = (1usize << (usize::BITS - 1 - (size - 1).leading_zeros())) / 4;
        size.div_ceil(step) * step
    };
    rounded as isize
}

// SAFETY: forwards to the system allocator unchanged; only counts the sizes it was asked for.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Relaxed);
        CHUNKS.fetch_add(chunk(l.size()), Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Relaxed);
        CHUNKS.fetch_sub(chunk(l.size()), Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Relaxed);
        CHUNKS.fetch_add(chunk(new) - chunk(l.size()), Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// A value of no size, to measure a cache's own cost per entry.
struct Empty;

impl HeapSize for Empty {
    fn heap_size(&self) -> usize {
        0
    }
}

fn live() -> isize {
    LIVE.load(Relaxed)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap();
    let issuer = LocalIssuer::start("/realms/bench", SigningAlg::ES256)
        .await
        .unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, issuer.jwks_document().to_string()).unwrap();
    let registry = IssuerRegistry::new(
        &[IssuerSpec {
            issuer: issuer.issuer().into(),
            dialect: Dialect::Keycloak,
            audiences: vec![],
            authorized_parties: vec![],
            require_typ: None,
            source: KeySource::File(path),
            tenant_claim: ClaimPath::new("tenant_id").unwrap(),
            roles_claim: ClaimPath::new("roles").unwrap(),
            id_prefix: None,
            logout_audiences: vec![],
            webhook_secret: None,
        }],
        &IdpClient::new(None, Duration::from_secs(5)).unwrap(),
        &KeyCacheOptions {
            refresh_interval: Duration::from_secs(600),
            refetch_cooldown: Duration::from_secs(30),
            max_stale: Duration::from_secs(86400),
            file_poll: Duration::from_secs(5),
        },
        VerifyOptions {
            leeway_secs: 60,
            max_token_bytes: 16384,
        },
        None,
    );
    for i in registry.iter() {
        i.keys().load_now().await.unwrap();
    }
    let registry = Arc::new(registry);
    // The load benchmark's token shape: a Keycloak access token with a tenant, an email, a username and
    // one role.
    let tokens: Vec<String> = (0..n)
        .map(|u| {
            let mut c = issuer.claims_for(&format!("user-{u}"));
            c["exp"] = json!(unix_now() + 3600);
            c["tenant_id"] = json!(format!("tenant-{}", u % 50));
            c["email"] = json!(format!("user-{u}@example.com"));
            c["preferred_username"] = json!(format!("user-{u}"));
            c["realm_access"] = json!({"roles": ["member"]});
            issuer.mint(c)
        })
        .collect();

    // The cache itself: what one entry costs before any payload, in idsync's cache (quick_cache) and in
    // moka (what idsync used before; kept here as the measured comparison).
    let key = |i: usize| {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&(i as u64).to_le_bytes());
        k
    };
    let bare = live();
    let probe: Bounded<[u8; 16], Arc<Empty>> = Bounded::new(CacheBudget {
        bytes: 1 << 30,
        entries: n as u64 * 2,
    });
    let empty = Arc::new(Empty);
    for i in 0..n {
        probe.insert(key(i), empty.clone());
    }
    let quick_entry = (live() - bare) as f64 / n as f64;
    drop(probe);
    let bare = live();
    let moka: moka::future::Cache<[u8; 16], ()> = moka::future::Cache::builder()
        .max_capacity(n as u64 * 2)
        .time_to_live(Duration::from_secs(300))
        .build();
    for i in 0..n {
        moka.insert(key(i), ()).await;
    }
    moka.run_pending_tasks().await;
    let moka_entry = (live() - bare) as f64 / n as f64;
    drop(moka);

    let auth = gatekeeper(registry.clone(), dir.path(), "load-shape", n).await;
    let [start, after_tokens, after_sync, settled] = measure(&auth, &tokens).await;
    drop(auth);
    // A Keycloak 26 access token as Keycloak issues it (../shared/claims): a UUID subject, a session id,
    // the full profile, an organization with its alias, realm and client roles.
    let keycloak: Vec<String> = (0..n)
        .map(|u| {
            let mut c = issuer.claims_for(&format!("{:08x}-5de5-4449-9f8d-bb4d9ca3c76f", u));
            let obj = c.as_object_mut().unwrap();
            obj.remove("tenant_id");
            for (k, v) in json!({
                "exp": unix_now() + 3600, "auth_time": unix_now(), "aud": "account",
                "jti": format!("onrtac:{u:08x}-5de5-4449-9f8d-bb4d9ca3c76f"),
                "sid": format!("{u:08x}-7ed3-402e-b696-573986f92049"), "acr": "1",
                "allowed-origins": ["https://app.example.com"],
                "realm_access": {"roles": ["default-roles-acme", "offline_access", "uma_authorization", "admin"]},
                "resource_access": {"web-app": {"roles": ["editor"]}, "account": {"roles": ["manage-account", "view-profile"]}},
                "scope": "openid email profile organization", "email_verified": true,
                "name": format!("Grace Turing {u}"), "preferred_username": format!("grace.turing.{u}"),
                "given_name": "Grace", "family_name": format!("Turing {u}"),
                "email": format!("grace.turing.{u}@example.com"),
                "organization": {format!("org-{}", u % 50): {"id": format!("38394337-9aff-503a-b737-{:012x}", u % 50)}},
            })
            .as_object()
            .unwrap()
            {
                obj.insert(k.clone(), v.clone());
            }
            issuer.mint(c)
        })
        .collect();
    let auth = gatekeeper(registry, dir.path(), "keycloak-shape", n).await;
    let [k_start, _, _, k_settled] = measure(&auth, &keycloak).await;
    let per = |b: isize| b as f64 / n as f64;
    let line = |what: &str, (a, b): (isize, isize), (c, d): (isize, isize)| {
        println!(
            "  {what:<44} {:>7.0} requested {:>7.0} in size classes",
            per(a - c),
            per(b - d)
        );
    };
    println!(
        "{n} identities, heap bytes per identity: as requested, and in mimalloc's size classes (idsync's allocator)"
    );
    println!(
        "  one bare cache entry (16-byte key, no value): idsync's (quick_cache) {quick_entry:.0} bytes, moka {moka_entry:.0} bytes"
    );
    line(
        "token cache (verified token -> identity)",
        after_tokens,
        start,
    );
    line("sync cache, last-login", after_sync, after_tokens);
    line("all, after housekeeping", settled, start);
    line("all, a Keycloak 26 token as issued", k_settled, k_start);
    println!(
        "  100,000 identities: {:.1} MiB requested, {:.1} MiB in size classes",
        per(settled.0 - start.0) * 100_000.0 / 1_048_576.0,
        per(settled.1 - start.1) * 100_000.0 / 1_048_576.0
    );
}

/// A gatekeeper with caches large enough for `n` identities, over its own SQLite file.
async fn gatekeeper(
    registry: Arc<IssuerRegistry>,
    dir: &std::path::Path,
    name: &str,
    n: usize,
) -> Gatekeeper {
    let db_url = format!("sqlite://{}/{name}.db?mode=rwc", dir.display());
    let mut opts = sea_orm::ConnectOptions::new(db_url);
    opts.max_connections(1).sqlx_logging(false);
    let db = sea_orm::Database::connect(opts).await.unwrap();
    // A file, not `:memory:`, so rows are not counted as cache; durability is irrelevant to this probe.
    sea_orm::ConnectionTrait::execute_unprepared(&db, "PRAGMA synchronous = OFF")
        .await
        .unwrap();
    <migration::Migrator as migration::MigratorTrait>::up(&db, None)
        .await
        .unwrap();
    let app_roles: Vec<String> = ["admin", "member", "viewer"].map(String::from).to_vec();
    let tenant_policy = TenantPolicy {
        missing: MissingTenant::Reject,
        roles: RoleMap::new(&app_roles, &[], "member").unwrap(),
    };
    let provisioner = Arc::new(Provisioner::new(
        db,
        SyncOptions {
            tenant_schema: None,
            cache: CacheBudget {
                bytes: 1 << 30,
                entries: n as u64 * 2,
            },
            cache_ttl: Duration::from_secs(300),
            last_seen_interval: Duration::from_secs(300),
            write_timeout: Duration::from_secs(3),
        },
    ));
    Gatekeeper::new(
        registry,
        CacheBudget {
            bytes: 1 << 40,
            entries: n as u64 * 2,
        },
        tenant_policy,
        provisioner.clone(),
        OnDbError::Fail,
    )
}

/// The heap a gatekeeper holds for `tokens` (requested bytes, size-class bytes): before, after verifying
/// them, after admitting them (sync cache, last-login bookkeeping, memos), and once deferred work settled.
async fn measure(auth: &Gatekeeper, tokens: &[String]) -> [(isize, isize); 4] {
    let snap = || (live(), CHUNKS.load(Relaxed));
    let start = snap();
    let mut identities = Vec::with_capacity(tokens.len());
    for t in tokens {
        identities.push(auth.authenticate(t, unix_now()).await.unwrap());
    }
    let held_by_vec = (identities.capacity() * std::mem::size_of::<usize>()) as isize;
    let minus_vec = |(a, b): (isize, isize)| (a - held_by_vec, b - chunk(held_by_vec as usize));
    let after_tokens = minus_vec(snap());
    // The rest of a first request, as the proxy makes it: the decision, the sync (sync cache, last-login
    // bookkeeping) and the token's memo of its admission.
    for t in tokens {
        drop(auth.admit(t, None, unix_now()).await.unwrap());
    }
    let after_sync = minus_vec(snap());
    // Give any deferred work a chance, then measure again: what stays is what is held.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for t in tokens.iter().take(10) {
        auth.authenticate(t, unix_now()).await.unwrap();
    }
    let settled = minus_vec(snap());
    drop(identities);
    [start, after_tokens, after_sync, settled]
}
