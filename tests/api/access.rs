//! The one access decision, end to end: which role a request gets in which tenant for each dialect, who
//! set a membership's role (the IdP or an operator), pass mode deciding the same without a database, and
//! `token inspect` agreeing with `serve`.

use crate::db::TestDb;
use crate::helpers::{TestApp, app, assert_error};
use devkit::{LocalIssuer, SigningAlg};
use entity::{audit_events, memberships};
use reqwest::Method;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder};
use serde_json::{Value, json};
use std::time::Duration;

on_both_databases!(
    frontegg_roles_speak_only_for_the_tenant_that_issued_them,
    keycloak_realm_roles_never_change_a_membership_an_operator_made,
    an_operators_role_survives_idp_role_changes_until_handed_back,
);

fn frontegg(t: &TestApp, sub: &str, tenant: &str, tenants: &[&str], roles: &[&str]) -> String {
    let now = devkit::unix_now();
    t.issuer.mint(json!({
        "iss": t.issuer.issuer(), "sub": sub, "type": "userToken", "iat": now, "exp": now + 300,
        "email": format!("{sub}@example.com"), "tenantId": tenant, "tenantIds": tenants, "roles": roles,
    }))
}

fn keycloak(t: &TestApp, sub: &str, roles: &[&str], orgs: Value) -> String {
    let mut c = t.issuer.claims_for(sub);
    c.as_object_mut().unwrap().remove("tenant_id");
    c["realm_access"] = json!({ "roles": roles });
    c["organization"] = orgs;
    t.issuer.mint(c)
}

async fn frontegg_app(db: &TestDb) -> TestApp {
    app()
        .realm_path("")
        .alg(SigningAlg::ES256)
        .issuer_options(",dialect=frontegg")
        .database(&db.url)
        .start()
        .await
}

async fn role_in(conn: &DatabaseConnection, user: &str, org: &str) -> (String, String) {
    let m = memberships::Entity::find_by_id((user.to_owned(), org.to_owned()))
        .one(conn)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no membership of {user} in {org}"));
    (m.role, m.role_source)
}

/// (kind, actor, details) of the audit events about `org`, oldest first.
async fn events_about(conn: &DatabaseConnection, org: &str) -> Vec<(String, String, Value)> {
    audit_events::Entity::find()
        .filter(audit_events::Column::OrganizationId.eq(org))
        .order_by_asc(audit_events::Column::Id)
        .all(conn)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.actor, e.details))
        .collect()
}

async fn frontegg_roles_speak_only_for_the_tenant_that_issued_them(db: TestDb) {
    let t = frontegg_app(&db).await;
    let conn = db.connect().await;
    // Viewer in t2, from a token t2 issued.
    let t2_token = frontegg(&t, "mia", "t2", &["t1", "t2"], &["Viewer"]);
    let echo = t.echo(t.http.get(t.url("/")).bearer_auth(&t2_token)).await;
    assert_eq!(echo.header("x-user-role").as_deref(), Some("viewer"));
    assert_eq!(role_in(&conn, "mia", "t2").await.0, "viewer");

    // Admin in t1: the t1 token asks for t2. t1's roles say nothing about t2.
    let t1_token = frontegg(&t, "mia", "t1", &["t1", "t2"], &["Admin"]);
    let echo = t
        .echo(
            t.http
                .get(t.url("/"))
                .bearer_auth(&t1_token)
                .header("X-Tenant-Id", "t2"),
        )
        .await;
    assert_eq!(echo.status, 200, "{}", echo.body);
    assert_eq!(echo.header("x-tenant-id").as_deref(), Some("t2"));
    assert_eq!(echo.header("x-user-role").as_deref(), Some("viewer"));
    assert_eq!(
        echo.header("x-user-roles"),
        None,
        "t1's IdP roles are not t2's"
    );
    assert_eq!(
        role_in(&conn, "mia", "t2").await,
        ("viewer".into(), "idp".into()),
        "the t2 membership is not rewritten"
    );
    assert!(
        !events_about(&conn, "t2")
            .await
            .iter()
            .any(|e| e.0 == "role_changed"),
        "no role change in t2"
    );
    // In its own tenant the same token's roles apply.
    let echo = t.echo(t.http.get(t.url("/")).bearer_auth(&t1_token)).await;
    assert_eq!(echo.header("x-user-role").as_deref(), Some("admin"));
    assert_eq!(echo.header("x-user-roles").as_deref(), Some("Admin"));

    // A listed tenant with no membership yet: the default role, until a token of that tenant says more.
    let listed = frontegg(&t, "mia", "t1", &["t1", "t3"], &["Admin"]);
    let echo = t
        .echo(
            t.http
                .get(t.url("/"))
                .bearer_auth(&listed)
                .header("X-Tenant-Id", "t3"),
        )
        .await;
    assert_eq!(echo.header("x-user-role").as_deref(), Some("member"));
    assert_eq!(role_in(&conn, "mia", "t3").await.0, "member");
    let t3_token = frontegg(&t, "mia", "t3", &["t1", "t3"], &["Admin"]);
    let echo = t.echo(t.http.get(t.url("/")).bearer_auth(&t3_token)).await;
    assert_eq!(echo.header("x-user-role").as_deref(), Some("admin"));
    let t3_events = events_about(&conn, "t3").await;
    let changed = t3_events.iter().find(|e| e.0 == "role_changed").unwrap();
    assert_eq!(changed.1, "idsync");
    assert_eq!(
        (&changed.2["from"], &changed.2["to"]),
        (&json!("member"), &json!("admin"))
    );
}

async fn keycloak_realm_roles_never_change_a_membership_an_operator_made(db: TestDb) {
    let t = app().database(&db.url).start().await;
    let conn = db.connect().await;
    let token = keycloak(&t, "kai", &["admin"], json!({"Acme": {"id": "o-acme"}}));
    let echo = t.echo(t.http.get(t.url("/")).bearer_auth(&token)).await;
    assert_eq!(echo.header("x-user-role").as_deref(), Some("admin"));

    // An operator puts kai into another organization as viewer.
    let (s, _) = t
        .admin(
            Method::POST,
            "/organizations",
            Some(json!({"id": "o-side", "name": "Side"})),
        )
        .await;
    assert_eq!(s, 201);
    let (s, m) = t
        .admin(
            Method::POST,
            "/memberships",
            Some(json!({"user_id": "kai", "organization_id": "o-side", "role": "viewer"})),
        )
        .await;
    assert_eq!((s, &m["role_source"]), (201, &json!("operator")));

    // Reached only through that membership: its role, not the realm's admin.
    let echo = t
        .echo(
            t.http
                .get(t.url("/"))
                .bearer_auth(&token)
                .header("X-Tenant-Id", "o-side"),
        )
        .await;
    assert_eq!(echo.status, 200, "{}", echo.body);
    assert_eq!(echo.header("x-user-role").as_deref(), Some("viewer"));
    assert_eq!(echo.header("x-user-roles"), None);

    // Even once the token lists o-side itself, the first request is not a change: the operator's role stays.
    let both = keycloak(
        &t,
        "kai",
        &["admin"],
        json!({"Acme": {"id": "o-acme"}, "Side": {"id": "o-side"}}),
    );
    let echo = t
        .echo(
            t.http
                .get(t.url("/"))
                .bearer_auth(&both)
                .header("X-Tenant-Id", "o-side"),
        )
        .await;
    assert_eq!(echo.header("x-user-role").as_deref(), Some("viewer"));
    assert_eq!(
        role_in(&conn, "kai", "o-side").await,
        ("viewer".into(), "operator".into())
    );
    let kinds: Vec<(String, String)> = events_about(&conn, "o-side")
        .await
        .into_iter()
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(
        kinds,
        [
            (
                "organization_created".to_string(),
                "admin:alice".to_string()
            ),
            ("membership_created".into(), "admin:alice".into()),
        ],
        "idsync changed nothing in o-side"
    );
}

async fn an_operators_role_survives_idp_role_changes_until_handed_back(db: TestDb) {
    let t = frontegg_app(&db).await;
    let conn = db.connect().await;
    let admin_token = frontegg(&t, "ola", "t1", &["t1"], &["Admin"]);
    let echo = t
        .echo(t.http.get(t.url("/")).bearer_auth(&admin_token))
        .await;
    assert_eq!(echo.header("x-user-role").as_deref(), Some("admin"));

    let (s, m) = t
        .admin(
            Method::PATCH,
            "/memberships/ola/t1",
            Some(json!({"role": "member"})),
        )
        .await;
    assert_eq!(
        (s, &m["role"], &m["role_source"]),
        (200, &json!("member"), &json!("operator"))
    );

    // The IdP's roles change (Admin -> Admin, Billing): the operator's role stays.
    let changed = frontegg(&t, "ola", "t1", &["t1"], &["Admin", "Billing"]);
    let echo = t.echo(t.http.get(t.url("/")).bearer_auth(&changed)).await;
    assert_eq!(echo.header("x-user-role").as_deref(), Some("member"));
    assert_eq!(
        role_in(&conn, "ola", "t1").await,
        ("member".into(), "operator".into())
    );

    // Handed back: the next request takes the IdP's word again.
    let (s, m) = t
        .admin(
            Method::PATCH,
            "/memberships/ola/t1",
            Some(json!({"role_source": "idp"})),
        )
        .await;
    assert_eq!((s, &m["role_source"]), (200, &json!("idp")));
    let echo = t.echo(t.http.get(t.url("/")).bearer_auth(&changed)).await;
    assert_eq!(echo.header("x-user-role").as_deref(), Some("admin"));
    assert_eq!(
        role_in(&conn, "ola", "t1").await,
        ("admin".into(), "idp".into())
    );
    let trail: Vec<(String, String)> = events_about(&conn, "t1")
        .await
        .into_iter()
        .filter(|e| e.0.starts_with("role"))
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(
        trail,
        [
            ("role_changed".to_string(), "admin:alice".to_string()),
            ("role_source_changed".into(), "admin:alice".into()),
            ("role_changed".into(), "idsync".into()),
        ]
    );
    let (s, body) = t
        .admin(
            Method::PATCH,
            "/memberships/ola/t1",
            Some(json!({"role_source": "nobody"})),
        )
        .await;
    assert_eq!((s, &body["error"]), (400, &json!("invalid_request")));
}

/// A database nothing listens on: connection refused at once.
const NO_DATABASE: &str = "postgres://idsync@127.0.0.1:9/idsync";

async fn pass_app(issuer: &LocalIssuer, extra: &[&str]) -> TestApp {
    let mut b = app()
        .with_issuer(issuer)
        .database(NO_DATABASE)
        .arg("--on-db-error")
        .arg("pass")
        .arg("--migrate")
        .arg("skip")
        .arg("--database-timeout")
        .arg("1s");
    for a in extra {
        b = b.arg(a);
    }
    b.start().await
}

/// (status, X-Tenant-Id, X-User-Role, X-Idsync-Synced) of a request.
async fn decided(
    t: &TestApp,
    token: &str,
    tenant: Option<&str>,
) -> (u16, Option<String>, Option<String>, Option<String>) {
    let mut req = t.http.get(t.url("/")).bearer_auth(token);
    if let Some(tenant) = tenant {
        req = req.header("X-Tenant-Id", tenant);
    }
    let e = t.echo(req).await;
    if e.status != 200 {
        return (e.status, None, None, None);
    }
    (
        e.status,
        e.header("x-tenant-id"),
        e.header("x-user-role"),
        e.header("x-idsync-synced"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_mode_decides_like_the_synced_path_for_every_missing_tenant_policy() {
    let issuer = LocalIssuer::start("/realms/acme", SigningAlg::RS256)
        .await
        .unwrap();
    let mut lonely = issuer.claims_for("lonely");
    lonely.as_object_mut().unwrap().remove("tenant_id");
    lonely["realm_access"] = json!({"roles": ["viewer"]});
    let lonely = issuer.mint(lonely);
    let mut member = issuer.claims_for("member-of-two");
    member.as_object_mut().unwrap().remove("tenant_id");
    member["realm_access"] = json!({"roles": ["admin"]});
    member["organization"] = json!({"Acme": {"id": "o-1"}, "Globex": {"id": "o-2"}});
    let member = issuer.mint(member);

    for policy in ["reject", "personal", "default=main"] {
        let passed = pass_app(&issuer, &["--missing-tenant", policy]).await;
        let dir = tempfile::tempdir().unwrap();
        let synced = app()
            .with_issuer(&issuer)
            .database(&format!("sqlite://{}/s.db?mode=rwc", dir.path().display()))
            .arg("--missing-tenant")
            .arg(policy)
            .start()
            .await;
        for (token, tenant) in [
            (&lonely, None),
            (&member, None),
            (&member, Some("o-2")),
            (&member, Some("o-9")),
        ] {
            let p = decided(&passed, token, tenant).await;
            let s = decided(&synced, token, tenant).await;
            assert_eq!(
                (p.0, &p.1, &p.2),
                (s.0, &s.1, &s.2),
                "{policy}, tenant {tenant:?}: pass mode and the synced path disagree"
            );
            if p.0 == 200 {
                assert_eq!(p.3.as_deref(), Some("false"), "pass mode says so");
                assert_eq!(s.3, None);
            }
        }
        let p = decided(&passed, &lonely, None).await;
        match policy {
            "reject" => assert_eq!(p.0, 403),
            "personal" => {
                assert!(p.1.unwrap().starts_with("personal-"));
                assert_eq!(p.2.as_deref(), Some("admin"), "owner of their organization");
            }
            _ => assert_eq!(
                (p.1.as_deref(), p.2.as_deref()),
                (Some("main"), Some("viewer"))
            ),
        }
        assert_eq!(decided(&passed, &member, Some("o-9")).await.0, 403);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_mode_starts_without_its_database_and_connects_when_it_appears() {
    let issuer = LocalIssuer::start("/realms/acme", SigningAlg::RS256)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let later = dir.path().join("later");
    let url = format!("sqlite://{}/idsync.db?mode=rwc", later.display());

    // Without pass mode, a database that cannot be opened stops the start.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
            "--issuer",
            issuer.issuer(),
            "--database-url",
            &url,
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());

    let t = app()
        .with_issuer(&issuer)
        .database(&url)
        .arg("--on-db-error")
        .arg("pass")
        .start()
        .await;
    let ready: Value = t
        .http
        .get(format!("{}/readyz", t.app.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "degraded", "{ready}");
    let token = issuer.mint(issuer.claims_for("early"));
    let (status, tenant, _, synced) = decided(&t, &token, None).await;
    assert_eq!(
        (status, tenant.as_deref(), synced.as_deref()),
        (200, Some("acme"), Some("false"))
    );

    // The database appears: idsync migrates it in the background and syncs from then on.
    std::fs::create_dir(&later).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, _, synced) = decided(&t, &token, None).await;
        if status == 200 && synced.is_none() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never synced");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let conn = sea_orm::Database::connect(&url).await.unwrap();
    assert_eq!(role_in(&conn, "early", "acme").await.0, "member");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_inspect_agrees_with_serve_on_tenant_and_role() {
    let issuer = LocalIssuer::start("", SigningAlg::ES256).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = app()
        .with_issuer(&issuer)
        .issuer_options(",dialect=frontegg")
        .database(&format!("sqlite://{}/a.db?mode=rwc", dir.path().display()))
        .start()
        .await;
    let token = frontegg(&t, "ivy", "t1", &["t1", "t2"], &["Admin"]);
    for tenant in [None, Some("t2"), Some("t3")] {
        let served = decided(&t, &token, tenant).await;
        let mut args = vec![
            "token".to_string(),
            "inspect".into(),
            token.clone(),
            "--output".into(),
            "json".into(),
            "--issuer".into(),
            format!("{},dialect=frontegg", issuer.issuer()),
        ];
        if let Some(tenant) = tenant {
            args.extend(["--tenant".into(), tenant.into()]);
        }
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
            .env_clear()
            .args(&args)
            .output()
            .await
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        if served.0 == 200 {
            assert_eq!(out.status.code(), Some(0), "{report}");
            assert_eq!(
                report["identity"]["tenant"].as_str(),
                served.1.as_deref(),
                "{report}"
            );
            assert_eq!(
                report["identity"]["role"].as_str(),
                served.2.as_deref(),
                "{report}"
            );
            assert_eq!(
                report["headers"]["x-user-role"].as_str(),
                served.2.as_deref()
            );
        } else {
            assert_eq!(served.0, 403);
            assert_eq!(
                report["verdict"], "refuse: 403 tenant_not_permitted",
                "{report}"
            );
        }
    }
    let r = t
        .http
        .get(t.url("/"))
        .bearer_auth(&token)
        .header("X-Tenant-Id", "t3")
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "tenant_not_permitted").await;
}
