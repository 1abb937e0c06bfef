//! The spine end to end: real RabbitMQ, real PostgreSQL, the simulator over
//! real sockets, the daemon in-process or as a child process.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{metric, unacked, wait_for, Daemon, Env, InProcess};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::{EndpointKnobs, Knobs};
use nix::sys::signal::Signal;

/// Runs the daemon in-process until `acked_target` messages are acked, then
/// stops it and returns its report and the seconds it took to get there.
async fn run_until_acked(
    config: conveyor::config::Config,
    acked_target: u64,
) -> (conveyor::Report, f64) {
    let daemon = InProcess::start(config).await;
    let addr = daemon.addr;
    let started = Instant::now();
    wait_for("every message acked", Duration::from_secs(120), || async {
        metric(addr, "conveyor_messages_acked_total")
            .await
            .unwrap_or(0.0)
            >= acked_target as f64
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    let report = daemon.stop().await;
    (report, secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_orders_stored_once_and_charged_once_even_when_republished() {
    let env = Env::new(
        "tenk",
        Knobs {
            reject_rate: 0.02,
            decline_rate: 0.02,
            ..Knobs::default()
        },
    )
    .await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 0.0,
            reject_pct: 3.0,
            decline_pct: 3.0,
        },
    );
    let n = 10_000u64;
    env.publish((0..n).map(|i| gen.message(i).1)).await;

    let (report, secs) = run_until_acked(env.config(), n).await;
    println!(
        "10k run: {n} orders in {secs:.2} s = {:.0} orders/s ({report:?})",
        n as f64 / secs
    );
    assert!(report.drained);
    assert_eq!(report.received, n);
    assert_eq!(report.acked, n);
    assert_eq!(
        report.accepted + report.rejected + report.declined,
        n,
        "{report:?}"
    );
    assert_eq!(env.rows().await, n as i64);
    assert_eq!(env.ready(&env.queue).await, 0, "queue not empty");
    let by_status = env.rows_by_status().await;
    assert!(by_status.get("rejected").copied().unwrap_or(0) > 0);
    assert!(by_status.get("declined").copied().unwrap_or(0) > 0);
    let charges = env.check_ledger().await;
    assert_eq!(
        charges as i64,
        by_status["accepted"] + by_status["declined"],
        "one charge per charged order"
    );

    // The same 10,000 again: no new row, no new charge.
    env.publish((0..n).map(|i| gen.message(i).1)).await;
    let (report2, _) = run_until_acked(env.config(), n).await;
    assert_eq!(report2.acked, n);
    assert_eq!(env.rows().await, n as i64);
    assert_eq!(env.ready(&env.queue).await, 0);
    assert_eq!(
        env.check_ledger().await,
        charges,
        "a republished order was charged again"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_drains_cleanly_and_a_restart_finishes_the_rest() {
    let env = Env::new(
        "sigterm",
        Knobs {
            charge: EndpointKnobs {
                latency_ms: 2,
                jitter_ms: 3,
                ..Default::default()
            },
            ..Knobs::default()
        },
    )
    .await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    let n = 20_000u64;
    env.publish((0..n).map(|i| gen.message(i).1)).await;

    let mut first = Daemon::start(&env, &[]).await;
    wait_for(
        "a third of the orders acked",
        Duration::from_secs(120),
        || async {
            metric(first.http, "conveyor_messages_acked_total")
                .await
                .unwrap_or(0.0)
                >= (n / 3) as f64
        },
    )
    .await;
    first.signal(Signal::SIGTERM);
    let (code, took) = first.wait(Duration::from_secs(15)).await;
    println!(
        "drain: exit {code:?} {:.3} s after SIGTERM",
        took.as_secs_f64()
    );
    assert_eq!(code, Some(0), "log:\n{}", first.log_text());
    assert!(
        took < Duration::from_secs(10),
        "drain took {took:?}, drain_timeout is 10 s"
    );
    let stored = env.rows().await;
    let left = env.ready(&env.queue).await as i64;
    assert!(stored > 0 && stored < n as i64, "stopped mid-run: {stored}");
    assert_eq!(
        stored + left,
        n as i64,
        "a clean drain acks exactly what it stored"
    );

    let mut second = Daemon::start(&env, &[]).await;
    wait_for("all rows stored", Duration::from_secs(120), || async {
        env.rows().await == n as i64
    })
    .await;
    wait_for(
        "queue empty and nothing unacked",
        Duration::from_secs(30),
        || async { metric(second.http, "conveyor_unacked_messages").await == Some(0.0) },
    )
    .await;
    second.signal(Signal::SIGTERM);
    let (code, _) = second.wait(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    assert_eq!(env.rows().await, n as i64);
    assert_eq!(env.ready(&env.queue).await, 0, "messages left in the queue");
    assert_eq!(unacked(&env.queue).await, 0);
    assert_eq!(env.check_ledger().await, n as usize);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stage_never_lets_unacked_exceed_prefetch_and_memory_stays_flat() {
    const PREFETCH: u64 = 100;
    const BACKLOG: u64 = 100_000;
    const RSS_BOUND_MIB: u64 = 64;
    let env = Env::new(
        "prefetch",
        Knobs {
            charge: EndpointKnobs {
                latency_ms: 20,
                ..Default::default()
            },
            ..Knobs::default()
        },
    )
    .await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    env.publish((0..BACKLOG).map(|i| gen.message(i).1)).await;

    let prefetch = PREFETCH.to_string();
    let mut daemon = Daemon::start(
        &env,
        &[
            ("CONVEYOR__SOURCE__PREFETCH", prefetch.as_str()),
            ("CONVEYOR__PIPELINE__CHARGE_CONCURRENCY", "8"),
        ],
    )
    .await;
    let samples = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let broker_unacked = unacked(&env.queue).await;
        let own = metric(daemon.http, "conveyor_unacked_messages")
            .await
            .unwrap_or(-1.0);
        let (rss, _) = daemon.rss_kib();
        samples.lock().unwrap().push((broker_unacked, own, rss));
    }
    let (_, peak_kib) = daemon.rss_kib();
    let acked = metric(daemon.http, "conveyor_messages_acked_total")
        .await
        .unwrap_or(0.0);
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    let samples = samples.lock().unwrap().clone();
    println!(
        "backlog {BACKLOG}, prefetch {PREFETCH}: (broker unacked, daemon unacked, rss KiB) = {samples:?}; \
         peak RSS {:.1} MiB; {acked} acked while sampling",
        peak_kib as f64 / 1024.0
    );
    assert!(acked > 0.0, "the slow stage still makes progress");
    for (broker_unacked, own, _) in &samples {
        assert!(
            *broker_unacked <= PREFETCH,
            "RabbitMQ saw {broker_unacked} unacked > prefetch"
        );
        assert!(*own <= PREFETCH as f64, "daemon held {own} > prefetch");
    }
    assert!(
        samples.iter().any(|(b, _, _)| *b >= PREFETCH / 2),
        "the prefetch window was never filled: {samples:?}"
    );
    assert!(
        peak_kib <= RSS_BOUND_MIB * 1024,
        "peak RSS {peak_kib} KiB above {RSS_BOUND_MIB} MiB with a {BACKLOG} backlog"
    );
    // The drain settles what the daemon held, and the rest of the backlog
    // stays in the broker: every message is either stored or ready again
    // (RabbitMQ requeues the unacked ones as the connection closes, so poll).
    let mut settled = (0u64, 0u64);
    for _ in 0..100 {
        settled = (env.ready(&env.queue).await as u64, env.rows().await as u64);
        if settled.0 + settled.1 == BACKLOG {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ready, stored) = settled;
    assert_eq!(ready + stored, BACKLOG, "ready {ready} + stored {stored}");
    // What was stored after the sample is at most the window held then and
    // one more taken before the signal arrived.
    assert!(
        stored <= acked as u64 + 2 * PREFETCH,
        "stored {stored}, acked {acked} when sampled"
    );
    env.cleanup().await;
}

fn order_json(id: &str, customer: &str, amount: i64, currency: &str) -> String {
    format!(
        r#"{{"order_id":"{id}","customer_id":"{customer}","currency":"{currency}","amount_cents":{amount},
            "items":[{{"sku":"A","qty":1,"unit_price_cents":{amount}}}],"created_at":"2026-11-22T10:00:00Z"}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_their_reason_and_neighbours_unaffected() {
    let env = Env::new("poison", Knobs::default()).await;
    let good = |i: usize| order_json(&format!("{}-good-{i}", env.name), "c-1", 500, "EUR");
    let huge = format!(
        r#"{{"order_id":"big","customer_id":"c","currency":"EUR","amount_cents":1,"items":[{{"sku":"A","qty":1,"unit_price_cents":1}}],"created_at":"2026-11-22T10:00:00Z","note":"{}"}}"#,
        "x".repeat(2048)
    );
    let poison: Vec<(&str, String)> = vec![
        ("malformed_json", "{\"order_id\": \"x\", ".to_string()),
        ("schema", r#"{"order_id":"m","currency":"EUR"}"#.to_string()),
        (
            "schema",
            order_json("typed", "c", 500, "EUR")
                .replace("\"amount_cents\":500", "\"amount_cents\":\"500\""),
        ),
        ("invalid_amount", order_json("neg", "c", -500, "EUR")),
        (
            "amount_mismatch",
            order_json("mismatch", "c", 500, "EUR")
                .replace("\"unit_price_cents\":500", "\"unit_price_cents\":499"),
        ),
        ("unknown_currency", order_json("cur", "c", 500, "XXQ")),
        ("too_large", huge),
    ];
    let mut bodies = Vec::new();
    for (i, (_, p)) in poison.iter().enumerate() {
        bodies.push(good(i).into_bytes());
        bodies.push(p.clone().into_bytes());
    }
    bodies.push(good(99).into_bytes());
    let total = bodies.len() as u64;
    env.publish(bodies).await;

    let mut cfg = env.config();
    cfg.source.max_message_bytes = 1024;
    let (report, _) = run_until_acked(cfg, total).await;
    assert_eq!(report.acked, total, "{report:?}");
    assert_eq!(report.dead_lettered, poison.len() as u64);
    assert_eq!(
        env.rows().await,
        poison.len() as i64 + 1,
        "every good neighbour stored"
    );
    assert_eq!(env.ready(&env.queue).await, 0);

    let dead = env.drain_dlq().await;
    assert_eq!(dead.len(), poison.len());
    for (want_reason, body) in &poison {
        // Dead letters are published concurrently: match them by content.
        let (headers, got_body) = dead
            .iter()
            .find(|(_, b)| b == body.as_bytes())
            .unwrap_or_else(|| panic!("no dead letter for {want_reason}"));
        assert_eq!(
            headers.get("x-conveyor-reason").map(String::as_str),
            Some(*want_reason),
            "{headers:?}"
        );
        assert_eq!(
            headers.get("x-conveyor-stage").map(String::as_str),
            Some("decode")
        );
        assert!(!headers
            .get("x-conveyor-detail")
            .map(String::is_empty)
            .unwrap_or(true));
        assert!(headers
            .get("x-conveyor-source")
            .is_some_and(|s| s.starts_with(&env.queue)));
        assert_eq!(got_body, body.as_bytes(), "the original bytes are kept");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_and_declines_are_stored_with_their_reasons() {
    let env = Env::new("outcomes", Knobs::default()).await;
    let id = |s: &str| format!("{}-{s}", env.name);
    env.publish([
        order_json(&id("ok"), "c-1", 700, "USD").into_bytes(),
        order_json(&id("rej"), "reject-7", 700, "USD").into_bytes(),
        order_json(&id("dec"), "decline-7", 700, "USD").into_bytes(),
    ])
    .await;
    let (report, _) = run_until_acked(env.config(), 3).await;
    assert_eq!(
        (report.accepted, report.rejected, report.declined),
        (1, 1, 1)
    );
    let rows: Vec<(
        String,
        String,
        Option<String>,
        serde_json::Value,
        serde_json::Value,
    )> = sqlx::query_as(
        "SELECT order_id, status, charge_id, reasons, payload FROM orders ORDER BY order_id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("rows");
    let find = |s: &str| rows.iter().find(|r| r.0 == id(s)).expect("row").clone();
    let ok = find("ok");
    assert_eq!(ok.1, "accepted");
    assert!(ok.2.is_some());
    assert_eq!(ok.3, serde_json::json!([]));
    assert_eq!(ok.4["amount_cents"], 700);
    let rej = find("rej");
    assert_eq!(rej.1, "rejected");
    assert_eq!(rej.2, None);
    assert_eq!(rej.3, serde_json::json!(["customer is blocked"]));
    let dec = find("dec");
    assert_eq!(dec.1, "declined");
    assert!(dec.2.is_some());
    assert_eq!(dec.3, serde_json::json!(["insufficient funds"]));
    assert_eq!(env.check_ledger().await, 2);
    env.cleanup().await;
}

/// A drain that hits `shutdown.drain_timeout` exits with its own code, not
/// 0, so that a supervisor can tell it from a clean drain; what it held is
/// left unacknowledged and the broker has it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_its_deadline_exits_with_its_own_code() {
    let env = Env::new(
        "drain_deadline",
        Knobs {
            // The rule engine never answers: every order stays in flight.
            validate: EndpointKnobs {
                timeout_rate: 1.0,
                ..Default::default()
            },
            ..Knobs::default()
        },
    )
    .await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    let n = 20u64;
    env.publish((0..n).map(|i| gen.message(i).1)).await;
    let mut daemon = Daemon::start(
        &env,
        &[
            ("CONVEYOR__SHUTDOWN__DRAIN_TIMEOUT", "300ms"),
            // Longer than the whole test: no attempt ends before the deadline.
            ("CONVEYOR__RULE_ENGINE__TIMEOUT", "10m"),
        ],
    )
    .await;
    wait_for("every order in flight", Duration::from_secs(30), || async {
        metric(daemon.http, "conveyor_unacked_messages").await == Some(n as f64)
    })
    .await;
    daemon.signal(Signal::SIGTERM);
    let (code, took) = daemon.wait(Duration::from_secs(15)).await;
    println!(
        "drain past its deadline: exit {code:?} {:.3} s after SIGTERM",
        took.as_secs_f64()
    );
    assert_eq!(
        code,
        Some(i32::from(conveyor::EXIT_DRAIN_TIMEOUT)),
        "log:\n{}",
        daemon.log_text()
    );
    assert_eq!(conveyor::EXIT_DRAIN_TIMEOUT, 75, "the documented code");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert_eq!(env.rows().await, 0);
    wait_for(
        "every order back in the queue",
        Duration::from_secs(30),
        || async { env.ready(&env.queue).await == n as u32 },
    )
    .await;
    env.cleanup().await;
}
