//! Streaming reads of stored orders against the real PostgreSQL: `GET
//! /orders` of ingest and `conveyor export` filter and format alike, send
//! the first rows while the query still runs, and a reader that leaves
//! takes the query with it (gone from `pg_stat_activity` within a second).

mod common;
mod tools_support;

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use conveyor::tools::sim::Knobs;
use tools_support::{binary, ingest_config, Ingest};

/// Stores `n` orders straight into the table: a third each accepted,
/// rejected, declined; committed one second apart from 2026-11-22T00:00:01Z.
async fn seed(env: &Env, n: i64) {
    let store = conveyor::store::Store::connect(&env.config().database)
        .await
        .expect("store");
    store.migrate().await.expect("migrate");
    store.close().await;
    sqlx::query(
        "INSERT INTO orders (order_id, status, customer_id, amount_cents, currency, charge_id,
                             reasons, payload, source_position, received_at, committed_at)
         SELECT 'o-' || lpad(g::text, 8, '0'),
                (ARRAY['accepted','rejected','declined'])[1 + g % 3],
                'c-' || (g % 100), 100 + g, 'EUR',
                CASE WHEN g % 3 = 1 THEN NULL ELSE 'ch-' || g END,
                (CASE WHEN g % 3 = 1 THEN '[\"blocked\"]' ELSE '[]' END)::jsonb,
                jsonb_build_object('order_id', 'o-' || g, 'note', 'a, \"quoted\" value'),
                'q#' || g, now(),
                timestamptz '2026-11-22T00:00:00Z' + g * interval '1 second'
         FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(&env.pool)
    .await
    .expect("seed orders");
}

/// Export queries running now on this test's database.
async fn running_exports(env: &Env) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = $1 AND state = 'active' AND query LIKE 'SELECT order_id, status, customer_id%'",
    )
    .bind(&env.name)
    .fetch_one(&env.pool)
    .await
    .expect("pg_stat_activity")
}

/// Polls until no export query runs; returns how long that took.
async fn export_gone_within(env: &Env, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if running_exports(env).await == 0 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "the export query still runs {limit:?} after its reader left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_orders_and_export_filter_and_format_the_same_rows() {
    let env = Env::new("exp_fmt", Knobs::default()).await;
    seed(&env, 3000).await;
    let ingest = Ingest::start(ingest_config(env.config()), false).await;

    let all = reqwest::get(ingest.url("/orders")).await.expect("GET");
    assert_eq!(all.status(), 200);
    assert_eq!(
        all.headers()["content-type"],
        "application/x-ndjson",
        "ndjson by default"
    );
    let text = all.text().await.expect("body");
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(rows.len(), 3000);
    let rejected = rows
        .iter()
        .find(|r| r["status"] == "rejected")
        .expect("a rejected row");
    assert_eq!(rejected["reasons"][0], "blocked");
    assert!(rejected["charge_id"].is_null());
    assert_eq!(rejected["payload"]["note"], "a, \"quoted\" value");

    // Filters: status and a window of committed_at (since inclusive, until exclusive).
    let url = ingest.url(
        "/orders?status=declined&since=2026-11-22T00:00:10Z&until=2026-11-22T00:01:10Z&format=csv",
    );
    let csv = reqwest::get(url)
        .await
        .expect("GET")
        .text()
        .await
        .expect("csv");
    let lines: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert!(lines[0].starts_with("order_id,status,"), "{}", lines[0]);
    // Seconds 10..70 with g % 3 == 2: 11, 14, …, 68.
    assert_eq!(lines.len() - 1, (10..70).filter(|g| g % 3 == 2).count());
    assert!(lines[1..].iter().all(|l| l.contains(",declined,")));
    assert!(
        lines[1].contains("\"{\"\"note\"\": \"\"a, \\\"\"quoted\\\"\" value\"\""),
        "{}",
        lines[1]
    );
    let bad = reqwest::get(ingest.url("/orders?status=lost"))
        .await
        .expect("GET");
    assert_eq!(bad.status(), 400);

    // The command line gives the same rows.
    let out = Command::new(binary())
        .args([
            "export",
            "--format",
            "csv",
            "--status",
            "declined",
            "--since",
            "2026-11-22T00:00:10Z",
            "--until",
            "2026-11-22T00:01:10Z",
        ])
        .env("CONVEYOR__DATABASE__URL", &env.db_url)
        .env("CONVEYOR__LOG__LEVEL", "warn")
        .output()
        .expect("run export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), csv);

    let file = tempfile::NamedTempFile::new().expect("temp file");
    let status = Command::new(binary())
        .args(["export", "--quiet", "--output"])
        .arg(file.path())
        .env("CONVEYOR__DATABASE__URL", &env.db_url)
        .env("CONVEYOR__LOG__LEVEL", "warn")
        .status()
        .expect("run export");
    assert!(status.success());
    let written = std::fs::read_to_string(file.path()).expect("read");
    assert_eq!(written.lines().count(), 3000);
    ingest.stop().await.expect("stopped");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_takes_its_query_with_it_within_a_second() {
    let env = Env::new("exp_cancel", Knobs::default()).await;
    seed(&env, 300_000).await;
    let ingest = Ingest::start(ingest_config(env.config()), false).await;

    let resp = reqwest::get(ingest.url("/orders")).await.expect("GET");
    assert_eq!(resp.status(), 200);
    let mut body = resp;
    let first = body.chunk().await.expect("bytes").expect("a first chunk");
    assert!(!first.is_empty());
    // The first bytes are here and the query is still running: streamed,
    // not collected first.
    assert_eq!(
        running_exports(&env).await,
        1,
        "the query runs while rows flow"
    );
    drop(body);
    let took = export_gone_within(&env, Duration::from_secs(1)).await;
    println!("GET /orders: query gone {took:?} after the client left");

    // The server is fine afterwards: a full read of a filtered subset.
    let r =
        reqwest::get(ingest.url("/orders?since=2026-11-22T00:00:01Z&until=2026-11-22T00:00:11Z"))
            .await
            .expect("GET");
    assert_eq!(r.text().await.expect("body").lines().count(), 10);
    ingest.stop().await.expect("stopped");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_whose_reader_closes_the_pipe_ends_its_query_within_a_second() {
    let env = Env::new("exp_pipe", Knobs::default()).await;
    seed(&env, 300_000).await;
    let mut child = Command::new(binary())
        .args(["export", "--format", "ndjson"])
        .env("CONVEYOR__DATABASE__URL", &env.db_url)
        .env("CONVEYOR__LOG__LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn export");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 4096];
    stdout
        .read_exact(&mut buf)
        .expect("first bytes of the export");
    assert!(buf.starts_with(b"{\"order_id\":"));
    assert_eq!(
        running_exports(&env).await,
        1,
        "the query runs while rows flow"
    );
    drop(stdout); // as `| head` does
    let took = export_gone_within(&env, Duration::from_secs(1)).await;
    println!("export: query gone {took:?} after its reader closed the pipe");
    let status = child.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(141),
        "a broken pipe ends it quietly with SIGPIPE's code, as `seq | head` does"
    );
    env.cleanup().await;
}
