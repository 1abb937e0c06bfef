//! How many orders a stage works on at once: its downstream's concurrency
//! limit, fixed (`pipeline.<stage>_concurrency`, the default) or adaptive
//! (`[<downstream>.concurrency] mode = "adaptive"`).
//!
//! # The adaptive controller
//!
//! An AIMD loop in the spirit of Vector's adaptive request concurrency.
//! Every answered attempt reports its round-trip time (RTT); a transient
//! failure (timeout, transport error, 429, 5xx) reports back-pressure. The
//! samples are judged once per *window*, one mean RTT long, so the limit
//! moves at most once per round trip however many calls are in flight:
//!
//! * **decrease** (× [`DECREASE_RATIO`]) when the window saw back-pressure,
//!   or its mean RTT shows a queue at the downstream before it starts
//!   refusing: RTT ≥ `mean + K·σ` of the RTT history (a sudden rise), or
//!   the smoothed RTT and the window's both reach
//!   `base·(1 + QUEUE_TOLERANCE) + QUEUE_K·σ`, `base` being the unloaded
//!   RTT (a queue that built up slowly, which a moving mean alone would
//!   follow);
//! * **increase** (+1) only when the window reached the limit — a stage
//!   that never has `limit` orders at once learns nothing about a higher
//!   one — and its RTT was not inflated in either sense;
//! * else hold. The limit stays within `min..=max`.
//!
//! The history is an exponentially weighted mean and variance of the
//! windows' mean RTTs (weight [`EWMA_ALPHA`] for the newest), updated only
//! by windows without back-pressure, so an outage's fast errors do not teach
//! it a short RTT. `base` is the least smoothed RTT (the mean, not one
//! window's: a lucky window must not set the norm) over the last
//! one or two [`BASE_PERIOD`]s, so a downstream whose latency really rose
//! is believed after at most two periods (until then the limit is held
//! low, the safe side). σ has a floor of [`MIN_DEVIATION`] of the mean: a
//! downstream with perfectly steady latency would otherwise treat a few
//! microseconds of scheduling noise as inflation.
//!
//! Against a downstream that serves C calls at once with steady latency the
//! limit saws between about C and 1.1·C: past C the RTT grows by 1/C per
//! extra call, at 1.1·C the queue rule cuts it to just under C, where the
//! RTT is the unloaded one again and the climb restarts — the downstream is
//! kept busy with a queue of at most a tenth of its capacity. A noisy RTT
//! (σ) widens the band by `QUEUE_K·σ`: noise must not read as a queue.
//!
//! Constants, and why: α = 0.4 follows the last few windows yet smooths one
//! odd window (Vector's default); ×0.9 gives up 10 % per round trip, fast
//! enough to halve in about 7 windows, gentle enough that one 503 does not
//! cost a third of the throughput; K = 3 flags a window three standard
//! deviations above normal, rare by chance even at a hundred windows a
//! second (Vector uses 2.5 over longer windows; measured against the
//! simulator, 2 cut the limit on noise alone); the queue tolerance
//! 0.1 = 1/0.9 − 1 makes one cut land under the capacity, and QUEUE_K = 2
//! keeps a busy host's scheduling noise (σ of 15–25 % of the RTT in a
//! debug build on a loaded machine) from reading as a queue.
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
/// How many standard deviations above its mean an RTT counts as inflated.
pub const K: f64 = 3.0;
/// How many standard deviations above the unloaded RTT (plus its tolerance)
/// the smoothed RTT must be to count as a queue.
pub const QUEUE_K: f64 = 2.0;
/// The least σ counted, as a share of the mean RTT.
pub const MIN_DEVIATION: f64 = 0.05;
/// How far above the unloaded RTT a window's RTT may be before it counts
/// as a queue building at the downstream: 1/0.9 − 1, so that one cut from
/// just over it lands just under the capacity, where the RTT shows the
/// unloaded value again.
pub const QUEUE_TOLERANCE: f64 = 0.1;
/// The unloaded RTT is the least of the last one or two periods this long,
/// so a downstream whose latency really rose is believed within 10–20 s.
pub const BASE_PERIOD: Duration = Duration::from_secs(10);
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
    /// The least good-window RTT of this base period and of the last one.
    base_now: Option<f64>,
    base_last: Option<f64>,
    base_period_start: Option<Instant>,
    window_start: Option<Instant>,
    window_rtt_sum: f64,
    window_rtt_n: u32,
    window_all_sum: f64,
    window_all_n: u32,
    back_pressure: bool,
    reached_limit: bool,
}

fn ewma(avg: &mut Option<f64>, x: f64) -> f64 {
    let prev = avg.unwrap_or(x);
    let diff = x - prev;
    *avg = Some(prev + EWMA_ALPHA * diff);
    diff
}

impl Controller {
    fn sample(&mut self, rtt: f64, feedback: Feedback) {
        self.window_all_sum += rtt;
        self.window_all_n += 1;
        match feedback {
            Feedback::Answered => {
                self.window_rtt_sum += rtt;
                self.window_rtt_n += 1;
            }
            Feedback::BackPressure => self.back_pressure = true,
        }
    }

    /// Closes the window if it is one RTT old; the new limit, if it moved.
    fn judge(&mut self, now: Instant, limit: usize) -> Option<usize> {
        let start = *self.window_start.get_or_insert(now);
        // Before any window closed, the first answers' RTT is the length.
        let first = self.window_all_sum / f64::from(self.window_all_n.max(1));
        let length = Duration::from_secs_f64(self.span.unwrap_or(first));
        if now.duration_since(start) < length.max(MIN_WINDOW) {
            return None;
        }
        let mean_of = |sum: f64, n: u32| (n > 0).then(|| sum / f64::from(n));
        let current = mean_of(self.window_rtt_sum, self.window_rtt_n);
        if let Some(all) = mean_of(self.window_all_sum, self.window_all_n) {
            ewma(&mut self.span, all);
        }
        let (back_pressure, reached) = (self.back_pressure, self.reached_limit);
        let (span, mean, base, min, max) = (self.span, self.mean, self.base(), self.min, self.max);
        *self = Self {
            span,
            mean,
            var: self.var,
            base_now: self.base_now,
            base_last: self.base_last,
            base_period_start: self.base_period_start,
            window_start: Some(now),
            min,
            max,
            ..Self::default()
        };
        let sigma = mean.map_or(0.0, |m| self.var.sqrt().max(MIN_DEVIATION * m));
        let spike = match (current, mean) {
            (Some(rtt), Some(mean)) => rtt >= mean + K * sigma,
            _ => false,
        };
        if let (false, Some(rtt)) = (back_pressure, current) {
            let diff = ewma(&mut self.mean, rtt);
            self.var = (1.0 - EWMA_ALPHA) * (self.var + EWMA_ALPHA * diff * diff);
            let period = *self.base_period_start.get_or_insert(now);
            if now.duration_since(period) >= BASE_PERIOD {
                self.base_last = self.base_now.take();
                self.base_period_start = Some(now);
            }
            if let Some(smoothed) = self.mean {
                self.base_now = Some(self.base_now.map_or(smoothed, |b| b.min(smoothed)));
            }
        }
        // Judged on the smoothed RTT: one lucky window must not become the
        // norm, nor one unlucky window a queue.
        // The window itself must show it too: the smoothed RTT lags, and
        // a cut that worked shows at once in the next window's RTT, which
        // must stop the cutting before the mean has caught up.
        let queueing = match (self.mean, current, base) {
            (Some(mean), Some(rtt), Some(base)) => {
                let over = base * (1.0 + QUEUE_TOLERANCE) + QUEUE_K * sigma;
                mean >= over && rtt >= over
            }
            _ => false,
        };
        let new = if back_pressure || queueing || spike {
            ((limit as f64 * DECREASE_RATIO).floor() as usize).max(self.min)
        } else if reached && current.is_some() {
            (limit + 1).min(self.max)
        } else {
            limit
        };
        (new != limit).then_some(new)
    }

    /// The unloaded RTT: the least good-window RTT of the last one or two
    /// base periods.
    fn base(&self) -> Option<f64> {
        match (self.base_now, self.base_last) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A downstream's concurrency limit: the stage's worker pool.
pub struct ConcurrencyLimit {
    slots: Resizable,
    in_flight: Arc<AtomicUsize>,
    controller: Option<Mutex<Controller>>,
    metrics: ConcurrencyMetrics,
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
    pub fn busy(&mut self, limit: &ConcurrencyLimit) {
        if !self.busy {
            self.busy = true;
            let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
            self.gauge.set(now as i64);
            if now >= limit.limit() {
                if let Some(c) = &limit.controller {
                    if let Ok(mut c) = c.lock() {
                        c.reached_limit = true;
                    }
                }
            }
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

    /// One attempt's outcome, `started` being when it was sent.
    pub fn record(&self, started: Instant, feedback: Feedback) {
        let now = Instant::now();
        let rtt = now.duration_since(started).as_secs_f64();
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
            c.sample(rtt, feedback);
            c.judge(now, self.limit())
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
