//! The prefetch that follows the stages, against RabbitMQ: the hoarding
//! scenario, scaled down.
//!
//! Two `conveyor run` processes consume one queue with
//! `[source.prefetch_follow]` on. Replica B's payment provider is a second
//! simulator answering in 200 ms, and B's stages run 4 orders at once, so B
//! finishes 20 orders/s; A's downstreams answer at once. Without the
//! following prefetch B would take `source.prefetch` (512) messages and sit
//! on them while A goes idle. With it, RabbitMQ itself reports that B's
//! channel holds no more than its stage limits plus the batch term at its
//! rate plus the slack, and has that as its `basic.qos`: per channel on a
//! classic queue, the consumer's own on a quorum queue (whose consumer is
//! swapped when the limit moves; the channel has none while it is).
//!
//! B runs alone first (every unacknowledged message of the queue is then
//! B's), then A joins and the backlog is finished. At the end every order
//! is stored exactly once and, across both simulators' ledgers, charged
//! exactly once with the stored charge id.
//!
//! Kafka has no broker-side count of what a member holds: there the
//! permits are what follow, read back as `conveyor_unacked_messages` of a
//! slowed daemon on librdkafka's mock cluster.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::broker::ConsumerChannel;
use common::{metric, unacked, wait_for, Backend, Daemon, Env, InProcess, KafkaBroker};
use conveyor::config::{QueueType, RabbitConfig, SourceKind};
use conveyor::source::prefetch::{HEADROOM, SLACK};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::{self, EndpointKnobs, Knobs};
use nix::sys::signal::Signal;

const ORDERS: u64 = 3_000;
/// B's validate and charge concurrency.
const STAGE: usize = 4;
/// B's payment latency.
const SLOW_MS: u64 = 200;

/// What a daemon whose stages run `STAGE` calls of `call_ms` at once may
/// hold: its two stage limits, the slack, and the batch term at its rate,
/// with allowances — twice the most its calls allow (the smoothed ack rate
/// of orders acked in bursts reads above it for a moment) and three times
/// its mean commit time plus 10 ms (the follower smooths the commit time of
/// the last intervals, which a slow commit lifts) beside the 20 ms linger —
/// and the follower's headroom.
fn bound(call_ms: u64, commit_secs: f64) -> u64 {
    let rate = 2.0 * STAGE as f64 * 1000.0 / call_ms as f64;
    let cycle = 0.020 + 3.0 * commit_secs + 0.010;
    let batch = (HEADROOM * rate * cycle).ceil() as usize;
    (2 * STAGE + SLACK + batch) as u64
}

/// A daemon's mean commit time so far, from its metrics.
async fn commit_secs(http: std::net::SocketAddr) -> f64 {
    let sum = metric(http, "conveyor_batch_commit_duration_seconds_sum").await;
    let n = metric(http, "conveyor_batch_commit_duration_seconds_count").await;
    match (sum, n) {
        (Some(sum), Some(n)) if n > 0.0 => sum / n,
        _ => 0.0,
    }
}

fn limit() -> Duration {
    Duration::from_secs(60)
}

fn follow_vars(tag: &'static str, queue_type: QueueType) -> Vec<(&'static str, String)> {
    let kind = match queue_type {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    };
    vec![
        ("CONVEYOR__RABBITMQ__QUEUE_TYPE", kind.into()),
        ("CONVEYOR__SOURCE__PREFETCH", "512".into()),
        ("CONVEYOR__SOURCE__PREFETCH_FOLLOW__ENABLED", "true".into()),
        ("CONVEYOR__SOURCE__PREFETCH_FOLLOW__FLOOR", "16".into()),
        ("CONVEYOR__RABBITMQ__CONSUMER_TAG", tag.into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowed_replica_holds_only_what_its_stages_can_work_on() {
    slowed_replica(QueueType::Classic, "prefetch").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowed_replica_of_a_quorum_queue_holds_only_what_its_stages_can_work_on() {
    slowed_replica(QueueType::Quorum, "prefetchq").await
}

async fn slowed_replica(queue_type: QueueType, tag: &str) {
    let started = Instant::now();
    let env = Env::new(tag, Knobs::default()).await;
    let cfg = RabbitConfig {
        queue_type,
        ..env.rabbit()
    };
    let slow = sim::start(
        "127.0.0.1:0".parse().expect("addr"),
        Knobs {
            charge: EndpointKnobs {
                latency_ms: SLOW_MS,
                ..Default::default()
            },
            ..Knobs::default()
        },
    )
    .await
    .expect("start the slow simulator");
    let mix = Mix {
        poison_pct: 0.0,
        reject_pct: 2.0,
        decline_pct: 2.0,
    };
    let gen = OrderGen::new(env.name.clone(), mix);
    env.publish_to(&cfg, (0..ORDERS).map(|i| gen.message(i).1))
        .await;

    let stage = STAGE.to_string();
    let mut b_vars = follow_vars("conveyor-b", queue_type);
    b_vars.extend([
        ("CONVEYOR__PAYMENT__URL", slow.url.clone()),
        ("CONVEYOR__PIPELINE__VALIDATE_CONCURRENCY", stage.clone()),
        ("CONVEYOR__PIPELINE__CHARGE_CONCURRENCY", stage),
    ]);
    let b_vars: Vec<(&str, &str)> = b_vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut b = Daemon::start(&env, &b_vars).await;
    let mut b_channel = ConsumerChannel::new(&env.queue, "conveyor-b", queue_type);

    // B alone: what the queue has unacknowledged is B's.
    let mut samples = Vec::new();
    while samples.len() < 5 {
        if let Some((held, qos)) = b_channel.read().await {
            let queue_held = unacked(&env.queue).await;
            samples.push((held, qos, queue_held));
        }
        assert!(
            started.elapsed() < limit(),
            "B's channel never showed up in rabbitmqctl list_consumers; its log:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let commit = commit_secs(b.http).await;
    let b_bound = bound(SLOW_MS, commit);
    println!(
        "{queue_type:?}: B alone (held, prefetch, queue unacked): {samples:?}; \
         B's mean commit {:.0} ms, bound {b_bound}",
        commit * 1000.0
    );
    for &(held, qos, queue_held) in &samples {
        assert!(
            held <= b_bound && queue_held <= b_bound,
            "B holds {held} (the queue {queue_held}) unacknowledged, over its stage limits, \
             batch and slack ({b_bound}); log:\n{}",
            b.log_text()
        );
        assert!(
            (16..=b_bound).contains(&qos),
            "B's basic.qos is {qos}, not within its floor and bound"
        );
    }
    let b_limit = metric(b.http, "conveyor_prefetch_limit")
        .await
        .expect("B exports conveyor_prefetch_limit");
    assert!(b_limit <= b_bound as f64, "B's prefetch limit {b_limit}");

    // A joins and finishes the backlog; B keeps holding little.
    let a_vars = follow_vars("conveyor-a", queue_type);
    let a_vars: Vec<(&str, &str)> = a_vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut a = Daemon::start(&env, &a_vars).await;
    let mut b_max = 0;
    let mut a_limit_max = 0.0f64;
    while env.rows().await < ORDERS as i64 {
        if let Some((held, _)) = b_channel.read().await {
            b_max = b_max.max(held);
        }
        if let Some(l) = metric(a.http, "conveyor_prefetch_limit").await {
            a_limit_max = a_limit_max.max(l);
        }
        assert!(
            started.elapsed() < limit() + Duration::from_secs(30),
            "{} of {ORDERS} stored; A's log:\n{}\nB's log:\n{}",
            env.rows().await,
            a.log_text(),
            b.log_text()
        );
    }
    let bound = bound(SLOW_MS, commit_secs(b.http).await).max(b_bound);
    assert!(b_max <= bound, "with A running, B held {b_max} > {bound}");
    wait_for(
        "the queue empty with nothing unacknowledged",
        limit(),
        || async { env.ready(&env.queue).await == 0 && unacked(&env.queue).await == 0 },
    )
    .await;
    let acked_b = metric(b.http, "conveyor_messages_acked_total")
        .await
        .unwrap_or(0.0);
    let acked_a = metric(a.http, "conveyor_messages_acked_total")
        .await
        .unwrap_or(0.0);
    let swaps_b = metric(b.http, "conveyor_prefetch_consumer_swaps_total")
        .await
        .unwrap_or(0.0);
    for (d, who) in [(&mut a, "A"), (&mut b, "B")] {
        d.signal(Signal::SIGTERM);
        let (code, _) = d.wait(Duration::from_secs(30)).await;
        assert_eq!(code, Some(0), "{who} drains; log:\n{}", d.log_text());
    }
    println!(
        "{queue_type:?}: acked: A {acked_a}, B {acked_b}; B held at most {b_max} with A running \
         ({swaps_b} consumer swaps); \
         A's prefetch limit reached {a_limit_max}; {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Stored once each; charged once each across both providers.
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT order_id, status, charge_id FROM orders")
            .fetch_all(&env.pool)
            .await
            .expect("rows");
    assert_eq!(rows.len() as u64, ORDERS, "every order stored once");
    let fast_ledger = env.sim.ledger();
    let slow_ledger = slow.ledger();
    assert_eq!(fast_ledger.double_charged_orders, 0);
    assert_eq!(slow_ledger.double_charged_orders, 0);
    let mut charges: HashMap<String, Vec<String>> = HashMap::new();
    for e in fast_ledger.charges.iter().chain(&slow_ledger.charges) {
        charges
            .entry(e.order_id.clone())
            .or_default()
            .push(e.charge_id.clone());
    }
    let mut charged = 0;
    for (id, status, charge_id) in &rows {
        match status.as_str() {
            "accepted" | "declined" => {
                charged += 1;
                let got = charges.get(id).map(Vec::as_slice).unwrap_or_default();
                assert_eq!(
                    got,
                    std::slice::from_ref(charge_id.as_ref().expect("a charged row has its id")),
                    "{id}: one charge across both providers, the stored one"
                );
            }
            _ => assert!(charge_id.is_none(), "{id} rejected but charged"),
        }
    }
    assert_eq!(charged, charges.len(), "charges without a stored order");
    slow.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_the_permits_follow_the_stages() {
    const N: u64 = 300;
    const MS: u64 = 100;
    let env = Env::new(
        "prefetchk",
        Knobs {
            charge: EndpointKnobs {
                latency_ms: MS,
                ..Default::default()
            },
            ..Knobs::default()
        },
    )
    .await;
    let broker = KafkaBroker::start(Backend::Mock).await;
    let topic = format!("{}-orders", env.name);
    broker.create_topic(&topic, 2).await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    broker
        .produce(&topic, (0..N).map(|i| (gen.order_id(i), gen.message(i).1)))
        .await;
    let mut c = env.config();
    c.source.kind = SourceKind::Kafka;
    c.source.prefetch_follow.enabled = true;
    c.pipeline.validate_concurrency = STAGE;
    c.pipeline.charge_concurrency = STAGE;
    c.kafka.brokers = broker.bootstrap_servers();
    c.kafka.group_id = format!("{}-group", env.name);
    c.kafka.topics = vec![topic.clone()];
    c.kafka.commit_interval = Duration::from_millis(200);
    c.kafka
        .properties
        .insert("session.timeout.ms".into(), "6000".into());
    let daemon = InProcess::start(c).await;
    let started = Instant::now();
    let (mut held_max, mut limit_max) = (0.0f64, 0.0f64);
    loop {
        let acked = metric(daemon.addr, "conveyor_messages_acked_total")
            .await
            .unwrap_or(0.0);
        if acked >= N as f64 {
            break;
        }
        held_max = held_max.max(
            metric(daemon.addr, "conveyor_unacked_messages")
                .await
                .unwrap_or(0.0),
        );
        limit_max = limit_max.max(
            metric(daemon.addr, "conveyor_prefetch_limit")
                .await
                .unwrap_or(0.0),
        );
        assert!(
            started.elapsed() < limit(),
            "{acked} of {N} acked in {:?}",
            limit()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The same bound as on RabbitMQ, for calls of 100 ms.
    let bound = bound(MS, commit_secs(daemon.addr).await) as f64;
    println!(
        "kafka: held at most {held_max}, limit at most {limit_max}, bound {bound}, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        held_max <= bound && limit_max <= bound,
        "held {held_max} / limit {limit_max} over {bound} (without following: all {N})"
    );
    let report = daemon.stop().await;
    assert_eq!(report.acked, N);
    assert_eq!(env.rows().await, N as i64, "every order stored once");
    env.check_ledger().await;
    env.cleanup().await;
}
