//! Loopback stand-ins for the two things idsync sits between: an IdP (discovery + JWKS from keys
//! generated at run time, with fault switches) and an upstream app that echoes what it received.
//! Used by the demo, the tests and the benchmarks; `serve` never uses them.

mod issuer;
mod upstream;

pub use issuer::{IssuerMode, LocalIssuer, SigningAlg};
pub use upstream::EchoUpstream;
