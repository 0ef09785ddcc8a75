//! Black-box tests: a real local issuer, a real echo upstream and the real sidecar on loopback ports.
//! All integration tests compile into this one binary.

#[macro_use]
mod db;

mod helpers;
mod hostile;

mod access;
mod architecture;
mod cli;
mod edge;
mod faults;
mod forward_auth;
mod grpc;
mod keys;
mod lifecycle;
mod monitoring;
mod operator;
mod otel;
mod proxy;
mod real_proxies;
mod reconcile;
mod soak;
mod startup;
mod streaming;
mod sync;
mod verify;
mod wycheproof;
