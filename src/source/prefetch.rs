//! The prefetch limit: how many messages the daemon holds unacknowledged,
//! all stages together. Intake takes one [`PrefetchPermit`] per delivery and
//! the delivery's [`AckToken`](super::AckToken) holds it until the broker has
//! been told its fate; with no permit left, intake stops pulling.
//!
//! # Fixed or following
//!
//! By default the limit is `source.prefetch`, always. With
//! `[source.prefetch_follow] enabled = true` it follows what the stages can
//! work on (see [`target`]): the validate and charge pools' current
//! concurrency limits (they move with adaptive concurrency), plus what the
//! batcher and writers hold while a batch fills and commits at the current
//! rate, plus [`SLACK`], clamped to `floor..=source.prefetch`. A replica
//! whose downstream slowed down then holds only what it can work on, so it
//! does not hoard messages its siblings could process, and in-daemon
//! queueing stays short. [`follow`] recomputes it every [`FOLLOW_INTERVAL`].
//!
//! # Moving the limit without dropping or duplicating work
//!
//! The permits are a semaphore. A raise adds permits (first cancelling any
//! debt); a cut forgets the free permits at once and the rest as deliveries
//! holding them are settled (a debt), so a message already held is always
//! finished and acknowledged as before, and intake takes the next one only
//! once the daemon holds fewer than the new limit.
//!
//! The broker must stop sending too, or it keeps pushing messages into the
//! client's buffer that count as unacknowledged at the broker: RabbitMQ's
//! source re-issues `basic.qos` on the live channel of a classic queue (see
//! `rabbitmq::session`) and swaps the consumer of a quorum queue (see
//! `rabbitmq::swap`); Kafka has no broker-side count, the permits are
//! what stops `recv()`, and librdkafka's fetch queue stays capped by
//! `kafka.fetch_queue_kbytes`.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::downstream::concurrency::ConcurrencyLimit;
use crate::resizable::Resizable;
use crate::telemetry::Metrics;

/// Orders waiting at the hand-offs between stages (decode → validate →
/// charge → batcher), so that a pool whose slot frees finds its next order
/// at once: two per hand-off.
pub const SLACK: usize = 8;

/// How often the following limit is recomputed.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);

/// The batch term is this many times what the batcher and writers hold at
/// the current rate (the linger plus the commit), so that a limit that is
/// what holds the rate back grows. Twice was not enough: an order also
/// spends time in the stages and between them, so a fast replica's rate
/// followed its limit and settled near 400 of 512, 25 % slower than with
/// the prefetch fixed (20,000 orders alone, measured with
/// `scripts/hoarding`); four times lets it reach `source.prefetch`, and
/// costs a slowed replica two or three messages more.
pub const HEADROOM: f64 = 4.0;

/// Weight of the newest interval in the smoothed ack rate and commit time.
const RATE_ALPHA: f64 = 0.5;

/// The prefetch limit of one daemon: the permits intake takes.
pub struct Prefetch {
    permits: Resizable,
    gauge: IntGauge,
    /// The current limit, for the broker side (RabbitMQ's `basic.qos`).
    current: watch::Sender<u32>,
}

/// One delivery's share of the prefetch limit.
pub type PrefetchPermit = crate::resizable::Permit;

impl Prefetch {
    pub fn new(limit: usize, gauge: IntGauge) -> Self {
        let limit = limit.max(1);
        gauge.set(limit as i64);
        Self {
            permits: Resizable::new(limit),
            gauge,
            current: watch::channel(u32::try_from(limit).unwrap_or(u32::MAX)).0,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.permits.limit()
    }

    /// Follows the current limit (RabbitMQ re-issues `basic.qos` on it).
    pub fn subscribe(&self) -> watch::Receiver<u32> {
        self.current.subscribe()
    }

    /// Waits for a permit; `None` once the permits are closed.
    pub async fn acquire(&self) -> Option<PrefetchPermit> {
        self.permits.acquire().await
    }

    /// Moves the limit to `new` (at least 1).
    pub fn resize(&self, new: usize) {
        let new = new.max(1);
        let old = self.permits.resize(new);
        if new == old {
            return;
        }
        self.gauge.set(new as i64);
        self.current
            .send_replace(u32::try_from(new).unwrap_or(u32::MAX));
        tracing::debug!(from = old, to = new, "prefetch limit moved");
    }

    /// Permits free right now (tests).
    pub fn available(&self) -> usize {
        self.permits.available()
    }
}

/// The following limit: `stage_limits + batch + SLACK` within
/// `floor..=ceiling` (the floor wins over a ceiling below it).
pub fn target(stage_limits: usize, batch: usize, floor: usize, ceiling: usize) -> usize {
    (stage_limits + batch + SLACK).min(ceiling).max(floor)
}

/// What the batcher and writers hold at `rate` orders/s, each order
/// spending `cycle` between its outcome and its ack (the batch linger plus
/// the commit), times [`HEADROOM`]; at most a filling batch and one
/// committing per writer (`(writers + 1) × max_size`).
pub fn batch_term(rate: f64, cycle: Duration, max_size: usize, writers: usize) -> usize {
    let cap = (writers + 1).saturating_mul(max_size);
    let held = HEADROOM * rate.max(0.0) * cycle.as_secs_f64();
    if held >= cap as f64 {
        cap
    } else {
        held.round() as usize
    }
}

/// How many intervals in a row the target must stay under the limit before
/// the limit is cut, so that the noise of the rate does not re-issue
/// `basic.qos` every interval.
pub const CUT_AFTER: u32 = 3;

/// When a new target is applied: a raise at once (a replica that could
/// take more should); a cut once the target has stayed below the limit for
/// [`CUT_AFTER`] intervals, to the highest target of those.
#[derive(Debug, Default)]
pub struct Hysteresis {
    below: u32,
    highest: usize,
}

impl Hysteresis {
    /// The limit to move to, if any, given the current one and this
    /// interval's target.
    pub fn next(&mut self, current: usize, target: usize) -> Option<usize> {
        if target >= current {
            *self = Self::default();
            return (target > current).then_some(target);
        }
        self.below += 1;
        self.highest = self.highest.max(target);
        if self.below < CUT_AFTER {
            return None;
        }
        let to = self.highest;
        *self = Self::default();
        Some(to)
    }
}

/// What [`follow`] reads and bounds.
pub struct FollowInputs {
    pub stages: Vec<Arc<ConcurrencyLimit>>,
    pub floor: usize,
    pub ceiling: usize,
    pub batch_max_size: usize,
    pub batch_writers: usize,
    pub batch_max_wait: Duration,
}

impl FollowInputs {
    fn stage_limits(&self) -> usize {
        self.stages.iter().map(|s| s.limit()).sum()
    }

    /// The limit before anything was measured: the stages' limits alone.
    pub fn initial(&self) -> usize {
        target(self.stage_limits(), 0, self.floor, self.ceiling)
    }
}

/// Recomputes the limit every [`FOLLOW_INTERVAL`] until `stop`: the
/// stages' current limits, and the batch term at the smoothed ack rate and
/// the smoothed commit time (the batch linger plus it is how long a
/// finished order waits for its ack).
pub async fn follow(
    prefetch: Arc<Prefetch>,
    inputs: FollowInputs,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(FOLLOW_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    let mut acked = metrics.acked.get();
    let (mut commit_sum, mut commit_n) = (
        metrics.batch_commit_duration.get_sample_sum(),
        metrics.batch_commit_duration.get_sample_count(),
    );
    let mut commit = 0.0f64;
    let mut rate: Option<f64> = None;
    let mut hysteresis = Hysteresis::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = tokio::time::Instant::now();
        let dt = now.duration_since(last).as_secs_f64();
        if dt <= 0.0 {
            continue;
        }
        last = now;
        let acked_now = metrics.acked.get();
        let sample = acked_now.saturating_sub(acked) as f64 / dt;
        acked = acked_now;
        let r = rate.map_or(sample, |r| r + RATE_ALPHA * (sample - r));
        rate = Some(r);
        let (sum, n) = (
            metrics.batch_commit_duration.get_sample_sum(),
            metrics.batch_commit_duration.get_sample_count(),
        );
        if n > commit_n {
            // Smoothed too: one slow commit must not raise the limit.
            let mean = (sum - commit_sum) / (n - commit_n) as f64;
            commit += RATE_ALPHA * (mean - commit);
        }
        (commit_sum, commit_n) = (sum, n);
        let cycle = inputs.batch_max_wait + Duration::from_secs_f64(commit.max(0.0));
        let batch = batch_term(r, cycle, inputs.batch_max_size, inputs.batch_writers);
        let new = target(inputs.stage_limits(), batch, inputs.floor, inputs.ceiling);
        if let Some(to) = hysteresis.next(prefetch.limit(), new) {
            prefetch.resize(to);
        }
    }
}

#[cfg(test)]
#[path = "prefetch_tests.rs"]
mod tests;
