//! How many orders a stage works on at once: its downstream's concurrency
//! limit, fixed (`pipeline.<stage>_concurrency`, the default) or adaptive
//! (`[<downstream>.concurrency] mode = "adaptive"`).
//!
//! # The adaptive controller
//!
//! An AIMD loop in the spirit of Vector's adaptive request concurrency.
//! Every call reports its round-trip time (RTT); a transient failure
//! (timeout, transport error, 429, 5xx) reports back-pressure. The calls
//! are judged once per *window*, one mean RTT long, so the limit moves at
//! most once per round trip however many calls are in flight:
//!
//! * **decrease** (× [`DECREASE_RATIO`]) on evidence from calls sent after
//!   the last cut: one of them met back-pressure, or their mean RTT shows a
//!   queue at the downstream before it starts refusing — it and the
//!   smoothed RTT both reach `base·(1 + QUEUE_TOLERANCE) + QUEUE_K·σ`,
//!   `base` being the unloaded RTT. Calls sent before the last cut say
//!   nothing about the new limit: a stall or a burst of errors that every
//!   call under way met is one event and costs one cut, not one per window
//!   while its late answers come in;
//! * **increase** (+1) only when the calls under way reached the limit in
//!   the window (a stage whose calls never reach `limit` learns nothing
//!   about a higher one; an order that waits to be handed on or backs off
//!   between attempts holds its slot but makes no call) and no call of the
//!   window, however old, met back-pressure or a queue;
//! * **come down to what is used** when no window reached the limit for
//!   [`UNUSED_FOR`]: to the most calls that were under way at once. A
//!   limit the calls do not reach says nothing about the downstream; left
//!   high it lets a burst overrun a downstream that shrank meanwhile, and
//!   it inflates the prefetch that follows the limits
//!   (`source::prefetch`). The same burst again reaches the limit, which
//!   then grows from there;
//! * else hold. The limit stays within `min..=max`.
//!
//! The history is an exponentially weighted mean and variance of the
//! windows' mean RTTs (weight [`EWMA_ALPHA`] for the newest), updated only
//! by windows without back-pressure, so an outage's fast errors do not teach
//! it a short RTT. `base`, the unloaded RTT, is measured by a **probe**
//! every [`BASE_PERIOD`] (as Netflix's Vegas limit and BBR's ProbeRTT do):
//! the limit is held at [`PROBE_RATIO`] of itself until [`PROBE_WINDOWS`]
//! windows have answered calls sent at it, their mean RTT becomes `base`,
//! and the limit goes back to where it was; a lower smoothed RTT seen
//! since lowers it at once. A base taken as the least RTT of recent
//! windows instead creeps: with σ in the threshold, the saw's low point
//! still carries a small queue, each period's least RTT is a few per cent
//! above the last, and the limit rose with it without bound (to 2.5·C in
//! two minutes in the paused-time model; `tests` pins that it does not).
//! The probe sits a fifth under the saw, below the capacity, so it sees the
//! downstream unloaded; and when the RTT rose for a reason a cut does not
//! cure — a client host slowed by its own load, a downstream that really
//! got slower — the probe sees that too and it is believed within one
//! period, instead of holding the limit low for as long as an old minimum
//! is remembered. Limits under [`PROBE_LEAST`] are not probed: one call is
//! a fifth of them, and the queue rule's cut lands at the capacity by
//! itself. A probe costs a fifth of the calls for about three round trips
//! every period (well under 1 %). σ has a floor of [`MIN_DEVIATION`] of
//! the mean: a downstream with perfectly steady latency would otherwise
//! treat a few microseconds of scheduling noise as inflation.
//!
//! Against a downstream that serves C calls at once with steady latency the
//! limit saws between about C and 1.1·C: past C the RTT grows by 1/C per
//! extra call, at 1.1·C the queue rule cuts it to just under C, where the
//! RTT is the unloaded one again and the climb restarts — the downstream is
//! kept busy with a queue of at most a tenth of its capacity. A noisy RTT
//! (σ) widens the band by `QUEUE_K·σ`.
//!
//! Constants, and why: α = 0.4 follows the last few windows yet smooths one
//! odd window (Vector's default); ×0.9 gives up 10 % per round trip, fast
//! enough to halve in about 7 windows, gentle enough that one 503 does not
//! cost a third of the throughput; the queue tolerance 0.1 = 1/0.9 − 1
//! makes one cut land under the capacity; QUEUE_K = 1 is the compromise
//! between two failures measured here: σ includes the sawtooth's own
//! swing, so a larger multiple widens the band with it (QUEUE_K = 2
//! settled at 1.2–1.45·C, 17 for C = 12, on `scripts/bench flow`), and a
//! smaller one reads a loaded host's scheduling noise as a queue
//! (QUEUE_K = 0.5 held a debug build's limit at a median of 7 for C = 12
//! in `tests/concurrency.rs` run beside other suites). A false cut costs
//! little — the limit climbs back one call per round trip, and the
//! fresh-evidence rule keeps false cuts from cascading. There is no separate "sudden rise" rule
//! (`RTT ≥ mean + k·σ`, Vector's): measured on a busy two-core host it
//! fired on scheduling noise and let the limit sink to 20–30 for C = 32; a real rise reaches the smoothed RTT within two
//! windows, and a downstream that sheds load answers 503 at once.
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
use prometheus::{Histogram, IntGauge};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Weight of the newest window in the RTT history.
pub const EWMA_ALPHA: f64 = 0.4;
/// The factor a window with back-pressure or inflated RTT cuts the limit by.
pub const DECREASE_RATIO: f64 = 0.9;
/// How many standard deviations above the unloaded RTT (plus its tolerance)
/// the smoothed RTT must be to count as a queue (see the module doc).
pub const QUEUE_K: f64 = 1.0;
/// The least σ counted, as a share of the mean RTT.
pub const MIN_DEVIATION: f64 = 0.05;
/// How far above the unloaded RTT a window's RTT may be before it counts
/// as a queue building at the downstream: 1/0.9 − 1, so that one cut from
/// just over it lands just under the capacity, where the RTT shows the
/// unloaded value again.
pub const QUEUE_TOLERANCE: f64 = 0.1;
/// How often the unloaded RTT is measured again by a probe, so a
/// downstream (or a client host) whose latency really rose is believed
/// within this long.
pub const BASE_PERIOD: Duration = Duration::from_secs(2);
/// A probe holds the limit at this share of itself.
pub const PROBE_RATIO: f64 = 0.8;
/// How many windows of calls sent at the probe's limit it measures.
pub const PROBE_WINDOWS: u32 = 2;
/// The least limit probed: below it one call is a fifth of the limit or
/// more, and the queue rule's cut lands at the capacity by itself.
pub const PROBE_LEAST: usize = 5;
/// How long the calls must stay under the limit before it is brought down
/// to the most of them under way at once: longer than the pauses of an
/// intake that waits on the broker or on a commit, which are not a drop in
/// demand.
pub const UNUSED_FOR: Duration = Duration::from_secs(1);
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

/// The gauges a limit reports into.
pub struct ConcurrencyMetrics {
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

/// The AIMD state (see the module doc). Times in seconds.
#[derive(Debug, Default)]
struct Controller {
    min: usize,
    max: usize,
    /// EWMA of every window's mean RTT, failures included: the window's
    /// length.
    span: Option<f64>,
    /// EWMA of the good windows' mean RTT, and its variance.
    mean: Option<f64>,
    var: f64,
    /// The RTT the latest probe measured, and the least smoothed RTT since.
    base_probe: Option<f64>,
    base_since: Option<f64>,
    /// When the next probe is due; the one under way.
    next_probe: Option<Instant>,
    probe: Option<Probe>,
    /// When the limit was last cut for back-pressure or a queue: only calls
    /// sent after it are evidence for the next cut.
    last_cut: Option<Instant>,
    /// Since when no window reached the limit, and the most calls under
    /// way at once since.
    unreached_since: Option<Instant>,
    unreached_peak: usize,
    window: Window,
}

/// A probe under way: the limit held at [`PROBE_RATIO`] of `resume` until
/// [`PROBE_WINDOWS`] windows have answered calls sent at it.
#[derive(Debug)]
struct Probe {
    resume: usize,
    sum: f64,
    n: u32,
    windows: u32,
}

/// What one window saw.
#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    /// Answered calls: summed RTT, count.
    rtt_sum: f64,
    rtt_n: u32,
    /// Every call, failures included.
    all_sum: f64,
    all_n: u32,
    /// Answered calls sent after the last cut.
    fresh_sum: f64,
    fresh_n: u32,
    /// Back-pressure on a call sent after the last cut.
    back_pressure: bool,
    /// Back-pressure on any call: the window's RTT is not the norm.
    troubled: bool,
}

fn ewma(avg: &mut Option<f64>, x: f64) -> f64 {
    let prev = avg.unwrap_or(x);
    let diff = x - prev;
    *avg = Some(prev + EWMA_ALPHA * diff);
    diff
}

impl Controller {
    fn sample(&mut self, sent: Instant, rtt: f64, feedback: Feedback) {
        let w = &mut self.window;
        let fresh = self.last_cut.is_none_or(|cut| sent >= cut);
        w.all_sum += rtt;
        w.all_n += 1;
        match feedback {
            Feedback::Answered => {
                w.rtt_sum += rtt;
                w.rtt_n += 1;
                if fresh {
                    w.fresh_sum += rtt;
                    w.fresh_n += 1;
                }
            }
            Feedback::BackPressure => {
                w.troubled = true;
                w.back_pressure |= fresh;
            }
        }
    }

    /// Closes the window if it is one RTT old; the new limit, if it moved.
    /// `peak` holds the most calls under way at once since the window began.
    fn judge(
        &mut self,
        now: Instant,
        limit: usize,
        peak: &AtomicUsize,
        calls: usize,
    ) -> Option<usize> {
        let start = *self.window.start.get_or_insert(now);
        // Before any window closed, the first answers' RTT is the length.
        let first = self.window.all_sum / f64::from(self.window.all_n.max(1));
        let length = Duration::from_secs_f64(self.span.unwrap_or(first)).max(MIN_WINDOW);
        let elapsed = now.duration_since(start);
        if elapsed < length {
            return None;
        }
        let peak = peak.swap(calls, Ordering::AcqRel);
        let reached = peak >= limit;
        let w = std::mem::replace(
            &mut self.window,
            Window {
                start: Some(now),
                ..Window::default()
            },
        );
        let mean_of = |sum: f64, n: u32| (n > 0).then(|| sum / f64::from(n));
        let current = mean_of(w.rtt_sum, w.rtt_n);
        let fresh = mean_of(w.fresh_sum, w.fresh_n);
        if let Some(all) = mean_of(w.all_sum, w.all_n) {
            ewma(&mut self.span, all);
        }
        // The RTT's deviation before this window.
        let sigma = self
            .mean
            .map_or(0.0, |m| self.var.sqrt().max(MIN_DEVIATION * m));
        if let (false, Some(rtt)) = (w.troubled, current) {
            let diff = ewma(&mut self.mean, rtt);
            self.var = (1.0 - EWMA_ALPHA) * (self.var + EWMA_ALPHA * diff * diff);
            if let Some(smoothed) = self.mean {
                self.base_since = Some(self.base_since.map_or(smoothed, |b| b.min(smoothed)));
            }
        }
        let next_probe = *self.next_probe.get_or_insert(now + BASE_PERIOD);
        if let Some(mut probe) = self.probe.take() {
            if w.back_pressure {
                // The downstream pushes back even at the probe's limit: the
                // probe ends, the back-pressure rule below cuts from there,
                // and it measures again a period later.
                self.next_probe = Some(now + BASE_PERIOD);
            } else {
                if w.fresh_n > 0 {
                    probe.sum += w.fresh_sum;
                    probe.n += w.fresh_n;
                    probe.windows += 1;
                }
                if probe.windows < PROBE_WINDOWS {
                    self.probe = Some(probe);
                    return None;
                }
                self.base_probe = Some(probe.sum / f64::from(probe.n.max(1)));
                self.base_since = None;
                self.next_probe = Some(now + BASE_PERIOD);
                self.unreached_since = None;
                self.unreached_peak = 0;
                let new = probe.resume.clamp(self.min, self.max);
                return (new != limit).then_some(new);
            }
        } else if now >= next_probe && reached && limit >= PROBE_LEAST {
            // Calls sent from now on are the probe's: they go out only as
            // the calls under way fall under its limit.
            self.last_cut = Some(now);
            self.probe = Some(Probe {
                resume: limit,
                sum: 0.0,
                n: 0,
                windows: 0,
            });
            let new = self.scaled(limit, PROBE_RATIO);
            return (new != limit).then_some(new);
        }
        // Calls show a queue when their mean RTT and the smoothed one are
        // both above the unloaded RTT by the tolerance: judged on the
        // smoothed RTT, so one lucky window does not become the norm nor
        // one unlucky window a queue; on the calls' own too, because the
        // smoothed RTT lags and a cut that worked shows at once in the
        // calls sent after it, which must stop the cutting before the mean
        // catches up.
        let over = self
            .base()
            .map(|base| base * (1.0 + QUEUE_TOLERANCE) + QUEUE_K * sigma);
        let smoothed = self.mean;
        let inflated = |rtt: Option<f64>| match (rtt, smoothed, over) {
            (Some(rtt), Some(mean), Some(over)) => mean >= over && rtt >= over,
            _ => false,
        };
        let since = if reached {
            self.unreached_since = None;
            self.unreached_peak = 0;
            now
        } else {
            self.unreached_peak = self.unreached_peak.max(peak);
            *self.unreached_since.get_or_insert(start)
        };
        // Cut only on calls sent after the last cut (a stall or a burst of
        // errors that they all met is one event, not one per window); grow
        // only when no call of the window, however old, saw trouble.
        let new = if w.back_pressure || inflated(fresh) {
            self.last_cut = Some(now);
            self.scaled(limit, DECREASE_RATIO)
        } else if reached && current.is_some() && !w.troubled && !inflated(current) {
            (limit + 1).min(self.max)
        } else if now.duration_since(since) >= UNUSED_FOR {
            // A limit the calls have not reached for a while says nothing
            // about the downstream: it comes down to the most calls that
            // were under way at once, so the same burst again reaches it
            // (and it grows from there, one call per round trip).
            let target = self.unreached_peak.clamp(self.min, self.max);
            self.unreached_since = Some(now);
            self.unreached_peak = 0;
            limit.min(target)
        } else {
            limit
        };
        (new != limit).then_some(new)
    }

    /// `limit` scaled down by `ratio`, not under the floor.
    fn scaled(&self, limit: usize, ratio: f64) -> usize {
        ((limit as f64 * ratio).floor() as usize).max(self.min)
    }

    /// The unloaded RTT: what the latest probe measured, or less if a
    /// window since showed less.
    fn base(&self) -> Option<f64> {
        match (self.base_probe, self.base_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
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
                Some(Mutex::new(Controller {
                    min: cfg.min.max(1),
                    max: cfg.max.max(1),
                    ..Controller::default()
                })),
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
        tracing::debug!(from = old, to = new, "concurrency limit moved");
    }
}

#[cfg(test)]
#[path = "concurrency_tests.rs"]
mod tests;
