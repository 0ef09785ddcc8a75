//! The shipped monitoring (`deploy/k8s/monitoring/`: PrometheusRule alerts and the Grafana dashboard)
//! uses only metrics a running idsync really exposes: every `idsync_*` series they name is on `/metrics`
//! after ordinary traffic (a first request, a repeat, a bad token, a back-channel logout, a webhook).

use crate::helpers::app;
use crate::lifecycle::{
    access_token, admin_event, keycloak_hook, logout_claims, logout_token, post_logout,
    write_secret,
};
use serde_json::json;
use std::collections::BTreeSet;
use std::path::Path;

/// Every metric name in `text` (PromQL inside YAML or JSON).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("idsync_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // A metric, not a label value or a file name that happens to start the same way.
        let before = rest[..i].chars().last();
        if !matches!(before, Some(c) if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '/')
        {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn every_metric_the_alerts_and_dashboard_use_is_exposed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s/monitoring");
    let rules = std::fs::read_to_string(root.join("prometheusrule.yaml")).unwrap();
    let dashboard = std::fs::read_to_string(root.join("dashboard.json")).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let used: BTreeSet<String> = metric_names(&rules)
        .into_iter()
        .chain(metric_names(&dashboard))
        .collect();
    assert!(used.len() >= 10, "{used:?}");

    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path());
    let t = app()
        .issuer_options(&format!(
            ",logout-audience=web-app,webhook-secret-file={secret}"
        ))
        .start()
        .await;
    let token = access_token(&t.issuer, "mia", "sid-m", 0);
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    assert_eq!(t.get_with_token("/", &token).await.status(), 200);
    assert_eq!(t.get_with_token("/", "not.a.jwt").await.status(), 401);
    let mut logout = logout_claims(&t.issuer, "j-m");
    logout["sid"] = json!("sid-m");
    assert_eq!(
        post_logout(&t, &logout_token(&t.issuer, logout))
            .await
            .status(),
        200
    );
    assert_eq!(t.get_with_token("/", &token).await.status(), 401, "revoked");
    let event = admin_event(
        "admin.USER-DELETE",
        "users/nobody",
        chrono::Utc::now().timestamp_millis(),
        None,
    );
    assert_eq!(keycloak_hook(&t, &event).await.status(), 200);

    let exposed: BTreeSet<String> = t
        .metrics()
        .await
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = used.iter().filter(|m| !exposed.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "used by deploy/k8s/monitoring but not on /metrics: {missing:?}\nexposed: {exposed:?}"
    );
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        r#"sum(rate(idsync_requests_total{outcome=~"a"}[5m])) / idsync_sync_seconds_bucket, x_idsync_no /idsync_no"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["idsync_requests_total", "idsync_sync_seconds_bucket"]
    );
}
