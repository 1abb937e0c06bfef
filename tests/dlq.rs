//! `conveyor dlq` on the real RabbitMQ (and, in `dlq_kafka.rs`, on both
//! Kafka brokers): stats and listings by reason, filtered replays that
//! move messages back to the source queue, poison that comes back to the
//! dead letters through the daemon, purge behind a confirmation, and a
//! replay killed with -9 that loses nothing.

mod common;
mod tools_support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{metric, wait_for, Env, InProcess};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::Knobs;
use tools_support::{
    dead_letter_headers, order_id, rabbit_put, rabbit_take_all, run_cli, ChildProc,
};

fn cli_env(env: &Env) -> Vec<(String, String)> {
    vec![
        ("CONVEYOR__RABBITMQ__QUEUE".into(), env.queue.clone()),
        ("CONVEYOR__DATABASE__URL".into(), env.db_url.clone()),
    ]
}

async fn declare(env: &Env) {
    let c = conveyor::tools::produce::connect_rabbit(&env.rabbit())
        .await
        .expect("declare the topology");
    c.close(200, "done".into()).await.ok();
}

fn dlq(env: &Env) -> String {
    format!("{}.dlq", env.queue)
}

/// `good` valid orders dead-lettered as retries_exhausted (a downstream
/// outage), then `bad` poison ones as malformed_json.
async fn fill(env: &Env, gen: &OrderGen, good: u64, bad: u64) {
    let mut letters = Vec::new();
    for i in 0..good {
        let id = gen.order_id(i);
        let at = format!("2026-11-22T10:{:02}:00+00:00", i % 60);
        letters.push((
            dead_letter_headers("retries_exhausted", "charge", &id, &at),
            gen.message(i).1,
        ));
    }
    for j in 0..bad {
        let id = format!("{}-poison-{j}", env.name);
        let body = format!("{{\"order_id\": \"{id}\", \"currency\": 7}}").into_bytes();
        letters.push((
            dead_letter_headers("schema", "decode", &id, "2026-11-22T12:00:00+00:00"),
            body,
        ));
    }
    rabbit_put(&dlq(env), letters).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_list_replay_and_purge_on_rabbitmq() {
    let env = Env::new("dlq_rabbit", Knobs::default()).await;
    declare(&env).await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    fill(&env, &gen, 30, 5).await;
    let e = cli_env(&env);

    let (code, out, err) = run_cli(&["dlq", "stats", "--json"], &e);
    assert_eq!(code, Some(0), "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    assert_eq!(stats["total"], 35);
    assert_eq!(stats["by_reason"]["retries_exhausted"]["charge"], 30);
    assert_eq!(stats["by_reason"]["schema"]["decode"], 5);
    assert_eq!(stats["oldest"], "2026-11-22T10:00:00Z");
    assert_eq!(stats["newest"], "2026-11-22T12:00:00Z");
    assert_eq!(env.ready(&dlq(&env)).await, 35, "stats removes nothing");

    // Listings: filtered by reason, time and order id, headers included.
    let (_, out, _) = run_cli(
        &[
            "dlq",
            "list",
            "--json",
            "--reason",
            "retries_exhausted",
            "--since",
            "2026-11-22T10:10:00Z",
            "--until",
            "2026-11-22T10:20:00Z",
        ],
        &e,
    );
    let listed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(listed.len(), 10);
    assert!(listed
        .iter()
        .all(|m| m["headers"]["x-conveyor-stage"] == "charge"));
    let one = gen.order_id(3);
    let (_, out, _) = run_cli(&["dlq", "show", "--order-id", &one], &e);
    assert!(
        out.contains("x-conveyor-reason: retries_exhausted"),
        "{out}"
    );
    assert!(out.contains(&format!("\"order_id\":\"{one}\"")), "{out}");

    // Dry run, then a limited replay: only those leave.
    let (code, out, _) = run_cli(
        &[
            "dlq",
            "replay",
            "--dry-run",
            "--reason",
            "retries_exhausted",
        ],
        &e,
    );
    assert_eq!(code, Some(0));
    assert!(out.contains("would replay 30 of 35"), "{out}");
    assert_eq!(env.ready(&dlq(&env)).await, 35);
    assert_eq!(env.ready(&env.queue).await, 0);
    let (code, out, err) = run_cli(
        &[
            "dlq",
            "replay",
            "--reason",
            "retries_exhausted",
            "--limit",
            "10",
        ],
        &e,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("replayed 10 of 35"), "{out}");
    assert_eq!(env.ready(&dlq(&env)).await, 25);
    assert_eq!(env.ready(&env.queue).await, 10);

    // The rest, poison included, paced: the daemon stores the valid ones and
    // sends the poison back to the dead letters with its reason.
    let started = std::time::Instant::now();
    let (code, out, err) = run_cli(&["dlq", "replay", "--rate", "50"], &e);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("replayed 25 of 25"), "{out}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "--rate paces the replay"
    );
    assert_eq!(env.ready(&dlq(&env)).await, 0);
    let daemon = InProcess::start(env.config()).await;
    let addr = daemon.addr;
    wait_for("35 acked", Duration::from_secs(60), || async {
        metric(addr, "conveyor_messages_acked_total")
            .await
            .unwrap_or(0.0)
            >= 35.0
    })
    .await;
    daemon.stop().await;
    assert_eq!(env.rows().await, 30);
    let back = rabbit_take_all(&dlq(&env)).await;
    assert_eq!(back.len(), 5, "the poison is back");
    assert!(back.iter().all(|(h, _)| h["x-conveyor-reason"] == "schema"));
    rabbit_put(
        &dlq(&env),
        back.into_iter()
            .map(|(h, b)| {
                let h: Vec<(&str, String)> = vec![
                    ("x-conveyor-reason", h["x-conveyor-reason"].clone()),
                    ("x-conveyor-stage", "decode".into()),
                ];
                (h, b)
            })
            .collect(),
    )
    .await;

    // Purge asks first: without a terminal and without --yes it refuses.
    let (code, _, err) = run_cli(&["dlq", "purge", "--reason", "schema"], &e);
    assert_ne!(code, Some(0));
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(env.ready(&dlq(&env)).await, 5);
    let (code, out, _) = run_cli(&["dlq", "purge", "--reason", "schema", "--dry-run"], &e);
    assert_eq!(code, Some(0));
    assert!(out.contains("would purge 5 of 5"), "{out}");
    let (code, out, err) = run_cli(&["dlq", "purge", "--reason", "schema", "--yes"], &e);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("purged 5 of 5"), "{out}");
    assert_eq!(env.ready(&dlq(&env)).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_mid_run_on_rabbitmq_loses_nothing() {
    let env = Env::new("dlq_kill", Knobs::default()).await;
    declare(&env).await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    let n = 2000u64;
    fill(&env, &gen, n, 0).await;
    let all: HashSet<String> = (0..n).map(|i| gen.order_id(i)).collect();

    let child = ChildProc::spawn(
        &["dlq", "replay", "--rate", "1000"],
        &cli_env(&env),
        "dlq-kill",
    );
    wait_for(
        "part of the replay done",
        Duration::from_secs(20),
        || async { env.ready(&env.queue).await >= 300 },
    )
    .await;
    child.signal(nix::sys::signal::Signal::SIGKILL);
    drop(child);
    // Whatever the replay held unacknowledged is back in the DLQ.
    wait_for(
        "the killed connection's messages requeued",
        Duration::from_secs(10),
        || async { env.ready(&dlq(&env)).await + env.ready(&env.queue).await >= n as u32 },
    )
    .await;
    let in_dlq = rabbit_take_all(&dlq(&env)).await;
    let replayed = rabbit_take_all(&env.queue).await;
    assert!(
        !replayed.is_empty() && in_dlq.len() < n as usize,
        "killed mid-run"
    );
    let mut seen: HashMap<String, u32> = HashMap::new();
    for (_, body) in in_dlq.iter().chain(&replayed) {
        *seen.entry(order_id(body).expect("order id")).or_default() += 1;
    }
    let found: HashSet<String> = seen.keys().cloned().collect();
    assert_eq!(found, all, "every dead letter is still there or replayed");
    let twice = seen.values().filter(|&&c| c > 1).count();
    assert!(
        twice <= 1,
        "at most the message in hand is in both places ({twice})"
    );
    let replayed_ids: HashSet<String> = replayed.iter().filter_map(|(_, b)| order_id(b)).collect();
    for (h, _) in &replayed {
        assert_eq!(h.get("x-conveyor-replays").map(String::as_str), Some("1"));
    }
    println!(
        "killed replay: {} replayed, {} still dead-lettered",
        replayed_ids.len(),
        in_dlq.len()
    );
    env.cleanup().await;
}
