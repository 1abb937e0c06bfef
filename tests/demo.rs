//! `conveyor demo`, the real binary: it completes and its invariants hold,
//! also for a run larger than the mock cluster's per-partition retention,
//! and a run whose progress stops ends non-zero naming the failed invariant
//! and its likely cause instead of waiting for ever.

mod common;

use std::time::{Duration, Instant};

fn demo(args: &[&str]) -> (bool, String, Duration) {
    let started = Instant::now();
    let out = std::process::Command::new(common::binary())
        .arg("demo")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run conveyor demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    (
        out.status.success(),
        format!("{stdout}\n{stderr}"),
        started.elapsed(),
    )
}

#[test]
fn the_demo_runs_and_its_invariants_hold() {
    let (ok, out, _) = demo(&["--orders", "2000", "--quiet"]);
    assert!(ok, "demo failed:\n{out}");
    assert!(out.contains("invariants: ok"), "{out}");
    assert!(out.contains("orders/s"));
}

/// 30,000 orders of about 300 bytes into one partition is about 9 MiB,
/// past the 5 MiB the mock cluster keeps of a partition: produced all at
/// once, the oldest would be dropped before the daemon reads them (the
/// `--orders 200000` hang). The producer's bounded lead keeps them.
#[test]
fn a_run_larger_than_the_mock_clusters_retention_completes() {
    let (ok, out, took) = demo(&["--orders", "30000", "--partitions", "1", "--quiet"]);
    assert!(ok, "demo failed after {took:?}:\n{out}");
    assert!(out.contains("invariants: ok"), "{out}");
    assert!(out.contains("at most 4000 ahead"), "{out}");
}

/// The simulator answers after a minute, far past the per-attempt timeout:
/// nothing completes, and the demo says so after `--stall-timeout`.
#[test]
fn a_stalled_demo_ends_non_zero_naming_the_invariant_and_cause() {
    let (ok, out, took) = demo(&[
        "--orders",
        "300",
        "--latency-ms",
        "60000",
        "--stall-timeout",
        "3s",
        "--quiet",
    ]);
    assert!(!ok, "a stalled demo must fail:\n{out}");
    // Poison is dead-lettered before any downstream call: a few complete.
    assert!(out.contains("[FAIL] progress: "), "{out}");
    assert!(
        out.contains("of 300 orders acknowledged, then none for 3 s"),
        "{out}"
    );
    assert!(out.contains("held inside the daemon"), "{out}");
    assert!(out.contains("invariants: FAILED"), "{out}");
    assert!(took < Duration::from_secs(120), "took {took:?}");
}
