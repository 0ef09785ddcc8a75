//! The command line: `idsync [serve]` and the subcommands `check`, `token inspect`,
//! `orgs|users|memberships`, `migrate`, `healthcheck`. Each subcommand returns an exit code; `main` stays
//! thin. The serve flags themselves live in `config`.

mod check;
mod directory;
mod healthcheck;
mod inspect;
mod migrate;
mod reconcile;

pub use check::run as check;
pub use directory::{
    MembershipsCommand, OrgsCommand, UsersCommand, run_memberships, run_orgs, run_users,
};
pub use healthcheck::{HealthcheckArgs, run as healthcheck};
pub use inspect::{InspectArgs, run as inspect};
pub use migrate::{MigrateAction, MigrateArgs, run as migrate};
pub use reconcile::{ReconcileArgs, run as reconcile};

use crate::config::{DatabaseArgs, ServeArgs, Settings};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// idsync: an OIDC identity-sync sidecar. Verifies bearer JWTs against your IdP's keys, syncs users and
/// tenants into your database, and forwards requests to your app with a trusted identity in headers.
#[derive(Debug, Parser)]
#[command(name = "idsync", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// With no subcommand, idsync serves.
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl Cli {
    /// `--worker-threads` for the commands that take the serve flags (0: one per usable CPU); the other
    /// subcommands take the default.
    pub fn worker_threads(&self) -> u16 {
        match &self.command {
            Some(Command::Serve(args) | Command::Check(args)) => args.worker_threads_hint(),
            None => self.serve.worker_threads_hint(),
            Some(_) => 0,
        }
    }

    /// The settings `serve` would run with (the flags given at the top level or after `serve`).
    pub fn serve_settings(&self) -> Result<Settings, Vec<String>> {
        match &self.command {
            Some(Command::Serve(args)) => args.validate(&self.db),
            _ => self.serve.validate(&self.db),
        }
    }
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
    Orgs(OrgsCommand),
    /// Users, straight on the database.
    Users(UsersCommand),
    /// Memberships, straight on the database.
    Memberships(MembershipsCommand),
    /// Exit 0 when the local idsync is ready (for exec probes in images without a shell).
    Healthcheck(HealthcheckArgs),
    /// Make the rows agree with the IdP: read every user, organization and membership through its admin
    /// API, create or update what it has, mark inactive what it disabled or no longer has.
    ///
    /// Examples: `idsync reconcile --issuer https://sso.example.com/realms/acme --client-id idsync-reconcile
    /// --secret-file /etc/idsync/reconcile/secret --dry-run`;
    /// `idsync reconcile --issuer https://acme.frontegg.com,dialect=frontegg --client-id <env client id>
    /// --secret-file /etc/idsync/reconcile/api-key --admin-url https://api.us.frontegg.com`.
    Reconcile(Box<ReconcileArgs>),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Decode a token, verify it, and explain what idsync would do with it (never prints the signature).
    ///
    /// Takes the same flags and environment as `serve`. Examples:
    /// `idsync token inspect eyJ…`, `pbpaste | idsync token inspect - --output json`,
    /// `idsync token inspect --jwks-file saved-jwks.json eyJ…` (no network at all).
    Inspect(Box<InspectArgs>),
}

/// Validates serve-style flags, printing every problem; exit code 2 on failure.
pub fn settings_or_exit(args: &ServeArgs, db: &DatabaseArgs) -> Result<Settings, ExitCode> {
    args.validate(db).map_err(|problems| {
        eprintln!(
            "idsync: the configuration has {} problem(s):",
            problems.len()
        );
        for p in &problems {
            eprintln!("  - {p}");
        }
        eprintln!("Run `idsync --help` for the flag reference.");
        ExitCode::from(2)
    })
}
