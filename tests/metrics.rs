//! The Prometheus exposition of a live daemon after real traffic passes
//! `promtool check metrics`, carries every family the README promises, and
//! the health endpoints answer.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_for, Daemon, Env};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::Knobs;
use nix::sys::signal::Signal;

const FAMILIES: &[&str] = &[
    "conveyor_messages_received_total",
    "conveyor_messages_acked_total",
    "conveyor_orders_total",
    "conveyor_dead_letters_total",
    "conveyor_stage_in_flight",
    "conveyor_stage_duration_seconds",
    "conveyor_downstream_requests_total",
    "conveyor_downstream_retries_total",
    "conveyor_circuit_state",
    "conveyor_circuit_openings_total",
    "conveyor_batch_orders",
    "conveyor_batch_commit_duration_seconds",
    "conveyor_batch_commit_retries_total",
    "conveyor_unacked_messages",
    "conveyor_prefetch_limit",
    "conveyor_prefetch_consumer_swaps_total",
    "conveyor_oldest_unacked_age_seconds",
    "conveyor_end_to_end_latency_seconds",
    "conveyor_rabbitmq_queue_messages",
    "conveyor_ready",
    "conveyor_broker_errors_total",
    "conveyor_runtime_workers",
    "conveyor_runtime_alive_tasks",
    "conveyor_runtime_global_queue_depth",
    "conveyor_runtime_busy_seconds_total",
    "conveyor_runtime_worker_parks_total",
    "conveyor_process_cpu_seconds_total",
    "conveyor_process_resident_memory_bytes",
    "conveyor_process_open_fds",
    "conveyor_backlog_drain_seconds",
    "conveyor_trace_spans_dropped_total",
];

/// promtool: on PATH (scripts/services and scripts/check-deploy install
/// Debian's `prometheus`), else in target/tools/bin.
fn promtool() -> std::path::PathBuf {
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/promtool");
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("promtool"))
        .chain([local])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "promtool not found on PATH nor in target/tools/bin: run scripts/check-deploy \
                 (or apt-get install prometheus) before this test"
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_scrape_passes_promtool_and_has_every_family() {
    let env = Env::new("metrics", Knobs::default()).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 5.0,
            reject_pct: 5.0,
            decline_pct: 5.0,
        },
    );
    env.publish((0..500).map(|i| gen.message(i).1)).await;
    let mut daemon = Daemon::start(&env, &[]).await;
    let base = format!("http://{}", daemon.http);
    wait_for("every message acked", Duration::from_secs(60), || async {
        common::metric(daemon.http, "conveyor_messages_acked_total").await == Some(500.0)
    })
    .await;
    // The queue-depth gauge is refreshed every few seconds; the drain
    // estimate needs two of its samples.
    wait_for(
        "queue depth and drain time exported",
        Duration::from_secs(20),
        || async {
            common::metric(daemon.http, "conveyor_rabbitmq_queue_messages")
                .await
                .is_some()
                && common::metric(daemon.http, "conveyor_backlog_drain_seconds")
                    .await
                    .is_some()
        },
    )
    .await;
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    for family in FAMILIES {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing from:\n{text}"
        );
    }

    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample of {name} in:\n{text}"))
    };
    // The daemon's runtime is tokio's default: a worker per core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    assert_eq!(value("conveyor_runtime_workers"), cores);
    assert!(
        value("conveyor_runtime_alive_tasks") >= 5.0,
        "stages, source, server"
    );
    assert!(value("conveyor_runtime_global_queue_depth") >= 0.0);
    let busy = value("conveyor_runtime_busy_seconds_total");
    let cpu = value("conveyor_process_cpu_seconds_total");
    // (The process collector counts CPU in whole seconds: 0 is possible here.)
    assert!(busy > 0.0 && cpu >= 0.0, "busy {busy} s, cpu {cpu} s");
    assert!(value("conveyor_runtime_worker_parks_total") > 0.0);
    let rss = value("conveyor_process_resident_memory_bytes");
    assert!((1e6..2e9).contains(&rss), "rss {rss}");
    let fds = value("conveyor_process_open_fds");
    assert!((5.0..1000.0).contains(&fds), "fds {fds}");
    // Everything is acked and the queue is empty: nothing left to drain.
    assert!(
        text.contains(&format!(
            "conveyor_backlog_drain_seconds{{queue=\"{}\",topic=\"\"}} 0",
            env.queue
        )),
        "drain time of an empty queue:\n{text}"
    );
    assert_eq!(value("conveyor_trace_spans_dropped_total"), 0.0);

    let mut promtool = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool must be installed (scripts/services installs it: apt-get install prometheus)",
        );
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .expect("healthz")
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .expect("readyz")
            .status(),
        200
    );
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    env.cleanup().await;
}
