//! Checks of a loaded configuration: ranges and cross-field rules, every
//! problem reported with its key. The form of single values (URLs, broker
//! lists, log filters) is checked in `forms`.

mod forms;

use std::time::Duration;

use super::secret::{redact_url, resolve_secret};
use super::{Config, ConfigError, KeyError, QueueType, SourceKind};
use forms::{
    check_database_url, check_downstream_url, check_kafka_brokers, check_log_filter,
    check_rabbitmq_url,
};

impl Config {
    /// Checks ranges and cross-field rules; every problem is reported, each
    /// with its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, key: &str, message: String| {
            if !ok {
                errors.push(KeyError {
                    key: key.to_string(),
                    message,
                });
            }
        };
        check(
            (1..=65_535).contains(&self.source.prefetch),
            "source.prefetch",
            format!("must be in 1..=65535, got {}", self.source.prefetch),
        );
        check(
            (256..=16 * 1024 * 1024).contains(&self.source.max_message_bytes),
            "source.max_message_bytes",
            format!(
                "must be in 256..=16777216, got {}",
                self.source.max_message_bytes
            ),
        );
        // Checked whatever the source: `conveyor produce` uses them too, and
        // a value that cannot work is better refused before it is needed.
        if let Err(e) = check_kafka_brokers(&self.kafka.brokers) {
            check(false, "kafka.brokers", e);
        }
        let sec = &self.kafka.security;
        if let Some(m) = &sec.sasl_mechanism {
            check(
                ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&m.as_str()),
                "kafka.security.sasl_mechanism",
                format!("must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, got {m:?}"),
            );
        }
        if let Some(p) = &sec.protocol {
            check(
                ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"]
                    .contains(&p.to_ascii_lowercase().as_str()),
                "kafka.security.protocol",
                format!("must be plaintext, ssl, sasl_plaintext or sasl_ssl, got {p:?}"),
            );
        }
        if let Err(e) = resolve_secret("kafka.security.password", &sec.password, &sec.password_file)
        {
            check(false, &e.key, e.message);
        }
        for (key, d, max) in [
            ("kafka.commit_interval", self.kafka.commit_interval, HOUR),
            ("kafka.revoke_timeout", self.kafka.revoke_timeout, HOUR),
            ("kafka.lag_interval", self.kafka.lag_interval, HOUR),
        ] {
            check_duration(&mut check, key, d, max);
        }
        if self.source.kind == SourceKind::Kafka {
            check(
                !self.kafka.group_id.is_empty(),
                "kafka.group_id",
                "must not be empty".into(),
            );
            check(
                !self.kafka.topics.is_empty() && self.kafka.topics.iter().all(|t| !t.is_empty()),
                "kafka.topics",
                "must list at least one non-empty topic".into(),
            );
            check(
                (64..=2_097_151).contains(&self.kafka.fetch_queue_kbytes),
                "kafka.fetch_queue_kbytes",
                format!(
                    "must be in 64..=2097151, got {}",
                    self.kafka.fetch_queue_kbytes
                ),
            );
        }
        check(
            self.rabbitmq.queue.len() <= 250,
            "rabbitmq.queue",
            "must be at most 250 bytes (AMQP names are short strings)".into(),
        );
        check(
            !self.rabbitmq.queue.is_empty(),
            "rabbitmq.queue",
            "must not be empty".into(),
        );
        if let Err(e) = check_rabbitmq_url(&self.rabbitmq.url) {
            check(false, "rabbitmq.url", e);
        }
        check(
            self.source.max_deliveries <= 1000,
            "source.max_deliveries",
            format!(
                "must be in 0..=1000 (0: off), got {}",
                self.source.max_deliveries
            ),
        );
        let follow = &self.source.prefetch_follow;
        if follow.enabled {
            check(
                (1..=self.source.prefetch).contains(&follow.floor),
                "source.prefetch_follow.floor",
                format!(
                    "must be in 1..=source.prefetch ({}), got {}",
                    self.source.prefetch, follow.floor
                ),
            );
        }
        if self.rabbitmq.queue_type == QueueType::Quorum {
            check(
                (1..=1_000_000).contains(&self.rabbitmq.delivery_limit),
                "rabbitmq.delivery_limit",
                format!(
                    "must be in 1..=1000000, got {}",
                    self.rabbitmq.delivery_limit
                ),
            );
            check(
                self.rabbitmq.delivery_limit >= self.source.max_deliveries,
                "rabbitmq.delivery_limit",
                format!(
                    "must be at least source.max_deliveries ({}), got {}: the broker \
                     would dead-letter first, without conveyor's reason headers",
                    self.source.max_deliveries, self.rabbitmq.delivery_limit
                ),
            );
        }
        for e in self.rabbitmq.tls.problems(&self.rabbitmq.url) {
            check(false, &e.key, e.message);
        }
        if let Err(e) = check_database_url(&self.database.url) {
            check(false, "database.url", e);
        }
        check(
            (1..=1024).contains(&self.database.max_connections),
            "database.max_connections",
            format!("must be in 1..=1024, got {}", self.database.max_connections),
        );
        check(
            self.database.max_connections as usize >= self.batch.writers,
            "database.max_connections",
            format!(
                "must be at least batch.writers ({}), got {}",
                self.batch.writers, self.database.max_connections
            ),
        );
        check_duration(
            &mut check,
            "database.acquire_timeout",
            self.database.acquire_timeout,
            HOUR,
        );
        for (key, value) in [
            (
                "pipeline.validate_concurrency",
                self.pipeline.validate_concurrency,
            ),
            (
                "pipeline.charge_concurrency",
                self.pipeline.charge_concurrency,
            ),
            ("pipeline.channel_capacity", self.pipeline.channel_capacity),
        ] {
            check(
                (1..=10_000).contains(&value),
                key,
                format!("must be in 1..=10000, got {value}"),
            );
        }
        check(
            (1..=10_000).contains(&self.batch.max_size),
            "batch.max_size",
            format!("must be in 1..=10000, got {}", self.batch.max_size),
        );
        check_duration(
            &mut check,
            "batch.max_wait",
            self.batch.max_wait,
            Duration::from_secs(60),
        );
        check(
            (1..=64).contains(&self.batch.writers),
            "batch.writers",
            format!("must be in 1..=64, got {}", self.batch.writers),
        );
        check_duration(
            &mut check,
            "batch.retry_initial_interval",
            self.batch.retry_initial_interval,
            HOUR,
        );
        check_duration(
            &mut check,
            "batch.retry_max_interval",
            self.batch.retry_max_interval,
            HOUR,
        );
        check(
            self.batch.retry_initial_interval <= self.batch.retry_max_interval,
            "batch.retry_initial_interval",
            "must be at most batch.retry_max_interval".into(),
        );
        for (name, d) in [
            ("rule_engine", &self.rule_engine),
            ("payment", &self.payment),
        ] {
            if let Err(e) = check_downstream_url(&d.url) {
                check(false, &format!("{name}.url"), e);
            }
            check_duration(&mut check, &format!("{name}.timeout"), d.timeout, HOUR);
            check_duration(
                &mut check,
                &format!("{name}.retry.initial_interval"),
                d.retry.initial_interval,
                HOUR,
            );
            check(
                d.retry.multiplier >= 1.0 && d.retry.multiplier <= 10.0,
                &format!("{name}.retry.multiplier"),
                format!("must be in 1.0..=10.0, got {}", d.retry.multiplier),
            );
            check_duration(
                &mut check,
                &format!("{name}.retry.max_interval"),
                d.retry.max_interval,
                HOUR,
            );
            check(
                d.retry.max_interval >= d.retry.initial_interval,
                &format!("{name}.retry.max_interval"),
                "must be at least retry.initial_interval".into(),
            );
            check_duration(
                &mut check,
                &format!("{name}.retry.max_elapsed"),
                d.retry.max_elapsed,
                DAY,
            );
            let b = &d.breaker;
            check(
                b.failure_rate > 0.0 && b.failure_rate <= 1.0,
                &format!("{name}.breaker.failure_rate"),
                format!(
                    "must be in (0, 1] (above 0, at most 1), got {}",
                    b.failure_rate
                ),
            );
            check(
                (Duration::from_millis(100)..=HOUR).contains(&b.window),
                &format!("{name}.breaker.window"),
                format!(
                    "must be in 100ms..=1h, got {}",
                    humantime::format_duration(b.window)
                ),
            );
            check(
                (1..=1_000_000).contains(&b.min_calls),
                &format!("{name}.breaker.min_calls"),
                format!("must be in 1..=1000000, got {}", b.min_calls),
            );
            check_duration(
                &mut check,
                &format!("{name}.breaker.open_for"),
                b.open_for,
                HOUR,
            );
            check(
                (1..=1_000).contains(&b.half_open_probes),
                &format!("{name}.breaker.half_open_probes"),
                format!("must be in 1..=1000, got {}", b.half_open_probes),
            );
            check(
                (1..=b.half_open_probes.max(1)).contains(&b.half_open_successes),
                &format!("{name}.breaker.half_open_successes"),
                format!(
                    "must be in 1..={} (at most breaker.half_open_probes), got {}",
                    b.half_open_probes, b.half_open_successes
                ),
            );
            check_duration(
                &mut check,
                &format!("{name}.breaker.not_ready_after"),
                b.not_ready_after,
                DAY,
            );
            let r = &d.rate_limit;
            check(
                r.per_second <= 1_000_000,
                &format!("{name}.rate_limit.per_second"),
                format!("must be in 0..=1000000 (0: no limit), got {}", r.per_second),
            );
            check(
                r.burst <= 1_000_000 && (r.burst == 0 || r.per_second > 0),
                &format!("{name}.rate_limit.burst"),
                format!(
                    "must be in 0..=1000000, and needs rate_limit.per_second, got {}",
                    r.burst
                ),
            );
            if let Some((field, why)) = d.concurrency.problem() {
                check(false, &format!("{name}.concurrency.{field}"), why);
            }
            let rb = &d.retry_budget;
            check(
                (0.0..=10.0).contains(&rb.ratio),
                &format!("{name}.retry_budget.ratio"),
                format!("must be in 0.0..=10.0, got {}", rb.ratio),
            );
            check(
                rb.min_per_second <= 1_000_000,
                &format!("{name}.retry_budget.min_per_second"),
                format!("must be in 0..=1000000, got {}", rb.min_per_second),
            );
            check(
                (Duration::from_secs(1)..=Duration::from_secs(60)).contains(&rb.window),
                &format!("{name}.retry_budget.window"),
                format!("must be in 1s..=60s, got {:?}", rb.window),
            );
        }
        check_duration(
            &mut check,
            "shutdown.drain_timeout",
            self.shutdown.drain_timeout,
            HOUR,
        );
        if let Err(e) = check_log_filter(&self.log.level) {
            check(false, "log.level", e);
        }
        let otlp = &self.telemetry.otlp;
        if let Some(endpoint) = &otlp.endpoint {
            check(
                url::Url::parse(endpoint).is_ok_and(|u| matches!(u.scheme(), "http" | "https")),
                "telemetry.otlp.endpoint",
                format!(
                    "must be an http:// or https:// URL, got {:?}",
                    redact_url(endpoint)
                ),
            );
        }
        check(
            otlp.protocol == "http/protobuf",
            "telemetry.otlp.protocol",
            format!(
                "must be http/protobuf (the one OTLP transport of this build), got {:?}",
                otlp.protocol
            ),
        );
        if let Some(r) = otlp.sample_ratio {
            check(
                (0.0..=1.0).contains(&r),
                "telemetry.otlp.sample_ratio",
                format!("must be in 0..=1, got {r}"),
            );
        }
        for (name, value) in &otlp.headers {
            check(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
                    && reqwest::header::HeaderValue::from_str(value.expose()).is_ok(),
                "telemetry.otlp.headers",
                format!("{name:?} is not a valid HTTP header name and value"),
            );
        }
        check(
            (1..=1_000_000).contains(&otlp.queue_size),
            "telemetry.otlp.queue_size",
            format!("must be in 1..=1000000, got {}", otlp.queue_size),
        );
        check(
            (1..=otlp.queue_size.max(1)).contains(&otlp.batch_size),
            "telemetry.otlp.batch_size",
            format!("must be in 1..=queue_size, got {}", otlp.batch_size),
        );
        check_duration(
            &mut check,
            "telemetry.otlp.batch_interval",
            otlp.batch_interval,
            HOUR,
        );
        check_duration(&mut check, "telemetry.otlp.timeout", otlp.timeout, HOUR);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// A duration that must be positive (zero would spin, give up at once or
/// never wait) and bounded (so that a deadline computed from it stays
/// representable and an absurd value is caught).
fn check_duration(
    check: &mut impl FnMut(bool, &str, String),
    key: &str,
    d: Duration,
    max: Duration,
) {
    check(
        (Duration::from_millis(1)..=max).contains(&d),
        key,
        format!(
            "must be in 1ms..={}, got {}",
            humantime::format_duration(max),
            humantime::format_duration(d)
        ),
    );
}
