//! idsync: an OIDC identity-sync sidecar. Module map (arrows point down only):
//! `http` -> {`oidc`, `identity`}; `oidc` knows no IdP dialect; `identity` does no I/O;
//! `startup` is the one composition root. See docs/architecture.md.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod devkit;
pub mod directory;
pub mod http;
pub mod identity;
pub mod oidc;
pub mod provision;
pub mod startup;
pub mod telemetry;

#[cfg(test)]
mod fuzz_tests;
