//! A partial failure is not an outage: with 30 % of the payment provider's
//! answers a 503 (and 10 % of the rule engine's), the breakers at their
//! defaults never open; retries alone store every order, nothing is
//! dead-lettered and nothing is charged twice. Real RabbitMQ, PostgreSQL
//! and simulator over sockets.

mod common;

use std::time::Duration;

use common::{metric, Env, InProcess};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::{EndpointKnobs, Knobs};

const DOWNSTREAMS: [&str; 2] = ["rule_engine", "payment"];

async fn value(daemon: &InProcess, name: &str) -> f64 {
    metric(daemon.addr, name).await.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_503s_are_retried_without_opening_the_circuit() {
    const N: u64 = 4_000;
    let knobs = Knobs {
        validate: EndpointKnobs {
            error_rate: 0.1,
            ..Default::default()
        },
        charge: EndpointKnobs {
            // A little latency keeps the charge stage's workers busy.
            latency_ms: 1,
            jitter_ms: 2,
            error_rate: 0.3,
            ..Default::default()
        },
        ..Knobs::default()
    };
    let env = Env::new("partial", knobs).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 0.0,
            reject_pct: 3.0,
            decline_pct: 3.0,
        },
    );
    env.publish((0..N).map(|i| gen.message(i).1)).await;

    // The breakers at their defaults: that is what is under test.
    let config = env.config();
    assert_eq!(
        config.payment.breaker.window,
        conveyor::config::BreakerConfig::default().window
    );
    let daemon = InProcess::start(config).await;
    let mut states_seen = [0u32; 3];
    let started = std::time::Instant::now();
    loop {
        for d in DOWNSTREAMS {
            let state = value(
                &daemon,
                &format!("conveyor_circuit_state{{downstream=\"{d}\"}}"),
            )
            .await;
            states_seen[state as usize] += 1;
        }
        if value(&daemon, "conveyor_messages_acked_total").await >= N as f64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "timed out waiting for every message to be acked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    let mut openings = Vec::new();
    let mut shares = Vec::new();
    for d in DOWNSTREAMS {
        openings.push(
            value(
                &daemon,
                &format!("conveyor_circuit_openings_total{{downstream=\"{d}\"}}"),
            )
            .await,
        );
        let requests = |result: &str| {
            format!("conveyor_downstream_requests_total{{downstream=\"{d}\",result=\"{result}\"}}")
        };
        let ok = value(&daemon, &requests("ok")).await;
        let failed = value(&daemon, &requests("server_error")).await;
        shares.push((ok + failed, failed / (ok + failed)));
    }
    let retries = value(&daemon, "conveyor_downstream_retries_total").await;
    let report = daemon.stop().await;
    println!(
        "partial failure: {N} orders in {:.1} s, circuit states sampled (closed, half-open, open) \
         {states_seen:?}, openings (rule_engine, payment) {openings:?}, calls and 503 share \
         {shares:?}, {retries} retries; {report:?}",
        took.as_secs_f64()
    );

    assert_eq!(
        states_seen[1] + states_seen[2],
        0,
        "a circuit was seen not closed"
    );
    assert_eq!(openings, vec![0.0, 0.0], "a circuit opened");
    // The failures were there to be judged, at the rates asked for, and
    // over many more calls than the breaker needs to judge.
    let min_calls = f64::from(conveyor::config::BreakerConfig::default().min_calls);
    for ((calls, share), want) in shares.iter().zip([0.1, 0.3]) {
        assert!(*calls >= 5.0 * min_calls, "{calls} calls");
        assert!(
            (share - want).abs() < 0.05,
            "503 share {share}, want {want}"
        );
    }
    assert!(retries >= 0.3 * N as f64, "{retries} retries");

    assert!(report.drained);
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert_eq!(report.acked, N);
    assert_eq!(env.rows().await, N as i64, "every order stored once");
    assert!(env.drain_dlq().await.is_empty(), "dead letters");
    let by_status = env.rows_by_status().await;
    let charges = env.check_ledger().await;
    assert_eq!(
        charges as i64,
        by_status.get("accepted").copied().unwrap_or(0)
            + by_status.get("declined").copied().unwrap_or(0),
        "one charge per charged order"
    );
    env.cleanup().await;
}
