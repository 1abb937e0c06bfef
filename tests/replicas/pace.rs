//! Throughput over time during a whole-daemon scenario: the stored rows,
//! sampled every [`EVERY`], and the moments the scenario changed something
//! (a replica killed, added, stopped). After the run, [`Pace::report`] says
//! for each change how long throughput took to be steady again. A figure
//! for the scenario's printed line, never an assertion: timings on a
//! shared machine are no test.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::task::JoinHandle;

/// How often the rows are counted.
pub const EVERY: Duration = Duration::from_millis(100);

/// The window throughput is measured over.
const WINDOW: Duration = Duration::from_millis(500);

/// Steady: a window at this share of the phase's settled throughput.
const STEADY: f64 = 0.75;

/// A phase is looked at for at least this long after its change, into
/// the next one if need be: on Kafka a killed member stalls the group for
/// its session timeout, and the next change may come before that is over.
const HORIZON: Duration = Duration::from_secs(5);

pub struct Pace {
    start: Instant,
    samples: Arc<Mutex<Vec<(Duration, i64)>>>,
    marks: Vec<(String, Duration)>,
    task: JoinHandle<()>,
}

/// One change and what followed it.
#[derive(Debug)]
pub struct Phase {
    pub change: String,
    /// Settled orders/s: the 80th percentile of the phase's window rates
    /// (from the change to the next, at least [`HORIZON`], at most to the
    /// last row stored), which a stall of up to four fifths of it leaves
    /// at the rate after the stall.
    pub rate: f64,
    /// From the change to the end of the first window at [`STEADY`] ×
    /// `rate`; `None` if the phase was shorter than two windows or settled
    /// at nothing.
    pub to_steady: Option<Duration>,
}

impl Pace {
    /// Starts counting the rows of `orders` in `pool`.
    pub fn start(pool: PgPool) -> Self {
        let start = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            loop {
                tick.tick().await;
                let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
                    .fetch_one(&pool)
                    .await
                    .unwrap_or(-1);
                if rows >= 0 {
                    sink.lock().expect("samples").push((start.elapsed(), rows));
                }
            }
        });
        Self {
            start,
            samples,
            marks: Vec::new(),
            task,
        }
    }

    /// Since sampling started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Notes that `change` happens now.
    pub fn mark(&mut self, change: &str) {
        self.marks.push((change.to_string(), self.start.elapsed()));
    }

    /// Stops sampling; one [`Phase`] per change.
    pub fn report(self) -> Vec<Phase> {
        self.task.abort();
        let samples = self.samples.lock().expect("samples").clone();
        let last = samples.last().map_or(0, |s| s.1);
        // The phases end where the next begins; the last where the last
        // row was stored.
        let done = samples
            .iter()
            .find(|s| s.1 == last)
            .map_or(Duration::ZERO, |s| s.0);
        let mut phases = Vec::new();
        for (i, (change, from)) in self.marks.iter().enumerate() {
            let next = self.marks.get(i + 1).map_or(done, |m| m.1);
            let until = next.max(*from + HORIZON).min(done);
            let rates = window_rates(&samples, *from, until);
            let rate = settled(&rates);
            let to_steady = (rates.len() >= 2 && rate > 0.0)
                .then(|| rates.iter().find(|r| r.1 >= STEADY * rate))
                .flatten()
                .map(|r| r.0.saturating_sub(*from));
            phases.push(Phase {
                change: change.clone(),
                rate,
                to_steady,
            });
        }
        phases
    }
}

/// Throughput over each [`WINDOW`] that starts at a sample in
/// `[from, until - WINDOW]`, by its end time.
fn window_rates(
    samples: &[(Duration, i64)],
    from: Duration,
    until: Duration,
) -> Vec<(Duration, f64)> {
    let mut out = Vec::new();
    for (i, (t0, r0)) in samples.iter().enumerate() {
        if *t0 < from || *t0 + WINDOW > until {
            continue;
        }
        if let Some((t1, r1)) = samples[i..].iter().find(|s| s.0 >= *t0 + WINDOW) {
            out.push((*t1, (r1 - r0) as f64 / (*t1 - *t0).as_secs_f64()));
        }
    }
    out
}

/// The 80th percentile of a phase's window rates.
fn settled(rates: &[(Duration, f64)]) -> f64 {
    let mut v: Vec<f64> = rates.iter().map(|r| r.1).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[(v.len() * 4 / 5).min(v.len() - 1)]
}

/// `change=seconds_to_steady@orders_per_s` per phase, for a scenario line.
pub fn summary(phases: &[Phase]) -> String {
    phases
        .iter()
        .map(|p| {
            let steady = p
                .to_steady
                .map_or("n/a".to_string(), |d| format!("{:.1}", d.as_secs_f64()));
            format!("{}={steady}s@{:.0}/s", p.change, p.rate)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_is_the_first_window_near_the_settled_rate() {
        // 100 rows/s, a change at 2 s followed by a second's stall, then
        // 100 rows/s again until 6 s.
        let mut samples = Vec::new();
        let mut rows = 0;
        for tenth in 0..60u64 {
            let t = Duration::from_millis(tenth * 100);
            if !(20..30).contains(&tenth) {
                rows += 10;
            }
            samples.push((t, rows));
        }
        let rates = window_rates(&samples, Duration::from_secs(2), Duration::from_secs(6));
        let rate = settled(&rates);
        assert!((rate - 100.0).abs() < 1.0, "{rate}");
        let steady = rates.iter().find(|r| r.1 >= STEADY * rate).expect("steady");
        // The first window at ≥ 75 rows/s is (2.8 s, 3.3 s]: four of its
        // five tenths after the stall, 80 rows/s.
        assert_eq!(steady.0, Duration::from_millis(3300));
    }
}
