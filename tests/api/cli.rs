//! The CLI subcommands against real servers and databases: `check`, `token inspect`,
//! `orgs|users|memberships`, `healthcheck`.

use crate::helpers::app;
use devkit::{EchoUpstream, IssuerMode, LocalIssuer, SigningAlg};
use serde_json::{Value, json};
use std::process::Output;

async fn idsync(args: Vec<String>) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
        .env_clear()
        .args(args)
        .output()
        .await
        .unwrap()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn check_passes_when_everything_answers_and_fails_with_a_next_step_when_the_issuer_is_down() {
    let issuer = LocalIssuer::start("/realms/acme", SigningAlg::RS256)
        .await
        .unwrap();
    let upstream = EchoUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/c.db?mode=rwc", dir.path().display());
    let args = strings(&[
        "check",
        "--upstream",
        &upstream.url(),
        "--issuer",
        issuer.issuer(),
        "--database-url",
        &db,
    ]);
    let out = idsync(args.clone()).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("all checks passed") && text.contains("1 key(s)"),
        "{text}"
    );

    issuer.set_mode(IssuerMode::Down);
    let out = idsync(args).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL  issuer") && text.contains("next step:"),
        "{text}"
    );
}

#[tokio::test]
async fn token_inspect_explains_each_kind_of_failure_and_never_prints_the_signature() {
    let issuer = LocalIssuer::start("/realms/acme", SigningAlg::RS256)
        .await
        .unwrap();
    let base = strings(&[
        "token",
        "inspect",
        "--output",
        "json",
        "--issuer",
        issuer.issuer(),
    ]);
    let inspect = |token: String| {
        let mut args = base.clone();
        args.push(token);
        async move {
            let out = idsync(args).await;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (
                out.status.code(),
                serde_json::from_str::<Value>(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
                text,
            )
        }
    };
    let valid = issuer.mint(issuer.claims_for("inspected"));
    let (code, r, text) = inspect(valid.clone()).await;
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(
        (r["signature_valid"].clone(), r["claims_valid"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(r["identity"]["user"], "inspected");
    assert_eq!(r["identity"]["tenant"], "acme");
    assert_eq!(r["identity"]["role"], "member");
    assert_eq!(r["headers"]["x-user-id"], "inspected");
    assert!(r["verdict"].as_str().unwrap().starts_with("forward"));
    let signature = valid.rsplit('.').next().unwrap();
    assert!(!text.contains(signature), "the signature is never printed");

    let mut expired = issuer.claims_for("late");
    expired["exp"] = json!(devkit::unix_now() - 600);
    let (code, r, _) = inspect(issuer.mint(expired)).await;
    assert_eq!(code, Some(1));
    assert_eq!(
        (r["signature_valid"].clone(), r["claims_valid"].clone()),
        (json!(true), json!(false))
    );
    assert!(r["reasons"].to_string().contains("expired"), "{r}");
    assert_eq!(r["verdict"], "refuse: 401 invalid_token");

    let stranger = LocalIssuer::start("/realms/other", SigningAlg::RS256)
        .await
        .unwrap();
    let (_, r, _) = inspect(stranger.mint(stranger.claims_for("x"))).await;
    assert!(
        r["reasons"].to_string().contains("is not configured"),
        "{r}"
    );

    let mut no_tenant = issuer.claims_for("nomad");
    no_tenant.as_object_mut().unwrap().remove("tenant_id");
    let (_, r, _) = inspect(issuer.mint(no_tenant)).await;
    assert_eq!(r["verdict"], "refuse: 403 missing_tenant_claim");
    let reasons = r["reasons"].to_string();
    assert!(
        reasons.contains("looked for `organization` and `tenant_id`")
            && reasons.contains("--tenant-claim")
            && reasons.contains("--missing-tenant"),
        "the operator gets the flags to set: {r}"
    );

    // A valid token whose payload was swapped after signing: decodes fine, signature does not hold.
    let other = issuer.mint(issuer.claims_for("admin"));
    let mut parts: Vec<&str> = valid.split('.').collect();
    parts[1] = other.split('.').nth(1).unwrap();
    let (code, r, _) = inspect(parts.join(".")).await;
    assert_eq!(code, Some(1));
    assert_eq!(
        (r["signature_valid"].clone(), r["identity"]["user"].clone()),
        (json!(false), json!("admin")),
        "{r}"
    );
    assert!(
        r["reasons"].to_string().contains("signature is invalid"),
        "{r}"
    );
}

#[tokio::test]
async fn token_inspect_with_a_saved_jwks_needs_no_network() {
    let issuer = LocalIssuer::start("/realms/acme", SigningAlg::ES256)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, issuer.jwks_document().to_string()).unwrap();
    issuer.set_mode(IssuerMode::Down);
    let token = issuer.mint(issuer.claims_for("offline"));
    let before = issuer.jwks_fetches() + issuer.discovery_fetches();
    let out = idsync(strings(&[
        "token",
        "inspect",
        "--output",
        "json",
        "--issuer",
        issuer.issuer(),
        "--jwks-file",
        jwks.to_str().unwrap(),
        &token,
    ]))
    .await;
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["signature_valid"], true, "{r}");
    assert_eq!(
        issuer.jwks_fetches() + issuer.discovery_fetches(),
        before,
        "no network"
    );
}

#[tokio::test]
async fn orgs_users_and_memberships_commands_work_on_the_database() {
    let t = app().start().await;
    assert_eq!(
        t.get_with_token("/", &t.issuer.mint(t.issuer.claims_for("cli-user")))
            .await
            .status(),
        200
    );
    let db = format!("sqlite://{}/idsync.db?mode=rwc", t.dir.path().display());
    let run = |args: &[&str]| {
        let mut v = strings(args);
        v.extend(strings(&["--database-url", &db, "--actor", "ops"]));
        async move {
            let out = idsync(v).await;
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (code, out, err) = run(&[
        "orgs",
        "create",
        "cli-org",
        "CLI Org",
        "--issuer",
        t.issuer.issuer(),
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["slug"],
        "cli-org"
    );
    let (code, out, err) = run(&["memberships", "add", "cli-user", "cli-org", "viewer"]).await;
    assert_eq!(code, Some(0), "{err}");
    let added: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(added["role_source"], "operator", "a role an operator chose");
    let (code, out, err) = run(&["memberships", "role-source", "cli-user", "cli-org", "idp"]).await;
    assert_eq!(code, Some(0), "{err}");
    let handed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&handed["role"], &handed["role_source"]),
        (&json!("viewer"), &json!("idp"))
    );
    let (code, _, _) = run(&[
        "memberships",
        "role-source",
        "cli-user",
        "cli-org",
        "nobody",
    ])
    .await;
    assert_eq!(code, Some(2), "clap refuses an unknown source");
    let (_, out, _) = run(&["users", "get", "cli-user"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["memberships"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (code, _, err) = run(&["orgs", "delete", "cli-org"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("has 1 member(s)"), "{err}");
    let (code, _, _) = run(&["orgs", "delete", "cli-org", "--force"]).await;
    assert_eq!(code, Some(0));
    let (code, out, _) = run(&["users", "deactivate", "cli-user"]).await;
    assert_eq!(
        (
            code,
            serde_json::from_str::<Value>(&out).unwrap()["is_active"].clone()
        ),
        (Some(0), json!(false))
    );
    let (_, out, _) = run(&["orgs", "list"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let conn = sea_orm::Database::connect(&db).await.unwrap();
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    let by_ops = entity::audit_events::Entity::find()
        .filter(entity::audit_events::Column::Actor.eq("ops"))
        .all(&conn)
        .await
        .unwrap();
    assert_eq!(
        by_ops.len(),
        5,
        "create, add, role source, delete, deactivate"
    );
}

#[tokio::test]
async fn healthcheck_exits_0_when_ready_and_1_when_not() {
    let t = app().start().await;
    let out = idsync(strings(&[
        "healthcheck",
        "--admin-listen",
        &t.app.admin_addr.to_string(),
    ]))
    .await;
    assert_eq!(out.status.code(), Some(0));
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = idsync(strings(&[
        "healthcheck",
        "--admin-listen",
        &closed.to_string(),
    ]))
    .await;
    assert_eq!(out.status.code(), Some(1));
}
