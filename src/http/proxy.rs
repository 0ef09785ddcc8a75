//! Forwarding to the upstream app: streaming bodies both ways, hop-by-hop headers removed
//! (RFC 9110 section 7.6.1), `X-Forwarded-*` set, HTTP/1.1 upgrades (WebSocket) spliced through.

use super::error::ApiError;
use axum::body::Body;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::time::Duration;

pub struct Upstream {
    client: Client<HttpConnector, Body>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// Path prefix of the upstream URL, without a trailing slash.
    base_path: String,
    response_timeout: Duration,
}

const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

impl Upstream {
    /// `url` is the validated upstream (`http://` with a host, see `config`).
    pub fn new(
        url: &url::Url,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self, http::uri::InvalidUri> {
        let authority = http::uri::Authority::try_from(url.authority())?;
        let scheme = http::uri::Scheme::HTTP;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        Ok(Self {
            client,
            scheme,
            authority,
            base_path: url.path().trim_end_matches('/').to_owned(),
            response_timeout,
        })
    }

    /// Forwards `req` (whose owned headers are already stripped and injected) and returns the upstream's answer.
    pub async fn forward(
        &self,
        mut req: Request<Body>,
        client_addr: SocketAddr,
    ) -> Result<Response<Body>, ApiError> {
        let upgrade = upgrade_protocol(req.headers());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));

        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.base_path, path_and_query))
            .build()
            .map_err(|e| ApiError::InvalidRequest(format!("cannot build the upstream URI: {e}")))?;
        let original_host = req.headers().get(header::HOST).cloned();
        *req.uri_mut() = uri;
        // The pool speaks HTTP/1.1; an HTTP/2 client request is re-spoken as 1.1 upstream.
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        remove_hop_by_hop(headers);
        if let Some(proto) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, proto.clone());
        }
        set_forwarded(headers, client_addr, original_host);
        ensure_request_id(headers);

        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.response_timeout, self.client.request(req)).await;
        metrics::histogram!("idsync_upstream_seconds").record(started.elapsed().as_secs_f64());
        let mut response = match result {
            Err(_) => return Err(ApiError::UpstreamTimeout),
            Ok(Err(e)) => {
                return Err(ApiError::UpstreamUnavailable(if e.is_connect() {
                    "cannot connect to the upstream".into()
                } else {
                    "the upstream closed the connection".into()
                }));
            }
            Ok(Ok(r)) => r,
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(client),
                            &mut TokioIo::new(upstream),
                        )
                        .await;
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

/// The `Upgrade` protocol if this is an upgrade request (`Connection: upgrade` plus `Upgrade`).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too (RFC 9110 section 7.6.1).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::try_from(t.trim()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP) {
        headers.remove(n);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn set_forwarded(headers: &mut HeaderMap, client: SocketAddr, host: Option<HeaderValue>) {
    let ip = client.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    // Behind an ingress these already describe the original request; only fill in what is missing.
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    if !headers.contains_key("x-forwarded-host")
        && let Some(host) = host
    {
        headers.insert("x-forwarded-host", host);
    }
}

/// Keeps a client's `X-Request-Id` if it is short printable text, else generates one, so the app's logs
/// and idsync's can be joined.
fn ensure_request_id(headers: &mut HeaderMap) {
    let ok = headers.get("x-request-id").is_some_and(|v| {
        !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| (0x21..0x7f).contains(b))
    });
    if !ok {
        let id = uuid::Uuid::new_v4().to_string();
        headers.insert(
            "x-request-id",
            HeaderValue::from_str(&id).expect("uuid is ASCII"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn forwarded_for_is_appended_and_proto_kept_from_the_ingress() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        set_forwarded(
            &mut h,
            "10.0.0.5:4000".parse().unwrap(),
            Some(HeaderValue::from_static("app.example.com")),
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.0.0.5");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "app.example.com");
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
        h.remove(header::CONNECTION);
        assert!(upgrade_protocol(&h).is_none());
    }
}
