//! The Prometheus registry: every metric conveyor exports (`conveyor_*`),
//! registered once with all its known label sets, the clock behind the
//! oldest-unacked gauge, and quantiles read back from histograms (for
//! `demo`'s report).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::outcome::{DeadLetterReason, Outcome, Stage};
use prometheus::{
    exponential_buckets, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::drain::DrainEstimator;
use super::runtime::RuntimeMetrics;

/// The `event` label values of `conveyor_kafka_rebalance_events_total`.
pub const REBALANCE_EVENTS: [&str; 6] = [
    "assigned",
    "revoked",
    "revoke_timeout",
    "revoke_commit_refused",
    "resumed",
    "commit_refused",
];

/// Every metric conveyor exports, prefixed `conveyor_`.
pub struct Metrics {
    pub registry: Registry,
    pub received: IntCounter,
    pub acked: IntCounter,
    pub orders: IntCounterVec,
    pub dead_letters: IntCounterVec,
    /// Log lines of per-message events dropped by their rate limit.
    pub log_lines_suppressed: IntCounterVec,
    pub stage_in_flight: IntGaugeVec,
    pub stage_duration: HistogramVec,
    pub downstream_requests: IntCounterVec,
    pub downstream_retries: IntCounterVec,
    /// Seconds attempts waited for a downstream's rate limit or pause.
    pub downstream_throttled_seconds: CounterVec,
    /// 429s with `Retry-After` that paused a whole downstream.
    pub downstream_pauses: IntCounterVec,
    /// Retries that found the downstream's retry budget spent and waited.
    pub downstream_retry_budget_refusals: IntCounterVec,
    /// A downstream's current concurrency limit (fixed or adaptive).
    pub downstream_concurrency_limit: IntGaugeVec,
    /// Orders being worked on against a downstream.
    pub downstream_in_flight: IntGaugeVec,
    /// Round-trip time of a downstream's answered attempts.
    pub downstream_rtt: HistogramVec,
    pub batch_orders: Histogram,
    pub batch_commit_duration: Histogram,
    pub batch_commit_retries: IntCounter,
    pub unacked: IntGauge,
    /// The prefetch limit now: `source.prefetch`, or where it follows the
    /// stages to (`[source.prefetch_follow]`).
    pub prefetch_limit: IntGauge,
    /// Consumers replaced to move a quorum queue's per-consumer prefetch
    /// (`source::rabbitmq::swap`).
    pub prefetch_swaps: IntCounter,
    pub end_to_end: Histogram,
    pub ready: IntGauge,
    pub kafka_lag: IntGaugeVec,
    pub kafka_rebalance: IntCounterVec,
    /// 1 for a configured topic that cannot be consumed (missing, not
    /// authorised), per topic; see `source::kafka::consumable`.
    pub kafka_topic_unavailable: IntGaugeVec,
    /// 1 for an owned partition stuck behind a permanent consumer error.
    pub kafka_partition_stuck: IntGaugeVec,
    /// Permanent consumer errors (undecodable codec, corrupt batch, topic
    /// missing or not authorised), by librdkafka error code.
    pub kafka_consumer_errors: IntCounterVec,
    pub broker_errors: IntCounterVec,
    pub rabbitmq_queue: IntGaugeVec,
    pub circuit_state: IntGaugeVec,
    /// Times a downstream's circuit opened from closed (one per outage).
    pub circuit_openings: IntCounterVec,
    pub oldest_unacked_age: Gauge,
    /// When each held delivery arrived, for `oldest_unacked_age`.
    pub held_since: HeldClock,
    /// `conveyor_backlog_drain_seconds` and the ack rates behind it.
    pub drain: DrainEstimator,
    /// `conveyor_runtime_*`, refreshed at each scrape.
    pub runtime: RuntimeMetrics,
    /// Finished trace spans not exported: the export queue was full (a slow
    /// or dead collector) or their export failed.
    pub trace_spans_dropped: IntCounter,
    /// Trace spans the collector accepted.
    pub trace_spans_exported: IntCounter,
}

/// Arrival times of the deliveries held right now, oldest first.
#[derive(Default)]
pub struct HeldClock {
    inner: Mutex<(u64, BTreeMap<u64, Instant>)>,
}

impl HeldClock {
    /// Registers an arrival; the id removes it.
    pub fn start(&self) -> u64 {
        let Ok(mut g) = self.inner.lock() else {
            return 0;
        };
        g.0 += 1;
        let id = g.0;
        g.1.insert(id, Instant::now());
        id
    }

    pub fn stop(&self, id: u64) {
        if let Ok(mut g) = self.inner.lock() {
            g.1.remove(&id);
        }
    }

    /// Age of the oldest delivery held, zero when none is.
    pub fn oldest_age(&self) -> Duration {
        self.inner
            .lock()
            .ok()
            .and_then(|g| g.1.values().next().map(|t| t.elapsed()))
            .unwrap_or_default()
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("conveyor".into()), None)?;
        let latency = exponential_buckets(0.0005, 2.0, 16)?;
        let m = Self {
            received: IntCounter::new(
                "messages_received_total",
                "Messages taken from the broker.",
            )?,
            acked: IntCounter::new(
                "messages_acked_total",
                "Messages acknowledged to the broker after their outcome was durable.",
            )?,
            orders: IntCounterVec::new(
                Opts::new(
                    "orders_total",
                    "Orders by outcome: accepted, rejected, declined, dead_lettered, duplicate.",
                ),
                &["outcome"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "dead_letters_total",
                    "Messages published to the dead-letter destination, by reason.",
                ),
                &["reason"],
            )?,
            log_lines_suppressed: IntCounterVec::new(
                Opts::new(
                    "log_lines_suppressed_total",
                    "Log lines of per-message events not written because their kind was over its rate.",
                ),
                &["event"],
            )?,
            stage_in_flight: IntGaugeVec::new(
                Opts::new("stage_in_flight", "Orders being worked on, per stage."),
                &["stage"],
            )?,
            stage_duration: HistogramVec::new(
                HistogramOpts::new(
                    "stage_duration_seconds",
                    "Time an order spends in a stage, retries included.",
                )
                .buckets(latency.clone()),
                &["stage"],
            )?,
            downstream_requests: IntCounterVec::new(
                Opts::new(
                    "downstream_requests_total",
                    "HTTP requests to the rule engine and payment provider, by result.",
                ),
                &["downstream", "result"],
            )?,
            downstream_retries: IntCounterVec::new(
                Opts::new(
                    "downstream_retries_total",
                    "Retries after a transient downstream failure.",
                ),
                &["downstream"],
            )?,
            downstream_throttled_seconds: CounterVec::new(
                Opts::new(
                    "downstream_throttled_seconds_total",
                    "Time attempts waited for the downstream's rate limit or a Retry-After pause.",
                ),
                &["downstream"],
            )?,
            downstream_pauses: IntCounterVec::new(
                Opts::new(
                    "downstream_pauses_total",
                    "429 answers with Retry-After that paused every call to the downstream.",
                ),
                &["downstream"],
            )?,
            downstream_concurrency_limit: IntGaugeVec::new(
                Opts::new(
                    "downstream_concurrency_limit",
                    "Orders a downstream's stage may work on at once.",
                ),
                &["downstream"],
            )?,
            downstream_in_flight: IntGaugeVec::new(
                Opts::new(
                    "downstream_in_flight",
                    "Orders being worked on against a downstream.",
                ),
                &["downstream"],
            )?,
            downstream_rtt: HistogramVec::new(
                HistogramOpts::new(
                    "downstream_rtt_seconds",
                    "Round-trip time of a downstream's answered attempts.",
                )
                .buckets(latency.clone()),
                &["downstream"],
            )?,
            downstream_retry_budget_refusals: IntCounterVec::new(
                Opts::new(
                    "downstream_retry_budget_refusals_total",
                    "Retries that found the downstream's retry budget spent and waited for room.",
                ),
                &["downstream"],
            )?,
            batch_orders: Histogram::with_opts(
                HistogramOpts::new("batch_orders", "Orders per committed batch.")
                    .buckets(exponential_buckets(1.0, 2.0, 14)?),
            )?,
            batch_commit_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "batch_commit_duration_seconds",
                    "Time to commit one batch transaction.",
                )
                .buckets(latency.clone()),
            )?,
            batch_commit_retries: IntCounter::new(
                "batch_commit_retries_total",
                "Batch commits retried after a transient database error.",
            )?,
            unacked: IntGauge::new(
                "unacked_messages",
                "Messages held and not yet acknowledged (prefetch permits in use).",
            )?,
            prefetch_limit: IntGauge::new(
                "prefetch_limit",
                "The most unacknowledged messages held at once now (source.prefetch, or \
                 where it follows the stages to).",
            )?,
            prefetch_swaps: IntCounter::new(
                "prefetch_consumer_swaps_total",
                "RabbitMQ consumers replaced to move a quorum queue's per-consumer prefetch \
                 to the followed limit.",
            )?,
            end_to_end: Histogram::with_opts(
                HistogramOpts::new(
                    "end_to_end_latency_seconds",
                    "From the message's timestamp (or its receipt) to the commit of its outcome.",
                )
                // Fine buckets (×1.25) so quantiles read from them are close.
                .buckets(exponential_buckets(0.0005, 1.25, 56)?),
            )?,
            ready: IntGauge::new("ready", "1 when /readyz answers 200.")?,
            rabbitmq_queue: IntGaugeVec::new(
                Opts::new(
                    "rabbitmq_queue_messages",
                    "Messages ready in the consumed queue (passive declare), refreshed periodically.",
                ),
                &["queue"],
            )?,
            circuit_state: IntGaugeVec::new(
                Opts::new(
                    "circuit_state",
                    "Circuit breaker per downstream: 0 closed, 1 half-open, 2 open.",
                ),
                &["downstream"],
            )?,
            circuit_openings: IntCounterVec::new(
                Opts::new(
                    "circuit_openings_total",
                    "Times a downstream's circuit opened from closed; reopenings after failed probes are not counted.",
                ),
                &["downstream"],
            )?,
            oldest_unacked_age: Gauge::new(
                "oldest_unacked_age_seconds",
                "Age of the oldest message held and not yet acknowledged (0 when none).",
            )?,
            held_since: HeldClock::default(),
            drain: DrainEstimator::new(GaugeVec::new(
                Opts::new(
                    "backlog_drain_seconds",
                    "Estimated seconds to work off the broker backlog at the recent ack rate (60 s EWMA), per queue or topic; +Inf while lagging and acknowledging nothing.",
                ),
                &["queue", "topic"],
            )?),
            runtime: RuntimeMetrics::register(&registry)?,
            trace_spans_dropped: IntCounter::new(
                "trace_spans_dropped_total",
                "Trace spans dropped instead of exported: export queue full or export failed.",
            )?,
            trace_spans_exported: IntCounter::new(
                "trace_spans_exported_total",
                "Trace spans the OTLP collector accepted.",
            )?,
            broker_errors: IntCounterVec::new(
                Opts::new(
                    "broker_errors_total",
                    "Broker client errors: connection lost, reconnect failed, consumer error.",
                ),
                &["broker", "kind"],
            )?,
            kafka_lag: IntGaugeVec::new(
                Opts::new(
                    "kafka_consumer_lag_messages",
                    "High watermark minus committed offset, per owned partition.",
                ),
                &["topic", "partition"],
            )?,
            kafka_rebalance: IntCounterVec::new(
                Opts::new(
                    "kafka_rebalance_events_total",
                    "Consumer-group rebalance events: partitions assigned, revoked, revokes whose in-flight orders outlived kafka.revoke_timeout, revoke commits the coordinator refused, partitions resumed from such a refused commit, partitions of periodic commits the coordinator refused (sent again).",
                ),
                &["event"],
            )?,
            kafka_topic_unavailable: IntGaugeVec::new(
                Opts::new(
                    "kafka_topic_unavailable",
                    "1 while a configured topic cannot be consumed (does not exist, not authorised).",
                ),
                &["topic"],
            )?,
            kafka_partition_stuck: IntGaugeVec::new(
                Opts::new(
                    "kafka_partition_stuck",
                    "1 while an owned partition with lag makes no progress behind a permanent consumer error (a codec this build cannot decode, a corrupt batch).",
                ),
                &["topic", "partition"],
            )?,
            kafka_consumer_errors: IntCounterVec::new(
                Opts::new(
                    "kafka_consumer_errors_total",
                    "Permanent Kafka consumer errors by librdkafka error code.",
                ),
                &["code"],
            )?,
            registry,
        };
        m.registry.register(Box::new(m.received.clone()))?;
        m.registry.register(Box::new(m.acked.clone()))?;
        m.registry.register(Box::new(m.orders.clone()))?;
        m.registry.register(Box::new(m.dead_letters.clone()))?;
        m.registry
            .register(Box::new(m.log_lines_suppressed.clone()))?;
        m.registry.register(Box::new(m.stage_in_flight.clone()))?;
        m.registry.register(Box::new(m.stage_duration.clone()))?;
        m.registry
            .register(Box::new(m.downstream_requests.clone()))?;
        m.registry
            .register(Box::new(m.downstream_retries.clone()))?;
        m.registry
            .register(Box::new(m.downstream_throttled_seconds.clone()))?;
        m.registry.register(Box::new(m.downstream_pauses.clone()))?;
        m.registry
            .register(Box::new(m.downstream_retry_budget_refusals.clone()))?;
        m.registry
            .register(Box::new(m.downstream_concurrency_limit.clone()))?;
        m.registry
            .register(Box::new(m.downstream_in_flight.clone()))?;
        m.registry.register(Box::new(m.downstream_rtt.clone()))?;
        m.registry.register(Box::new(m.batch_orders.clone()))?;
        m.registry
            .register(Box::new(m.batch_commit_duration.clone()))?;
        m.registry
            .register(Box::new(m.batch_commit_retries.clone()))?;
        m.registry.register(Box::new(m.unacked.clone()))?;
        m.registry.register(Box::new(m.prefetch_limit.clone()))?;
        m.registry.register(Box::new(m.prefetch_swaps.clone()))?;
        m.registry.register(Box::new(m.end_to_end.clone()))?;
        m.registry.register(Box::new(m.ready.clone()))?;
        m.registry.register(Box::new(m.kafka_lag.clone()))?;
        m.registry.register(Box::new(m.kafka_rebalance.clone()))?;
        m.registry
            .register(Box::new(m.kafka_topic_unavailable.clone()))?;
        m.registry
            .register(Box::new(m.kafka_partition_stuck.clone()))?;
        m.registry
            .register(Box::new(m.kafka_consumer_errors.clone()))?;
        m.registry.register(Box::new(m.broker_errors.clone()))?;
        m.registry.register(Box::new(m.rabbitmq_queue.clone()))?;
        m.registry.register(Box::new(m.circuit_state.clone()))?;
        m.registry.register(Box::new(m.circuit_openings.clone()))?;
        m.registry
            .register(Box::new(m.oldest_unacked_age.clone()))?;
        m.registry.register(Box::new(m.drain.gauge()))?;
        m.registry
            .register(Box::new(m.trace_spans_dropped.clone()))?;
        m.registry
            .register(Box::new(m.trace_spans_exported.clone()))?;
        // CPU seconds, resident and virtual memory, open and max fds, start
        // time, threads (Linux /proc), as conveyor_process_*.
        #[cfg(target_os = "linux")]
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        // Export every known series from the start: a family that appears
        // only after its first event breaks rate() and alerts.
        for downstream in ["rule_engine", "payment"] {
            m.circuit_state.with_label_values(&[downstream]).set(0);
            m.circuit_openings.with_label_values(&[downstream]);
            m.downstream_retries.with_label_values(&[downstream]);
            m.downstream_throttled_seconds
                .with_label_values(&[downstream]);
            m.downstream_pauses.with_label_values(&[downstream]);
            m.downstream_retry_budget_refusals
                .with_label_values(&[downstream]);
            m.downstream_requests.with_label_values(&[downstream, "ok"]);
            m.downstream_concurrency_limit
                .with_label_values(&[downstream]);
            m.downstream_in_flight.with_label_values(&[downstream]);
            m.downstream_rtt.with_label_values(&[downstream]);
        }
        for outcome in Outcome::ALL {
            m.orders.with_label_values(&[outcome.as_str()]);
        }
        // Every reason from the start, so a rate over a reason that has not
        // happened yet is 0, not absent.
        for reason in DeadLetterReason::all() {
            m.dead_letters.with_label_values(&[reason.as_str()]);
        }
        for event in super::events::EVENTS {
            m.log_lines_suppressed.with_label_values(&[event]);
        }
        m.broker_errors
            .with_label_values(&["rabbitmq", "reconnect_failed"]);
        m.broker_errors
            .with_label_values(&["kafka", "consumer_error"]);
        for event in REBALANCE_EVENTS {
            m.kafka_rebalance.with_label_values(&[event]);
        }
        for stage in [Stage::Validate, Stage::Charge] {
            m.stage_in_flight.with_label_values(&[stage.as_str()]);
            m.stage_duration.with_label_values(&[stage.as_str()]);
        }
        Ok(m)
    }

    /// Counts one order under its outcome.
    pub fn outcome(&self, outcome: Outcome) {
        self.orders.with_label_values(&[outcome.as_str()]).inc();
    }

    /// Counts a rebalance event (one of [`REBALANCE_EVENTS`]) for this many
    /// partitions.
    pub fn rebalance_event(&self, event: &str, partitions: usize) {
        self.kafka_rebalance
            .with_label_values(&[event])
            .inc_by(partitions as u64);
    }

    /// Brings the series read at scrape time up to date.
    pub fn refresh(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.oldest_unacked_age
            .set(self.held_since.oldest_age().as_secs_f64());
        self.runtime.refresh();
        // The export counts process-wide totals; these counters follow them
        // (one refresh at a time, so a delta is never added twice).
        static COPYING: Mutex<()> = Mutex::new(());
        if let Ok(_one) = COPYING.lock() {
            for (counter, total) in [
                (&self.trace_spans_dropped, &super::traces::SPANS_DROPPED),
                (&self.trace_spans_exported, &super::traces::SPANS_EXPORTED),
            ] {
                counter.inc_by(total.load(Relaxed).saturating_sub(counter.get()));
            }
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Estimates a quantile from a histogram's buckets by linear interpolation
/// inside the bucket that holds it (what PromQL's `histogram_quantile` does).
pub fn histogram_quantile(h: &Histogram, q: f64) -> Option<f64> {
    use prometheus::core::Metric as _;
    let m = h.metric();
    let hist = m.get_histogram();
    let total = hist.get_sample_count();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut prev_bound, mut prev_count) = (0.0, 0u64);
    for b in hist.get_bucket() {
        let count = b.cumulative_count();
        if count as f64 >= rank {
            let width = b.upper_bound() - prev_bound;
            let within = (rank - prev_count as f64) / (count - prev_count).max(1) as f64;
            return Some(prev_bound + width * within);
        }
        prev_bound = b.upper_bound();
        prev_count = count;
    }
    Some(prev_bound)
}
