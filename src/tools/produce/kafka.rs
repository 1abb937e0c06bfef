//! Producing to Kafka with `acks=all` and idempotence.

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaRespErr;

use super::pace::{InFlight, Pace};
use crate::config::KafkaConfig;
use crate::source::kafka::producer_config;

/// Produces `(key, value)` records to `topic` with `acks=all` and
/// idempotence, keeping up to `window` undelivered. `on_progress` is called
/// with the count delivered so far. Fails on the first failed delivery.
///
/// The producer takes `kafka.properties` (TLS, SASL, timeouts…) except the
/// consumer-only keys, as the source's dead-letter producer does; a property
/// given there wins over `acks` and `enable.idempotence`.
pub async fn publish_kafka<I>(
    cfg: &KafkaConfig,
    topic: &str,
    records: I,
    window: usize,
    rate_per_sec: Option<f64>,
    mut on_progress: impl FnMut(u64),
) -> anyhow::Result<u64>
where
    I: IntoIterator<Item = (String, Vec<u8>)>,
{
    let mut pace = Pace::new(rate_per_sec)?;
    let producer: FutureProducer = producer_config(cfg)
        .create()
        .context("creating the Kafka producer")?;
    check_topic(&producer, &cfg.brokers, topic).await?;
    let mut in_flight = InFlight::new(window);
    pace.start();
    let mut sent = 0u64;
    for (key, body) in records {
        if let Some(due) = pace.due(sent)? {
            in_flight.sleep_until(due, &mut on_progress).await?;
        }
        in_flight.make_room(&mut on_progress).await?;
        let traceparent = crate::telemetry::traces::new_traceparent();
        let mut record =
            FutureRecord::to(topic)
                .key(&key)
                .payload(&body)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "traceparent",
                    value: Some(traceparent.as_bytes()),
                }));
        let delivery = loop {
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                // librdkafka's own queue is full (`queue.buffering.max.*`
                // below the window): wait for deliveries to make room.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    if in_flight.is_empty() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } else {
                        in_flight.settle_one(&mut on_progress).await?;
                    }
                }
                Err((e, _)) => {
                    return Err(e).with_context(|| format!("producing order {key} to {topic}"))
                }
            }
        };
        in_flight.push(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(anyhow::anyhow!(
                    "delivering order {key} to Kafka topic {topic} failed: {e}"
                )),
                Err(_) => Err(anyhow::anyhow!(
                    "the producer went away before order {key} was delivered"
                )),
            }
        });
        sent += 1;
    }
    in_flight.drain(&mut on_progress).await?;
    Ok(sent)
}

/// Fails fast, with the brokers named, when Kafka cannot be reached or the
/// topic does not exist: otherwise each message would wait out
/// `message.timeout.ms` (five minutes by default) before failing.
async fn check_topic(producer: &FutureProducer, brokers: &str, topic: &str) -> anyhow::Result<()> {
    let p = producer.clone();
    let t = topic.to_string();
    let topic_error = tokio::task::spawn_blocking(move || {
        p.client()
            .fetch_metadata(Some(&t), Duration::from_secs(10))
            .map(|m| m.topics().first().and_then(|t| t.error()))
    })
    .await
    .context("the metadata request task failed")?
    .with_context(|| format!("reaching Kafka at {brokers}"))?;
    // Other errors (e.g. no leader yet, while a broker auto-creates the
    // topic) are librdkafka's to retry.
    if topic_error == Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) {
        anyhow::bail!("Kafka topic {topic:?} does not exist at {brokers}");
    }
    Ok(())
}
