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
    "conveyor_batch_orders",
    "conveyor_batch_commit_duration_seconds",
    "conveyor_batch_commit_retries_total",
    "conveyor_unacked_messages",
    "conveyor_oldest_unacked_age_seconds",
    "conveyor_end_to_end_latency_seconds",
    "conveyor_rabbitmq_queue_messages",
    "conveyor_ready",
    "conveyor_broker_errors_total",
];

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
    // The queue-depth gauge is refreshed every few seconds.
    wait_for("queue depth exported", Duration::from_secs(15), || async {
        common::metric(daemon.http, "conveyor_rabbitmq_queue_messages")
            .await
            .is_some()
    })
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

    let mut promtool = Command::new("promtool")
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
