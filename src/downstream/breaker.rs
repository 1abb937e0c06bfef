//! Circuit breaker of one downstream: when it keeps failing, stop calling it
//! for a while instead of spending every in-flight order's retry budget on
//! it, and let the backpressure chain pause intake meanwhile.
//!
//! * **Closed**: every call goes through. The outcomes of the last
//!   `window` calls are kept; once at least `min_calls` are in the window and
//!   the share of *transient* failures (timeout, connect error, 5xx, 429)
//!   reaches `failure_rate`, the circuit opens. A permanent answer (4xx) is
//!   the downstream working and counts as a success.
//! * **Open** for `open_for`: no call goes through. The stage takes no new
//!   order and the orders already in it wait (see [`super::retry`]).
//! * **Half-open**: `half_open_probes` calls go through, the others still
//!   wait. All probes succeeding closes the circuit (with an empty window);
//!   one failing opens it again for another `open_for`.
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
    Open { until: Instant },
    HalfOpen { admitted: u32, succeeded: u32 },
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
    /// Outcomes of the most recent calls while closed, `true` = failed.
    window: VecDeque<bool>,
    failures: usize,
    /// When the circuit last left `Closed`; `None` while closed. Readiness
    /// measures the outage from here, across open/half-open cycles.
    not_closed_since: Option<Instant>,
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
    reported: bool,
}

impl Permit<'_> {
    /// Reports how the call went: only a transient failure is a failure.
    pub fn record<T>(mut self, outcome: &Result<T, CallError>) {
        self.reported = true;
        let failed = matches!(outcome, Err(e) if e.is_transient());
        self.breaker.record(self.phase, self.probe, failed);
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
                window: VecDeque::with_capacity(cfg.window as usize),
                failures: 0,
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
                    },
                );
                let phase = inner.phase;
                Some(self.permit(phase, true))
            }
            State::HalfOpen {
                admitted,
                succeeded,
            } if admitted < self.cfg.half_open_probes => {
                inner.state = State::HalfOpen {
                    admitted: admitted + 1,
                    succeeded,
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
            reported: false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is a few plain fields, consistent after every statement
        // that could panic, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, phase: u64, probe: bool, failed: bool) {
        if !self.cfg.enabled {
            return;
        }
        let mut inner = self.lock();
        if inner.phase != phase {
            return;
        }
        match inner.state {
            State::Closed => {
                inner.window.push_back(failed);
                inner.failures += usize::from(failed);
                if inner.window.len() > self.cfg.window as usize {
                    let oldest = inner.window.pop_front().unwrap_or(false);
                    inner.failures -= usize::from(oldest);
                }
                let calls = inner.window.len();
                let rate = inner.failures as f64 / calls as f64;
                if calls >= self.cfg.min_calls as usize && rate >= self.cfg.failure_rate {
                    tracing::warn!(
                        downstream = self.downstream,
                        calls,
                        failures = inner.failures,
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
            } if probe => {
                if failed {
                    tracing::warn!(
                        downstream = self.downstream,
                        open_for = ?self.cfg.open_for,
                        "circuit reopens: a probe failed"
                    );
                    self.open(&mut inner);
                } else if succeeded + 1 >= self.cfg.half_open_probes {
                    tracing::info!(
                        downstream = self.downstream,
                        outage = ?inner.not_closed_since.map(|t| t.elapsed()),
                        "circuit closes: every probe succeeded"
                    );
                    inner.window.clear();
                    inner.failures = 0;
                    self.transition(&mut inner, State::Closed);
                } else {
                    inner.state = State::HalfOpen {
                        admitted,
                        succeeded: succeeded + 1,
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
        } = inner.state
        {
            inner.state = State::HalfOpen {
                admitted: admitted.saturating_sub(1),
                succeeded,
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
}
