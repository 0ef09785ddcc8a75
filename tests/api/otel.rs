//! OpenTelemetry: with an OTLP endpoint, each request is a server span continuing the caller's
//! `traceparent`, with verify, sync and upstream children, exported over OTLP/HTTP to a real receiver
//! on loopback (decoded with the OpenTelemetry protobuf definitions); the app's `traceparent` names
//! idsync's upstream span; error bodies carry the trace id. Without an endpoint nothing is exported and
//! `traceparent` reaches the app untouched.

use crate::helpers::{app, assert_error};
use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use std::sync::{Arc, Mutex};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

async fn receiver() -> Receiver {
    let got: Arc<Mutex<Vec<ExportTraceServiceRequest>>> = Arc::default();
    let sink = got.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: http::HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                sink.lock().unwrap().push(request);
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Receiver { url, got }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn requests_become_spans_exported_over_otlp_continuing_the_callers_trace() {
    let rx = receiver().await;
    let t = app()
        .arg("--otlp-endpoint")
        .arg(&rx.url)
        .arg("--otel-service-name")
        .arg("idsync-under-test")
        .start()
        .await;
    let token = t.issuer.mint(t.issuer.claims_for("otel-user"));
    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");

    let echo = t
        .echo(
            t.http
                .get(t.url("/traced"))
                .bearer_auth(&token)
                .header("traceparent", &traceparent)
                .header("tracestate", "vendor=1"),
        )
        .await;
    assert_eq!(echo.status, 200);
    let sent = echo
        .header("traceparent")
        .expect("the app gets a traceparent");
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts[1], TRACE, "the same trace: {sent}");
    assert_ne!(
        parts[2], CALLER_SPAN,
        "idsync's span is the app's parent: {sent}"
    );
    let app_parent = parts[2].to_owned();

    // A refusal names the trace next to the error id.
    let r = t
        .http
        .get(t.url("/traced"))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    let body = assert_error(r, 401, "invalid_token").await;
    assert_eq!(body["trace_id"], TRACE, "{body}");

    // No traceparent: a new trace, still named in the error body.
    let r = t.http.get(t.url("/traced")).send().await.unwrap();
    let body = assert_error(r, 401, "invalid_token").await;
    let fresh = body["trace_id"]
        .as_str()
        .expect("a new trace id")
        .to_owned();
    assert_eq!(fresh.len(), 32);
    assert_ne!(fresh, TRACE);

    // Stopping flushes the batch.
    t.app.stop().await.unwrap();
    let exports = rx.got.lock().unwrap().clone();
    assert!(!exports.is_empty(), "nothing was exported");
    let mut spans: Vec<Span> = Vec::new();
    for e in &exports {
        for rs in &e.resource_spans {
            let resource = rs.resource.as_ref().unwrap();
            let service = resource
                .attributes
                .iter()
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value));
            assert!(
                service
                    .as_deref()
                    .is_some_and(|s| s.contains("idsync-under-test")),
                "{service:?}"
            );
            for ss in &rs.scope_spans {
                spans.extend(ss.spans.iter().cloned());
            }
        }
    }
    let in_trace: Vec<&Span> = spans.iter().filter(|s| hex(&s.trace_id) == TRACE).collect();
    let servers: Vec<&&Span> = in_trace.iter().filter(|s| s.kind == 2).collect();
    assert_eq!(servers.len(), 2, "two requests carried the caller's trace");
    let ok = servers
        .iter()
        .find(|s| {
            s.attributes.iter().any(|a| {
                a.key == "http.response.status_code"
                    && format!("{:?}", a.value).contains("IntValue(200)")
            })
        })
        .expect("the admitted request's span");
    assert_eq!(
        hex(&ok.parent_span_id),
        CALLER_SPAN,
        "continues the caller's span"
    );
    assert_eq!(ok.name, "GET");
    let children: Vec<&&Span> = in_trace
        .iter()
        .filter(|s| s.parent_span_id == ok.span_id)
        .collect();
    let names: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
    for expected in ["idsync.verify", "idsync.sync", "idsync.upstream"] {
        assert!(
            names.contains(&expected),
            "{expected} missing among {names:?}"
        );
    }
    let upstream = children
        .iter()
        .find(|s| s.name == "idsync.upstream")
        .unwrap();
    assert_eq!(upstream.kind, 3, "a client span");
    assert_eq!(
        hex(&upstream.span_id),
        app_parent,
        "the app's parent is the upstream span"
    );
    for c in &children {
        assert!(c.start_time_unix_nano >= ok.start_time_unix_nano);
        assert!(c.end_time_unix_nano <= ok.end_time_unix_nano, "{}", c.name);
    }
    assert!(
        spans
            .iter()
            .any(|s| hex(&s.trace_id) == fresh && s.kind == 2),
        "the request without traceparent is its own trace"
    );
}

#[tokio::test]
async fn without_an_endpoint_traceparent_passes_untouched_and_errors_still_name_the_trace() {
    let t = app().start().await;
    let token = t.issuer.mint(t.issuer.claims_for("plain-user"));
    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let echo = t
        .echo(
            t.http
                .get(t.url("/x"))
                .bearer_auth(&token)
                .header("traceparent", &traceparent),
        )
        .await;
    assert_eq!(
        echo.header("traceparent").as_deref(),
        Some(traceparent.as_str())
    );
    let r = t
        .http
        .get(t.url("/x"))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    let body = assert_error(r, 401, "invalid_token").await;
    assert_eq!(body["trace_id"], TRACE);
    // A malformed traceparent names no trace.
    let r = t
        .http
        .get(t.url("/x"))
        .header("traceparent", "00-zz-00f067aa0ba902b7-01")
        .send()
        .await
        .unwrap();
    let body = assert_error(r, 401, "invalid_token").await;
    assert!(body.get("trace_id").is_none(), "{body}");
}
