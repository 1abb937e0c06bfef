//! Consumer lag: `conveyor_kafka_consumer_lag_messages{topic,partition}`,
//! the broker's high watermark minus the group's committed offset, for
//! every partition this member owns, refreshed every `kafka.lag_interval`.
//! The same refresh asks the metadata of every configured topic and hands
//! both to [`Consumable`](super::consumable::Consumable), and gives the
//! committed offsets read back to the offset tracker, which sends again a
//! commit the group does not hold.

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use std::sync::Arc;

use rdkafka::types::RDKafkaErrorCode;

use super::consumable::{Consumable, PartitionSeen};
use super::offsets::TopicPartition;
use super::{KafkaConsumer, KafkaSource};
use crate::telemetry::Destination;

/// Lag per owned partition: high watermark − committed offset, read from
/// the broker on a blocking thread.
pub(super) fn refresh_lag(src: &KafkaSource) -> tokio::task::JoinHandle<()> {
    let consumer = src.consumer.clone();
    let owned: Vec<(TopicPartition, usize)> = match src.tracker.lock() {
        Ok(t) => t
            .owned()
            .into_iter()
            .map(|tp| {
                let n = t.outstanding(&tp);
                (tp, n)
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    let gauge = src.metrics.kafka_lag.clone();
    let metrics = src.metrics.clone();
    let consumable = src.consumable.clone();
    let topics = src.cfg.topics.clone();
    let tracker = src.tracker.clone();
    tokio::task::spawn_blocking(move || {
        check_topics(&consumer, &topics, &consumable);
        if owned.is_empty() {
            consumable.partitions(&[]);
            return;
        }
        let outstanding: std::collections::HashMap<(String, i32), usize> = owned
            .iter()
            .map(|((t, p), n)| ((t.to_string(), *p), *n))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), _) in &owned {
            tpl.add_partition(topic, *partition);
        }
        let committed = match consumer.committed_offsets(tpl, Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read committed offsets");
                return;
            }
        };
        let held: Vec<(TopicPartition, Option<i64>)> = committed
            .elements()
            .iter()
            .filter(|e| e.error().is_ok())
            .filter_map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(c) => Some(c),
                    Offset::Invalid => None,
                    _ => return None,
                };
                Some(((Arc::from(e.topic()), e.partition()), offset))
            })
            .collect();
        if let Ok(mut t) = tracker.lock() {
            t.group_committed(&held);
        }
        let mut seen = Vec::new();
        for e in committed.elements() {
            let Ok((low, high)) =
                consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(5))
            else {
                continue;
            };
            let position = match e.offset() {
                Offset::Offset(c) => c,
                _ => low,
            };
            gauge
                .with_label_values(&[e.topic(), &e.partition().to_string()])
                .set((high - position).max(0));
            seen.push(PartitionSeen {
                tp: (Arc::from(e.topic()), e.partition()),
                committed: position,
                high,
                outstanding: outstanding
                    .get(&(e.topic().to_string(), e.partition()))
                    .copied()
                    .unwrap_or(0),
            });
        }
        consumable.partitions(&seen);
        let mut backlog: Vec<(&str, u64)> = Vec::new();
        for p in &seen {
            let lag = (p.high - p.committed).max(0) as u64;
            match backlog.iter_mut().find(|(t, _)| *t == &*p.tp.0) {
                Some((_, n)) => *n += lag,
                None => backlog.push((&p.tp.0, lag)),
            }
        }
        for (topic, lag) in backlog {
            metrics
                .drain
                .backlog(&Destination::Topic(topic.to_string()), lag);
        }
    })
}

/// Asks the broker's metadata about each configured topic (without
/// creating it): a missing or unauthorised one cannot be consumed.
fn check_topics(consumer: &KafkaConsumer, topics: &[String], consumable: &Consumable) {
    for topic in topics {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(m) => {
                let problem = m
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map_or(Some("not in the broker's metadata".to_string()), |t| {
                        t.error().map(|e| RDKafkaErrorCode::from(e).to_string())
                    });
                consumable.topic(topic, problem);
            }
            // The broker not answering is the connection's concern, not the topic's.
            Err(e) => {
                tracing::debug!(%topic, error = %e, "cannot read topic metadata");
                return;
            }
        }
    }
    consumable.checked();
}
