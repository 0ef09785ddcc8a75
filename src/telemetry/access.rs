//! The access log: one line per request, written without the tracing machinery (it is the one log line
//! every request pays for) into a process-wide buffer that goes to stdout when it fills (64 KiB), every
//! 250 ms, and at shutdown, like nginx's `access_log ... buffer= flush=`. Lines have the same shape as
//! the other log lines (`--log-format text|json`), target `idsync::access`; they are written only when
//! that target is enabled at `info` (`--log-level`). Never a token, a query string or a header value.

use super::LogFormat;
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Flushed when it holds this much.
const BUFFER_BYTES: usize = 64 * 1024;
/// And at least this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);

static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// 0 unknown, 1 off, 2 text, 3 JSON.
static MODE: AtomicU8 = AtomicU8::new(0);
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Called by `telemetry::init`.
pub(super) fn set_format(format: LogFormat) {
    let _ = FORMAT.set(format);
    MODE.store(0, Ordering::Relaxed);
}

fn mode() -> u8 {
    match MODE.load(Ordering::Relaxed) {
        0 => {
            let on = tracing::enabled!(target: "idsync::access", tracing::Level::INFO);
            let m = match (on, FORMAT.get()) {
                (false, _) | (_, None) => 1,
                (true, Some(LogFormat::Text)) => 2,
                (true, Some(LogFormat::Json)) => 3,
            };
            MODE.store(m, Ordering::Relaxed);
            m
        }
        m => m,
    }
}

/// One request, as logged.
pub struct Line<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub user_id: Option<&'a str>,
    pub tenant_id: Option<&'a str>,
    pub latency_us: u64,
    pub error_id: Option<&'a str>,
    /// The request's W3C trace id (idsync's span's, or the caller's `traceparent`'s), to find its trace.
    pub trace_id: Option<super::trace::TraceId>,
}

/// Appends `line` to the buffer (and writes the buffer out when full).
pub fn record(line: &Line<'_>) {
    let m = mode();
    if m == 1 {
        return;
    }
    let mut out = Vec::with_capacity(256);
    if m == 3 {
        json(&mut out, line);
    } else {
        text(&mut out, line);
    }
    let mut buffer = BUFFER.lock().unwrap_or_else(|e| e.into_inner());
    buffer.extend_from_slice(&out);
    if buffer.len() >= BUFFER_BYTES {
        write_out(&mut buffer);
    }
}

/// Writes whatever is buffered.
pub fn flush() {
    let mut buffer = BUFFER.lock().unwrap_or_else(|e| e.into_inner());
    write_out(&mut buffer);
}

fn write_out(buffer: &mut Vec<u8>) {
    if buffer.is_empty() {
        return;
    }
    // A closed stdout must not take requests down with it.
    let _ = std::io::stdout().lock().write_all(buffer);
    buffer.clear();
}

/// Flushes every [`FLUSH_EVERY`] until the task is aborted (then the caller flushes once more).
pub async fn flush_periodically() {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        flush();
    }
}

fn timestamp(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        // The date and time to the second, formatted once per second per thread.
        static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
    }
    let now = chrono::Utc::now();
    let secs = now.timestamp();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, now.format("%Y-%m-%dT%H:%M:%S").to_string());
        }
        out.extend_from_slice(cached.1.as_bytes());
    });
    let micros = now.timestamp_subsec_micros();
    out.push(b'.');
    for shift in [100_000, 10_000, 1_000, 100, 10, 1] {
        out.push(b'0' + (micros / shift % 10) as u8);
    }
    out.push(b'Z');
}

fn int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `s` as `{:?}` writes it, as tracing prints strings, so control characters cannot forge a line;
/// printable ASCII (nearly every path and id) without the formatter.
fn debug_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *out, s);
}

fn json(out: &mut Vec<u8>, l: &Line<'_>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\",\"method\":");
    json_str(out, l.method);
    out.extend_from_slice(b",\"path\":");
    json_str(out, l.path);
    out.extend_from_slice(b",\"status\":");
    int(out, l.status);
    if let Some(u) = l.user_id {
        out.extend_from_slice(b",\"user_id\":");
        json_str(out, u);
    }
    if let Some(t) = l.tenant_id {
        out.extend_from_slice(b",\"tenant_id\":");
        json_str(out, t);
    }
    out.extend_from_slice(b",\"latency_us\":");
    int(out, l.latency_us);
    if let Some(e) = l.error_id {
        out.extend_from_slice(b",\"error_id\":");
        json_str(out, e);
    }
    if let Some(t) = l.trace_id {
        let _ = write!(out, ",\"trace_id\":\"{t}\"");
    }
    out.extend_from_slice(b",\"target\":\"idsync::access\"}\n");
}

fn text(out: &mut Vec<u8>, l: &Line<'_>) {
    timestamp(out);
    out.extend_from_slice(b"  INFO idsync::access: request method=");
    out.extend_from_slice(l.method.as_bytes());
    out.extend_from_slice(b" path=");
    debug_str(out, l.path);
    out.extend_from_slice(b" status=");
    int(out, l.status);
    if let Some(u) = l.user_id {
        out.extend_from_slice(b" user_id=");
        debug_str(out, u);
    }
    if let Some(t) = l.tenant_id {
        out.extend_from_slice(b" tenant_id=");
        debug_str(out, t);
    }
    out.extend_from_slice(b" latency_us=");
    int(out, l.latency_us);
    if let Some(e) = l.error_id {
        out.extend_from_slice(b" error_id=");
        debug_str(out, e);
    }
    if let Some(t) = l.trace_id {
        let _ = write!(out, " trace_id={t}");
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> Line<'static> {
        Line {
            method: "GET",
            path: "/a\"b\n",
            status: 200,
            user_id: Some("u-\u{1}1"),
            tenant_id: None,
            latency_us: 42,
            error_id: Some("abc"),
            trace_id: Some(crate::telemetry::trace::TraceId([0xab; 16])),
        }
    }

    #[test]
    fn json_lines_parse_and_escape_what_the_client_controls() {
        let mut out = Vec::new();
        json(&mut out, &line());
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1, "one line");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/a\"b\n");
        assert_eq!(v["user_id"], "u-\u{1}1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["target"], "idsync::access");
        assert_eq!(v["trace_id"], "ab".repeat(16));
        assert!(v.get("tenant_id").is_none());
    }

    #[test]
    fn timestamps_are_rfc_3339_with_microseconds() {
        let mut out = Vec::new();
        timestamp(&mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(&s).is_ok(), "{s}");
        assert_eq!(s.len(), "2026-12-01T15:34:50.123456Z".len(), "{s}");
    }

    #[test]
    fn strings_are_quoted_as_debug_quotes_them() {
        for s in [
            "/api/v1/items?x=1&y='2'",
            "",
            "a\"b",
            "a\\b",
            "tab\there",
            "del\u{7f}",
            "line\nbreak",
            "caf\u{e9} \u{202e}",
        ] {
            let mut out = Vec::new();
            debug_str(&mut out, s);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{s:?}"));
        }
        let mut out = Vec::new();
        int(&mut out, 18_446_744_073_709_551_615u64);
        assert_eq!(out, b"18446744073709551615");
    }

    #[test]
    fn text_lines_stay_one_line() {
        let mut out = Vec::new();
        text(&mut out, &line());
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s.matches('\n').count(), 1, "{s}");
        assert!(
            s.contains("status=200") && s.contains("error_id=\"abc\""),
            "{s}"
        );
    }
}
