//! Circuit breaker of one downstream: when it has stopped answering, stop
//! calling it for a while instead of spending every in-flight order's retry
//! budget on it, and let the backpressure chain pause intake meanwhile. A
//! downstream that fails only *in part* is left to retries and the
//! concurrency limit: the breaker is for outages, and must not open on the
//! chance fluctuations of a partial failure.
//!
//! * **Closed**: every call goes through. Outcomes are kept for the last
//!   `window` of time, in 40 buckets ([`window`]). The circuit opens when
//!   some recent stretch of it — the current bucket, or it and the one
//!   before, and so on back to the whole window — holds at least
//!   `min_calls` calls and its share of *transient* failures (timeout,
//!   connect error, 5xx, 429) reaches `failure_rate`. A permanent answer
//!   (4xx) is the downstream working and counts as a success.
//! * **Open** for `open_for`: no call goes through. The stage takes no new
//!   order and the orders already in it wait (see [`super::retry`]).
//! * **Half-open**: `half_open_probes` calls go through, the others still
//!   wait. `half_open_successes` of them succeeding closes the circuit (with
//!   an empty window); as soon as that many can no longer succeed, it opens
//!   again for another `open_for`.
//!
//! ## Why it judges this way
//!
//! **Time, not a count of calls.** Traffic varies; a window of the last N
//! calls is seconds at night and milliseconds at peak. A time window with a
//! minimum throughput (as resilience4j and Polly v8 do) judges more calls
//! when there are more, and none when there are too few to say anything.
//!
//! **Recent stretches, not only the whole window.** An outage stalls the
//! stage (its workers all retry, nothing new comes in), so failures arrive
//! slower than the successes before them did: over the whole window the
//! rate would reach `failure_rate` only once the healthy past aged out, a
//! whole `window` later. Judging the newest stretch that has `min_calls`
//! calls opens within one bucket (250 ms of the default 10 s) plus the time
//! `min_calls` failures take: with the default stage concurrency (64
//! workers) answered 503 at once, a fraction of a second; with every call
//! timing out after 500 ms, the timeout plus under a second. The price is
//! that each judgement tests up to 40 stretches, counted in the bound
//! below. At low traffic a stretch needs more time to hold `min_calls`
//! calls, and the circuit opens later; while the whole window holds fewer
//! than `min_calls`, a stretch of [`window::QUIET_OUTAGE_CALLS`] (30) calls
//! that all failed opens it, so an outage at a few orders a second pauses
//! intake too (30 failures in a row by chance: see that constant).
//!
//! **First attempts weigh more than retries.** Each call weighs 1 if it is
//! an order's first attempt (or its first after waiting for the circuit)
//! and [`window::RETRY_WEIGHT`] (0.25) if it is a retry. Under independent
//! failures both kinds fail at the same rate, so the weighting does not
//! bias the estimate. It matters when some orders fail for themselves
//! alone: each of them makes about 35 attempts before the default 30 s
//! `max_elapsed`, so at full weight 3 % of orders failing that way would
//! make half of all calls failures, and 20 % would reach 0.9; at 0.25 it
//! takes about half of the orders. Retries still count, so a stage whose
//! workers are all retrying (an outage, no first attempts left) is judged
//! on what it sees now. `min_calls` counts calls of either kind.
//!
//! **The maths behind the defaults** (`failure_rate` 0.9, `min_calls` 100,
//! `window` 10 s). With independent failures at rate p, the failed share of
//! a stretch is a weighted binomial; its effective sample size (Σw)²/Σw² is
//! at least 0.74 × its calls for p ≤ 0.5 (retries make up p/(1−p) of the
//! calls), so a stretch of 100 calls weighs like ≥ 74 independent trials.
//! The binomial tail P(X ≥ ⌈r·n⌉) for n trials at rate p:
//!
//! | p | failure_rate r | n = 74 | n = 100 | n = 150 | n = 250 |
//! |---|---|---|---|---|---|
//! | 0.3 | 0.5 | 2.4e-4 | 2.2e-5 | 2.3e-7 | 3.0e-11 |
//! | 0.5 | 0.8 | 3.1e-8 | 5.6e-10 | 3.0e-14 | 9.9e-23 |
//! | 0.5 | 0.9 | 1.1e-13 | 1.5e-17 | 1.3e-25 | 1.0e-41 |
//! | 0.3 | 0.9 | 1.4e-27 | 4.5e-36 | 2.1e-53 | 5.2e-88 |
//!
//! The circuit is judged at every call, over windows that slide by one
//! call; the chance that any of N windows of n calls crosses r is about
//! N·(r − p)·tail (the scan statistic), which also covers the 40 nested
//! stretches of a judgement. At 1,000 calls per second (N = 8.6·10⁷ a day)
//! the default opens on a 50 % partial failure with a chance of about
//! 4·10⁻⁶ a day (n = 74 row), and on a 30 % one never in practice.
//! `failure_rate` 0.8 at the same `min_calls` would open about once a day
//! on a 50 % failure. `failure_rate` 0.5 keeps a 30 % partial failure
//! closed only with a larger `min_calls`: at 300 (n_eff ≈ 250) about once
//! in five years at that traffic, at 200 (n_eff ≈ 166) about every other
//! day. Hence 0.9: a real outage fails every call (rate 1), and a
//! downstream still answering a tenth of its calls is served by retries
//! (an order fails all of its ~35 attempts at 85 % with a chance of 0.3 %,
//! and is then dead-lettered as `retries_exhausted`; enable the retry
//! budget, or lower `failure_rate` with a larger `min_calls`, where that
//! zone matters).
//!
//! **Half-open: a majority, not all.** With 3 probes of which 2 must
//! succeed, a downstream that is back but still fails 30 % of calls closes
//! the circuit with a chance of 0.78 per round (all of 3: 0.34), while one
//! still down (every probe failing) never does: it is judged after 2
//! failures, one probe's worth sooner than waiting for all three.
//!
//! Every outcome is tied to the phase its call was admitted in: a call that
//! started while closed and finishes after the circuit opened (or closed
//! again) does not vote, so a slow straggler neither reopens a circuit that
//! just recovered nor counts as a probe.
//!
//! The breaker is a plain state machine behind a mutex, timed with
//! `tokio::time::Instant`, so its tests drive it with paused time.

mod state;
pub mod window;

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::CallError;
use crate::config::BreakerConfig;
use crate::telemetry::ReadinessCheck;
pub use state::{BreakerMetrics, State};
pub use window::Attempt;
use window::Window;

#[derive(Debug)]
struct Inner {
    state: State,
    /// Bumped on every transition: a permit from an earlier phase does not vote.
    phase: u64,
    /// Outcomes of the calls of the last `window` while closed.
    window: Window,
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
    metrics: BreakerMetrics,
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
    /// Reports how an order's first attempt went: only a transient failure
    /// is a failure.
    pub fn record<T>(self, outcome: &Result<T, CallError>) {
        self.record_as(Attempt::First, outcome);
    }

    /// Reports how the call went, as the attempt it was.
    pub fn record_as<T>(mut self, attempt: Attempt, outcome: &Result<T, CallError>) {
        self.reported = true;
        let failed = matches!(outcome, Err(e) if e.is_transient());
        self.breaker.record(self.phase, self.probe, attempt, failed);
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
    pub fn new(downstream: &'static str, cfg: &BreakerConfig, metrics: BreakerMetrics) -> Self {
        metrics.state.set(State::Closed.gauge_value());
        Self {
            downstream,
            cfg: cfg.clone(),
            inner: Mutex::new(Inner {
                state: State::Closed,
                phase: 0,
                window: Window::new(cfg.window),
                not_closed_since: None,
            }),
            changed: watch::channel(()).0,
            metrics,
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
            reported: false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is a few plain fields, consistent after every statement
        // that could panic, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, phase: u64, probe: bool, attempt: Attempt, failed: bool) {
        if !self.cfg.enabled {
            return;
        }
        let mut inner = self.lock();
        if inner.phase != phase {
            return;
        }
        match inner.state {
            State::Closed => {
                inner.window.record(attempt, failed);
                if let Some(v) = inner
                    .window
                    .judge(self.cfg.min_calls, self.cfg.failure_rate)
                {
                    tracing::warn!(
                        downstream = self.downstream,
                        calls = v.calls,
                        failure_rate = v.failure_rate,
                        over = ?v.over,
                        open_for = ?self.cfg.open_for,
                        "circuit opens: the downstream keeps failing"
                    );
                    self.metrics.openings.inc();
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
                // Validated to be in 1..=probes; clamped all the same, so
                // that a hand-built config cannot leave the circuit stuck.
                let needed = self
                    .cfg
                    .half_open_successes
                    .clamp(1, self.cfg.half_open_probes.max(1));
                if succeeded >= needed {
                    tracing::info!(
                        downstream = self.downstream,
                        outage = ?inner.not_closed_since.map(|t| t.elapsed()),
                        probes_succeeded = succeeded,
                        probes_failed,
                        "circuit closes: enough probes succeeded"
                    );
                    inner.window.clear();
                    self.transition(&mut inner, State::Closed);
                } else if probes_failed > self.cfg.half_open_probes.saturating_sub(needed) {
                    tracing::warn!(
                        downstream = self.downstream,
                        probes_failed,
                        open_for = ?self.cfg.open_for,
                        "circuit reopens: too many probes failed"
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
        self.metrics.state.set(to.gauge_value());
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
mod tests;
