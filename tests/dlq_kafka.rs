//! `conveyor dlq` on a Kafka dead-letter topic, with the real PostgreSQL,
//! on both brokers (`NAME::mock`, `NAME::tansu`; the `dlq` child processes
//! reach the mock cluster held by the test process over loopback):
//! stats, listings and show by reason; replays, filtered and limited, that
//! move dead letters back to the source topic while `run` consumes it — a
//! replayed order stored meanwhile is a no-op, a still-poison one comes
//! back with its reason —; purge behind a confirmation; and a replay
//! killed with -9 that loses nothing.

mod common;
mod tools_support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{metric, wait_for, Backend, Env, InProcess, KafkaBroker};
use conveyor::config::{Config, SourceKind};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::Knobs;
use nix::sys::signal::Signal;
use tools_support::kafka::{kafka_cli_env, kafka_put, kafka_read_all, KafkaLetter};
use tools_support::{dead_letter_headers, order_id, ChildProc};

const PARTITIONS: i32 = 4;
/// How often a Kafka replay commits its group's offsets (`COMMIT_EVERY` in
/// src/tools/dlq/kafka.rs): at most this many are both replayed and still
/// there after a kill.
const COMMIT_EVERY: usize = 100;

struct World {
    env: Env,
    broker: KafkaBroker,
    topic: String,
}

impl World {
    async fn new(tag: &str, backend: Backend) -> Self {
        let env = Env::new(tag, Knobs::default()).await;
        let broker = KafkaBroker::start(backend).await;
        let topic = format!("{}-orders", env.name);
        broker.create_topic(&topic, PARTITIONS).await;
        broker.create_topic(&self_dlq(&topic), PARTITIONS).await;
        Self { env, broker, topic }
    }

    fn dlq(&self) -> String {
        self_dlq(&self.topic)
    }

    fn brokers(&self) -> String {
        self.broker.bootstrap_servers()
    }

    fn cli_env(&self) -> Vec<(String, String)> {
        kafka_cli_env(
            &common::kafka_daemon_config_file(&self.env),
            &self.brokers(),
            &self.topic,
            &format!("{}-group", self.env.name),
            &self.env.db_url,
        )
    }

    /// Runs `conveyor ARGS` to its end off the async workers.
    async fn cli(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env = self.cli_env();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            tools_support::run_cli(&args, &env)
        })
        .await
        .expect("join the CLI")
    }

    async fn stats(&self) -> serde_json::Value {
        let (code, out, err) = self.cli(&["dlq", "stats", "--json"]).await;
        assert_eq!(code, Some(0), "{err}");
        serde_json::from_str(&out).expect("stats json")
    }

    /// `dlq list --json`: the dead letters not yet replayed.
    async fn listed(&self, extra: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["dlq", "list", "--json"];
        args.extend_from_slice(extra);
        let (code, out, err) = self.cli(&args).await;
        assert_eq!(code, Some(0), "{err}");
        out.lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }

    fn config(&self) -> Config {
        let mut c = self.env.config();
        c.source.kind = SourceKind::Kafka;
        c.kafka.brokers = self.brokers();
        c.kafka.group_id = format!("{}-group", self.env.name);
        c.kafka.topics = vec![self.topic.clone()];
        c.kafka.commit_interval = Duration::from_millis(200);
        c.kafka.lag_interval = Duration::from_millis(200);
        c.kafka
            .properties
            .insert("session.timeout.ms".into(), "6000".into());
        c
    }
}

fn self_dlq(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// `good` valid orders dead-lettered as retries_exhausted (a downstream
/// outage; failed 10:00, 10:01, …), then `bad` poison ones as schema.
fn letters<'a>(name: &str, gen: &OrderGen, good: u64, bad: u64) -> Vec<KafkaLetter<'a>> {
    let mut out = Vec::new();
    for i in 0..good {
        let id = gen.order_id(i);
        let at = format!("2026-11-22T10:{:02}:00+00:00", i % 60);
        out.push((
            id.clone(),
            dead_letter_headers("retries_exhausted", "charge", &id, &at),
            gen.message(i).1,
        ));
    }
    for j in 0..bad {
        let id = format!("{name}-poison-{j}");
        let body = format!("{{\"order_id\": \"{id}\", \"currency\": 7}}").into_bytes();
        out.push((
            id.clone(),
            dead_letter_headers("schema", "decode", &id, "2026-11-22T12:00:00+00:00"),
            body,
        ));
    }
    out
}

on_both_brokers! {
    async fn stats_list_show_replay_and_purge_on_a_kafka_dead_letter_topic(backend: Backend) {
    let w = World::new("dlqk", backend).await;
    let gen = OrderGen::new(w.env.name.clone(), Mix::default());
    kafka_put(&w.brokers(), &w.dlq(), letters(&w.env.name, &gen, 30, 5)).await;
    // Five of the dead-lettered orders get through on their own first
    // (as after a redelivery): their replays must change nothing.
    w.broker
        .produce(&w.topic, (0..5).map(|i| (gen.order_id(i), gen.message(i).1)))
        .await;
    let daemon = InProcess::start(w.config()).await;
    let addr = daemon.addr;
    wait_for("the five stored", Duration::from_secs(60), || async {
        w.env.rows().await == 5
    })
    .await;

    let stats = w.stats().await;
    assert_eq!(stats["total"], 35, "{stats}");
    assert_eq!(stats["by_reason"]["retries_exhausted"]["charge"], 30);
    assert_eq!(stats["by_reason"]["schema"]["decode"], 5);
    assert_eq!(stats["oldest"], "2026-11-22T10:00:00Z");
    assert_eq!(stats["newest"], "2026-11-22T12:00:00Z");

    let listed = w
        .listed(&[
            "--reason",
            "retries_exhausted",
            "--since",
            "2026-11-22T10:10:00Z",
            "--until",
            "2026-11-22T10:20:00Z",
        ])
        .await;
    assert_eq!(listed.len(), 10);
    assert!(listed.iter().all(|m| m["headers"]["x-conveyor-stage"] == "charge"));
    assert!(listed.iter().all(|m| m["position"]
        .as_str()
        .is_some_and(|p| p.starts_with(&format!("{}/", w.dlq())))));
    let one = gen.order_id(3);
    let (_, out, _) = w.cli(&["dlq", "show", "--order-id", &one]).await;
    assert!(out.contains("x-conveyor-reason: retries_exhausted"), "{out}");
    assert!(out.contains(&format!("\"order_id\":\"{one}\"")), "{out}");

    let (code, out, _) = w
        .cli(&["dlq", "replay", "--dry-run", "--reason", "retries_exhausted"])
        .await;
    assert_eq!(code, Some(0));
    assert!(out.contains("would replay 30 of 35"), "{out}");
    assert_eq!(w.stats().await["total"], 35, "a dry run moves nothing");
    let (code, out, err) = w
        .cli(&["dlq", "replay", "--reason", "retries_exhausted", "--limit", "10"])
        .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("replayed 10 of 35"), "{out}");
    let stats = w.stats().await;
    assert_eq!(stats["total"], 25, "{stats}");
    assert_eq!(stats["by_reason"]["schema"]["decode"], 5, "the others stay");

    let (code, out, err) = w.cli(&["dlq", "replay", "--rate", "50"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("replayed 25 of 25"), "{out}");
    // 5 originals + 35 replayed.
    wait_for("every replayed message acked", Duration::from_secs(60), || async {
        metric(addr, "conveyor_messages_acked_total").await.unwrap_or(0.0) >= 40.0
    })
    .await;
    let report = daemon.stop().await;
    assert_eq!(w.env.rows().await, 30);
    assert_eq!(report.duplicates, 5, "replays of stored orders are no-ops: {report:?}");
    assert_eq!(report.dead_lettered, 5, "{report:?}");
    w.env.check_ledger().await;
    let replayed = kafka_read_all(&w.brokers(), &w.topic).await;
    assert_eq!(
        replayed
            .iter()
            .filter(|r| r.headers.get("x-conveyor-replays").map(String::as_str) == Some("1"))
            .count(),
        35,
        "replays are marked"
    );

    // The poison is back, with its reason, and nothing else.
    let stats = w.stats().await;
    assert_eq!(stats["total"], 5, "{stats}");
    assert_eq!(stats["by_reason"]["schema"]["decode"], 5, "{stats}");

    let (code, _, err) = w.cli(&["dlq", "purge", "--reason", "schema"]).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("--yes"), "{err}");
    let (code, out, _) = w.cli(&["dlq", "purge", "--reason", "schema", "--dry-run"]).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("would purge 5 of 5"), "{out}");
    assert_eq!(w.stats().await["total"], 5);
    let (code, out, err) = w.cli(&["dlq", "purge", "--reason", "schema", "--yes"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("purged 5 of 5"), "{out}");
    assert_eq!(w.stats().await["total"], 0);
    w.env.cleanup().await;
}
}

on_both_brokers! {
    async fn a_replay_killed_mid_run_on_kafka_loses_nothing(backend: Backend) {
    let w = World::new("dlqk_kill", backend).await;
    let gen = OrderGen::new(w.env.name.clone(), Mix::default());
    let n = 2000u64;
    kafka_put(&w.brokers(), &w.dlq(), letters(&w.env.name, &gen, n, 0)).await;
    let all: HashSet<String> = (0..n).map(|i| gen.order_id(i)).collect();

    let child = ChildProc::spawn(&["dlq", "replay", "--rate", "1000"], &w.cli_env(), "dlqk-kill");
    let (brokers, topic) = (w.brokers(), w.topic.clone());
    wait_for("part of the replay done", Duration::from_secs(30), || async {
        common::kafka_committed_and_end(&brokers, "probe", &topic, PARTITIONS)
            .await
            .iter()
            .map(|(_, end)| end)
            .sum::<i64>()
            >= 300
    })
    .await;
    child.signal(Signal::SIGKILL);
    drop(child);

    // Still there: what the replay group has not committed past.
    let still: Vec<String> = w
        .listed(&[])
        .await
        .iter()
        .map(|m| m["headers"]["x-conveyor-order-id"].as_str().expect("id").to_string())
        .collect();
    let replayed = kafka_read_all(&w.brokers(), &w.topic).await;
    assert!(
        !replayed.is_empty() && still.len() < n as usize,
        "killed mid-run: {} replayed, {} still there",
        replayed.len(),
        still.len()
    );
    let mut seen: HashMap<String, usize> = HashMap::new();
    for id in still
        .iter()
        .cloned()
        .chain(replayed.iter().map(|r| order_id(&r.body).expect("order id")))
    {
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<HashSet<_>>(),
        all,
        "every dead letter is still there or replayed"
    );
    let twice = seen.values().filter(|&&c| c > 1).count();
    assert!(
        twice <= COMMIT_EVERY,
        "at most the uncommitted stretch is in both places ({twice})"
    );
    assert!(replayed
        .iter()
        .all(|r| r.headers.get("x-conveyor-replays").map(String::as_str) == Some("1")));
    println!(
        "killed replay ({}): {} replayed, {} still dead-lettered, {twice} in both",
        backend.name(),
        replayed.len(),
        still.len()
    );

    // Run again, it finishes the job: the topic then has every order.
    let (code, out, err) = w.cli(&["dlq", "replay"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&format!("replayed {} of {}", still.len(), still.len())), "{out}");
    assert_eq!(w.stats().await["total"], 0);
    let replayed: HashSet<String> = kafka_read_all(&w.brokers(), &w.topic)
        .await
        .iter()
        .map(|r| order_id(&r.body).expect("order id"))
        .collect();
    assert_eq!(replayed, all);
    w.env.cleanup().await;
}
}
