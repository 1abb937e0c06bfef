//! Kafka from the tools tests' side: dead letters put on a topic with the
//! daemon's headers (`acks=all`), a topic read back whole, and the
//! environment of a `conveyor` child process on a Kafka source.
//!
//! A topic is read to where a fetch finds its end (partition EOF), not to
//! what ListOffsets says: tansu 0.6 answers that short by up to a batch.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// One record as read back.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// A message to put: key, text headers, body.
pub type KafkaLetter<'a> = (String, Vec<(&'a str, String)>, Vec<u8>);

/// Produces `letters` to `topic` with `acks=all`, up to 500 unconfirmed.
pub async fn kafka_put(brokers: &str, topic: &str, letters: Vec<KafkaLetter<'_>>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut pending = Vec::new();
    for (key, headers, body) in letters {
        let mut h = OwnedHeaders::new();
        for (k, v) in &headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let p = producer.clone();
        let topic = topic.to_string();
        pending.push(async move {
            p.send(
                FutureRecord::to(&topic).key(&key).payload(&body).headers(h),
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

/// Every record of `topic`, from the beginning of each partition to its
/// end as a fetch finds it.
pub async fn kafka_read_all(brokers: &str, topic: &str) -> Vec<Record> {
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || read_all(&brokers, &topic))
        .await
        .expect("reading the topic panicked")
}

fn read_all(brokers: &str, topic: &str) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("read-all-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    assert!(!partitions.is_empty(), "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .expect("assignment");
    }
    consumer.assign(&tpl).expect("assign");
    let mut open: std::collections::HashSet<i32> = partitions.into_iter().collect();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !open.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{topic}: partitions {open:?} not read to their end in 60 s"
        );
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            Some(Ok(m)) => {
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for h in h.iter() {
                        headers.insert(
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    headers,
                    body: m.payload().unwrap_or_default().to_vec(),
                });
            }
        }
    }
    out
}

/// The environment of a `conveyor` child process on a Kafka source:
/// `CONVEYOR_CONFIG` is a file with `kafka.properties` (a short session
/// timeout: the mock cluster holds a rebalance that long).
pub fn kafka_cli_env(
    config_file: &str,
    brokers: &str,
    topic: &str,
    group: &str,
    db_url: &str,
) -> Vec<(String, String)> {
    vec![
        ("CONVEYOR_CONFIG".into(), config_file.into()),
        ("CONVEYOR__SOURCE__KIND".into(), "kafka".into()),
        ("CONVEYOR__KAFKA__BROKERS".into(), brokers.into()),
        ("CONVEYOR__KAFKA__TOPICS".into(), topic.into()),
        ("CONVEYOR__KAFKA__GROUP_ID".into(), group.into()),
        ("CONVEYOR__DATABASE__URL".into(), db_url.into()),
    ]
}
