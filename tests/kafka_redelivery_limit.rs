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

use common::{wait_for, Backend, Daemon, Env, KafkaBroker};
use conveyor::tools::sim::Knobs;
use nix::sys::signal::Signal;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

fn order(id: &str, customer: &str) -> Vec<u8> {
    serde_json::json!({
        "order_id": id,
        "customer_id": customer,
        "currency": "EUR",
        "amount_cents": 1200,
        "items": [{"sku": "A-1", "qty": 2, "unit_price_cents": 600}],
        "created_at": "2026-11-22T10:00:00Z",
    })
    .to_string()
    .into_bytes()
}

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

/// Where the other orders are when the daemon is killed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Neighbours {
    /// Stored by the first run; seen again after each kill.
    Stored,
    /// Charged and waiting for their batch beside the hung one at the
    /// first kill: killed with it.
    InFlight,
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
    let (good, name, batch_wait): (i64, _, _) = match neighbours {
        Neighbours::Stored => (10, "crashkafka", "20ms"),
        // A batch that waits two seconds: the neighbours are charged and
        // still in flight when the hung charge is seen and the kill comes.
        Neighbours::InFlight => (4, "crashnear", "2s"),
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
        ("CONVEYOR__BATCH__MAX_WAIT", batch_wait),
    ];
    let charge_requests = || {
        env.sim
            .ledger()
            .charges
            .iter()
            .find(|c| c.order_id == hung_id)
            .map_or(0, |c| c.requests)
    };
    let all_charged = || {
        let ledger = env.sim.ledger();
        ledger.charges.len() == 1 + good as usize
    };
    for delivery in 1..=max {
        let mut daemon = Daemon::start(&env, &vars).await;
        let stored = neighbours == Neighbours::Stored;
        wait_for(
            "the good orders where wanted and the hung charge requested",
            Duration::from_secs(60),
            || async {
                let placed = if stored {
                    env.rows().await == good
                } else {
                    delivery > 1 || all_charged()
                };
                placed && charge_requests() >= u64::from(delivery)
            },
        )
        .await;
        if !stored && delivery == 1 {
            assert_eq!(env.rows().await, 0, "the neighbours were still in flight");
        }
        daemon.signal(Signal::SIGKILL);
        daemon.wait(Duration::from_secs(10)).await;
    }
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
        charge_requests(),
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
