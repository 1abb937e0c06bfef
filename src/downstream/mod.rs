//! Downstream HTTP clients: the rule engine (validate stage) and the payment
//! provider (charge stage), with pooled keep-alive connections, a per-attempt
//! timeout, retries (see [`retry`]) and a circuit breaker per downstream (see
//! [`breaker`]) that the stages also consult before taking new work.
//!
//! A W3C `traceparent` that came with the message is forwarded on every
//! attempt, so the downstreams' spans join the producer's trace.

pub mod breaker;
pub mod concurrency;
mod endpoint;
mod error;
pub mod retry;
pub mod throttle;

use std::sync::Arc;

use bytes::Bytes;
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};

use crate::config::DownstreamConfig;
use crate::order::Order;
use crate::telemetry::Metrics;
pub use breaker::CircuitBreaker;
use concurrency::ConcurrencyLimit;
use endpoint::Endpoint;
#[cfg(test)]
pub(crate) use error::testing;
pub use error::CallError;
pub use retry::RetryError;

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
        .map_err(|e| RetryError::Permanent(CallError::Encode(Arc::new(e))))?;
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
