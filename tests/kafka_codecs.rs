//! Every Kafka compression codec, both ways: topics written by an
//! independent client (confluent-kafka, its own librdkafka) with gzip,
//! snappy, lz4 and zstd are consumed to the log end; what conveyor produces
//! with each codec (`conveyor produce --compression`) reads back in that
//! client. A source topic that does not exist keeps the daemon not ready,
//! saying why. On both brokers (`NAME::mock`, `NAME::tansu`).

mod common;

use std::time::Duration;

use common::{metric, wait_for, Backend, Env, InProcess, KafkaBroker};
use conveyor::config::{Config, SourceKind};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::Knobs;

const CODECS: [&str; 4] = ["gzip", "snappy", "lz4", "zstd"];
const PER_CODEC: u64 = 200;
const PARTITIONS: i32 = 2;

fn kafka_config(env: &Env, brokers: &str, topics: Vec<String>) -> Config {
    let mut c = env.config();
    c.source.kind = SourceKind::Kafka;
    c.kafka.brokers = brokers.to_string();
    c.kafka.group_id = format!("{}-group", env.name);
    c.kafka.topics = topics;
    c.kafka.commit_interval = Duration::from_millis(200);
    c.kafka.lag_interval = Duration::from_millis(200);
    c.kafka
        .properties
        .insert("session.timeout.ms".into(), "6000".into());
    c
}

on_both_brokers! {
    async fn topics_written_with_every_codec_are_consumed_to_the_log_end(backend: Backend) {
        let env = Env::new("kcodec", Knobs::default()).await;
        let broker = KafkaBroker::start(backend).await;
        let brokers = broker.bootstrap_servers();
        let gen = OrderGen::new(env.name.clone(), Mix::default());
        let mut topics = Vec::new();
        for (c, codec) in CODECS.iter().enumerate() {
            let topic = format!("{}-{codec}", env.name);
            broker.create_topic(&topic, PARTITIONS).await;
            let range = c as u64 * PER_CODEC..(c as u64 + 1) * PER_CODEC;
            broker
                .independent_write(
                    &topic,
                    codec,
                    range.map(|i| {
                        let body = gen.message(i).1;
                        (gen.order_id(i), String::from_utf8(body).expect("utf-8 order"))
                    }),
                )
                .await;
            topics.push(topic);
        }
        let n = PER_CODEC * CODECS.len() as u64;
        let member = InProcess::start(kafka_config(&env, &brokers, topics.clone())).await;
        wait_for("every codec's orders acked", Duration::from_secs(120), || async {
            metric(member.addr, "conveyor_messages_acked_total")
                .await
                .unwrap_or(0.0)
                >= n as f64
        })
        .await;
        let group = format!("{}-group", env.name);
        for topic in &topics {
            wait_for(&format!("{topic} committed to its end"), Duration::from_secs(30), || async {
                let offsets = broker.committed_and_end(&group, topic, PARTITIONS).await;
                offsets.len() == PARTITIONS as usize && offsets.iter().all(|(c, e)| c == e)
            })
            .await;
        }
        let report = member.stop().await;
        assert_eq!(report.received, n, "{report:?}");
        let poison = (0..n)
            .filter(|i| gen.intent(*i) == conveyor::tools::produce::Intent::Poison)
            .count() as i64;
        assert_eq!(env.rows().await, n as i64 - poison);
        env.check_ledger().await;
        env.cleanup().await;
    }
}

on_both_brokers! {
    async fn produce_compresses_with_every_codec_and_an_independent_client_reads_it(backend: Backend) {
        let broker = KafkaBroker::start(backend).await;
        let brokers = broker.bootstrap_servers();
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        for codec in CODECS {
            let topic = format!("produce-{run}-{codec}");
            broker.create_topic(&topic, PARTITIONS).await;
            let out = tokio::process::Command::new(common::binary())
                .args(["produce", "--to", "kafka", "--topic", &topic, "--orders", "100"])
                .args(["--compression", codec, "--run-id", &format!("{run}{codec}"), "--quiet"])
                .env_remove("RUST_LOG")
                .env("CONVEYOR__KAFKA__BROKERS", &brokers)
                .output()
                .await
                .expect("run conveyor produce");
            assert!(
                out.status.success(),
                "produce --compression {codec}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let got = common::kafka::independent_read(&brokers, &[], &topic, 100, Duration::from_secs(60)).await;
            assert_eq!(got.len(), 100, "{codec}");
            let prefix = format!("{run}{codec}-");
            assert!(
                got.iter().all(|r| r.key.starts_with(&prefix)),
                "{codec}: every record keyed by an order id of this run: {:?}",
                got.iter().map(|r| &r.key).take(5).collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn produce_refuses_an_unknown_codec_and_compression_for_rabbitmq() {
    let out = std::process::Command::new(common::binary())
        .args(["produce", "--to", "kafka", "--compression", "brotli"])
        .output()
        .expect("run conveyor produce");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("brotli") && err.contains("zstd"), "{err}");
    let out = std::process::Command::new(common::binary())
        .args(["produce", "--to", "rabbitmq", "--compression", "gzip"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run conveyor produce");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--compression is for Kafka"), "{err}");
}

on_both_brokers! {
    /// A source topic that does not exist: never reported ready while
    /// consuming nothing. `/readyz` answers 503 naming the topic,
    /// `conveyor_kafka_topic_unavailable{topic}` is 1; once the topic is
    /// created the daemon becomes ready and consumes it.
    async fn a_missing_source_topic_keeps_the_daemon_not_ready_and_says_why(backend: Backend) {
        let env = Env::new("knotopic", Knobs::default()).await;
        let broker = KafkaBroker::start(backend).await;
        let brokers = broker.bootstrap_servers();
        let topic = format!("{}-nope", env.name);
        let member = InProcess::start(kafka_config(&env, &brokers, vec![topic.clone()])).await;
        let readyz = || async {
            let r = reqwest::get(format!("http://{}/readyz", member.addr))
                .await
                .expect("readyz");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        };
        let gauge = format!("conveyor_kafka_topic_unavailable{{topic=\"{topic}\"}}");
        wait_for("the missing topic reported", Duration::from_secs(30), || async {
            metric(member.addr, &gauge).await == Some(1.0)
        })
        .await;
        let (status, body) = readyz().await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains(&format!("{topic:?}")) && body.contains("cannot be consumed"), "{body}");
        broker.create_topic(&topic, PARTITIONS).await;
        wait_for("ready once the topic exists", Duration::from_secs(60), || async {
            readyz().await.0 == 200
        })
        .await;
        assert_eq!(metric(member.addr, &gauge).await, Some(0.0));
        let gen = OrderGen::new(env.name.clone(), Mix { poison_pct: 0.0, ..Mix::default() });
        broker
            .produce(&topic, (0..50).map(|i| (gen.order_id(i), gen.message(i).1)))
            .await;
        wait_for("the orders stored", Duration::from_secs(120), || async {
            env.rows().await == 50
        })
        .await;
        member.stop().await;
        env.cleanup().await;
    }
}
