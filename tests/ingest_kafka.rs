//! `conveyor ingest` on a Kafka source, with the real PostgreSQL, on both
//! brokers (`NAME::mock`: librdkafka's mock cluster held by the test
//! process; `NAME::tansu`: a tansu broker the test starts): a 202 means
//! every accepted order is acknowledged by the broker (the ingest process
//! is killed with -9 right after it, and the topic holds them all); the
//! broker unreachable is a 503 with `Retry-After` and nothing accepted; a
//! kill -9 mid-request gives no 202 and a resubmission, consumed by `run`,
//! stores each order exactly once.

mod common;
mod tools_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{metric, wait_for, Backend, Env, InProcess, KafkaBroker};
use conveyor::config::{Config, SourceKind};
use conveyor::tools::ingest::BatchAnswer;
use conveyor::tools::produce::{Intent, Mix, OrderGen};
use conveyor::tools::sim::Knobs;
use nix::sys::signal::Signal;
use tools_support::kafka::{kafka_cli_env, kafka_read_all};
use tools_support::{free_port, ingest_config, ndjson, post, ChildProc, Ingest};

const NDJSON: &str = "application/x-ndjson";
const PARTITIONS: i32 = 4;

fn group(env: &Env) -> String {
    format!("{}-group", env.name)
}

/// The daemon's (and an in-process ingest's) configuration on `topic`.
fn kafka_config(env: &Env, broker: &KafkaBroker, topic: &str) -> Config {
    let mut c = env.config();
    c.source.kind = SourceKind::Kafka;
    c.kafka.brokers = broker.bootstrap_servers();
    c.kafka.group_id = group(env);
    c.kafka.topics = vec![topic.to_string()];
    c.kafka.commit_interval = Duration::from_millis(200);
    c.kafka.lag_interval = Duration::from_millis(200);
    c.kafka
        .properties
        .insert("session.timeout.ms".into(), "6000".into());
    c
}

/// An `ingest` child process on `topic`, listening on `port`, with at most
/// `window` produces unacknowledged.
fn spawn_ingest(
    env: &Env,
    broker: &KafkaBroker,
    topic: &str,
    port: u16,
    window: usize,
    tag: &str,
) -> ChildProc {
    let mut vars = kafka_cli_env(
        &common::kafka_daemon_config_file(env),
        &broker.bootstrap_servers(),
        topic,
        &group(env),
        &env.db_url,
    );
    vars.extend([
        (
            "CONVEYOR__INGEST__LISTEN".into(),
            format!("127.0.0.1:{port}"),
        ),
        (
            "CONVEYOR__INGEST__PUBLISH_WINDOW".into(),
            window.to_string(),
        ),
        ("CONVEYOR__INGEST__PUBLISH_TIMEOUT".into(), "60s".into()),
        ("CONVEYOR__SHUTDOWN__DRAIN_TIMEOUT".into(), "30s".into()),
    ]);
    ChildProc::spawn(&["ingest"], &vars, tag)
}

fn local(port: u16) -> std::net::SocketAddr {
    format!("127.0.0.1:{port}").parse().expect("addr")
}

/// The order ids on the topic (keys), one entry per record.
async fn ids_on(broker: &KafkaBroker, topic: &str) -> Vec<String> {
    kafka_read_all(&broker.bootstrap_servers(), topic)
        .await
        .into_iter()
        .map(|r| r.key.expect("a keyed record"))
        .collect()
}

/// Runs the daemon in-process until `n` messages are acked and the lag is
/// 0, then drains it.
async fn consume(config: Config, n: u64) -> conveyor::Report {
    let daemon = InProcess::start(config).await;
    let addr = daemon.addr;
    wait_for(
        "every message acked and committed",
        Duration::from_secs(120),
        || async {
            metric(addr, "conveyor_messages_acked_total")
                .await
                .unwrap_or(0.0)
                >= n as f64
                && metric(addr, "conveyor_kafka_consumer_lag_messages").await == Some(0.0)
        },
    )
    .await;
    daemon.stop().await
}

on_both_brokers! {
    async fn a_202_means_every_accepted_order_is_acknowledged_on_the_topic(backend: Backend) {
    let env = Env::new("ingk_ok", Knobs::default()).await;
    let broker = KafkaBroker::start(backend).await;
    let topic = format!("{}-orders", env.name);
    broker.create_topic(&topic, PARTITIONS).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 10.0,
            ..Mix::default()
        },
    );
    let n = 1000u64;
    let port = free_port();
    let child = spawn_ingest(&env, &broker, &topic, port, 1000, "ingk-ok");
    tools_support::wait_ready(local(port), true).await;
    let r = post(
        &format!("http://{}/orders/batch", local(port)),
        ndjson(&gen, 0..n),
        NDJSON,
    )
    .await;
    assert_eq!(r.status(), 202, "{}", child.log_text());
    let answer: BatchAnswer = r.json().await.expect("answer");
    // Killed the instant the answer is in: nothing it still held could
    // reach the broker now.
    child.signal(Signal::SIGKILL);
    drop(child);
    let poison: Vec<usize> = (0..n)
        .filter(|&i| gen.intent(i) == Intent::Poison)
        .map(|i| i as usize)
        .collect();
    assert!(!poison.is_empty());
    assert_eq!(
        answer.rejected.iter().map(|r| r.index).collect::<Vec<_>>(),
        poison
    );
    assert_eq!(answer.accepted, n as usize - poison.len());
    let want: HashSet<String> = (0..n)
        .filter(|&i| gen.intent(i) != Intent::Poison)
        .map(|i| gen.order_id(i))
        .collect();
    let on_topic = ids_on(&broker, &topic).await;
    assert_eq!(on_topic.len(), answer.accepted, "one record per accepted order");
    assert_eq!(on_topic.into_iter().collect::<HashSet<_>>(), want);

    let report = consume(kafka_config(&env, &broker, &topic), answer.accepted as u64).await;
    assert_eq!(report.dead_lettered, 0, "nothing ingest accepted is poison to run");
    assert_eq!(env.rows().await as usize, answer.accepted);
    env.check_ledger().await;
    env.cleanup().await;
}
}

on_both_brokers! {
    /// The broker taken away in two ways (see [`KafkaBroker::set_reachable`]):
    /// the mock cluster refuses connections, tansu hangs. Either way a batch
    /// in the gap before ingest notices waits for its acknowledgements at
    /// most `ingest.publish_timeout`, then one noticed is refused at once.
    async fn the_broker_unreachable_is_a_503_with_retry_after_and_nothing_accepted(backend: Backend) {
    let env = Env::new("ingk_down", Knobs::default()).await;
    let broker = KafkaBroker::start(backend).await;
    let topic = format!("{}-orders", env.name);
    broker.create_topic(&topic, PARTITIONS).await;
    let mut config = ingest_config(kafka_config(&env, &broker, &topic));
    config.ingest.publish_timeout = Duration::from_secs(2);
    let ingest = Ingest::start(config, true).await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    let url = ingest.url("/orders/batch");
    let r = post(&url, ndjson(&gen, 0..10), NDJSON).await;
    assert_eq!(r.status(), 202);

    broker.set_reachable(false);
    let refused = |r: reqwest::Response| async move {
        let status = r.status();
        let retry_after = r.headers().get("retry-after").cloned();
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(status, 503, "{body}");
        assert!(retry_after.is_some(), "503 carries Retry-After");
        assert_eq!(body["accepted"], 0, "{body}");
    };
    let started = Instant::now();
    refused(post(&url, ndjson(&gen, 10..20), NDJSON).await).await;
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    ingest.wait_ready(false).await;
    let started = Instant::now();
    refused(post(&url, ndjson(&gen, 20..30), NDJSON).await).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "known unreachable: refused at once ({:?})",
        started.elapsed()
    );

    // Back: ingest is ready again by itself, and a client that resubmits
    // after each Retry-After gets its batch in. (On the mock cluster the
    // first produces after its broker comes back can still go unanswered
    // for a few seconds, readiness dipping once more meanwhile: 503s, with
    // nothing accepted, that the client rides out.)
    broker.set_reachable(true);
    ingest.wait_ready(true).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer: BatchAnswer = loop {
        let r = post(&url, ndjson(&gen, 30..40), NDJSON).await;
        if r.status() == 202 {
            break r.json().await.expect("answer");
        }
        let wait = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(body["accepted"], 0, "{body}");
        let wait = wait.expect("a 503 carries Retry-After");
        assert!(Instant::now() < deadline, "still refused 30 s after the broker came back: {body}");
        tokio::time::sleep(Duration::from_secs(wait)).await;
    };
    assert_eq!(answer.accepted, 10);
    ingest.stop().await.expect("stopped cleanly");
    let on_topic: HashSet<String> = ids_on(&broker, &topic).await.into_iter().collect();
    for i in (0..10).chain(30..40) {
        assert!(on_topic.contains(&gen.order_id(i)), "accepted order {i} on the topic");
    }
    env.cleanup().await;
}
}

on_both_brokers! {
    async fn kill_9_mid_request_gives_no_202_and_a_resubmission_stores_each_order_once(backend: Backend) {
    let env = Env::new("ingk_kill", Knobs::default()).await;
    let broker = KafkaBroker::start(backend).await;
    let topic = format!("{}-orders", env.name);
    broker.create_topic(&topic, PARTITIONS).await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    let n = 5000u64;
    let body = ndjson(&gen, 0..n);

    // One produce unacknowledged at a time: the batch takes long enough
    // to be caught in the middle.
    let port = free_port();
    let child = spawn_ingest(&env, &broker, &topic, port, 1, "ingk-kill");
    tools_support::wait_ready(local(port), true).await;
    let request = tokio::spawn(post_status(
        format!("http://{}/orders/batch", local(port)),
        body.clone(),
    ));
    let brokers = broker.bootstrap_servers();
    wait_for("part of the batch on the topic", Duration::from_secs(20), || async {
        common::kafka_committed_and_end(&brokers, "probe", &topic, PARTITIONS)
            .await
            .iter()
            .map(|(_, end)| end)
            .sum::<i64>()
            > 0
    })
    .await;
    child.signal(Signal::SIGKILL);
    let outcome = request.await.expect("join");
    assert_ne!(outcome, Ok(202), "no 202 from a killed ingest");
    drop(child);
    let before = ids_on(&broker, &topic).await.len() as u64;
    assert!(before > 0 && before < n, "killed mid-batch: {before} of {n} on the topic");

    let port = free_port();
    let child = spawn_ingest(&env, &broker, &topic, port, 1000, "ingk-retry");
    tools_support::wait_ready(local(port), true).await;
    let r = post(&format!("http://{}/orders/batch", local(port)), body, NDJSON).await;
    assert_eq!(r.status(), 202, "{}", child.log_text());
    let answer: BatchAnswer = r.json().await.expect("answer");
    assert_eq!(answer.accepted as u64, n);
    drop(child);

    let total = ids_on(&broker, &topic).await.len() as u64;
    assert_eq!(total, before + n);
    let report = consume(kafka_config(&env, &broker, &topic), total).await;
    assert_eq!(env.rows().await as u64, n, "each order stored exactly once");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert_eq!(report.acked, total, "{report:?}");
    env.check_ledger().await;
    env.cleanup().await;
}
}

async fn post_status(url: String, body: Vec<u8>) -> Result<u16, String> {
    reqwest::Client::new()
        .post(url)
        .header("content-type", NDJSON)
        .body(body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}
