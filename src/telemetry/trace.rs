//! Distributed tracing with OpenTelemetry: a server span per request on the proxy port, continuing the
//! caller's W3C `traceparent`/`tracestate`, with `idsync.verify`, `idsync.sync` and `idsync.upstream` as
//! children; the upstream span is the parent the app sees in its `traceparent`. Spans go out over
//! OTLP/HTTP (protobuf) in batches from the SDK's own thread.
//!
//! Off unless an endpoint is configured (`--otlp-endpoint`, or the standard `OTEL_EXPORTER_OTLP_*`
//! variables): then no span is made, `traceparent` passes to the app untouched, and the only work per
//! request is reading that header's trace id for the access log and error bodies.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Where and as what spans are exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceSettings {
    /// The full OTLP/HTTP traces URL (`…/v1/traces`).
    pub endpoint: String,
    /// `service.name` of every span.
    pub service_name: String,
}

/// A W3C trace id, printed as 32 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceId(pub [u8; 16]);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

tokio::task_local! {
    static CURRENT: TraceId;
}

/// The trace id of the request being handled on this task, for error bodies and log lines.
pub fn current_trace_id() -> Option<TraceId> {
    CURRENT.try_with(|t| *t).ok()
}

pin_project_lite::pin_project! {
    /// A request's future, polled (and dropped, when a request is cancelled) with its trace id current
    /// and, with tracing on, its span's context attached. One wrapper whatever is set, so the request's
    /// (large) future is laid out once in the future that awaits it, not once per combination.
    pub struct Traced<F> {
        id: Option<TraceId>,
        context: Option<Context>,
        #[pin]
        inner: Option<F>,
    }

    impl<F> PinnedDrop for Traced<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let _attached = this.context.as_ref().map(|c| c.clone().attach());
            let mut inner = this.inner;
            match *this.id {
                Some(id) => CURRENT.sync_scope(id, || inner.set(None)),
                None => inner.set(None),
            }
        }
    }
}

/// Runs `inner` with `id` as the current request's trace id and `context` as the current span.
pub fn traced<F: Future>(id: Option<TraceId>, context: Option<Context>, inner: F) -> Traced<F> {
    Traced {
        id,
        context,
        inner: Some(inner),
    }
}

impl<F: Future> Future for Traced<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.project();
        let _attached = this.context.as_ref().map(|c| c.clone().attach());
        let inner = this
            .inner
            .as_pin_mut()
            .expect("a request future is not polled after it is dropped");
        match *this.id {
            Some(id) => CURRENT.sync_scope(id, || inner.poll(cx)),
            None => inner.poll(cx),
        }
    }
}

/// The trace id of a well-formed `traceparent` (W3C Trace Context): exactly one header,
/// `version-traceid-parentid-flags` in lowercase hex, version not `ff`, ids not all zero. Anything else is
/// no trace id (and, with tracing on, the request starts a new trace).
pub fn incoming_trace_id(headers: &http::HeaderMap) -> Option<TraceId> {
    const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
    let mut values = headers.get_all(&TRACEPARENT).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let v = value.as_bytes();
    let hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    // Version 00 is exactly 55 bytes; a later version may append fields after a `-`.
    if v.len() < 55 || (v.len() > 55 && (v[55] != b'-' || &v[..2] == b"00")) {
        return None;
    }
    let (version, trace, parent, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    if !(hex(version) && hex(trace) && hex(parent) && hex(flags)) || version == b"ff" {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in trace.chunks(2).enumerate() {
        let n = |c: u8| if c <= b'9' { c - b'0' } else { c - b'a' + 10 };
        id[i] = n(pair[0]) << 4 | n(pair[1]);
    }
    if id == [0; 16] || parent.iter().all(|b| *b == b'0') {
        return None;
    }
    Some(TraceId(id))
}

/// How many tracers are running in the process: children are looked for only when one is.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// The tracer, carried in the request's context so code below `http` can open child spans without being
/// handed anything.
#[derive(Clone)]
struct InContext(SdkTracer);

/// One application's tracer and its exporter.
pub struct Tracer {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
}

impl Tracer {
    /// Builds the exporter and the batching provider. The sampler follows `OTEL_TRACES_SAMPLER` (default:
    /// parent-based, always on).
    pub fn start(settings: &TraceSettings) -> anyhow::Result<Self> {
        use opentelemetry_otlp::WithExportConfig as _;
        let settings = settings.clone();
        // The blocking HTTP client owns a runtime of its own, which must not be built (or dropped) on
        // one of tokio's threads.
        let provider = std::thread::spawn(move || -> anyhow::Result<SdkTracerProvider> {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(Duration::from_secs(10))
                .build()?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build();
            Ok(SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("building the OTLP exporter panicked"))??;
        ACTIVE.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            tracer: provider.tracer("idsync"),
            provider,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// The server span of one request, continuing the caller's trace when it sent one.
    pub fn request(
        &self,
        method: &http::Method,
        path: &str,
        headers: &http::HeaderMap,
        version: http::Version,
    ) -> RequestSpan {
        let parent = self.propagator.extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder(method.as_str().to_owned())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.as_str().to_owned()),
                KeyValue::new("url.path", path.to_owned()),
                KeyValue::new("network.protocol.version", protocol(version)),
            ])
            .start_with_context(&self.tracer, &parent);
        let cx = parent
            .with_span(span)
            .with_value(InContext(self.tracer.clone()));
        RequestSpan { cx }
    }

    /// Exports what is still batched and stops the export thread; blocks, so call it off the runtime.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing traces at shutdown failed");
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_10 => "1.0",
        _ => "1.1",
    }
}

/// A request's server span; ended by [`RequestSpan::finish`].
pub struct RequestSpan {
    cx: Context,
}

impl RequestSpan {
    pub fn context(&self) -> &Context {
        &self.cx
    }

    pub fn trace_id(&self) -> TraceId {
        TraceId(self.cx.span().span_context().trace_id().to_bytes())
    }

    /// Records the outcome and ends the span. Server errors (5xx, and idsync's own refusals' codes as
    /// `error.type`) mark it failed, as the HTTP conventions say.
    pub fn finish(
        self,
        status: u16,
        error: Option<&'static str>,
        user: Option<&str>,
        tenant: Option<&str>,
    ) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(e) = error {
            span.set_attribute(KeyValue::new("error.type", e));
        }
        if let Some(u) = user {
            span.set_attribute(KeyValue::new("idsync.user_id", u.to_owned()));
        }
        if let Some(t) = tenant {
            span.set_attribute(KeyValue::new("idsync.tenant_id", t.to_owned()));
        }
        if status >= 500 {
            span.set_status(Status::error(error.unwrap_or("server error")));
        }
        span.end();
    }
}

/// A child span of the current request (none when tracing is off or outside a request); ends on drop.
pub struct Child(Option<(Context, TraceContextPropagator)>);

/// Opens a child span of the request being handled, e.g. `idsync.verify`.
pub fn child(name: &'static str) -> Child {
    child_of_kind(name, SpanKind::Internal)
}

/// A child for a call to another service (the upstream): its context is what [`Child::inject`] sends.
pub fn client_child(name: &'static str) -> Child {
    child_of_kind(name, SpanKind::Client)
}

fn child_of_kind(name: &'static str, kind: SpanKind) -> Child {
    if ACTIVE.load(Ordering::Relaxed) == 0 {
        return Child(None);
    }
    let cx = Context::current();
    let Some(InContext(tracer)) = cx.get::<InContext>().cloned() else {
        return Child(None);
    };
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .start_with_context(&tracer, &cx);
    Child(Some((cx.with_span(span), TraceContextPropagator::new())))
}

impl Child {
    /// Sets `traceparent` (and `tracestate`) to this span, replacing what the client sent: the app's
    /// spans then hang under idsync's.
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        if let Some((cx, propagator)) = &self.0 {
            headers.remove("traceparent");
            headers.remove("tracestate");
            propagator.inject_context(cx, &mut HeadersMut(headers));
        }
    }

    /// Marks the span failed.
    pub fn fail(&self, reason: &'static str) {
        if let Some((cx, _)) = &self.0 {
            cx.span().set_status(Status::error(reason));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Some((cx, _)) = &self.0 {
            cx.span().end();
        }
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // Two `traceparent`s are ambiguous: neither is continued.
        let mut values = self.0.get_all(key).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => v.to_str().ok(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::try_from(key),
            http::HeaderValue::try_from(value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trace id is current while the request runs and while a cancelled request is dropped (what
    /// tokio's task-local scope did before `Traced` replaced it), so cleanup can still name the trace.
    #[test]
    fn a_request_sees_its_trace_id_when_polled_and_when_cancelled() {
        use std::sync::{Arc, Mutex};
        struct Probe(Arc<Mutex<Vec<Option<TraceId>>>>);
        impl Drop for Probe {
            fn drop(&mut self) {
                self.0.lock().unwrap().push(current_trace_id());
            }
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let probe = Probe(seen.clone());
        let id = TraceId([7; 16]);
        let mut request = Box::pin(traced(Some(id), None, async move {
            probe.0.lock().unwrap().push(current_trace_id());
            std::future::pending::<()>().await;
            drop(probe);
        }));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(request.as_mut().poll(&mut cx).is_pending());
        assert_eq!(current_trace_id(), None, "only inside the request");
        drop(request);
        assert_eq!(*seen.lock().unwrap(), [Some(id), Some(id)]);
    }

    fn with(values: &[&str]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for v in values {
            h.append("traceparent", http::HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn well_formed_traceparents_give_their_trace_id_and_others_none() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            incoming_trace_id(&with(&[good])).unwrap().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        // A future version may carry more fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert!(incoming_trace_id(&with(&[later])).is_some());
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        ] {
            assert!(incoming_trace_id(&with(&[bad])).is_none(), "{bad}");
        }
        assert!(
            incoming_trace_id(&with(&[good, good])).is_none(),
            "two headers"
        );
    }
}
