//! The dead-letter topic: a producer with `acks=all` and idempotence, and
//! one produce per dead letter (original key and payload, `x-conveyor-*`
//! headers), retried with jitter before the offset is left uncommitted.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;
use crate::downstream::retry::FullJitter;
use crate::source::{DeadLetter, Position};
use crate::source::{DEAD_LETTER_ATTEMPTS, DEAD_LETTER_RETRY_INITIAL, DEAD_LETTER_RETRY_MAX};

/// A producer that waits for every in-sync replica (`acks=all`) and never
/// duplicates on retry, with the configured properties a producer takes
/// (TLS, SASL, timeouts…). Used for dead letters and by `conveyor produce`.
pub(crate) fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true");
    for (k, v) in cfg.security.librdkafka_properties() {
        c.set(k, v);
    }
    for (k, v) in &cfg.properties {
        if !is_consumer_only(k) {
            c.set(k, v);
        }
    }
    c
}

/// Keys of `kafka.properties` only a consumer takes; a producer given them
/// logs a warning per key.
fn is_consumer_only(key: &str) -> bool {
    key.starts_with("group.")
        || key.starts_with("session.")
        || key.starts_with("heartbeat.")
        || key.starts_with("partition.assignment")
        || key.starts_with("auto.")
        || key.starts_with("enable.auto")
        || key.starts_with("fetch.")
        || key.starts_with("queued.")
        || key.starts_with("max.poll")
        || key.starts_with("isolation.")
}

pub(super) async fn produce_dead_letter(
    producer: &FutureProducer,
    topic: &str,
    dl: &DeadLetter,
) -> Result<(), String> {
    let (src_topic, partition, offset) = match &dl.position {
        Position::Kafka {
            topic,
            partition,
            offset,
        } => (topic.to_string(), partition.to_string(), offset.to_string()),
        other => (other.to_string(), String::new(), String::new()),
    };
    let failed_at = chrono::Utc::now().to_rfc3339();
    let mut headers = OwnedHeaders::new();
    for (key, value) in [
        ("x-conveyor-reason", dl.reason.as_str()),
        ("x-conveyor-detail", dl.detail.as_str()),
        ("x-conveyor-stage", dl.stage.as_str()),
        ("x-conveyor-topic", src_topic.as_str()),
        ("x-conveyor-partition", partition.as_str()),
        ("x-conveyor-offset", offset.as_str()),
        ("x-conveyor-failed-at", failed_at.as_str()),
        ("x-conveyor-order-id", dl.order_id.as_deref().unwrap_or("")),
    ]
    .into_iter()
    .chain(dl.extra_headers.iter().map(|(k, v)| (*k, v.as_str())))
    {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let mut last = String::new();
    let mut backoff = FullJitter::doubling(DEAD_LETTER_RETRY_INITIAL, DEAD_LETTER_RETRY_MAX);
    for attempt in 0..DEAD_LETTER_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(backoff.next_wait()).await;
        }
        let mut record = FutureRecord::to(topic)
            .payload(dl.body.as_ref())
            .headers(headers.clone());
        if let Some(key) = &dl.key {
            record = record.key(key.as_ref());
        }
        match producer.send(record, Duration::from_secs(10)).await {
            Ok(_) => return Ok(()),
            Err((e, _)) => last = e.to_string(),
        }
    }
    Err(last)
}
