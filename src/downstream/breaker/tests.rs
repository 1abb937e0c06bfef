use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// Small numbers, so that each test reads at a glance: a 10 s window of
/// 500 ms buckets, judged once 20 calls are in a stretch.
fn cfg() -> BreakerConfig {
    BreakerConfig {
        enabled: true,
        failure_rate: 0.5,
        window: Duration::from_secs(10),
        min_calls: 20,
        open_for: Duration::from_secs(5),
        half_open_probes: 3,
        half_open_successes: 2,
        not_ready_after: Duration::from_secs(30),
    }
}

fn breaker(cfg: BreakerConfig) -> CircuitBreaker {
    CircuitBreaker::new("payment", &cfg, BreakerMetrics::detached())
}

fn unavailable() -> Result<(), CallError> {
    Err(CallError::Status {
        status: 503,
        body: String::new(),
        retry_after: None,
    })
}

fn refused() -> Result<(), CallError> {
    Err(CallError::Status {
        status: 422,
        body: String::new(),
        retry_after: None,
    })
}

fn outcome(failed: bool) -> Result<(), CallError> {
    if failed {
        unavailable()
    } else {
        Ok(())
    }
}

/// One first attempt through the breaker, which must let it through.
fn call(b: &CircuitBreaker, outcome: Result<(), CallError>) {
    b.try_acquire().expect("admitted").record(&outcome);
}

fn retry(b: &CircuitBreaker, outcome: Result<(), CallError>) {
    b.try_acquire()
        .expect("admitted")
        .record_as(Attempt::Retry, &outcome);
}

fn is_open(b: &CircuitBreaker) -> bool {
    matches!(b.state(), State::Open { .. })
}

/// `n` first attempts, `every` apart, each failing with chance `p`; returns
/// after the first that opens the circuit, with how many were made.
async fn random_calls(
    b: &CircuitBreaker,
    rng: &mut StdRng,
    n: u32,
    p: f64,
    every: Duration,
) -> u32 {
    for i in 0..n {
        call(b, outcome(rng.random_bool(p)));
        if !b.is_closed() {
            return i + 1;
        }
        tokio::time::advance(every).await;
    }
    n
}

#[tokio::test(start_paused = true)]
async fn an_outage_opens_it_once_min_calls_are_in() {
    let b = breaker(cfg());
    for _ in 0..19 {
        call(&b, unavailable());
    }
    assert!(
        b.is_closed(),
        "19 failures, all of them, but below min_calls"
    );
    call(&b, unavailable());
    assert!(is_open(&b), "20 of 20");
    assert_eq!(b.metrics.state.get(), 2);
    assert_eq!(b.metrics.openings.get(), 1);
    assert!(b.try_acquire().is_none());
    assert!(!b.admits());
}

#[tokio::test(start_paused = true)]
async fn min_calls_is_counted_within_the_window_only() {
    let b = breaker(cfg());
    // 15 failures a window apart from 15 more: never 20 in one window.
    for _ in 0..15 {
        call(&b, unavailable());
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    for _ in 0..15 {
        call(&b, unavailable());
    }
    assert!(b.is_closed());
    assert_eq!(b.inner.lock().expect("lock").window.calls(), 15);
}

#[tokio::test(start_paused = true)]
async fn failures_age_out_bucket_by_bucket() {
    let b = breaker(cfg());
    for _ in 0..20 {
        call(&b, Ok(()));
    }
    for _ in 0..15 {
        call(&b, unavailable());
    }
    assert!(b.is_closed(), "15 of 35");
    // 9.5 s later the first bucket is still in the window: 35 calls.
    tokio::time::advance(Duration::from_millis(9_500)).await;
    assert_eq!(b.inner.lock().expect("lock").window.calls(), 35);
    // 10 s later it has left: only what comes now counts.
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(b.inner.lock().expect("lock").window.calls(), 0);
    for _ in 0..19 {
        call(&b, unavailable());
    }
    assert!(b.is_closed(), "the 15 old failures no longer count");
    call(&b, unavailable());
    assert!(is_open(&b));
}

#[tokio::test(start_paused = true)]
async fn the_onset_of_an_outage_is_judged_without_waiting_for_the_healthy_past_to_age_out() {
    let b = breaker(cfg());
    // A busy healthy stretch: 1,000 successes over 5 s.
    for _ in 0..1_000 {
        call(&b, Ok(()));
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    // Then every call fails, and far fewer are made (the stage stalls).
    let outage = Instant::now();
    while b.is_closed() {
        retry(&b, unavailable());
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(outage.elapsed() < Duration::from_secs(2), "still closed");
    }
    // The whole window would fail at 50 % only after 5 s of this; the
    // newest stretch of 20 calls does within one bucket and 20 calls.
    assert!(outage.elapsed() <= Duration::from_millis(500 + 20 * 20));
}

#[tokio::test(start_paused = true)]
async fn a_stage_that_only_retries_is_still_judged() {
    // An outage with every worker retrying: no first attempts at all.
    let b = breaker(cfg());
    for _ in 0..20 {
        retry(&b, unavailable());
    }
    assert!(is_open(&b));
}

#[tokio::test(start_paused = true)]
async fn random_partial_failures_do_not_open_it_with_the_defaults() {
    let defaults = BreakerConfig::default();
    for (seed, p) in [(1, 0.1), (2, 0.3), (3, 0.5), (4, 0.5)] {
        let b = breaker(defaults.clone());
        let mut rng = StdRng::seed_from_u64(seed);
        // 100,000 first attempts at 1,000 a second, 100 s of traffic.
        let made = random_calls(&b, &mut rng, 100_000, p, Duration::from_millis(1)).await;
        assert!(b.is_closed(), "{p}: opened after {made} calls");
        assert_eq!(b.metrics.openings.get(), 0);
    }
    // And the same at 100 % still opens: from a fresh window, which holds
    // fewer than min_calls calls, after 30 in a row.
    let b = breaker(defaults.clone());
    let mut rng = StdRng::seed_from_u64(5);
    let made = random_calls(&b, &mut rng, 100_000, 1.0, Duration::from_millis(1)).await;
    assert_eq!(made, window::QUIET_OUTAGE_CALLS);
}

#[tokio::test(start_paused = true)]
async fn at_low_traffic_thirty_failures_in_a_row_open_it() {
    let defaults = BreakerConfig::default();
    // Five calls a second: never `min_calls` (100) in a 10 s window.
    let every = Duration::from_millis(200);
    let b = breaker(defaults.clone());
    for _ in 0..5 {
        call(&b, Ok(()));
        tokio::time::advance(every).await;
    }
    for _ in 0..window::QUIET_OUTAGE_CALLS - 1 {
        retry(&b, unavailable());
        tokio::time::advance(every).await;
    }
    assert!(b.is_closed(), "29 failures in a row");
    retry(&b, unavailable());
    assert!(is_open(&b), "30 in a row at five calls a second");
    // A partial failure at that traffic does not, whatever its share short
    // of all: 100,000 calls (five and a half hours) at 50 % and at 80 %.
    for (seed, p) in [(6, 0.5), (7, 0.8)] {
        let b = breaker(defaults.clone());
        let mut rng = StdRng::seed_from_u64(seed);
        let made = random_calls(&b, &mut rng, 100_000, p, every).await;
        if p < 0.6 {
            assert!(b.is_closed(), "{p}: opened after {made} calls");
        } else {
            // 0.8³⁰ ≈ 1.2·10⁻³ per call: it does open, eventually.
            assert!(made > 30, "{p}: opened after {made} calls");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn thirty_percent_stays_closed_at_a_rate_of_one_half_over_hundreds_of_calls() {
    let b = breaker(BreakerConfig {
        failure_rate: 0.5,
        min_calls: 300,
        ..BreakerConfig::default()
    });
    let mut rng = StdRng::seed_from_u64(30);
    let made = random_calls(&b, &mut rng, 100_000, 0.3, Duration::from_millis(1)).await;
    assert!(b.is_closed(), "opened after {made} calls");
    // The old count window (20 calls, 10 to judge) opened within seconds.
    let b = breaker(BreakerConfig {
        failure_rate: 0.5,
        min_calls: 10,
        window: Duration::from_millis(100),
        ..BreakerConfig::default()
    });
    let made = random_calls(&b, &mut rng, 100_000, 0.3, Duration::from_millis(5)).await;
    assert!(is_open(&b), "a 10-call stretch at 30 %: {made} calls");
}

#[tokio::test(start_paused = true)]
async fn retries_of_a_few_failing_orders_do_not_open_it() {
    let b = breaker(BreakerConfig {
        failure_rate: 0.8,
        ..cfg()
    });
    // 1,000 orders, every fifth failing for itself alone and retried 30
    // times: 6,200 of 7,000 calls fail (89 %), but weighted only 68 %.
    for i in 0..1_000 {
        let failing = i % 5 == 4;
        call(&b, outcome(failing));
        if failing {
            for _ in 0..30 {
                retry(&b, unavailable());
            }
        }
    }
    assert!(b.is_closed());
    // The same calls, all counted as first attempts, would have opened it
    // with the first failing order.
    let b = breaker(BreakerConfig {
        failure_rate: 0.8,
        ..cfg()
    });
    let mut made = 0;
    'orders: for i in 0..1_000 {
        let failing = i % 5 == 4;
        for _ in 0..if failing { 31 } else { 1 } {
            call(&b, outcome(failing));
            made += 1;
            if !b.is_closed() {
                break 'orders;
            }
        }
    }
    assert!(is_open(&b));
    assert_eq!(made, 4 + 16, "16 failures of 20 calls");
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_are_the_downstream_working() {
    let b = breaker(cfg());
    for _ in 0..40 {
        call(&b, refused());
    }
    assert!(b.is_closed());
    for _ in 0..10 {
        call(&b, Err(super::super::testing::timeout_error()));
        call(
            &b,
            Err(CallError::Status {
                status: 429,
                body: String::new(),
                retry_after: None,
            }),
        );
    }
    assert!(b.is_closed(), "20 transient of 60");
    for _ in 0..19 {
        call(&b, unavailable());
    }
    assert!(b.is_closed(), "39 transient of 79");
    call(&b, unavailable());
    assert!(is_open(&b), "40 transient of 80");
}

fn open_it(b: &CircuitBreaker) {
    for _ in 0..20 {
        call(b, unavailable());
    }
    assert!(is_open(b));
}

fn half_open(admitted: u32, succeeded: u32, failed: u32) -> State {
    State::HalfOpen {
        admitted,
        succeeded,
        failed,
    }
}

#[tokio::test(start_paused = true)]
async fn a_majority_of_probes_closes_it() {
    let b = breaker(cfg());
    open_it(&b);
    tokio::time::advance(Duration::from_millis(4_999)).await;
    assert!(b.try_acquire().is_none(), "still open");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(b.admits());
    let p1 = b.try_acquire().expect("first probe");
    assert_eq!(b.state(), half_open(1, 0, 0));
    assert_eq!(b.metrics.state.get(), 1);
    let p2 = b.try_acquire().expect("second probe");
    let p3 = b.try_acquire().expect("third probe");
    assert!(b.try_acquire().is_none(), "only three probes");
    assert!(!b.admits());
    p1.record(&unavailable());
    assert_eq!(b.state(), half_open(3, 0, 1), "one failure of three");
    p2.record(&Ok(()));
    assert_eq!(b.state(), half_open(3, 1, 1));
    p3.record(&refused());
    assert_eq!(b.state(), State::Closed, "a 4xx probe is a success");
    assert_eq!(b.metrics.state.get(), 0);
    assert_eq!(b.not_closed_for(), None);
    assert_eq!(b.metrics.openings.get(), 1);
    // A fresh window: a few failures do not reopen it.
    for _ in 0..19 {
        call(&b, unavailable());
    }
    assert!(b.is_closed());
}

#[tokio::test(start_paused = true)]
async fn it_reopens_as_soon_as_the_probes_can_no_longer_close_it() {
    let b = breaker(cfg());
    open_it(&b);
    tokio::time::advance(Duration::from_secs(5)).await;
    let probes: Vec<_> = (0..3).map(|_| b.try_acquire().expect("probe")).collect();
    let mut probes = probes.into_iter();
    probes.next().expect("probe").record(&unavailable());
    assert!(matches!(b.state(), State::HalfOpen { .. }));
    probes.next().expect("probe").record(&unavailable());
    assert!(is_open(&b), "two failed: two successes are out of reach");
    assert_eq!(b.metrics.state.get(), 2);
    assert_eq!(b.metrics.openings.get(), 1, "a reopening is not an opening");
    // The last probe's outcome belongs to a phase that is over.
    probes.next().expect("probe").record(&Ok(()));
    assert!(is_open(&b));
    tokio::time::advance(Duration::from_millis(4_999)).await;
    assert!(b.try_acquire().is_none());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(b.try_acquire().is_some());
}

#[tokio::test(start_paused = true)]
async fn all_of_the_probes_when_every_one_must_succeed() {
    let b = breaker(BreakerConfig {
        half_open_successes: 3,
        ..cfg()
    });
    open_it(&b);
    tokio::time::advance(Duration::from_secs(5)).await;
    let p1 = b.try_acquire().expect("probe");
    let p2 = b.try_acquire().expect("probe");
    p1.record(&Ok(()));
    p2.record(&unavailable());
    assert!(is_open(&b));
}

#[tokio::test(start_paused = true)]
async fn stragglers_from_an_earlier_phase_do_not_vote() {
    let b = breaker(cfg());
    let slow: Vec<_> = (0..20).map(|_| b.try_acquire().expect("closed")).collect();
    open_it(&b);
    tokio::time::advance(Duration::from_secs(5)).await;
    let probes = [
        b.try_acquire().expect("probe"),
        b.try_acquire().expect("probe"),
    ];
    for p in probes {
        p.record(&Ok(()));
    }
    assert!(b.is_closed());
    // Calls admitted before the outage fail late: they do not reopen it.
    for p in slow {
        p.record(&unavailable());
    }
    assert!(b.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_frees_its_slot() {
    let b = breaker(cfg());
    open_it(&b);
    tokio::time::advance(Duration::from_secs(5)).await;
    let p1 = b.try_acquire().expect("probe");
    let _p2 = b.try_acquire().expect("probe");
    let _p3 = b.try_acquire().expect("probe");
    assert!(b.try_acquire().is_none());
    drop(p1);
    assert!(
        b.try_acquire().is_some(),
        "the dropped probe's slot is free"
    );
}

#[tokio::test(start_paused = true)]
async fn waiters_are_let_through_when_the_circuit_allows() {
    let b = Arc::new(breaker(cfg()));
    open_it(&b);
    let opened = Instant::now();
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move {
                let p = b.acquire().await;
                let at = opened.elapsed();
                p.record(&Ok(()));
                at
            })
        })
        .collect();
    let gate = {
        let b = b.clone();
        tokio::spawn(async move {
            b.admitting().await;
            opened.elapsed()
        })
    };
    let mut times = Vec::new();
    for w in waiters {
        times.push(w.await.expect("join"));
    }
    assert!(
        times.iter().all(|t| *t >= Duration::from_secs(5)),
        "{times:?}"
    );
    assert!(b.is_closed());
    assert!(gate.await.expect("join") >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn disabled_never_opens() {
    let b = breaker(BreakerConfig {
        enabled: false,
        ..cfg()
    });
    for _ in 0..100 {
        call(&b, unavailable());
    }
    assert!(b.is_closed());
    assert!(b.admits());
    assert_eq!(b.not_ready(), None);
    assert_eq!(b.metrics.openings.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn readiness_fails_once_the_circuit_has_not_closed_for_long() {
    let b = Arc::new(breaker(cfg()));
    let health = crate::telemetry::Health::default();
    health.watch(b.clone());
    open_it(&b);
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(health.check_failures(), Vec::<String>::new());
    // Half-open and open again: still the same outage.
    for _ in 0..2 {
        b.try_acquire().expect("probe").record(&unavailable());
    }
    assert!(is_open(&b));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        health.check_failures(),
        vec!["payment circuit not closed for 30s".to_string()]
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    for _ in 0..2 {
        call(&b, Ok(()));
    }
    assert!(b.is_closed());
    assert!(health.check_failures().is_empty());
}
