//! Pace of calls to a downstream, end to end: a configured rate limit holds
//! the payment calls to it, and a 429 with `Retry-After` pauses every call
//! to that downstream, not only the one that got it. Real RabbitMQ,
//! PostgreSQL and the simulator over real sockets.

mod common;

use std::time::{Duration, Instant};

use common::{metric, wait_for, Env, InProcess};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::{EndpointKnobs, Knobs};

const NO_MIX: Mix = Mix {
    poison_pct: 0.0,
    reject_pct: 0.0,
    decline_pct: 0.0,
};

async fn until_acked(daemon: &InProcess, n: u64, limit: Duration) {
    let addr = daemon.addr;
    wait_for("every message acked", limit, || async move {
        metric(addr, "conveyor_messages_acked_total")
            .await
            .unwrap_or(0.0)
            >= n as f64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payment_rate_limit_holds_calls_to_it_and_loses_nothing() {
    const N: u64 = 300;
    const RATE: u32 = 100;
    const BURST: u32 = 10;
    let env = Env::new("ratelimit", Knobs::default()).await;
    let gen = OrderGen::new(env.name.clone(), NO_MIX);
    env.publish((0..N).map(|i| gen.message(i).1)).await;

    let mut config = env.config();
    config.payment.rate_limit.per_second = RATE;
    config.payment.rate_limit.burst = BURST;
    let started = Instant::now();
    let daemon = InProcess::start(config).await;
    until_acked(&daemon, N, Duration::from_secs(60)).await;
    let took = started.elapsed();
    let throttled = metric(
        daemon.addr,
        "conveyor_downstream_throttled_seconds_total{downstream=\"payment\"}",
    )
    .await
    .unwrap_or(0.0);
    let report = daemon.stop().await;

    // BURST at once, the rest at RATE a second: never faster than that.
    let floor = Duration::from_secs_f64((N - u64::from(BURST)) as f64 / f64::from(RATE));
    assert!(
        took >= floor.mul_f64(0.95),
        "{N} charges in {took:?}, faster than {RATE}/s allows ({floor:?})"
    );
    // …and not much slower either: the limit, not something else, paced it.
    assert!(took < floor * 3, "{N} charges took {took:?}");
    assert!(throttled > 1.0, "waited {throttled} s on the limiter");
    assert_eq!(report.accepted, N);
    assert_eq!(report.dead_lettered, 0);
    assert_eq!(env.rows().await, N as i64);
    assert_eq!(env.check_ledger().await, N as usize);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_pauses_the_whole_downstream() {
    const N: u64 = 1_000;
    // About ten 429s (`Retry-After: 1`) among the charges.
    let knobs = Knobs {
        charge: EndpointKnobs {
            throttle_rate: 0.01,
            ..Default::default()
        },
        ..Knobs::default()
    };
    let env = Env::new("pause429", knobs).await;
    let gen = OrderGen::new(env.name.clone(), NO_MIX);
    env.publish((0..N).map(|i| gen.message(i).1)).await;

    let mut config = env.config();
    // Short enough that a 429 handled per call only would still finish, so
    // the figures below can only come from the pause.
    config.payment.retry.max_elapsed = Duration::from_secs(20);
    let daemon = InProcess::start(config).await;
    until_acked(&daemon, N, Duration::from_secs(90)).await;
    let get = |name: &'static str| {
        let addr = daemon.addr;
        async move { metric(addr, name).await.unwrap_or(0.0) }
    };
    let pauses = get("conveyor_downstream_pauses_total{downstream=\"payment\"}").await;
    let throttled =
        get("conveyor_downstream_throttled_seconds_total{downstream=\"payment\"}").await;
    let throttled_429 =
        get("conveyor_downstream_requests_total{downstream=\"payment\",result=\"throttled\"}")
            .await;
    let report = daemon.stop().await;

    assert!(
        throttled_429 >= 1.0,
        "the simulator sent no 429 (seed luck?)"
    );
    assert_eq!(pauses, throttled_429, "every 429 with Retry-After pauses");
    // A 429 handled per call only makes that one call wait its second; a
    // pause holds the other calls too, so the waits add up to more than one
    // second per 429.
    assert!(
        throttled > 1.5 * throttled_429,
        "{throttled} s waited for {throttled_429} 429s: the other calls were not paused"
    );
    assert_eq!(report.accepted, N);
    assert_eq!(report.dead_lettered, 0);
    assert_eq!(env.rows().await, N as i64);
    assert_eq!(env.check_ledger().await, N as usize);
    env.cleanup().await;
}
