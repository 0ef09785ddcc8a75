//! The binary's subcommands besides `serve`: `check`, `token inspect`, `orgs|users|memberships`,
//! `migrate`, `healthcheck`. Each returns an exit code; `main` stays thin.

mod check;
mod directory;
mod healthcheck;
mod inspect;
mod migrate;

pub use check::run as check;
pub use directory::{
    MembershipsCommand, OrgsCommand, UsersCommand, run_memberships, run_orgs, run_users,
};
pub use healthcheck::{HealthcheckArgs, run as healthcheck};
pub use inspect::{InspectArgs, run as inspect};
pub use migrate::run as migrate;

use crate::config::{ServeArgs, Settings};
use std::process::ExitCode;

/// Validates serve-style flags, printing every problem; exit code 2 on failure.
pub fn settings_or_exit(args: &ServeArgs) -> Result<Settings, ExitCode> {
    args.validate().map_err(|problems| {
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
