//! An upstream app that answers every request with what it received (method, path, headers, body size,
//! the address its connection came from),
//! streams large bodies on `/stream/MIB`, answers late on `/slow/MS`, and echoes WebSocket messages on `/ws`.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures_util::StreamExt;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Clone)]
pub struct EchoUpstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    _server: Arc<Guard>,
}

struct Guard(tokio::task::JoinHandle<()>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl EchoUpstream {
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let router = Router::new()
            .route("/stream/{mib}", get(stream))
            .route("/ws", get(ws))
            .route("/slow/{ms}", any(slow))
            .fallback(any(echo))
            .with_state(hits.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await;
        });
        Ok(Self {
            addr,
            hits,
            _server: Arc::new(Guard(server)),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests reached the upstream.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn echo(
    State(hits): State<Arc<AtomicUsize>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(serde_json::Value::Array(a)) => a.push(json!(v)),
            _ => {
                headers.insert(name.as_str().to_owned(), json!([v]));
            }
        }
    }
    // Count the body as it streams, without holding it.
    let mut stream = body.into_data_stream();
    let mut body_bytes: u64 = 0;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => body_bytes += c.len() as u64,
            Err(_) => break,
        }
    }
    axum::Json(json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body_bytes,
        "peer": peer.to_string(),
    }))
    .into_response()
}

async fn stream(State(hits): State<Arc<AtomicUsize>>, Path(mib): Path<usize>) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let chunks = mib * 16;
    let body = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    Body::from_stream(body).into_response()
}

async fn ws(
    State(hits): State<Arc<AtomicUsize>>,
    upgrade: WebSocketUpgrade,
    req_headers: http::HeaderMap,
) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    let user = req_headers
        .get("x-user-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    upgrade.on_upgrade(move |mut socket| async move {
        let _ = socket
            .send(Message::Text(format!("hello {user}").into()))
            .await;
        while let Some(Ok(msg)) = socket.recv().await {
            let echoed = match msg {
                Message::Text(t) => socket.send(Message::Text(t)).await.is_ok(),
                Message::Close(_) => false,
                _ => true,
            };
            if !echoed {
                break;
            }
        }
    })
}

async fn slow(State(hits): State<Arc<AtomicUsize>>, Path(ms): Path<u64>) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    "slow answer".into_response()
}
