//! gRPC-shaped answers to idsync's own refusals: a gRPC client reads `grpc-status` and `grpc-message`
//! and treats any HTTP status but 200 as a transport failure (UNAVAILABLE, UNKNOWN), so a 401 JSON body
//! would reach the app's caller as "connection problem, retry". A refused `application/grpc` request gets
//! a trailers-only response instead (HTTP 200, the status in the header block that ends the stream).

use super::error::ErrorId;
use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, HeaderValue, StatusCode, header};

/// Whether the request is gRPC (`application/grpc`, `application/grpc+proto`, `application/grpc;…`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.get(..16))
        .is_some_and(|v| v.eq_ignore_ascii_case("application/grpc"))
        && headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.as_bytes().get(16))
            .is_none_or(|b| matches!(b, b'+' | b';'))
}

/// The client's deadline (`grpc-timeout`: up to 8 digits and a unit, H M S m u n), if well-formed.
pub fn timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status code for an idsync refusal of this HTTP status.
pub fn status_code(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 3,        // INVALID_ARGUMENT
        401 => 16,       // UNAUTHENTICATED
        403 => 7,        // PERMISSION_DENIED
        404 => 12,       // UNIMPLEMENTED
        413 | 429 => 8,  // RESOURCE_EXHAUSTED
        502 | 503 => 14, // UNAVAILABLE
        504 => 4,        // DEADLINE_EXCEEDED
        _ => 13,         // INTERNAL
    }
}

/// Rewrites an idsync error response (one carrying an [`ErrorId`]) as a trailers-only gRPC response;
/// any other response is returned as it is.
pub fn refusal(response: Response) -> Response {
    let Some(error) = response.extensions().get::<ErrorId>().cloned() else {
        return response;
    };
    let (mut parts, _) = response.into_parts();
    let code = status_code(parts.status);
    parts.status = StatusCode::OK;
    let challenge = parts.headers.remove(header::WWW_AUTHENTICATE);
    parts.headers.clear();
    let h = &mut parts.headers;
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    let message = format!("{} (error_id {})", error.message, error.id);
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
        h.insert("grpc-message", v);
    }
    if let Ok(v) = HeaderValue::from_str(&error.id) {
        h.insert("idsync-error-id", v);
    }
    if let Some(c) = challenge {
        h.insert(header::WWW_AUTHENTICATE, c);
    }
    Response::from_parts(parts, Body::empty())
}

/// `grpc-message` is percent-encoded UTF-8: bytes outside printable ASCII, and `%` itself.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_are_recognised_and_look_alikes_are_not() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            is_grpc(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("Application/GRPC+proto"));
        assert!(with("application/grpc;charset=utf-8"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/grpcx"));
        assert!(!with("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn grpc_timeouts_are_parsed_and_malformed_ones_ignored() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
            timeout(&h)
        };
        use std::time::Duration;
        assert_eq!(with("5S"), Some(Duration::from_secs(5)));
        assert_eq!(with("250m"), Some(Duration::from_millis(250)));
        assert_eq!(with("2H"), Some(Duration::from_secs(7200)));
        for bad in ["", "S", "5", "5s", "-5S", "123456789S", "5 S"] {
            assert_eq!(with(bad), None, "{bad}");
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("100% ok"), "100%25 ok");
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }
}
