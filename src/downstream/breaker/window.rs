//! What a closed circuit remembers: the outcomes of the calls of the last
//! `window`, in [`BUCKETS`] buckets of `window / BUCKETS` each, and the
//! judgement on them (see the parent module for why it is made this way).

use std::time::Duration;

use tokio::time::Instant;

/// Buckets per window. 40 keeps the look-back exact to 2.5 % of the window
/// and lets the onset of an outage be judged within one bucket (250 ms of
/// the default 10 s) of fresh failures, at the cost of 40 additions per
/// judgement.
pub const BUCKETS: usize = 40;

/// What a retry weighs against a first attempt in the failure rate. Below 1
/// so that a few orders failing for themselves alone, each retried a dozen
/// times or more before `retry.max_elapsed`, cannot stand for a failing
/// downstream; above 0 so that a stage whose workers are all busy retrying
/// (an outage: no new first attempts) is still judged on what it sees now.
pub const RETRY_WEIGHT: f64 = 0.25;

/// At low traffic (fewer than `min_calls` calls in the whole window, so no
/// stretch can be judged on its rate), a stretch of this many calls that
/// *all* failed opens the circuit: an outage at a few orders a second must
/// pause intake too. By chance that takes 30 failures in a row: 0.5³⁰ ≈
/// 10⁻⁹ per judgement at a 50 % partial failure, which at under
/// `min_calls` calls per window (10 a second by default) is about once in
/// three years; at 30 %, never in practice.
pub const QUIET_OUTAGE_CALLS: u32 = 30;

/// Which attempt of an order a call was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    First,
    Retry,
}

impl Attempt {
    fn weight(self) -> f64 {
        match self {
            Attempt::First => 1.0,
            Attempt::Retry => RETRY_WEIGHT,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket-wide span since the window's origin this one counts;
    /// a slot holding an older span is empty.
    span: u64,
    calls: u32,
    weight: f64,
    failed_weight: f64,
}

/// The judged stretch that opens the circuit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Calls (any attempt) in the stretch.
    pub calls: u32,
    /// Its weighted failure rate.
    pub failure_rate: f64,
    /// How far back the stretch reaches.
    pub over: Duration,
}

/// The sliding window of one closed circuit.
#[derive(Debug)]
pub struct Window {
    origin: Instant,
    width: Duration,
    slots: [Bucket; BUCKETS],
}

impl Window {
    pub fn new(window: Duration) -> Self {
        let width = (window / BUCKETS as u32).max(Duration::from_millis(1));
        Self {
            origin: Instant::now(),
            width,
            slots: [Self::EMPTY; BUCKETS],
        }
    }

    /// No slot counts span `u64::MAX`: every slot reads as empty.
    const EMPTY: Bucket = Bucket {
        span: u64::MAX,
        calls: 0,
        weight: 0.0,
        failed_weight: 0.0,
    };

    /// Forgets every outcome.
    pub fn clear(&mut self) {
        self.slots = [Self::EMPTY; BUCKETS];
    }

    fn span_now(&self) -> u64 {
        let since = Instant::now().saturating_duration_since(self.origin);
        (since.as_nanos() / self.width.as_nanos()) as u64
    }

    /// Adds one call's outcome to the current bucket.
    pub fn record(&mut self, attempt: Attempt, failed: bool) {
        let span = self.span_now();
        let slot = &mut self.slots[(span % BUCKETS as u64) as usize];
        if slot.span != span {
            *slot = Bucket {
                span,
                ..Self::EMPTY
            };
        }
        let w = attempt.weight();
        slot.calls = slot.calls.saturating_add(1);
        slot.weight += w;
        if failed {
            slot.failed_weight += w;
        }
    }

    /// Calls (any attempt) in the whole window.
    pub fn calls(&self) -> u32 {
        self.suffixes().last().map_or(0, |(calls, ..)| calls)
    }

    /// The newest stretch of the window, back to a bucket boundary, that
    /// holds at least `min_calls` calls and fails at `failure_rate` or more
    /// — or, while the whole window holds fewer than `min_calls`, at least
    /// [`QUIET_OUTAGE_CALLS`] calls that all failed; `None` if no stretch
    /// does.
    pub fn judge(&self, min_calls: u32, failure_rate: f64) -> Option<Verdict> {
        let quiet = self.calls() < min_calls;
        let quiet_calls = QUIET_OUTAGE_CALLS.min(min_calls);
        self.suffixes()
            .find(|&(calls, weight, failed, _)| {
                weight > 0.0
                    && ((calls >= min_calls && failed >= failure_rate * weight)
                        || (quiet && calls >= quiet_calls && failed >= weight))
            })
            .map(|(calls, weight, failed, buckets)| Verdict {
                calls,
                failure_rate: failed / weight,
                over: self.width * buckets,
            })
    }

    /// Running totals over the current bucket, then it and the one before,
    /// and so on back over the window: (calls, weight, failed weight, buckets).
    fn suffixes(&self) -> impl Iterator<Item = (u32, f64, f64, u32)> + '_ {
        let now = self.span_now();
        let mut total = (0u32, 0.0f64, 0.0f64);
        (0..BUCKETS as u64).map(move |back| {
            if let Some(span) = now.checked_sub(back) {
                let b = &self.slots[(span % BUCKETS as u64) as usize];
                if b.span == span {
                    total.0 = total.0.saturating_add(b.calls);
                    total.1 += b.weight;
                    total.2 += b.failed_weight;
                }
            }
            (total.0, total.1, total.2, back as u32 + 1)
        })
    }
}
