//! Traces: one span per order, and its optional export over OTLP.
//!
//! **The order's span** ([`process_span`]) is a plain `tracing` span opened
//! when the source receives the message and closed when the last handle to
//! it goes, which is when the delivery is acknowledged (the [`AckToken`]
//! holds it). Every stage works inside a child of it, so a log line about an
//! order carries its `order_id` and `position` from the span, whether or not
//! traces are exported. Its children, following the OpenTelemetry messaging
//! and HTTP conventions: `decode`; `validate` and `charge`, each with one
//! client span per HTTP attempt (`http.response.status_code`,
//! `http.request.resend_count`, `conveyor.attempt`) and, between attempts, a
//! `retry backoff` or `circuit breaker wait` span; `batch wait` (finished,
//! waiting for its batch to be cut); `commit` (`db.operation.batch.size`);
//! and `ack`.
//!
//! The root continues the producer's trace from the message's `traceparent`
//! header (its parent) and also links to it, as the messaging conventions
//! recommend for a consumer: one trace runs from the producer to the commit.
//!
//! **Export** ([`init`]) is off unless an OTLP endpoint is configured. The
//! SDK's batch processor is not used: spans go through a bounded queue of
//! `telemetry.otlp.queue_size` into one export task (on the daemon's
//! runtime, with conveyor's own reqwest client), so a slow or dead collector
//! never blocks a stage and never grows memory: a span that finds the queue
//! full, or whose export request fails or times out, is dropped and counted
//! in `conveyor_trace_spans_dropped_total`.
//!
//! [`AckToken`]: crate::source::AckToken

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use tokio::sync::{mpsc, oneshot};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::{redact_url, OtlpConfig};
use crate::source::Position;

/// Spans dropped (queue full, export failed) and exported, process-wide;
/// `Metrics::refresh` copies them into `conveyor_trace_spans_*_total`.
pub static SPANS_DROPPED: AtomicU64 = AtomicU64::new(0);
pub static SPANS_EXPORTED: AtomicU64 = AtomicU64::new(0);

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether spans are to be exported: an endpoint in the configuration or in
/// the `OTEL_*` environment, and not disabled there.
pub fn enabled(cfg: &OtlpConfig) -> bool {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return false;
    }
    if env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.split(',').all(|e| e.trim() == "none")) {
        return false;
    }
    cfg.endpoint.is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
}

/// `{base}/v1/traces`, as the SDK builds it from `OTEL_EXPORTER_OTLP_ENDPOINT`.
fn traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// A running export: what [`Export::shutdown`] flushes.
/// Whether spans are exported: without an exporter an order's span is only
/// the context of its log lines, and nothing OpenTelemetry-specific (span
/// attributes, links, child spans) is built for it.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

pub struct Export {
    pub provider: SdkTracerProvider,
    flush: mpsc::Sender<oneshot::Sender<()>>,
}

impl Export {
    /// Sends what is queued (bounded by `limit`); spans still open are lost.
    pub async fn shutdown(self, limit: Duration) {
        let (done, finished) = oneshot::channel();
        if self.flush.send(done).await.is_ok() {
            let _ = tokio::time::timeout(limit, finished).await;
        }
        drop(self.provider);
    }
}

/// Builds the exporter, provider and export task. Must run inside the
/// daemon's tokio runtime (the task is spawned on it).
pub fn init(cfg: &OtlpConfig) -> anyhow::Result<Export> {
    use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
    // The SDK's order (OTEL_SERVICE_NAME, then service.name in
    // OTEL_RESOURCE_ATTRIBUTES), with the configuration first and
    // `conveyor` instead of `unknown_service` last.
    let in_attributes = env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
        a.split(',')
            .any(|kv| kv.trim().starts_with("service.name="))
    });
    let service = cfg
        .service_name
        .clone()
        .or_else(|| env("OTEL_SERVICE_NAME"))
        .or_else(|| (!in_attributes).then(|| "conveyor".into()));
    let mut resource = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if let Some(service) = service {
        resource = resource.with_service_name(service);
    }
    let resource = resource.build();
    let http = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .build()?;
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(ReqwestHttp(http))
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(cfg.timeout);
    if let Some(endpoint) = &cfg.endpoint {
        builder = builder.with_endpoint(traces_url(endpoint));
    }
    if !cfg.headers.is_empty() {
        builder = builder.with_headers(
            cfg.headers
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_string()))
                .collect(),
        );
    }
    let mut exporter = builder
        .build()
        .map_err(|e| anyhow::anyhow!("telemetry.otlp: {e}"))?;
    exporter.set_resource(&resource);
    let (queue_tx, queue_rx) = mpsc::channel(cfg.queue_size);
    let (flush_tx, flush_rx) = mpsc::channel(1);
    tokio::spawn(export_loop(
        exporter,
        queue_rx,
        flush_rx,
        (cfg.batch_size, cfg.batch_interval, cfg.timeout),
    ));
    let mut provider = SdkTracerProvider::builder()
        .with_span_processor(Bounded { queue: queue_tx })
        .with_resource(resource);
    if let Some(ratio) = cfg.sample_ratio {
        provider = provider.with_sampler(Sampler::TraceIdRatioBased(ratio));
    }
    tracing::info!(
        endpoint = cfg.endpoint.as_deref().map(redact_url).unwrap_or_else(|| "from OTEL_* environment".into()),
        sample_ratio = ?cfg.sample_ratio,
        "exporting traces over OTLP/HTTP"
    );
    EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(Export {
        provider: provider.build(),
        flush: flush_tx,
    })
}

/// The tracer the `tracing` layer records into.
pub fn tracer(export: &Export) -> opentelemetry_sdk::trace::Tracer {
    export.provider.tracer("conveyor")
}

/// Hands finished spans to the export task without ever waiting.
#[derive(Debug)]
struct Bounded {
    queue: mpsc::Sender<SpanData>,
}

impl opentelemetry_sdk::trace::SpanProcessor for Bounded {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            SPANS_DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut queue: mpsc::Receiver<SpanData>,
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
    (batch_size, interval, timeout): (usize, Duration, Duration),
) {
    let mut batch = Vec::with_capacity(batch_size);
    let mut tick = tokio::time::interval(interval);
    let mut last_warning: Option<Instant> = None;
    loop {
        let room = batch_size - batch.len();
        tokio::select! {
            n = queue.recv_many(&mut batch, room) => {
                if n == 0 {
                    send(&exporter, &mut batch, timeout, &mut last_warning).await;
                    return;
                }
                if batch.len() < batch_size {
                    continue;
                }
            }
            _ = tick.tick() => {}
            Some(done) = flushes.recv() => {
                while let Ok(span) = queue.try_recv() {
                    batch.push(span);
                    if batch.len() >= batch_size {
                        send(&exporter, &mut batch, timeout, &mut last_warning).await;
                    }
                }
                send(&exporter, &mut batch, timeout, &mut last_warning).await;
                let _ = done.send(());
                continue;
            }
        }
        send(&exporter, &mut batch, timeout, &mut last_warning).await;
    }
}

/// Exports `batch` (emptying it); a failure drops it, counted, and is
/// logged at most once a minute.
async fn send(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    timeout: Duration,
    last_warning: &mut Option<Instant>,
) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let n = spans.len() as u64;
    let error = match tokio::time::timeout(timeout, exporter.export(spans)).await {
        Ok(Ok(())) => {
            SPANS_EXPORTED.fetch_add(n, Ordering::Relaxed);
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {timeout:?}"),
    };
    SPANS_DROPPED.fetch_add(n, Ordering::Relaxed);
    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
        *last_warning = Some(Instant::now());
        tracing::warn!(spans = n, %error,
            "trace export failed; spans dropped (counted in conveyor_trace_spans_dropped_total)");
    }
}

/// OTLP requests through reqwest's async client (the one the daemon already
/// has), on the export task's runtime.
#[derive(Debug)]
struct ReqwestHttp(reqwest::Client);

/// A collector's answer is a small protobuf; more is refused.
const MAX_RESPONSE: usize = 1 << 20;

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ReqwestHttp {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let mut response = self.0.execute(reqwest::Request::try_from(request)?).await?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_RESPONSE {
                return Err("OTLP response body over 1 MiB".into());
            }
            body.extend_from_slice(&chunk);
        }
        let mut out = http::Response::new(bytes::Bytes::from(body));
        *out.status_mut() = response.status();
        *out.headers_mut() = std::mem::take(response.headers_mut());
        Ok(out)
    }
}

/// The span of one order, from receipt to acknowledgement: an OpenTelemetry
/// `process` span (kind consumer) continuing `traceparent`'s trace and
/// linked to it. `group` is the Kafka consumer group.
pub fn process_span(
    position: &Position,
    group: Option<&str>,
    body_size: usize,
    traceparent: Option<&str>,
) -> Span {
    let span = tracing::info_span!(
        "process",
        otel.kind = "consumer",
        order_id = tracing::field::Empty,
        position = %position,
    );
    if span.is_disabled() || !exporting() {
        return span;
    }
    // The parent first: the sampler decides on the producer's trace id.
    let link = match traceparent.and_then(producer_context) {
        Some(producer) => {
            let link = producer.span().span_context().clone();
            // Fails only when traces are not exported (no layer to take it).
            let _ = span.set_parent(producer);
            Some(link)
        }
        None => None,
    };
    // An order the sampler dropped is only the context of its log lines:
    // no attributes, no link, no child spans (see `order_step!`).
    if !traced(&span) {
        return span;
    }
    if let Some(link) = link {
        span.add_link(link);
    }
    let (system, destination) = match position {
        Position::Rabbit { queue, .. } => ("rabbitmq", queue.to_string()),
        Position::Kafka { topic, .. } => ("kafka", topic.to_string()),
    };
    span.set_attribute("messaging.system", system);
    span.set_attribute("messaging.operation.type", "process");
    span.set_attribute("messaging.operation.name", "process");
    span.set_attribute("messaging.destination.name", destination);
    span.set_attribute("messaging.message.body.size", body_size as i64);
    match position {
        Position::Rabbit { delivery_tag, .. } => {
            span.set_attribute(
                "messaging.rabbitmq.message.delivery_tag",
                *delivery_tag as i64,
            );
        }
        Position::Kafka {
            partition, offset, ..
        } => {
            span.set_attribute("messaging.destination.partition.id", partition.to_string());
            span.set_attribute("messaging.kafka.offset", *offset);
        }
    }
    if let Some(group) = group {
        span.set_attribute("messaging.consumer.group.name", group.to_string());
    }
    span
}

/// Whether `span`'s trace is exported: an exporter runs and the sampler
/// kept the trace. Cheap when nothing is exported.
pub fn traced(span: &Span) -> bool {
    exporting() && !span.is_disabled() && span.context().span().span_context().is_sampled()
}

/// One step of an order's work: a DEBUG child span of the order's span
/// when its trace is exported ([`traced`]), otherwise the order's span
/// itself, so that log lines inside keep its fields while an unsampled
/// order costs no OpenTelemetry work beyond its root span.
///
/// `order_step!(parent: &span, "name", fields…)` for an explicit parent;
/// `order_step!("name", fields…)` under the current span, which is then a
/// disabled span when untraced (the current context stays as it is).
macro_rules! order_step {
    (parent: $parent:expr, $($rest:tt)+) => {{
        let parent: &::tracing::Span = $parent;
        if $crate::telemetry::traces::traced(parent) {
            ::tracing::debug_span!(parent: parent, $($rest)+)
        } else {
            parent.clone()
        }
    }};
    ($($rest:tt)+) => {{
        if $crate::telemetry::traces::traced(&::tracing::Span::current()) {
            ::tracing::debug_span!($($rest)+)
        } else {
            ::tracing::Span::none()
        }
    }};
}
pub(crate) use order_step;

/// Names the order once it is decoded: `messaging.message.id` and the
/// `order_id` of every log line inside its span.
pub fn identify(span: &Span, order_id: &str) {
    span.record("order_id", order_id);
    if traced(span) {
        span.set_attribute("messaging.message.id", order_id.to_string());
    }
}

/// The producer's context from a W3C `traceparent`, if it is well formed.
fn producer_context(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The `traceparent` naming `span` (exported traces on), for the downstream
/// request made inside it.
pub fn traceparent_of(span: &Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// A fresh root `traceparent` (sampled), for producers that start a trace:
/// `conveyor produce` (both brokers) and `ingest` (Kafka) stamp one on each message.
pub fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }

    #[test]
    fn fresh_traceparents_are_well_formed() {
        for _ in 0..100 {
            let tp = new_traceparent();
            assert!(crate::downstream::traceparent_header(&tp).is_some(), "{tp}");
            assert!(producer_context(&tp).is_some(), "{tp}");
        }
        assert!(
            producer_context("00-00000000000000000000000000000000-0000000000000000-01").is_none()
        );
        assert!(producer_context("garbage").is_none());
    }
}
