//! Adaptive concurrency, end to end: the payment stage's limit finds the
//! capacity of a simulated provider that serves a fixed number of charges
//! at once, with nothing lost and nothing charged twice. Real RabbitMQ,
//! PostgreSQL and the simulator over real sockets.

mod common;

use std::time::Duration;

use common::{metric, Env, InProcess};
use conveyor::downstream::concurrency::{ConcurrencyConfig, Mode};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::{EndpointKnobs, EndpointLimits, Knobs, Limits};

const NO_MIX: Mix = Mix {
    poison_pct: 0.0,
    reject_pct: 0.0,
    decline_pct: 0.0,
};

/// The provider answers in 50 ms: long against the few milliseconds a
/// debug build's scheduling adds on a two-core host, so that the queue the
/// capacity makes (4 ms per call past it) is what the controller sees. At
/// 10 ms, run beside other suites, the noise alone held the median limit at
/// 8 for a capacity of 12. The test runs alone (`.config/nextest.toml`) for
/// the same reason: it checks the controller end to end, not under a load
/// that no production host shares with its downstream.
const LATENCY_MS: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_limit_ends_near_the_providers_capacity_and_loses_nothing() {
    const N: u64 = 4_000;
    const CAPACITY: u32 = 12;
    let knobs = Knobs {
        charge: EndpointKnobs {
            latency_ms: LATENCY_MS,
            ..Default::default()
        },
        ..Knobs::default()
    };
    let env = Env::new("adaptive", knobs).await;
    env.sim.set_limits(Limits {
        charge: EndpointLimits {
            capacity: CAPACITY,
            ..Default::default()
        },
        ..Default::default()
    });
    let gen = OrderGen::new(env.name.clone(), NO_MIX);
    env.publish((0..N).map(|i| gen.message(i).1)).await;

    let mut config = env.config();
    config.payment.concurrency = ConcurrencyConfig {
        mode: Mode::Adaptive,
        initial: 2,
        min: 1,
        max: 128,
    };
    let daemon = InProcess::start(config).await;
    let limit_of = |addr| async move {
        metric(
            addr,
            "conveyor_downstream_concurrency_limit{downstream=\"payment\"}",
        )
        .await
        .unwrap_or(0.0)
    };
    let mut limits = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        limits.push(limit_of(daemon.addr).await);
        let acked = metric(daemon.addr, "conveyor_messages_acked_total")
            .await
            .unwrap_or(0.0);
        if acked >= N as f64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{acked} of {N} acked in 90 s; limits {limits:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = daemon.stop().await;

    // The second half of the run, once the climb from 2 is over.
    let late = &limits[limits.len() / 2..];
    let mut sorted = late.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    assert!(
        (f64::from(CAPACITY) * 0.75..=f64::from(CAPACITY) * 1.5).contains(&median),
        "median limit {median} for a capacity of {CAPACITY}: {limits:?}"
    );
    assert!(
        limits.iter().any(|l| *l >= f64::from(CAPACITY)),
        "never reached the capacity: {limits:?}"
    );
    let load = env.sim.ledger().charge_load;
    assert_eq!(load.peak_in_service, CAPACITY);
    assert_eq!(report.accepted, N);
    assert_eq!(report.dead_lettered, 0);
    assert_eq!(env.rows().await, N as i64);
    // One charge per order, none twice.
    assert_eq!(env.check_ledger().await, N as usize);
    env.cleanup().await;
}
