//! `idsync reconcile` against local stand-ins of Keycloak's Admin REST API and Frontegg's vendor API that
//! follow their documented request and response shapes (tokens, paging, rate limits), with rows first
//! made the real way: users sending tokens through the sidecar.

use crate::db::TestDb;
use crate::helpers::{TestApp, app};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use entity::{audit_events, memberships, organizations, users};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

on_both_databases!(
    keycloak_reconcile_reads_everything_then_makes_rows_agree,
    frontegg_reconcile_follows_tenants_users_and_rate_limits,
    upgrade_gives_old_rows_their_origin,
);

const SECRET: &str = "reconcile-client-secret";

// ---------------------------------------------------------------------------------------------------
// Database views

/// Every row idsync holds, as comparable text: (users, organizations, memberships).
async fn rows(conn: &DatabaseConnection) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut u: Vec<String> = users::Entity::find()
        .all(conn)
        .await
        .unwrap()
        .into_iter()
        .map(|u| format!("{} {:?} {}", u.id, u.name, u.is_active))
        .collect();
    let mut o: Vec<String> = organizations::Entity::find()
        .all(conn)
        .await
        .unwrap()
        .into_iter()
        .map(|o| format!("{} {} {}", o.id, o.name, o.is_active))
        .collect();
    let mut m: Vec<String> = memberships::Entity::find()
        .all(conn)
        .await
        .unwrap()
        .into_iter()
        .map(|m| {
            format!(
                "{}@{} {} {}",
                m.user_id, m.organization_id, m.role, m.is_active
            )
        })
        .collect();
    u.sort();
    o.sort();
    m.sort();
    (u, o, m)
}

async fn user_active(conn: &DatabaseConnection, id: &str) -> (bool, Option<String>) {
    let u = users::Entity::find_by_id(id.to_owned())
        .one(conn)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("user {id} exists"));
    (u.is_active, u.deactivated_by)
}

async fn org_row(conn: &DatabaseConnection, id: &str) -> organizations::Model {
    organizations::Entity::find_by_id(id.to_owned())
        .one(conn)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("organization {id} exists"))
}

async fn membership(conn: &DatabaseConnection, u: &str, t: &str) -> Option<memberships::Model> {
    memberships::Entity::find_by_id((u.to_owned(), t.to_owned()))
        .one(conn)
        .await
        .unwrap()
}

async fn audit_actors(conn: &DatabaseConnection) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in audit_events::Entity::find()
        .filter(audit_events::Column::Actor.starts_with("reconcile"))
        .all(conn)
        .await
        .unwrap()
    {
        *out.entry(format!("{} {}", e.actor, e.kind)).or_default() += 1;
    }
    out
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn reconcile(db: &TestDb, dir: &std::path::Path, args: &[&str]) -> Run {
    let secret = dir.join("reconcile-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .arg("reconcile")
        .args(args)
        .args(["--client-id", "idsync-reconcile", "--secret-file"])
        .arg(&secret)
        .args(["--page-size", "2", "--database-url", &db.url])
        .output()
        .await
        .unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "reconcile {args:?} -> {}\n{}{}",
        run.code, run.stdout, run.stderr
    );
    run
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

fn bearer_ok(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {token}"))
}

/// Sends `token` through the sidecar: the user, organizations and memberships are created as in real use.
async fn sign_in(t: &TestApp, token: &str) {
    let r = t.get_with_token("/", token).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// Polls until `token` is refused (403) on `t`, up to `within`.
async fn refused_within(t: &TestApp, token: &str, within: Duration) {
    let start = Instant::now();
    loop {
        let s = t.get_with_token("/", token).await.status();
        if s == 403 {
            return;
        }
        assert!(start.elapsed() < within, "still {s} after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------------
// Keycloak

#[derive(Default)]
struct Keycloak {
    /// The listing (`GET /users`) leaves service accounts out; `by_id` has them too.
    users: Vec<Value>,
    service_accounts: Vec<Value>,
    /// (organization, members' ids)
    organizations: Vec<(Value, Vec<String>)>,
    issued: usize,
    /// Answer this many token requests with 503 first.
    token_failures: usize,
    /// Answer 429 (with Retry-After) to the next request for this listing offset of `users`.
    throttle_users_at: Option<usize>,
    throttled: usize,
    /// Always answer 500 for this organization's members.
    broken_members_of: Option<String>,
    requests: Vec<String>,
}

type Kc = Arc<Mutex<Keycloak>>;

fn kc_token_ok(kc: &Keycloak, headers: &HeaderMap) -> bool {
    (1..=kc.issued).any(|n| bearer_ok(headers, &format!("kc-token-{n}")))
}

/// `first`/`max` paging over `items`, as Keycloak's admin endpoints do.
fn kc_page(items: &[Value], q: &HashMap<String, String>) -> Vec<Value> {
    let first: usize = q.get("first").and_then(|v| v.parse().ok()).unwrap_or(0);
    let max: usize = q.get("max").and_then(|v| v.parse().ok()).unwrap_or(100);
    items.iter().skip(first).take(max).cloned().collect()
}

fn keycloak_router(state: Kc) -> Router {
    async fn token(
        State(kc): State<Kc>,
        Path(realm): Path<String>,
        axum::Form(form): axum::Form<HashMap<String, String>>,
    ) -> Response {
        let mut kc = kc.lock().unwrap();
        kc.requests.push(format!("token {realm}"));
        if kc.token_failures > 0 {
            kc.token_failures -= 1;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        if form.get("grant_type").map(String::as_str) != Some("client_credentials")
            || form.get("client_id").map(String::as_str) != Some("idsync-reconcile")
            || form.get("client_secret").map(String::as_str) != Some(SECRET)
        {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "unauthorized_client"})),
            )
                .into_response();
        }
        kc.issued += 1;
        Json(json!({"access_token": format!("kc-token-{}", kc.issued), "expires_in": 300, "token_type": "Bearer"}))
            .into_response()
    }
    async fn users(
        State(kc): State<Kc>,
        headers: HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> Response {
        let mut kc = kc.lock().unwrap();
        kc.requests.push(format!("users {q:?}"));
        if !kc_token_ok(&kc, &headers) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let first = q.get("first").cloned().unwrap_or_default();
        if kc.throttle_users_at.map(|n| n.to_string()) == Some(first) {
            kc.throttle_users_at = None;
            kc.throttled += 1;
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response();
        }
        Json(kc_page(&kc.users, &q)).into_response()
    }
    async fn user(
        State(kc): State<Kc>,
        headers: HeaderMap,
        Path((_realm, id)): Path<(String, String)>,
    ) -> Response {
        let mut kc = kc.lock().unwrap();
        kc.requests.push(format!("user {id}"));
        if !kc_token_ok(&kc, &headers) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        match kc
            .users
            .iter()
            .chain(&kc.service_accounts)
            .find(|u| u["id"] == id)
        {
            Some(u) => Json(u.clone()).into_response(),
            None => (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "User not found"})),
            )
                .into_response(),
        }
    }
    async fn organizations(
        State(kc): State<Kc>,
        headers: HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> Response {
        let mut kc = kc.lock().unwrap();
        kc.requests.push(format!("organizations {q:?}"));
        if !kc_token_ok(&kc, &headers) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let all: Vec<Value> = kc.organizations.iter().map(|(o, _)| o.clone()).collect();
        Json(kc_page(&all, &q)).into_response()
    }
    async fn members(
        State(kc): State<Kc>,
        headers: HeaderMap,
        Path((_realm, id)): Path<(String, String)>,
        Query(q): Query<HashMap<String, String>>,
    ) -> Response {
        let mut kc = kc.lock().unwrap();
        kc.requests.push(format!("members {id}"));
        if !kc_token_ok(&kc, &headers) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        if kc.broken_members_of.as_deref() == Some(id.as_str()) {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        let Some((_, ids)) = kc.organizations.iter().find(|(o, _)| o["id"] == id) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let members: Vec<Value> = ids
            .iter()
            .filter_map(|m| kc.users.iter().find(|u| u["id"] == m.as_str()))
            .map(|u| {
                let mut u = u.clone();
                u["membershipType"] = json!("MANAGED");
                u
            })
            .collect();
        Json(kc_page(&members, &q)).into_response()
    }
    Router::new()
        .route("/realms/{realm}/protocol/openid-connect/token", post(token))
        .route("/admin/realms/{realm}/users", get(users))
        .route("/admin/realms/{realm}/users/{id}", get(user))
        .route("/admin/realms/{realm}/organizations", get(organizations))
        .route(
            "/admin/realms/{realm}/organizations/{id}/members",
            get(members),
        )
        .with_state(state)
}

fn kc_user(id: &str, first: &str, enabled: bool) -> Value {
    json!({"id": id, "username": id, "email": format!("{id}@example.com"), "firstName": first,
           "lastName": "Example", "enabled": enabled, "emailVerified": true, "createdTimestamp": 1})
}

fn kc_token(t: &TestApp, sub: &str, orgs: &[(&str, &str)]) -> String {
    let mut c = t.issuer.claims_for(sub);
    c.as_object_mut().unwrap().remove("tenant_id");
    let orgs: serde_json::Map<String, Value> = orgs
        .iter()
        .map(|(alias, id)| ((*alias).to_owned(), json!({"id": id})))
        .collect();
    c["organization"] = Value::Object(orgs);
    t.issuer.mint(c)
}

async fn keycloak_reconcile_reads_everything_then_makes_rows_agree(db: TestDb) {
    let t = app()
        .database(&db.url)
        .arg("--missing-tenant")
        .arg("personal")
        .start()
        .await;
    let conn = db.connect().await;
    // What idsync learned from tokens: seven users, two organizations, and the service account's
    // personal organization, which the IdP never had.
    let tokens: HashMap<&str, String> = [
        ("alice", kc_token(&t, "alice", &[("acme", "o-1")])),
        (
            "bob",
            kc_token(&t, "bob", &[("acme", "o-1"), ("globex", "o-2")]),
        ),
        ("carol", kc_token(&t, "carol", &[("globex", "o-2")])),
        ("dave", kc_token(&t, "dave", &[("acme", "o-1")])),
        ("erin", kc_token(&t, "erin", &[("acme", "o-1")])),
        ("svc", kc_token(&t, "svc", &[])),
        ("henry", kc_token(&t, "henry", &[("acme", "o-1")])),
    ]
    .into_iter()
    .collect();
    for token in tokens.values() {
        sign_in(&t, token).await;
    }
    // Bob works in both of his organizations.
    let r = t
        .http
        .get(t.url("/"))
        .bearer_auth(&tokens["bob"])
        .header("x-tenant-id", "o-2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(membership(&conn, "bob", "o-2").await.is_some());
    assert!(membership(&conn, "bob", "o-1").await.is_some());
    // An operator deactivated henry; the IdP still has him enabled: the operator's word stands.
    let (s, _) = t
        .admin(reqwest::Method::POST, "/users/henry/deactivate", None)
        .await;
    assert_eq!(s, 200);

    // The IdP now: carol renamed, dave disabled, erin deleted, frank new, globex gone, initech new,
    // bob moved from acme to initech; the service account is only found by id.
    let kc: Kc = Arc::new(Mutex::new(Keycloak {
        users: vec![
            kc_user("alice", "Alice", true),
            kc_user("bob", "Bob", true),
            kc_user("carol", "Caroline", true),
            kc_user("dave", "Dave", false),
            kc_user("frank", "Frank", true),
            kc_user("henry", "Henry", true),
        ],
        service_accounts: vec![
            json!({"id": "svc", "username": "service-account-app", "enabled": true,
                                      "serviceAccountClientId": "app"}),
        ],
        organizations: vec![
            (
                json!({"id": "o-1", "name": "Acme Inc", "alias": "acme", "enabled": true}),
                vec!["alice".into(), "dave".into(), "henry".into()],
            ),
            (
                json!({"id": "o-3", "name": "Initech", "alias": "initech", "enabled": true}),
                vec!["bob".into(), "frank".into()],
            ),
        ],
        throttle_users_at: Some(2),
        broken_members_of: Some("o-3".into()),
        ..Keycloak::default()
    }));
    let admin = serve(keycloak_router(kc.clone())).await;
    let issuer = t.issuer.issuer().to_owned();
    let dir = t.dir.path();
    let base = ["--issuer", &issuer, "--admin-url", &admin];
    let before = rows(&conn).await;

    // A page that keeps failing: the run stops, says so, and changes nothing.
    let run = reconcile(&db, dir, &base).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("nothing was changed") && run.stderr.contains("o-3/members"),
        "{}",
        run.stderr
    );
    assert_eq!(rows(&conn).await, before, "a failed read changes nothing");
    assert_eq!(
        kc.lock().unwrap().throttled,
        1,
        "the 429 was answered with a retry"
    );
    kc.lock().unwrap().broken_members_of = None;

    // Dry run: the diff, nothing written.
    let mut args = base.to_vec();
    args.push("--dry-run");
    let run = reconcile(&db, dir, &args).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    for line in [
        "dry run: nothing was changed",
        "deactivate user dave",
        "deactivate user erin",
        "create user frank",
        "create organization o-3 (initech)",
        "deactivate organization o-2",
        "deactivate membership bob in o-1",
        "deactivate membership bob in o-2",
        "deactivate membership carol in o-2",
        "deactivate membership erin in o-1",
        "add membership bob in o-3 as member",
        "add membership frank in o-3 as member",
    ] {
        assert!(
            run.stdout.contains(line),
            "`{line}` missing:\n{}",
            run.stdout
        );
    }
    for absent in ["user svc", "user henry", "user alice", "membership alice"] {
        assert!(
            !run.stdout
                .lines()
                .any(|l| l.contains(absent) && !l.contains("update")),
            "`{absent}` must not change:\n{}",
            run.stdout
        );
    }
    assert_eq!(rows(&conn).await, before, "a dry run changes nothing");
    assert!(audit_actors(&conn).await.is_empty());

    // The real run, through a token endpoint that fails once and a rate limit.
    kc.lock().unwrap().throttle_users_at = Some(4);
    kc.lock().unwrap().token_failures = 1;
    let run = reconcile(&db, dir, &base).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("reconciled: read pages"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("retries 2"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("IdP has 7 users, 2 organizations, 5 memberships"),
        "{}",
        run.stdout
    );
    assert_eq!(user_active(&conn, "alice").await, (true, None));
    assert_eq!(user_active(&conn, "bob").await, (true, None));
    assert_eq!(
        user_active(&conn, "svc").await,
        (true, None),
        "confirmed by id"
    );
    assert_eq!(
        user_active(&conn, "dave").await,
        (false, Some("idp".into()))
    );
    assert_eq!(
        user_active(&conn, "erin").await,
        (false, Some("idp".into()))
    );
    assert_eq!(
        user_active(&conn, "henry").await,
        (false, Some("operator".into()))
    );
    assert_eq!(user_active(&conn, "frank").await, (true, None));
    let carol = users::Entity::find_by_id("carol".to_owned())
        .one(&conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(carol.name.as_deref(), Some("Caroline Example"));
    assert_eq!(carol.email.as_deref(), Some("carol@example.com"));
    assert!(!org_row(&conn, "o-2").await.is_active);
    assert!(org_row(&conn, "o-1").await.is_active);
    let personal = organizations::Entity::find()
        .filter(organizations::Column::Origin.eq("idsync"))
        .all(&conn)
        .await
        .unwrap();
    assert_eq!(personal.len(), 1);
    assert!(
        personal[0].is_active,
        "a personal organization is not the IdP's to remove"
    );
    assert!(
        membership(&conn, "svc", &personal[0].id)
            .await
            .unwrap()
            .is_active
    );
    assert_eq!(org_row(&conn, "o-3").await.name, "initech");
    for (u, o, active) in [
        ("alice", "o-1", true),
        ("bob", "o-1", false),
        ("bob", "o-2", false),
        ("carol", "o-2", false),
        ("erin", "o-1", false),
        ("henry", "o-1", true),
        ("bob", "o-3", true),
        ("frank", "o-3", true),
    ] {
        let m = membership(&conn, u, o)
            .await
            .unwrap_or_else(|| panic!("{u}@{o}"));
        assert_eq!(m.is_active, active, "{u}@{o}");
    }
    let audit = audit_actors(&conn).await;
    assert_eq!(
        audit.get("reconcile:keycloak user_deactivated"),
        Some(&2),
        "{audit:?}"
    );
    assert_eq!(
        audit.get("reconcile:keycloak organization_deactivated"),
        Some(&1),
        "{audit:?}"
    );
    {
        let kc = kc.lock().unwrap();
        assert!(
            kc.requests.iter().any(|r| r == "user svc")
                && kc.requests.iter().any(|r| r == "user erin"),
            "users idsync holds but the listing lacks are asked for by id: {:?}",
            kc.requests
        );
        assert!(
            kc.requests.iter().all(|r| !r.starts_with("user alice")),
            "listed users are not asked for again"
        );
    }

    // The running sidecar: on PostgreSQL the change notice reaches it at once; on SQLite (one process)
    // it sees the rows when its cache entry expires, so only the database is checked there.
    if db.is_postgres {
        refused_within(&t, &tokens["erin"], Duration::from_secs(1)).await;
        refused_within(&t, &tokens["dave"], Duration::from_secs(1)).await;
        assert_eq!(t.get_with_token("/", &tokens["alice"]).await.status(), 200);
    }

    // Again, with nothing changed at the IdP: nothing to do. Then dave is enabled again: he comes back,
    // since it was the IdP that disabled him.
    let run = reconcile(&db, dir, &base).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("changes: none"), "{}", run.stdout);
    kc.lock().unwrap().users[3]["enabled"] = json!(true);
    let run = reconcile(&db, dir, &base).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("changes: reactivate user: 1"),
        "{}",
        run.stdout
    );
    assert_eq!(user_active(&conn, "dave").await, (true, None));

    // A database that does not answer: exit 1 (a CronJob retries), not 2 (a configuration error).
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .args(["reconcile", "--issuer", &issuer, "--admin-url", &admin])
        .args(["--client-id", "idsync-reconcile", "--secret-file"])
        .arg(dir.join("reconcile-secret"))
        .args(["--database-url", "postgres://idsync@127.0.0.1:1/none"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Wrong credentials: refused before anything is read.
    std::fs::write(dir.join("wrong"), "nope").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .args(["reconcile", "--issuer", &issuer, "--admin-url", &admin])
        .args(["--client-id", "idsync-reconcile", "--secret-file"])
        .arg(dir.join("wrong"))
        .args(["--database-url", &db.url])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    assert!(!stderr.contains("nope"), "the secret is never printed");
}

// ---------------------------------------------------------------------------------------------------
// Frontegg

#[derive(Default)]
struct Frontegg {
    tenants: Vec<Value>,
    users: Vec<Value>,
    issued: usize,
    /// Answer 429 with `X-Rate-Limit-Reset` to the next request for this page of users.
    throttle_users_page: Option<usize>,
    throttled: usize,
    pages: Vec<String>,
}

type Fe = Arc<Mutex<Frontegg>>;

/// `_limit`/`_offset` paging, where `_offset` is a page index, with `_metadata.totalPages`.
fn fe_page(items: &[Value], q: &HashMap<String, String>) -> Value {
    let limit: usize = q.get("_limit").and_then(|v| v.parse().ok()).unwrap_or(50);
    let page: usize = q.get("_offset").and_then(|v| v.parse().ok()).unwrap_or(0);
    let slice: Vec<Value> = items
        .iter()
        .skip(page * limit)
        .take(limit)
        .cloned()
        .collect();
    json!({"items": slice, "_metadata": {"totalItems": items.len(), "totalPages": items.len().div_ceil(limit)}})
}

fn frontegg_router(state: Fe) -> Router {
    async fn vendor(State(fe): State<Fe>, Json(body): Json<Value>) -> Response {
        let mut fe = fe.lock().unwrap();
        if body["clientId"] != "idsync-reconcile" || body["secret"] != SECRET {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"errors": ["Unauthorized"]})),
            )
                .into_response();
        }
        fe.issued += 1;
        Json(json!({"token": format!("fe-token-{}", fe.issued), "expiresIn": 86400}))
            .into_response()
    }
    fn authorised(fe: &Frontegg, headers: &HeaderMap) -> bool {
        (1..=fe.issued).any(|n| bearer_ok(headers, &format!("fe-token-{n}")))
    }
    async fn tenants(
        State(fe): State<Fe>,
        headers: HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> Response {
        let mut fe = fe.lock().unwrap();
        if !authorised(&fe, &headers) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        fe.pages.push(format!("tenants {}", q["_offset"]));
        Json(fe_page(&fe.tenants, &q)).into_response()
    }
    async fn users(
        State(fe): State<Fe>,
        headers: HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> Response {
        let mut fe = fe.lock().unwrap();
        if !authorised(&fe, &headers) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let page: usize = q["_offset"].parse().unwrap();
        if fe.throttle_users_page == Some(page) {
            fe.throttle_users_page = None;
            fe.throttled += 1;
            // Frontegg's gateway: no Retry-After, the window's reset as an RFC 3339 date.
            let reset = (chrono::Utc::now() + chrono::Duration::milliseconds(800)).to_rfc3339();
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("x-rate-limit-reset", reset)],
            )
                .into_response();
        }
        fe.pages.push(format!("users {page}"));
        Json(fe_page(&fe.users, &q)).into_response()
    }
    Router::new()
        .route("/auth/vendor", post(vendor))
        .route("/tenants/resources/tenants/v2", get(tenants))
        .route("/identity/resources/users/v3", get(users))
        .with_state(state)
}

fn fe_user(id: &str, name: &str, tenants: &[(&str, bool)]) -> Value {
    let list: Vec<Value> = tenants
        .iter()
        .map(|(t, disabled)| json!({"tenantId": t, "isDisabled": disabled}))
        .collect();
    let ids: Vec<&str> = tenants.iter().map(|(t, _)| *t).collect();
    json!({"id": id, "email": format!("{id}@example.com"), "name": name, "verified": true,
           "tenantId": ids.first(), "tenantIds": ids, "tenants": list, "createdAt": "2026-01-01T00:00:00.000Z"})
}

fn fe_token(t: &TestApp, sub: &str, tenant: &str, tenants: &[&str]) -> String {
    let mut c = t.issuer.claims_for(sub);
    c.as_object_mut().unwrap().remove("tenant_id");
    c["tenantId"] = json!(tenant);
    c["tenantIds"] = json!(tenants);
    c["roles"] = json!(["Admin"]);
    c["type"] = json!("userToken");
    t.issuer.mint(c)
}

async fn frontegg_reconcile_follows_tenants_users_and_rate_limits(db: TestDb) {
    let t = app()
        .realm_path("")
        .database(&db.url)
        .issuer_options(",dialect=frontegg,id-prefix=fe:")
        .start()
        .await;
    let conn = db.connect().await;
    let amy = fe_token(&t, "amy", "t1", &["t1", "t2"]);
    let ben = fe_token(&t, "ben", "t2", &["t2"]);
    let cid = fe_token(&t, "cid", "t1", &["t1"]);
    for token in [&amy, &ben, &cid] {
        sign_in(&t, token).await;
    }
    // Amy also works in t2, so both memberships exist.
    let r = t
        .http
        .get(t.url("/"))
        .bearer_auth(&amy)
        .header("x-tenant-id", "fe:t2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(membership(&conn, "fe:amy", "fe:t2").await.is_some());

    // Frontegg now: t2 deleted, t3 new, t1 renamed; amy's t1 membership disabled; cid deleted; dan new.
    let fe: Fe = Arc::new(Mutex::new(Frontegg {
        tenants: vec![
            json!({"tenantId": "t1", "name": "Tenant One", "deletedAt": null, "createdAt": "2026-01-01T00:00:00.000Z"}),
            json!({"tenantId": "t3", "name": "Tenant Three", "deletedAt": null, "createdAt": "2026-01-01T00:00:00.000Z"}),
        ],
        users: vec![
            fe_user("amy", "Amy A.", &[("t1", true), ("t3", false)]),
            fe_user("ben", "Ben B.", &[("t3", false)]),
            fe_user("dan", "Dan D.", &[("t1", false)]),
        ],
        throttle_users_page: Some(1),
        ..Frontegg::default()
    }));
    let api = serve(frontegg_router(fe.clone())).await;
    let issuer = format!("{},dialect=frontegg,id-prefix=fe:", t.issuer.issuer());
    let run = reconcile(
        &db,
        t.dir.path(),
        &["--issuer", &issuer, "--admin-url", &api],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        fe.lock().unwrap().throttled,
        1,
        "X-Rate-Limit-Reset was waited out"
    );
    assert_eq!(
        fe.lock().unwrap().pages,
        ["tenants 0", "users 0", "users 1"],
        "page indexes, not item offsets"
    );

    assert_eq!(user_active(&conn, "fe:amy").await, (true, None));
    assert_eq!(
        user_active(&conn, "fe:cid").await,
        (false, Some("idp".into()))
    );
    assert_eq!(user_active(&conn, "fe:dan").await, (true, None));
    assert_eq!(org_row(&conn, "fe:t1").await.name, "Tenant One");
    assert!(!org_row(&conn, "fe:t2").await.is_active);
    assert!(org_row(&conn, "fe:t3").await.is_active);
    for (u, o, active) in [
        ("fe:amy", "fe:t1", false),
        ("fe:amy", "fe:t2", false),
        ("fe:amy", "fe:t3", true),
        ("fe:ben", "fe:t2", false),
        ("fe:ben", "fe:t3", true),
        ("fe:dan", "fe:t1", true),
    ] {
        let m = membership(&conn, u, o)
            .await
            .unwrap_or_else(|| panic!("{u}@{o}"));
        assert_eq!(m.is_active, active, "{u}@{o}");
    }
    assert!(
        users::Entity::find_by_id("amy".to_owned())
            .one(&conn)
            .await
            .unwrap()
            .is_none(),
        "ids carry the issuer's prefix"
    );
    let audit = audit_actors(&conn).await;
    assert!(
        audit.contains_key("reconcile:frontegg membership_deactivated"),
        "{audit:?}"
    );
    if db.is_postgres {
        // Amy's token still lists t1, but her membership there is off now.
        refused_within(&t, &amy, Duration::from_secs(1)).await;
        refused_within(&t, &cid, Duration::from_secs(1)).await;
    }
}

// ---------------------------------------------------------------------------------------------------
// Rows made before `origin` existed

async fn upgrade_gives_old_rows_their_origin(db: TestDb) {
    use migration::MigratorTrait as _;
    use sea_orm::ConnectionTrait as _;
    let conn = db.connect().await;
    migration::Migrator::up(&conn, Some(3)).await.unwrap();
    let at = "'2026-11-01T00:00:00Z'";
    for sql in [
        format!(
            "INSERT INTO users (id, issuer, idp_roles, is_active, created_at, updated_at) VALUES \
             ('u1', 'https://idp', '[]', true, {at}, {at})"
        ),
        format!(
            "INSERT INTO organizations (id, issuer, name, slug, is_active, created_at, updated_at) VALUES \
             ('o-idp', 'https://idp', 'A', 'a', true, {at}, {at}), \
             ('personal-abc', 'https://idp', 'P', 'p', true, {at}, {at}), \
             ('o-op', 'https://idp', 'O', 'o', true, {at}, {at})"
        ),
        format!(
            "INSERT INTO memberships (user_id, organization_id, role, idp_roles, is_active, created_at, \
             updated_at) VALUES ('u1', 'o-idp', 'admin', '[]', true, {at}, {at}), \
             ('u1', 'personal-abc', 'admin', '[]', true, {at}, {at}), \
             ('u1', 'o-op', 'member', '[]', true, {at}, {at})"
        ),
        format!(
            "INSERT INTO audit_events (occurred_at, kind, user_id, organization_id, issuer, actor, details) \
             VALUES ({at}, 'organization_created', NULL, 'o-idp', 'https://idp', 'idsync', '{{}}'), \
             ({at}, 'organization_created', NULL, 'o-op', 'https://idp', 'ops@example.com', '{{}}'), \
             ({at}, 'membership_created', 'u1', 'o-idp', 'https://idp', 'idsync', '{{}}'), \
             ({at}, 'membership_created', 'u1', 'o-op', 'https://idp', 'ops@example.com', '{{}}')"
        ),
    ] {
        conn.execute_unprepared(&sql).await.unwrap();
    }
    migration::Migrator::up(&conn, None).await.unwrap();
    for (id, origin) in [
        ("o-idp", "idp"),
        ("personal-abc", "idsync"),
        ("o-op", "operator"),
    ] {
        assert_eq!(org_row(&conn, id).await.origin, origin, "{id}");
        assert_eq!(
            membership(&conn, "u1", id).await.unwrap().origin,
            origin,
            "u1@{id}"
        );
    }
}
