//! Where orders come from: the broker kind and the RabbitMQ and Kafka
//! sections (their TLS and SASL keys included).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::secret::{
    redact_url, redacted_properties, resolve_secret, serialize_redacted_properties,
    serialize_redacted_url, Secret,
};
use super::KeyError;

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
    /// `[source.prefetch_follow]`: let the number of unacknowledged
    /// messages follow what the stages can work on, between `floor` and
    /// `prefetch` (see `source::prefetch`).
    pub prefetch_follow: PrefetchFollow,
}

/// `[source.prefetch_follow]`: off by default, when `source.prefetch` is
/// what is held whatever the stages can do.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefetchFollow {
    /// Hold at most the stages' current concurrency limits, plus what the
    /// batcher fills during one batch at the current rate, plus a small
    /// slack, instead of `source.prefetch` always. RabbitMQ classic queues:
    /// re-issued at run time as a per-channel `basic.qos`. Quorum queues
    /// (no per-channel `basic.qos`): the consumer's own prefetch, and the
    /// consumer is swapped for one with the new count when the limit has
    /// moved by a quarter, at most once a second (see
    /// `source::rabbitmq::swap`).
    pub enabled: bool,
    /// The least prefetch ever used (1..=`source.prefetch`).
    pub floor: u32,
}

impl Default for PrefetchFollow {
    fn default() -> Self {
        Self {
            enabled: false,
            floor: 16,
        }
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            kind: SourceKind::Rabbitmq,
            prefetch: 512,
            max_message_bytes: 64 * 1024,
            max_deliveries: 5,
            prefetch_follow: PrefetchFollow::default(),
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
