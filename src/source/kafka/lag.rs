//! Consumer lag: `conveyor_kafka_consumer_lag_messages{topic,partition}`,
//! the broker's high watermark minus the group's committed offset, for
//! every partition this member owns, refreshed every `kafka.lag_interval`.

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::KafkaSource;

/// Lag per owned partition: high watermark − committed offset, read from
/// the broker on a blocking thread.
pub(super) fn refresh_lag(src: &KafkaSource) -> tokio::task::JoinHandle<()> {
    let consumer = src.consumer.clone();
    let owned = match src.tracker.lock() {
        Ok(t) => t.owned(),
        Err(_) => Vec::new(),
    };
    let gauge = src.metrics.kafka_lag.clone();
    tokio::task::spawn_blocking(move || {
        if owned.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in &owned {
            tpl.add_partition(topic, *partition);
        }
        let committed = match consumer.committed_offsets(tpl, Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read committed offsets");
                return;
            }
        };
        for e in committed.elements() {
            let Ok((low, high)) =
                consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(5))
            else {
                continue;
            };
            let lag = match e.offset() {
                Offset::Offset(c) => high - c,
                _ => high - low,
            };
            gauge
                .with_label_values(&[e.topic(), &e.partition().to_string()])
                .set(lag.max(0));
        }
    })
}
