//! The benchmark's pass-through baseline: idsync's own listener (`http::server`) and forwarding code
//! (`http::proxy::Upstream`, lanes included) with no authentication, so "idsync against a bare proxy"
//! compares proxy with proxy.
//! Run: `cargo run --release --example passthrough -- 127.0.0.1:8081 http://127.0.0.1:3000`

use axum::body::Body;
use axum::response::IntoResponse;
use idsync::http::proxy::{Lane, Upstream};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

// The same allocator as idsync's binary, so the comparison stays proxy against proxy.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Forward(Upstream);

impl idsync::http::server::Handler for Forward {
    async fn call(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
        peer: SocketAddr,
        lane: Option<Arc<Lane>>,
    ) -> http::Response<Body> {
        match self
            .0
            .forward(req.map(Body::new), peer, lane.as_deref(), None)
            .await
        {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    }
}

// One thread, as idsync runs on one core.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8081".into());
    let upstream = url::Url::parse(
        &args
            .next()
            .unwrap_or_else(|| "http://127.0.0.1:3000".into()),
    )?;
    let upstream = Upstream::new(
        &upstream,
        Duration::from_secs(5),
        Duration::from_secs(60),
        idsync::http::forwarded::TrustedProxies::default(),
        None,
    )
    .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("passthrough listening on {}", listener.local_addr()?);
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    idsync::http::server::serve(
        listener,
        Arc::new(Forward(upstream)),
        Duration::from_secs(10),
        shutdown,
    )
    .await;
    Ok(())
}
