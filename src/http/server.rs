//! The accept loop for both listeners: HTTP/1.1 with upgrades and HTTP/2 with prior knowledge (h2c,
//! what gRPC clients speak in cleartext) told apart by the connection preface, the peer address for the
//! handler, a header-read timeout (without a timer hyper never times out a client that sends headers slowly, so a
//! slowloris could hold connections open for ever), and graceful shutdown that lets in-flight requests end.

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

/// Streams one HTTP/2 connection may have open at once (hyper's default is unbounded for servers).
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// The largest header block an HTTP/2 client may send, as for HTTP/1.1 (hyper's HTTP/1.1 limit is
/// about 400 KiB of buffer; 64 KiB is ample for a bearer token and cookies).
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// What a listener runs for each request.
pub trait Handler: Send + Sync + 'static {
    fn call(
        self: Arc<Self>,
        req: hyper::Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = http::Response<Body>> + Send + 'static;
}

/// An axum router as a handler (the admin listener), with the peer as `ConnectInfo`.
pub struct Routes(pub Router);

impl Handler for Routes {
    fn call(
        self: Arc<Self>,
        mut req: hyper::Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = http::Response<Body>> + Send + 'static {
        req.extensions_mut().insert(ConnectInfo(peer));
        let router = self.0.clone();
        async move {
            match router.oneshot(req.map(Body::new)).await {
                Ok(r) => r,
                Err(e) => match e {},
            }
        }
    }
}

/// Serves `handler` on `listener` until `shutdown` turns true, then waits for open connections to finish
/// their in-flight requests (the caller bounds that wait).
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    header_read_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let (close_tx, close_rx) = watch::channel(());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let mut shutdown = shutdown.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let answer = handler.clone().call(req, peer);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            // HTTP/2 has no header-read timeout: a client that opens a connection and never finishes a
            // request is bounded by keep-alive pings instead, and each stream by the upstream timeouts.
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(20))
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .max_header_list_size(MAX_HEADER_LIST_SIZE);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                }
                () = stopped(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                }
            }
            drop(close_rx);
        });
    }
    drop(listener);
    drop(close_rx);
    close_tx.closed().await;
}

/// Resolves once shutdown is signalled, without holding the channel's read guard across later awaits.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
