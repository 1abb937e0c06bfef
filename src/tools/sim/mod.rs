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
//! The ledger also keeps the last W3C `traceparent` each order's requests
//! carried (charges on their entry, validations beside them), so tests can
//! see the trace context reach the downstreams.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

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
    fn same_request(&self, req: &ChargeBody) -> bool {
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

    pub fn ledger(&self) -> Ledger {
        self.sim.ledger()
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts the simulator on `listen` (port 0 picks one).
pub async fn start(listen: SocketAddr, knobs: Knobs) -> std::io::Result<SimHandle> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let sim = Sim {
        knobs: Arc::new(RwLock::new(knobs)),
        books: Arc::new(Mutex::new(Books::default())),
    };
    let app = Router::new()
        .route("/validate", post(validate))
        .route("/charges", post(charge))
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

    fn ledger(&self) -> Ledger {
        let Ok(books) = self.books.lock() else {
            return Ledger {
                charges: vec![],
                requests_total: 0,
                double_charged_orders: 0,
                idempotency_conflicts: 0,
                validate_requests_total: 0,
                validate_traceparents: HashMap::new(),
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
        }
    }
}

/// A number in [0, 1) fixed by the order id and a salt.
fn fraction(order_id: &str, salt: &str) -> f64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    salt.hash(&mut h);
    order_id.hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Sleeps `d` to within a few tens of microseconds.
///
/// tokio's timer works in whole milliseconds and rounds each deadline up to
/// the next tick, so `sleep(10 ms)` lasts 10–11 ms: a 5–10 % error on the
/// latency knob, which would make every latency-bound measurement against
/// the simulator look worse than the latency it was given. One timer thread
/// keeps the pending deadlines in a heap and waits on them with the OS's
/// fine-grained timeouts.
async fn precise_sleep(d: Duration) {
    let deadline = std::time::Instant::now() + d;
    let (tx, rx) = tokio::sync::oneshot::channel();
    if precise_timer().send((deadline, tx)).is_ok() {
        let _ = rx.await;
    } else {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

type TimerEntry = (std::time::Instant, tokio::sync::oneshot::Sender<()>);

fn precise_timer() -> &'static std::sync::mpsc::Sender<TimerEntry> {
    static TIMER: std::sync::OnceLock<std::sync::mpsc::Sender<TimerEntry>> =
        std::sync::OnceLock::new();
    TIMER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<TimerEntry>();
        let spawned = std::thread::Builder::new()
            .name("sim-timer".into())
            .spawn(move || run_timer(&rx));
        if let Err(e) = spawned {
            // Dropping the receiver makes every sleep fall back to tokio's.
            tracing::warn!(error = %e, "no precise timer thread; latencies round up to whole ms");
        }
        tx
    })
}

/// A pending wake-up, ordered by its deadline alone.
struct Due(TimerEntry);

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.0 .0 == other.0 .0
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0 .0.cmp(&other.0 .0)
    }
}

fn run_timer(rx: &std::sync::mpsc::Receiver<TimerEntry>) {
    use std::cmp::Reverse;
    use std::sync::mpsc::RecvTimeoutError;
    let mut heap: std::collections::BinaryHeap<Reverse<Due>> = std::collections::BinaryHeap::new();
    loop {
        let now = std::time::Instant::now();
        while heap.peek().is_some_and(|Reverse(Due((at, _)))| *at <= now) {
            if let Some(Reverse(Due((_, waiter)))) = heap.pop() {
                let _ = waiter.send(());
            }
        }
        let next = match heap.peek() {
            Some(Reverse(Due((at, _)))) => rx.recv_timeout(at.saturating_duration_since(now)),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(entry) => heap.push(Reverse(Due(entry))),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

enum Fault {
    None,
    Error,
    Throttle,
    Hang,
}

/// Waits the configured latency, then draws the fault for this request.
async fn behave(k: &EndpointKnobs) -> Fault {
    let (jitter, roll): (u64, f64) = {
        let jitter = if k.jitter_ms > 0 {
            rand::random::<u64>() % (k.jitter_ms + 1)
        } else {
            0
        };
        (jitter, rand::random::<f64>())
    };
    let delay = k.latency_ms + jitter;
    if delay > 0 {
        precise_sleep(Duration::from_millis(delay)).await;
    }
    if roll < k.error_rate {
        Fault::Error
    } else if roll < k.error_rate + k.throttle_rate {
        Fault::Throttle
    } else if roll < k.error_rate + k.throttle_rate + k.timeout_rate {
        Fault::Hang
    } else {
        Fault::None
    }
}

fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "simulated outage\n").into_response()
}

fn throttled() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [("retry-after", "1")],
        "slow down\n",
    )
        .into_response()
}

async fn hang() -> Response {
    // Never answers; the client's timeout ends the exchange.
    std::future::pending::<()>().await;
    unavailable()
}

#[derive(Deserialize)]
struct ValidateBody {
    order_id: String,
    #[serde(default)]
    customer_id: String,
}

fn traceparent(headers: &HeaderMap) -> Option<String> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn validate(State(sim): State<Sim>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let knobs = sim.knobs();
    if let Ok(mut b) = sim.books.lock() {
        b.validate_requests_total += 1;
    }
    let fault = behave(&knobs.validate).await;
    let order: ValidateBody = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad order: {e}\n")).into_response(),
    };
    if let Some(tp) = traceparent(&headers) {
        if let Ok(mut b) = sim.books.lock() {
            b.validate_traceparents.insert(order.order_id.clone(), tp);
        }
    }
    match fault {
        Fault::Error => return unavailable(),
        Fault::Throttle => return throttled(),
        Fault::Hang => return hang().await,
        Fault::None => {}
    }
    let (valid, reasons) = if order.customer_id.starts_with("reject") {
        (false, vec!["customer is blocked".to_string()])
    } else if fraction(&order.order_id, "reject") < knobs.reject_rate {
        (false, vec!["risk score too high".to_string()])
    } else {
        (true, vec![])
    };
    Json(serde_json::json!({ "valid": valid, "reasons": reasons })).into_response()
}

#[derive(Deserialize)]
struct ChargeBody {
    order_id: String,
    customer_id: String,
    amount_cents: i64,
    currency: String,
}

async fn charge(State(sim): State<Sim>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let knobs = sim.knobs();
    let fault = behave(&knobs.charge).await;
    let req: ChargeBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad charge: {e}\n")).into_response(),
    };
    if req.amount_cents <= 0 {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            "amount must be positive\n",
        )
            .into_response();
    }
    match fault {
        Fault::Error => return unavailable(),
        Fault::Throttle => return throttled(),
        Fault::Hang | Fault::None => {}
    }
    // Byte for byte: a provider that decoded, trimmed or folded keys would
    // merge two orders' charges.
    let key = headers
        .get("idempotency-key")
        .map(|v| v.as_bytes().to_vec());
    let tp = traceparent(&headers);
    let entry = {
        let Ok(mut books) = sim.books.lock() else {
            return unavailable();
        };
        books.requests_total += 1;
        let existing = key.as_ref().and_then(|k| books.by_key.get(k).copied());
        match existing {
            Some(i) if !books.entries[i].same_request(&req) => {
                books.key_conflicts += 1;
                let first = &books.entries[i];
                let message = format!(
                    "idempotency key already used for order {:?} ({} {}); this request is for \
                     order {:?} ({} {})",
                    first.order_id,
                    first.amount_cents,
                    first.currency,
                    req.order_id,
                    req.amount_cents,
                    req.currency
                );
                return (
                    StatusCode::CONFLICT,
                    Json(serde_json::json!({
                        "error": { "type": "idempotency_error", "message": message }
                    })),
                )
                    .into_response();
            }
            Some(i) => {
                books.entries[i].requests += 1;
                if tp.is_some() {
                    books.entries[i].traceparent = tp;
                }
                books.entries[i].clone()
            }
            None => {
                let declined = req.customer_id.starts_with("decline")
                    || fraction(&req.order_id, "decline") < knobs.decline_rate;
                let entry = LedgerEntry {
                    idempotency_key: key
                        .as_ref()
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                    order_id: req.order_id,
                    customer_id: req.customer_id,
                    charge_id: format!("ch_{}", uuid::Uuid::new_v4().simple()),
                    status: if declined { "declined" } else { "succeeded" }.into(),
                    amount_cents: req.amount_cents,
                    currency: req.currency,
                    requests: 1,
                    traceparent: tp,
                };
                let i = books.entries.len();
                books.entries.push(entry.clone());
                if let Some(k) = key {
                    books.by_key.insert(k, i);
                }
                entry
            }
        }
    };
    // A customer id starting with `hang` is charged and never answered: a
    // payment call the daemon can only give up on, or be killed during.
    if matches!(fault, Fault::Hang) || entry.customer_id.starts_with("hang") {
        return hang().await;
    }
    let reason = (entry.status == "declined").then_some("insufficient funds");
    Json(serde_json::json!({
        "charge_id": entry.charge_id,
        "status": entry.status,
        "reason": reason,
    }))
    .into_response()
}

async fn ledger(State(sim): State<Sim>) -> Json<Ledger> {
    Json(sim.ledger())
}

async fn get_knobs(State(sim): State<Sim>) -> Json<Knobs> {
    Json(sim.knobs())
}

async fn put_knobs(State(sim): State<Sim>, Json(knobs): Json<Knobs>) -> Json<Knobs> {
    if let Ok(mut k) = sim.knobs.write() {
        *k = knobs.clone();
    }
    Json(knobs)
}

#[cfg(test)]
mod tests {

    #[tokio::test]
    async fn precise_sleeps_never_end_early_and_end_in_deadline_order() {
        let started = std::time::Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for ms in [30u64, 10, 20] {
            let tx = tx.clone();
            tokio::spawn(async move {
                precise_sleep(Duration::from_millis(ms)).await;
                let _ = tx.send((ms, started.elapsed()));
            });
        }
        drop(tx);
        let mut order = Vec::new();
        while let Some((ms, elapsed)) = rx.recv().await {
            assert!(
                elapsed >= Duration::from_millis(ms),
                "{ms} ms ended after {elapsed:?}"
            );
            order.push(ms);
        }
        assert_eq!(order, vec![10, 20, 30]);
    }
    use super::*;

    #[test]
    fn fraction_is_stable_and_spread() {
        assert_eq!(fraction("o-1", "x"), fraction("o-1", "x"));
        let below = (0..10_000)
            .filter(|i| fraction(&format!("o-{i}"), "reject") < 0.1)
            .count();
        assert!((800..1200).contains(&below), "{below}");
    }

    #[tokio::test]
    async fn same_key_same_charge_and_no_key_new_charge() {
        let sim = start("127.0.0.1:0".parse().unwrap(), Knobs::default())
            .await
            .unwrap();
        let http = reqwest::Client::new();
        let body = serde_json::json!({"order_id":"o-1","customer_id":"c","amount_cents":5,"currency":"EUR"});
        let mut ids = Vec::new();
        for _ in 0..3 {
            let r: serde_json::Value = http
                .post(format!("{}/charges", sim.url))
                .header("Idempotency-Key", "o-1")
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            ids.push(r["charge_id"].as_str().unwrap().to_string());
        }
        assert!(ids.iter().all(|i| *i == ids[0]));
        let l = sim.ledger();
        assert_eq!(l.charges.len(), 1);
        assert_eq!(l.charges[0].requests, 3);
        assert_eq!(l.double_charged_orders, 0);
        http.post(format!("{}/charges", sim.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(sim.ledger().double_charged_orders, 1);
        sim.stop().await;
    }

    #[tokio::test]
    async fn keys_are_byte_exact_and_a_reused_key_with_other_parameters_is_refused() {
        let sim = start("127.0.0.1:0".parse().unwrap(), Knobs::default())
            .await
            .unwrap();
        let http = reqwest::Client::new();
        let post = |key: &'static [u8], body: serde_json::Value| {
            http.post(format!("{}/charges", sim.url))
                .header(
                    "Idempotency-Key",
                    reqwest::header::HeaderValue::from_bytes(key).unwrap(),
                )
                .json(&body)
                .send()
        };
        let first = serde_json::json!({"order_id":"Ä-1","customer_id":"c","amount_cents":5,"currency":"EUR"});
        // Raw UTF-8 in a header is obs-text: kept as bytes, not dropped.
        for _ in 0..2 {
            let r = post("Ä-1".as_bytes(), first.clone()).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
        }
        // Other case, other bytes: another key.
        let r = post("ä-1".as_bytes(), serde_json::json!({"order_id":"ä-1","customer_id":"c","amount_cents":5,"currency":"EUR"})).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let conflict = serde_json::json!({"order_id":"Ä-1","customer_id":"c","amount_cents":6,"currency":"EUR"});
        let r = post("Ä-1".as_bytes(), conflict).await.unwrap();
        assert_eq!(r.status(), StatusCode::CONFLICT);
        let err: serde_json::Value = r.json().await.unwrap();
        assert_eq!(err["error"]["type"], "idempotency_error");
        let l = sim.ledger();
        assert_eq!(l.charges.len(), 2);
        assert_eq!(l.charges[0].requests, 2);
        assert_eq!(l.idempotency_conflicts, 1);
        assert_eq!(l.double_charged_orders, 0);
        sim.stop().await;
    }

    #[tokio::test]
    async fn the_ledger_keeps_the_last_traceparent_per_order() {
        let sim = start("127.0.0.1:0".parse().unwrap(), Knobs::default())
            .await
            .unwrap();
        let http = reqwest::Client::new();
        let body = serde_json::json!({"order_id":"o-1","customer_id":"c","amount_cents":5,"currency":"EUR"});
        for (url, tp) in [
            ("validate", None),
            ("validate", Some("00-aa-01")),
            ("charges", Some("00-bb-01")),
            ("charges", None),
        ] {
            let mut req = http
                .post(format!("{}/{url}", sim.url))
                .header("Idempotency-Key", "o-1")
                .json(&body);
            if let Some(tp) = tp {
                req = req.header("traceparent", tp);
            }
            assert!(req.send().await.unwrap().status().is_success());
        }
        let l = sim.ledger();
        assert_eq!(l.charges[0].traceparent.as_deref(), Some("00-bb-01"));
        assert_eq!(l.validate_traceparents["o-1"], "00-aa-01");
        sim.stop().await;
    }
}
