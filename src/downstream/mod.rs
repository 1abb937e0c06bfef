//! Downstream HTTP clients: the rule engine (validate stage) and the payment
//! provider (charge stage), with pooled keep-alive connections, a per-attempt
//! timeout, retries (see [`retry`]) and a circuit breaker per downstream (see
//! [`breaker`]) that the stages also consult before taking new work.
//!
//! A W3C `traceparent` that came with the message is forwarded on every
//! attempt, so the downstreams' spans join the producer's trace.

pub mod breaker;
pub mod concurrency;
pub mod retry;
pub mod throttle;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use crate::config::DownstreamConfig;
use crate::order::Order;
use crate::telemetry::Metrics;
pub use breaker::CircuitBreaker;
use concurrency::{ConcurrencyLimit, ConcurrencyMetrics, Feedback};
pub use retry::RetryError;
use throttle::{Throttle, ThrottleMetrics};

/// How one HTTP attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// Timeout, connection refused or reset, malformed response.
    #[error("transport: {0}")]
    Transport(String),
    /// A non-success status.
    #[error("HTTP {status}: {body}")]
    Status {
        status: u16,
        /// First bytes of the response body.
        body: String,
        retry_after: Option<Duration>,
    },
}

impl CallError {
    /// Timeouts, connect errors, 5xx and 429 are worth retrying; any other
    /// status is the downstream's final word.
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::Transport(_) => true,
            CallError::Status { status, .. } => *status == 429 || *status >= 500,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::Status { retry_after, .. } => *retry_after,
            CallError::Transport(_) => None,
        }
    }

    /// Label for `conveyor_downstream_requests_total{result}`.
    pub fn result_label(&self) -> &'static str {
        match self {
            CallError::Transport(e) if e.starts_with("timeout") => "timeout",
            CallError::Transport(_) => "transport_error",
            CallError::Status { status: 429, .. } => "throttled",
            CallError::Status { status, .. } if *status >= 500 => "server_error",
            CallError::Status { .. } => "client_error",
        }
    }
}

const BODY_EXCERPT: usize = 256;

fn transport(e: reqwest::Error) -> CallError {
    if e.is_timeout() {
        CallError::Transport(format!("timeout: {e}"))
    } else {
        CallError::Transport(e.to_string())
    }
}

/// Sends one request and decodes a JSON success body.
async fn call<T: for<'de> Deserialize<'de>>(req: reqwest::RequestBuilder) -> Result<T, CallError> {
    let resp = req.send().await.map_err(transport)?;
    let status = resp.status();
    if status.is_success() {
        return resp.json::<T>().await.map_err(transport);
    }
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut body = resp.text().await.unwrap_or_default();
    if body.len() > BODY_EXCERPT {
        let mut cut = BODY_EXCERPT;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
    }
    Err(CallError::Status {
        status: status.as_u16(),
        body,
        retry_after,
    })
}

fn http_client(cfg: &DownstreamConfig) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()
}

/// The `traceparent` header to forward, if `value` is a well-formed W3C
/// trace context (`version-traceid-parentid-flags`, lowercase hex, ids not
/// all zeros). A malformed one is dropped rather than passed on: the spec
/// wants a receiver to restart the trace, which is better done downstream
/// than by forwarding garbage.
pub fn traceparent_header(value: &str) -> Option<HeaderValue> {
    fn hex(s: &str, len: usize) -> bool {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
    let mut parts = value.split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let rest = parts.next();
    let well_formed = hex(version, 2)
        && version != "ff"
        // Version 00 has exactly four fields; later versions may append more.
        && (version != "00" || rest.is_none())
        && hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && hex(parent_id, 16)
        && parent_id.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    if !well_formed {
        return None;
    }
    HeaderValue::from_str(value).ok()
}

/// The `Idempotency-Key` header value for an order: its `order_id` with
/// every byte outside visible ASCII, and `%` itself, written as `%XX`
/// (uppercase hex, as in a URL).
///
/// A header value cannot carry every id as it is: HTTP drops the spaces
/// around it (`" A-1"` would reach the provider as `A-1`, another order's
/// key) and raw UTF-8 is not a portable header value (a provider may ignore
/// the key and charge again on every redelivery). The encoding is injective —
/// `%` is always escaped, so every `%XX` in a key stands for one byte of the
/// id — hence two different ids never share a key, and the same id always
/// yields the same key. Ids of visible ASCII other than `%` (UUIDs, `o-1`,
/// `2026/11/A:17`) are their own key, as before.
pub fn idempotency_key(order_id: &str) -> std::borrow::Cow<'_, str> {
    fn plain(b: u8) -> bool {
        (0x21..=0x7e).contains(&b) && b != b'%'
    }
    if order_id.bytes().all(plain) {
        return std::borrow::Cow::Borrowed(order_id);
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut key = String::with_capacity(order_id.len() * 3);
    for b in order_id.bytes() {
        if plain(b) {
            key.push(char::from(b));
        } else {
            key.push('%');
            key.push(char::from(HEX[usize::from(b >> 4)]));
            key.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    std::borrow::Cow::Owned(key)
}

/// One downstream with its retry policy, circuit breaker and metrics.
struct Endpoint {
    name: &'static str,
    http: reqwest::Client,
    url: String,
    cfg: DownstreamConfig,
    metrics: Arc<Metrics>,
    breaker: Arc<CircuitBreaker>,
    throttle: Throttle,
    concurrency: Arc<ConcurrencyLimit>,
}

impl Endpoint {
    fn new(
        name: &'static str,
        path: &str,
        cfg: &DownstreamConfig,
        stage_concurrency: usize,
        metrics: Arc<Metrics>,
    ) -> reqwest::Result<Self> {
        let concurrency = ConcurrencyLimit::new(
            &cfg.concurrency,
            stage_concurrency,
            ConcurrencyMetrics {
                limit: metrics
                    .downstream_concurrency_limit
                    .with_label_values(&[name]),
                in_flight: metrics.downstream_in_flight.with_label_values(&[name]),
                rtt: metrics.downstream_rtt.with_label_values(&[name]),
            },
        );
        let breaker = CircuitBreaker::new(
            name,
            &cfg.breaker,
            metrics.circuit_state.with_label_values(&[name]),
        );
        Ok(Self {
            name,
            http: http_client(cfg)?,
            url: format!("{}{path}", cfg.url.trim_end_matches('/')),
            cfg: cfg.clone(),
            throttle: Throttle::new(
                &cfg.rate_limit,
                cfg.retry_budget.enabled.then_some(&cfg.retry_budget),
                ThrottleMetrics {
                    waited: metrics
                        .downstream_throttled_seconds
                        .with_label_values(&[name]),
                    pauses: metrics.downstream_pauses.with_label_values(&[name]),
                    refusals: metrics
                        .downstream_retry_budget_refusals
                        .with_label_values(&[name]),
                },
            ),
            metrics,
            breaker: Arc::new(breaker),
            concurrency: Arc::new(concurrency),
        })
    }

    async fn post<T: for<'de> Deserialize<'de>>(
        &self,
        body: Bytes,
        idempotency_key: Option<&str>,
        order_id: &str,
        traceparent: Option<&str>,
    ) -> Result<T, RetryError> {
        let ok = self
            .metrics
            .downstream_requests
            .with_label_values(&[self.name, "ok"]);
        let traceparent = traceparent.and_then(|tp| {
            let header = traceparent_header(tp);
            if header.is_none() {
                tracing::debug!(
                    order_id,
                    traceparent = tp,
                    "malformed traceparent not forwarded"
                );
            }
            header
        });
        let mut attempt = 0u32;
        retry::retry(
            &self.cfg.retry,
            &self.breaker,
            &self.throttle,
            || {
                attempt += 1;
                // The HTTP client span of this attempt, inside the stage's.
                let span = crate::telemetry::traces::order_step!(
                    "POST",
                    otel.kind = "client",
                    downstream = self.name,
                    conveyor.attempt = attempt,
                    http.response.status_code = tracing::field::Empty,
                    "error.type" = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty
                );
                let traced = !span.is_disabled();
                if traced {
                    self.describe(&span, attempt);
                }
                let mut req = self
                    .http
                    .post(&self.url)
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                    .body(body.clone());
                if let Some(key) = idempotency_key {
                    req = req.header("Idempotency-Key", key);
                }
                // Exported traces: the downstream's spans become children
                // of this attempt's; an order the sampler dropped passes its
                // own context on, unsampled, so the downstream drops it too;
                // without an exporter the message's context goes on.
                let own = if traced {
                    crate::telemetry::traces::traceparent_of(&span)
                } else if crate::telemetry::traces::exporting() {
                    crate::telemetry::traces::traceparent_of(&tracing::Span::current())
                } else {
                    None
                }
                .and_then(|tp| HeaderValue::from_str(&tp).ok());
                if let Some(tp) = own.as_ref().or(traceparent.as_ref()) {
                    req = req.header("traceparent", tp.clone());
                }
                let ok = ok.clone();
                let attempt_span = span.clone();
                async move {
                    let started = tokio::time::Instant::now();
                    let res = call::<T>(req).await;
                    self.concurrency.record(
                        started,
                        match &res {
                            Err(e) if e.is_transient() => Feedback::BackPressure,
                            _ => Feedback::Answered,
                        },
                    );
                    let span = attempt_span;
                    match &res {
                        Ok(_) => {
                            span.record("http.response.status_code", 200u64);
                            ok.inc()
                        }
                        Err(e) => {
                            if let CallError::Status {
                                status: 429,
                                retry_after: Some(wait),
                                ..
                            } = e
                            {
                                self.throttle.pause(*wait);
                            }
                            if let CallError::Status { status, .. } = e {
                                span.record("http.response.status_code", u64::from(*status));
                            }
                            span.record("error.type", e.result_label());
                            span.record("otel.status_code", "ERROR");
                            self.metrics
                                .downstream_requests
                                .with_label_values(&[self.name, e.result_label()])
                                .inc()
                        }
                    }
                    res
                }
                .instrument(span)
            },
            |err, wait| {
                self.metrics
                    .downstream_retries
                    .with_label_values(&[self.name])
                    .inc();
                tracing::debug!(order_id, downstream = self.name, error = %err, ?wait, "retrying");
            },
        )
        .await
    }
}

impl Endpoint {
    /// The HTTP attributes of an attempt's span (exported traces only).
    fn describe(&self, span: &tracing::Span, attempt: u32) {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        span.set_attribute("http.request.method", "POST");
        span.set_attribute("url.full", crate::config::redact_url(&self.url));
        if let Ok(url) = url::Url::parse(&self.url) {
            if let Some(host) = url.host_str() {
                span.set_attribute("server.address", host.to_string());
            }
            if let Some(port) = url.port_or_known_default() {
                span.set_attribute("server.port", i64::from(port));
            }
        }
        if attempt > 1 {
            span.set_attribute("http.request.resend_count", i64::from(attempt - 1));
        }
    }
}

/// The rule engine's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Verdict {
    pub valid: bool,
    #[serde(default)]
    pub reasons: Vec<String>,
}

pub struct RuleEngineClient {
    endpoint: Endpoint,
}

impl RuleEngineClient {
    /// `stage_concurrency` is the validate stage's limit in fixed mode.
    pub fn new(
        cfg: &DownstreamConfig,
        stage_concurrency: usize,
        metrics: Arc<Metrics>,
    ) -> reqwest::Result<Self> {
        Ok(Self {
            endpoint: Endpoint::new("rule_engine", "/validate", cfg, stage_concurrency, metrics)?,
        })
    }

    /// The concurrency limit the validate stage's pool follows.
    pub fn concurrency(&self) -> Arc<ConcurrencyLimit> {
        self.endpoint.concurrency.clone()
    }

    /// `POST /validate` with the order as received.
    pub async fn validate(
        &self,
        order_id: &str,
        raw: Bytes,
        traceparent: Option<&str>,
    ) -> Result<Verdict, RetryError> {
        self.endpoint.post(raw, None, order_id, traceparent).await
    }

    /// The rule engine's circuit breaker, which the validate stage waits on.
    pub fn breaker(&self) -> Arc<CircuitBreaker> {
        self.endpoint.breaker.clone()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChargeRequest<'a> {
    pub order_id: &'a str,
    pub customer_id: &'a str,
    pub amount_cents: i64,
    pub currency: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChargeStatus {
    Succeeded,
    Declined,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Charge {
    pub charge_id: String,
    pub status: ChargeStatus,
    #[serde(default)]
    pub reason: Option<String>,
}

pub struct PaymentClient {
    endpoint: Endpoint,
}

impl PaymentClient {
    /// `stage_concurrency` is the charge stage's limit in fixed mode.
    pub fn new(
        cfg: &DownstreamConfig,
        stage_concurrency: usize,
        metrics: Arc<Metrics>,
    ) -> reqwest::Result<Self> {
        Ok(Self {
            endpoint: Endpoint::new("payment", "/charges", cfg, stage_concurrency, metrics)?,
        })
    }

    /// The concurrency limit the charge stage's pool follows.
    pub fn concurrency(&self) -> Arc<ConcurrencyLimit> {
        self.endpoint.concurrency.clone()
    }

    /// `POST /charges` with `Idempotency-Key: <idempotency_key(order_id)>`:
    /// a retry or a redelivery gets the same charge back, never a second one.
    pub async fn charge(
        &self,
        order: &Order,
        traceparent: Option<&str>,
    ) -> Result<Charge, RetryError> {
        let body = serde_json::to_vec(&ChargeRequest {
            order_id: &order.order_id,
            customer_id: &order.customer_id,
            amount_cents: order.amount_cents,
            currency: &order.currency,
        })
        .map_err(|e| RetryError::Permanent(CallError::Transport(e.to_string())))?;
        let key = idempotency_key(&order.order_id);
        self.endpoint
            .post(Bytes::from(body), Some(&key), &order.order_id, traceparent)
            .await
    }

    /// The payment provider's circuit breaker, which the charge stage waits on.
    pub fn breaker(&self) -> Arc<CircuitBreaker> {
        self.endpoint.breaker.clone()
    }
}

#[cfg(test)]
mod tests;
