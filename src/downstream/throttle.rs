//! The pace of calls to one downstream: its configured rate limit
//! (`rate_limit.per_second`, `rate_limit.burst`), and a pause of the whole
//! downstream when it answers 429 with `Retry-After`.
//!
//! The limit is `governor`'s GCRA, the token bucket without a refill task: a
//! call may go when the bucket has a token, `burst` tokens at most, refilled
//! at `per_second`. Every attempt waits for a token, retries included, so
//! the limit holds for what the provider actually receives.
//!
//! A 429 with `Retry-After` says the provider wants no calls for a while,
//! not that this one call was early: every attempt of that downstream waits
//! until then (pauses overlap into the latest deadline). The time an order
//! spends waiting here does not count against its `retry.max_elapsed`: being
//! held back is backpressure, not failure.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus::{Counter, IntCounter};
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::config::{RateLimitConfig, RetryBudgetConfig};

/// The counters a [`Throttle`] reports into.
pub struct ThrottleMetrics {
    /// Seconds attempts spent waiting here.
    pub waited: Counter,
    /// 429s with `Retry-After` that paused the downstream.
    pub pauses: IntCounter,
    /// Retries that found the budget spent.
    pub refusals: IntCounter,
}

/// The longest pause a `Retry-After` can impose: a provider's (or a
/// proxy's) absurd value must not stop a downstream for hours.
pub const MAX_PAUSE: Duration = Duration::from_secs(300);

/// How often a retry over budget looks for room again.
const BUDGET_POLL: Duration = Duration::from_millis(20);

pub struct Throttle {
    limiter: Option<DefaultDirectRateLimiter>,
    budget: Option<TpsBudget>,
    /// Retries that found the budget spent and had to wait.
    refusals: IntCounter,
    clock: DefaultClock,
    paused_until: Mutex<Option<Instant>>,
    /// Seconds attempts spent waiting here.
    waited: Counter,
    /// 429s with `Retry-After` that paused the downstream.
    pauses: IntCounter,
}

impl Throttle {
    /// `budget` is `None` when `retry_budget.enabled` is false; its values
    /// are validated (`Config::validate`) to the ranges `TpsBudget` accepts.
    pub fn new(
        cfg: &RateLimitConfig,
        budget: Option<&RetryBudgetConfig>,
        metrics: ThrottleMetrics,
    ) -> Self {
        let limiter = NonZeroU32::new(cfg.per_second).map(|rate| {
            let burst = NonZeroU32::new(cfg.burst).unwrap_or(rate);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        let budget = budget.map(|b| {
            TpsBudget::new(
                b.window
                    .clamp(Duration::from_secs(1), Duration::from_secs(60)),
                b.min_per_second.min(1_000_000),
                b.ratio.clamp(0.0, 10.0),
            )
        });
        Self {
            limiter,
            budget,
            refusals: metrics.refusals,
            clock: DefaultClock::default(),
            paused_until: Mutex::new(None),
            waited: metrics.waited,
            pauses: metrics.pauses,
        }
    }

    /// An order's first attempt (or its first after an outage paused it):
    /// it earns retries their share of the budget.
    pub fn first_attempt(&self) {
        if let Some(b) = &self.budget {
            b.deposit();
        }
    }

    /// Waits until the retry budget has room for one more retry. Returns
    /// how long it waited.
    pub async fn admit_retry(&self) -> Duration {
        let Some(b) = &self.budget else {
            return Duration::ZERO;
        };
        let started = Instant::now();
        if !b.withdraw() {
            self.refusals.inc();
            while !b.withdraw() {
                tokio::time::sleep(BUDGET_POLL).await;
            }
        }
        let waited = started.elapsed();
        if !waited.is_zero() {
            self.waited.inc_by(waited.as_secs_f64());
        }
        waited
    }

    /// Waits until an attempt may go: past any pause, then for a token.
    /// Returns how long it waited.
    pub async fn admit(&self) -> Duration {
        let started = Instant::now();
        loop {
            let until = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
            match until {
                Some(until) if until > Instant::now() => tokio::time::sleep_until(until).await,
                _ => break,
            }
        }
        if let Some(limiter) = &self.limiter {
            while let Err(not_until) = limiter.check() {
                tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
            }
        }
        let waited = started.elapsed();
        if !waited.is_zero() {
            self.waited.inc_by(waited.as_secs_f64());
        }
        waited
    }

    /// The downstream asked for no calls for `retry_after`.
    pub fn pause(&self, retry_after: Duration) {
        let until = Instant::now() + retry_after.min(MAX_PAUSE);
        let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
        drop(paused);
        self.pauses.inc();
        tracing::warn!(
            ?retry_after,
            "downstream answered 429 with Retry-After; pausing its calls"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> ThrottleMetrics {
        ThrottleMetrics {
            waited: Counter::new("waited", "test").expect("counter"),
            pauses: IntCounter::new("pauses", "test").expect("counter"),
            refusals: IntCounter::new("refusals", "test").expect("counter"),
        }
    }

    fn throttle(per_second: u32, burst: u32) -> Throttle {
        Throttle::new(&RateLimitConfig { per_second, burst }, None, metrics())
    }

    #[tokio::test(start_paused = true)]
    async fn retries_get_their_share_of_first_attempts_then_wait() {
        let budget = RetryBudgetConfig {
            enabled: true,
            ratio: 0.2,
            min_per_second: 0,
            window: Duration::from_secs(10),
        };
        let t = Throttle::new(&RateLimitConfig::default(), Some(&budget), metrics());
        for _ in 0..100 {
            t.first_attempt();
        }
        // A fifth of 100 first attempts: about 20 retries go at once, then
        // one has to wait.
        let mut at_once = 0;
        while tokio::time::timeout(Duration::from_millis(1), t.admit_retry())
            .await
            .is_ok()
        {
            at_once += 1;
            assert!(at_once < 100, "the budget never ran out");
        }
        assert!((15..=25).contains(&at_once), "{at_once} retries at once");
        assert!(t.refusals.get() >= 1);
        // A retry over budget waits until more first attempts make room.
        let t = std::sync::Arc::new(t);
        let waiting = tokio::spawn({
            let t = t.clone();
            async move { t.admit_retry().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "a retry went over budget");
        for _ in 0..10 {
            t.first_attempt();
        }
        let waited = waiting.await.expect("join");
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
    }

    #[tokio::test]
    async fn off_by_default_and_never_waits() {
        let t = throttle(0, 0);
        let started = std::time::Instant::now();
        for _ in 0..10_000 {
            t.admit().await;
        }
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn holds_calls_to_the_rate_past_the_burst() {
        let t = throttle(100, 10);
        let started = std::time::Instant::now();
        for _ in 0..30 {
            t.admit().await;
        }
        // 10 at once, then 20 at 100/s: about 200 ms.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(180), "{took:?}");
        assert!(took < Duration::from_millis(1000), "{took:?}");
        assert!(t.waited.get() > 0.15);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_caller_until_the_latest_deadline() {
        let t = std::sync::Arc::new(throttle(0, 0));
        t.pause(Duration::from_secs(2));
        t.pause(Duration::from_secs(1));
        let started = Instant::now();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let t = t.clone();
                tokio::spawn(async move { t.admit().await })
            })
            .collect();
        for w in waiters {
            let waited = w.await.expect("join");
            assert!(waited >= Duration::from_secs(2), "{waited:?}");
        }
        assert!(started.elapsed() < Duration::from_millis(2100));
        assert_eq!(t.pauses.get(), 2);
        // Once past, calls go at once.
        assert_eq!(t.admit().await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_retry_after_is_capped() {
        let t = throttle(0, 0);
        t.pause(Duration::from_secs(86_400));
        assert!(t.admit().await <= MAX_PAUSE + Duration::from_millis(1));
    }
}
