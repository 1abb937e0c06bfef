//! The telemetry HTTP server (axum): `/metrics` in Prometheus text format,
//! `/healthz` while the process runs, `/readyz` with the reasons when not
//! ready. Serves until its stop token is cancelled.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use super::{Health, Metrics};

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

async fn metrics_handler(State(s): State<HttpState>) -> impl IntoResponse {
    s.metrics.ready.set(i64::from(s.health.ready()));
    s.metrics.refresh();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    let h = &s.health;
    if h.ready() {
        return (StatusCode::OK, "ready\n".to_string());
    }
    let why = [
        (!h.broker_connected.load(Ordering::Relaxed)).then_some("broker not connected"),
        (!h.database_ok.load(Ordering::Relaxed)).then_some("database not reachable"),
        h.draining.load(Ordering::Relaxed).then_some("draining"),
    ]
    .into_iter()
    .flatten()
    .map(str::to_string)
    .chain(h.check_failures())
    .collect::<Vec<_>>()
    .join(", ");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {why}\n"),
    )
}

/// Binds the telemetry port and serves until `stop` is cancelled. Returns
/// the bound address (useful with port 0).
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState { metrics, health });
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "telemetry server failed");
        }
    });
    Ok((addr, handle))
}
