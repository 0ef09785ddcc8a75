//! Forwarding to the upstream app: streaming bodies both ways (trailers included, so gRPC passes),
//! hop-by-hop headers removed (RFC 9110 section 7.6.1), forwarding headers set (`forwarded`), WebSocket
//! upgrades spliced through until the token that opened them expires. Other `Upgrade` protocols are not
//! tunnelled: the request goes on as a plain one. The upstream speaks HTTP/1.1, or HTTP/2 with prior
//! knowledge for an `h2c://` upstream.
//!
//! A client's HTTP/1.1 connection that sends a second request gets an upstream connection of its own (a
//! [`Lane`]), driven by the task that serves the client, so a request and its answer cross no task and no
//! shared pool. First requests, upgrades, HTTP/2 and requests past `MAX_LANES` use the shared pool. A
//! lane's idle connection outlives its client as a spare for the next lane, as a pooled one would.

use super::error::ApiError;
use axum::body::Body;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

pub struct Upstream {
    client: Client<HttpConnector, Body>,
    trusted: super::forwarded::TrustedProxies,
    /// The longest a WebSocket tunnel stays open, token or not (`None`: only the token's `exp` bounds it).
    websocket_max_lifetime: Option<Duration>,
    scheme: http::uri::Scheme,
    /// HTTP/2 with prior knowledge (`h2c://`), else HTTP/1.1.
    http2: bool,
    authority: http::uri::Authority,
    /// Path prefix of the upstream URL, without a trailing slash.
    base_path: String,
    response_timeout: Duration,
    /// The pool's connector and the upstream's origin, for a lane's own connection.
    connector: HttpConnector,
    origin: Uri,
    /// Lane connections open now, across all client connections (spares included).
    lanes: Arc<AtomicUsize>,
    spares: Arc<Spares>,
}

/// Upstream connections held by lanes at most; past this, requests share the pool. It bounds what
/// idsync holds open against the app when many clients keep connections alive (as the pool keeps at
/// most 256 idle ones).
const MAX_LANES: usize = 256;

/// A lane connection that has carried nothing for this long may meet the app's keep-alive timer (Node's
/// default is 5 s) as a request is written on it: such a request, if replaying it is safe, is copied
/// first. A connection used more recently is taken as it is, with no copy on the busy path.
const IDLE_BEFORE_REPLAY: Duration = Duration::from_secs(1);

/// Why a request found no answer.
enum Failure {
    Connect,
    /// The connection closed or failed after the request went out, before any answer.
    Closed,
    /// The answer was not HTTP.
    Invalid,
    /// The request could not be sent as it was (its body failed: the client left mid-upload).
    Unsendable,
}

impl Failure {
    fn of(e: &hyper::Error) -> Self {
        if e.is_parse() {
            Failure::Invalid
        } else if e.is_user() {
            Failure::Unsendable
        } else {
            Failure::Closed
        }
    }
}

/// Counts and logs a request sent a second time (see [`Replay`]).
fn replaying(why: &dyn std::fmt::Display) {
    static REPLAYED: std::sync::LazyLock<metrics::Counter> =
        std::sync::LazyLock::new(|| metrics::counter!("idsync_upstream_replays_total"));
    REPLAYED.increment(1);
    tracing::debug!(
        error = %why,
        "the upstream connection closed as a request went out on it (the app's keep-alive timer, most \
         likely); sent again on another"
    );
}

/// A copy of a request that may be sent twice: an idempotent method (RFC 9110 section 9.2.2) and no
/// body, so the app cannot tell a second copy from a retry of its own client.
struct Replay(http::request::Parts);

impl Replay {
    fn of(req: &Request<Body>) -> Option<Self> {
        let idempotent = matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        if !idempotent || !hyper::body::Body::is_end_stream(req.body()) {
            return None;
        }
        let mut parts = Request::new(()).into_parts().0;
        parts.method = req.method().clone();
        parts.uri = req.uri().clone();
        parts.version = req.version();
        parts.headers = req.headers().clone();
        Some(Self(parts))
    }

    fn request(self) -> Request<Body> {
        Request::from_parts(self.0, Body::empty())
    }
}

/// RFC 9110 section 7.6.1. Not `Trailer`: it names the trailer fields end to end, and hyper sends an
/// HTTP/1.1 client only the trailers it declares.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

impl Upstream {
    /// `url` is the validated upstream (`http://` or `h2c://` with a host, see `config`).
    pub fn new(
        url: &url::Url,
        connect_timeout: Duration,
        response_timeout: Duration,
        trusted: super::forwarded::TrustedProxies,
        websocket_max_lifetime: Option<Duration>,
    ) -> Result<Self, http::uri::InvalidUri> {
        let authority = http::uri::Authority::try_from(url.authority())?;
        let scheme = http::uri::Scheme::HTTP;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let http2 = url.scheme() == "h2c";
        let origin = Uri::try_from(format!("http://{authority}/"))?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .http2_only(http2)
            // Dead HTTP/2 connections are found by pings, not by the next request failing on them.
            .http2_keep_alive_interval(Some(Duration::from_secs(30)))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .timer(hyper_util::rt::TokioTimer::new())
            .build(connector.clone());
        Ok(Self {
            client,
            trusted,
            websocket_max_lifetime,
            scheme,
            http2,
            authority,
            base_path: url.path().trim_end_matches('/').to_owned(),
            response_timeout,
            connector,
            origin,
            lanes: Arc::default(),
            spares: Arc::default(),
        })
    }

    /// Forwards `req` (whose owned headers are already stripped and injected) and returns the upstream's
    /// answer. `valid_until` (Unix seconds) is the `exp` of the token that admitted the request: a
    /// WebSocket it opens is closed then.
    /// `lane`: the client connection's own upstream connection, for an HTTP/1.1 client.
    pub async fn forward(
        &self,
        mut req: Request<Body>,
        client_addr: SocketAddr,
        lane: Option<&Lane>,
        valid_until: Option<i64>,
    ) -> Result<Response<Body>, ApiError> {
        // A WebSocket over HTTP/2 would need extended CONNECT (RFC 8441): not offered to h2c upstreams.
        let upgrade = if self.http2 {
            None
        } else {
            upgrade_protocol(req.headers())
        };
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));

        // The client's path and query as they came (a cheap copy) unless the upstream URL has a path.
        let path_and_query = match (req.uri().path_and_query(), self.base_path.is_empty()) {
            (Some(p), true) => p.clone(),
            (p, _) => {
                let p = p.map_or("/", |p| p.as_str());
                http::uri::PathAndQuery::try_from(format!("{}{p}", self.base_path)).map_err(
                    |e| ApiError::InvalidRequest(format!("cannot build the upstream URI: {e}")),
                )?
            }
        };
        // When the request target names the host (HTTP/2's `:authority`, an HTTP/1.1 absolute-form
        // target), that is the host, whatever `Host` says (RFC 9113 section 8.3.1, RFC 9112 section
        // 3.2.2): it becomes `Host` for the forwarding headers and an HTTP/1.1 app.
        if let Some(authority) = req.uri().authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        let uri = Uri::from_parts({
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(self.authority.clone());
            parts.path_and_query = Some(path_and_query);
            parts
        })
        .map_err(|e| ApiError::InvalidRequest(format!("cannot build the upstream URI: {e}")))?;
        *req.uri_mut() = uri;
        // The upstream's protocol, whatever the client spoke: an HTTP/2 request is re-spoken as 1.1 to
        // an http:// upstream, and any request as HTTP/2 to an h2c:// one.
        *req.version_mut() = if self.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let headers = req.headers_mut();
        // `TE: trailers` is hop-by-hop, but gRPC servers require it and it means the same on the next
        // hop: kept when the client sent it and the upstream speaks HTTP/2 (the only TE value HTTP/2
        // allows).
        let te_trailers = self.http2
            && headers
                .get_all(header::TE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        remove_hop_by_hop(headers);
        // Request trailers are never forwarded (below), so nothing is declared either.
        headers.remove(header::TRAILER);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(proto) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, proto.clone());
        }
        super::forwarded::apply(headers, &self.trusted, client_addr);
        if self.http2 {
            // `:authority` is the upstream's address; the client's host went on as X-Forwarded-Host.
            headers.remove(header::HOST);
        }
        ensure_request_id(headers);

        static UPSTREAM_SECONDS: std::sync::LazyLock<metrics::Histogram> =
            std::sync::LazyLock::new(|| metrics::histogram!("idsync_upstream_seconds"));
        // A gRPC call's deadline is its client's (`grpc-timeout`, passed on): a long call must not be cut
        // at --upstream-timeout, and one without a deadline has none here either.
        let limit = if super::grpc::is_grpc(req.headers()) {
            super::grpc::timeout(req.headers()).map(|t| t + GRPC_DEADLINE_SLACK)
        } else {
            Some(self.response_timeout)
        };
        // Request trailers would bypass the header policy (a trailer named X-User-Id reaches the app
        // after the stripped headers): the body goes on without them.
        // A body already at its end (most GETs) has no trailers to drop: no wrapper, no allocation.
        let req = if hyper::body::Body::is_end_stream(req.body()) {
            req
        } else {
            req.map(|body| Body::new(WithoutTrailers(body)))
        };
        // A WebSocket's connection becomes its tunnel, and HTTP/2 multiplexes one shared connection.
        let lane = lane.filter(|_| upgrade.is_none() && !self.http2);
        let started = std::time::Instant::now();
        let result = match limit {
            Some(limit) => tokio::time::timeout(limit, self.send(req, lane)).await,
            None => Ok(self.send(req, lane).await),
        };
        UPSTREAM_SECONDS.record(started.elapsed().as_secs_f64());
        let mut response = match result {
            Err(_) => return Err(ApiError::UpstreamTimeout),
            Ok(Err(failure)) => {
                return Err(ApiError::UpstreamUnavailable(match failure {
                    Failure::Connect => "cannot connect to the upstream".into(),
                    Failure::Closed => "the upstream closed the connection".into(),
                    Failure::Invalid => "the upstream's answer was not HTTP".into(),
                    Failure::Unsendable => "the request could not be sent whole".into(),
                }));
            }
            Ok(Ok(r)) => r,
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let lifetime = self.tunnel_lifetime(valid_until);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        let (mut client, mut upstream) =
                            (TokioIo::new(client), TokioIo::new(upstream));
                        let splice = tokio::io::copy_bidirectional(&mut client, &mut upstream);
                        match lifetime {
                            None => {
                                let _ = splice.await;
                            }
                            Some(d) => {
                                if tokio::time::timeout(d, splice).await.is_err() {
                                    tracing::info!(
                                        "WebSocket closed: the token that opened it expired"
                                    );
                                    metrics::counter!("idsync_websocket_closed_total", "reason" => "expired").increment(1);
                                }
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
                }
            });
            let (parts, _) = response.into_parts();
            return Ok(Response::from_parts(parts, Body::empty()));
        }

        remove_hop_by_hop(response.headers_mut());
        Ok(response.map(Body::new))
    }
}

impl Upstream {
    /// Sends on the lane when it may carry this request, else through the shared pool.
    async fn send(
        &self,
        req: Request<Body>,
        lane: Option<&Lane>,
    ) -> Result<Response<hyper::body::Incoming>, Failure> {
        match lane {
            Some(lane) if lane.claim() => self.send_on_lane(lane, req).await,
            // Not replayed: the pool does not say whether a connection was new or kept alive, and a
            // request that failed on a new one met a crash (see `send_on_lane`).
            _ => self.send_pooled(req).await,
        }
    }

    async fn send_pooled(
        &self,
        req: Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, Failure> {
        self.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                return Failure::Connect;
            }
            std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<hyper::Error>())
                .map_or(Failure::Closed, Failure::of)
        })
    }

    async fn send_on_lane(
        &self,
        lane: &Lane,
        mut req: Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, Failure> {
        // `reused`: a kept-alive connection that may have sat idle long enough to meet the app's
        // keep-alive timer (a spare, up to SPARE_TTL). A new connection that fails on its first request
        // met a crash, not a timer: that request is not sent again.
        let (mut sender, reused) = match lane.take() {
            Some(taken) => taken,
            None => match self.open_lane(lane).await? {
                Some(opened) => opened,
                None => return self.send_pooled(req).await,
            },
        };
        // The connection speaks origin-form; `Host` stays the client's, else it is the upstream's (as the
        // pool writes it: no default port).
        if !req.headers().contains_key(header::HOST) {
            let host = match self.authority.port_u16() {
                Some(port) if port != 80 => format!("{}:{port}", self.authority.host()),
                _ => self.authority.host().to_owned(),
            };
            if let Ok(host) = HeaderValue::from_str(&host) {
                req.headers_mut().insert(header::HOST, host);
            }
        }
        if let Some(pq) = req.uri().path_and_query().cloned() {
            *req.uri_mut() = Uri::from(pq);
        }
        // Ready once the previous answer has been read to its end; an error means the app closed it.
        if sender.ready().await.is_err() {
            return self.send_pooled(absolute(req, &self.authority)).await;
        }
        let replay = if reused { Replay::of(&req) } else { None };
        match sender.try_send_request(req).await {
            Ok(response) => {
                lane.give_back(sender);
                Ok(response)
            }
            // Never written (the connection closed as it was taken): the pool gets it whole.
            Err(mut e) => match (e.take_message(), replay) {
                (Some(req), _) => self.send_pooled(absolute(req, &self.authority)).await,
                // Written, and the connection closed or failed before any answer: the app's keep-alive
                // timer closing it as the request arrived, which HTTP/1.1 cannot tell from a crash.
                // Sent once more, on another connection, when that is safe (RFC 9110 section 9.2.2). An
                // answer cut off inside its head looks the same; none of it has reached the client.
                (None, replay) => match (Failure::of(e.error()), replay) {
                    (Failure::Closed, Some(replay)) => {
                        replaying(e.error());
                        self.send_pooled(absolute(replay.request(), &self.authority))
                            .await
                    }
                    (failure, _) => Err(failure),
                },
            },
        }
    }

    /// A connection for `lane` (a spare, else a new one through the pool's connector, with its
    /// timeouts), or `None` when lanes are at their bound (the pool then serves); `true` for a spare.
    async fn open_lane(
        &self,
        lane: &Lane,
    ) -> Result<Option<(hyper::client::conn::http1::SendRequest<Body>, bool)>, Failure> {
        if let Some((sender, open)) = self.spares.adopt() {
            lane.install(open, &self.spares);
            return Ok(Some((sender, true)));
        }
        let Some(count) = LaneCount::take(&self.lanes) else {
            return Ok(None);
        };
        let io = tower::ServiceExt::oneshot(self.connector.clone(), self.origin.clone())
            .await
            .map_err(|_| Failure::Connect)?;
        let (sender, io) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|_| Failure::Closed)?;
        let open = Open {
            io: Box::pin(io),
            _count: count,
        };
        lane.install(open, &self.spares);
        Ok(Some((sender, false)))
    }
}

/// `req`'s origin-form target made absolute again, as the pool wants it.
fn absolute(mut req: Request<Body>, authority: &http::uri::Authority) -> Request<Body> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority.clone());
    parts.path_and_query = req.uri().path_and_query().cloned();
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    req
}

type LaneIo = hyper::client::conn::http1::Connection<TokioIo<tokio::net::TcpStream>, Body>;

/// A lane's upstream connection, counted against [`MAX_LANES`] while it is open.
struct Open {
    io: Pin<Box<LaneIo>>,
    _count: LaneCount,
}

/// One client connection's own upstream connection. The task serving that client polls [`Lane::drive`]
/// beside it, so the upstream's bytes are read and written in the same task as the client's.
#[derive(Default)]
pub struct Lane(Mutex<LaneState>);

#[derive(Default)]
struct LaneState {
    /// Requests the client connection has sent so far (a first request goes to the pool: most clients
    /// that send one request per connection never need a connection of their own).
    requests: u8,
    /// The idle request sender, if the connection is open and not carrying a request.
    sender: Option<hyper::client::conn::http1::SendRequest<Body>>,
    conn: Option<Open>,
    /// The serving task, woken when a connection is installed.
    waker: Option<Waker>,
    /// Where the connection goes if the client leaves while it is idle.
    spares: Option<Arc<Spares>>,
    /// When the connection last took a request (or was installed); it can have been idle no longer
    /// than that.
    last_sent: Option<std::time::Instant>,
}

impl Lane {
    fn state(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this request may use the lane: not the connection's first.
    fn claim(&self) -> bool {
        let mut state = self.state();
        state.requests = state.requests.saturating_add(1);
        state.requests > 1
    }

    /// The idle sender, and whether its connection may have been idle for [`IDLE_BEFORE_REPLAY`].
    fn take(&self) -> Option<(hyper::client::conn::http1::SendRequest<Body>, bool)> {
        let mut state = self.state();
        let sender = state.sender.take().filter(|s| !s.is_closed())?;
        let now = std::time::Instant::now();
        let idle = state
            .last_sent
            .is_some_and(|t| now.duration_since(t) >= IDLE_BEFORE_REPLAY);
        state.last_sent = Some(now);
        Some((sender, idle))
    }

    fn give_back(&self, sender: hyper::client::conn::http1::SendRequest<Body>) {
        let mut state = self.state();
        if state.conn.is_some() {
            state.sender = Some(sender);
        }
    }

    fn install(&self, open: Open, spares: &Arc<Spares>) {
        let mut state = self.state();
        // Replacing a connection closes the one before (it had no sender left).
        state.conn = Some(open);
        state.sender = None;
        state.last_sent = Some(std::time::Instant::now());
        if state.spares.is_none() {
            state.spares = Some(spares.clone());
        }
        if let Some(w) = &state.waker {
            w.wake_by_ref();
        }
    }

    /// Reads and writes the lane's connection; never resolves (the caller selects it with the client's
    /// connection, and dropping it closes the upstream connection).
    pub fn drive(&self) -> impl std::future::Future<Output = std::convert::Infallible> + '_ {
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            let mut state = self.state();
            if !state
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                state.waker = Some(cx.waker().clone());
            }
            if let Some(open) = &mut state.conn
                && let Poll::Ready(result) = open.io.as_mut().poll(cx)
            {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
                state.conn = None;
                state.sender = None;
            }
            Poll::Pending
        })
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let state = self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        // Closed instead (the default) if it is carrying a request, closed, or never had a lane.
        if let (Some(spares), Some(sender), Some(open)) =
            (state.spares.take(), state.sender.take(), state.conn.take())
            && sender.is_ready()
        {
            spares.park(sender, open);
        }
    }
}

/// How long a spare waits for a lane. It is not read while it waits, so an app that closed it is noticed
/// when it is adopted (its end of stream is read before the request is written, and a request never
/// written goes to the pool).
const SPARE_TTL: Duration = Duration::from_secs(30);

/// Idle lane connections whose clients left, newest last.
#[derive(Default)]
struct Spares(Mutex<std::collections::VecDeque<Spare>>);

struct Spare {
    sender: hyper::client::conn::http1::SendRequest<Body>,
    open: Open,
    parked: std::time::Instant,
}

impl Spares {
    /// The queue with the spares that waited too long closed.
    fn fresh(
        &self,
        now: std::time::Instant,
    ) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Spare>> {
        let mut queue = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while queue
            .front()
            .is_some_and(|s| now.duration_since(s.parked) > SPARE_TTL)
        {
            queue.pop_front();
        }
        queue
    }

    fn park(&self, sender: hyper::client::conn::http1::SendRequest<Body>, open: Open) {
        let now = std::time::Instant::now();
        self.fresh(now).push_back(Spare {
            sender,
            open,
            parked: now,
        });
    }

    fn adopt(&self) -> Option<(hyper::client::conn::http1::SendRequest<Body>, Open)> {
        let mut queue = self.fresh(std::time::Instant::now());
        while let Some(spare) = queue.pop_back() {
            if !spare.sender.is_closed() {
                return Some((spare.sender, spare.open));
            }
        }
        None
    }
}

/// One open lane connection, counted against [`MAX_LANES`] until dropped.
struct LaneCount(Arc<AtomicUsize>);

impl LaneCount {
    fn take(lanes: &Arc<AtomicUsize>) -> Option<Self> {
        lanes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_LANES).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(lanes.clone()))
    }
}

impl Drop for LaneCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What idsync adds to a gRPC client's deadline before answering DEADLINE_EXCEEDED itself, so the app's
/// own answer to an expired deadline wins.
const GRPC_DEADLINE_SLACK: Duration = Duration::from_secs(1);

/// A request body with its trailers dropped (the data passes as it is).
struct WithoutTrailers(Body);

impl hyper::body::Body for WithoutTrailers {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.0).poll_frame(cx) {
            // Trailers end a body: ending it here drops them.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => Poll::Ready(None),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.size_hint()
    }
}

impl Upstream {
    /// How long a tunnel may stay open: until the token's `exp`, and no longer than the configured maximum.
    fn tunnel_lifetime(&self, valid_until: Option<i64>) -> Option<Duration> {
        let by_token = valid_until.map(|exp| {
            Duration::from_secs(exp.saturating_sub(crate::oidc::unix_now()).max(0) as u64)
        });
        match (by_token, self.websocket_max_lifetime) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// `websocket` if this is a WebSocket upgrade request (`Connection: upgrade` plus `Upgrade: websocket`);
/// any other protocol is not spliced (its `Upgrade` is dropped with the hop-by-hop headers).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let websocket = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        });
    (wants && websocket).then(|| HeaderValue::from_static("websocket"))
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none of them: one walk over the names they have costs a fraction of a hashed
    // removal per hop-by-hop name.
    let (mut any, mut only_connection) = (false, true);
    for k in headers.keys().filter(|k| HOP_BY_HOP.contains(k)) {
        any = true;
        only_connection &= k == header::CONNECTION;
    }
    if !any {
        return;
    }
    // Responses usually carry only `Connection: keep-alive` (nginx, most app servers). It names no
    // header that is there (a `Keep-Alive` would have failed `only_connection`): one removal, no lists.
    if only_connection
        && headers.get_all(header::CONNECTION).iter().all(|v| {
            v.as_bytes().split(|&b| b == b',').all(|t| {
                let t = t.trim_ascii();
                t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive")
            })
        })
    {
        headers.remove(header::CONNECTION);
        return;
    }
    let doomed: Vec<HeaderName> = {
        // Headers named in `Connection` are hop-by-hop too (RFC 9110 section 7.6.1).
        let named: Vec<&str> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        headers
            .keys()
            .filter(|k| {
                HOP_BY_HOP.contains(k) || named.iter().any(|n| n.eq_ignore_ascii_case(k.as_str()))
            })
            .cloned()
            .collect()
    };
    for n in doomed {
        headers.remove(n);
    }
}

/// Keeps a client's `X-Request-Id` if it is short printable text, else generates one, so the app's logs
/// and idsync's can be joined.
fn ensure_request_id(headers: &mut HeaderMap) {
    // A constant: a `&str` name is parsed and checked again on every lookup.
    const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    let ok = headers.get(&X_REQUEST_ID).is_some_and(|v| {
        !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| (0x21..0x7f).contains(b))
    });
    if !ok {
        headers.insert(X_REQUEST_ID, request_id());
    }
}

/// A fresh request id shaped like a UUID v4, without a system call per request (`Uuid::new_v4` asks
/// the kernel for randomness each time): a counter mixed with a per-process random seed by SplitMix64,
/// a bijection, so ids never repeat within a process and collide across processes only by chance.
fn request_id() -> HeaderValue {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: LazyLock<[u64; 2]> = LazyLock::new(|| {
        let b = uuid::Uuid::new_v4().as_u128();
        [b as u64, (b >> 64) as u64]
    });
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let hi = mix(n.wrapping_add(SEED[0]));
    let lo = mix(n ^ SEED[1]);
    let id =
        uuid::Builder::from_random_bytes(((u128::from(hi) << 64) | u128::from(lo)).to_be_bytes())
            .into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_bytes(id.hyphenated().encode_lower(&mut buf).as_bytes())
        .expect("a UUID is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.append("x-secret-hop", HeaderValue::from_static("2"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn hop_by_hop_headers_go_without_a_connection_header_too() {
        let mut h = HeaderMap::new();
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), [header::ACCEPT]);
        let mut clean = HeaderMap::new();
        clean.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut clean);
        assert_eq!(clean.len(), 1);
    }

    #[test]
    fn connection_keep_alive_alone_takes_the_short_way_and_lists_still_name_headers() {
        // What nginx answers with: only `Connection` goes.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), [header::CONTENT_LENGTH]);
        // Two `Connection` lines, the second naming a header: the short way would keep `x-hop`.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static(" ,x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), [header::ACCEPT]);
        // `close` names a header called `close`, should one be there.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert("close", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn request_ids_are_uuids_and_do_not_repeat() {
        let ids: std::collections::HashSet<String> = (0..10_000)
            .map(|_| request_id().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 4, "{id}");
        }
    }

    #[test]
    fn websocket_upgrade_is_recognised() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_protocol(&h).unwrap(), "websocket");
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(
            upgrade_protocol(&h).is_none(),
            "only WebSocket is tunnelled"
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        h.remove(header::CONNECTION);
        assert!(upgrade_protocol(&h).is_none());
    }
}
