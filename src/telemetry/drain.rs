//! Time-to-drain: `conveyor_backlog_drain_seconds{queue|topic}`, the
//! broker's backlog divided by the recent acknowledgement rate, per consumed
//! queue (RabbitMQ) or topic (Kafka), as this instance sees it.
//!
//! * **Backlog**: RabbitMQ's ready count of the queue (passive declare), or
//!   the sum of the consumer lag of the topic's partitions this member owns;
//!   sampled when the source refreshes its depth/lag gauges.
//! * **Recent ack rate**: the acknowledgements the source made for that
//!   queue/topic, as an exponentially weighted moving average of the rate
//!   between two backlog samples, with a time constant of [`RATE_WINDOW`]
//!   (60 s): a sample `dt` seconds after the previous one weighs
//!   `1 − e^(−dt/60)`, so the estimate follows the last minute or so of
//!   traffic whatever the sampling interval.
//! * The gauge has **no value** until two samples exist (no rate yet), is
//!   **0** while the backlog is empty, and **+Inf** while there is a backlog
//!   and the recent rate is zero (nothing acknowledged: it never drains at
//!   this pace). Alert on it with `> threshold`; +Inf compares greater.
//!
//! The label of a RabbitMQ estimate is `queue`, of a Kafka one `topic`; the
//! other label is empty, which Prometheus treats as absent.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::GaugeVec;

/// Time constant of the ack-rate average.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// What a backlog belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Queue(String),
    Topic(String),
}

impl Destination {
    fn labels(&self) -> [&str; 2] {
        match self {
            Destination::Queue(q) => [q.as_str(), ""],
            Destination::Topic(t) => ["", t.as_str()],
        }
    }
}

#[derive(Default)]
struct Track {
    /// Acknowledgements counted so far.
    acked: u64,
    /// `acked` and the time at the previous backlog sample.
    last: Option<(u64, Instant)>,
    /// Averaged acks per second, once two samples exist.
    rate: Option<f64>,
}

/// Per-destination ack counts and rate estimates behind the gauge.
pub struct DrainEstimator {
    gauge: GaugeVec,
    tracks: Mutex<HashMap<Destination, Track>>,
}

impl DrainEstimator {
    pub fn new(gauge: GaugeVec) -> Self {
        Self {
            gauge,
            tracks: Mutex::default(),
        }
    }

    /// The gauge, for registering it.
    pub fn gauge(&self) -> GaugeVec {
        self.gauge.clone()
    }

    /// Counts `n` acknowledgements for `dest` (called per ack batch, not per
    /// message).
    pub fn acked(&self, dest: &Destination, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut t) = self.tracks.lock() {
            match t.get_mut(dest) {
                Some(track) => track.acked += n,
                None => {
                    t.insert(
                        dest.clone(),
                        Track {
                            acked: n,
                            ..Track::default()
                        },
                    );
                }
            }
        }
    }

    /// Records the backlog of `dest` now and updates its estimate.
    pub fn backlog(&self, dest: &Destination, backlog: u64) {
        self.backlog_at(dest, backlog, Instant::now());
    }

    fn backlog_at(&self, dest: &Destination, backlog: u64, now: Instant) {
        let Ok(mut t) = self.tracks.lock() else {
            return;
        };
        let track = t.entry(dest.clone()).or_default();
        if let Some((acked_then, then)) = track.last {
            let dt = now.saturating_duration_since(then).as_secs_f64();
            if dt > 0.0 {
                let instant = track.acked.saturating_sub(acked_then) as f64 / dt;
                track.rate = Some(match track.rate {
                    None => instant,
                    Some(avg) => {
                        let weight = 1.0 - (-dt / RATE_WINDOW.as_secs_f64()).exp();
                        avg + weight * (instant - avg)
                    }
                });
            } else {
                return;
            }
        }
        track.last = Some((track.acked, now));
        let Some(rate) = track.rate else {
            return;
        };
        let seconds = if backlog == 0 {
            0.0
        } else if rate <= f64::EPSILON {
            f64::INFINITY
        } else {
            backlog as f64 / rate
        };
        self.gauge.with_label_values(&dest.labels()).set(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn estimator() -> DrainEstimator {
        DrainEstimator::new(
            GaugeVec::new(Opts::new("drain", "test"), &["queue", "topic"]).expect("gauge"),
        )
    }

    fn value(e: &DrainEstimator, dest: &Destination) -> Option<f64> {
        use prometheus::core::Collector as _;
        let labels = dest.labels();
        e.gauge
            .collect()
            .first()?
            .get_metric()
            .iter()
            .find(|m| {
                let l = m.get_label();
                l[0].value() == labels[0] && l[1].value() == labels[1]
            })
            .map(|m| m.get_gauge().get_value())
    }

    #[test]
    fn absent_until_a_rate_exists_then_backlog_over_rate() {
        let e = estimator();
        let q = Destination::Queue("orders".into());
        let t0 = Instant::now();
        e.backlog_at(&q, 1000, t0);
        assert_eq!(value(&e, &q), None);
        e.acked(&q, 50);
        e.backlog_at(&q, 1000, t0 + Duration::from_secs(5));
        // 50 acks in 5 s: 10/s, 1000 left: 100 s.
        assert_eq!(value(&e, &q), Some(100.0));
    }

    #[test]
    fn infinite_while_nothing_is_acked_zero_when_empty() {
        let e = estimator();
        let t = Destination::Topic("orders".into());
        let t0 = Instant::now();
        e.backlog_at(&t, 10, t0);
        e.backlog_at(&t, 10, t0 + Duration::from_secs(5));
        assert_eq!(value(&e, &t), Some(f64::INFINITY));
        e.backlog_at(&t, 0, t0 + Duration::from_secs(10));
        assert_eq!(value(&e, &t), Some(0.0));
    }

    #[test]
    fn the_rate_follows_the_last_minute() {
        let e = estimator();
        let q = Destination::Queue("q".into());
        let t0 = Instant::now();
        e.backlog_at(&q, 600, t0);
        e.acked(&q, 100);
        e.backlog_at(&q, 600, t0 + Duration::from_secs(1));
        assert_eq!(value(&e, &q), Some(6.0));
        // The consumer stops: after 5 minutes without acks the average has
        // decayed by e^-5 (about 0.7 % of 100/s left), so drain is ~ 600/0.67.
        for s in 1..=60 {
            e.backlog_at(&q, 600, t0 + Duration::from_secs(1 + 5 * s));
        }
        let v = value(&e, &q).expect("value");
        assert!((800.0..1000.0).contains(&v), "{v}");
    }
}
