//! The accept loop for both listeners: HTTP/1.1 with upgrades and HTTP/2 with prior knowledge (h2c,
//! what gRPC clients speak in cleartext) told apart by the connection preface, the peer address for the
//! handler, a header-read timeout (without a timer hyper never times out a client that sends headers slowly, so a
//! slowloris could hold connections open for ever), and graceful shutdown that lets in-flight requests end.

use super::proxy::Lane;
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

/// Streams one HTTP/2 connection may have open at once (hyper's default is unbounded for servers).
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// The largest header block an HTTP/2 client may send, as for HTTP/1.1 (hyper's HTTP/1.1 limit is
/// about 400 KiB of buffer; 64 KiB is ample for a bearer token and cookies).
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// What a listener runs for each request. `lane`: the client connection's own upstream connection (an
/// HTTP/1.1 client's; `None` for HTTP/2), driven by the task that serves the connection.
pub trait Handler: Send + Sync + 'static {
    fn call(
        self: Arc<Self>,
        req: hyper::Request<Incoming>,
        peer: SocketAddr,
        lane: Option<Arc<Lane>>,
    ) -> impl Future<Output = http::Response<Body>> + Send + 'static;
}

/// An axum router as a handler (the admin listener), with the peer as `ConnectInfo`.
pub struct Routes(pub Router);

impl Handler for Routes {
    fn call(
        self: Arc<Self>,
        mut req: hyper::Request<Incoming>,
        peer: SocketAddr,
        _lane: Option<Arc<Lane>>,
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
            // Which protocol, from the first bytes, within the header-read timeout: a client that
            // connects and sends nothing (or part of the HTTP/2 preface) is dropped like a slow header.
            let Some(http2) = sniff_http2(&stream, header_read_timeout).await else {
                drop(close_rx);
                return;
            };
            let activity = Arc::new(Activity::default());
            // Only HTTP/2 connections are watched for idleness (HTTP/1.1 has its header-read timeout).
            let seen = http2.then(|| activity.clone());
            // HTTP/1.1 carries one request at a time: one upstream connection serves the client's.
            let lane = (!http2).then(|| Arc::new(Lane::default()));
            let lane_for_requests = lane.clone();
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let handler = handler.clone();
                let guard = seen.as_ref().map(Activity::start);
                let lane = lane_for_requests.clone();
                // The handler's future is made inside this one, not captured by it: captured, it would
                // be laid out twice (rust-lang/rust#62958) and hyper moves this future per request.
                async move {
                    let response = handler.call(req, peer, lane).await;
                    Ok::<_, Infallible>(match guard {
                        None => response,
                        // In flight until the response body has been sent (a gRPC stream may outlive
                        // its headers by hours): the guard lives in the body.
                        Some(guard) => response.map(|body| {
                            Body::new(http_body_util::BodyExt::map_frame(body, move |frame| {
                                let _in_flight = &guard;
                                frame
                            }))
                        }),
                    })
                }
            });
            let io = TokioIo::new(stream);
            if http2 {
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                    .max_header_list_size(MAX_HEADER_LIST_SIZE);
                let conn = builder.serve_connection(io, service);
                tokio::pin!(conn);
                // HTTP/2 has no header-read timeout and any client answers pings, so an idle connection
                // (no stream in flight, none started for a while, a HEADERS frame never finished) is
                // closed here.
                let idle = idle_for(&activity, header_read_timeout.max(H2_IDLE_TIMEOUT));
                tokio::pin!(idle);
                tokio::select! {
                    result = conn.as_mut() => log_end(result.err(), peer),
                    () = &mut idle => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(H2_GOAWAY_GRACE, conn.as_mut()).await;
                    }
                    () = stopped(&mut shutdown) => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.as_mut().await;
                    }
                }
            } else {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read_timeout);
                let conn = builder.serve_connection(io, service).with_upgrades();
                tokio::pin!(conn);
                let lane = lane.expect("an HTTP/1.1 connection has a lane");
                let drive = lane.drive();
                tokio::pin!(drive);
                tokio::select! {
                    result = conn.as_mut() => log_end(result.err(), peer),
                    never = &mut drive => match never {},
                    () = stopped(&mut shutdown) => {
                        conn.as_mut().graceful_shutdown();
                        // In-flight requests still need their upstream connection read.
                        tokio::select! {
                            _ = conn.as_mut() => {}
                            never = &mut drive => match never {},
                        }
                    }
                }
            }
            drop(close_rx);
        });
    }
    drop(listener);
    drop(close_rx);
    close_tx.closed().await;
}

/// An HTTP/2 connection with no stream in flight is closed after this long without a new one.
const H2_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a connection told to go away (GOAWAY) gets to finish before it is dropped.
const H2_GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// The connection preface every HTTP/2 client sends first (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// `Some(true)` for HTTP/2 with prior knowledge, `Some(false)` for anything else (HTTP/1.x), `None` when
/// the client closed or sent nothing telling within `limit`. Peeks only: hyper reads the bytes again.
async fn sniff_http2(stream: &tokio::net::TcpStream, limit: Duration) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 24];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != PREFACE[..n] {
            return Some(false);
        }
        if n == PREFACE.len() {
            return Some(true);
        }
        // Part of the preface so far (a client writing it byte by byte): wait for more. Peeking again at
        // once would spin on the same bytes.
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Requests in flight on a connection and when the last one started or ended.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since the process's first connection.
    last: AtomicU64,
}

struct InFlight(Arc<Activity>);

impl Activity {
    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    fn touch(&self) {
        self.last.store(now_ms(), Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Resolves once the connection has had no request in flight for `limit`.
async fn idle_for(activity: &Activity, limit: Duration) {
    activity.touch();
    let limit_ms = limit.as_millis() as u64;
    loop {
        let last = activity.last.load(Ordering::Relaxed);
        let quiet = now_ms().saturating_sub(last);
        if activity.in_flight.load(Ordering::Relaxed) == 0 && quiet >= limit_ms {
            return;
        }
        let wait = if quiet >= limit_ms {
            limit_ms
        } else {
            limit_ms - quiet
        };
        tokio::time::sleep(Duration::from_millis(wait.max(100))).await;
    }
}

fn log_end(error: Option<hyper::Error>, peer: SocketAddr) {
    if let Some(e) = error {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// Resolves once shutdown is signalled, without holding the channel's read guard across later awaits.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
