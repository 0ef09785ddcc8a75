//! The admin listener (loopback by default), apart from the proxy port:
//! - `GET /livez`: the process is up (never checks dependencies, so a down IdP cannot restart-loop pods);
//! - `GET /readyz`: 200 when every issuer has usable keys and the database answers, else 503 with reasons;
//! - `GET /metrics`: Prometheus text format;
//! - `/admin/v1/...`: the admin API (see `admin_api`), behind `--admin-token-file` when set.

use super::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use metrics_exporter_prometheus::PrometheusHandle;
use sea_orm::DatabaseConnection;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct AdminState {
    pub app: Arc<AppState>,
    pub db: DatabaseConnection,
    pub metrics: PrometheusHandle,
    pub admin_token: Option<Arc<String>>,
    pub app_roles: Arc<Vec<String>>,
}

pub fn router(state: AdminState) -> Router {
    let api = super::admin_api::router().layer(axum::middleware::from_fn_with_state(
        state.clone(),
        super::admin_api::require_token,
    ));
    Router::new()
        .route("/livez", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest("/admin/v1", api)
        .with_state(state)
}

/// Readiness checks by name: `None` when fine, else the reason.
pub async fn readiness(app: &AppState, db: &DatabaseConnection) -> Vec<(String, Option<String>)> {
    let mut checks = Vec::new();
    for issuer in app.auth.verifier().issuers() {
        checks.push((
            format!("issuer {}", issuer.issuer),
            issuer.keys.usable().err(),
        ));
    }
    let db_check = match tokio::time::timeout(Duration::from_secs(2), db.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("database ping failed: {e}")),
        Err(_) => Some("database ping timed out".into()),
    };
    checks.push(("database".into(), db_check));
    checks
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let checks = readiness(&state.app, &state.db).await;
    let ready = checks.iter().all(|(_, e)| e.is_none());
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": checks.iter().map(|(name, e)| json!({
            "name": name,
            "ok": e.is_none(),
            "reason": e,
        })).collect::<Vec<_>>(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
