//! `idsync orgs|users|memberships …`: the admin operations straight on the database, printing JSON.
//! Running sidecars notice these changes within `--sync-cache-ttl`; use the admin API for immediate effect.

use crate::config::DatabaseArgs;
use crate::directory::{Directory, UserFilter};
use crate::identity::RoleSource;
use crate::provision::{Affected, notify};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::process::ExitCode;

#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Who is making the change, for the audit trail (default: cli:$USER).
    #[arg(long, global = true)]
    pub actor: Option<String>,
    /// The --tenant-schema template, so `orgs delete --force` drops the tenant's schema too.
    #[arg(long, env = "IDSYNC_TENANT_SCHEMA", global = true)]
    pub tenant_schema: Option<String>,
}

/// Organizations. Examples: `idsync orgs list`, `idsync orgs create acme "Acme Corp" --issuer https://…`,
/// `idsync orgs deactivate acme`, `idsync orgs delete acme --force`.
#[derive(Debug, Clone, Args)]
pub struct OrgsCommand {
    #[command(subcommand)]
    pub action: OrgsAction,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum OrgsAction {
    List {
        #[arg(long)]
        limit: Option<u64>,
        #[arg(long)]
        cursor: Option<String>,
    },
    Get {
        id: String,
    },
    Create {
        id: String,
        name: String,
        #[arg(long)]
        slug: Option<String>,
        /// The issuer whose tenant id this is.
        #[arg(long)]
        issuer: String,
    },
    Rename {
        id: String,
        name: String,
    },
    Deactivate {
        id: String,
    },
    Reactivate {
        id: String,
    },
    /// Refused while the organization has members, unless --force (which removes them).
    Delete {
        id: String,
        #[arg(long)]
        force: bool,
    },
}

/// Users. Examples: `idsync users list --email a@example.com`, `idsync users deactivate <sub>`.
#[derive(Debug, Clone, Args)]
pub struct UsersCommand {
    #[command(subcommand)]
    pub action: UsersAction,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum UsersAction {
    List {
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        organization: Option<String>,
        #[arg(long)]
        limit: Option<u64>,
        #[arg(long)]
        cursor: Option<String>,
    },
    Get {
        id: String,
    },
    Deactivate {
        id: String,
    },
    Reactivate {
        id: String,
    },
}

/// Memberships. Examples: `idsync memberships add <sub> acme member`, `idsync memberships set-role <sub> acme admin`.
#[derive(Debug, Clone, Args)]
pub struct MembershipsCommand {
    #[command(subcommand)]
    pub action: MembershipsAction,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum MembershipsAction {
    Add {
        user: String,
        organization: String,
        role: String,
    },
    /// Sets the role as an operator's: the IdP's roles no longer change it.
    SetRole {
        user: String,
        organization: String,
        role: String,
    },
    /// Who decides the role: `idp` hands it back to the IdP (the next token that speaks for the tenant
    /// sets it), `operator` keeps the current role.
    RoleSource {
        user: String,
        organization: String,
        source: SourceArg,
    },
    Deactivate {
        user: String,
        organization: String,
    },
    Reactivate {
        user: String,
        organization: String,
    },
    Remove {
        user: String,
        organization: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SourceArg {
    /// The IdP's roles set the role.
    Idp,
    /// The current role stays until an operator changes it.
    Operator,
}

async fn directory(db: &DbArgs, database: &DatabaseArgs) -> Result<(Directory, String), ExitCode> {
    let url = database.url().map_err(|e| {
        eprintln!("idsync: {e}");
        ExitCode::from(2)
    })?;
    let conn = sea_orm::Database::connect(url.expose())
        .await
        .map_err(|e| {
            eprintln!("idsync: cannot connect to {url}: {e}");
            ExitCode::FAILURE
        })?;
    let actor = db.actor.clone().unwrap_or_else(|| {
        format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )
    });
    Ok((Directory::new(conn, db.tenant_schema.clone()), actor))
}

/// Tells running sidecars on PostgreSQL about a change at once (they would otherwise see it within
/// `--sync-cache-ttl`), then prints it.
async fn changed<T: Serialize>(
    d: &Directory,
    r: crate::directory::Result<T>,
    affected: Affected,
) -> ExitCode {
    if r.is_ok() {
        let notice = notify::Notice::from(&affected);
        let origin = uuid::Uuid::new_v4().to_string();
        if let Err(e) = notify::publish(d.db(), &origin, &[notice]).await {
            eprintln!(
                "idsync: the change is made, but running sidecars were not told ({e}); they see it within --sync-cache-ttl"
            );
        }
    }
    print(r)
}

fn print<T: Serialize>(r: crate::directory::Result<T>) -> ExitCode {
    match r {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("idsync: {e}");
            ExitCode::FAILURE
        }
    }
}

pub async fn run_orgs(cmd: OrgsCommand, database: &DatabaseArgs) -> ExitCode {
    let (d, actor) = match directory(&cmd.db, database).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    match cmd.action {
        OrgsAction::List { limit, cursor } => {
            print(d.list_organizations(limit, cursor.as_deref()).await)
        }
        OrgsAction::Get { id } => print(d.get_organization(&id).await),
        OrgsAction::Create {
            id,
            name,
            slug,
            issuer,
        } => {
            let r = d
                .create_organization(&actor, &id, &name, slug.as_deref(), &issuer)
                .await;
            changed(&d, r, Affected::Organization(id)).await
        }
        OrgsAction::Rename { id, name } => {
            let r = d.rename_organization(&actor, &id, &name).await;
            changed(&d, r, Affected::Organization(id)).await
        }
        OrgsAction::Deactivate { id } => {
            let r = d.set_organization_active(&actor, &id, false).await;
            changed(&d, r, Affected::Organization(id)).await
        }
        OrgsAction::Reactivate { id } => {
            let r = d.set_organization_active(&actor, &id, true).await;
            changed(&d, r, Affected::Organization(id)).await
        }
        OrgsAction::Delete { id, force } => {
            let r = d
                .delete_organization(&actor, &id, force)
                .await
                .map(|()| serde_json::json!({"deleted": id}));
            changed(&d, r, Affected::Organization(id)).await
        }
    }
}

pub async fn run_users(cmd: UsersCommand, database: &DatabaseArgs) -> ExitCode {
    let (d, actor) = match directory(&cmd.db, database).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    match cmd.action {
        UsersAction::List {
            email,
            organization,
            limit,
            cursor,
        } => print(
            d.list_users(
                &UserFilter {
                    email,
                    organization,
                },
                limit,
                cursor.as_deref(),
            )
            .await,
        ),
        UsersAction::Get { id } => print(d.get_user(&id).await),
        UsersAction::Deactivate { id } => {
            let r = d.set_user_active(&actor, &id, false).await;
            changed(&d, r, Affected::User(id)).await
        }
        UsersAction::Reactivate { id } => {
            let r = d.set_user_active(&actor, &id, true).await;
            changed(&d, r, Affected::User(id)).await
        }
    }
}

pub async fn run_memberships(cmd: MembershipsCommand, database: &DatabaseArgs) -> ExitCode {
    let (d, actor) = match directory(&cmd.db, database).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let (r, user, organization) = match cmd.action {
        MembershipsAction::Add {
            user,
            organization,
            role,
        } => (
            print_value(d.add_membership(&actor, &user, &organization, &role).await),
            user,
            organization,
        ),
        MembershipsAction::SetRole {
            user,
            organization,
            role,
        } => (
            print_value(d.set_membership_role(&actor, &user, &organization, &role).await),
            user,
            organization,
        ),
        MembershipsAction::RoleSource {
            user,
            organization,
            source,
        } => {
            let source = match source {
                SourceArg::Idp => RoleSource::Idp,
                SourceArg::Operator => RoleSource::Operator,
            };
            let r = d
                .set_membership_role_source(&actor, &user, &organization, source)
                .await;
            (print_value(r), user, organization)
        }
        MembershipsAction::Deactivate { user, organization } => (
            print_value(d.set_membership_active(&actor, &user, &organization, false).await),
            user,
            organization,
        ),
        MembershipsAction::Reactivate { user, organization } => (
            print_value(d.set_membership_active(&actor, &user, &organization, true).await),
            user,
            organization,
        ),
        MembershipsAction::Remove { user, organization } => (
            d.remove_membership(&actor, &user, &organization)
                .await
                .map(|()| serde_json::json!({"removed": {"user_id": user, "organization_id": organization}})),
            user,
            organization,
        ),
    };
    changed(&d, r, Affected::Membership(user, organization)).await
}

fn print_value<T: Serialize>(
    r: crate::directory::Result<T>,
) -> crate::directory::Result<serde_json::Value> {
    r.map(|v| serde_json::to_value(v).unwrap_or_default())
}
