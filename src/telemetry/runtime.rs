//! Runtime health, `conveyor_runtime_*`: the tokio runtime's own stable
//! metrics (`Handle::metrics()`), read at each scrape — the analogue of a
//! thread pool's thread count and pending work items.
//!
//! * `workers`: worker threads of the runtime.
//! * `alive_tasks`: tasks spawned and not yet finished.
//! * `global_queue_depth`: tasks waiting in the shared injection queue (work
//!   scheduled from outside a worker, e.g. by librdkafka's or lapin's
//!   threads, or by a blocking task) — it grows when the workers cannot keep
//!   up.
//! * `busy_seconds_total`: time the workers spent polling tasks, summed over
//!   workers; `rate(…[1m]) / workers` is the busy ratio (1 = saturated).
//! * `worker_parks_total`: times a worker went to sleep for lack of work.
//!
//! Mean poll time is absent on purpose: tokio exposes it
//! (`worker_mean_poll_time`, `worker_poll_count`, the poll-time histogram)
//! only when built with `--cfg tokio_unstable`, which conveyor's release
//! builds do not use; busy seconds and parks are what the stable API gives.

use std::sync::Mutex;

use prometheus::{Counter, IntCounter, IntGauge, Registry};

pub struct RuntimeMetrics {
    workers: IntGauge,
    alive_tasks: IntGauge,
    global_queue_depth: IntGauge,
    busy_seconds: Counter,
    parks: IntCounter,
    /// Serialises refreshes: counters advance by the delta to the runtime's
    /// totals, which two concurrent scrapes must not both add.
    refreshing: Mutex<()>,
}

impl RuntimeMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            workers: IntGauge::new("runtime_workers", "Worker threads of the async runtime.")?,
            alive_tasks: IntGauge::new(
                "runtime_alive_tasks",
                "Tasks of the async runtime spawned and not yet finished.",
            )?,
            global_queue_depth: IntGauge::new(
                "runtime_global_queue_depth",
                "Tasks waiting in the async runtime's shared (injection) queue.",
            )?,
            busy_seconds: Counter::new(
                "runtime_busy_seconds_total",
                "Time the async runtime's workers spent polling tasks, summed over workers.",
            )?,
            parks: IntCounter::new(
                "runtime_worker_parks_total",
                "Times an async runtime worker parked (went idle), summed over workers.",
            )?,
            refreshing: Mutex::new(()),
        };
        registry.register(Box::new(m.workers.clone()))?;
        registry.register(Box::new(m.alive_tasks.clone()))?;
        registry.register(Box::new(m.global_queue_depth.clone()))?;
        registry.register(Box::new(m.busy_seconds.clone()))?;
        registry.register(Box::new(m.parks.clone()))?;
        Ok(m)
    }

    /// Reads the current runtime's metrics into the series; outside a
    /// runtime it leaves them as they are.
    pub fn refresh(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(_guard) = self.refreshing.lock() else {
            return;
        };
        let rt = handle.metrics();
        let workers = rt.num_workers();
        self.workers.set(workers as i64);
        self.alive_tasks.set(rt.num_alive_tasks() as i64);
        self.global_queue_depth.set(rt.global_queue_depth() as i64);
        let (busy, parks) = (0..workers).fold((0.0, 0u64), |(busy, parks), w| {
            (
                busy + rt.worker_total_busy_duration(w).as_secs_f64(),
                parks + rt.worker_park_count(w),
            )
        });
        let more = busy - self.busy_seconds.get();
        if more > 0.0 {
            self.busy_seconds.inc_by(more);
        }
        self.parks.inc_by(parks.saturating_sub(self.parks.get()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_the_running_runtime() {
        let registry = Registry::new();
        let m = RuntimeMetrics::register(&registry).expect("register");
        let spin = tokio::spawn(async {
            let until = std::time::Instant::now() + std::time::Duration::from_millis(50);
            while std::time::Instant::now() < until {
                tokio::task::yield_now().await;
            }
        });
        spin.await.expect("spin");
        m.refresh();
        assert_eq!(m.workers.get(), 2);
        assert!(m.alive_tasks.get() >= 0);
        let busy = m.busy_seconds.get();
        assert!(busy > 0.0, "{busy}");
        m.refresh();
        assert!(m.busy_seconds.get() >= busy);
    }
}
