//! Sync against a real database (SQLite always, PostgreSQL when configured): rows keyed by the IdP's
//! ids, exactly-once audit events under concurrency, no SQL on the warm path, tenant policy, refusals.

use crate::db::TestDb;
use crate::helpers::{TestApp, app, assert_error};
use devkit::{LocalIssuer, SigningAlg};
use entity::{audit_events, memberships, organizations, users};
use sea_orm::{
    ActiveModelTrait, ConnectionTrait, DatabaseConnection, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryOrder, Set, TransactionTrait,
};
use serde_json::{Value, json};
use std::time::Duration;

on_both_databases!(
    first_keycloak_request_creates_exact_rows_and_events,
    first_frontegg_request_creates_exact_rows_and_events,
    frontegg_tenant_token_provisions_only_the_organization,
    a_hundred_concurrent_first_requests_make_one_of_each,
    two_sidecars_on_one_database_agree,
    an_unchanged_identity_runs_no_sql_and_last_login_moves_only_after_the_interval,
    changed_email_and_roles_update_the_row_and_are_audited,
    tenant_switching_is_allowed_for_listed_tenants_and_memberships_only,
    missing_tenant_follows_the_policy,
    deactivated_rows_are_refused_and_never_reactivated,
    an_id_owned_by_another_issuer_is_never_merged,
    a_failure_mid_transaction_leaves_no_partial_rows,
    a_burst_of_first_requests_is_group_committed_and_one_failure_fails_alone,
    group_commit_shares_new_organizations_and_writes_each_event_once,
    group_commit_works_without_prepared_statements,
    concurrent_batches_naming_the_same_new_organizations_never_deadlock,
);

async fn events(db: &DatabaseConnection) -> Vec<(String, Option<String>, Option<String>, Value)> {
    audit_events::Entity::find()
        .order_by_asc(audit_events::Column::Id)
        .all(db)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.user_id, e.organization_id, e.details))
        .collect()
}

fn kinds(evs: &[(String, Option<String>, Option<String>, Value)]) -> Vec<&str> {
    evs.iter().map(|e| e.0.as_str()).collect()
}

/// An active organization row of `issuer` (another IdP's, or one a test holds), written directly.
fn foreign_org(
    id: &str,
    issuer: &str,
    slug: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> organizations::ActiveModel {
    organizations::ActiveModel {
        id: Set(id.into()),
        issuer: Set(issuer.into()),
        name: Set(slug.to_uppercase()),
        slug: Set(slug.into()),
        is_active: Set(true),
        metadata: Set(None),
        schema_name: Set(None),
        lifecycle_at: Set(None),
        deactivated_by: Set(None),
        origin: Set("idp".into()),
        created_at: Set(now),
        updated_at: Set(now),
    }
}

async fn count<E: EntityTrait>(db: &DatabaseConnection) -> u64
where
    E::Model: Sync,
{
    E::find().count(db).await.unwrap()
}

fn keycloak_claims(t: &TestApp, sub: &str) -> Value {
    let mut c = t.issuer.claims_for(sub);
    c.as_object_mut().unwrap().remove("tenant_id");
    c["email"] = json!("grace.turing@example.com");
    c["email_verified"] = json!(true);
    c["name"] = json!("Grace Turing");
    c["preferred_username"] = json!("grace.turing");
    c["given_name"] = json!("Grace");
    c["family_name"] = json!("Turing");
    c["realm_access"] = json!({"roles": ["default-roles-acme", "admin"]});
    c["organization"] = json!({"Acme Corp": {"id": "38394337-9aff-503a-b737-e711338283d4"}});
    c
}

fn frontegg_claims(
    t: &TestApp,
    sub: &str,
    tenant: &str,
    tenants: &[&str],
    roles: &[&str],
) -> Value {
    let now = devkit::unix_now();
    json!({
        "iss": t.issuer.issuer(), "sub": sub, "type": "userToken", "iat": now, "exp": now + 300,
        "email": format!("{sub}@example.com"), "email_verified": true, "name": "Linus Dijkstra",
        "tenantId": tenant, "tenantIds": tenants, "roles": roles,
        "profilePictureUrl": "https://www.gravatar.com/avatar/6f95f3426d5f501097a0bac63f5164c1?d=identicon",
        "metadata": {"plan": "pro"}
    })
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

async fn first_keycloak_request_creates_exact_rows_and_events(db: TestDb) {
    let t = app().database(&db.url).start().await;
    let token = t
        .issuer
        .mint(keycloak_claims(&t, "b2433b81-188f-4c01-b2ed-053bee5391d3"));
    let echo = t.echo(t.http.get(t.url("/")).bearer_auth(&token)).await;
    assert_eq!(echo.status, 200, "{}", echo.body);
    assert_eq!(
        echo.header("x-user-id").as_deref(),
        Some("b2433b81-188f-4c01-b2ed-053bee5391d3")
    );
    assert_eq!(
        echo.header("x-tenant-id").as_deref(),
        Some("38394337-9aff-503a-b737-e711338283d4")
    );
    assert_eq!(echo.header("x-tenant-slug").as_deref(), Some("acme-corp"));
    assert_eq!(echo.header("x-user-role").as_deref(), Some("admin"));
    assert_eq!(
        echo.header("x-user-roles").as_deref(),
        Some("default-roles-acme,admin")
    );
    assert_eq!(
        echo.header("x-user-email").as_deref(),
        Some("grace.turing@example.com")
    );

    let conn = db.connect().await;
    let user = users::Entity::find_by_id("b2433b81-188f-4c01-b2ed-053bee5391d3")
        .one(&conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.issuer, t.issuer.issuer());
    assert_eq!(user.email.as_deref(), Some("grace.turing@example.com"));
    assert_eq!(user.email_verified, Some(true));
    assert_eq!(user.username.as_deref(), Some("grace.turing"));
    assert_eq!(
        (user.given_name.as_deref(), user.family_name.as_deref()),
        (Some("Grace"), Some("Turing"))
    );
    assert_eq!(user.idp_roles, json!(["default-roles-acme", "admin"]));
    assert!(user.is_active && user.last_login_at.is_some());
    let org = organizations::Entity::find_by_id("38394337-9aff-503a-b737-e711338283d4")
        .one(&conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (org.name.as_str(), org.slug.as_str(), org.is_active),
        ("Acme Corp", "acme-corp", true)
    );
    let m = memberships::Entity::find_by_id((user.id.clone(), org.id.clone()))
        .one(&conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.role.as_str(), m.is_active), ("admin", true));
    assert_eq!(
        (
            count::<users::Entity>(&conn).await,
            count::<organizations::Entity>(&conn).await,
            count::<memberships::Entity>(&conn).await
        ),
        (1, 1, 1)
    );
    let evs = events(&conn).await;
    assert_eq!(
        kinds(&evs),
        ["organization_created", "user_created", "membership_created"]
    );
    assert!(evs.iter().all(
        |e| e.1.as_deref() == Some(user.id.as_str()) && e.2.as_deref() == Some(org.id.as_str())
    ));
}

async fn first_frontegg_request_creates_exact_rows_and_events(db: TestDb) {
    let t = frontegg_app(&db).await;
    let claims = frontegg_claims(
        &t,
        "a588e5d5",
        "449e423c",
        &["449e423c", "0f6c1a52"],
        &["Admin"],
    );
    let echo = t
        .echo(t.http.get(t.url("/")).bearer_auth(t.issuer.mint(claims)))
        .await;
    assert_eq!(echo.status, 200, "{}", echo.body);
    assert_eq!(echo.header("x-user-role").as_deref(), Some("admin"));
    assert_eq!(echo.header("x-tenant-slug").as_deref(), Some("449e423c"));
    let conn = db.connect().await;
    let user = users::Entity::find_by_id("a588e5d5")
        .one(&conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        user.avatar_url.as_deref(),
        Some("https://www.gravatar.com/avatar/6f95f3426d5f501097a0bac63f5164c1?d=identicon")
    );
    assert_eq!(user.idp_roles, json!(["Admin"]));
    let org = organizations::Entity::find_by_id("449e423c")
        .one(&conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(org.issuer, t.issuer.issuer());
    assert_eq!(
        count::<organizations::Entity>(&conn).await,
        1,
        "only the active tenant is provisioned"
    );
    assert_eq!(
        kinds(&events(&conn).await),
        ["organization_created", "user_created", "membership_created"]
    );
}

async fn frontegg_tenant_token_provisions_only_the_organization(db: TestDb) {
    let t = frontegg_app(&db).await;
    let now = devkit::unix_now();
    let token = t.issuer.mint(json!({"type": "tenantApiToken", "tenantId": "t-api", "createdByUserId": "u-1", "exp": now + 60}));
    let echo = t.echo(t.http.get(t.url("/")).bearer_auth(token)).await;
    assert_eq!(echo.status, 200);
    assert_eq!(echo.header("x-tenant-id").as_deref(), Some("t-api"));
    assert_eq!(echo.header("x-user-id"), None);
    let conn = db.connect().await;
    assert_eq!(
        (
            count::<users::Entity>(&conn).await,
            count::<organizations::Entity>(&conn).await,
            count::<memberships::Entity>(&conn).await
        ),
        (0, 1, 0)
    );
}

async fn a_hundred_concurrent_first_requests_make_one_of_each(db: TestDb) {
    let t = app().database(&db.url).start().await;
    let tokens: Vec<String> = (0..100)
        .map(|i| {
            let mut c = keycloak_claims(&t, "racer");
            c["jti"] = json!(format!("t{i}")); // distinct tokens: every request misses the token cache
            t.issuer.mint(c)
        })
        .collect();
    let mut tasks = Vec::new();
    for token in tokens {
        let (http, url) = (t.http.clone(), t.url("/"));
        tasks.push(tokio::spawn(async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let conn = db.connect().await;
    assert_eq!(
        (
            count::<users::Entity>(&conn).await,
            count::<organizations::Entity>(&conn).await,
            count::<memberships::Entity>(&conn).await
        ),
        (1, 1, 1)
    );
    assert_eq!(
        kinds(&events(&conn).await),
        ["organization_created", "user_created", "membership_created"],
        "each event exactly once"
    );
}

async fn two_sidecars_on_one_database_agree(db: TestDb) {
    let a = app().database(&db.url).start().await;
    let b = app().database(&db.url).with_issuer(&a.issuer).start().await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let sidecar = if i % 2 == 0 { &a } else { &b };
        let mut c = keycloak_claims(&a, &format!("user-{}", i % 20));
        c["organization"] = json!({format!("Org {}", i % 5): {"id": format!("org-{}", i % 5)}});
        c["jti"] = json!(i);
        let token = a.issuer.mint(c);
        let (http, url) = (sidecar.http.clone(), sidecar.url("/"));
        tasks.push(tokio::spawn(async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let conn = db.connect().await;
    assert_eq!(count::<users::Entity>(&conn).await, 20);
    assert_eq!(count::<organizations::Entity>(&conn).await, 5);
    assert_eq!(
        count::<memberships::Entity>(&conn).await,
        20,
        "user-N is always in org-(N mod 5)"
    );
    let evs = events(&conn).await;
    let n = |k: &str| evs.iter().filter(|e| e.0 == k).count();
    assert_eq!(
        (
            n("user_created"),
            n("organization_created"),
            n("membership_created")
        ),
        (20, 5, 20)
    );
    assert_eq!(evs.len(), 45, "no other events: {:?}", kinds(&evs));
}

async fn an_unchanged_identity_runs_no_sql_and_last_login_moves_only_after_the_interval(
    db: TestDb,
) {
    let t = app()
        .database(&db.url)
        // Long enough for the warm requests below to fit inside it on a busy machine.
        .arg("--last-seen-interval")
        .arg("3s")
        .start()
        .await;
    let claims = keycloak_claims(&t, "warm");
    assert_eq!(
        t.get_with_token("/", &t.issuer.mint(claims.clone()))
            .await
            .status(),
        200
    );
    let conn = db.connect().await;
    let first_login = users::Entity::find_by_id("warm")
        .one(&conn)
        .await
        .unwrap()
        .unwrap()
        .last_login_at
        .unwrap();

    let statements = t.counter("idsync_db_statements_total", "").await;
    assert!(statements > 0.0, "the first request did write");
    // Same token (token-cache hit) and a new token with the same claims (token-cache miss, sync-cache hit).
    let mut again = claims.clone();
    again["jti"] = json!("second-token");
    for token in [t.issuer.mint(claims.clone()), t.issuer.mint(again)] {
        for _ in 0..3 {
            assert_eq!(t.get_with_token("/", &token).await.status(), 200);
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    if crate::helpers::metrics_isolated() {
        assert_eq!(
            t.counter("idsync_db_statements_total", "").await,
            statements,
            "the warm path must execute no SQL"
        );
    }
    let login = users::Entity::find_by_id("warm")
        .one(&conn)
        .await
        .unwrap()
        .unwrap()
        .last_login_at
        .unwrap();
    assert_eq!(
        login, first_login,
        "last_login_at does not move within the interval"
    );

    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(
        t.get_with_token("/", &t.issuer.mint(claims)).await.status(),
        200
    );
    let mut moved = false;
    for _ in 0..40 {
        let login = users::Entity::find_by_id("warm")
            .one(&conn)
            .await
            .unwrap()
            .unwrap()
            .last_login_at
            .unwrap();
        if login > first_login {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(moved, "last_login_at advances once the interval has passed");
}

async fn changed_email_and_roles_update_the_row_and_are_audited(db: TestDb) {
    let t = frontegg_app(&db).await;
    let v1 = frontegg_claims(&t, "changer", "t1", &["t1"], &["Member"]);
    assert_eq!(
        t.get_with_token("/", &t.issuer.mint(v1.clone()))
            .await
            .status(),
        200
    );
    let mut v2 = v1.clone();
    v2["email"] = json!("new@example.com");
    v2["roles"] = json!(["Admin"]);
    v2.as_object_mut().unwrap().remove("name"); // a claim the token no longer carries is left alone
    let echo = t
        .echo(t.http.get(t.url("/")).bearer_auth(t.issuer.mint(v2)))
        .await;
    assert_eq!(echo.header("x-user-role").as_deref(), Some("admin"));
    assert_eq!(
        echo.header("x-user-email").as_deref(),
        Some("new@example.com")
    );
    assert_eq!(
        echo.header("x-user-name").as_deref(),
        Some("Linus Dijkstra")
    );
    let conn = db.connect().await;
    let user = users::Entity::find_by_id("changer")
        .one(&conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.email.as_deref(), Some("new@example.com"));
    assert_eq!(user.name.as_deref(), Some("Linus Dijkstra"));
    assert_eq!(user.idp_roles, json!(["Admin"]));
    let evs = events(&conn).await;
    assert_eq!(
        kinds(&evs),
        [
            "organization_created",
            "user_created",
            "membership_created",
            "profile_updated",
            "role_changed"
        ]
    );
    let changes = &evs[3].3["changes"];
    assert_eq!(
        changes["email"],
        json!({"from": "changer@example.com", "to": "new@example.com"})
    );
    assert_eq!(
        changes["idp_roles"],
        json!({"from": ["Member"], "to": ["Admin"]})
    );
    assert!(changes.get("name").is_none());
    assert_eq!(evs[4].3["from"], "member");
    assert_eq!(evs[4].3["to"], "admin");
}

async fn tenant_switching_is_allowed_for_listed_tenants_and_memberships_only(db: TestDb) {
    let t = frontegg_app(&db).await;
    let token = t.issuer.mint(frontegg_claims(
        &t,
        "switcher",
        "t1",
        &["t1", "t2"],
        &["Viewer"],
    ));
    let echo = t
        .echo(
            t.http
                .get(t.url("/"))
                .bearer_auth(&token)
                .header("X-Tenant-Id", "t2"),
        )
        .await;
    assert_eq!(echo.status, 200);
    assert_eq!(echo.header("x-tenant-id").as_deref(), Some("t2"));
    // t1's roles do not speak for t2: no stored membership there yet, so the default role.
    assert_eq!(echo.header("x-user-role").as_deref(), Some("member"));
    assert_eq!(echo.header("x-user-roles"), None);
    let conn = db.connect().await;
    assert!(
        memberships::Entity::find_by_id(("switcher".to_owned(), "t2".to_owned()))
            .one(&conn)
            .await
            .unwrap()
            .is_some()
    );

    let hits = t.upstream.hits();
    let r = t
        .http
        .get(t.url("/"))
        .bearer_auth(&token)
        .header("X-Tenant-Id", "t3")
        .send()
        .await
        .unwrap();
    assert_error(r, 403, "tenant_not_permitted").await;
    assert_eq!(t.upstream.hits(), hits);
    let evs = events(&conn).await;
    let denied = evs.last().unwrap();
    assert_eq!(
        (denied.0.as_str(), denied.2.as_deref()),
        ("access_denied", Some("t3"))
    );
    assert!(
        organizations::Entity::find_by_id("t3")
            .one(&conn)
            .await
            .unwrap()
            .is_none(),
        "a refused tenant is not created"
    );

    // An operator adds the user to t3: now the same token may switch there, at once (the refusal just
    // remembered is dropped with the change).
    let (status, _) = t
        .admin(
            reqwest::Method::POST,
            "/organizations",
            Some(json!({"id": "t3", "name": "T3"})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = t
        .admin(
            reqwest::Method::POST,
            "/memberships",
            Some(json!({"user_id": "switcher", "organization_id": "t3", "role": "member"})),
        )
        .await;
    assert_eq!(status, 201);
    let echo = t
        .echo(
            t.http
                .get(t.url("/"))
                .bearer_auth(&token)
                .header("X-Tenant-Id", "t3"),
        )
        .await;
    assert_eq!(echo.status, 200, "{}", echo.body);
    assert_eq!(echo.header("x-tenant-id").as_deref(), Some("t3"));
}

async fn missing_tenant_follows_the_policy(db: TestDb) {
    let issuer = LocalIssuer::start("/realms/acme", SigningAlg::RS256)
        .await
        .unwrap();
    let mut claims = issuer.claims_for("lonely");
    claims.as_object_mut().unwrap().remove("tenant_id");
    claims["preferred_username"] = json!("lonely");
    let token = issuer.mint(claims);

    let reject = app().database(&db.url).with_issuer(&issuer).start().await;
    let r = reject.get_with_token("/", &token).await;
    let body = assert_error(r, 403, "missing_tenant_claim").await;
    let desc = body["error_description"].as_str().unwrap();
    assert!(
        desc.contains("`organization`") && desc.contains("`tenant_id`"),
        "{desc}"
    );
    assert!(
        !desc.contains("--"),
        "no flag names reach an API client: {desc}"
    );

    let personal = app()
        .database(&db.url)
        .with_issuer(&issuer)
        .arg("--missing-tenant")
        .arg("personal")
        .start()
        .await;
    let echo = personal
        .echo(personal.http.get(personal.url("/")).bearer_auth(&token))
        .await;
    assert_eq!(echo.status, 200);
    let personal_id = echo.header("x-tenant-id").unwrap();
    assert!(personal_id.starts_with("personal-"), "{personal_id}");
    assert_eq!(
        echo.header("x-user-role").as_deref(),
        Some("admin"),
        "the owner of a personal organization"
    );
    let again = app()
        .database(&db.url)
        .with_issuer(&issuer)
        .arg("--missing-tenant")
        .arg("personal")
        .start()
        .await;
    let echo = again
        .echo(again.http.get(again.url("/")).bearer_auth(&token))
        .await;
    assert_eq!(
        echo.header("x-tenant-id").as_deref(),
        Some(personal_id.as_str()),
        "deterministic from issuer and sub"
    );

    let default = app()
        .database(&db.url)
        .with_issuer(&issuer)
        .arg("--missing-tenant")
        .arg("default=org-default")
        .start()
        .await;
    let echo = default
        .echo(default.http.get(default.url("/")).bearer_auth(&token))
        .await;
    assert_eq!(echo.header("x-tenant-id").as_deref(), Some("org-default"));
    assert_eq!(echo.header("x-user-role").as_deref(), Some("member"));
}

async fn deactivated_rows_are_refused_and_never_reactivated(db: TestDb) {
    let t = app().database(&db.url).start().await;
    let conn = db.connect().await;
    assert_eq!(
        t.get_with_token("/", &t.issuer.mint(keycloak_claims(&t, "first")))
            .await
            .status(),
        200
    );
    let org_id = "38394337-9aff-503a-b737-e711338283d4";
    let mut org = organizations::Entity::find_by_id(org_id)
        .one(&conn)
        .await
        .unwrap()
        .unwrap()
        .into_active_model();
    org.is_active = Set(false);
    org.update(&conn).await.unwrap();

    let r = t
        .get_with_token("/", &t.issuer.mint(keycloak_claims(&t, "newcomer")))
        .await;
    assert_error(r, 403, "tenant_inactive").await;
    assert!(
        users::Entity::find_by_id("newcomer")
            .one(&conn)
            .await
            .unwrap()
            .is_none(),
        "refused before anything is written"
    );
    assert!(
        !organizations::Entity::find_by_id(org_id)
            .one(&conn)
            .await
            .unwrap()
            .unwrap()
            .is_active,
        "sync never re-activates"
    );

    let mut user = users::Entity::find_by_id("first")
        .one(&conn)
        .await
        .unwrap()
        .unwrap()
        .into_active_model();
    user.is_active = Set(false);
    user.update(&conn).await.unwrap();
    let mut claims = keycloak_claims(&t, "first");
    claims["organization"] = json!({"Other": {"id": "org-other"}});
    let r = t.get_with_token("/", &t.issuer.mint(claims)).await;
    assert_error(r, 403, "user_inactive").await;
    assert!(
        !users::Entity::find_by_id("first")
            .one(&conn)
            .await
            .unwrap()
            .unwrap()
            .is_active
    );
    let evs = events(&conn).await;
    let reasons: Vec<&str> = evs
        .iter()
        .filter(|e| e.0 == "access_denied")
        .filter_map(|e| e.3["reason"].as_str())
        .collect();
    assert_eq!(reasons, ["tenant_inactive", "user_inactive"]);
}

async fn an_id_owned_by_another_issuer_is_never_merged(db: TestDb) {
    let t = app().database(&db.url).start().await;
    let conn = db.connect().await;
    let now = chrono::Utc::now();
    users::ActiveModel {
        id: Set("shared-sub".into()),
        issuer: Set("https://other-idp.example.com".into()),
        email: Set(Some("victim@example.com".into())),
        email_verified: Set(None),
        username: Set(None),
        name: Set(None),
        given_name: Set(None),
        family_name: Set(None),
        avatar_url: Set(None),
        idp_roles: Set(json!([])),
        is_active: Set(true),
        last_login_at: Set(None),
        lifecycle_at: Set(None),
        deactivated_by: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(&conn)
    .await
    .unwrap();
    let r = t
        .get_with_token("/", &t.issuer.mint(keycloak_claims(&t, "shared-sub")))
        .await;
    assert_error(r, 403, "identity_conflict").await;
    let user = users::Entity::find_by_id("shared-sub")
        .one(&conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (user.issuer.as_str(), user.email.as_deref()),
        ("https://other-idp.example.com", Some("victim@example.com"))
    );
    assert_eq!(
        count::<organizations::Entity>(&conn).await,
        0,
        "nothing else was written"
    );
    let evs = events(&conn).await;
    assert_eq!(kinds(&evs), ["identity_conflict"]);
    assert!(
        evs[0].3["reason"]
            .as_str()
            .unwrap()
            .contains("https://other-idp.example.com"),
        "the audit event names the owner"
    );

    // The same holds for a tenant id.
    foreign_org("foreign-org", "https://other-idp.example.com", "f", now)
        .insert(&conn)
        .await
        .unwrap();
    let mut claims = keycloak_claims(&t, "someone");
    claims["organization"] = json!(["foreign-org"]);
    assert_error(
        t.get_with_token("/", &t.issuer.mint(claims)).await,
        403,
        "identity_conflict",
    )
    .await;
    assert!(
        users::Entity::find_by_id("someone")
            .one(&conn)
            .await
            .unwrap()
            .is_none()
    );
}

async fn a_failure_mid_transaction_leaves_no_partial_rows(db: TestDb) {
    let t = app().database(&db.url).start().await;
    let conn = db.connect().await;
    // A trigger makes the last statement of the transaction (the membership) fail for one user.
    let trigger = if db.is_postgres {
        vec![
            "CREATE FUNCTION refuse_doomed() RETURNS trigger AS $$ BEGIN IF NEW.user_id = 'doomed' THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_doomed BEFORE INSERT ON memberships FOR EACH ROW EXECUTE FUNCTION refuse_doomed()",
        ]
    } else {
        vec![
            "CREATE TRIGGER refuse_doomed BEFORE INSERT ON memberships WHEN NEW.user_id = 'doomed' BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        ]
    };
    for sql in trigger {
        conn.execute_unprepared(sql).await.unwrap();
    }
    let r = t
        .get_with_token("/", &t.issuer.mint(keycloak_claims(&t, "doomed")))
        .await;
    let body = assert_error(r, 503, "temporarily_unavailable").await;
    assert!(
        !body["error_description"]
            .as_str()
            .unwrap()
            .contains("injected"),
        "database detail stays in the log"
    );
    assert_eq!(
        (
            count::<users::Entity>(&conn).await,
            count::<organizations::Entity>(&conn).await,
            count::<audit_events::Entity>(&conn).await
        ),
        (0, 0, 0)
    );
    // Another user in the same organization is fine: nothing half-written blocks it.
    assert_eq!(
        t.get_with_token("/", &t.issuer.mint(keycloak_claims(&t, "lucky")))
            .await
            .status(),
        200
    );
    assert_eq!(count::<users::Entity>(&conn).await, 1);
}

/// PostgreSQL as an operator sees it fail: connections refused and existing ones killed.
async fn set_connections(db: &TestDb, allowed: bool) {
    let admin = std::env::var("IDSYNC_TEST_POSTGRES_URL").unwrap();
    let conn = sea_orm::Database::connect(&admin).await.unwrap();
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    conn.execute_unprepared(&format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS {allowed}"
    ))
    .await
    .unwrap();
    if !allowed {
        conn.execute_unprepared(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        ))
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_gives_503_keeps_warm_users_and_recovers_without_restart() {
    let Some(db) = TestDb::postgres().await else {
        eprintln!("IDSYNC_TEST_POSTGRES_URL is not set: not run");
        return;
    };
    let t = app()
        .database(&db.url)
        .arg("--database-timeout")
        .arg("1s")
        .start()
        .await;
    let known = t.issuer.mint(keycloak_claims(&t, "known"));
    assert_eq!(t.get_with_token("/", &known).await.status(), 200);

    set_connections(&db, false).await;
    let newcomer = t.issuer.mint(keycloak_claims(&t, "newcomer"));
    let started = std::time::Instant::now();
    assert_error(
        t.get_with_token("/", &newcomer).await,
        503,
        "temporarily_unavailable",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a dead database answers within the database timeout"
    );
    assert_eq!(
        t.get_with_token("/", &known).await.status(),
        200,
        "an already-synced identity needs no database"
    );
    let ready = t
        .http
        .get(format!("{}/readyz", t.app.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    set_connections(&db, true).await;
    assert_eq!(
        t.get_with_token("/", &newcomer).await.status(),
        200,
        "recovers without a restart"
    );
    let conn = db.connect().await;
    assert!(
        users::Entity::find_by_id("newcomer")
            .one(&conn)
            .await
            .unwrap()
            .is_some()
    );
    t.wait_ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_db_error_pass_forwards_the_unsynced_identity() {
    let Some(db) = TestDb::postgres().await else {
        eprintln!("IDSYNC_TEST_POSTGRES_URL is not set: not run");
        return;
    };
    let t = app()
        .database(&db.url)
        .arg("--database-timeout")
        .arg("1s")
        .arg("--on-db-error")
        .arg("pass")
        .start()
        .await;
    set_connections(&db, false).await;
    let echo = t
        .echo(
            t.http
                .get(t.url("/"))
                .bearer_auth(t.issuer.mint(keycloak_claims(&t, "unsynced"))),
        )
        .await;
    set_connections(&db, true).await;
    assert_eq!(echo.status, 200);
    assert_eq!(echo.header("x-idsync-synced").as_deref(), Some("false"));
    assert_eq!(echo.header("x-user-id").as_deref(), Some("unsynced"));
    assert_eq!(
        echo.header("x-tenant-id").as_deref(),
        Some("38394337-9aff-503a-b737-e711338283d4")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_schema_is_created_with_a_safe_name_and_forwarded() {
    let Some(db) = TestDb::postgres().await else {
        eprintln!("IDSYNC_TEST_POSTGRES_URL is not set: not run");
        return;
    };
    let t = app()
        .database(&db.url)
        .arg("--tenant-schema")
        .arg("tenant_{slug}")
        .start()
        .await;
    let mut claims = keycloak_claims(&t, "schemer");
    claims["organization"] = json!({r#"x"; DROP SCHEMA public; --"#: {"id": "org-evil"}});
    let echo = t
        .echo(t.http.get(t.url("/")).bearer_auth(t.issuer.mint(claims)))
        .await;
    assert_eq!(echo.status, 200, "{}", echo.body);
    assert_eq!(
        echo.header("x-tenant-schema").as_deref(),
        Some("tenant_x_drop_schema_public")
    );
    let conn = db.connect().await;
    let schemas: Vec<String> = conn
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name IN ('tenant_x_drop_schema_public', 'public')",
        ))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.try_get::<String>("", "schema_name").unwrap())
        .collect();
    assert_eq!(
        schemas.len(),
        2,
        "the tenant schema exists and public survived: {schemas:?}"
    );
}

/// Group commit: a burst of first requests is written a batch at a time, each identity exactly as
/// alone (rows, audit events once), a refused one answered on its own, and one whose write fails
/// failing alone: the others in its batch are written again one by one.
async fn a_burst_of_first_requests_is_group_committed_and_one_failure_fails_alone(db: TestDb) {
    use sea_orm::ConnectionTrait as _;
    // The hold below spends part of each request's sync budget: give it room on a busy machine.
    let t = app()
        .database(&db.url)
        .arg("--database-timeout")
        .arg("20s")
        .start()
        .await;
    let conn = db.connect().await;
    // "banned" exists and is deactivated; "doomed" cannot get a membership (a trigger refuses it).
    assert_eq!(
        t.get_with_token("/", &t.issuer.mint(keycloak_claims(&t, "banned")))
            .await
            .status(),
        200
    );
    let (s, _) = t
        .admin(reqwest::Method::POST, "/users/banned/deactivate", None)
        .await;
    assert_eq!(s, 200);
    let trigger = if db.is_postgres {
        vec![
            "CREATE FUNCTION refuse_doomed() RETURNS trigger AS $$ BEGIN IF NEW.user_id = 'doomed' THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_doomed BEFORE INSERT ON memberships FOR EACH ROW EXECUTE FUNCTION refuse_doomed()",
        ]
    } else {
        vec![
            "CREATE TRIGGER refuse_doomed BEFORE INSERT ON memberships WHEN NEW.user_id = 'doomed' BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        ]
    };
    for sql in trigger {
        conn.execute_unprepared(sql).await.unwrap();
    }
    let before = count::<audit_events::Entity>(&conn).await;

    let verified = t.counter("idsync_token_verifications_total", "").await;
    let hold = db.hold_writes().await;
    let mut subjects: Vec<String> = (0..60).map(|i| format!("burst-{i}")).collect();
    subjects.insert(17, "banned".into());
    subjects.insert(33, "doomed".into());
    let mut tasks = Vec::new();
    for sub in &subjects {
        let token = t.issuer.mint(keycloak_claims(&t, sub));
        let (http, url, sub) = (t.http.clone(), t.url("/"), sub.clone());
        tasks.push(tokio::spawn(async move {
            let status = http
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            (sub, status)
        }));
    }
    wait_until_verified(&t, verified + 62.0).await;
    hold.release().await;
    for task in tasks {
        let (sub, status) = task.await.unwrap();
        let want = match sub.as_str() {
            "banned" => 403,
            "doomed" => 503,
            _ => 200,
        };
        assert_eq!(status, want, "{sub}");
    }
    assert_eq!(
        count::<users::Entity>(&conn).await,
        61,
        "60 new users and banned"
    );
    assert_eq!(count::<memberships::Entity>(&conn).await, 61);
    assert!(
        users::Entity::find_by_id("doomed".to_owned())
            .one(&conn)
            .await
            .unwrap()
            .is_none(),
        "nothing half-written for the failed one"
    );
    let new_events = audit_events::Entity::find()
        .order_by_asc(audit_events::Column::Id)
        .all(&conn)
        .await
        .unwrap()
        .into_iter()
        .skip(before as usize)
        .map(|e| e.kind)
        .collect::<Vec<_>>();
    let n = |k: &str| new_events.iter().filter(|e| *e == k).count();
    assert_eq!(n("user_created"), 60, "{new_events:?}");
    assert_eq!(n("membership_created"), 60);
    assert_eq!(n("access_denied"), 1, "banned, once");
    let (sum, batches) = (
        t.counter("idsync_sync_batch_size_sum", "").await,
        t.counter("idsync_sync_batch_size_count", "").await,
    );
    assert!(
        batches > 0.0 && sum / batches > 1.0,
        "first requests shared transactions: {sum} syncs in {batches} batches"
    );
}

/// The multi-row path itself: new users sharing new organizations, a user twice in the burst; every
/// row and event exactly once, and no batch needing the one-by-one fallback.
async fn group_commit_shares_new_organizations_and_writes_each_event_once(db: TestDb) {
    group_commit_burst(db, None).await;
}

/// The same burst with no prepared statement kept (`--database-statement-cache 0`, as a connection pooler
/// that cannot hold them needs): every statement is prepared afresh and the outcome is the same.
async fn group_commit_works_without_prepared_statements(db: TestDb) {
    group_commit_burst(db, Some("0")).await;
}

/// `statement_cache`: `--database-statement-cache`, or the shipped default when `None`.
async fn group_commit_burst(db: TestDb, statement_cache: Option<&str>) {
    let mut t = app().database(&db.url).arg("--database-timeout").arg("20s");
    if let Some(n) = statement_cache {
        t = t.arg("--database-statement-cache").arg(n);
    }
    let t = t.start().await;
    let verified = t.counter("idsync_token_verifications_total", "").await;
    let hold = db.hold_writes().await;
    let mut tasks = Vec::new();
    for i in 0..48 {
        let mut c = keycloak_claims(&t, &format!("member-{}", i % 40));
        c["organization"] = json!({format!("Team {}", i % 3): {"id": format!("team-{}", i % 3)}});
        c["jti"] = json!(i);
        let token = t.issuer.mint(c);
        let (http, url) = (t.http.clone(), t.url("/"));
        tasks.push(tokio::spawn(async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    wait_until_verified(&t, verified + 48.0).await;
    hold.release().await;
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let conn = db.connect().await;
    assert_eq!(
        (
            count::<users::Entity>(&conn).await,
            count::<organizations::Entity>(&conn).await,
            count::<memberships::Entity>(&conn).await
        ),
        (40, 3, 48),
        "eight members are in two teams"
    );
    let evs = events(&conn).await;
    let all = kinds(&evs);
    let n = |k: &str| all.iter().filter(|e| **e == k).count();
    assert_eq!(
        (
            n("organization_created"),
            n("user_created"),
            n("membership_created")
        ),
        (3, 40, 48),
        "{all:?}"
    );
    let org = organizations::Entity::find_by_id("team-1".to_owned())
        .one(&conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((org.name.as_str(), org.slug.as_str()), ("Team 1", "team-1"));
    if crate::helpers::metrics_isolated() {
        assert_eq!(
            t.counter("idsync_sync_batch_fallbacks_total", "").await,
            0.0,
            "no batch fell back"
        );
    }
    let (sum, batches) = (
        t.counter("idsync_sync_batch_size_sum", "").await,
        t.counter("idsync_sync_batch_size_count", "").await,
    );
    assert!(sum / batches > 1.0, "{sum} syncs in {batches} batches");
    if crate::helpers::metrics_isolated() {
        // Held writers (one on SQLite, eight on PostgreSQL) each took one job; the rest shared.
        assert!(batches <= 12.0, "{sum} syncs in {batches} batches");
    }
}

/// Batches written at the same time that name the same new organizations take their row locks in one
/// order (by id), so they never deadlock. They did: each batch inserted its new organizations in hash
/// order, two concurrent batches could each hold a row the other wanted, and PostgreSQL broke the cycle
/// only after `deadlock_timeout` (a second), then the batch fell back to one transaction per request.
/// Here writes are held while the burst queues (each of the eight writers holding one request); on
/// PostgreSQL another transaction also holds one of the new organizations' ids, so once writes resume the
/// writers take the queue in four batches of 64, each inserts the organizations before that id in its
/// order and waits; then that id is released and they all go on at once.
async fn concurrent_batches_naming_the_same_new_organizations_never_deadlock(db: TestDb) {
    let t = app()
        .database(&db.url)
        .arg("--database-timeout")
        .arg("30s")
        .start()
        .await;
    let (total, teams) = (264, 48);
    let org_hold = if db.is_postgres {
        let holder = db.connect().await;
        let hold = holder.begin().await.unwrap();
        foreign_org(
            "team-15",
            "https://held.example.com",
            "held",
            chrono::Utc::now(),
        )
        .insert(&hold)
        .await
        .unwrap();
        Some((holder, hold))
    } else {
        None
    };
    let verified = t.counter("idsync_token_verifications_total", "").await;
    let write_hold = db.hold_writes().await;
    let mut tasks = Vec::new();
    for i in 0..total {
        let mut c = keycloak_claims(&t, &format!("user-{i}"));
        let team = (i * 7) % teams;
        c["organization"] = json!({format!("Team {team}"): {"id": format!("team-{team}")}});
        let token = t.issuer.mint(c);
        let (http, url) = (t.http.clone(), t.url("/"));
        tasks.push(tokio::spawn(async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    wait_until_verified(&t, verified + total as f64).await;
    write_hold.release().await;
    if let Some((holder, hold)) = org_hold {
        // Until the batches wait on the held id (or 10 s).
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            let waiting = holder
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DatabaseBackend::Postgres,
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                ))
                .await
                .unwrap()
                .unwrap()
                .try_get_by_index::<i64>(0)
                .unwrap();
            if waiting >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        hold.rollback().await.unwrap();
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let conn = db.connect().await;
    assert_eq!(
        (
            count::<users::Entity>(&conn).await,
            count::<organizations::Entity>(&conn).await,
            count::<memberships::Entity>(&conn).await
        ),
        (total as u64, teams as u64, total as u64)
    );
    let evs = events(&conn).await;
    let created = kinds(&evs)
        .iter()
        .filter(|k| **k == "organization_created")
        .count();
    assert_eq!(created, teams, "each organization created once");
    if crate::helpers::metrics_isolated() {
        assert_eq!(
            t.counter("idsync_sync_batch_fallbacks_total", "").await,
            0.0,
            "no batch fell back (a deadlock makes one fall back); {} syncs in {} batches",
            t.counter("idsync_sync_batch_size_sum", "").await,
            t.counter("idsync_sync_batch_size_count", "").await,
        );
    }
}

/// Waits (at most 20 s) until `total` tokens have been verified, so a burst sent while the writes are
/// held has reached the sync queue, then a moment for the last ones to be queued; at least a second,
/// since under `cargo test` the counter is shared with other tests and may run ahead.
async fn wait_until_verified(t: &TestApp, total: f64) {
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if t.counter("idsync_token_verifications_total", "").await >= total
            && started.elapsed() >= Duration::from_secs(1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// idsync's PostgreSQL sessions plan each statement once and never as a sequential scan: group commit
/// sends a batch's rows as arrays, whose length only a custom plan knows, so PostgreSQL would otherwise
/// plan every execution afresh, or keep a plan made while the tables were empty. With no statements kept
/// (`--database-statement-cache 0`, for a pooler, which may refuse the startup parameter) the sessions
/// are left as the server configures them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sessions_plan_once_and_by_key() {
    use clap::Parser;
    let Some(db) = TestDb::postgres().await else {
        eprintln!("IDSYNC_TEST_POSTGRES_URL is not set: not run");
        return;
    };
    for (cache, mode, seqscan) in [
        (None, "force_generic_plan", "off"),
        (Some("0"), "auto", "on"),
    ] {
        let mut argv = vec![
            "idsync",
            "--upstream",
            "http://127.0.0.1:9",
            "--issuer",
            "https://sso.example.com/realms/acme",
            "--database-url",
            &db.url,
        ];
        if let Some(n) = cache {
            argv.extend(["--database-statement-cache", n]);
        }
        let settings = idsync::cli::Cli::try_parse_from(argv)
            .unwrap()
            .serve_settings()
            .unwrap();
        let conn = idsync::startup::connect_database(&settings, false)
            .await
            .unwrap();
        let show = |name: &'static str| {
            let conn = conn.clone();
            async move {
                conn.query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DatabaseBackend::Postgres,
                    format!("SHOW {name}"),
                ))
                .await
                .unwrap()
                .unwrap()
                .try_get_by_index::<String>(0)
                .unwrap()
            }
        };
        assert_eq!(show("plan_cache_mode").await, mode, "cache {cache:?}");
        assert_eq!(show("enable_seqscan").await, seqscan, "cache {cache:?}");
        conn.close().await.unwrap();
    }
}
