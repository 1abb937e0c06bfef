//! The benchmark harness itself, on tiny loads: it runs every measurement
//! against the real RabbitMQ and PostgreSQL, writes its table and plot, and
//! leaves no queue or database behind. (Its figures are not checked here:
//! targets live in the benchmark, never in timed tests.)
//!
//! The benchmark runs the daemon binary built beside it (`conveyor`, from
//! the workspace's other package): `cargo nextest run --workspace` builds
//! both.

use std::process::Command;

#[test]
fn the_benchmark_measures_every_row_and_writes_its_table_and_plot() {
    let out = tempfile::tempdir().expect("tempdir");
    let tag = format!("{:08x}", rand::random::<u32>());
    let queue = format!("conveyor.bench-test-{tag}");
    let database = format!("conveyor_bench_test_{tag}");
    let run = Command::new(env!("CARGO_BIN_EXE_conveyor-bench"))
        .args([
            "--runs",
            "1",
            "--orders",
            "600",
            "--bound-orders",
            "400",
            "--naive-orders",
            "20",
            "--small-backlog",
            "300",
            "--large-backlog",
            "3000",
            "--large-take",
            "500",
            "--queue",
            &queue,
            "--database",
            &database,
            "--out",
        ])
        .arg(out.path())
        .output()
        .expect("run conveyor-bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "conveyor-bench failed (is scripts/services up?)\n{stdout}\n{stderr}"
    );
    let files: Vec<_> = std::fs::read_dir(out.path())
        .expect("results")
        .map(|e| e.expect("entry").path())
        .collect();
    let md = files
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "md"))
        .expect("a markdown table");
    let svg = files
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "svg"))
        .expect("an SVG plot");
    let table = std::fs::read_to_string(md).expect("read table");
    assert_eq!(
        table.trim(),
        stdout.trim(),
        "the table printed is the table written"
    );
    for row in [
        "consume + multi-ack alone",
        "batched insert alone",
        "floor: consume → 2 HTTP calls",
        "conveyor ÷ floor",
        "Little's-law bound",
        "conveyor ÷ naive",
        "CPU (user + sys) per order",
        "peak RSS, 300 backlog",
        "peak RSS, 3000 backlog",
        "drain: SIGTERM → exit",
    ] {
        let line = table
            .lines()
            .find(|l| l.contains(row))
            .unwrap_or_else(|| panic!("no row {row:?} in\n{table}"));
        let median = line.split('|').nth(2).expect("median cell").trim();
        let value: f64 = median
            .parse()
            .unwrap_or_else(|_| panic!("median {median:?} of {row:?}"));
        assert!(value.is_finite() && value > 0.0, "{row}: {value}");
    }
    let plot = std::fs::read_to_string(svg).expect("read plot");
    assert!(plot.contains("<svg") && plot.contains("conveyor, 0 ms"));
    // Nothing left behind.
    let queues = Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name"])
        .output()
        .expect("rabbitmqctl");
    assert!(!String::from_utf8_lossy(&queues.stdout).contains(&queue));
}
