//! The self-contained demo: a local issuer with generated keys, an echo upstream and idsync on the
//! embedded SQLite default, all on loopback. It sends a few requests, prints what the app received, and
//! then the rows sync created.
//!
//! Run: `cargo run --example demo`

use clap::Parser;
use devkit::{EchoUpstream, LocalIssuer, SigningAlg};
use idsync::cli::Cli;
use idsync::startup::Application;
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let issuer = LocalIssuer::start("/realms/acme", SigningAlg::RS256).await?;
    let upstream = EchoUpstream::start().await?;
    let dir = tempfile::tempdir()?;
    let db = format!("sqlite://{}/idsync-demo.db?mode=rwc", dir.path().display());
    let issuer_flag = format!("{},audience=account", issuer.issuer());
    let argv = [
        "idsync",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream.url(),
        "--issuer",
        &issuer_flag,
        "--database-url",
        &db,
        "--skip-auth",
        "/public",
        "--log-level",
        "warn",
    ];
    let settings = Cli::try_parse_from(argv)?
        .serve_settings()
        .map_err(|problems| anyhow::anyhow!(problems.join("\n")))?;
    idsync::telemetry::init(settings.log_format, &settings.log_level);
    let app = Application::build(&settings).await?.spawn();
    let http = reqwest::Client::new();
    wait_ready(&http, &app.admin_url()).await?;

    println!("idsync demo");
    println!(
        "  issuer   {} (Keycloak-shaped, RS256 key generated now)",
        issuer.issuer()
    );
    println!(
        "  upstream {} (echoes the headers it receives)",
        upstream.url()
    );
    println!("  idsync   {}  admin {}", app.proxy_url(), app.admin_url());
    println!("  database {db}\n");

    let mut claims = issuer.claims_for("b2433b81-188f-4c01-b2ed-053bee5391d3");
    claims["aud"] = json!("account");
    claims["email"] = json!("grace.turing@example.com");
    claims["name"] = json!("Grace Turing");
    claims["preferred_username"] = json!("grace.turing");
    claims["realm_access"] = json!({"roles": ["default-roles-acme", "admin"]});
    claims["resource_access"] = json!({"web-app": {"roles": ["editor"]}});
    claims["organization"] = json!({
        "acme": {"id": "38394337-9aff-503a-b737-e711338283d4"},
        "globex": {"id": "5a0e8e43-8c2e-4a5e-9d0c-1f1b2f0d9c11"}
    });
    let token = issuer.mint(claims.clone());

    let url = format!("{}/api/projects", app.proxy_url());
    show(
        "1. Keycloak user, first request",
        http.get(&url).bearer_auth(&token),
    )
    .await?;
    show(
        "2. Same user asks for the other organization in the token (X-Tenant-Id)",
        http.get(&url)
            .bearer_auth(&token)
            .header("X-Tenant-Id", "5a0e8e43-8c2e-4a5e-9d0c-1f1b2f0d9c11"),
    )
    .await?;
    show(
        "3. Client spoofs X-User-Id and X-User-Roles (stripped, replaced by the verified identity)",
        http.get(&url)
            .bearer_auth(&token)
            .header("X-User-Id", "admin")
            .header("X-User-Roles", "superuser"),
    )
    .await?;
    show(
        "4. Asks for a tenant the token does not allow",
        http.get(&url)
            .bearer_auth(&token)
            .header("X-Tenant-Id", "someone-elses-tenant"),
    )
    .await?;
    let mut expired = claims.clone();
    expired["exp"] = json!(devkit::unix_now() - 3600);
    show(
        "5. Expired token",
        http.get(&url).bearer_auth(issuer.mint(expired)),
    )
    .await?;
    show(
        "6. No token on a public path (--skip-auth /public)",
        http.get(format!("{}/public/logo.png", app.proxy_url())),
    )
    .await?;

    show_rows(&db).await?;
    app.stop().await?;
    println!("done: idsync stopped gracefully.");
    Ok(())
}

async fn wait_ready(http: &reqwest::Client, admin: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if http
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    anyhow::bail!("idsync did not become ready")
}

async fn show(title: &str, req: reqwest::RequestBuilder) -> anyhow::Result<()> {
    let response = req.send().await?;
    let status = response.status();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let body: Value = response.json().await.unwrap_or(Value::Null);
    println!("{title}\n  -> {status}");
    if status.is_success() {
        let headers = body["headers"].as_object().cloned().unwrap_or_default();
        for (name, values) in headers {
            if name.starts_with("x-user")
                || name.starts_with("x-tenant")
                || name.starts_with("x-idsync")
            {
                println!(
                    "     upstream got {name}: {}",
                    values[0].as_str().unwrap_or("")
                );
            }
        }
    } else {
        println!("     {body}");
        if let Some(c) = challenge {
            println!("     WWW-Authenticate: {c}");
        }
    }
    println!();
    Ok(())
}

/// What sync left in the app's database: the rows are keyed by the IdP's own ids.
async fn show_rows(url: &str) -> anyhow::Result<()> {
    use entity::{audit_events, memberships, organizations, users};
    use sea_orm::{EntityTrait, QueryOrder};
    let db = sea_orm::Database::connect(url).await?;
    println!("Rows idsync synced into {url}");
    for u in users::Entity::find().all(&db).await? {
        println!(
            "  users          id={} email={:?} name={:?} idp_roles={}",
            u.id, u.email, u.name, u.idp_roles
        );
    }
    for o in organizations::Entity::find().all(&db).await? {
        println!(
            "  organizations  id={} name={:?} slug={}",
            o.id, o.name, o.slug
        );
    }
    for m in memberships::Entity::find().all(&db).await? {
        println!(
            "  memberships    user={} organization={} role={}",
            m.user_id, m.organization_id, m.role
        );
    }
    for e in audit_events::Entity::find()
        .order_by_asc(audit_events::Column::Id)
        .all(&db)
        .await?
    {
        println!(
            "  audit_events   {} organization={}",
            e.kind,
            e.organization_id.unwrap_or_default()
        );
    }
    println!();
    Ok(())
}
