//! The downstream simulator: plays the rule engine (`POST /validate`) and
//! the payment provider (`POST /charges`) over real HTTP, with knobs for
//! latency, errors, timeouts, rejections and declines, and a ledger of every
//! charge it made (`GET /ledger`).
//!
//! Decisions about an order (reject, decline) are a function of its id, so
//! a retry or a redelivery gets the same answer. Orders whose `customer_id`
//! starts with `reject` are always rejected, `decline` always declined,
//! `hang` charged but never answered (a stage the daemon dies in).
//! Charges are keyed by `Idempotency-Key`, compared byte for byte as a real
//! provider does (no trimming, no case folding, any bytes): the same key with
//! the same parameters returns the same charge; the same key with other
//! parameters (order, customer, amount or currency) is refused with `409` and
//! a JSON error, never answered with the first charge; a request without a
//! key makes a new charge every time, which is exactly what the ledger's
//! double-charge count exposes.
//!
//! Each endpoint can also have a capacity, a queue limit and a rate limit
//! (`load`): what it serves at once, how many wait, how many per second.
//! `GET /knobs` shows every knob of both kinds in one document and
//! `PUT /knobs` merges the knobs it is given into it (RFC 7396: a knob left
//! out keeps its value, `null` resets it).
//!
//! The ledger also keeps the last W3C `traceparent` each order's requests
//! carried (charges on their entry, validations beside them), so tests can
//! see the trace context reach the downstreams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

mod handlers;
mod load;
mod timer;

pub use load::{EndpointLimits, LimitArgs, Limits, LoadStats};

/// Behaviour of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointKnobs {
    /// Fixed added latency.
    pub latency_ms: u64,
    /// Random extra latency, uniform in `[0, jitter_ms]`.
    pub jitter_ms: u64,
    /// Fraction of requests answered 503 (before any effect).
    pub error_rate: f64,
    /// Fraction of requests never answered (a charge is still made: the
    /// answer is what gets lost, the case idempotency keys exist for).
    pub timeout_rate: f64,
    /// Fraction of requests answered 429 with `Retry-After: 1`.
    pub throttle_rate: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Knobs {
    pub validate: EndpointKnobs,
    pub charge: EndpointKnobs,
    /// Fraction of orders the rule engine rejects (by order id).
    pub reject_rate: f64,
    /// Fraction of charges declined (by order id).
    pub decline_rate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LedgerEntry {
    /// The key as received (shown lossily if it is not UTF-8).
    pub idempotency_key: Option<String>,
    pub order_id: String,
    #[serde(default)]
    pub customer_id: String,
    pub charge_id: String,
    pub status: String,
    pub amount_cents: i64,
    pub currency: String,
    /// Requests seen with this key (1 + retries and redeliveries).
    pub requests: u64,
    /// The `traceparent` header of the last charge request for this order
    /// that carried one.
    #[serde(default)]
    pub traceparent: Option<String>,
}

impl LedgerEntry {
    /// Whether a request carries the parameters this charge was made with.
    fn same_request(&self, req: &handlers::ChargeBody) -> bool {
        self.order_id == req.order_id
            && self.customer_id == req.customer_id
            && self.amount_cents == req.amount_cents
            && self.currency == req.currency
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ledger {
    pub charges: Vec<LedgerEntry>,
    /// Charge requests received, all keys together.
    pub requests_total: u64,
    /// Orders with more than one charge: must always be 0.
    pub double_charged_orders: u64,
    /// Charge requests refused with 409 because their idempotency key was
    /// already used with other parameters.
    #[serde(default)]
    pub idempotency_conflicts: u64,
    pub validate_requests_total: u64,
    /// Order id → the `traceparent` of the last validation request for it
    /// that carried one.
    #[serde(default)]
    pub validate_traceparents: HashMap<String, String>,
    /// What the capacity model did at `/validate`.
    #[serde(default)]
    pub validate_load: LoadStats,
    /// What the capacity model did at `/charges`.
    #[serde(default)]
    pub charge_load: LoadStats,
}

#[derive(Default)]
struct Books {
    /// Raw header bytes → index in `entries`.
    by_key: HashMap<Vec<u8>, usize>,
    /// Requests refused because their key was used with other parameters.
    key_conflicts: u64,
    entries: Vec<LedgerEntry>,
    requests_total: u64,
    validate_requests_total: u64,
    validate_traceparents: HashMap<String, String>,
}

#[derive(Clone)]
struct Sim {
    knobs: Arc<RwLock<Knobs>>,
    books: Arc<Mutex<Books>>,
    validate_load: Arc<load::EndpointLoad>,
    charge_load: Arc<load::EndpointLoad>,
}

/// A running simulator.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub url: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    sim: Sim,
}

impl SimHandle {
    pub fn set_knobs(&self, knobs: Knobs) {
        if let Ok(mut k) = self.sim.knobs.write() {
            *k = knobs;
        }
    }

    /// Replaces the capacity model's limits (the faults stay).
    pub fn set_limits(&self, limits: Limits) {
        self.sim.set_limits(limits);
    }

    pub fn limits(&self) -> Limits {
        self.sim.limits()
    }

    pub fn ledger(&self) -> Ledger {
        self.sim.ledger()
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts the simulator on `listen` (port 0 picks one), with no limits.
pub async fn start(listen: SocketAddr, knobs: Knobs) -> std::io::Result<SimHandle> {
    start_with(listen, knobs, Limits::default()).await
}

/// Starts the simulator with a capacity model.
pub async fn start_with(
    listen: SocketAddr,
    knobs: Knobs,
    limits: Limits,
) -> std::io::Result<SimHandle> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let sim = Sim {
        knobs: Arc::new(RwLock::new(knobs)),
        books: Arc::new(Mutex::new(Books::default())),
        validate_load: Arc::new(load::EndpointLoad::new(limits.validate)),
        charge_load: Arc::new(load::EndpointLoad::new(limits.charge)),
    };
    let app = Router::new()
        .route("/validate", post(handlers::validate))
        .route("/charges", post(handlers::charge))
        .route("/ledger", get(ledger))
        .route("/knobs", get(get_knobs).put(put_knobs))
        .route("/healthz", get(|| async { "ok\n" }))
        // axum's default is 2 MB; conveyor forwards orders of up to
        // `source.max_message_bytes` (16 MiB at most) to the rule engine.
        .layer(axum::extract::DefaultBodyLimit::max(32 * 1024 * 1024))
        .with_state(sim.clone());
    // Small request/response exchanges: without TCP_NODELAY, Nagle on our
    // side and delayed ACKs on the client's stall each answer for ~40 ms.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "simulator stopped");
        }
    });
    Ok(SimHandle {
        url: format!("http://{addr}"),
        addr,
        stop,
        task,
        sim,
    })
}

impl Sim {
    fn knobs(&self) -> Knobs {
        self.knobs.read().map(|k| k.clone()).unwrap_or_default()
    }

    fn limits(&self) -> Limits {
        Limits {
            validate: self.validate_load.limits(),
            charge: self.charge_load.limits(),
        }
    }

    fn set_limits(&self, limits: Limits) {
        self.validate_load.set(limits.validate);
        self.charge_load.set(limits.charge);
    }

    fn ledger(&self) -> Ledger {
        let Ok(books) = self.books.lock() else {
            return Ledger {
                charges: vec![],
                requests_total: 0,
                double_charged_orders: 0,
                idempotency_conflicts: 0,
                validate_requests_total: 0,
                validate_traceparents: HashMap::new(),
                validate_load: self.validate_load.stats(),
                charge_load: self.charge_load.stats(),
            };
        };
        let mut per_order: HashMap<&str, u64> = HashMap::new();
        for e in &books.entries {
            *per_order.entry(e.order_id.as_str()).or_default() += 1;
        }
        Ledger {
            charges: books.entries.clone(),
            requests_total: books.requests_total,
            double_charged_orders: per_order.values().filter(|n| **n > 1).count() as u64,
            idempotency_conflicts: books.key_conflicts,
            validate_requests_total: books.validate_requests_total,
            validate_traceparents: books.validate_traceparents.clone(),
            validate_load: self.validate_load.stats(),
            charge_load: self.charge_load.stats(),
        }
    }
}

async fn ledger(State(sim): State<Sim>) -> Json<Ledger> {
    Json(sim.ledger())
}

async fn get_knobs(State(sim): State<Sim>) -> Json<serde_json::Value> {
    Json(load::document(&sim.knobs(), &sim.limits()))
}

/// Merges the given knobs into the current ones and answers with the
/// result; a knob that does not exist, or a value of the wrong type,
/// changes nothing and is answered 422.
async fn put_knobs(State(sim): State<Sim>, Json(patch): Json<serde_json::Value>) -> Response {
    // One writer at a time, so two merges cannot lose each other's knobs.
    let Ok(mut knobs) = sim.knobs.write() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "knobs poisoned\n").into_response();
    };
    let mut doc = load::document(&knobs, &sim.limits());
    load::merge_patch(&mut doc, patch);
    match load::split(doc) {
        Ok((new_knobs, limits)) => {
            *knobs = new_knobs;
            sim.set_limits(limits);
            Json(load::document(&knobs, &limits)).into_response()
        }
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("bad knobs: {e}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests;
