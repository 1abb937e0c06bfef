//! Circuit breaker of one downstream: when it keeps failing, stop calling it
//! for a while instead of spending every in-flight order's retry budget on
//! it, and let the backpressure chain pause intake meanwhile.
//!
//! * **Closed**: every call goes through. The outcomes of the calls of the
//!   last `window_duration` (at most the last `window` of them) are kept: a
//!   sliding window in time, so its size follows the traffic and a busy
//!   downstream is judged on thousands of calls, not on the last twenty. Once
//!   the window holds at least `min_calls` calls (a minimum throughput) and
//!   the share of *transient* failures (timeout, connect error, 5xx, 429)
//!   reaches `failure_rate`, the circuit opens. A permanent answer (4xx) is
//!   the downstream working and counts as a success.
//! * **First attempts and retries are weighed apart.** The rate is that of
//!   the orders' *first* attempts whenever the window holds `min_calls` of
//!   them: retries repeat the calls that already failed, so counting them
//!   would inflate the rate (one order failing for its own reasons, retried
//!   ten times, must not look like ten failing orders). Only when there are
//!   too few first attempts — intake has stalled because every worker is busy
//!   retrying, which is what a real outage looks like — does the rate over all
//!   attempts decide.
//! * **Open** for `open_for`: no call goes through. The stage takes no new
//!   order and the orders already in it wait (see [`super::retry`]).
//! * **Half-open**: `half_open_probes` calls go through, the others still
//!   wait. A majority of them succeeding closes the circuit (with an empty
//!   window); as soon as a majority can no longer succeed it opens again for
//!   another `open_for`. All-of-N would reopen a downstream that fails 30 %
//!   of calls two times in three with three probes; a majority of three
//!   closes it four times in five, and a dead downstream still fails them all.
//!
//! Why: a count window of 20 calls at 30 % transient failures reaches 50 % by
//! chance about once every 20 calls (binomial tail), so a partial failure
//! that retries absorb completely became an outage. With the defaults (10 s,
//! at least 50 calls) the same 30 % is more than 3 standard deviations below
//! the threshold even at the minimum throughput, and further still at any
//! real load.
//!
//! Every outcome is tied to the phase its call was admitted in: a call that
//! started while closed and finishes after the circuit opened (or closed
//! again) does not vote, so a slow straggler neither reopens a circuit that
//! just recovered nor counts as a probe.
//!
//! The breaker is a plain state machine behind a mutex, timed with
//! `tokio::time::Instant`, so its tests drive it with paused time.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::watch;
use tokio::time::Instant;

use super::CallError;
use crate::config::BreakerConfig;
use crate::telemetry::ReadinessCheck;

/// Where a circuit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        admitted: u32,
        succeeded: u32,
        failed: u32,
    },
}

impl State {
    /// The value of `conveyor_circuit_state`.
    pub fn gauge_value(&self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen { .. } => 1,
            State::Open { .. } => 2,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen { .. } => "half-open",
            State::Open { .. } => "open",
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Bumped on every transition: a permit from an earlier phase does not vote.
    phase: u64,
    /// The calls of the window while closed, oldest first.
    window: VecDeque<Outcome>,
    tally: Tally,
    /// When the circuit last left `Closed`; `None` while closed. Readiness
    /// measures the outage from here, across open/half-open cycles.
    not_closed_since: Option<Instant>,
}

/// One call's outcome in the window.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    at: Instant,
    failed: bool,
    retry: bool,
}

/// Counts over the window, kept in step with it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    calls: usize,
    failures: usize,
    first_calls: usize,
    first_failures: usize,
}

impl Tally {
    fn add(&mut self, o: Outcome, sign: bool) {
        let step = |n: &mut usize, by: bool| {
            if by {
                if sign {
                    *n += 1;
                } else {
                    *n = n.saturating_sub(1);
                }
            }
        };
        step(&mut self.calls, true);
        step(&mut self.failures, o.failed);
        step(&mut self.first_calls, !o.retry);
        step(&mut self.first_failures, !o.retry && o.failed);
    }

    /// The failure rate that decides, with the calls it is over: first
    /// attempts when there are `min_calls` of them, else all attempts;
    /// `None` below the minimum throughput.
    fn verdict(&self, min_calls: usize) -> Option<(f64, usize)> {
        if self.first_calls >= min_calls {
            Some((
                self.first_failures as f64 / self.first_calls as f64,
                self.first_calls,
            ))
        } else if self.calls >= min_calls {
            Some((self.failures as f64 / self.calls as f64, self.calls))
        } else {
            None
        }
    }
}

/// The circuit breaker of one downstream.
#[derive(Debug)]
pub struct CircuitBreaker {
    downstream: &'static str,
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
    /// Ticks on every transition and every released probe slot, so that
    /// waiters re-check instead of polling.
    changed: watch::Sender<()>,
    gauge: IntGauge,
}

/// Leave to make one call. Report its outcome with [`Permit::record`]; a
/// permit dropped unreported (the call was cancelled) frees its probe slot
/// without voting.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    phase: u64,
    probe: bool,
    retry: bool,
    reported: bool,
}

impl Permit<'_> {
    /// Marks the call as a retry of an order already tried: while closed it
    /// is weighed apart from first attempts (see the module doc).
    pub fn retry(mut self) -> Self {
        self.retry = true;
        self
    }

    /// Reports how the call went: only a transient failure is a failure.
    pub fn record<T>(mut self, outcome: &Result<T, CallError>) {
        self.reported = true;
        let failed = matches!(outcome, Err(e) if e.is_transient());
        self.breaker
            .record(self.phase, self.probe, self.retry, failed);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            self.breaker.release_probe(self.phase);
        }
    }
}

impl CircuitBreaker {
    /// `gauge` is this downstream's `conveyor_circuit_state` series.
    pub fn new(downstream: &'static str, cfg: &BreakerConfig, gauge: IntGauge) -> Self {
        gauge.set(State::Closed.gauge_value());
        Self {
            downstream,
            cfg: cfg.clone(),
            inner: Mutex::new(Inner {
                state: State::Closed,
                phase: 0,
                window: VecDeque::new(),
                tally: Tally::default(),
                not_closed_since: None,
            }),
            changed: watch::channel(()).0,
            gauge,
        }
    }

    pub fn downstream(&self) -> &'static str {
        self.downstream
    }

    pub fn state(&self) -> State {
        self.lock().state
    }

    /// Closed (or disabled): a failure now is the downstream's own answer,
    /// not an outage the breaker is handling.
    pub fn is_closed(&self) -> bool {
        matches!(self.state(), State::Closed)
    }

    /// How long the circuit has gone without closing; `None` while closed.
    pub fn not_closed_for(&self) -> Option<Duration> {
        self.lock().not_closed_since.map(|t| t.elapsed())
    }

    /// Leave for one call now, or `None` while the circuit is open or all
    /// half-open probes are taken. The first call after `open_for` turns the
    /// circuit half-open and is its first probe.
    pub fn try_acquire(&self) -> Option<Permit<'_>> {
        if !self.cfg.enabled {
            return Some(self.permit(0, false));
        }
        let mut inner = self.lock();
        match inner.state {
            State::Closed => {
                let phase = inner.phase;
                Some(self.permit(phase, false))
            }
            State::Open { until } if Instant::now() < until => None,
            State::Open { .. } => {
                self.transition(
                    &mut inner,
                    State::HalfOpen {
                        admitted: 1,
                        succeeded: 0,
                        failed: 0,
                    },
                );
                let phase = inner.phase;
                Some(self.permit(phase, true))
            }
            State::HalfOpen {
                admitted,
                succeeded,
                failed,
            } if admitted < self.cfg.half_open_probes => {
                inner.state = State::HalfOpen {
                    admitted: admitted + 1,
                    succeeded,
                    failed,
                };
                let phase = inner.phase;
                Some(self.permit(phase, true))
            }
            State::HalfOpen { .. } => None,
        }
    }

    /// Leave for one call, waiting for it as long as the circuit says so.
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            // Subscribed before looking, so a transition in between is not missed.
            let mut changed = self.changed.subscribe();
            if let Some(p) = self.try_acquire() {
                return p;
            }
            self.wait_for_change(&mut changed).await;
        }
    }

    /// Whether a call would be let through now (without taking a permit).
    pub fn admits(&self) -> bool {
        if !self.cfg.enabled {
            return true;
        }
        match self.lock().state {
            State::Closed => true,
            State::Open { until } => Instant::now() >= until,
            State::HalfOpen { admitted, .. } => admitted < self.cfg.half_open_probes,
        }
    }

    /// Returns once a call would be let through: what a stage waits for
    /// before it takes its next order.
    pub async fn admitting(&self) {
        loop {
            let mut changed = self.changed.subscribe();
            if self.admits() {
                return;
            }
            self.wait_for_change(&mut changed).await;
        }
    }

    async fn wait_for_change(&self, changed: &mut watch::Receiver<()>) {
        let until = match self.state() {
            State::Open { until } => Some(until),
            _ => None,
        };
        match until {
            // Nothing else may happen while open: the end of `open_for` is
            // what lets the next caller through.
            Some(until) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    _ = changed.changed() => {}
                }
            }
            // The sender lives as long as `self`, so this cannot fail while
            // we are borrowed; if it did, re-checking is still right.
            None => {
                let _ = changed.changed().await;
            }
        }
    }

    fn permit(&self, phase: u64, probe: bool) -> Permit<'_> {
        Permit {
            breaker: self,
            phase,
            probe,
            retry: false,
            reported: false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is a few plain fields, consistent after every statement
        // that could panic, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the calls that have left the window: older than
    /// `window_duration`, or beyond the last `window`.
    fn slide(&self, inner: &mut Inner, now: Instant) {
        let max = self.cfg.window as usize;
        while let Some(&oldest) = inner.window.front() {
            let stale = now.saturating_duration_since(oldest.at) >= self.cfg.window_duration;
            if !stale && inner.window.len() <= max {
                break;
            }
            inner.window.pop_front();
            inner.tally.add(oldest, false);
        }
    }

    /// Probes that must succeed to close the circuit: a strict majority.
    fn majority(&self) -> u32 {
        self.cfg.half_open_probes / 2 + 1
    }

    fn record(&self, phase: u64, probe: bool, retry: bool, failed: bool) {
        if !self.cfg.enabled {
            return;
        }
        let mut inner = self.lock();
        if inner.phase != phase {
            return;
        }
        match inner.state {
            State::Closed => {
                let now = Instant::now();
                let o = Outcome {
                    at: now,
                    failed,
                    retry,
                };
                inner.window.push_back(o);
                inner.tally.add(o, true);
                self.slide(&mut inner, now);
                let Some((rate, calls)) = inner.tally.verdict(self.cfg.min_calls as usize) else {
                    return;
                };
                if rate >= self.cfg.failure_rate {
                    let t = inner.tally;
                    tracing::warn!(
                        downstream = self.downstream,
                        calls,
                        first_attempts = t.first_calls,
                        first_attempt_failures = t.first_failures,
                        attempts = t.calls,
                        failures = t.failures,
                        failure_rate = rate,
                        open_for = ?self.cfg.open_for,
                        "circuit opens: the downstream keeps failing"
                    );
                    self.open(&mut inner);
                }
            }
            State::HalfOpen {
                admitted,
                succeeded,
                failed: probes_failed,
            } if probe => {
                let (succeeded, probes_failed) = if failed {
                    (succeeded, probes_failed + 1)
                } else {
                    (succeeded + 1, probes_failed)
                };
                let majority = self.majority();
                if succeeded >= majority {
                    tracing::info!(
                        downstream = self.downstream,
                        succeeded,
                        failed = probes_failed,
                        outage = ?inner.not_closed_since.map(|t| t.elapsed()),
                        "circuit closes: a majority of the probes succeeded"
                    );
                    inner.window.clear();
                    inner.tally = Tally::default();
                    self.transition(&mut inner, State::Closed);
                } else if probes_failed > self.cfg.half_open_probes - majority {
                    tracing::warn!(
                        downstream = self.downstream,
                        succeeded,
                        failed = probes_failed,
                        open_for = ?self.cfg.open_for,
                        "circuit reopens: a majority of the probes can no longer succeed"
                    );
                    self.open(&mut inner);
                } else {
                    inner.state = State::HalfOpen {
                        admitted,
                        succeeded,
                        failed: probes_failed,
                    };
                }
            }
            // A non-probe outcome while half-open, or any while open, comes
            // from a phase that is over (the phase check above catches it).
            State::HalfOpen { .. } | State::Open { .. } => {}
        }
    }

    /// A probe ended without an outcome: its slot goes to the next caller.
    fn release_probe(&self, phase: u64) {
        let mut inner = self.lock();
        if inner.phase != phase {
            return;
        }
        if let State::HalfOpen {
            admitted,
            succeeded,
            failed,
        } = inner.state
        {
            inner.state = State::HalfOpen {
                admitted: admitted.saturating_sub(1),
                succeeded,
                failed,
            };
            drop(inner);
            self.changed.send_replace(());
        }
    }

    fn open(&self, inner: &mut Inner) {
        let until = Instant::now() + self.cfg.open_for;
        self.transition(inner, State::Open { until });
    }

    /// Every change of state goes through here: new phase, gauge, log, wake-up.
    fn transition(&self, inner: &mut Inner, to: State) {
        let from = inner.state;
        inner.state = to;
        inner.phase += 1;
        match to {
            State::Closed => inner.not_closed_since = None,
            _ => {
                inner.not_closed_since.get_or_insert_with(Instant::now);
            }
        }
        self.gauge.set(to.gauge_value());
        tracing::info!(
            downstream = self.downstream,
            from = from.name(),
            to = to.name(),
            "circuit state changed"
        );
        self.changed.send_replace(());
    }
}

impl ReadinessCheck for CircuitBreaker {
    fn not_ready(&self) -> Option<String> {
        let out = self.not_closed_for()?;
        (out >= self.cfg.not_ready_after).then(|| {
            format!(
                "{} circuit not closed for {}s",
                self.downstream,
                out.as_secs()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            enabled: true,
            failure_rate: 0.5,
            window: 10,
            window_duration: Duration::from_secs(10),
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
        call(&b, Err(CallError::Transport("timeout: deadline".into())));
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
    async fn half_open_probes_succeeding_close_it() {
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
                succeeded: 0,
                failed: 0,
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
    #[tokio::test(start_paused = true)]
    async fn the_window_is_in_time() {
        let b = breaker(BreakerConfig {
            window: 1_000,
            ..cfg()
        });
        for _ in 0..3 {
            call(&b, unavailable());
        }
        // Ten seconds later those three have left the window.
        tokio::time::advance(Duration::from_secs(10)).await;
        call(&b, unavailable());
        assert!(b.is_closed(), "one failure in the window, below min_calls");
        for _ in 0..3 {
            call(&b, Ok(()));
        }
        assert!(b.is_closed(), "1 of 4");
        tokio::time::advance(Duration::from_millis(9_999)).await;
        call(&b, unavailable());
        assert!(b.is_closed(), "2 of 5");
        call(&b, unavailable());
        assert!(matches!(b.state(), State::Open { .. }), "3 of 6 in 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_weighed_apart_from_first_attempts() {
        let b = breaker(BreakerConfig {
            window: 1_000,
            ..cfg()
        });
        for _ in 0..4 {
            call(&b, Ok(()));
        }
        // One order failing for its own reasons, retried many times, among
        // healthy first attempts: 3 of 4 calls fail.
        for i in 0..40 {
            if i % 4 == 0 {
                call(&b, Ok(()));
            } else {
                b.try_acquire()
                    .expect("admitted")
                    .retry()
                    .record(&unavailable());
            }
        }
        assert!(b.is_closed(), "every first attempt succeeded");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_decide_when_first_attempts_are_too_few() {
        let b = breaker(cfg());
        call(&b, unavailable());
        for _ in 0..3 {
            b.try_acquire()
                .expect("admitted")
                .retry()
                .record(&unavailable());
        }
        assert!(
            matches!(b.state(), State::Open { .. }),
            "workers stuck retrying: an outage"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_failure_does_not_open_it_at_the_defaults() {
        let b = breaker(BreakerConfig::default());
        // 30 % transient failures at 200 calls/s for a minute, first attempts
        // and their retries, in a fixed pseudo-random order.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..60 * 200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let fails = x % 100 < 30;
            let p = b.try_acquire().expect("closed");
            let p = if x % 3 == 0 { p.retry() } else { p };
            p.record(&if fails { unavailable() } else { Ok(()) });
            tokio::time::advance(Duration::from_millis(5)).await;
        }
        assert!(b.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_closes_on_a_majority_and_reopens_once_it_is_lost() {
        let b = breaker(BreakerConfig {
            half_open_probes: 3,
            ..cfg()
        });
        open_it(&b);
        tokio::time::advance(Duration::from_secs(5)).await;
        let probes: Vec<_> = (0..3).map(|_| b.try_acquire().expect("probe")).collect();
        let mut probes = probes.into_iter();
        probes.next().expect("probe").record(&unavailable());
        assert!(matches!(b.state(), State::HalfOpen { failed: 1, .. }));
        probes.next().expect("probe").record(&Ok(()));
        probes.next().expect("probe").record(&Ok(()));
        assert!(b.is_closed(), "2 of 3");

        open_it(&b);
        tokio::time::advance(Duration::from_secs(5)).await;
        let probes: Vec<_> = (0..3).map(|_| b.try_acquire().expect("probe")).collect();
        let mut probes = probes.into_iter();
        probes.next().expect("probe").record(&Ok(()));
        probes.next().expect("probe").record(&unavailable());
        assert!(matches!(b.state(), State::HalfOpen { .. }));
        probes.next().expect("probe").record(&unavailable());
        assert!(matches!(b.state(), State::Open { .. }), "2 of 3 failed");
    }
}
