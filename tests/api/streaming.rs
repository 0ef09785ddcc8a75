//! Bodies stream through without buffering, and WebSocket upgrades are spliced through.

use crate::helpers::app;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

/// Peak resident memory of this process, in KiB (Linux).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_100_mib_body_streams_both_ways_with_flat_memory() {
    // The upload is answered only once the echo app has read all of it: give a busy machine time.
    let t = app().arg("--upstream-timeout").arg("60s").start().await;
    let token = t.issuer.mint(t.issuer.claims_for("streamer"));
    let before = peak_rss_kib();

    let chunk = bytes::Bytes::from(vec![b'y'; 64 * 1024]);
    let chunks = 1600; // 100 MiB
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    ));
    let echo = t
        .echo(t.http.put(t.url("/upload")).bearer_auth(&token).body(body))
        .await;
    assert_eq!(echo.status, 200);
    assert_eq!(echo.body["body_bytes"], 100 * 1024 * 1024);

    let r = t.get_with_token("/stream/100", &token).await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut received = 0usize;
    while let Some(chunk) = stream.next().await {
        received += chunk.unwrap().len();
    }
    assert_eq!(received, 100 * 1024 * 1024);

    let grown_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    // The peak is the process's: only meaningful when no other test shares it.
    assert!(
        !crate::helpers::metrics_isolated() || grown_mib < 48,
        "peak RSS grew by {grown_mib} MiB while streaming 2 x 100 MiB"
    );
}

#[tokio::test]
async fn websocket_echo_passes_through_the_proxy_with_identity() {
    let t = app().start().await;
    let token = t.issuer.mint(t.issuer.claims_for("ws-user"));
    let mut req = format!("ws://{}/ws", t.app.proxy_addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(response.status(), 101);
    let hello = ws.next().await.unwrap().unwrap();
    assert_eq!(hello, Message::Text("hello ws-user".into()));
    ws.send(Message::Text("ping".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("ping".into())
    );
    ws.close(None).await.unwrap();

    let mut anonymous = format!("ws://{}/ws", t.app.proxy_addr)
        .into_client_request()
        .unwrap();
    anonymous
        .headers_mut()
        .insert("x-user-id", "spoof".parse().unwrap());
    let err = tokio_tungstenite::connect_async(anonymous)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}

#[tokio::test]
async fn a_client_sending_headers_slowly_is_disconnected_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = app().arg("--header-read-timeout").arg("1s").start().await;
    let mut slow = tokio::net::TcpStream::connect(t.app.proxy_addr)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Keep trickling header bytes, never finishing the request, the way a slowloris client does.
    let trickle = async {
        for i in 0..20 {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            if slow
                .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), trickle).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        slow.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "the server must close the connection");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(6),
        "closed after about the header timeout, took {:?}",
        started.elapsed()
    );
    // The sidecar still serves everyone else.
    let token = t.issuer.mint(t.issuer.claims_for("patient"));
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
}

#[tokio::test]
async fn a_1_gib_upload_streams_through_without_buffering() {
    // The echo app answers only once it has read the whole gibibyte: allow it the time on a busy machine.
    let t = app().arg("--upstream-timeout").arg("60s").start().await;
    let token = t.issuer.mint(t.issuer.claims_for("big"));
    let before = peak_rss_kib();
    let chunk = bytes::Bytes::from(vec![b'g'; 1024 * 1024]);
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(
        (0..1024).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    ));
    let echo = t
        .echo(t.http.put(t.url("/upload")).bearer_auth(&token).body(body))
        .await;
    assert_eq!(echo.status, 200);
    assert_eq!(echo.body["body_bytes"], 1024u64 * 1024 * 1024);
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    assert!(
        !crate::helpers::metrics_isolated() || grown_mib < 64,
        "peak RSS grew by {grown_mib} MiB while streaming 1 GiB"
    );
}
