//! One downstream endpoint: its HTTP client, retry policy, circuit breaker,
//! throttle, concurrency limit and metrics, and the attempt itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use serde::Deserialize;
use tracing::Instrument as _;

use super::breaker::BreakerMetrics;
use super::concurrency::{ConcurrencyLimit, ConcurrencyMetrics, Feedback};
use super::throttle::{Throttle, ThrottleMetrics};
use super::{retry, traceparent_header, CallError, CircuitBreaker, RetryError};
use crate::config::DownstreamConfig;
use crate::telemetry::Metrics;

const BODY_EXCERPT: usize = 256;

/// Sends one request and decodes a JSON success body.
async fn call<T: for<'de> Deserialize<'de>>(req: reqwest::RequestBuilder) -> Result<T, CallError> {
    let resp = req.send().await.map_err(CallError::from)?;
    let status = resp.status();
    if status.is_success() {
        return resp.json::<T>().await.map_err(CallError::from);
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

/// One downstream with its retry policy, circuit breaker and metrics.
pub(super) struct Endpoint {
    name: &'static str,
    http: reqwest::Client,
    url: String,
    cfg: DownstreamConfig,
    metrics: Arc<Metrics>,
    pub(super) breaker: Arc<CircuitBreaker>,
    throttle: Throttle,
    pub(super) concurrency: Arc<ConcurrencyLimit>,
}

impl Endpoint {
    pub(super) fn new(
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
                downstream: name,
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
            BreakerMetrics {
                state: metrics.circuit_state.with_label_values(&[name]),
                openings: metrics.circuit_openings.with_label_values(&[name]),
            },
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

    pub(super) async fn post<T: for<'de> Deserialize<'de>>(
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
                    let under_way = self.concurrency.call();
                    let res = call::<T>(req).await;
                    self.concurrency.record(
                        under_way,
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
