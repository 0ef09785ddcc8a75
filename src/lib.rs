//! idsync: an OIDC identity-sync sidecar. Module map (arrows point down only):
//! `main` -> `cli` -> `startup` -> `config` -> `http` -> `directory`, `reconcile` -> `access` ->
//! {`oidc`, `provision`} -> `identity`; `telemetry` at the bottom. `oidc` knows no IdP dialect; `identity` does no I/O;
//! `provision` never sees HTTP; `http` never builds SQL; `startup` is the one composition root.
//! See docs/architecture.md.
#![forbid(unsafe_code)]

pub mod access;
pub mod cli;
pub mod config;
pub mod directory;
pub mod http;
pub mod identity;
pub mod oidc;
pub mod provision;
pub mod reconcile;
pub mod startup;
pub mod telemetry;

#[cfg(test)]
mod fuzz_tests;
