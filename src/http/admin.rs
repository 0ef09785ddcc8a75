//! The admin listener (loopback by default), apart from the proxy port:
//! - `GET /livez`: the process is up (never checks dependencies, so a down IdP cannot restart-loop pods);
//! - `GET /readyz`: 200 when every issuer has usable keys and the database answers (under
//!   `--on-db-error pass` a down database makes it `degraded`, still 200), else 503 with reasons;
//! - `GET /metrics`: Prometheus text format;
//! - `/admin/v1/...`: the admin API (see `admin_api`), behind `--admin-token-file` when set.

use super::admin_api::{self, ApiState};
use crate::access::{Gatekeeper, OnDbError};
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
    pub gatekeeper: Arc<Gatekeeper>,
    pub db: DatabaseConnection,
    pub metrics: PrometheusHandle,
    pub on_db_error: OnDbError,
}

pub fn router(state: AdminState, api: ApiState) -> Router {
    Router::new()
        .route("/livez", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
        .nest("/admin/v1", admin_api::router(api))
}

/// One readiness check: its name, why it fails (if it does), and whether a failure makes idsync unready.
/// The database is not required under `--on-db-error pass`: idsync then serves without it, degraded.
pub struct Check {
    pub name: String,
    pub failure: Option<String>,
    pub required: bool,
}

pub async fn readiness(
    gatekeeper: &Gatekeeper,
    db: &DatabaseConnection,
    on_db_error: OnDbError,
) -> Vec<Check> {
    let mut checks: Vec<Check> = gatekeeper
        .registry()
        .iter()
        .map(|issuer| Check {
            name: format!("issuer {}", issuer.name),
            failure: issuer.keys().usable().err().map(|e| e.to_string()),
            required: true,
        })
        .collect();
    let failure = match tokio::time::timeout(Duration::from_secs(2), db.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("database ping failed: {e}")),
        Err(_) => Some("database ping timed out".into()),
    };
    checks.push(Check {
        name: "database".into(),
        failure,
        required: on_db_error == OnDbError::Fail,
    });
    checks
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let checks = readiness(&state.gatekeeper, &state.db, state.on_db_error).await;
    let ready = checks.iter().all(|c| c.failure.is_none() || !c.required);
    let degraded = checks.iter().any(|c| c.failure.is_some());
    let body = json!({
        "status": match (ready, degraded) {
            (true, false) => "ready",
            (true, true) => "degraded",
            (false, _) => "not_ready",
        },
        "checks": checks.iter().map(|c| json!({
            "name": c.name,
            "ok": c.failure.is_none(),
            "required": c.required,
            "reason": c.failure,
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
