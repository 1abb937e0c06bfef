use super::*;
use std::sync::Arc;

fn cfg() -> BreakerConfig {
    BreakerConfig {
        enabled: true,
        failure_rate: 0.5,
        window: 10,
        min_calls: 4,
        open_for: Duration::from_secs(5),
        half_open_probes: 2,
        not_ready_after: Duration::from_secs(30),
    }
}

fn breaker(cfg: BreakerConfig) -> CircuitBreaker {
    let gauge = IntGauge::new("circuit_state_test", "test").expect("gauge");
    CircuitBreaker::new("payment", &cfg, gauge)
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

/// One call through the breaker, which must let it through.
fn call(b: &CircuitBreaker, outcome: Result<(), CallError>) {
    b.try_acquire().expect("admitted").record(&outcome);
}

#[tokio::test(start_paused = true)]
async fn opens_at_the_rate_once_min_calls_are_in_the_window() {
    let b = breaker(cfg());
    call(&b, Ok(()));
    call(&b, unavailable());
    call(&b, Ok(()));
    assert!(b.is_closed(), "50 % of 3 calls: below min_calls");
    call(&b, unavailable());
    assert!(matches!(b.state(), State::Open { .. }), "2 of 4 = 50 %");
    assert_eq!(b.gauge.get(), 2);
    assert!(b.try_acquire().is_none());
    assert!(!b.admits());
}

#[tokio::test(start_paused = true)]
async fn stays_closed_below_min_calls_and_below_the_rate() {
    let b = breaker(BreakerConfig {
        min_calls: 6,
        ..cfg()
    });
    for _ in 0..5 {
        call(&b, unavailable());
    }
    assert!(
        b.is_closed(),
        "5 failures, all of them, but below min_calls"
    );
    let b = breaker(cfg());
    // Two in five fail: 40 % in every stretch of 10 calls.
    for i in 0..30 {
        call(&b, if i % 5 >= 3 { unavailable() } else { Ok(()) });
    }
    assert!(b.is_closed());
    assert_eq!(b.gauge.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_window_slides_old_failures_out() {
    let b = breaker(cfg());
    for i in 0..7 {
        call(&b, if i % 3 == 1 { unavailable() } else { Ok(()) });
    }
    for _ in 0..10 {
        call(&b, Ok(()));
    }
    // The early failures have left the window: 4 of the last 10 now…
    for _ in 0..4 {
        call(&b, unavailable());
    }
    assert!(b.is_closed());
    // …then 5 of the last 10, although only 7 of all 22 calls failed.
    call(&b, unavailable());
    assert!(matches!(b.state(), State::Open { .. }));
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_are_the_downstream_working() {
    let b = breaker(cfg());
    for _ in 0..20 {
        call(&b, refused());
    }
    assert!(b.is_closed());
    call(&b, Err(super::super::testing::timeout_error()));
    call(
        &b,
        Err(CallError::Status {
            status: 429,
            body: String::new(),
            retry_after: None,
        }),
    );
    assert!(b.is_closed(), "2 transient of 10");
}

fn open_it(b: &CircuitBreaker) {
    for _ in 0..4 {
        call(b, unavailable());
    }
    assert!(matches!(b.state(), State::Open { .. }));
}

#[tokio::test(start_paused = true)]
async fn half_open_probes_all_succeeding_close_it() {
    let b = breaker(cfg());
    open_it(&b);
    tokio::time::advance(Duration::from_millis(4_999)).await;
    assert!(b.try_acquire().is_none(), "still open");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(b.admits());
    let p1 = b.try_acquire().expect("first probe");
    assert_eq!(
        b.state(),
        State::HalfOpen {
            admitted: 1,
            succeeded: 0
        }
    );
    assert_eq!(b.gauge.get(), 1);
    let p2 = b.try_acquire().expect("second probe");
    assert!(b.try_acquire().is_none(), "only two probes");
    assert!(!b.admits());
    p1.record(&Ok(()));
    assert!(matches!(b.state(), State::HalfOpen { succeeded: 1, .. }));
    p2.record(&refused());
    assert_eq!(b.state(), State::Closed, "a 4xx probe is a success");
    assert_eq!(b.gauge.get(), 0);
    assert_eq!(b.not_closed_for(), None);
    // A fresh window: one failure does not reopen it.
    call(&b, unavailable());
    assert!(b.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_failing_probe_reopens_it_for_another_open_for() {
    let b = breaker(cfg());
    open_it(&b);
    tokio::time::advance(Duration::from_secs(5)).await;
    let p1 = b.try_acquire().expect("probe");
    let p2 = b.try_acquire().expect("probe");
    p1.record(&unavailable());
    assert!(matches!(b.state(), State::Open { .. }));
    assert_eq!(b.gauge.get(), 2);
    // The other probe's outcome belongs to a phase that is over.
    p2.record(&Ok(()));
    assert!(matches!(b.state(), State::Open { .. }));
    tokio::time::advance(Duration::from_millis(4_999)).await;
    assert!(b.try_acquire().is_none());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(b.try_acquire().is_some());
}

#[tokio::test(start_paused = true)]
async fn stragglers_from_an_earlier_phase_do_not_vote() {
    let b = breaker(cfg());
    let slow: Vec<_> = (0..4).map(|_| b.try_acquire().expect("closed")).collect();
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
    let p = b.try_acquire().expect("probe");
    p.record(&unavailable());
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
