//! The benchmark's pass-through baseline: idsync's own forwarding code (`http::proxy::Upstream`) with no
//! authentication, so "idsync against a bare proxy" compares proxy with proxy.
//! Run: `cargo run --release --example passthrough -- 127.0.0.1:8081 http://127.0.0.1:3000`

use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use idsync::http::proxy::Upstream;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

// The same allocator as idsync's binary, so the comparison stays proxy against proxy.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8081".into());
    let upstream = url::Url::parse(
        &args
            .next()
            .unwrap_or_else(|| "http://127.0.0.1:3000".into()),
    )?;
    let upstream = Arc::new(
        Upstream::new(
            &upstream,
            Duration::from_secs(5),
            Duration::from_secs(60),
            idsync::http::forwarded::TrustedProxies::default(),
            None,
        )
        .map_err(anyhow::Error::msg)?,
    );
    let app = axum::Router::new().fallback(forward).with_state(upstream);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("passthrough listening on {}", listener.local_addr()?);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

async fn forward(
    State(upstream): State<Arc<Upstream>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    match upstream.forward(req, client, None).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}
