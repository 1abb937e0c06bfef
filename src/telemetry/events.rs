//! Per-message events: what one order's fate logs and counts, in one place
//! for both sources, and a rate limit on the log lines of events that bad
//! input can make by the thousand.
//!
//! A poison storm, or the redelivery of a whole prefetch window after a
//! crash, would otherwise write one line per message. Each kind of event
//! gets its own budget ([`BURST`] lines at once, then [`PER_SECOND`]); past
//! it the lines are dropped and counted in `conveyor_log_lines_suppressed_total{event}`,
//! and the next line that is written says how many of its kind were
//! dropped before it. Counters of the events themselves are never limited.
//! The limiter is `governor`'s GCRA (the same algorithm a downstream rate
//! limit needs), keyed by the event's name.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Mutex, OnceLock};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::Metrics;
use crate::outcome::Outcome;
use crate::source::DeadLetter;

/// The rate-limited kinds, whose suppressed-line series exist from start-up.
pub const EVENTS: [&str; 5] = [
    "dead_lettered",
    "duplicate",
    "conflicting_duplicate",
    "redelivery_limit",
    "kafka_commit_refused",
];

/// Lines of one kind written at once before the rate applies.
pub const BURST: u32 = 50;
/// Lines of one kind per second past the burst.
pub const PER_SECOND: u32 = 10;

struct Limiter {
    budget: DefaultKeyedRateLimiter<&'static str>,
    dropped: Mutex<HashMap<&'static str, u64>>,
}

fn limiter() -> &'static Limiter {
    static LIMITER: OnceLock<Limiter> = OnceLock::new();
    LIMITER.get_or_init(|| {
        let quota = Quota::per_second(NonZeroU32::new(PER_SECOND).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(BURST).unwrap_or(NonZeroU32::MIN));
        Limiter {
            budget: RateLimiter::keyed(quota),
            dropped: Mutex::new(HashMap::new()),
        }
    })
}

/// Calls `emit` — which writes the log line of one `event` — unless
/// `event`'s budget is spent, in which case the line is counted as
/// suppressed. `emit` gets how many lines of this kind were suppressed since
/// the last one written.
pub fn limited(metrics: &Metrics, event: &'static str, emit: impl FnOnce(u64)) {
    let l = limiter();
    let mut dropped = l.dropped.lock().unwrap_or_else(|e| e.into_inner());
    if l.budget.check_key(&event).is_ok() {
        let suppressed = dropped.remove(event).unwrap_or(0);
        drop(dropped);
        emit(suppressed);
    } else {
        *dropped.entry(event).or_insert(0) += 1;
        drop(dropped);
        metrics
            .log_lines_suppressed
            .with_label_values(&[event])
            .inc();
    }
}

/// A dead letter the broker confirmed: counted by reason and as an
/// outcome, and logged (rate-limited).
pub fn dead_lettered(metrics: &Metrics, dl: &DeadLetter) {
    metrics
        .dead_letters
        .with_label_values(&[dl.reason.as_str()])
        .inc();
    metrics.outcome(Outcome::DeadLettered);
    limited(metrics, "dead_lettered", |suppressed| {
        tracing::warn!(order_id = dl.order_id.as_deref().unwrap_or(""),
            position = %dl.position, reason = %dl.reason, stage = %dl.stage,
            detail = %dl.detail, suppressed, "dead-lettered");
    });
}

/// A periodic Kafka offset commit the coordinator refused (a rebalance in
/// progress, a coordinator moving): counted per partition in
/// `conveyor_kafka_rebalance_events_total{event="commit_refused"}` and
/// logged (rate-limited: every tick of a long rebalance can refuse one).
/// Nothing is lost: the positions are sent again with the next commit.
pub fn kafka_commit_refused(metrics: &Metrics, error: &str, partitions: usize) {
    metrics.rebalance_event("commit_refused", partitions);
    limited(metrics, "kafka_commit_refused", |suppressed| {
        tracing::warn!(
            error,
            partitions,
            suppressed,
            "offset commit refused; resending with the next commit"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_is_cut_to_its_burst_and_counted() {
        let metrics = Metrics::new().expect("metrics");
        let mut written = 0;
        let mut reported = 0;
        for _ in 0..1000 {
            limited(&metrics, "test_storm", |suppressed| {
                written += 1;
                reported += suppressed;
            });
        }
        // The burst, plus what the rate allows during the loop (well under
        // a second).
        assert!(
            (BURST as usize..BURST as usize + 2 * PER_SECOND as usize).contains(&written),
            "{written} lines written"
        );
        let counted = metrics
            .log_lines_suppressed
            .with_label_values(&["test_storm"])
            .get();
        assert_eq!(counted as usize, 1000 - written);
        // Lines written after drops report them.
        assert!(reported <= counted);
    }

    #[test]
    fn kinds_have_budgets_of_their_own() {
        let metrics = Metrics::new().expect("metrics");
        for _ in 0..(BURST * 3) {
            limited(&metrics, "test_noisy", |_| {});
        }
        let mut quiet = 0;
        for _ in 0..BURST {
            limited(&metrics, "test_quiet", |_| quiet += 1);
        }
        assert_eq!(quiet, BURST);
    }
}
