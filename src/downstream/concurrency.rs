//! How many orders a stage works on at once: its downstream's concurrency
//! limit, fixed (`pipeline.<stage>_concurrency`, the default) or adaptive
//! (`[<downstream>.concurrency] mode = "adaptive"`).
//!
//! # The adaptive controller
//!
//! An AIMD loop in the spirit of Vector's adaptive request concurrency,
//! with a hold band and a probed base as in TCP Vegas and Netflix's
//! concurrency limits. Every call reports its round-trip time (RTT); a
//! transient failure (timeout, transport error, 429, 5xx) reports
//! back-pressure. The calls are judged once per *window*, one mean RTT
//! long, so the limit moves at most once per round trip however many calls
//! are in flight. With `base` the unloaded RTT and σ the deviation of the
//! smoothed RTT:
//!
//! * **decrease** (× [`DECREASE_RATIO`]) on evidence from calls sent after
//!   the last cut: one of them met back-pressure, or they show a queue at
//!   the downstream before it starts refusing — their mean RTT and the
//!   smoothed RTT both reach the **queue mark**
//!   `base·(1 + QUEUE_TOLERANCE) + QUEUE_K·σ`. Calls sent before the last
//!   cut say nothing about the new limit: a stall that every call under
//!   way met is one event and costs one cut, not one per window while its
//!   late answers come in;
//! * **increase** (+1) when the window *reached* the limit — the most calls
//!   under way at once touched it and the calls kept within one call of
//!   [`REACHED_SHARE`] of it under way on average (by Little's law, the
//!   window's summed RTT over its length, smoothed like the RTT), so a
//!   limit only a burst's peak touches does not grow — no call of the window met back-pressure, and
//!   the smoothed RTT is under the **busy** mark `base·(1 +
//!   QUEUE_TOLERANCE / 2) + QUEUE_K·σ`;
//! * **hold** between the busy mark and the queue: the downstream is kept
//!   busy with a queue of a few per cent of its capacity, and the limit
//!   stops there instead of climbing until the queue rule cuts it. That
//!   band is what keeps the limit near the capacity: without it the limit
//!   saws between C and the queue mark plus the smoothed RTT's lag of two
//!   windows (1.2·C for C = 48 on `scripts/bench flow`);
//! * **come down to what is used** when no window reached the limit for
//!   [`UNUSED_FOR`]: to one more than the calls kept under way on average
//!   (never above the most under way at once). A limit the calls do not
//!   reach says nothing about the downstream; left high it lets a burst
//!   overrun a downstream that shrank meanwhile, and it inflates the
//!   prefetch that follows the limits (`source::prefetch`). The limit
//!   stays within `min..=max`.
//!
//! The smoothed RTT is an exponentially weighted mean of the windows' mean
//! RTTs (weight [`EWMA_ALPHA`] for the newest), updated only by windows
//! without back-pressure, so an outage's fast errors do not teach it a
//! short RTT. σ is taken from the windows' **second differences**
//! (`x₃ − 2x₂ + x₁` has variance 6σ² for noise of deviation σ, and none for
//! a steady climb): the RTT's own rise while the limit climbs one call per
//! window is not noise, and counting it as noise (as a plain variance
//! does) widened both marks with the climb — the limit saw went higher, σ
//! with it. A jump of the limit starts the differences afresh. The rules
//! read the smoothed RTT, whose deviation is √(α / (2 − α)) = ½ of a
//! window's.
//!
//! `base` is measured by a **probe** every [`BASE_PERIOD`] (as Netflix's
//! Vegas limit and BBR's ProbeRTT do): the limit is held at [`PROBE_RATIO`]
//! of itself (at least one call less) until [`PROBE_WINDOWS`] windows have
//! answered calls sent at it. It runs only while the smoothed RTT is over
//! the busy mark (under it the calls see the downstream all but unloaded,
//! and a probe would only dip a limit still climbing) and not within
//! [`PROBE_AFTER_CUT`] windows of a cut (that limit is under the one the
//! downstream was worked at). The probe's RTT is **believed** if it is
//! under the base, or if it did not fall with the limit by even half the
//! probe's ratio; then it becomes the base and the limit goes back to
//! where it was. Calls that queue at the downstream take time in
//! proportion to their number, so a probe that still queues (just after
//! the capacity fell) sees the RTT fall with the limit and is not
//! believed — the base stays, and so does the probe's limit, which the
//! rules move from the next window on (a cut at once would compound with
//! the probe's); while a downstream or a client host that really got slower is
//! as slow at the lower limit, and is believed within one period. A
//! probe at the floor is believed: it cannot go lower. The base is the
//! probe's alone: the least smoothed RTT of recent windows is biased low by
//! noise, and a base that is low reads every ordinary window as a queue
//! (the limit sank to the floor in the noisy paused-time model); a base
//! taken from the saw's low point creeps up instead (the limit rose to
//! 2.5·C in two minutes; `tests` pins that it does not). A probe costs a
//! fifth of the calls for about three round trips every period (under 1 %).
//!
//! Constants, and why: α = 0.4 follows the last few windows yet smooths one
//! odd window (Vector's default); ×0.9 gives up 10 % per round trip, fast
//! enough to halve in about 7 windows, gentle enough that one 503 or one
//! window slowed by the host's own scheduling does not cost a third of the
//! throughput (a cut to `limit · base / RTT`, Little's law, was tried: it
//! lands at the capacity, but on a busy host two noisy windows took the
//! limit to 0.4·C and the throughput with it); the queue tolerance 0.1 and
//! the busy mark at half of it hold the limit where the RTT is 5–10 %
//! over the unloaded one, i.e. 1.05–1.1·C, well inside ±25 % for C ≥ 10
//! where one call is a tenth; QUEUE_K = 1 of the smoothed RTT's σ keeps a
//! loaded host's noise from reading as a queue. The price of reading RTT:
//! a client whose own RTT grows with its load (a CPU-bound host) is held
//! where a fifth more calls cost the busy mark's few per cent more RTT
//! (`tests`: past 40 of 48 when 48 calls take 1.6 times one). There is no separate
//! "sudden rise" rule (`RTT ≥ mean + k·σ`, Vector's): measured on a busy
//! two-core host it fired on scheduling noise and let the limit sink to
//! 20–30 for C = 32; a real rise reaches the smoothed RTT within two
//! windows, and a downstream that sheds load answers 503 at once.
//!
//! At `RUST_LOG=conveyor::downstream::concurrency=trace` every window's
//! verdict is logged (its RTTs, the base, σ, the calls under way, whether
//! it reached the limit) with the downstream it belongs to.
//!
//! # Why not a crate
//!
//! `tower` has a fixed `ConcurrencyLimit` only. The crates that port
//! Vector's controller (`rate_limiter_aimd`, `tower-resilience-adaptive`)
//! wrap one HTTP call as a tower layer or reqwest middleware; conveyor's
//! limit is the stage's worker pool — an order holds its slot across its
//! retries and their back-off, and the stage must not take an order off
//! its channel without a slot (that is the backpressure to the broker) — so
//! the limit must be a semaphore the stage acquires, fed by every attempt.
//! The controller is a few dozen lines; owning it keeps it testable with
//! paused time and free of a young dependency.
//!
//! # Following the limit
//!
//! The pool is a semaphore of `limit` permits. A raise adds permits; a cut
//! forgets free permits at once and the rest as they are released (a debt),
//! so work in flight always finishes — nothing is dropped or taken twice —
//! and the stage only takes new orders once it is under the new limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::resizable::{Permit, Resizable};
use controller::Controller;
use prometheus::{Histogram, IntGauge};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

mod controller;

/// Weight of the newest window in the RTT history.
pub const EWMA_ALPHA: f64 = 0.4;
/// The factor a window with back-pressure or inflated RTT cuts the limit by.
pub const DECREASE_RATIO: f64 = 0.9;
/// How many deviations of the smoothed RTT the busy and queue marks add
/// for noise (see the module doc).
pub const QUEUE_K: f64 = 1.0;
/// How far above the unloaded RTT the smoothed RTT may be before it counts
/// as a queue building at the downstream; at half of it the limit stops
/// growing (the busy mark).
pub const QUEUE_TOLERANCE: f64 = 0.1;
/// How often the unloaded RTT is measured again by a probe, so a
/// downstream (or a client host) whose latency really rose is believed
/// within this long.
pub const BASE_PERIOD: Duration = Duration::from_secs(2);
/// How many windows after a cut a due probe waits.
pub const PROBE_AFTER_CUT: u32 = 4;
/// A probe holds the limit at this share of itself.
pub const PROBE_RATIO: f64 = 0.8;
/// How many windows of calls sent at the probe's limit it measures.
pub const PROBE_WINDOWS: u32 = 2;
/// How long the calls must stay under the limit before it is brought down
/// to the most of them under way at once: longer than the pauses of an
/// intake that waits on the broker or on a commit, which are not a drop in
/// demand.
pub const UNUSED_FOR: Duration = Duration::from_secs(1);
/// The share of the limit the calls must keep under way on average over a
/// window for it to count as reached.
pub const REACHED_SHARE: f64 = 0.95;
/// The shortest window: a downstream answering in microseconds is judged
/// at most a thousand times a second.
pub const MIN_WINDOW: Duration = Duration::from_millis(1);

/// `[<downstream>.concurrency]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConcurrencyConfig {
    /// `fixed`: `pipeline.<stage>_concurrency`, always. `adaptive`: starts
    /// at `initial` and follows the downstream within `min..=max`.
    pub mode: Mode,
    pub initial: usize,
    pub min: usize,
    pub max: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Fixed,
    Adaptive,
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Fixed,
            initial: 8,
            min: 1,
            max: 256,
        }
    }
}

impl ConcurrencyConfig {
    /// The first field that is out of range, and why.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if self.mode == Mode::Fixed {
            return None;
        }
        if !(1..=100_000).contains(&self.max) {
            return Some(("max", format!("must be in 1..=100000, got {}", self.max)));
        }
        if !(1..=self.max).contains(&self.min) {
            return Some(("min", format!("must be in 1..=max, got {}", self.min)));
        }
        if !(self.min..=self.max).contains(&self.initial) {
            return Some((
                "initial",
                format!("must be in min..=max, got {}", self.initial),
            ));
        }
        None
    }
}

/// What a limit reports into: the gauges, and the downstream its log lines
/// name.
pub struct ConcurrencyMetrics {
    pub downstream: &'static str,
    pub limit: IntGauge,
    pub in_flight: IntGauge,
    pub rtt: Histogram,
}

/// What one attempt told the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    /// An answer, good or final (2xx, 4xx other than 429).
    Answered,
    /// Timeout, transport error, 429 or 5xx.
    BackPressure,
}

/// A downstream's concurrency limit: the stage's worker pool.
pub struct ConcurrencyLimit {
    slots: Resizable,
    in_flight: Arc<AtomicUsize>,
    /// Calls to the downstream under way (an order holds its slot also
    /// between its attempts and while it is handed on).
    calls: Arc<AtomicUsize>,
    /// The most calls under way at once since the controller's window began.
    peak: AtomicUsize,
    controller: Option<Mutex<Controller>>,
    metrics: ConcurrencyMetrics,
}

/// One call under way, from [`ConcurrencyLimit::call`] to
/// [`ConcurrencyLimit::record`].
#[must_use = "a call is given back to `record` with its outcome"]
pub struct Call {
    sent: Instant,
    /// Given back when the call ends, recorded or not (a call dropped
    /// mid-flight by the drain deadline must not count as under way).
    calls: Arc<AtomicUsize>,
}

impl Drop for Call {
    fn drop(&mut self) {
        self.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A slot in the pool, held for as long as one order is worked on.
pub struct Slot {
    _permit: Permit,
    in_flight: Arc<AtomicUsize>,
    busy: bool,
    gauge: IntGauge,
}

impl Slot {
    /// The slot's order is taken: from now on it counts as in flight.
    pub fn busy(&mut self) {
        if !self.busy {
            self.busy = true;
            let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
            self.gauge.set(now as i64);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.busy {
            let now = self.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
            self.gauge.set(now as i64);
        }
    }
}

impl ConcurrencyLimit {
    /// `fixed` is the stage's configured concurrency, used in fixed mode.
    pub fn new(cfg: &ConcurrencyConfig, fixed: usize, metrics: ConcurrencyMetrics) -> Self {
        let (limit, controller) = match cfg.mode {
            Mode::Fixed => (fixed.max(1), None),
            Mode::Adaptive => (
                cfg.initial.clamp(cfg.min.max(1), cfg.max.max(1)),
                Some(Mutex::new(Controller::new(
                    metrics.downstream,
                    cfg.min.max(1),
                    cfg.max.max(1),
                ))),
            ),
        };
        metrics.limit.set(limit as i64);
        metrics.in_flight.set(0);
        Self {
            slots: Resizable::new(limit),
            in_flight: Arc::new(AtomicUsize::new(0)),
            calls: Arc::new(AtomicUsize::new(0)),
            peak: AtomicUsize::new(0),
            controller,
            metrics,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.slots.limit()
    }

    /// Orders being worked on.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits for a free slot.
    pub async fn acquire(&self) -> Option<Slot> {
        Some(Slot {
            _permit: self.slots.acquire().await?,
            in_flight: self.in_flight.clone(),
            busy: false,
            gauge: self.metrics.in_flight.clone(),
        })
    }

    /// One call to the downstream begins: the controller learns whether
    /// the calls under way reach the limit, and [`record`](Self::record)
    /// takes the call back with its outcome.
    pub fn call(&self) -> Call {
        let now = self.calls.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(now, Ordering::AcqRel);
        Call {
            sent: Instant::now(),
            calls: self.calls.clone(),
        }
    }

    /// One call's outcome.
    pub fn record(&self, call: Call, feedback: Feedback) {
        let sent = call.sent;
        drop(call);
        let calls = self.calls.load(Ordering::Acquire);
        let now = Instant::now();
        let rtt = now.duration_since(sent).as_secs_f64();
        if feedback == Feedback::Answered {
            self.metrics.rtt.observe(rtt);
        }
        let Some(c) = &self.controller else {
            return;
        };
        let moved = {
            let Ok(mut c) = c.lock() else {
                return;
            };
            c.sample(sent, rtt, feedback);
            c.judge(now, self.limit(), &self.peak, calls)
        };
        if let Some(new) = moved {
            self.resize(new);
        }
    }

    fn resize(&self, new: usize) {
        let old = self.slots.resize(new);
        self.metrics.limit.set(new as i64);
        tracing::debug!(
            downstream = self.metrics.downstream,
            from = old,
            to = new,
            "concurrency limit moved"
        );
    }
}

#[cfg(test)]
#[path = "concurrency_tests.rs"]
mod tests;
