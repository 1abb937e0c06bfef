//! Kafka from the test's side: producing a load with `acks=all`, the
//! configuration file child daemons need on the mock cluster, and the
//! group's committed positions against the log end (librdkafka's blocking
//! calls, run on the blocking pool).

use std::time::Duration;

use super::env::Env;

/// Produces `(key, body)` messages to a Kafka topic with `acks=all`,
/// keeping up to 500 unconfirmed.
pub async fn kafka_produce(
    brokers: &str,
    topic: &str,
    messages: impl IntoIterator<Item = (String, Vec<u8>)>,
) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut pending = Vec::new();
    for (key, body) in messages {
        let p = producer.clone();
        let topic = topic.to_string();
        pending.push(async move {
            p.send(
                FutureRecord::to(&topic).key(&key).payload(&body),
                Duration::from_secs(30),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
        });
        if pending.len() >= 500 {
            futures::future::try_join_all(std::mem::take(&mut pending))
                .await
                .expect("produce");
        }
    }
    futures::future::try_join_all(pending)
        .await
        .expect("produce");
}

/// A configuration file for child daemons on the mock cluster: a short
/// session timeout, since the mock holds every rebalance for about
/// `session.timeout.ms` and a killed member keeps its partitions that long.
/// Returns its path, for `CONVEYOR_CONFIG`.
pub fn kafka_daemon_config_file(env: &Env) -> String {
    let file = std::env::temp_dir().join(format!("{}-kafka.toml", env.name));
    std::fs::write(
        &file,
        "[kafka.properties]\n\"session.timeout.ms\" = \"3000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
    )
    .expect("write the daemon's configuration file");
    file.display().to_string()
}

/// (committed offset, log end) of partitions `0..partitions` of a topic for
/// a group, read from the broker; -1 where nothing is committed. Empty when
/// the broker cannot be asked.
pub async fn kafka_committed_and_end(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Vec<(i64, i64)> {
    let (brokers, group, topic) = (brokers.to_string(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || committed_and_end(&brokers, &group, &topic, partitions))
        .await
        .expect("reading committed offsets panicked")
}

fn committed_and_end(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<(i64, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let Ok(consumer) = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create::<BaseConsumer>()
    else {
        return Vec::new();
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let t = Duration::from_secs(5);
    let Ok(committed) = consumer.committed_offsets(tpl, t) else {
        return Vec::new();
    };
    committed
        .elements()
        .iter()
        .filter_map(|e| {
            let (_, high) = consumer.fetch_watermarks(topic, e.partition(), t).ok()?;
            let c = match e.offset() {
                rdkafka::Offset::Offset(c) => c,
                _ => -1,
            };
            Some((c, high))
        })
        .collect()
}
