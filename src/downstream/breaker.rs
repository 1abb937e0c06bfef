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
mod tests;
