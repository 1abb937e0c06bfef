//! One supervision tree: when `conveyor::run` returns — here at the drain
//! deadline, with orders still inside a stage — none of the tasks it
//! spawned is left running in the caller's runtime, and on Kafka its
//! consumer is gone with it (librdkafka's threads stopped).
//!
//! The stuck downstream is a socket on a plain thread that accepts and
//! never answers, so nothing of it lives in the runtime being counted.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{wait_for, Backend, Env, InProcess, KafkaBroker};
use conveyor::config::{Config, SourceKind};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::Knobs;

/// A downstream that accepts connections and never answers; its URL.
fn black_hole() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    format!("http://{addr}")
}

/// Orders in the validate stage, read over a connection that is closed
/// at once (a pooled one would be a task of this runtime left alive).
async fn validating(addr: std::net::SocketAddr) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let Ok(r) = client.get(format!("http://{addr}/metrics")).send().await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("conveyor_stage_in_flight{stage=\"validate\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// librdkafka's threads in this process (`rdk:main`, `rdk:broker…`).
fn rdkafka_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("rdk:"))
        })
        .count()
}

/// The rule engine never answers, the drain deadline is one second.
fn stuck(mut c: Config) -> Config {
    c.rule_engine.url = black_hole();
    c.rule_engine.timeout = Duration::from_secs(120);
    c.rule_engine.retry.max_elapsed = Duration::from_secs(600);
    c.shutdown.drain_timeout = Duration::from_secs(1);
    c
}

/// Runs `config` until orders sit in the validate stage, stops it, and
/// checks that the run was cut by the deadline and left no task behind.
async fn cut_at_the_deadline(config: Config, orders: u64) {
    let baseline = alive_tasks();
    let daemon = InProcess::start(config).await;
    let addr = daemon.addr;
    wait_for(
        "orders waiting on the rule engine",
        Duration::from_secs(60),
        || async { validating(addr).await > 0.0 },
    )
    .await;
    assert!(alive_tasks() > baseline, "the run has tasks of its own");
    let report = daemon.stop().await;
    assert!(!report.drained, "the deadline cut the drain: {report:?}");
    assert_eq!(report.acked, 0, "{report:?} (of {orders})");
    // Aborted tasks end when the runtime next drops them; lapin's heartbeat
    // task sees its connection closed at its next tick, half the negotiated
    // heartbeat (1 s of 2 s here, see the RabbitMQ test): that, not more.
    let returned = Instant::now();
    while alive_tasks() > baseline && returned.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // At most: the test's own tasks (its publishing connection) may have
    // ended meanwhile.
    let alive = alive_tasks();
    assert!(
        alive <= baseline,
        "{alive} tasks alive against {baseline} before the run, {:?} after it returned",
        returned.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outlives_a_run_cut_by_the_drain_deadline_on_rabbitmq() {
    let env = Env::new("sup_rabbit", Knobs::default()).await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    env.publish((0..20).map(|i| gen.message(i).1)).await;
    let mut c = stuck(env.config());
    // lapin ends a closed connection's heartbeat task only when it next
    // wakes, half the heartbeat later (30 s at RabbitMQ's default of 60).
    c.rabbitmq.url = format!("{}?heartbeat=2", c.rabbitmq.url);
    cut_at_the_deadline(c, 20).await;
    // Nothing was acknowledged: the broker holds every message again.
    wait_for(
        "all 20 back in the queue",
        Duration::from_secs(20),
        || async { env.ready(&env.queue).await == 20 },
    )
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outlives_a_run_cut_by_the_drain_deadline_on_kafka() {
    let env = Env::new("sup_kafka", Knobs::default()).await;
    let broker = KafkaBroker::start(Backend::Mock).await;
    let topic = format!("{}-orders", env.name);
    broker.create_topic(&topic, 2).await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    broker
        .produce(&topic, (0..20).map(|i| (gen.order_id(i), gen.message(i).1)))
        .await;
    let mut c = stuck(env.config());
    c.source.kind = SourceKind::Kafka;
    c.kafka.brokers = broker.bootstrap_servers();
    c.kafka.group_id = format!("{}-group", env.name);
    c.kafka.topics = vec![topic.clone()];
    c.kafka
        .properties
        .insert("session.timeout.ms".into(), "6000".into());
    // The test's own producer winds its threads down after it is dropped:
    // count once that has settled.
    let mut threads = rdkafka_threads();
    let settling = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = rdkafka_threads();
        if now == threads || settling.elapsed() > Duration::from_secs(10) {
            break;
        }
        threads = now;
    }
    cut_at_the_deadline(c, 20).await;
    let returned = Instant::now();
    while rdkafka_threads() > threads && returned.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = rdkafka_threads();
    assert!(
        left <= threads,
        "the consumer's librdkafka threads are gone: {left} against {threads} before the run"
    );
    env.cleanup().await;
}
