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
    pub ingest: IngestConfig,
    pub telemetry: TelemetryConfig,
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
    /// A message delivered more often than this (it keeps killing the
    /// process, or keeps being cut off mid-work) is dead-lettered as
    /// `redelivery_limit` before any work is done. Counted by the broker on
    /// quorum queues (`x-delivery-count`), otherwise by a small record in
    /// the store written before the work. 0 turns counting off.
    pub max_deliveries: u32,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            kind: SourceKind::Rabbitmq,
            prefetch: 512,
            max_message_bytes: 64 * 1024,
            max_deliveries: 5,
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitConfig {
    /// AMQP URI without credentials, e.g. `amqp://127.0.0.1:5672/%2f`
    /// (`amqps://` for TLS). Credentials in it are overridden by `username`
    /// and `password`, and redacted wherever the URL is shown.
    #[serde(serialize_with = "serialize_redacted_url")]
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
    /// `classic` (the default) or `quorum`: the type the queue is declared
    /// with. A quorum queue is declared with `x-queue-type=quorum`,
    /// `x-delivery-limit` and the dead-letter exchange, so that the broker
    /// counts deliveries (`x-delivery-count`) and dead-letters a message
    /// returned more than `delivery_limit` times instead of dropping it.
    pub queue_type: QueueType,
    /// Quorum queues: `x-delivery-limit`, the broker's own backstop. Keep it
    /// at or above `source.max_deliveries`, so that the daemon dead-letters
    /// first, with its reason headers.
    pub delivery_limit: u32,
    /// TLS for `amqps://` URLs.
    pub tls: RabbitTls,
}

/// How the work queue is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

/// TLS for `rabbitmq.url = "amqps://…"` (rustls): the CA that the
/// broker's certificate must chain to, and a client certificate for
/// brokers that authenticate clients by TLS.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitTls {
    /// PEM file of the CA(s) trusted beside the system's store.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) and its PKCS#8 key (PEM), both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
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
            queue_type: QueueType::Classic,
            delivery_limit: 20,
            tls: RabbitTls::default(),
        }
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be left out unseen.
        let Self {
            url,
            username,
            password,
            password_file,
            queue,
            dead_letter_exchange,
            dead_letter_queue,
            declare,
            consumer_tag,
            queue_type,
            delivery_limit,
            tls,
        } = self;
        f.debug_struct("RabbitConfig")
            .field("url", &redact_url(url))
            .field("username", username)
            .field("password", password)
            .field("password_file", password_file)
            .field("queue", queue)
            .field("dead_letter_exchange", dead_letter_exchange)
            .field("dead_letter_queue", dead_letter_queue)
            .field("declare", declare)
            .field("consumer_tag", consumer_tag)
            .field("queue_type", queue_type)
            .field("delivery_limit", delivery_limit)
            .field("tls", tls)
            .finish()
    }
}

impl RabbitTls {
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// What is wrong with these keys for `url`, each naming its key: a
    /// file that cannot be read or holds no PEM, a certificate without its
    /// key, TLS keys on a plaintext URL.
    pub fn problems(&self, url: &str) -> Vec<KeyError> {
        let mut out = Vec::new();
        let mut bad = |key: &str, message: String| {
            out.push(KeyError {
                key: format!("rabbitmq.tls.{key}"),
                message,
            })
        };
        if self.is_set() && !url.starts_with("amqps://") {
            bad(
                if self.ca_file.is_some() {
                    "ca_file"
                } else {
                    "cert_file"
                },
                "is set but rabbitmq.url is not amqps://".into(),
            );
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            bad(
                if self.cert_file.is_some() {
                    "key_file"
                } else {
                    "cert_file"
                },
                "cert_file and key_file go together".into(),
            );
        }
        for (key, file) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if let Some(f) = file {
                match std::fs::read_to_string(f) {
                    Ok(text) if text.contains("-----BEGIN ") => {}
                    Ok(_) => bad(key, format!("{} holds no PEM block", f.display())),
                    Err(e) => bad(key, format!("cannot read {}: {e}", f.display())),
                }
            }
        }
        out
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

#[derive(Clone, Deserialize, Serialize)]
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
    /// Wherever the configuration is shown, the value of every key naming a
    /// password, secret, token, credential, key material or a `*.config`
    /// (`sasl.oauthbearer.config`) is redacted.
    #[serde(serialize_with = "serialize_redacted_properties")]
    pub properties: std::collections::BTreeMap<String, String>,
    /// TLS and SASL as typed keys (`[kafka.security]`), see [`KafkaSecurity`].
    pub security: KafkaSecurity,
}

/// Kafka TLS and SASL, each key mapped to its librdkafka property; an entry
/// of `kafka.properties` with the same librdkafka name wins.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSecurity {
    /// `security.protocol` (`plaintext`, `ssl`, `sasl_plaintext`,
    /// `sasl_ssl`); unset: `sasl_ssl`/`ssl` when TLS files are given (with
    /// and without `sasl_mechanism`), `sasl_plaintext` with SASL alone.
    pub protocol: Option<String>,
    /// PEM file of the CA(s) the brokers' certificates must chain to
    /// (`ssl.ca.location`); unset: the system's CA store.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, PEM (`ssl.certificate.location`,
    /// `ssl.key.location`), for brokers that authenticate clients by TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// `sasl.mechanism`: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    pub username: Option<String>,
    /// Secret: prefer `CONVEYOR__KAFKA__SECURITY__PASSWORD` or `password_file`.
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
}

impl KafkaSecurity {
    /// The librdkafka properties these keys stand for (the password file
    /// read now; `Config::validate` has checked it can be).
    pub fn librdkafka_properties(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        let tls = self.ca_file.is_some() || self.cert_file.is_some();
        let sasl = self.sasl_mechanism.is_some();
        let protocol = self.protocol.clone().or(match (tls, sasl) {
            (true, true) => Some("sasl_ssl".into()),
            (true, false) => Some("ssl".into()),
            (false, true) => Some("sasl_plaintext".into()),
            (false, false) => None,
        });
        let path = |f: &PathBuf| f.display().to_string();
        p.extend(protocol.map(|v| ("security.protocol", v)));
        p.extend(self.ca_file.as_ref().map(|f| ("ssl.ca.location", path(f))));
        p.extend(
            self.cert_file
                .as_ref()
                .map(|f| ("ssl.certificate.location", path(f))),
        );
        p.extend(
            self.key_file
                .as_ref()
                .map(|f| ("ssl.key.location", path(f))),
        );
        p.extend(self.sasl_mechanism.clone().map(|v| ("sasl.mechanism", v)));
        p.extend(self.username.clone().map(|v| ("sasl.username", v)));
        if let Ok(Some(pw)) = resolve_secret(
            "kafka.security.password",
            &self.password,
            &self.password_file,
        ) {
            p.push(("sasl.password", pw.expose().to_string()));
        }
        p
    }
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
            security: KafkaSecurity::default(),
        }
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be left out unseen.
        let Self {
            brokers,
            group_id,
            topics,
            dead_letter_topic,
            commit_interval,
            revoke_timeout,
            lag_interval,
            fetch_queue_kbytes,
            properties,
            security,
        } = self;
        f.debug_struct("KafkaConfig")
            .field("brokers", brokers)
            .field("group_id", group_id)
            .field("topics", topics)
            .field("dead_letter_topic", dead_letter_topic)
            .field("commit_interval", commit_interval)
            .field("revoke_timeout", revoke_timeout)
            .field("lag_interval", lag_interval)
            .field("fetch_queue_kbytes", fetch_queue_kbytes)
            .field(
                "properties",
                &redacted_properties(properties).collect::<std::collections::BTreeMap<_, _>>(),
            )
            .field("security", security)
            .finish()
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

fn serialize_redacted_properties<S: Serializer>(
    props: &std::collections::BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(redacted_properties(props))
}

/// `kafka.properties` as they may be shown: the value of every key that
/// names a secret ([`is_secret_name`]) replaced by `[redacted]`.
pub fn redacted_properties(
    props: &std::collections::BTreeMap<String, String>,
) -> impl Iterator<Item = (&str, &str)> + '_ {
    props.iter().map(|(k, v)| {
        let shown = if is_secret_name(k) { REDACTED } else { v };
        (k.as_str(), shown)
    })
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user@host:port/db`, or `sqlite://FILE` (`sqlite:FILE`)
    /// for SQLite, whose file is created if missing. A PostgreSQL password in
    /// the URL (userinfo or `?password=`) works but is better given through
    /// `password` / `password_file`; it is redacted wherever the URL is shown.
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
        // Destructured so that a new field cannot be left out unseen.
        let Self {
            url,
            password,
            password_file,
            max_connections,
            migrate_on_start,
            acquire_timeout,
        } = self;
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(url))
            .field("password", password)
            .field("password_file", password_file)
            .field("max_connections", max_connections)
            .field("migrate_on_start", migrate_on_start)
            .field("acquire_timeout", acquire_timeout)
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

#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownstreamConfig {
    /// Base URL, `http[s]://HOST[:PORT][/PATH]`; the rule engine answers
    /// `POST /validate`, the payment provider `POST /charges`. Userinfo
    /// (`https://user:password@host`) is sent as basic auth and its password
    /// redacted wherever the URL is shown.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    /// Timeout of one attempt, connect included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Idle keep-alive connections kept per host.
    pub pool_max_idle: usize,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
    pub rate_limit: RateLimitConfig,
    pub retry_budget: RetryBudgetConfig,
    pub concurrency: crate::downstream::concurrency::ConcurrencyConfig,
}

/// How much retries may add to a downstream's load: over the last `window`,
/// at most `ratio` retries per first attempt, plus `min_per_second` (so a
/// quiet downstream can still retry). A retry over budget waits for room —
/// backpressure, never a dead letter. Off by default: the breaker already
/// stops an outage; the budget is for a downstream failing in part under a
/// load that retries would make worse.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryBudgetConfig {
    pub enabled: bool,
    pub ratio: f32,
    pub min_per_second: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Most calls per second to one downstream, retries included (0: no
/// limit), and how many may go at once after a quiet spell (0: as many as
/// `per_second`). Set it a little under the provider's published limit.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for DownstreamConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            timeout: Duration::from_secs(2),
            pool_max_idle: 128,
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            rate_limit: RateLimitConfig::default(),
            retry_budget: RetryBudgetConfig::default(),
            concurrency: Default::default(),
        }
    }
}

impl fmt::Debug for DownstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be left out unseen.
        let Self {
            url,
            timeout,
            pool_max_idle,
            retry,
            breaker,
            rate_limit,
            retry_budget,
            concurrency,
        } = self;
        f.debug_struct("DownstreamConfig")
            .field("url", &redact_url(url))
            .field("timeout", timeout)
            .field("pool_max_idle", pool_max_idle)
            .field("retry", retry)
            .field("breaker", breaker)
            .field("rate_limit", rate_limit)
            .field("retry_budget", retry_budget)
            .field("concurrency", concurrency)
            .finish()
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

/// `conveyor ingest`, the HTTP intake in front of the broker. Its memory is
/// bounded by `max_concurrent_requests × max_body_bytes` (plus a small
/// constant per request), whatever the number of clients.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Address of the API and of its own `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Most orders in one `POST /orders/batch` (1..=100000).
    pub max_batch: usize,
    /// Largest request body accepted; a larger one is answered 413.
    pub max_body_bytes: usize,
    /// How long a batch may wait for its publisher confirms (or Kafka
    /// acknowledgements) before the request is answered 503.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Requests handled at once; one more is answered 429 at once.
    pub max_concurrent_requests: usize,
    /// Unconfirmed publishes per request at most.
    pub publish_window: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            max_batch: 5000,
            max_body_bytes: 16 * 1024 * 1024,
            publish_timeout: Duration::from_secs(10),
            max_concurrent_requests: 16,
            publish_window: 1000,
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

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    pub otlp: OtlpConfig,
}

/// Trace export over OTLP/HTTP (protobuf), off unless an endpoint is given
/// here or in `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off again).
/// A key set here wins over its `OTEL_*` variable, as in the OpenTelemetry SDKs.
/// Read from the environment as the SDK does: `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`,
/// `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`, `OTEL_SERVICE_NAME`,
/// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_SDK_DISABLED`.
/// Not read: `OTEL_BSP_*` and `OTEL_EXPORTER_OTLP_TIMEOUT` (conveyor's own
/// bounded export queue replaces the SDK's batch processor: `queue_size`,
/// `batch_size`, `batch_interval`, `timeout`) and `OTEL_EXPORTER_OTLP_PROTOCOL`
/// (always `http/protobuf`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// Collector base URL, e.g. `http://127.0.0.1:4318`; spans go to
    /// `{endpoint}/v1/traces` (a URL already ending in `/v1/traces` is used as
    /// it is). Unset: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else no export.
    #[serde(serialize_with = "serialize_redacted_opt_url")]
    pub endpoint: Option<String>,
    /// `http/protobuf`, the one OTLP transport this build speaks.
    pub protocol: String,
    /// Extra request headers (an API key, `authorization`). Secret: redacted
    /// wherever the configuration is shown; added to by `OTEL_EXPORTER_OTLP_HEADERS`.
    pub headers: std::collections::BTreeMap<String, Secret>,
    /// Share of orders traced, 0..=1, decided by trace id (so every service
    /// sampling by ratio keeps or drops the same traces). Unset: the SDK's
    /// `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, by default all.
    pub sample_ratio: Option<f64>,
    /// `service.name` of the spans. Unset: `OTEL_SERVICE_NAME`, else `conveyor`.
    pub service_name: Option<String>,
    /// Finished spans waiting for export at most; more are dropped and
    /// counted in `conveyor_trace_spans_dropped_total`, so a slow or dead
    /// collector never holds up or grows the daemon.
    pub queue_size: usize,
    /// Spans per export request at most.
    pub batch_size: usize,
    /// Longest a finished span waits before its batch is sent.
    #[serde(with = "humantime_serde")]
    pub batch_interval: Duration,
    /// Per export request; a batch that times out is dropped and counted.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            protocol: "http/protobuf".into(),
            headers: Default::default(),
            sample_ratio: None,
            service_name: None,
            queue_size: 4096,
            batch_size: 512,
            batch_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
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

fn serialize_redacted_opt_url<S: Serializer>(
    url: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => s.serialize_some(&redact_url(url)),
        None => s.serialize_none(),
    }
}

/// What stands in for a secret wherever the configuration is shown.
pub const REDACTED: &str = "[redacted]";

/// Whether a name — a `kafka.properties` key, a URL query parameter — names
/// a secret whose value must never be shown: a password, passphrase, secret,
/// token or credential, key material (`ssl.key.pem`, `…private.key.pem`), or
/// a `*.config` that can carry any of them (`sasl.oauthbearer.config`,
/// `sasl.jaas.config`). A path to a file (`*.location`, `*.file`) is not the
/// secret it holds and stays visible.
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let words: Vec<&str> = name
        .split(['.', '_', '-'])
        .filter(|w| !w.is_empty())
        .collect();
    let last = words.last().copied().unwrap_or_default();
    if matches!(last, "location" | "file" | "path" | "dir") {
        return false;
    }
    const PARTS: [&str; 7] = [
        "password",
        "passwd",
        "passphrase",
        "secret",
        "token",
        "credential",
        "apikey",
    ];
    PARTS.iter().any(|p| name.contains(p))
        || words
            .iter()
            .any(|w| matches!(*w, "key" | "pwd" | "pass" | "jaas" | "auth"))
        || last == "config"
}

/// The URL as it may be shown: the password of its userinfo
/// (`scheme://user:password@host`, basic auth in a downstream URL) and the
/// value of every query parameter that names a secret (`?password=`,
/// `?sslpassword=`) replaced by `[redacted]`. A value that does not parse as
/// a URL has everything before its last `@` and its whole query hidden, since
/// its parts cannot be told apart.
pub fn redact_url(raw: &str) -> String {
    use url::Position;

    let Ok(url) = url::Url::parse(raw) else {
        return redact_unparsed_url(raw);
    };
    let query = url.query().map(redact_query);
    if url.password().is_none() && query.as_deref() == url.query() {
        return raw.to_string();
    }
    let mut shown = match url.password() {
        Some(_) => format!(
            "{}{REDACTED}{}",
            &url[..Position::BeforePassword],
            &url[Position::AfterPassword..Position::AfterPath]
        ),
        None => url[..Position::AfterPath].to_string(),
    };
    if let Some(q) = query {
        shown.push('?');
        shown.push_str(&q);
    }
    shown.push_str(&url[Position::AfterQuery..]);
    shown
}

/// A query string with the values of its secret-naming parameters redacted;
/// everything else is kept byte for byte.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let raw_key = pair.split_once('=').map_or(pair, |(k, _)| k);
            let key = url::form_urlencoded::parse(raw_key.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            if is_secret_name(&key) {
                format!("{raw_key}={REDACTED}")
            } else {
                pair.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn redact_unparsed_url(raw: &str) -> String {
    let (base, query) = match raw.split_once('?') {
        Some((base, _)) => (base, Some(REDACTED)),
        None => (raw, None),
    };
    let mut shown = match base.rfind('@') {
        Some(at) => {
            let start = base.find("://").map_or(0, |i| i + 3).min(at);
            format!("{}{REDACTED}{}", &base[..start], &base[at..])
        }
        None => base.to_string(),
    };
    if let Some(q) = query {
        shown.push('?');
        shown.push_str(q);
    }
    shown
}

/// Every secret a configuration holds, to hide them in text the daemon does
/// not compose itself — a library's error that quotes the value it refused —
/// before that text is printed: the last line of defence behind redaction.
#[derive(Clone, Default)]
pub struct Scrubber {
    /// Longest first, so that a secret containing another is hidden whole.
    secrets: Vec<Secret>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubber({} secrets)", self.secrets.len())
    }
}

impl Scrubber {
    /// `text` with every secret replaced by `[redacted]`.
    pub fn scrub(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_string(), |text, secret| {
            text.replace(secret.expose(), REDACTED)
        })
    }

    /// Wraps a log writer: every line is scrubbed on its way out, whichever
    /// library logged it (librdkafka, for one, quotes a property value it
    /// cannot parse; the PostgreSQL driver quotes an unknown URL parameter).
    pub fn writer<W: std::io::Write>(
        self,
        make: impl Fn() -> W,
    ) -> impl Fn() -> ScrubbingWriter<W> {
        let scrubber = std::sync::Arc::new(self);
        move || ScrubbingWriter {
            inner: make(),
            scrubber: scrubber.clone(),
        }
    }
}

/// A writer that scrubs what goes through it; see [`Scrubber::writer`].
/// Each write is scrubbed whole: `tracing`'s formatter writes one event in
/// one call, so a secret is never split across two.
pub struct ScrubbingWriter<W> {
    inner: W,
    scrubber: std::sync::Arc<Scrubber>,
}

impl<W: std::io::Write> std::io::Write for ScrubbingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) if !self.scrubber.secrets.is_empty() => {
                self.inner.write_all(self.scrubber.scrub(text).as_bytes())?
            }
            _ => self.inner.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Config {
    pub fn scrubber(&self) -> Scrubber {
        let mut secrets: Vec<String> = Vec::new();
        for (key, inline, file) in [
            (
                "database.password",
                &self.database.password,
                &self.database.password_file,
            ),
            (
                "rabbitmq.password",
                &self.rabbitmq.password,
                &self.rabbitmq.password_file,
            ),
            (
                "kafka.security.password",
                &self.kafka.security.password,
                &self.kafka.security.password_file,
            ),
        ] {
            secrets.extend(inline.iter().map(|s| s.expose().to_string()));
            if let Ok(Some(s)) = resolve_secret(key, &None, file) {
                secrets.push(s.expose().to_string());
            }
        }
        for raw in [
            &self.database.url,
            &self.rabbitmq.url,
            &self.rule_engine.url,
            &self.payment.url,
        ] {
            secrets.extend(url_secrets(raw));
        }
        secrets.extend(
            self.telemetry
                .otlp
                .headers
                .values()
                .map(|v| v.expose().to_string()),
        );
        if let Some(endpoint) = &self.telemetry.otlp.endpoint {
            secrets.extend(url_secrets(endpoint));
        }
        for (key, value) in &self.kafka.properties {
            if !is_secret_name(key) {
                continue;
            }
            secrets.push(value.clone());
            if key.ends_with("config") {
                // `k=v k=v` lists: librdkafka quotes the rest of one from
                // where it stopped parsing ("…beginning at: k=v k=v"), or one
                // `k=v` alone.
                // Only parts that begin with a `k=v`: a bare word could be
                // any word of any line.
                let starts_pair = |part: &str| {
                    part.split_whitespace()
                        .next()
                        .is_some_and(|t| t.contains('=') && t.len() > 2)
                };
                for (at, _) in value.match_indices(char::is_whitespace) {
                    let tail = value[at..].trim_start();
                    if starts_pair(tail) {
                        secrets.push(tail.to_string());
                    }
                }
                secrets.extend(
                    value
                        .split_whitespace()
                        .filter(|t| starts_pair(t))
                        .map(str::to_string),
                );
            }
        }
        // As a JSON log line and a `?`-formatted field would show them.
        let escaped: Vec<String> = secrets
            .iter()
            .flat_map(|s| {
                let json = serde_json::to_string(s).unwrap_or_default();
                let debug = format!("{s:?}");
                [json, debug].map(|q| q.trim_matches('"').to_string())
            })
            .collect();
        secrets.extend(escaped);
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Scrubber {
            secrets: secrets.into_iter().map(Secret::new).collect(),
        }
    }
}

/// The secret parts of a URL, raw and percent-decoded (a library may quote
/// either).
fn url_secrets(raw: &str) -> Vec<String> {
    let Ok(url) = url::Url::parse(raw) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    if let Some(pw) = url.password() {
        found.push(pw.to_string());
        if let Ok(decoded) = percent_decode(pw) {
            found.push(decoded);
        }
    }
    for (k, v) in url.query_pairs() {
        if is_secret_name(&k) {
            found.push(v.into_owned());
        }
    }
    if let Some(q) = url.query() {
        for pair in q.split('&') {
            if let Some((k, v)) = pair.split_once('=') {
                if is_secret_name(k) {
                    found.push(v.to_string());
                }
            }
        }
    }
    found
}

fn percent_decode(s: &str) -> Result<String, std::str::Utf8Error> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|d| d.into_owned())
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

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
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

/// Parses a configured URL and checks what any of them needs: no whitespace
/// or control character (the parser would drop some silently), a scheme
/// from `schemes`, a host unless `host_optional`, and a port in 1..=65535
/// when one is given. The error says what is wrong, for a message that
/// also gives the allowed form and the value, redacted.
fn parse_url(raw: &str, schemes: &[&str], host_optional: bool) -> Result<url::Url, String> {
    if raw.is_empty() {
        return Err("it is empty".into());
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it contains whitespace or a control character".into());
    }
    let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!("scheme {:?} is not allowed", url.scheme()));
    }
    if !host_optional && url.host_str().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    if url.port() == Some(0) {
        return Err("port 0".into());
    }
    Ok(url)
}

/// "must be FORM, got VALUE: WHY", the value redacted.
fn url_error(form: &str, raw: &str, why: impl fmt::Display) -> String {
    format!("must be {form}, got {:?}: {why}", redact_url(raw))
}

/// `rule_engine.url`, `payment.url`: a base URL the request path is
/// appended to.
fn check_downstream_url(raw: &str) -> Result<(), String> {
    const FORM: &str = "an http:// or https:// base URL with a host, \
                        http[s]://HOST[:PORT][/PATH] (port in 1..=65535)";
    let url = parse_url(raw, &["http", "https"], false).map_err(|e| url_error(FORM, raw, e))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(url_error(
            FORM,
            raw,
            "it has a ?query or #fragment, which the request path cannot follow",
        ));
    }
    Ok(())
}

fn check_rabbitmq_url(raw: &str) -> Result<(), String> {
    const FORM: &str = "amqp://HOST[:PORT][/VHOST] or amqps://… (port in 1..=65535)";
    parse_url(raw, &["amqp", "amqps"], false).map_err(|e| url_error(FORM, raw, e))?;
    // What the client itself refuses (e.g. a query parameter it does not
    // know), in its words.
    raw.parse::<lapin::uri::AMQPUri>()
        .map(drop)
        .map_err(|e| url_error(FORM, raw, e))
}

fn check_database_url(raw: &str) -> Result<(), String> {
    use std::str::FromStr as _;
    const FORM: &str = "postgres://[USER@]HOST[:PORT]/DATABASE (or postgresql://; \
                        port in 1..=65535), sqlite:FILE or sqlite://FILE";
    if let Some(rest) = raw.strip_prefix("sqlite:") {
        let file = rest.trim_start_matches("//");
        if file.split('?').next().is_none_or(str::is_empty) {
            return Err(url_error(FORM, raw, "no file"));
        }
        return sqlx::sqlite::SqliteConnectOptions::from_str(raw)
            .map(drop)
            .map_err(|e| url_error(FORM, raw, e));
    }
    let url =
        parse_url(raw, &["postgres", "postgresql"], true).map_err(|e| url_error(FORM, raw, e))?;
    // No host in the authority is libpq's way to say "the host given in the
    // query" (`postgres:///db?host=/run/postgresql`, a Unix socket).
    if url.host_str().is_none_or(str::is_empty) && !url.query_pairs().any(|(k, _)| k == "host") {
        return Err(url_error(
            FORM,
            raw,
            "no host (give one, or ?host=/socket/directory)",
        ));
    }
    // The PostgreSQL driver ignores a parameter it does not know with a
    // warning that quotes its value — a secret, for `?sslpassword=` — and
    // the setting silently does nothing: refused here instead.
    const PARAMS: [&str; 18] = [
        "sslmode",
        "ssl-mode",
        "sslrootcert",
        "ssl-root-cert",
        "ssl-ca",
        "sslcert",
        "ssl-cert",
        "sslkey",
        "ssl-key",
        "statement-cache-capacity",
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "application_name",
        "options",
    ];
    if let Some((key, _)) = url.query_pairs().find(|(k, _)| {
        !(PARAMS.contains(&k.as_ref()) || k.starts_with("options[") && k.ends_with(']'))
    }) {
        return Err(url_error(
            FORM,
            raw,
            format!(
                "unknown query parameter {key:?} (known: {}, options[NAME])",
                PARAMS.join(", ")
            ),
        ));
    }
    sqlx::postgres::PgConnectOptions::from_str(raw)
        .map(drop)
        .map_err(|e| url_error(FORM, raw, e))
}

/// `kafka.brokers`, librdkafka's `bootstrap.servers`.
fn check_kafka_brokers(raw: &str) -> Result<(), String> {
    const FORM: &str = "comma-separated HOST[:PORT] entries (port in 1..=65535), \
                        each optionally PROTOCOL://HOST[:PORT]";
    let bad = |why: String| format!("must be {FORM}, got {raw:?}: {why}");
    if raw.trim().is_empty() {
        return Err(bad("it is empty".into()));
    }
    for entry in raw.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(bad("an empty entry".into()));
        }
        // The protocol prefix is librdkafka's, not a URL scheme (`SASL_SSL`
        // has an underscore): checked here, the rest parsed as a URL's host.
        let address = match entry.split_once("://") {
            Some((protocol, address)) => {
                const PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
                if !PROTOCOLS.contains(&protocol.to_ascii_lowercase().as_str()) {
                    return Err(bad(format!(
                        "entry {entry:?}: protocol {protocol:?} is not one of \
                         PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"
                    )));
                }
                address
            }
            None => entry,
        };
        let url = parse_url(&format!("kafka://{address}"), &["kafka"], false)
            .map_err(|e| bad(format!("entry {entry:?}: {e}")))?;
        if !url.username().is_empty()
            || url.password().is_some()
            || !matches!(url.path(), "" | "/")
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(bad(format!("entry {entry:?}: only HOST[:PORT] is allowed")));
        }
    }
    Ok(())
}

/// `log.level`: what `tracing`'s `EnvFilter` accepts, except that a bare
/// word must be a level: a bare target (`conveyor` for `conveyor=trace`) is
/// far more often a misspelt level, which would leave the daemon silent.
fn check_log_filter(filter: &str) -> Result<(), String> {
    use tracing_subscriber::filter::{Directive, EnvFilter, LevelFilter};
    const FORM: &str = "a tracing filter, comma-separated LEVEL or TARGET=LEVEL directives \
                        (LEVEL: off, error, warn, info, debug, trace)";
    let bad = |why: String| format!("must be {FORM}, got {filter:?}: {why}");
    if filter.trim().is_empty() {
        return Err(bad("it is empty".into()));
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        directive
            .parse::<Directive>()
            .map_err(|e| bad(format!("{directive:?}: {e}")))?;
        if !directive.contains(['=', '[']) && directive.parse::<LevelFilter>().is_err() {
            return Err(bad(format!(
                "{directive:?} is not a level (for a target write {directive}=LEVEL)"
            )));
        }
    }
    EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| bad(e.to_string()))
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
    fn kafka_security_keys_map_to_librdkafka_and_the_password_is_never_shown() {
        let mut c = Config::default();
        c.kafka.security.ca_file = Some("/etc/ca.pem".into());
        c.kafka.security.sasl_mechanism = Some("SCRAM-SHA-512".into());
        c.kafka.security.username = Some("alice".into());
        c.kafka.security.password = Some(Secret::new("hunter2-kafka"));
        c.validate().expect("valid");
        let props = c.kafka.security.librdkafka_properties();
        for want in [
            ("security.protocol", "sasl_ssl"),
            ("ssl.ca.location", "/etc/ca.pem"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "alice"),
            ("sasl.password", "hunter2-kafka"),
        ] {
            assert!(
                props.iter().any(|(k, v)| (*k, v.as_str()) == want),
                "{want:?} in {props:?}"
            );
        }
        let shown = format!("{c:?}\n{}", toml::to_string(&c).expect("toml"));
        assert!(!shown.contains("hunter2-kafka"), "{shown}");
        assert!(c.scrubber().scrub("pw hunter2-kafka").contains(REDACTED));
        c.kafka.security.sasl_mechanism = Some("GSSAPI".into());
        let err = c.validate().expect_err("GSSAPI is not built in");
        assert!(
            err.to_string().contains("kafka.security.sasl_mechanism"),
            "{err}"
        );
    }

    #[test]
    fn quorum_and_tls_keys_are_checked_with_their_names() {
        let mut c = Config::default();
        c.rabbitmq.queue_type = QueueType::Quorum;
        c.rabbitmq.delivery_limit = 3;
        c.source.max_deliveries = 5;
        let err = c
            .validate()
            .expect_err("the broker would act first")
            .to_string();
        assert!(err.contains("rabbitmq.delivery_limit"), "{err}");
        c.rabbitmq.delivery_limit = 5;
        c.validate().expect("a limit at max_deliveries is fine");

        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").expect("write");
        c.rabbitmq.tls.ca_file = Some(ca.clone());
        let err = c.validate().expect_err("TLS keys need amqps").to_string();
        assert!(
            err.contains("rabbitmq.tls.ca_file") && err.contains("amqps"),
            "{err}"
        );
        c.rabbitmq.url = "amqps://broker.example:5671/%2f".into();
        c.validate().expect("amqps with a CA file");
        c.rabbitmq.tls.cert_file = Some(ca);
        let err = c
            .validate()
            .expect_err("a certificate needs its key")
            .to_string();
        assert!(err.contains("rabbitmq.tls.key_file"), "{err}");
        c.rabbitmq.tls.key_file = Some(dir.path().join("missing.key"));
        let err = c.validate().expect_err("an unreadable key").to_string();
        assert!(err.contains("rabbitmq.tls.key_file: cannot read"), "{err}");

        c.source.max_deliveries = 1001;
        let err = c.validate().expect_err("out of range").to_string();
        assert!(err.contains("source.max_deliveries"), "{err}");
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
                "database.url: must be postgres://[USER@]HOST[:PORT]/DATABASE (or postgresql://; \
                 port in 1..=65535), sqlite:FILE or sqlite://FILE, \
                 got \"mysql://db/conveyor\": scheme \"mysql\" is not allowed"
            ),
            "{err}"
        );
    }

    /// The first problem reported for `key` when `var` is set to `value`.
    fn rejection(var: &str, value: &str) -> String {
        match Config::load_with_env(None, Some(env(&[(var, value)]))) {
            Ok(_) => panic!("{var}={value:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn urls_that_cannot_work_are_refused_naming_the_key() {
        for (var, value, want) in [
            (
                "CONVEYOR__PAYMENT__URL",
                "http://",
                "payment.url: must be an http:// or https:// base URL with a host, \
                 http[s]://HOST[:PORT][/PATH] (port in 1..=65535), got \"http://\": empty host",
            ),
            (
                "CONVEYOR__PAYMENT__URL",
                "http://sim:99999",
                "payment.url: ",
            ),
            ("CONVEYOR__PAYMENT__URL", "http://sim:0", "port 0"),
            (
                "CONVEYOR__PAYMENT__URL",
                "http://pay ments:80",
                "whitespace",
            ),
            ("CONVEYOR__PAYMENT__URL", "ftp://sim", "scheme \"ftp\""),
            ("CONVEYOR__PAYMENT__URL", "sim:8080", "payment.url: "),
            ("CONVEYOR__PAYMENT__URL", "http://sim/?a=1", "?query"),
            (
                "CONVEYOR__RULE_ENGINE__URL",
                "https://:443",
                "rule_engine.url: ",
            ),
            ("CONVEYOR__RULE_ENGINE__URL", "", "rule_engine.url: "),
            ("CONVEYOR__RULE_ENGINE__URL", "http://a\tb", "whitespace"),
            ("CONVEYOR__RABBITMQ__URL", "amqp://", "rabbitmq.url: "),
            (
                "CONVEYOR__RABBITMQ__URL",
                "amqp://rabbit:65536/%2f",
                "rabbitmq.url: ",
            ),
            (
                "CONVEYOR__RABBITMQ__URL",
                "amqp://rab bit/%2f",
                "rabbitmq.url: ",
            ),
            (
                "CONVEYOR__RABBITMQ__URL",
                "http://rabbit/",
                "rabbitmq.url: ",
            ),
            ("CONVEYOR__DATABASE__URL", "postgres://", "database.url: "),
            ("CONVEYOR__DATABASE__URL", "postgres:///db", "no host"),
            (
                "CONVEYOR__DATABASE__URL",
                "postgres://db:70000/x",
                "database.url: ",
            ),
            (
                "CONVEYOR__DATABASE__URL",
                "postgres://d b/x",
                "database.url: ",
            ),
            (
                "CONVEYOR__DATABASE__URL",
                "postgres://db/x?sslmode=sure",
                "database.url: ",
            ),
            (
                "CONVEYOR__DATABASE__URL",
                "postgres://db/x?sslpassword=pw",
                "unknown query parameter \"sslpassword\"",
            ),
            ("CONVEYOR__DATABASE__URL", "sqlite:", "no file"),
            ("CONVEYOR__DATABASE__URL", "sqlite://", "no file"),
            ("CONVEYOR__KAFKA__BROKERS", "", "kafka.brokers: "),
            ("CONVEYOR__KAFKA__BROKERS", "k1:9092,", "an empty entry"),
            (
                "CONVEYOR__KAFKA__BROKERS",
                "k1:9092,k2:99999",
                "entry \"k2:99999\"",
            ),
            ("CONVEYOR__KAFKA__BROKERS", "k 1:9092", "kafka.brokers: "),
            ("CONVEYOR__KAFKA__BROKERS", "k1:0", "port 0"),
            (
                "CONVEYOR__KAFKA__BROKERS",
                "http://k1:9092",
                "protocol \"http\"",
            ),
            ("CONVEYOR__KAFKA__BROKERS", "k1:9092/x", "only HOST[:PORT]"),
        ] {
            let text = rejection(var, value);
            assert!(
                text.contains(want),
                "{var}={value:?}: want {want:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn urls_that_work_still_pass() {
        for (var, value) in [
            ("CONVEYOR__PAYMENT__URL", "http://127.0.0.1:8080"),
            ("CONVEYOR__PAYMENT__URL", "https://pay.example.com/api/v2/"),
            ("CONVEYOR__PAYMENT__URL", "https://user:pw@pay.example.com"),
            ("CONVEYOR__RULE_ENGINE__URL", "http://[::1]:65535"),
            (
                "CONVEYOR__RABBITMQ__URL",
                "amqps://rabbit.example.com/orders",
            ),
            (
                "CONVEYOR__RABBITMQ__URL",
                "amqp://[::1]:5672/%2f?heartbeat=10",
            ),
            (
                "CONVEYOR__DATABASE__URL",
                "postgres://app@db.example.com:5432/orders?sslmode=verify-full",
            ),
            (
                "CONVEYOR__DATABASE__URL",
                "postgres:///orders?host=/run/postgresql",
            ),
            ("CONVEYOR__DATABASE__URL", "sqlite::memory:"),
            (
                "CONVEYOR__KAFKA__BROKERS",
                "k1:9092, k2:9093,SASL_SSL://k3:9094",
            ),
            ("CONVEYOR__KAFKA__BROKERS", "kafka.example.com"),
        ] {
            let got = Config::load_with_env(None, Some(env(&[(var, value)])));
            assert!(
                got.is_ok(),
                "{var}={value:?}: {}",
                got.err().map_or(String::new(), |e| e.to_string())
            );
        }
    }

    #[test]
    fn url_errors_never_show_the_password() {
        for (var, value) in [
            ("CONVEYOR__PAYMENT__URL", "http://u:Pw-Sec1@pay ments"),
            ("CONVEYOR__DATABASE__URL", "postgres://u:Pw-Sec1@db:99999/x"),
            (
                "CONVEYOR__DATABASE__URL",
                "postgres://u@db:99999/x?password=Pw-Sec1",
            ),
            (
                "CONVEYOR__DATABASE__URL",
                "postgres://u@db/x?password=Pw-Sec1&sslmode=sure",
            ),
            ("CONVEYOR__RABBITMQ__URL", "amqp://u:Pw-Sec1@"),
        ] {
            let text = rejection(var, value);
            assert!(!text.contains("Pw-Sec1"), "{var}: {text}");
            assert!(text.contains(REDACTED), "{var}: {text}");
        }
    }

    #[test]
    fn durations_that_cannot_work_are_refused_naming_the_key() {
        for (var, key) in [
            (
                "CONVEYOR__PAYMENT__RETRY__MAX_ELAPSED",
                "payment.retry.max_elapsed",
            ),
            (
                "CONVEYOR__RULE_ENGINE__RETRY__MAX_ELAPSED",
                "rule_engine.retry.max_elapsed",
            ),
            (
                "CONVEYOR__DATABASE__ACQUIRE_TIMEOUT",
                "database.acquire_timeout",
            ),
            (
                "CONVEYOR__PAYMENT__BREAKER__NOT_READY_AFTER",
                "payment.breaker.not_ready_after",
            ),
            (
                "CONVEYOR__RULE_ENGINE__BREAKER__NOT_READY_AFTER",
                "rule_engine.breaker.not_ready_after",
            ),
            ("CONVEYOR__PAYMENT__TIMEOUT", "payment.timeout"),
            (
                "CONVEYOR__PAYMENT__RETRY__INITIAL_INTERVAL",
                "payment.retry.initial_interval",
            ),
            ("CONVEYOR__KAFKA__COMMIT_INTERVAL", "kafka.commit_interval"),
            ("CONVEYOR__KAFKA__REVOKE_TIMEOUT", "kafka.revoke_timeout"),
            ("CONVEYOR__KAFKA__LAG_INTERVAL", "kafka.lag_interval"),
            ("CONVEYOR__BATCH__MAX_WAIT", "batch.max_wait"),
            (
                "CONVEYOR__BATCH__RETRY_INITIAL_INTERVAL",
                "batch.retry_initial_interval",
            ),
            (
                "CONVEYOR__SHUTDOWN__DRAIN_TIMEOUT",
                "shutdown.drain_timeout",
            ),
        ] {
            let text = rejection(var, "0s");
            assert!(
                text.contains(&format!("{key}: must be in 1ms..=")),
                "{var}: {text}"
            );
            assert!(text.contains("got 0s"), "{var}: {text}");
            // Far beyond any bound: a deadline computed from it would overflow.
            let text = rejection(var, "100000years");
            assert!(
                text.contains(&format!("{key}: must be in 1ms..=")),
                "{var}: {text}"
            );
        }
        let text = rejection("CONVEYOR__PAYMENT__RETRY__MAX_ELAPSED", "0s");
        assert!(
            text.contains("payment.retry.max_elapsed: must be in 1ms..=1day, got 0s"),
            "{text}"
        );
        let ok = Config::load_with_env(
            None,
            Some(env(&[
                ("CONVEYOR__PAYMENT__RETRY__MAX_ELAPSED", "1ms"),
                ("CONVEYOR__DATABASE__ACQUIRE_TIMEOUT", "1h"),
                ("CONVEYOR__PAYMENT__BREAKER__NOT_READY_AFTER", "24h"),
            ])),
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn log_level_must_be_a_filter() {
        for bad in ["garbage", "", "conveyor=loud", "info,lapin=nope", "inf"] {
            let text = rejection("CONVEYOR__LOG__LEVEL", bad);
            assert!(
                text.contains(
                    "log.level: must be a tracing filter, comma-separated LEVEL or \
                     TARGET=LEVEL directives (LEVEL: off, error, warn, info, debug, trace)"
                ),
                "{bad:?}: {text}"
            );
        }
        for good in [
            "info",
            "WARN",
            "warn,conveyor=debug,lapin=off",
            "conveyor::source=trace",
            "off",
        ] {
            let got = Config::load_with_env(None, Some(env(&[("CONVEYOR__LOG__LEVEL", good)])));
            assert!(got.is_ok(), "{good:?}: {:?}", got.err());
        }
    }

    #[test]
    fn secret_names() {
        for secret in [
            "sasl.password",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.client.secret",
            "sasl.jaas.config",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "ssl_key",
            "sasl.oauthbearer.assertion.private.key.pem",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "password",
            "sslpassword",
            "api_key",
            "access_token",
        ] {
            assert!(is_secret_name(secret), "{secret}");
        }
        for plain in [
            "security.protocol",
            "sasl.mechanism",
            "sasl.username",
            "ssl.key.location",
            "ssl.keystore.location",
            "ssl.ca.location",
            "ssl.certificate.pem",
            "ssl.ca.pem",
            "session.timeout.ms",
            "sslmode",
            "sslrootcert",
            "host",
        ] {
            assert!(!is_secret_name(plain), "{plain}");
        }
    }

    #[test]
    fn urls_are_redacted_wherever_their_secrets_sit() {
        for (raw, shown) in [
            (
                "postgres://app:pw@db:5432/orders",
                "postgres://app:[redacted]@db:5432/orders",
            ),
            (
                "postgres://app@db/orders?sslmode=require&password=pw",
                "postgres://app@db/orders?sslmode=require&password=[redacted]",
            ),
            (
                "postgres://app:pw@db/orders?sslpassword=pw#x",
                "postgres://app:[redacted]@db/orders?sslpassword=[redacted]#x",
            ),
            (
                "amqp://guest:pw@rabbit/%2f",
                "amqp://guest:[redacted]@rabbit/%2f",
            ),
            (
                "https://u:p%40w@pay.example.com/",
                "https://u:[redacted]@pay.example.com/",
            ),
            ("http://u@pay.example.com", "http://u@pay.example.com"),
            ("sqlite:data/x.db?mode=rwc", "sqlite:data/x.db?mode=rwc"),
            // Not URLs: whatever might be credentials, and the query, hidden.
            (
                "postgres://app:pw@db:99999/x",
                "postgres://[redacted]@db:99999/x",
            ),
            (
                "http://u:pw@x:99999?password=pw",
                "http://[redacted]@x:99999?[redacted]",
            ),
            ("http://a b:pw@x", "http://a%20b:[redacted]@x/"),
        ] {
            assert_eq!(redact_url(raw), shown, "{raw}");
        }
    }

    #[test]
    fn debug_and_toml_redact_every_secret() {
        let mut cfg = Config::default();
        let secret = "Sec-7f3a";
        cfg.database.url = format!("postgres://app:{secret}@db/x?password={secret}");
        cfg.database.password = Some(Secret::new(secret));
        cfg.rabbitmq.url = format!("amqp://guest:{secret}@rabbit/%2f");
        cfg.rabbitmq.password = Some(Secret::new(secret));
        cfg.payment.url = format!("https://u:{secret}@pay.example.com");
        cfg.rule_engine.url = format!("https://u:{secret}@rules.example.com");
        for key in ["sasl.password", "sasl.oauthbearer.config", "ssl.key.pem"] {
            cfg.kafka
                .properties
                .insert(key.into(), format!("x={secret} y"));
        }
        let shown = format!("{cfg:?}\n{cfg:#?}\n{}", cfg.to_redacted_toml());
        assert!(!shown.contains(secret), "{shown}");
        assert!(
            shown.contains("https://u:[redacted]@pay.example.com"),
            "{shown}"
        );
        let scrubbed = cfg
            .scrubber()
            .scrub(&format!("refused {secret:?} for ssl.key.pem"));
        assert_eq!(scrubbed, "refused \"[redacted]\" for ssl.key.pem");
        // Escaped as JSON and Debug show it.
        cfg.kafka
            .properties
            .insert("sasl.oauthbearer.config".into(), "a=\"q\\".into());
        let scrubber = cfg.scrubber();
        assert_eq!(
            scrubber.scrub(r#"{"e":"x a=\"q\\ y"}"#),
            r#"{"e":"x [redacted] y"}"#
        );
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Shared {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lock").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Shared::default();
        let sink = out.clone();
        let make = scrubber.writer(move || sink.clone());
        std::io::Write::write_all(&mut make(), format!("oops {secret}\n").as_bytes())
            .expect("write");
        let written = out.0.lock().expect("lock").clone();
        assert_eq!(String::from_utf8_lossy(&written), "oops [redacted]\n");
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

    #[test]
    fn otlp_headers_are_secrets_and_bad_values_name_their_key() {
        let cfg = Config::load_with_env(
            None,
            Some(env(&[
                (
                    "CONVEYOR__TELEMETRY__OTLP__ENDPOINT",
                    "http://collector:4318",
                ),
                ("CONVEYOR__TELEMETRY__OTLP__SAMPLE_RATIO", "0.25"),
                (
                    "CONVEYOR__TELEMETRY__OTLP__HEADERS__X-API-KEY",
                    "hunter2-otlp",
                ),
            ])),
        )
        .expect("valid");
        let otlp = &cfg.telemetry.otlp;
        assert_eq!(otlp.endpoint.as_deref(), Some("http://collector:4318"));
        assert_eq!(otlp.sample_ratio, Some(0.25));
        assert_eq!(
            otlp.headers.get("x-api-key").map(Secret::expose),
            Some("hunter2-otlp")
        );
        let shown = cfg.to_redacted_toml();
        assert!(!shown.contains("hunter2-otlp"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        assert_eq!(cfg.scrubber().scrub("key hunter2-otlp"), "key [redacted]");

        let mut bad = Config::default();
        bad.telemetry.otlp.endpoint = Some("collector:4318".into());
        bad.telemetry.otlp.protocol = "grpc".into();
        bad.telemetry.otlp.sample_ratio = Some(1.5);
        bad.telemetry.otlp.batch_size = bad.telemetry.otlp.queue_size + 1;
        let Err(ConfigError::Invalid(errors)) = bad.validate() else {
            panic!("invalid OTLP settings accepted");
        };
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for key in [
            "telemetry.otlp.endpoint",
            "telemetry.otlp.protocol",
            "telemetry.otlp.sample_ratio",
            "telemetry.otlp.batch_size",
        ] {
            assert!(keys.contains(&key), "{key} not in {keys:?}");
        }
    }
}
