//! Typed configuration: one TOML file, every key overridable from the
//! environment (`CONVEYOR__SECTION__KEY`), secrets from the environment or a
//! file, validated at start with errors that name the key at fault.
//!
//! The doc comments on the fields are the user documentation; the example in
//! `config/conveyor.toml` carries every key with its default.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

/// Prefix of environment overrides: `CONVEYOR__BATCH__MAX_SIZE=1000`.
pub const ENV_PREFIX: &str = "CONVEYOR";

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    pub rabbitmq: RabbitConfig,
    pub kafka: KafkaConfig,
    pub database: DatabaseConfig,
    pub pipeline: PipelineConfig,
    pub batch: BatchConfig,
    pub rule_engine: DownstreamConfig,
    pub payment: DownstreamConfig,
    pub shutdown: ShutdownConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Rabbitmq,
    Kafka,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    /// Which broker orders come from.
    pub kind: SourceKind,
    /// The most unacknowledged messages held at once, all stages together.
    /// This is the backpressure: memory is proportional to it.
    pub prefetch: u32,
    /// Larger messages are dead-lettered as `too_large` without being parsed.
    pub max_message_bytes: usize,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            kind: SourceKind::Rabbitmq,
            prefetch: 512,
            max_message_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitConfig {
    /// AMQP URI without credentials, e.g. `amqp://127.0.0.1:5672/%2f`.
    pub url: String,
    pub username: String,
    /// Secret: prefer `CONVEYOR__RABBITMQ__PASSWORD` or `password_file`.
    pub password: Option<Secret>,
    /// A file whose contents (trimmed) are the password; wins over `password`.
    pub password_file: Option<PathBuf>,
    /// The queue orders are consumed from.
    pub queue: String,
    /// Exchange poison and exhausted orders are published to (direct).
    pub dead_letter_exchange: String,
    /// Queue bound to the dead-letter exchange; empty means `<queue>.dlq`.
    pub dead_letter_queue: String,
    /// Declare the queues and the exchange on start (durable). Turn off when
    /// the topology is owned elsewhere.
    pub declare: bool,
    /// Consumer tag announced to the broker.
    pub consumer_tag: String,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            url: "amqp://127.0.0.1:5672/%2f".into(),
            username: "guest".into(),
            password: Some(Secret::new("guest")),
            password_file: None,
            queue: "orders".into(),
            dead_letter_exchange: "conveyor.dlx".into(),
            dead_letter_queue: String::new(),
            declare: true,
            consumer_tag: "conveyor".into(),
        }
    }
}

impl RabbitConfig {
    pub fn dead_letter_queue(&self) -> String {
        if self.dead_letter_queue.is_empty() {
            format!("{}.dlq", self.queue)
        } else {
            self.dead_letter_queue.clone()
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group; members share the partitions of `topics`.
    pub group_id: String,
    /// Topics consumed (environment: comma-separated).
    pub topics: Vec<String>,
    /// Where poison and exhausted orders go; empty means `<topic>.dlq` of
    /// the message's own topic.
    pub dead_letter_topic: String,
    /// How often done offsets are committed (asynchronously); a final
    /// synchronous commit happens on drain and on revoke.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// On revoke, how long in-flight orders of the revoked partitions may
    /// take to finish before their offsets are committed and they are given up.
    #[serde(with = "humantime_serde")]
    pub revoke_timeout: Duration,
    /// How often per-partition lag is refreshed.
    #[serde(with = "humantime_serde")]
    pub lag_interval: Duration,
    /// Cap of librdkafka's own fetch queue (`queued.max.messages.kbytes`):
    /// with the prefetch limit, what bounds memory whatever the lag.
    pub fetch_queue_kbytes: u32,
    /// Any librdkafka property, passed through (TLS, SASL, timeouts…).
    /// Values of keys naming a password, secret or key are redacted.
    #[serde(serialize_with = "serialize_redacted_properties")]
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "conveyor".into(),
            topics: vec!["orders".into()],
            dead_letter_topic: String::new(),
            commit_interval: Duration::from_secs(1),
            revoke_timeout: Duration::from_secs(10),
            lag_interval: Duration::from_secs(5),
            fetch_queue_kbytes: 4096,
            properties: Default::default(),
        }
    }
}

impl KafkaConfig {
    pub fn dead_letter_topic(&self, topic: &str) -> String {
        if self.dead_letter_topic.is_empty() {
            format!("{topic}.dlq")
        } else {
            self.dead_letter_topic.clone()
        }
    }
}

fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.ends_with(".key") || k.contains("key.pem")
}

fn serialize_redacted_properties<S: Serializer>(
    props: &std::collections::BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(props.len()))?;
    for (k, v) in props {
        if is_secret_property(k) {
            map.serialize_entry(k, "[redacted]")?;
        } else {
            map.serialize_entry(k, v)?;
        }
    }
    map.end()
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user@host:port/db`, or `sqlite://FILE` (`sqlite:FILE`)
    /// for SQLite, whose file is created if missing. A PostgreSQL password in
    /// the URL works but is better given through `password` / `password_file`.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    /// Secret: prefer `CONVEYOR__DATABASE__PASSWORD` or `password_file`.
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// Connections in the pool; writers each hold one while committing.
    pub max_connections: u32,
    /// Apply the embedded migrations when `run` starts.
    pub migrate_on_start: bool,
    /// How long to wait for a connection from the pool.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(&self.url))
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("max_connections", &self.max_connections)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/conveyor".into(),
            password: None,
            password_file: None,
            max_connections: 8,
            migrate_on_start: true,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Orders validated concurrently (rule-engine calls in flight).
    pub validate_concurrency: usize,
    /// Orders charged concurrently (payment calls in flight).
    pub charge_concurrency: usize,
    /// Capacity of the channels joining the stages. Small on purpose: the
    /// prefetch limit, not these, is what holds work.
    pub channel_capacity: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            validate_concurrency: 64,
            charge_concurrency: 64,
            channel_capacity: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch is committed when it holds this many orders…
    pub max_size: usize,
    /// …or when its first order has waited this long, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Batches committed concurrently, each in its own transaction.
    pub writers: usize,
    /// Backoff between attempts of a batch whose commit failed transiently.
    #[serde(with = "humantime_serde")]
    pub retry_initial_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_interval: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_size: 256,
            max_wait: Duration::from_millis(20),
            writers: 2,
            retry_initial_interval: Duration::from_millis(100),
            retry_max_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownstreamConfig {
    /// Base URL; the rule engine answers `POST /validate`, the payment
    /// provider `POST /charges`.
    pub url: String,
    /// Timeout of one attempt, connect included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Idle keep-alive connections kept per host.
    pub pool_max_idle: usize,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
}

impl Default for DownstreamConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            timeout: Duration::from_secs(2),
            pool_max_idle: 128,
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
        }
    }
}

/// Circuit breaker of one downstream. It opens when, among the last `window`
/// calls (at least `min_calls` of them), the share of transient failures
/// (timeout, connect error, 5xx, 429) reaches `failure_rate`; a 4xx answer
/// is the downstream working and counts as a success. While open, the stage
/// takes no new orders and in-flight orders wait (intake pauses through the
/// backpressure chain instead of dead-lettering the backlog). After
/// `open_for` it turns half-open and lets `half_open_probes` calls through:
/// all succeeding close it, one failing opens it again.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Off: every call goes through and retries alone decide an order's fate.
    pub enabled: bool,
    /// Share of failed calls in the window that opens the circuit, in (0, 1].
    pub failure_rate: f64,
    /// How many of the most recent calls the failure rate is computed over.
    pub window: u32,
    /// Fewer calls than this in the window never open the circuit, so a
    /// couple of failures after a quiet spell do not stop the stage.
    pub min_calls: u32,
    /// How long the circuit stays open before it lets probes through.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Calls let through while half-open; all must succeed to close it.
    pub half_open_probes: u32,
    /// `/readyz` turns false once the circuit has gone this long without
    /// closing (open and half-open alike): an outage that is not a blip.
    #[serde(with = "humantime_serde")]
    pub not_ready_after: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_rate: 0.5,
            window: 20,
            min_calls: 10,
            open_for: Duration::from_secs(5),
            half_open_probes: 3,
            not_ready_after: Duration::from_secs(30),
        }
    }
}

/// Exponential backoff with full jitter: attempt n waits a uniform random
/// time in `[0, min(max_interval, initial_interval * multiplier^n)]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    pub multiplier: f64,
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// Past this, a transiently failing order is dead-lettered with reason
    /// `retries_exhausted`. Time spent waiting for an open circuit does not
    /// count: an order that has to wait for the circuit starts its budget over.
    #[serde(with = "humantime_serde")]
    pub max_elapsed: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_millis(50),
            multiplier: 2.0,
            max_interval: Duration::from_secs(2),
            max_elapsed: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Time from SIGTERM to exit. In-flight orders finish and their batches
    /// commit within it; what is unfinished then is left unacked and the
    /// broker redelivers it. Keep systemd's `TimeoutStopSec` and Kubernetes'
    /// `terminationGracePeriodSeconds` above it.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `conveyor=debug,lapin=warn`.
    /// `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

/// A secret value: never printed, whether through `Debug` or serialization.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

fn serialize_redacted_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

/// Hides the password of a `scheme://user:password@host` URL.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:[redacted]{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &url[scheme_end + 3 + at..]
        ),
        _ => url.to_string(),
    }
}

/// One problem with the configuration, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<KeyError>),
}

impl Config {
    /// Loads the file (if given) then the environment overrides, and
    /// validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let mut environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("kafka.topics");
        if env.is_some() {
            environment = environment.source(env);
        }
        let cfg: Config = builder.add_source(environment).build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

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
        if self.source.kind == SourceKind::Kafka {
            check(
                !self.kafka.brokers.is_empty(),
                "kafka.brokers",
                "must not be empty".into(),
            );
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
                !self.kafka.commit_interval.is_zero(),
                "kafka.commit_interval",
                "must be positive".into(),
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
        check(
            self.rabbitmq.url.starts_with("amqp://") || self.rabbitmq.url.starts_with("amqps://"),
            "rabbitmq.url",
            format!(
                "must start with amqp:// or amqps://, got {:?}",
                redact_url(&self.rabbitmq.url)
            ),
        );
        check(
            self.database.url.starts_with("postgres://")
                || self.database.url.starts_with("postgresql://")
                || self.database.url.starts_with("sqlite:"),
            "database.url",
            format!(
                "must start with postgres://, postgresql:// or sqlite:, got {:?}",
                redact_url(&self.database.url)
            ),
        );
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
        check(
            !self.batch.max_wait.is_zero() && self.batch.max_wait <= Duration::from_secs(60),
            "batch.max_wait",
            format!(
                "must be in 1ms..=60s, got {}",
                humantime::format_duration(self.batch.max_wait)
            ),
        );
        check(
            (1..=64).contains(&self.batch.writers),
            "batch.writers",
            format!("must be in 1..=64, got {}", self.batch.writers),
        );
        check(
            !self.batch.retry_initial_interval.is_zero()
                && self.batch.retry_initial_interval <= self.batch.retry_max_interval,
            "batch.retry_initial_interval",
            "must be positive and at most batch.retry_max_interval".into(),
        );
        for (name, d) in [
            ("rule_engine", &self.rule_engine),
            ("payment", &self.payment),
        ] {
            check(
                d.url.starts_with("http://") || d.url.starts_with("https://"),
                &format!("{name}.url"),
                format!("must start with http:// or https://, got {:?}", d.url),
            );
            check(
                !d.timeout.is_zero(),
                &format!("{name}.timeout"),
                "must be positive".into(),
            );
            check(
                !d.retry.initial_interval.is_zero(),
                &format!("{name}.retry.initial_interval"),
                "must be positive".into(),
            );
            check(
                d.retry.multiplier >= 1.0 && d.retry.multiplier <= 10.0,
                &format!("{name}.retry.multiplier"),
                format!("must be in 1.0..=10.0, got {}", d.retry.multiplier),
            );
            check(
                d.retry.max_interval >= d.retry.initial_interval,
                &format!("{name}.retry.max_interval"),
                "must be at least retry.initial_interval".into(),
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
                (1..=10_000).contains(&b.window),
                &format!("{name}.breaker.window"),
                format!("must be in 1..=10000, got {}", b.window),
            );
            check(
                (1..=b.window.max(1)).contains(&b.min_calls),
                &format!("{name}.breaker.min_calls"),
                format!(
                    "must be in 1..={} (at most breaker.window), got {}",
                    b.window, b.min_calls
                ),
            );
            check(
                b.open_for >= Duration::from_millis(1) && b.open_for <= Duration::from_secs(3600),
                &format!("{name}.breaker.open_for"),
                format!(
                    "must be in 1ms..=1h, got {}",
                    humantime::format_duration(b.open_for)
                ),
            );
            check(
                (1..=1_000).contains(&b.half_open_probes),
                &format!("{name}.breaker.half_open_probes"),
                format!("must be in 1..=1000, got {}", b.half_open_probes),
            );
        }
        check(
            !self.shutdown.drain_timeout.is_zero(),
            "shutdown.drain_timeout",
            "must be positive".into(),
        );
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Resolves a secret: the file wins over the inline value.
pub fn resolve_secret(
    key: &str,
    inline: &Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<Option<Secret>, KeyError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError {
            key: format!("{key}_file"),
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        return Ok(Some(Secret::new(text.trim_end_matches(['\n', '\r']))));
    }
    Ok(inline.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("defaults validate");
    }

    #[test]
    fn shipped_example_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/conveyor.toml");
        let cfg = Config::load_with_env(Some(&path), Some(HashMap::new())).expect("loads");
        assert_eq!(
            cfg.to_redacted_toml(),
            Config::default().to_redacted_toml(),
            "config/conveyor.toml must list the defaults"
        );
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let cfg = Config::load_with_env(
            None,
            Some(env(&[
                ("CONVEYOR__BATCH__MAX_SIZE", "1000"),
                ("CONVEYOR__SHUTDOWN__DRAIN_TIMEOUT", "5s"),
                ("CONVEYOR__PAYMENT__RETRY__MAX_ELAPSED", "1m"),
                ("CONVEYOR__DATABASE__PASSWORD", "12345"),
            ])),
        )
        .expect("loads");
        assert_eq!(cfg.batch.max_size, 1000);
        assert_eq!(cfg.shutdown.drain_timeout, Duration::from_secs(5));
        assert_eq!(cfg.payment.retry.max_elapsed, Duration::from_secs(60));
        assert_eq!(
            cfg.database.password.as_ref().map(Secret::expose),
            Some("12345")
        );
    }

    #[test]
    fn errors_name_the_key_and_the_range() {
        let err = Config::load_with_env(
            None,
            Some(env(&[
                ("CONVEYOR__SOURCE__PREFETCH", "0"),
                ("CONVEYOR__BATCH__WRITERS", "100"),
            ])),
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert!(
            text.contains("source.prefetch: must be in 1..=65535, got 0"),
            "{text}"
        );
        assert!(
            text.contains("batch.writers: must be in 1..=64, got 100"),
            "{text}"
        );
    }

    #[test]
    fn breaker_keys_from_the_environment() {
        let cfg = Config::load_with_env(
            None,
            Some(env(&[
                ("CONVEYOR__PAYMENT__BREAKER__FAILURE_RATE", "0.25"),
                ("CONVEYOR__PAYMENT__BREAKER__OPEN_FOR", "1s"),
                ("CONVEYOR__RULE_ENGINE__BREAKER__ENABLED", "false"),
                ("CONVEYOR__RULE_ENGINE__BREAKER__NOT_READY_AFTER", "2m"),
            ])),
        )
        .expect("loads");
        assert_eq!(cfg.payment.breaker.failure_rate, 0.25);
        assert_eq!(cfg.payment.breaker.open_for, Duration::from_secs(1));
        assert!(cfg.payment.breaker.enabled);
        assert!(!cfg.rule_engine.breaker.enabled);
        assert_eq!(
            cfg.rule_engine.breaker.not_ready_after,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn breaker_errors_name_the_key_and_the_range() {
        let err = Config::load_with_env(
            None,
            Some(env(&[
                ("CONVEYOR__PAYMENT__BREAKER__FAILURE_RATE", "0"),
                ("CONVEYOR__PAYMENT__BREAKER__WINDOW", "0"),
                ("CONVEYOR__PAYMENT__BREAKER__HALF_OPEN_PROBES", "0"),
                ("CONVEYOR__PAYMENT__BREAKER__OPEN_FOR", "0s"),
                ("CONVEYOR__RULE_ENGINE__BREAKER__FAILURE_RATE", "1.5"),
                ("CONVEYOR__RULE_ENGINE__BREAKER__WINDOW", "5"),
            ])),
        )
        .expect_err("invalid");
        let text = err.to_string();
        for want in [
            "payment.breaker.failure_rate: must be in (0, 1] (above 0, at most 1), got 0",
            "payment.breaker.window: must be in 1..=10000, got 0",
            "payment.breaker.half_open_probes: must be in 1..=1000, got 0",
            "payment.breaker.open_for: must be in 1ms..=1h, got 0s",
            "rule_engine.breaker.failure_rate: must be in (0, 1] (above 0, at most 1), got 1.5",
            // The default min_calls (10) cannot exceed a window of 5.
            "rule_engine.breaker.min_calls: must be in 1..=5 (at most breaker.window), got 10",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        let ok = Config::load_with_env(
            None,
            Some(env(&[
                ("CONVEYOR__PAYMENT__BREAKER__FAILURE_RATE", "1"),
                ("CONVEYOR__PAYMENT__BREAKER__WINDOW", "1"),
                ("CONVEYOR__PAYMENT__BREAKER__MIN_CALLS", "1"),
            ])),
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn database_url_scheme_picks_the_store() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/conveyor",
            "postgresql://db/conveyor",
            "sqlite://conveyor.db",
            "sqlite:data/x.db?mode=rwc",
        ] {
            let cfg = Config::load_with_env(None, Some(env(&[("CONVEYOR__DATABASE__URL", url)])))
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(cfg.database.url, url);
        }
        let err = Config::load_with_env(
            None,
            Some(env(&[("CONVEYOR__DATABASE__URL", "mysql://db/conveyor")])),
        )
        .expect_err("invalid");
        assert!(
            err.to_string().contains(
                "database.url: must start with postgres://, postgresql:// or sqlite:, \
                 got \"mysql://db/conveyor\""
            ),
            "{err}"
        );
    }

    #[test]
    fn type_errors_name_the_key() {
        let err = Config::load_with_env(None, Some(env(&[("CONVEYOR__BATCH__MAX_WAIT", "soon")])))
            .expect_err("invalid");
        assert!(err.to_string().contains("batch.max_wait"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::load_with_env(None, Some(env(&[("CONVEYOR__BATCH__MAX_SIZ", "3")])))
            .expect_err("invalid");
        assert!(err.to_string().contains("max_siz"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let mut cfg = Config::default();
        cfg.database.password = Some(Secret::new("hunter2"));
        cfg.database.url = "postgres://app:inline-pw@db:5432/orders".into();
        let shown = format!("{cfg:?}\n{}", cfg.to_redacted_toml());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("inline-pw"), "{shown}");
        assert!(
            shown.contains("postgres://app:[redacted]@db:5432/orders"),
            "{shown}"
        );
    }

    #[test]
    fn kafka_keys_from_the_environment() {
        let cfg = Config::load_with_env(
            None,
            Some(env(&[
                ("CONVEYOR__SOURCE__KIND", "kafka"),
                ("CONVEYOR__KAFKA__TOPICS", "a,b"),
                ("CONVEYOR__KAFKA__GROUP_ID", "g"),
            ])),
        )
        .expect("loads");
        assert_eq!(cfg.source.kind, SourceKind::Kafka);
        assert_eq!(cfg.kafka.topics, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(cfg.kafka.dead_letter_topic("a"), "a.dlq");
        let err = Config::load_with_env(
            None,
            Some(env(&[
                ("CONVEYOR__SOURCE__KIND", "kafka"),
                ("CONVEYOR__KAFKA__GROUP_ID", ""),
            ])),
        )
        .expect_err("empty group");
        assert!(err.to_string().contains("kafka.group_id"), "{err}");
    }

    #[test]
    fn kafka_secret_properties_are_redacted() {
        let mut cfg = Config::default();
        cfg.kafka
            .properties
            .insert("sasl.password".into(), "hunter2".into());
        cfg.kafka
            .properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        let shown = cfg.to_redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("SASL_SSL"), "{shown}");
    }

    #[test]
    fn secret_file_wins_and_is_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").expect("write");
        let got = resolve_secret("database.password", &Some(Secret::new("x")), &Some(path))
            .expect("reads");
        assert_eq!(got.as_ref().map(Secret::expose), Some("s3cret"));
        let err = resolve_secret(
            "database.password",
            &None,
            &Some(dir.path().join("missing")),
        )
        .expect_err("missing file");
        assert_eq!(err.key, "database.password_file");
    }
}
