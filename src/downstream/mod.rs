//! Downstream HTTP clients: the rule engine (validate stage) and the payment
//! provider (charge stage), with pooled keep-alive connections, a per-attempt
//! timeout, retries (see [`retry`]) and a circuit breaker per downstream (see
//! [`breaker`]) that the stages also consult before taking new work.
//!
//! A W3C `traceparent` that came with the message is forwarded on every
//! attempt, so the downstreams' spans join the producer's trace.

pub mod breaker;
pub mod retry;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use serde::{Deserialize, Serialize};

use crate::config::DownstreamConfig;
use crate::order::Order;
use crate::telemetry::Metrics;
pub use breaker::CircuitBreaker;
pub use retry::RetryError;

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

/// One downstream with its retry policy, circuit breaker and metrics.
struct Endpoint {
    name: &'static str,
    http: reqwest::Client,
    url: String,
    cfg: DownstreamConfig,
    metrics: Arc<Metrics>,
    breaker: Arc<CircuitBreaker>,
}

impl Endpoint {
    fn new(
        name: &'static str,
        path: &str,
        cfg: &DownstreamConfig,
        metrics: Arc<Metrics>,
    ) -> reqwest::Result<Self> {
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
            metrics,
            breaker: Arc::new(breaker),
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
        retry::retry(
            &self.cfg.retry,
            &self.breaker,
            || {
                let mut req = self
                    .http
                    .post(&self.url)
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                    .body(body.clone());
                if let Some(key) = idempotency_key {
                    req = req.header("Idempotency-Key", key);
                }
                if let Some(tp) = &traceparent {
                    req = req.header("traceparent", tp.clone());
                }
                let ok = ok.clone();
                async move {
                    let res = call::<T>(req).await;
                    match &res {
                        Ok(_) => ok.inc(),
                        Err(e) => self
                            .metrics
                            .downstream_requests
                            .with_label_values(&[self.name, e.result_label()])
                            .inc(),
                    }
                    res
                }
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
    pub fn new(cfg: &DownstreamConfig, metrics: Arc<Metrics>) -> reqwest::Result<Self> {
        Ok(Self {
            endpoint: Endpoint::new("rule_engine", "/validate", cfg, metrics)?,
        })
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
    pub fn new(cfg: &DownstreamConfig, metrics: Arc<Metrics>) -> reqwest::Result<Self> {
        Ok(Self {
            endpoint: Endpoint::new("payment", "/charges", cfg, metrics)?,
        })
    }

    /// `POST /charges` with `Idempotency-Key: <order_id>`: a retry or a
    /// redelivery gets the same charge back, never a second one.
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
        self.endpoint
            .post(
                Bytes::from(body),
                Some(&order.order_id),
                &order.order_id,
                traceparent,
            )
            .await
    }

    /// The payment provider's circuit breaker, which the charge stage waits on.
    pub fn breaker(&self) -> Arc<CircuitBreaker> {
        self.endpoint.breaker.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_traceparents_are_forwarded_as_they_are() {
        for tp in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            // A later version may carry more fields.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let got = traceparent_header(tp).unwrap_or_else(|| panic!("{tp} refused"));
            assert_eq!(got.to_str().ok(), Some(tp));
        }
    }

    #[test]
    fn malformed_traceparents_are_dropped() {
        for tp in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
        ] {
            assert!(traceparent_header(tp).is_none(), "{tp:?} accepted");
        }
    }
}
