//! Retry policy: exponential backoff with full jitter, on the `backoff`
//! crate's machinery. Attempt n sleeps a uniform random time in
//! `[0, min(max_interval, initial * multiplier^n)]` (full jitter spreads a
//! thundering herd better than ±50 %), and nothing is retried once
//! `max_elapsed` has passed, `Retry-After` included.
//!
//! Every attempt goes through the downstream's [`CircuitBreaker`]. An outage
//! pauses an order instead of spending its budget; `retries_exhausted` is for
//! a downstream that answers but keeps failing. Precisely:
//!
//! * An attempt that has to wait for the circuit (open, or half-open with
//!   its probes taken) waits as long as it takes, and once let through the
//!   order's `max_elapsed` clock and its backoff **start over**: neither the
//!   wait nor what the order spent before the outage counts any more.
//! * A transient failure seen while the circuit is not closed (this failure
//!   opened it, or another call did) is never final: the order skips the
//!   backoff and the deadline check and goes straight back to the circuit,
//!   whose wait replaces the backoff.
//! * So an order is dead-lettered as `retries_exhausted` only after its
//!   transient failures went on for `max_elapsed` with the circuit closed
//!   throughout: a failure rate below the breaker's threshold, a downstream
//!   failing for this order only, or the breaker disabled (then the policy is
//!   plain backoff until `max_elapsed`).

use std::future::Future;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::breaker::{Attempt, CircuitBreaker};
use super::throttle::Throttle;
use super::CallError;
use crate::config::RetryConfig;

/// The `backoff` crate's exponential schedule, with each interval replaced
/// by a uniform draw below it. Every retry loop in conveyor that may run in
/// many places at once (downstream calls, batch commits, dead-letter
/// publishes) waits on this schedule.
pub struct FullJitter {
    inner: ExponentialBackoff,
    max: Duration,
}

impl FullJitter {
    pub fn new(cfg: &RetryConfig) -> Self {
        Self::exponential(cfg.initial_interval, cfg.multiplier, cfg.max_interval)
    }

    /// Doubling from `initial` up to `max`.
    pub fn doubling(initial: Duration, max: Duration) -> Self {
        Self::exponential(initial, 2.0, max)
    }

    fn exponential(initial: Duration, multiplier: f64, max: Duration) -> Self {
        let inner = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(initial)
            .with_multiplier(multiplier)
            .with_max_interval(max)
            .with_randomization_factor(0.0)
            // Callers enforce their own deadlines (`retry` below counts
            // Retry-After in it too), so the schedule never runs out.
            .with_max_elapsed_time(None)
            .build();
        Self { inner, max }
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        self.next_backoff().unwrap_or(self.max)
    }
}

impl Backoff for FullJitter {
    fn next_backoff(&mut self) -> Option<Duration> {
        self.inner
            .next_backoff()
            .map(|ceiling| ceiling.mul_f64(rand::random::<f64>()))
    }

    fn reset(&mut self) {
        self.inner.reset();
    }
}

/// How a retried call ended, when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// Transient failures until `max_elapsed`; carries the last one.
    #[error("retries exhausted after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: CallError },
    /// A failure no retry can fix (4xx other than 429).
    #[error("{0}")]
    Permanent(CallError),
}

/// Runs `op` until it succeeds, fails permanently, or `max_elapsed` has
/// passed with `breaker` closed. `on_retry` is told about each transient
/// failure before the wait (zero when the circuit, not a backoff, decides it).
pub async fn retry<T, F, Fut>(
    cfg: &RetryConfig,
    breaker: &CircuitBreaker,
    throttle: &Throttle,
    mut op: F,
    mut on_retry: impl FnMut(&CallError, Duration),
) -> Result<T, RetryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CallError>>,
{
    let mut start = Instant::now();
    let mut policy = FullJitter::new(cfg);
    let mut attempts = 0u32;
    // A first attempt earns retries their budget; so does the first after
    // an outage paused the order (its retries start over, and a recovery
    // must not crawl at the budget's floor).
    let mut fresh = true;
    loop {
        // Held back by the retry budget, the rate limit or a pause:
        // backpressure, not failure, so it does not count against
        // `max_elapsed`.
        // Only while the circuit is closed: an order that will wait for the
        // circuit anyway must not queue for the budget first, or a recovery
        // would be held to the budget's floor.
        if !fresh && breaker.is_closed() {
            start += throttle.admit_retry().await;
        }
        start += throttle.admit().await;
        let permit = match breaker.try_acquire() {
            Some(p) => p,
            None => {
                let p = breaker
                    .acquire()
                    .instrument(crate::telemetry::traces::order_step!(
                        "circuit breaker wait"
                    ))
                    .await;
                // The outage paused this order; its budget starts over.
                start = Instant::now();
                policy.reset();
                fresh = true;
                p
            }
        };
        // What the breaker weighs: a first attempt fully, a retry less.
        let attempt = if fresh {
            throttle.first_attempt();
            fresh = false;
            Attempt::First
        } else {
            Attempt::Retry
        };
        attempts += 1;
        let res = op().await;
        permit.record_as(attempt, &res);
        let err = match res {
            Ok(v) => return Ok(v),
            Err(e) if !e.is_transient() => return Err(RetryError::Permanent(e)),
            Err(e) => e,
        };
        if !breaker.is_closed() {
            on_retry(&err, Duration::ZERO);
            continue;
        }
        let wait = match err.retry_after() {
            Some(d) => d,
            None => policy.next_backoff().unwrap_or(cfg.max_interval),
        };
        if start.elapsed() + wait > cfg.max_elapsed {
            return Err(RetryError::Exhausted {
                attempts,
                last: err,
            });
        }
        on_retry(&err, wait);
        tokio::time::sleep(wait)
            .instrument(crate::telemetry::traces::order_step!(
                "retry backoff",
                wait_ms = wait.as_millis() as u64
            ))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BreakerConfig;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn cfg(max_elapsed_ms: u64) -> RetryConfig {
        RetryConfig {
            initial_interval: Duration::from_millis(10),
            multiplier: 2.0,
            max_interval: Duration::from_millis(80),
            max_elapsed: Duration::from_millis(max_elapsed_ms),
        }
    }

    fn breaker(cfg: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker::new(
            "payment",
            &cfg,
            super::super::breaker::BreakerMetrics::detached(),
        )
    }

    fn unthrottled() -> Throttle {
        Throttle::new(
            &crate::config::RateLimitConfig::default(),
            None,
            super::super::throttle::ThrottleMetrics {
                waited: prometheus::Counter::new("throttled_test", "test").expect("counter"),
                pauses: prometheus::IntCounter::new("pauses_test", "test").expect("counter"),
                refusals: prometheus::IntCounter::new("refusals_test", "test").expect("counter"),
            },
        )
    }

    /// The retry policy alone, as before circuit breakers.
    fn no_breaker() -> CircuitBreaker {
        breaker(BreakerConfig {
            enabled: false,
            ..BreakerConfig::default()
        })
    }

    fn unavailable() -> CallError {
        CallError::Status {
            status: 503,
            body: String::new(),
            retry_after: None,
        }
    }

    #[test]
    fn full_jitter_stays_under_the_exponential_ceiling() {
        let mut p = FullJitter::new(&cfg(1000));
        let ceilings = [10u64, 20, 40, 80, 80, 80];
        for c in ceilings {
            let d = p.next_backoff().expect("no deadline in the policy");
            assert!(d <= Duration::from_millis(c), "{d:?} > {c}ms");
        }
    }

    #[test]
    fn doubling_waits_stay_under_a_doubling_ceiling_capped_at_max() {
        let mut p = FullJitter::doubling(Duration::from_millis(200), Duration::from_millis(1600));
        for ceiling in [200u64, 400, 800, 1600, 1600, 1600] {
            assert!(p.next_wait() <= Duration::from_millis(ceiling));
        }
    }

    #[test]
    fn full_jitter_spreads_over_the_whole_interval() {
        let samples: Vec<Duration> = (0..200)
            .map(|_| {
                FullJitter::new(&cfg(1000))
                    .next_backoff()
                    .unwrap_or_default()
            })
            .collect();
        assert!(samples.iter().any(|d| *d < Duration::from_millis(3)));
        assert!(samples.iter().any(|d| *d > Duration::from_millis(7)));
    }

    #[tokio::test]
    async fn transient_then_success() {
        let calls = AtomicU32::new(0);
        let got = retry(
            &cfg(5_000),
            &no_breaker(),
            &unthrottled(),
            || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(CallError::Status {
                        status: 503,
                        body: String::new(),
                        retry_after: None,
                    })
                } else {
                    Ok(7)
                }
            },
            |_, _| {},
        )
        .await
        .expect("succeeds");
        assert_eq!(got, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn permanent_is_not_retried() {
        let calls = AtomicU32::new(0);
        let err = retry(
            &cfg(5_000),
            &no_breaker(),
            &unthrottled(),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(CallError::Status {
                    status: 422,
                    body: "bad".into(),
                    retry_after: None,
                })
            },
            |_, _| {},
        )
        .await
        .expect_err("fails");
        assert!(matches!(err, RetryError::Permanent(_)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn gives_up_at_max_elapsed() {
        let start = Instant::now();
        let err = retry(
            &cfg(200),
            &no_breaker(),
            &unthrottled(),
            || async { Err::<(), _>(super::super::testing::connect_error()) },
            |_, _| {},
        )
        .await
        .expect_err("exhausted");
        assert!(matches!(err, RetryError::Exhausted { attempts, .. } if attempts > 2));
        assert!(start.elapsed() <= Duration::from_millis(400));
    }

    #[tokio::test]
    async fn retry_after_counts_against_the_deadline() {
        let start = Instant::now();
        let err = retry(
            &cfg(100),
            &no_breaker(),
            &unthrottled(),
            || async {
                Err::<(), _>(CallError::Status {
                    status: 429,
                    body: String::new(),
                    retry_after: Some(Duration::from_secs(60)),
                })
            },
            |_, _| {},
        )
        .await
        .expect_err("exhausted");
        assert!(matches!(err, RetryError::Exhausted { attempts: 1, .. }));
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_circuit_pauses_the_order_instead_of_exhausting_it() {
        let b = breaker(BreakerConfig {
            min_calls: 3,
            open_for: Duration::from_secs(2),
            half_open_probes: 1,
            half_open_successes: 1,
            ..BreakerConfig::default()
        });
        let start = Instant::now();
        let outage = Duration::from_secs(20);
        let calls = AtomicU32::new(0);
        let got = retry(
            &cfg(500),
            &b,
            &unthrottled(),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                if start.elapsed() < outage {
                    Err(unavailable())
                } else {
                    Ok(7)
                }
            },
            |_, _| {},
        )
        .await
        .expect("waits out the outage");
        assert_eq!(got, 7);
        assert!(start.elapsed() >= outage, "{:?}", start.elapsed());
        assert!(b.is_closed());
        // Three to open it, then one probe per `open_for`, not a busy loop.
        let calls = calls.load(Ordering::SeqCst);
        assert!((3..=3 + 11).contains(&calls), "{calls} calls");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_starts_over_after_waiting_for_the_circuit() {
        // The order spends its whole budget (1 s) before the outage, waits
        // for the circuit, then keeps failing for 0.7 s more: it still
        // succeeds, because waiting started its budget over. (Only leaving
        // the wait out of the budget would have given up: 1 s + 0.7 s.)
        let b = Arc::new(breaker(BreakerConfig {
            min_calls: 100,
            open_for: Duration::from_millis(100),
            half_open_probes: 1,
            half_open_successes: 1,
            ..BreakerConfig::default()
        }));
        let t0 = Instant::now();
        let at = move |ms: u64| t0 + Duration::from_millis(ms);
        // Other orders: they open the circuit at 0.8 s, the first probe (at
        // 0.9 s) is theirs and succeeds at 2 s.
        let others = {
            let b = b.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(at(800)).await;
                while let Some(p) = b.try_acquire() {
                    p.record(&Err::<(), _>(unavailable()));
                }
                tokio::time::sleep_until(at(900)).await;
                let probe = b.try_acquire().expect("the first probe");
                tokio::time::sleep_until(at(2_000)).await;
                probe.record(&Ok(()));
            })
        };
        let got = retry(
            &cfg(1_000),
            &b,
            &unthrottled(),
            || async {
                let now = Instant::now();
                if now < at(600) {
                    Err(unavailable())
                } else if now < at(1_000) {
                    // A slow attempt, still in flight when the circuit opens.
                    tokio::time::sleep_until(at(1_000)).await;
                    Err(unavailable())
                } else if now < at(2_700) {
                    Err(unavailable())
                } else {
                    Ok(7)
                }
            },
            |_, _| {},
        )
        .await
        .expect("a fresh budget after the outage");
        assert_eq!(got, 7);
        assert!(t0.elapsed() >= Duration::from_millis(2_700));
        others.await.expect("others");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_while_the_circuit_stays_closed_still_exhaust() {
        // Too few calls to open the circuit: plain backoff until max_elapsed.
        let b = breaker(BreakerConfig {
            min_calls: 50,
            ..BreakerConfig::default()
        });
        let err = retry(
            &cfg(200),
            &b,
            &unthrottled(),
            || async { Err::<(), _>(unavailable()) },
            |_, _| {},
        )
        .await
        .expect_err("exhausted");
        assert!(matches!(err, RetryError::Exhausted { .. }), "{err}");
        assert!(b.is_closed());
    }
}
