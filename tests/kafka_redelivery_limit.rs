//! Crash-loop containment on Kafka: a message whose charge never answers
//! (the simulator hangs on customers named `hang…`) while the daemon is
//! killed with SIGKILL, again and again, sends its partition back to the
//! committed offset each time. Kafka does not count deliveries, so the
//! store does (keyed by topic/partition/offset, written before any work);
//! past `source.max_deliveries` the message is dead-lettered as
//! `redelivery_limit` and the partition moves on. The orders after it,
//! finished by an earlier run and seen again after each crash, are not
//! dead-lettered with it, nor are the orders that were in flight beside it
//! at every kill (charged, waiting for their batch): a last chance is
//! worked on alone. On the mock cluster and on tansu.

mod common;

use std::time::{Duration, Instant};

use common::crash::{charge_requests, kill_while_hung, order, Neighbours};
use common::{wait_for, Backend, Daemon, Env, KafkaBroker};
use conveyor::tools::sim::Knobs;
use nix::sys::signal::Signal;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// Every dead letter of partition 0 of `topic`: (reason header, key).
fn dead_letters(brokers: &str, topic: &str) -> Vec<(String, String)> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("offset");
    reader.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) {
            let reason = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "x-conveyor-reason")
                        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                })
                .unwrap_or_default();
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            out.push((reason, key));
        }
    }
    out
}

on_both_brokers! {
async fn a_message_that_keeps_killing_the_daemon_is_dead_lettered_on_kafka(backend: Backend) {
    crash_loop(backend, Neighbours::Stored).await;
}
}

on_both_brokers! {
async fn the_orders_killed_beside_it_are_not_dead_lettered_with_it(backend: Backend) {
    crash_loop(backend, Neighbours::InFlight).await;
}
}

async fn crash_loop(backend: Backend, neighbours: Neighbours) {
    let (good, name): (i64, _) = match neighbours {
        Neighbours::Stored => (10, "crashkafka"),
        Neighbours::InFlight => (4, "crashnear"),
    };
    let max = 2u32;
    let env = Env::new(name, Knobs::default()).await;
    let broker = KafkaBroker::start(backend).await;
    let topic = format!("{}-orders", env.name);
    let dlq = format!("{topic}.dlq");
    broker.create_topic(&topic, 1).await;
    broker.create_topic(&dlq, 1).await;
    let brokers = broker.bootstrap_servers();
    let group = format!("{}-group", env.name);
    let hung_id = format!("{}-hang", env.name);
    let mut messages = vec![(hung_id.clone(), order(&hung_id, "hang-forever"))];
    messages.extend((0..good).map(|i| {
        let id = format!("{}-{i}", env.name);
        (id.clone(), order(&id, "c-7"))
    }));
    broker.produce(&topic, messages).await;

    let config = common::kafka_daemon_config_file(&env);
    let max_text = max.to_string();
    let vars = [
        ("CONVEYOR_CONFIG", config.as_str()),
        ("CONVEYOR__SOURCE__KIND", "kafka"),
        ("CONVEYOR__SOURCE__MAX_DELIVERIES", max_text.as_str()),
        ("CONVEYOR__KAFKA__BROKERS", brokers.as_str()),
        ("CONVEYOR__KAFKA__GROUP_ID", group.as_str()),
        ("CONVEYOR__KAFKA__TOPICS", topic.as_str()),
        ("CONVEYOR__KAFKA__COMMIT_INTERVAL", "200ms"),
        ("CONVEYOR__PAYMENT__TIMEOUT", "120s"),
        ("CONVEYOR__BATCH__MAX_WAIT", neighbours.batch_wait()),
    ];
    kill_while_hung(&env, &vars, &hung_id, good, max, neighbours).await;
    let mut daemon = Daemon::start(&env, &vars).await;
    wait_for(
        "the partition committed to its end",
        Duration::from_secs(60),
        || async {
            let offsets = broker.committed_and_end(&group, &topic, 1).await;
            offsets.len() == 1 && offsets[0].0 == offsets[0].1
        },
    )
    .await;
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "drained; log:\n{}", daemon.log_text());

    let (b, d) = (brokers.clone(), dlq.clone());
    let dead = tokio::task::spawn_blocking(move || dead_letters(&b, &d))
        .await
        .expect("read dead letters");
    assert_eq!(
        dead,
        vec![("redelivery_limit".to_string(), hung_id.clone())],
        "only the crashing message is dead-lettered"
    );
    assert_eq!(env.rows().await, good);
    let ledger = env.sim.ledger();
    assert_eq!(ledger.double_charged_orders, 0);
    assert_eq!(
        charge_requests(&env, &hung_id),
        u64::from(max),
        "charged once per delivery that got that far"
    );
    assert_eq!(
        ledger
            .charges
            .iter()
            .filter(|c| c.order_id == hung_id)
            .count(),
        1,
        "one charge"
    );
    let _ = std::fs::remove_file(&config);
    env.cleanup().await;
}
