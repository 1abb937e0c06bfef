//! `conveyor-bench flow` on short phases: every section runs against the
//! real RabbitMQ, PostgreSQL and simulator, accounts for every order (the
//! benchmark fails a run that lost or doubled one), writes its table and
//! plot, and leaves no queue or database behind. Its figures are not
//! checked here: targets live in the benchmark, never in timed tests.

use std::process::Command;

#[test]
fn the_flow_benchmark_runs_every_section_and_writes_its_table_and_plot() {
    let out = tempfile::tempdir().expect("tempdir");
    let tag = format!("{:08x}", rand::random::<u32>());
    let queue = format!("conveyor.flow-test-{tag}");
    let database = format!("conveyor_flow_test_{tag}");
    let run = Command::new(env!("CARGO_BIN_EXE_conveyor-bench"))
        .args([
            "flow",
            "--runs",
            "1",
            "--capacities",
            "16,4",
            "--phase-secs",
            "2",
            "--rate-secs",
            "3",
            "--provider-rate",
            "200",
            "--conveyor-rate",
            "190",
            "--arrival-rate",
            "50",
            "--error-rates",
            "0.3",
            "--failure-secs",
            "2",
            "--healthy-secs",
            "2",
            "--outage-secs",
            "2",
            "--queue",
            &queue,
            "--database",
            &database,
            "--out",
        ])
        .arg(out.path())
        .output()
        .expect("run conveyor-bench flow");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "conveyor-bench flow failed (is scripts/services up?)\n{stdout}\n{stderr}"
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
        "| fixed C = 8 |",
        "| fixed C = 64 |",
        "| oracle (C = capacity) |",
        "| adaptive |",
        "| **adaptive ÷ oracle** |",
        "| conveyor's limit 190/s |",
        "| 30 % |",
        "| retry budget, breaker off |",
    ] {
        assert!(table.contains(row), "no row {row:?} in\n{table}");
    }
    // Both phases of every contestant were measured: each contestant row
    // appears once per phase.
    assert_eq!(table.matches("| adaptive |").count(), 2, "{table}");
    let plot = std::fs::read_to_string(svg).expect("read plot");
    assert!(plot.contains("<svg") && plot.contains("simulator capacity"));
    let queues = Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name"])
        .output()
        .expect("rabbitmqctl");
    assert!(!String::from_utf8_lossy(&queues.stdout).contains(&queue));
}
