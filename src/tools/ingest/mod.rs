//! `conveyor ingest`: the API tier in front of the broker, its own process.
//!
//! * `POST /orders/batch` — a JSON array or NDJSON of up to
//!   `ingest.max_batch` orders. Each is checked by the daemon's decoder; the
//!   valid ones are published to the source queue/topic and the answer,
//!   `202 {accepted, rejected: [{index, order_id?, reason, detail}]}`, goes
//!   out only once the broker has confirmed every accepted order. When the
//!   broker cannot take the batch: `503` with `Retry-After`, nothing accepted.
//! * `GET /orders/{order_id}` — the stored outcome, or 404.
//! * `GET /orders?status=&since=&until=&format=ndjson|csv` — streamed from
//!   the store (flat memory; the query is cancelled when the client leaves).
//! * `/metrics`, `/healthz`, `/readyz` on the same port.
//!
//! Memory is bounded by configuration: at most `max_concurrent_requests`
//! requests are handled at once (one more is answered 429 before its body
//! is read), each body at most `max_body_bytes`, each with at most
//! `publish_window` publishes unconfirmed. On shutdown the listener closes,
//! readiness turns false, in-flight requests finish within
//! `shutdown.drain_timeout`, then the broker connection closes.

pub mod batch;
mod orders;
pub mod publish;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use self::batch::{BadBatch, Layout, Rejection};
use self::publish::Publisher;
use crate::config::Config;
use crate::store::Store;

/// The answer to an accepted batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchAnswer {
    /// Orders confirmed durable on the broker.
    pub accepted: usize,
    pub rejected: Vec<Rejection>,
}

/// Ingest's own metrics (prefix `conveyor_ingest_`).
pub struct IngestMetrics {
    registry: Registry,
    requests: IntCounterVec,
    orders: IntCounterVec,
    in_flight: IntGauge,
    batch_duration: Histogram,
}

impl IngestMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("conveyor_ingest".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "HTTP requests answered, by route and status code",
            ),
            &["route", "code"],
        )?;
        let orders = IntCounterVec::new(
            Opts::new(
                "orders_total",
                "Orders of POST /orders/batch: accepted (confirmed by the broker), rejected (invalid), unavailable (broker could not take them)",
            ),
            &["result"],
        )?;
        let in_flight = IntGauge::new(
            "requests_in_flight",
            "Batch requests being handled (at most ingest.max_concurrent_requests)",
        )?;
        let batch_duration = Histogram::with_opts(
            HistogramOpts::new(
                "batch_duration_seconds",
                "Time from a batch's arrival to its answer",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(orders.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(batch_duration.clone()))?;
        Ok(Self {
            registry,
            requests,
            orders,
            in_flight,
            batch_duration,
        })
    }

    fn answered(&self, route: &str, code: StatusCode) {
        self.requests
            .with_label_values(&[route, code.as_str()])
            .inc();
    }
}

struct AppState {
    config: Config,
    publisher: Publisher,
    store: Store,
    permits: Arc<Semaphore>,
    metrics: IngestMetrics,
    broker_connected: Arc<AtomicBool>,
    draining: AtomicBool,
}

type Shared = Arc<AppState>;

/// Validation of `[ingest]` (at start of `conveyor ingest`).
fn check_config(c: &crate::config::IngestConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=100_000).contains(&c.max_batch),
        "ingest.max_batch: {} is outside 1..=100000",
        c.max_batch
    );
    anyhow::ensure!(
        c.max_body_bytes >= 1024,
        "ingest.max_body_bytes: {} is below 1024",
        c.max_body_bytes
    );
    anyhow::ensure!(
        c.max_concurrent_requests >= 1,
        "ingest.max_concurrent_requests must be at least 1"
    );
    anyhow::ensure!(
        c.publish_window >= 1,
        "ingest.publish_window must be at least 1"
    );
    anyhow::ensure!(
        !c.publish_timeout.is_zero(),
        "ingest.publish_timeout must be longer than zero"
    );
    Ok(())
}

/// Serves until `shutdown` resolves, then drains. `on_ready` gets the bound
/// address once the listener is up.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    on_ready: Option<Box<dyn FnOnce(SocketAddr) + Send>>,
) -> anyhow::Result<()> {
    check_config(&config.ingest)?;
    let publisher = Publisher::new(&config)?;
    let store = Store::connect(&config.database).await?;
    let listener = tokio::net::TcpListener::bind(config.ingest.listen)
        .await
        .with_context(|| format!("ingest.listen: cannot bind {}", config.ingest.listen))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState {
        permits: Arc::new(Semaphore::new(config.ingest.max_concurrent_requests)),
        metrics: IngestMetrics::new().context("registering metrics")?,
        broker_connected: Arc::new(AtomicBool::new(false)),
        draining: AtomicBool::new(false),
        config,
        publisher,
        store,
    });
    let stop_keeper = CancellationToken::new();
    let keeper = {
        let s = state.clone();
        let stop = stop_keeper.clone();
        let flag = state.broker_connected.clone();
        tokio::spawn(async move { s.publisher.keep_connected(flag, stop).await })
    };
    let app = Router::new()
        .route("/orders/batch", post(post_batch))
        .route("/orders", get(orders::list_orders))
        .route("/orders/{order_id}", get(orders::get_order))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state.clone());
    let stop_serving = CancellationToken::new();
    let server = {
        let stop = stop_serving.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };
    tracing::info!(%addr, "ingest listening (POST /orders/batch, GET /orders, GET /orders/{{id}}, /metrics /healthz /readyz)");
    if let Some(f) = on_ready {
        f(addr);
    }
    crate::notify::ready();
    let watchdog = crate::notify::spawn_watchdog(stop_keeper.clone());
    shutdown.await;
    crate::notify::stopping();
    state.draining.store(true, Ordering::Relaxed);
    let drain = state.config.shutdown.drain_timeout;
    tracing::info!(deadline = ?drain, in_flight = state.metrics.in_flight.get(), "draining");
    stop_serving.cancel();
    let drained = tokio::time::timeout(drain, server).await;
    stop_keeper.cancel();
    let _ = keeper.await;
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    state.publisher.close().await;
    state.store.close().await;
    match drained {
        Ok(Ok(Ok(()))) => {
            tracing::info!("ingest stopped");
            Ok(())
        }
        Ok(Ok(Err(e))) => Err(anyhow::anyhow!("the HTTP server failed: {e}")),
        Ok(Err(e)) => Err(anyhow::anyhow!("the HTTP server panicked: {e}")),
        Err(_) => Err(anyhow::anyhow!(
            "requests still in flight at the drain deadline (shutdown.drain_timeout {})",
            humantime::format_duration(drain)
        )),
    }
}

fn json_error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn retry_after(mut r: Response, secs: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Whether a body read failed on the size limit (as opposed to a client
/// that went away mid-body).
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

async fn post_batch(State(s): State<Shared>, req: Request) -> Response {
    const ROUTE: &str = "/orders/batch";
    let started = Instant::now();
    let response = handle_batch(&s, req).await;
    s.metrics.answered(ROUTE, response.status());
    s.metrics
        .batch_duration
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn handle_batch(s: &Shared, req: Request) -> Response {
    let cfg = &s.config.ingest;
    // The permit before the body: what bounds memory is the number of
    // bodies held at once.
    let Ok(_permit) = s.permits.clone().try_acquire_owned() else {
        return retry_after(
            json_error(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{} batch requests already in flight (ingest.max_concurrent_requests)",
                    cfg.max_concurrent_requests
                ),
            ),
            1,
        );
    };
    s.metrics.in_flight.inc();
    let _in_flight = scopeguard(|| s.metrics.in_flight.dec());
    if s.draining.load(Ordering::Relaxed) {
        return retry_after(
            json_error(StatusCode::SERVICE_UNAVAILABLE, "ingest is shutting down"),
            1,
        );
    }
    let headers: HeaderMap = req.headers().clone();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > cfg.max_body_bytes) {
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is larger than ingest.max_body_bytes ({})",
                cfg.max_body_bytes
            ),
        );
    }
    let body: Bytes = match axum::body::to_bytes(req.into_body(), cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(e) if is_length_limit(&e) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is larger than ingest.max_body_bytes ({})",
                    cfg.max_body_bytes
                ),
            )
        }
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let layout = Layout::of(content_type, &body);
    let checked = match batch::check(
        &body,
        layout,
        cfg.max_batch,
        s.config.source.max_message_bytes,
    ) {
        Ok(c) => c,
        Err(e @ BadBatch::TooMany { .. }) => {
            return json_error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let n_valid = checked.valid.len() as u64;
    s.metrics
        .orders
        .with_label_values(&["rejected"])
        .inc_by(checked.rejected.len() as u64);
    // A broker known to be unreachable is refused at once: nothing is handed
    // to a producer queue that would only time out (Kafka), or deliver
    // after the client was told 503.
    let published = if !checked.valid.is_empty() && !s.broker_connected.load(Ordering::Relaxed) {
        Err(publish::Unavailable("the broker is not reachable".into()))
    } else {
        s.publisher
            .publish(&checked.valid, cfg.publish_window, cfg.publish_timeout)
            .await
    };
    if let Err(e) = published {
        s.metrics
            .orders
            .with_label_values(&["unavailable"])
            .inc_by(n_valid);
        tracing::warn!(error = %e, orders = n_valid, "batch not accepted: broker unavailable");
        let secs = cfg.publish_timeout.as_secs().clamp(1, 30);
        let body = serde_json::json!({
            "error": format!("the broker cannot take the batch now: {e}"),
            "accepted": 0,
        });
        return retry_after(
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response(),
            secs,
        );
    }
    s.metrics
        .orders
        .with_label_values(&["accepted"])
        .inc_by(n_valid);
    let answer = BatchAnswer {
        accepted: checked.valid.len(),
        rejected: checked.rejected,
    };
    // A non-empty batch without a single valid order is the client's error.
    let code = if answer.accepted == 0 && !answer.rejected.is_empty() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::ACCEPTED
    };
    (code, Json(answer)).into_response()
}

/// Runs `f` when dropped, whichever way the handler ends (a client that
/// disconnects drops the handler's future).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

async fn metrics(State(s): State<Shared>) -> Response {
    let mut buf = String::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode_utf8(&s.metrics.registry.gather(), &mut buf) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf).into_response()
}

async fn readyz(State(s): State<Shared>) -> Response {
    let broker = s.broker_connected.load(Ordering::Relaxed);
    let draining = s.draining.load(Ordering::Relaxed);
    if broker && !draining {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let why = [
        (!broker).then_some("broker not connected"),
        draining.then_some("draining"),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {why}\n"),
    )
        .into_response()
}
