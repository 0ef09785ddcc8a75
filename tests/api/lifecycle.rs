//! The identity lifecycle reaching idsync without waiting for the user's next request: OIDC back-channel
//! logout, Frontegg and Keycloak webhooks signed as the IdPs sign them, issuer-scoped ids, and change
//! notices between replicas on PostgreSQL.

use crate::db::TestDb;
use crate::helpers::{TestApp, app, assert_error};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use devkit::{LocalIssuer, SigningAlg};
use entity::{audit_events, memberships, users};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

on_both_databases!(
    backchannel_logout_ends_a_session_everywhere_and_only_with_a_valid_token,
    frontegg_webhooks_change_rows_at_once_in_order_and_only_when_signed,
    keycloak_webhooks_change_rows_at_once_in_order_and_only_when_signed,
    issuer_scoped_ids_let_two_idps_share_one_database,
    a_late_logout_never_narrows_a_revocation,
    webhooks_never_touch_another_issuers_rows,
);

const SECRET: &str = "webhook-secret-for-tests-0123456789";
const LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

pub(crate) fn write_secret(t_dir: &std::path::Path) -> String {
    let path = t_dir.join("webhook-secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    path.display().to_string()
}

async fn user_row(conn: &DatabaseConnection, id: &str) -> users::Model {
    users::Entity::find_by_id(id.to_owned())
        .one(conn)
        .await
        .unwrap()
        .unwrap()
}

async fn membership_row(conn: &DatabaseConnection, u: &str, t: &str) -> memberships::Model {
    memberships::Entity::find_by_id((u.to_owned(), t.to_owned()))
        .one(conn)
        .await
        .unwrap()
        .unwrap()
}

async fn actors(conn: &DatabaseConnection, kind: &str) -> Vec<String> {
    audit_events::Entity::find()
        .filter(audit_events::Column::Kind.eq(kind))
        .all(conn)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.actor)
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// Back-channel logout

pub(crate) fn logout_token(issuer: &LocalIssuer, claims: Value) -> String {
    let kid = issuer.jwks_document()["keys"][0]["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    issuer.sign_raw_with(
        &kid,
        &json!({"alg": "RS256", "kid": kid, "typ": "logout+jwt"}),
        &claims,
    )
}

pub(crate) fn logout_claims(issuer: &LocalIssuer, jti: &str) -> Value {
    let now = devkit::unix_now();
    json!({
        "iss": issuer.issuer(), "aud": "web-app", "iat": now, "exp": now + 120, "jti": jti,
        "events": {LOGOUT_EVENT: {}}, "typ": "Logout"
    })
}

pub(crate) async fn post_logout(t: &TestApp, token: &str) -> reqwest::Response {
    t.http
        .post(t.url("/.idsync/backchannel-logout"))
        .form(&[("logout_token", token)])
        .send()
        .await
        .unwrap()
}

pub(crate) fn access_token(issuer: &LocalIssuer, sub: &str, sid: &str, iat_offset: i64) -> String {
    let mut c = issuer.claims_for(sub);
    c["sid"] = json!(sid);
    c["iat"] = json!(devkit::unix_now() + iat_offset);
    issuer.mint(c)
}

async fn backchannel_logout_ends_a_session_everywhere_and_only_with_a_valid_token(db: TestDb) {
    let t = app()
        .database(&db.url)
        .issuer_options(",logout-audience=web-app")
        .start()
        .await;
    let conn = db.connect().await;
    let session_a = access_token(&t.issuer, "alice", "sid-a", 0);
    let session_b = access_token(&t.issuer, "alice", "sid-b", 0);
    assert_eq!(
        t.get_with_token("/", &session_a).await.status(),
        200,
        "cached now"
    );

    // Tokens that must revoke nothing: each is 400 with a JSON error.
    let mut bad = Vec::new();
    let mut c = logout_claims(&t.issuer, "j-1");
    c["sid"] = json!("sid-a");
    c.as_object_mut().unwrap().remove("events");
    bad.push(("no events", logout_token(&t.issuer, c)));
    let mut c = logout_claims(&t.issuer, "j-2");
    c["sid"] = json!("sid-a");
    c["nonce"] = json!("n");
    bad.push(("a nonce", logout_token(&t.issuer, c)));
    let mut c = logout_claims(&t.issuer, "j-3");
    c["sid"] = json!("sid-a");
    c["aud"] = json!("another-client");
    bad.push(("another audience", logout_token(&t.issuer, c)));
    bad.push((
        "neither sid nor sub",
        logout_token(&t.issuer, logout_claims(&t.issuer, "j-4")),
    ));
    let mut c = logout_claims(&t.issuer, "j-5");
    c["sid"] = json!("sid-a");
    let good = logout_token(&t.issuer, c.clone());
    let forged = format!("{}x", &good[..good.len() - 1]);
    bad.push(("a broken signature", forged));
    let kid = t.issuer.jwks_document()["keys"][0]["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    bad.push((
        "an access-token typ",
        t.issuer.sign_raw_with(
            &kid,
            &json!({"alg": "RS256", "kid": kid, "typ": "at+jwt"}),
            &c,
        ),
    ));
    let stranger = LocalIssuer::start("/realms/other", SigningAlg::RS256)
        .await
        .unwrap();
    let mut c = logout_claims(&stranger, "j-6");
    c["sid"] = json!("sid-a");
    bad.push(("another issuer", logout_token(&stranger, c)));
    for (why, token) in &bad {
        let body = assert_error(post_logout(&t, token).await, 400, "invalid_request").await;
        assert!(body["error_description"].is_string(), "{why}");
    }
    assert_eq!(
        t.get_with_token("/", &session_a).await.status(),
        200,
        "nothing was revoked"
    );
    let r = t
        .http
        .post(t.url("/.idsync/backchannel-logout"))
        .json(&json!({"logout_token": good}))
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_request").await;

    // The logout token is not an access token either.
    assert_error(t.get_with_token("/", &good).await, 401, "invalid_token").await;

    // A valid logout with `sid`: that session's tokens are refused at once, cached or not; others pass.
    let r = post_logout(&t, &good).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let refused = assert_error(
        t.get_with_token("/", &session_a).await,
        401,
        "invalid_token",
    )
    .await;
    assert!(
        refused["error_description"]
            .as_str()
            .unwrap()
            .contains("session ended")
    );
    assert_eq!(t.get_with_token("/", &session_b).await.status(), 200);
    // Replayed: refused, nothing more happens.
    let replay = post_logout(&t, &good).await;
    assert_eq!(
        replay.headers().get("cache-control").map(|v| v.as_bytes()),
        Some(&b"no-store"[..]),
        "refusals are not cached either"
    );
    assert_error(replay, 400, "invalid_request").await;

    // With only `sub`: every token of the user issued before the logout, none after.
    let earlier = access_token(&t.issuer, "alice", "sid-c", -30);
    assert_eq!(t.get_with_token("/", &earlier).await.status(), 200);
    let mut c = logout_claims(&t.issuer, "j-7");
    c["sub"] = json!("alice");
    assert_eq!(
        post_logout(&t, &logout_token(&t.issuer, c)).await.status(),
        200
    );
    assert_error(t.get_with_token("/", &earlier).await, 401, "invalid_token").await;
    assert_error(
        t.get_with_token("/", &session_b).await,
        401,
        "invalid_token",
    )
    .await;
    let later = access_token(&t.issuer, "alice", "sid-d", 5);
    assert_eq!(
        t.get_with_token("/", &later).await.status(),
        200,
        "a new login works"
    );

    assert_eq!(
        actors(&conn, "session_revoked").await,
        ["backchannel-logout"]
    );
    assert_eq!(
        actors(&conn, "user_sessions_revoked").await,
        ["backchannel-logout"]
    );

    // Another replica on the same database honours the revocations from the start.
    let other = app()
        .database(&db.url)
        .with_issuer(&t.issuer)
        .issuer_options(",logout-audience=web-app")
        .start()
        .await;
    assert_error(
        other.get_with_token("/", &session_a).await,
        401,
        "invalid_token",
    )
    .await;
    assert_eq!(other.get_with_token("/", &later).await.status(), 200);
}

// ---------------------------------------------------------------------------------------------------
// Webhooks

/// The `x-webhook-secret` header as Frontegg sends it: a JWT signed HS256 with the shared secret.
fn frontegg_header(secret: &str, iat: i64) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(json!({"iat": iat}).to_string());
    let input = format!("{header}.{payload}");
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes());
    let sig = aws_lc_rs::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

async fn frontegg_hook(t: &TestApp, body: Value, secret: &str, iat: i64) -> reqwest::Response {
    t.http
        .post(t.url("/.idsync/webhooks/frontegg"))
        .header("x-webhook-secret", frontegg_header(secret, iat))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn frontegg_token(t: &TestApp, sub: &str, tenant: &str, tenants: &[&str]) -> String {
    let now = devkit::unix_now();
    t.issuer.mint(json!({
        "iss": t.issuer.issuer(), "sub": sub, "type": "userToken", "iat": now, "exp": now + 300,
        "tenantId": tenant, "tenantIds": tenants, "roles": ["Admin"], "name": "Nora"
    }))
}

fn user_event(key: &str, tenant: &str, user: &str) -> Value {
    json!({
        "eventKey": key,
        "eventContext": {"tenantId": tenant, "userId": "the-admin"},
        "user": {"id": user, "email": format!("{user}@example.com"), "name": "Nora Renamed",
                 "tenantId": tenant, "tenantIds": [tenant], "roles": [{"key": "Viewer", "name": "Viewer"}]}
    })
}

async fn frontegg_webhooks_change_rows_at_once_in_order_and_only_when_signed(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write_secret(dir.path());
    let t = app()
        .realm_path("")
        .alg(SigningAlg::ES256)
        .issuer_options(&format!(
            ",dialect=frontegg,webhook-secret-file={secret_file}"
        ))
        .database(&db.url)
        .start()
        .await;
    let conn = db.connect().await;
    let token = frontegg_token(&t, "nora", "t1", &["t1", "t2"]);
    let in_t2 = || {
        t.http
            .get(t.url("/"))
            .bearer_auth(&token)
            .header("X-Tenant-Id", "t2")
    };
    assert_eq!(t.echo(in_t2()).await.status, 200, "t2 synced and cached");
    let now = devkit::unix_now();

    // Not signed with the secret: 401, nothing changes.
    let removed = user_event("frontegg.user.removedFromTenant", "t2", "nora");
    let r = frontegg_hook(&t, removed.clone(), "not-the-secret-0123456789", now).await;
    assert_error(r, 401, "invalid_signature").await;
    let r = t
        .http
        .post(t.url("/.idsync/webhooks/frontegg"))
        .json(&removed)
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "invalid_signature").await;
    assert_eq!(t.echo(in_t2()).await.status, 200);

    // Removed from t2 at the IdP: refused there at once, though the token still lists t2.
    let r = frontegg_hook(&t, removed.clone(), SECRET, now).await;
    assert_eq!(r.status(), 200);
    let done: Value = r.json().await.unwrap();
    assert_eq!(done["changed"], 1, "{done}");
    assert_error(
        t.http
            .get(t.url("/"))
            .bearer_auth(&token)
            .header("X-Tenant-Id", "t2")
            .send()
            .await
            .unwrap(),
        403,
        "membership_inactive",
    )
    .await;
    assert_eq!(
        t.get_with_token("/", &token).await.status(),
        200,
        "t1 is untouched"
    );
    let m = membership_row(&conn, "nora", "t2").await;
    assert_eq!(
        (m.is_active, m.deactivated_by.as_deref()),
        (false, Some("idp"))
    );

    // Out of order: an invitation sent before the removal arrives after it. The membership row already
    // reflects a newer event, so it is left alone (the user's profile, older than nothing, is updated).
    let invited = user_event("frontegg.user.invitedToTenant", "t2", "nora");
    let r = frontegg_hook(&t, invited.clone(), SECRET, now - 60).await;
    let done: Value = r.json().await.unwrap();
    assert_eq!(done["stale"], 1, "{done}");
    assert!(!membership_row(&conn, "nora", "t2").await.is_active);
    // A replay of the removal itself changes nothing either.
    let done: Value = frontegg_hook(&t, removed, SECRET, now)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(done["changed"], 0);
    // A newer invitation reactivates what the IdP deactivated.
    let done: Value = frontegg_hook(&t, invited.clone(), SECRET, now + 1)
        .await
        .json()
        .await
        .unwrap();
    assert!(done["changed"].as_u64().unwrap() >= 1, "{done}");
    assert_eq!(t.echo(in_t2()).await.status, 200);
    assert_eq!(
        user_row(&conn, "nora").await.name.as_deref(),
        Some("Nora Renamed")
    );

    // What an operator deactivated, an IdP event does not reactivate.
    let (s, _) = t
        .admin(
            reqwest::Method::POST,
            "/memberships/nora/t2/deactivate",
            None,
        )
        .await;
    assert_eq!(s, 200);
    let _ = frontegg_hook(&t, invited, SECRET, now + 2).await;
    let m = membership_row(&conn, "nora", "t2").await;
    assert_eq!(
        (m.is_active, m.deactivated_by.as_deref()),
        (false, Some("operator"))
    );

    // A deleted tenant, then a deleted user: refused everywhere.
    let r = frontegg_hook(
        &t,
        json!({"eventKey": "frontegg.tenant.deleted", "eventContext": {"tenantId": "t1"}}),
        SECRET,
        now + 3,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_error(t.get_with_token("/", &token).await, 403, "tenant_inactive").await;
    let r = frontegg_hook(
        &t,
        user_event("frontegg.user.deleted", "t1", "nora"),
        SECRET,
        now + 4,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(!user_row(&conn, "nora").await.is_active);

    // Unknown events: 200, nothing done. A stale signed header (an old capture replayed): 401.
    let r = frontegg_hook(
        &t,
        json!({"eventKey": "frontegg.user.authenticated", "user": {"id": "x"}}),
        SECRET,
        now,
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = frontegg_hook(
        &t,
        user_event("frontegg.user.created", "t9", "late"),
        SECRET,
        now - 3600,
    )
    .await;
    assert_error(r, 401, "invalid_signature").await;
    assert!(
        users::Entity::find_by_id("late")
            .one(&conn)
            .await
            .unwrap()
            .is_none()
    );

    for kind in [
        "membership_deactivated",
        "membership_reactivated",
        "organization_deactivated",
        "user_deactivated",
    ] {
        assert!(
            actors(&conn, kind)
                .await
                .iter()
                .any(|a| a == "webhook:frontegg"),
            "{kind} audited as the webhook"
        );
    }
}

fn keycloak_signature(body: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET.as_bytes());
    aws_lc_rs::hmac::sign(&key, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) async fn keycloak_hook(t: &TestApp, body: &Value) -> reqwest::Response {
    let bytes = serde_json::to_vec(body).unwrap();
    t.http
        .post(t.url("/.idsync/webhooks/keycloak"))
        .header("content-type", "application/json")
        .header("X-Keycloak-Signature", keycloak_signature(&bytes))
        .body(bytes)
        .send()
        .await
        .unwrap()
}

pub(crate) fn admin_event(
    kind: &str,
    path: &str,
    time: i64,
    representation: Option<Value>,
) -> Value {
    let mut e = json!({
        "uid": uuid::Uuid::new_v4().to_string(), "type": kind, "time": time, "realmId": "r-1", "realmName": "acme",
        "resourcePath": path, "details": {}, "authDetails": {"realmId": "acme", "userId": "the-admin"}
    });
    if let Some(r) = representation {
        e["representation"] = json!(r.to_string());
    }
    e
}

async fn keycloak_webhooks_change_rows_at_once_in_order_and_only_when_signed(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write_secret(dir.path());
    let t = app()
        .issuer_options(&format!(",webhook-secret-file={secret_file}"))
        .database(&db.url)
        .start()
        .await;
    let conn = db.connect().await;
    let mut c = t.issuer.claims_for("kim");
    c.as_object_mut().unwrap().remove("tenant_id");
    c["preferred_username"] = json!("kim");
    c["sid"] = json!("kc-session-1");
    c["organization"] = json!({"acme": {"id": "o-1"}});
    let token = t.issuer.mint(c);
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    let now_ms = chrono::Utc::now().timestamp_millis();

    // Signed with another secret, or tampered after signing: 401.
    let left = admin_event(
        "admin.ORGANIZATION_MEMBERSHIP-DELETE",
        "organizations/o-1/members/kim",
        now_ms,
        None,
    );
    let r = t
        .http
        .post(t.url("/.idsync/webhooks/keycloak"))
        .header("content-type", "application/json")
        .header("X-Keycloak-Signature", "00".repeat(32))
        .body(serde_json::to_vec(&left).unwrap())
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "invalid_signature").await;
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);

    // Removed from the organization: refused at once.
    assert_eq!(keycloak_hook(&t, &left).await.status(), 200);
    assert_error(
        t.get_with_token("/", &token).await,
        403,
        "membership_inactive",
    )
    .await;
    // An older "added" event delivered late changes nothing; a newer one (by username) reactivates.
    let mut joined = admin_event(
        "admin.ORGANIZATION_MEMBERSHIP-CREATE",
        "organizations/o-1/members",
        now_ms - 5000,
        None,
    );
    joined["details"] = json!({"username": "kim", "email": "kim@example.com"});
    let done: Value = keycloak_hook(&t, &joined).await.json().await.unwrap();
    assert_eq!(done["stale"], 1, "{done}");
    joined["time"] = json!(now_ms + 1000);
    assert_eq!(keycloak_hook(&t, &joined).await.status(), 200);
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);

    // Disabled at Keycloak (a USER UPDATE with enabled false): refused everywhere.
    let disabled = admin_event(
        "admin.USER-UPDATE",
        "users/kim",
        now_ms + 2000,
        Some(json!({"enabled": false, "email": "kim@example.com"})),
    );
    assert_eq!(keycloak_hook(&t, &disabled).await.status(), 200);
    assert_error(t.get_with_token("/", &token).await, 403, "user_inactive").await;
    // An operator lets kim back in; the same delivery replayed afterwards does not undo that.
    let (s, _) = t
        .admin(reqwest::Method::POST, "/users/kim/reactivate", None)
        .await;
    assert_eq!(s, 200);
    let replayed: Value = keycloak_hook(&t, &disabled).await.json().await.unwrap();
    assert_eq!(replayed["changed"], 0, "{replayed}");
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    let enabled = admin_event(
        "admin.USER-UPDATE",
        "users/kim",
        now_ms + 3000,
        Some(json!({"enabled": true})),
    );
    assert_eq!(keycloak_hook(&t, &enabled).await.status(), 200);
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);

    // A logout at Keycloak (user event) ends that session's tokens.
    let logout = json!({"uid": "u-9", "type": "access.LOGOUT", "time": now_ms + 4000, "realmName": "acme",
                        "authDetails": {"realmId": "acme", "userId": "kim", "sessionId": "kc-session-1"}, "details": {}});
    assert_eq!(keycloak_hook(&t, &logout).await.status(), 200);
    assert_error(t.get_with_token("/", &token).await, 401, "invalid_token").await;

    // An organization deleted at Keycloak; an event from another realm is refused.
    let gone = admin_event(
        "admin.ORGANIZATION-DELETE",
        "organizations/o-1",
        now_ms + 5000,
        None,
    );
    assert_eq!(keycloak_hook(&t, &gone).await.status(), 200);
    let org = entity::organizations::Entity::find_by_id("o-1")
        .one(&conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (org.is_active, org.deactivated_by.as_deref()),
        (false, Some("idp"))
    );
    let mut foreign = admin_event("admin.USER-DELETE", "users/kim", now_ms + 6000, None);
    foreign["realmName"] = json!("another-realm");
    assert_error(keycloak_hook(&t, &foreign).await, 400, "invalid_request").await;
    assert!(
        actors(&conn, "session_revoked")
            .await
            .iter()
            .any(|a| a == "webhook:keycloak")
    );
    let unknown = admin_event("admin.CLIENT-CREATE", "clients/c-1", now_ms, None);
    assert_eq!(keycloak_hook(&t, &unknown).await.status(), 200);
}

// ---------------------------------------------------------------------------------------------------
// Issuer-scoped ids

async fn issuer_scoped_ids_let_two_idps_share_one_database(db: TestDb) {
    let a = LocalIssuer::start("/realms/a", SigningAlg::RS256)
        .await
        .unwrap();
    let b = LocalIssuer::start("/realms/b", SigningAlg::RS256)
        .await
        .unwrap();
    let t = app()
        .database(&db.url)
        .with_issuer(&a)
        .issuer_options(",id-prefix=a:")
        .arg("--issuer")
        .arg(&format!("{},id-prefix=b:", b.issuer()))
        .start()
        .await;
    for (issuer, prefix) in [(&a, "a:"), (&b, "b:")] {
        let mut c = issuer.claims_for("same-sub");
        c["tenant_id"] = json!("same-tenant");
        let echo = t
            .echo(t.http.get(t.url("/")).bearer_auth(issuer.mint(c)))
            .await;
        assert_eq!(echo.status, 200, "{}", echo.body);
        assert_eq!(echo.header("x-user-id"), Some(format!("{prefix}same-sub")));
        assert_eq!(
            echo.header("x-tenant-id"),
            Some(format!("{prefix}same-tenant"))
        );
    }
    let conn = db.connect().await;
    assert_eq!(user_row(&conn, "a:same-sub").await.issuer, a.issuer());
    assert_eq!(user_row(&conn, "b:same-sub").await.issuer, b.issuer());
}

// ---------------------------------------------------------------------------------------------------
// Every replica within a second (PostgreSQL)

async fn refused_within(t: &TestApp, token: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if t.get_with_token("/", token).await.status() == 403 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "the change did not reach this replica in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_replica_reaches_every_replica_within_a_second() {
    let Some(db) = TestDb::postgres().await else {
        eprintln!("IDSYNC_TEST_POSTGRES_URL is not set: not run");
        return;
    };
    let a = app().database(&db.url).start().await;
    let b = app().database(&db.url).with_issuer(&a.issuer).start().await;
    let token = a.issuer.mint(a.issuer.claims_for("roamer"));
    for t in [&a, &b] {
        assert_eq!(
            t.get_with_token("/", &token).await.status(),
            200,
            "synced and cached on both"
        );
    }
    // Both replicas' change listeners are connected (a notice sent before would reach nobody).
    let conn = db.connect().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        use sea_orm::ConnectionTrait as _;
        let row = conn
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
            ))
            .await
            .unwrap()
            .unwrap();
        let n: i64 = row.try_get("", "n").unwrap();
        if n >= 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{n} listeners");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Through the admin API of one replica.
    let (s, _) = a
        .admin(reqwest::Method::POST, "/users/roamer/deactivate", None)
        .await;
    assert_eq!(s, 200);
    let took = refused_within(&b, &token, Duration::from_secs(1)).await;
    eprintln!("admin API change reached the other replica in {took:?}");
    let (s, _) = a
        .admin(reqwest::Method::POST, "/users/roamer/reactivate", None)
        .await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.get_with_token("/", &token).await.status(), 200);

    // Through the CLI, straight on the database.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .args(["users", "deactivate", "roamer", "--database-url", &db.url])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for t in [&a, &b] {
        refused_within(t, &token, Duration::from_secs(1)).await;
    }

    // The listening connection drops while a change is made that tells nobody: once back, the replica
    // treats notices as missed and flushes, so the change is seen without waiting for the cache TTL.
    let (s, _) = a
        .admin(reqwest::Method::POST, "/users/roamer/reactivate", None)
        .await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.get_with_token("/", &token).await.status(),
        200,
        "cached again on b"
    );
    use sea_orm::ConnectionTrait;
    let conn = db.connect().await;
    conn.execute_unprepared("UPDATE users SET is_active = false WHERE id = 'roamer'")
        .await
        .unwrap();
    assert_eq!(
        b.get_with_token("/", &token).await.status(),
        200,
        "a change nobody announced: b still answers from its cache"
    );
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let admin = sea_orm::Database::connect(std::env::var("IDSYNC_TEST_POSTGRES_URL").unwrap())
        .await
        .unwrap();
    admin
        .execute_unprepared(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND query LIKE 'LISTEN%'"
        ))
        .await
        .unwrap();
    refused_within(&b, &token, Duration::from_secs(3)).await;
}

// ---------------------------------------------------------------------------------------------------
// Revocations only ever widen

async fn a_late_logout_never_narrows_a_revocation(db: TestDb) {
    use idsync::provision::revocations::{self, Revocation, Revoked};
    use migration::MigratorTrait as _;
    let conn = db.connect().await;
    migration::Migrator::up(&conn, None).await.unwrap();
    let now = chrono::Utc::now();
    let rev = |not_before: i64, hours: i64| Revocation {
        issuer: "https://idp".into(),
        revoked: Revoked::User {
            sub: "alice".into(),
            not_before,
        },
        expires_at: now + chrono::Duration::hours(hours),
    };
    // The newer logout first, then an older one delivered late.
    revocations::record(&conn, &[rev(2_000, 24)], now)
        .await
        .unwrap();
    revocations::record(&conn, &[rev(1_000, 1)], now)
        .await
        .unwrap();
    let live = revocations::live(&conn, now).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(
        live[0].revoked,
        Revoked::User {
            sub: "alice".into(),
            not_before: 2_000
        },
        "the later cut-off stays"
    );
    assert!(live[0].expires_at > now + chrono::Duration::hours(23));
    // A later one widens it.
    revocations::record(&conn, &[rev(3_000, 2)], now)
        .await
        .unwrap();
    let live = revocations::live(&conn, now).await.unwrap();
    assert_eq!(
        live[0].revoked,
        Revoked::User {
            sub: "alice".into(),
            not_before: 3_000
        }
    );
}

// ---------------------------------------------------------------------------------------------------
// One IdP's events never touch another's rows

async fn webhooks_never_touch_another_issuers_rows(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write_secret(dir.path());
    let other = LocalIssuer::start("/realms/other", SigningAlg::RS256)
        .await
        .unwrap();
    let t = app()
        .issuer_options(&format!(",webhook-secret-file={secret_file}"))
        .arg("--issuer")
        .arg(other.issuer())
        .database(&db.url)
        .start()
        .await;
    let conn = db.connect().await;
    // kim and o-1 belong to the other realm.
    let mut c = other.claims_for("kim");
    c.as_object_mut().unwrap().remove("tenant_id");
    c["organization"] = json!({"acme": {"id": "o-1"}});
    let token = other.mint(c);
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    let now_ms = chrono::Utc::now().timestamp_millis();

    // The webhook's realm (acme) removes "kim" from "o-1": not its rows, nothing changes.
    let left = admin_event(
        "admin.ORGANIZATION_MEMBERSHIP-DELETE",
        "organizations/o-1/members/kim",
        now_ms,
        None,
    );
    let done: Value = keycloak_hook(&t, &left).await.json().await.unwrap();
    assert_eq!(done["changed"], 0, "{done}");
    assert!(membership_row(&conn, "kim", "o-1").await.is_active);
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);

    // A member added for a user idsync does not know: no membership, and no organization made for it.
    let mut joined = admin_event(
        "admin.ORGANIZATION_MEMBERSHIP-CREATE",
        "organizations/o-new/members",
        now_ms,
        None,
    );
    joined["details"] = json!({"username": "nobody"});
    joined["representation"] = json!(json!({"id": "nobody-id", "username": "nobody"}).to_string());
    assert_eq!(keycloak_hook(&t, &joined).await.status(), 200);
    assert!(
        entity::organizations::Entity::find_by_id("o-new")
            .one(&conn)
            .await
            .unwrap()
            .is_none()
    );
}
