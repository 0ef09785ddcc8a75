//! Loopback stand-ins for the two things idsync sits between: an IdP (discovery + JWKS from keys
//! generated at run time, with fault switches) and an upstream app that echoes what it received.
//! A crate of its own, a dev-dependency of idsync: used by the demo, the tests and the benchmarks, never
//! compiled into the `idsync` binary.

mod issuer;
mod upstream;

pub use issuer::{IssuerMode, LocalIssuer, SigningAlg};
pub use upstream::EchoUpstream;

/// Seconds since the Unix epoch, for claims.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
