//! Scale-out under faults: three `conveyor run` processes on one backlog.
//!
//! * RabbitMQ: three competing consumers of one queue, classic and quorum;
//!   one is killed with `kill -9` mid-run and started again a little later,
//!   another is stopped with SIGTERM mid-run (and stays stopped).
//! * Kafka: three members of one consumer group (`NAME::mock` and
//!   `NAME::tansu`); the `kill -9` of one member makes the group rebalance
//!   once its session times out, it rejoins, then another leaves with
//!   SIGTERM.
//!
//! At the end every order is stored exactly once or, if it is poison,
//! dead-lettered (at least once: a dead letter confirmed just before a
//! `kill -9` may be sent again); the ledger's charges match the charged
//! rows, each with that order's own charge id; no order charged twice; the
//! queue is empty with nothing unacknowledged, or every partition's
//! committed offset is at its log end. Each scenario prints one line,
//! `scenario=<name> sent=N stored=N dead_lettered=N shares=a/b/c/a' secs=X` (from the first replica's start),
//! the shares being each process's acknowledged messages (a and b just
//! before their fault, a' the restarted a; redeliveries count again, so on
//! Kafka they can add up to more than were sent). The rows stored at each
//! fault are printed too: on the mock cluster a member may work alone until
//! the others' joins settle, so a fault can come later than its threshold.
//! The line ends with `steady=`: per change, the seconds until throughput
//! was steady again and the phase's median orders/s (see `pace`).

mod common;
#[path = "replicas/pace.rs"]
mod pace;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::{metric, unacked, wait_for, Backend, Daemon, Env, KafkaBroker};
use conveyor::config::{QueueType, RabbitConfig};
use conveyor::tools::produce::{Intent, Mix, OrderGen};
use conveyor::tools::sim::{EndpointKnobs, Knobs};
use nix::sys::signal::Signal;
use pace::Pace;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// Orders per Kafka scenario: a backlog of a few thousand.
const ORDERS: u64 = 3_000;

/// Orders per RabbitMQ scenario: enough for each change to have a few
/// seconds of steady work after it.
const RABBIT_ORDERS: u64 = 6_000;

/// Six partitions: two per member while all three are up.
const PARTITIONS: i32 = 6;

fn limit() -> Duration {
    Duration::from_secs(90)
}

fn knobs() -> Knobs {
    // A little latency keeps work in flight in every stage when a fault hits.
    Knobs {
        charge: EndpointKnobs {
            latency_ms: 1,
            jitter_ms: 2,
            ..Default::default()
        },
        ..Knobs::default()
    }
}

fn mix() -> Mix {
    Mix {
        poison_pct: 1.0,
        reject_pct: 2.0,
        decline_pct: 2.0,
    }
}

/// Message `i`; a truncated-JSON poison message carries its order id, so
/// every dead letter can be matched to what was sent.
fn body(gen: &OrderGen, i: u64) -> Vec<u8> {
    let (intent, bytes) = gen.message(i);
    let id = gen.order_id(i);
    if intent == Intent::Poison && !String::from_utf8_lossy(&bytes).contains(&id) {
        format!("{{\"order_id\": \"{id}\", truncated").into_bytes()
    } else {
        bytes
    }
}

/// The index of the order a body (or key) names, if any.
fn index_in(gen: &OrderGen, bytes: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(bytes);
    let prefix = format!("{}-", gen.run_id);
    let at = text.find(&prefix)? + prefix.len();
    text.get(at..at + 8)?.parse().ok()
}

/// Orders that must end up stored (everything but poison).
fn storable(gen: &OrderGen, n: u64) -> i64 {
    (0..n).filter(|i| gen.intent(*i) != Intent::Poison).count() as i64
}

async fn acked(d: &Daemon) -> f64 {
    metric(d.http, "conveyor_messages_acked_total")
        .await
        .unwrap_or(0.0)
}

/// Waits until every one of `daemons` has acknowledged something; on
/// timeout, says who did not, with its log.
async fn all_working(daemons: &[&Daemon]) {
    let deadline = Instant::now() + limit();
    loop {
        let mut idle = None;
        for d in daemons {
            if acked(d).await <= 0.0 {
                idle = Some(d);
                break;
            }
        }
        let Some(d) = idle else { return };
        assert!(
            Instant::now() < deadline,
            "a replica acknowledged nothing in {:?}; its log:\n{}",
            limit(),
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn sigterm(d: &mut Daemon, who: &str) {
    d.signal(Signal::SIGTERM);
    let (code, _) = d.wait(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{who} drains; log:\n{}", d.log_text());
}

async fn kill9(d: &mut Daemon) {
    d.signal(Signal::SIGKILL);
    let (code, _) = d.wait(Duration::from_secs(10)).await;
    assert_eq!(code, None, "died of the signal");
}

/// Every guarantee of the module's doc; prints the scenario's line.
async fn verify(
    name: &str,
    env: &Env,
    gen: &OrderGen,
    n: u64,
    dead: &[u64],
    shares: &[f64],
    pace: Pace,
) {
    let rows: Vec<String> = sqlx::query_scalar("SELECT order_id FROM orders")
        .fetch_all(&env.pool)
        .await
        .expect("read the stored order ids");
    let mut stored: HashMap<&str, u32> = HashMap::new();
    for id in &rows {
        *stored.entry(id.as_str()).or_default() += 1;
    }
    let dead: BTreeSet<u64> = dead.iter().copied().collect();
    let shares: Vec<String> = shares.iter().map(|s| format!("{s}")).collect();
    println!(
        "scenario={name} sent={n} stored={} dead_lettered={} shares={} secs={:.1} steady={}",
        rows.len(),
        dead.len(),
        shares.join("/"),
        pace.elapsed().as_secs_f64(),
        pace::summary(&pace.report())
    );
    let mut wrong = Vec::new();
    for i in 0..n {
        let times = stored.get(gen.order_id(i).as_str()).copied().unwrap_or(0);
        let is_dead = dead.contains(&i);
        let ok = match gen.intent(i) {
            Intent::Poison => times == 0 && is_dead,
            _ => times == 1 && !is_dead,
        };
        if !ok {
            wrong.push((i, gen.intent(i), times, is_dead));
        }
    }
    assert!(
        wrong.is_empty(),
        "{name}: {} orders lost, stored twice or misrouted, e.g. (index, intent, rows, dead-lettered) {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert_eq!(rows.len(), stored.len(), "{name}: duplicate rows");
    assert_eq!(
        rows.len() as u64 + dead.len() as u64,
        n,
        "{name}: stored + dead-lettered = sent (no strangers)"
    );
    assert_eq!(
        env.sim.ledger().double_charged_orders,
        0,
        "{name}: an order was charged twice"
    );
    env.check_ledger().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_three_competing_consumers_survive_kill9_and_sigterm() {
    rabbitmq_scenario(QueueType::Classic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_three_consumers_of_a_quorum_queue_survive_kill9_and_sigterm() {
    rabbitmq_scenario(QueueType::Quorum).await
}

async fn rabbitmq_scenario(queue_type: QueueType) {
    let (tag, kind) = match queue_type {
        QueueType::Classic => ("replrabbit", "classic"),
        QueueType::Quorum => ("replquorum", "quorum"),
    };
    let env = Env::new(tag, knobs()).await;
    let cfg = RabbitConfig {
        queue_type,
        ..env.rabbit()
    };
    let vars = [("CONVEYOR__RABBITMQ__QUEUE_TYPE", kind)];
    let n = RABBIT_ORDERS;
    let gen = OrderGen::new(env.name.clone(), mix());
    let stored = storable(&gen, n);
    env.publish_to(&cfg, (0..n).map(|i| body(&gen, i))).await;

    let mut pace = Pace::start(env.pool.clone());
    pace.mark("start");
    let mut a = Daemon::start(&env, &vars).await;
    let mut b = Daemon::start(&env, &vars).await;
    let c = Daemon::start(&env, &vars).await;
    all_working(&[&a, &b, &c]).await;

    let at = |share: i64| {
        let env = &env;
        async move {
            wait_for(&format!("{share}/8 stored"), limit(), || async {
                env.rows().await >= stored * share / 8
            })
            .await
        }
    };
    at(2).await;
    let share_a = acked(&a).await;
    println!("kill -9 of a at {} rows stored", env.rows().await);
    pace.mark("kill9");
    kill9(&mut a).await;

    at(3).await;
    pace.mark("add");
    let mut a2 = Daemon::start(&env, &vars).await;

    at(5).await;
    let share_b = acked(&b).await;
    println!("SIGTERM of b at {} rows stored", env.rows().await);
    pace.mark("sigterm");
    sigterm(&mut b, "b").await;
    all_working(&[&c, &a2]).await;

    wait_for("every order stored", limit(), || async {
        env.rows().await == stored
    })
    .await;
    wait_for(
        "the queue empty with nothing unacknowledged",
        limit(),
        || async { env.ready(&env.queue).await == 0 && unacked(&env.queue).await == 0 },
    )
    .await;
    let mut c = c;
    let shares = [share_a, share_b, acked(&c).await, acked(&a2).await];
    sigterm(&mut c, "c").await;
    sigterm(&mut a2, "a restarted").await;
    let dead: Vec<u64> = env
        .drain_dlq()
        .await
        .iter()
        .map(|(_, b)| index_in(&gen, b).expect("every dead letter names its order"))
        .collect();
    verify(
        &format!("rabbitmq_three_replicas_{kind}"),
        &env,
        &gen,
        n,
        &dead,
        &shares,
        pace,
    )
    .await;
    env.cleanup().await;
}

/// Every message of a dead-letter topic, as order indexes: reads up to
/// the high watermark, then until nothing more comes for a second (tansu
/// 0.6.0's watermark stops short of the last record batch).
fn kafka_dead_letters(brokers: &str, dlq: &str, gen: &OrderGen) -> Vec<u64> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{}-dlq-reader", gen.run_id))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let t = Duration::from_secs(5);
    let (_, end) = reader.fetch_watermarks(dlq, 0, t).expect("watermarks");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(dlq, 0, Offset::Beginning)
        .expect("offset");
    reader.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = Instant::now();
    while (out.len() as i64) < end || last.elapsed() < Duration::from_secs(1) {
        assert!(Instant::now() < deadline, "reading {end} dead letters");
        if let Some(m) = reader.poll(Duration::from_millis(200)) {
            let m = m.expect("dead-letter message");
            let key = m.key().expect("dead letters keep the original key");
            out.push(index_in(gen, key).expect("the key names an order"));
            last = Instant::now();
        }
    }
    out
}

/// Partitions a member has had revoked or assigned, from its metrics.
async fn rebalanced(d: &Daemon, event: &str) -> f64 {
    metric(
        d.http,
        &format!("conveyor_kafka_rebalance_events_total{{event=\"{event}\"}}"),
    )
    .await
    .unwrap_or(0.0)
}

async fn assigned(d: &Daemon) -> f64 {
    rebalanced(d, "assigned").await
}

on_both_brokers! {
    async fn kafka_three_group_members_survive_kill9_and_sigterm(backend: Backend) {
        kafka_scenario(backend, None).await
    }
}

// Cooperative-sticky: an incremental rebalance revokes only some
// partitions, so the members keep committing the others periodically while
// the coordinator refuses commits ("Specified group generation id is not
// valid", "Group rebalance in progress"). Such a refused commit must be
// sent again, or a partition whose backlog was finished meanwhile keeps its
// committed offset behind the log end for ever (rdkafka 0.39 reports the
// result of an asynchronous commit to no one; the daemon commits
// synchronously and resends what the coordinator has not confirmed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_three_cooperative_sticky_members_survive_kill9_and_sigterm_mock() {
    kafka_scenario(Backend::Mock, Some("cooperative-sticky")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_three_cooperative_sticky_members_survive_kill9_and_sigterm_tansu() {
    kafka_scenario(Backend::Tansu, Some("cooperative-sticky")).await
}

/// The Kafka scenario with librdkafka's default (eager) assignor or
/// `strategy`.
async fn kafka_scenario(backend: Backend, strategy: Option<&str>) {
    let env = Env::new("replkafka", knobs()).await;
    let broker = KafkaBroker::start(backend).await;
    let topic = format!("{}-orders", env.name);
    let dlq = format!("{topic}.dlq");
    broker.create_topic(&topic, PARTITIONS).await;
    broker.create_topic(&dlq, 1).await;
    let brokers = broker.bootstrap_servers();
    let group = format!("{}-group", env.name);
    let gen = OrderGen::new(env.name.clone(), mix());
    // Two thirds before the faults, the rest once b has left: the
    // restarted member then has work on its partitions whatever the group
    // finished while it was joining (on tansu, the first ~2 000 orders can
    // all be stored before the rebalances settle).
    let first = ORDERS * 2 / 3;
    let n = ORDERS;
    let stored = storable(&gen, n);
    broker
        .produce(&topic, (0..first).map(|i| (gen.order_id(i), body(&gen, i))))
        .await;

    // A killed member holds its partitions until its session times out
    // (3 s here): the whole group waits for it.
    let config = common::kafka_daemon_config_file(&env);
    if let Some(strategy) = strategy {
        let mut text = std::fs::read_to_string(&config).expect("the daemon's configuration");
        text.push_str(&format!(
            "\"partition.assignment.strategy\" = \"{strategy}\"\n"
        ));
        std::fs::write(&config, text).expect("write the daemon's configuration");
    }
    let vars = [
        ("CONVEYOR_CONFIG", config.as_str()),
        ("CONVEYOR__SOURCE__KIND", "kafka"),
        ("CONVEYOR__KAFKA__BROKERS", brokers.as_str()),
        ("CONVEYOR__KAFKA__GROUP_ID", group.as_str()),
        ("CONVEYOR__KAFKA__TOPICS", topic.as_str()),
        ("CONVEYOR__KAFKA__COMMIT_INTERVAL", "200ms"),
        ("CONVEYOR__KAFKA__LAG_INTERVAL", "1s"),
        ("CONVEYOR__KAFKA__REVOKE_TIMEOUT", "5s"),
    ];
    let mut pace = Pace::start(env.pool.clone());
    pace.mark("start");
    let mut a = Daemon::start(&env, &vars).await;
    let mut b = Daemon::start(&env, &vars).await;
    let mut c = Daemon::start(&env, &vars).await;
    all_working(&[&a, &b, &c]).await;

    wait_for("a quarter stored", limit(), || async {
        env.rows().await >= stored / 4
    })
    .await;
    let share_a = acked(&a).await;
    let before = assigned(&b).await + assigned(&c).await;
    println!("kill -9 of a at {} rows stored", env.rows().await);
    pace.mark("kill9");
    kill9(&mut a).await;
    // The group notices the dead member only when its session times out;
    // the survivors then take its partitions over (all partitions
    // reassigned when eager, only a's when cooperative).
    wait_for("a rebalance after the kill", limit(), || async {
        assigned(&b).await + assigned(&c).await > before
    })
    .await;
    pace.mark("add");
    let mut a2 = Daemon::start(&env, &vars).await;
    wait_for(
        "the restarted member assigned partitions",
        limit(),
        || async { rebalanced(&a2, "assigned").await > 0.0 },
    )
    .await;

    wait_for("half stored", limit(), || async {
        env.rows().await >= stored / 2
    })
    .await;
    let share_b = acked(&b).await;
    println!("SIGTERM of b at {} rows stored", env.rows().await);
    pace.mark("sigterm");
    sigterm(&mut b, "b").await;
    broker
        .produce(&topic, (first..n).map(|i| (gen.order_id(i), body(&gen, i))))
        .await;
    all_working(&[&c, &a2]).await;

    wait_for("every order stored", limit(), || async {
        env.rows().await == stored
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let offsets = broker.committed_and_end(&group, &topic, PARTITIONS).await;
        if offsets.len() == PARTITIONS as usize && offsets.iter().all(|(c, end)| c == end) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "offsets not committed to the log end in 30 s with every order stored; \
             (committed, end) per partition: {offsets:?}\nc's log:\n{}\na restarted's log:\n{}",
            c.log_text(),
            a2.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let shares = [share_a, share_b, acked(&c).await, acked(&a2).await];
    sigterm(&mut c, "c").await;
    sigterm(&mut a2, "a restarted").await;
    let dead = kafka_dead_letters(&brokers, &dlq, &gen);
    let name = format!(
        "kafka_three_replicas_{}_{}",
        strategy.unwrap_or("eager"),
        backend.name()
    );
    verify(&name, &env, &gen, n, &dead, &shares, pace).await;
    let _ = std::fs::remove_file(&config);
    env.cleanup().await;
}
