//! Fault injection against the real services, the daemon as a child
//! process: `kill -9` at random moments (RabbitMQ and Kafka sources), a
//! RabbitMQ restart under load, a PostgreSQL outage under load, the
//! downstreams failing then not answering at all (both sources). The Kafka
//! scenarios run on both brokers (`NAME::mock`, `NAME::tansu`; see
//! `tests/common/kafka.rs`).
//!
//! Each scenario prints one line,
//! `scenario=<name> sent=N stored=N dead_lettered=N duplicate_rows=N double_charges=N recover_s=X.X`,
//! and asserts the guarantees: nothing lost (every produced order is stored
//! exactly once or, if it is poison, dead-lettered; stored + dead-lettered =
//! sent), no duplicate row, no order charged twice (the simulator's ledger).
//! `dead_lettered` counts distinct orders: a poison message whose dead
//! letter was confirmed just before a crash is redelivered and dead-lettered
//! again (at-least-once), which is allowed.
//!
//! `recover_s` is the worst time, over a scenario's faults, from the end of
//! the fault (the kill; the broker or the database available again) until
//! the daemon acknowledges messages again.
//!
//! Sizes come from the environment; the defaults are the CI subset and
//! `scripts/chaos` sets the full schedule:
//!
//! | variable | default | what |
//! |---|---|---|
//! | `CHAOS_ORDERS` | 5000 | orders per scenario |
//! | `CHAOS_KILLS` | 3 | `kill -9`s per kill scenario |
//! | `CHAOS_PG_OUTAGE_S` | 5 | seconds the database refuses connections |
//! | `CHAOS_RABBIT_DOWN_S` | 3 | seconds RabbitMQ's application is stopped |
//! | `CHAOS_DOWNSTREAM_ERRORS_S` | 4 | downstream outage, phase 1: seconds of 50 % 5xx |
//! | `CHAOS_DOWNSTREAM_DOWN_S` | 6 | downstream outage, phase 2: seconds of no answer at all |
//! | `CHAOS_SEED` | random | the kill schedule (printed on failure) |

mod common;

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::{
    close_consumer_connections, metric, ready, unacked, wait_for, Backend, Daemon, Env,
    KafkaBroker, PgOutage, RabbitOutage,
};
use conveyor::tools::produce::{Intent, Mix, OrderGen};
use conveyor::tools::sim::{EndpointKnobs, Knobs};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// The scenario sizes, from the environment.
struct Sizes {
    orders: u64,
    kills: usize,
    pg_outage: Duration,
    rabbit_down: Duration,
    downstream_errors: Duration,
    downstream_down: Duration,
    seed: u64,
}

fn var<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
        Err(_) => default,
    }
}

fn sizes() -> Sizes {
    Sizes {
        orders: var("CHAOS_ORDERS", 5_000),
        kills: var("CHAOS_KILLS", 3),
        pg_outage: Duration::from_secs_f64(var("CHAOS_PG_OUTAGE_S", 5.0)),
        rabbit_down: Duration::from_secs_f64(var("CHAOS_RABBIT_DOWN_S", 3.0)),
        downstream_errors: Duration::from_secs_f64(var("CHAOS_DOWNSTREAM_ERRORS_S", 4.0)),
        downstream_down: Duration::from_secs_f64(var("CHAOS_DOWNSTREAM_DOWN_S", 6.0)),
        seed: var("CHAOS_SEED", rand::random()),
    }
}

/// Generous limits that grow with the run (a debug build on 2 cores is
/// slow; a limit is a failure, never a skip).
fn limit(n: u64) -> Duration {
    Duration::from_secs(60 + n / 100)
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

/// Message `i`: the generator's bytes, except that the truncated-JSON kind
/// of poison carries its order id too, so every dead letter can be matched
/// to what was sent.
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

fn counts(gen: &OrderGen, n: u64) -> (i64, u64) {
    let poison = (0..n).filter(|i| gen.intent(*i) == Intent::Poison).count() as u64;
    ((n - poison) as i64, poison)
}

/// `kills` thresholds of stored rows, random within the run.
fn kill_points(rng: &mut StdRng, stored: i64, kills: usize) -> Vec<i64> {
    let mut points: Vec<i64> = (0..kills)
        .map(|_| (stored as f64 * rng.random_range(0.05..0.9)) as i64)
        .collect();
    points.sort_unstable();
    points
}

/// Checks every guarantee and prints the scenario's line.
async fn verify(name: &str, env: &Env, gen: &OrderGen, n: u64, dead: &[u64], recover: Duration) {
    let rows: Vec<String> = sqlx::query_scalar("SELECT order_id FROM orders")
        .fetch_all(&env.pool)
        .await
        .expect("read the stored order ids");
    let mut stored: HashMap<String, u32> = HashMap::new();
    for id in &rows {
        *stored.entry(id.clone()).or_default() += 1;
    }
    let duplicate_rows = rows.len() - stored.len();
    let dead: BTreeSet<u64> = dead.iter().copied().collect();
    let ledger = env.sim.ledger();
    println!(
        "scenario={name} sent={n} stored={} dead_lettered={} duplicate_rows={duplicate_rows} \
         double_charges={} recover_s={:.1}",
        rows.len(),
        dead.len(),
        ledger.double_charged_orders,
        recover.as_secs_f64()
    );
    let mut lost = Vec::new();
    let mut misplaced = Vec::new();
    for i in 0..n {
        let is_stored = stored.get(&gen.order_id(i)).copied().unwrap_or(0);
        let is_dead = dead.contains(&i);
        match gen.intent(i) {
            Intent::Poison if is_stored > 0 || !is_dead => misplaced.push(i),
            Intent::Poison => {}
            _ if is_stored == 0 => lost.push(i),
            _ if is_stored > 1 || is_dead => misplaced.push(i),
            _ => {}
        }
    }
    let strangers = rows
        .iter()
        .filter(|id| index_in(gen, id.as_bytes()).is_none_or(|i| i >= n));
    assert_eq!(strangers.count(), 0, "{name}: rows that were never sent");
    assert!(
        lost.is_empty(),
        "{name}: {} orders lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        misplaced.is_empty(),
        "{name}: {} orders stored twice, stored and dead-lettered, or poison not dead-lettered, e.g. {:?}",
        misplaced.len(),
        &misplaced[..misplaced.len().min(10)]
    );
    assert_eq!(duplicate_rows, 0, "{name}: duplicate rows");
    assert_eq!(
        rows.len() as u64 + dead.len() as u64,
        n,
        "{name}: stored + dead-lettered = sent"
    );
    assert_eq!(
        ledger.double_charged_orders, 0,
        "{name}: an order was charged twice"
    );
    env.check_ledger().await;
}

async fn acked(d: &Daemon) -> f64 {
    metric(d.http, "conveyor_messages_acked_total")
        .await
        .unwrap_or(0.0)
}

/// Waits until `d` acknowledges more than `baseline` messages.
async fn acks_again(d: &Daemon, baseline: f64, what: &str, limit: Duration) {
    wait_for(what, limit, || async { acked(d).await > baseline }).await;
}

/// Waits until every order is stored and the queue is empty with nothing
/// unacknowledged (so every poison message's dead letter is confirmed),
/// then drains the daemon with SIGTERM.
async fn finish_rabbit(env: &Env, daemon: &mut Daemon, stored: i64, n: u64) {
    wait_for("every order stored", limit(n), || async {
        env.rows().await == stored
    })
    .await;
    wait_for(
        "the queue empty with nothing unacknowledged",
        Duration::from_secs(60),
        || async { env.ready(&env.queue).await == 0 && unacked(&env.queue).await == 0 },
    )
    .await;
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "drain; log:\n{}", daemon.log_text());
}

/// The order indexes in the dead-letter queue (duplicates included).
async fn rabbit_dead_letters(env: &Env, gen: &OrderGen) -> Vec<u64> {
    env.drain_dlq()
        .await
        .iter()
        .map(|(_, b)| index_in(gen, b).expect("every dead letter names its order"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_kill9_at_random_moments_loses_and_doubles_nothing() {
    let s = sizes();
    let env = Env::new("chaoskill", knobs()).await;
    let gen = OrderGen::new(env.name.clone(), mix());
    let n = s.orders;
    let (stored, _) = counts(&gen, n);
    env.publish((0..n).map(|i| body(&gen, i))).await;
    let mut rng = StdRng::seed_from_u64(s.seed);
    let points = kill_points(&mut rng, stored, s.kills);

    let mut daemon = Daemon::start(&env, &[]).await;
    let mut worst = Duration::ZERO;
    for (k, at) in points.iter().enumerate() {
        let what = format!("{at} rows stored before kill {k} (CHAOS_SEED={})", s.seed);
        wait_for(&what, limit(n), || async { env.rows().await >= *at }).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
        daemon.signal(Signal::SIGKILL);
        let (code, _) = daemon.wait(Duration::from_secs(10)).await;
        assert_eq!(code, None, "died of the signal");
        let killed = Instant::now();
        daemon = Daemon::start(&env, &[]).await;
        acks_again(&daemon, 0.0, "acks after the restart", limit(n)).await;
        worst = worst.max(killed.elapsed());
    }
    finish_rabbit(&env, &mut daemon, stored, n).await;
    let dead = rabbit_dead_letters(&env, &gen).await;
    verify("rabbitmq_kill9", &env, &gen, n, &dead, worst).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restart_mid_run_the_daemon_reconnects_and_finishes() {
    let s = sizes();
    let env = Env::new("chaosrmq", knobs()).await;
    let gen = OrderGen::new(env.name.clone(), mix());
    let n = s.orders;
    let (stored, _) = counts(&gen, n);
    env.publish((0..n).map(|i| body(&gen, i))).await;

    let mut daemon = Daemon::start(&env, &[]).await;
    wait_for("a third of the orders stored", limit(n), || async {
        env.rows().await >= stored / 3
    })
    .await;
    let mut outage = RabbitOutage::begin().await;
    wait_for(
        "/readyz false while RabbitMQ is down",
        Duration::from_secs(30),
        || async { ready(daemon.http).await == Some(false) },
    )
    .await;
    let baseline = acked(&daemon).await;
    // The outage itself: not waiting for a condition.
    tokio::time::sleep(s.rabbit_down).await;
    assert!(
        daemon.child.try_wait().expect("try_wait").is_none(),
        "the daemon exited while RabbitMQ was down; log:\n{}",
        daemon.log_text()
    );
    outage.end().await;
    let back = Instant::now();
    wait_for("/readyz true again", Duration::from_secs(60), || async {
        ready(daemon.http).await == Some(true)
    })
    .await;
    acks_again(&daemon, baseline, "acks after the reconnect", limit(n)).await;
    let recover = back.elapsed();
    finish_rabbit(&env, &mut daemon, stored, n).await;
    assert!(
        daemon.log_text().contains("RabbitMQ reconnected"),
        "the same process reconnected; log:\n{}",
        daemon.log_text()
    );
    let dead = rabbit_dead_letters(&env, &gen).await;
    verify("rabbitmq_restart", &env, &gen, n, &dead, recover).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_closes_the_connection_mid_run_the_daemon_reconnects_and_finishes() {
    let s = sizes();
    let env = Env::new("chaosclose", knobs()).await;
    let gen = OrderGen::new(env.name.clone(), mix());
    let n = s.orders;
    let (stored, _) = counts(&gen, n);
    env.publish((0..n).map(|i| body(&gen, i))).await;

    let mut daemon = Daemon::start(&env, &[]).await;
    wait_for("a third of the orders stored", limit(n), || async {
        env.rows().await >= stored / 3
    })
    .await;
    let baseline = acked(&daemon).await;
    assert_eq!(
        close_consumer_connections(&env.queue).await,
        1,
        "the daemon's connection"
    );
    let closed = Instant::now();
    acks_again(&daemon, baseline, "acks after the reconnect", limit(n)).await;
    let recover = closed.elapsed();
    finish_rabbit(&env, &mut daemon, stored, n).await;
    assert!(
        daemon.log_text().contains("RabbitMQ reconnected"),
        "the same process reconnected; log:\n{}",
        daemon.log_text()
    );
    let dead = rabbit_dead_letters(&env, &gen).await;
    verify("rabbitmq_connection_closed", &env, &gen, n, &dead, recover).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_mid_run_retries_commits_and_acks_nothing_meanwhile() {
    let s = sizes();
    let env = Env::new("chaospg", knobs()).await;
    // No poison here: a dead letter needs no database, so it would be
    // acknowledged during the outage, and the point is that nothing else is.
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 0.0,
            ..mix()
        },
    );
    let n = s.orders;
    let (stored, _) = counts(&gen, n);
    env.publish((0..n).map(|i| body(&gen, i))).await;

    let mut daemon = Daemon::start(&env, &[]).await;
    wait_for("a quarter of the orders stored", limit(n), || async {
        env.rows().await >= stored / 4
    })
    .await;
    let (mut outage, terminated) = PgOutage::begin(&env.name).await;
    let began = Instant::now();
    assert!(terminated > 0, "the daemon had database connections");
    wait_for(
        "/readyz false during the database outage",
        s.pg_outage,
        || async { ready(daemon.http).await == Some(false) },
    )
    .await;
    // From here to the end of the outage: not ready, and not one ack (a
    // commit cannot succeed, and nothing is acked before its commit).
    let baseline = acked(&daemon).await;
    while began.elapsed() < s.pg_outage {
        assert_eq!(
            ready(daemon.http).await,
            Some(false),
            "/readyz during the outage"
        );
        assert_eq!(acked(&daemon).await, baseline, "acked during the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        unacked(&env.queue).await > 0,
        "the broker still holds the unacknowledged deliveries"
    );
    outage.end().await;
    let back = Instant::now();
    wait_for(
        "/readyz true after the outage",
        Duration::from_secs(60),
        || async { ready(daemon.http).await == Some(true) },
    )
    .await;
    acks_again(&daemon, baseline, "acks after the outage", limit(n)).await;
    let recover = back.elapsed();
    assert!(
        metric(daemon.http, "conveyor_batch_commit_retries_total")
            .await
            .unwrap_or(0.0)
            > 0.0,
        "commits were retried"
    );
    finish_rabbit(&env, &mut daemon, stored, n).await;
    let dead = rabbit_dead_letters(&env, &gen).await;
    verify("postgres_outage", &env, &gen, n, &dead, recover).await;
    env.cleanup().await;
}

// ---- Kafka ----------------------------------------------------------------

/// Partitions of the chaos topic: the mock cluster keeps only about 5 MiB
/// per partition, so the full schedule's 50,000 orders need more than four.
const PARTITIONS: i32 = 8;

/// Every message of the dead-letter topic, as order indexes (from the
/// original keys, which dead letters keep): at least as many as the
/// partition's high watermark says, then until nothing more comes for a
/// second (tansu 0.6.0's watermark stops short of the last record batch;
/// see `KafkaBroker::committed_and_end`).
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

on_both_brokers! {
    async fn kafka_kill9_at_random_moments_loses_and_doubles_nothing(backend: Backend) {
    let s = sizes();
    let env = Env::new("chaoskafka", knobs()).await;
    let broker = KafkaBroker::start(backend).await;
    let topic = format!("{}-orders", env.name);
    let dlq = format!("{topic}.dlq");
    broker.create_topic(&topic, PARTITIONS).await;
    broker.create_topic(&dlq, 1).await;
    let brokers = broker.bootstrap_servers();
    let group = format!("{}-group", env.name);
    let gen = OrderGen::new(env.name.clone(), mix());
    let n = s.orders;
    let (stored, _) = counts(&gen, n);
    broker
        .produce(&topic, (0..n).map(|i| (gen.order_id(i), body(&gen, i))))
        .await;

    // A killed member holds its partitions until its session times out:
    // keep that short, as the whole group waits for it.
    let config = common::kafka_daemon_config_file(&env);
    let vars = [
        ("CONVEYOR_CONFIG", config.as_str()),
        ("CONVEYOR__SOURCE__KIND", "kafka"),
        ("CONVEYOR__KAFKA__BROKERS", brokers.as_str()),
        ("CONVEYOR__KAFKA__GROUP_ID", group.as_str()),
        ("CONVEYOR__KAFKA__TOPICS", topic.as_str()),
        ("CONVEYOR__KAFKA__COMMIT_INTERVAL", "200ms"),
        ("CONVEYOR__KAFKA__LAG_INTERVAL", "1s"),
    ];
    let mut rng = StdRng::seed_from_u64(s.seed);
    let points = kill_points(&mut rng, stored, s.kills);

    let mut daemon = Daemon::start(&env, &vars).await;
    let mut worst = Duration::ZERO;
    for (k, at) in points.iter().enumerate() {
        let what = format!("{at} rows stored before kill {k} (CHAOS_SEED={})", s.seed);
        wait_for(&what, limit(n), || async { env.rows().await >= *at }).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
        daemon.signal(Signal::SIGKILL);
        let (code, _) = daemon.wait(Duration::from_secs(10)).await;
        assert_eq!(code, None, "died of the signal");
        let killed = Instant::now();
        daemon = Daemon::start(&env, &vars).await;
        acks_again(&daemon, 0.0, "acks after the restart", limit(n)).await;
        worst = worst.max(killed.elapsed());
    }
    wait_for("every order stored", limit(n), || async {
        env.rows().await == stored
    })
    .await;
    wait_for(
        "offsets committed to the log end",
        Duration::from_secs(60),
        || async {
            let offsets = broker.committed_and_end(&group, &topic, PARTITIONS).await;
            offsets.len() == PARTITIONS as usize && offsets.iter().all(|(c, end)| c == end)
        },
    )
    .await;
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "drain; log:\n{}", daemon.log_text());
    let dead = kafka_dead_letters(&brokers, &dlq, &gen);
    verify(&format!("kafka_kill9_{}", backend.name()), &env, &gen, n, &dead, worst).await;
    let _ = std::fs::remove_file(&config);
    env.cleanup().await;
}
}

// ---- Downstream outage ----------------------------------------------------
//
// Both downstreams degrade, then stop answering, then recover, while a
// backlog waits in the broker: phase 1, 50 % of the calls answered 503
// (`CHAOS_DOWNSTREAM_ERRORS_S`); phase 2, no call answered at all
// (`CHAOS_DOWNSTREAM_DOWN_S`); phase 3, healthy. The circuit breakers must
// pause intake rather than flush the backlog into the dead-letter
// destination: during phases 1–2 the daemon never holds more than its
// prefetch, a circuit opens in phase 2, and nothing is dead-lettered (the mix
// has no poison, so `dead_lettered` must be 0). `recover_s` is the time from
// the end of phase 2 to the first acknowledgement after it.

/// The daemon's prefetch in the downstream-outage scenarios.
const OUTAGE_PREFETCH: u32 = 256;

/// The daemon settings of the downstream-outage scenarios: a per-attempt
/// timeout short enough that phase 2 trips the breakers quickly; retry
/// `max_elapsed` and the breakers at their defaults.
const OUTAGE_VARS: [(&str, &str); 3] = [
    ("CONVEYOR__SOURCE__PREFETCH", "256"),
    ("CONVEYOR__PAYMENT__TIMEOUT", "500ms"),
    ("CONVEYOR__RULE_ENGINE__TIMEOUT", "500ms"),
];

const CIRCUITS: [&str; 2] = [
    "conveyor_circuit_state{downstream=\"rule_engine\"}",
    "conveyor_circuit_state{downstream=\"payment\"}",
];

fn outage_mix() -> Mix {
    Mix {
        poison_pct: 0.0,
        ..mix()
    }
}

/// Both endpoints of the simulator set the same way, on top of [`knobs`].
fn both_endpoints(error_rate: f64, timeout_rate: f64) -> Knobs {
    let mut k = knobs();
    for e in [&mut k.validate, &mut k.charge] {
        e.error_rate = error_rate;
        e.timeout_rate = timeout_rate;
    }
    k
}

/// What the daemon was seen doing during phases 1–2.
#[derive(Debug, Default)]
struct OutageSeen {
    max_unacked: f64,
    /// RabbitMQ's own count of the queue's unacknowledged messages (RabbitMQ
    /// source only).
    max_broker_unacked: Option<u64>,
    /// Since the start of phase 2, per downstream: when its circuit was
    /// first seen open.
    opened: [Option<Duration>; 2],
    samples: u32,
    recover: Duration,
}

/// Runs phases 1–3 against a running daemon that has a backlog, sampling
/// every 200 ms during phases 1–2 and asserting as it goes; returns once
/// the daemon acknowledges again after phase 2.
async fn downstream_outage(
    env: &Env,
    daemon: &mut Daemon,
    s: &Sizes,
    n: u64,
    rabbit_queue: Option<&str>,
) -> OutageSeen {
    let mut seen = OutageSeen {
        max_broker_unacked: rabbit_queue.map(|_| 0),
        ..Default::default()
    };
    let mut last_broker_sample: Option<Instant> = None;
    env.sim.set_knobs(both_endpoints(0.5, 0.0));
    let began = Instant::now();
    let mut phase2: Option<Instant> = None;
    loop {
        let elapsed = began.elapsed();
        if elapsed >= s.downstream_errors + s.downstream_down {
            break;
        }
        if phase2.is_none() && elapsed >= s.downstream_errors {
            env.sim.set_knobs(both_endpoints(0.0, 1.0));
            phase2 = Some(Instant::now());
        }
        assert!(
            daemon.child.try_wait().expect("try_wait").is_none(),
            "the daemon exited during the downstream outage; log:\n{}",
            daemon.log_text()
        );
        let unacked_now = metric(daemon.http, "conveyor_unacked_messages")
            .await
            .expect("conveyor_unacked_messages exported");
        assert!(
            unacked_now <= f64::from(OUTAGE_PREFETCH),
            "conveyor_unacked_messages {unacked_now} > prefetch {OUTAGE_PREFETCH} \
             at {:.1} s into the outage",
            elapsed.as_secs_f64()
        );
        seen.max_unacked = seen.max_unacked.max(unacked_now);
        let dead = metric(daemon.http, "conveyor_dead_letters_total")
            .await
            .unwrap_or(0.0);
        assert_eq!(
            dead,
            0.0,
            "dead-lettered during the outage (retries_exhausted: {:?}) at {:.1} s; log:\n{}",
            metric(
                daemon.http,
                "conveyor_dead_letters_total{reason=\"retries_exhausted\"}"
            )
            .await,
            elapsed.as_secs_f64(),
            daemon.log_text()
        );
        if let Some(p2) = phase2 {
            for (i, name) in CIRCUITS.iter().enumerate() {
                if seen.opened[i].is_none() && metric(daemon.http, name).await == Some(2.0) {
                    seen.opened[i] = Some(p2.elapsed());
                }
            }
        }
        if let Some(queue) = rabbit_queue {
            if last_broker_sample.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                let broker = unacked(queue).await;
                assert!(
                    broker <= u64::from(OUTAGE_PREFETCH),
                    "RabbitMQ counts {broker} unacknowledged > prefetch {OUTAGE_PREFETCH} \
                     at {:.1} s into the outage",
                    elapsed.as_secs_f64()
                );
                seen.max_broker_unacked = seen.max_broker_unacked.max(Some(broker));
                last_broker_sample = Some(Instant::now());
            }
        }
        seen.samples += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        seen.opened.iter().any(Option::is_some),
        "no circuit seen open during the {:?} without answers ({} samples); log:\n{}",
        s.downstream_down,
        seen.samples,
        daemon.log_text()
    );
    let baseline = acked(daemon).await;
    env.sim.set_knobs(knobs());
    let healed = Instant::now();
    acks_again(daemon, baseline, "acks after the outage", limit(n)).await;
    seen.recover = healed.elapsed();
    println!(
        "downstream outage: max unacked {} (RabbitMQ's count: {:?}; prefetch {OUTAGE_PREFETCH}), \
         circuit first seen open {} s into phase 2 (rule_engine, payment), {} samples, \
         first ack {:.1} s after phase 2",
        seen.max_unacked,
        seen.max_broker_unacked,
        seen.opened
            .iter()
            .map(|o| o.map_or("never".to_string(), |d| format!("{:.1}", d.as_secs_f64())))
            .collect::<Vec<_>>()
            .join("/"),
        seen.samples,
        seen.recover.as_secs_f64()
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_downstream_outage_pauses_intake_and_dead_letters_nothing() {
    let s = sizes();
    let env = Env::new("chaosdown", knobs()).await;
    let gen = OrderGen::new(env.name.clone(), outage_mix());
    let n = s.orders;
    let (stored, _) = counts(&gen, n);
    env.publish((0..n).map(|i| body(&gen, i))).await;

    let mut daemon = Daemon::start(&env, &OUTAGE_VARS).await;
    wait_for("a quarter of the orders stored", limit(n), || async {
        env.rows().await >= stored / 4
    })
    .await;
    let seen = downstream_outage(&env, &mut daemon, &s, n, Some(&env.queue)).await;
    finish_rabbit(&env, &mut daemon, stored, n).await;
    let dead = env.drain_dlq().await;
    let reasons: Vec<_> = dead
        .iter()
        .map(|(h, _)| h.get("x-conveyor-reason").cloned().unwrap_or_default())
        .collect();
    assert!(dead.is_empty(), "dead letters, reasons {reasons:?}");
    verify(
        "rabbitmq_downstream_outage",
        &env,
        &gen,
        n,
        &[],
        seen.recover,
    )
    .await;
    env.cleanup().await;
}

on_both_brokers! {
    async fn kafka_downstream_outage_pauses_intake_and_dead_letters_nothing(backend: Backend) {
    let s = sizes();
    let env = Env::new("chaoskdown", knobs()).await;
    let broker = KafkaBroker::start(backend).await;
    let topic = format!("{}-orders", env.name);
    let dlq = format!("{topic}.dlq");
    broker.create_topic(&topic, PARTITIONS).await;
    broker.create_topic(&dlq, 1).await;
    let brokers = broker.bootstrap_servers();
    let group = format!("{}-group", env.name);
    let gen = OrderGen::new(env.name.clone(), outage_mix());
    let n = s.orders;
    let (stored, _) = counts(&gen, n);
    broker
        .produce(&topic, (0..n).map(|i| (gen.order_id(i), body(&gen, i))))
        .await;

    let mut vars = vec![
        ("CONVEYOR__SOURCE__KIND", "kafka"),
        ("CONVEYOR__KAFKA__BROKERS", brokers.as_str()),
        ("CONVEYOR__KAFKA__GROUP_ID", group.as_str()),
        ("CONVEYOR__KAFKA__TOPICS", topic.as_str()),
        ("CONVEYOR__KAFKA__COMMIT_INTERVAL", "200ms"),
        ("CONVEYOR__KAFKA__LAG_INTERVAL", "1s"),
    ];
    vars.extend(OUTAGE_VARS);
    let mut daemon = Daemon::start(&env, &vars).await;
    wait_for("a quarter of the orders stored", limit(n), || async {
        env.rows().await >= stored / 4
    })
    .await;
    let seen = downstream_outage(&env, &mut daemon, &s, n, None).await;
    wait_for("every order stored", limit(n), || async {
        env.rows().await == stored
    })
    .await;
    wait_for(
        "offsets committed to the log end",
        Duration::from_secs(60),
        || async {
            let offsets = broker.committed_and_end(&group, &topic, PARTITIONS).await;
            offsets.len() == PARTITIONS as usize && offsets.iter().all(|(c, end)| c == end)
        },
    )
    .await;
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "drain; log:\n{}", daemon.log_text());
    let dead = kafka_dead_letters(&brokers, &dlq, &gen);
    assert!(dead.is_empty(), "{} dead letters", dead.len());
    verify(
        &format!("kafka_downstream_outage_{}", backend.name()),
        &env,
        &gen,
        n,
        &dead,
        seen.recover,
    )
    .await;
    env.cleanup().await;
}
}
