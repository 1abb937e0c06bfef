//! A sleep precise to tens of microseconds for the simulator's latency
//! knobs: tokio's timer rounds every deadline up to a whole millisecond.

use std::time::Duration;

/// Sleeps `d` to within a few tens of microseconds.
///
/// tokio's timer works in whole milliseconds and rounds each deadline up to
/// the next tick, so `sleep(10 ms)` lasts 10–11 ms: a 5–10 % error on the
/// latency knob, which would make every latency-bound measurement against
/// the simulator look worse than the latency it was given. One timer thread
/// keeps the pending deadlines in a heap and waits on them with the OS's
/// fine-grained timeouts.
pub(super) async fn precise_sleep(d: Duration) {
    let deadline = std::time::Instant::now() + d;
    let (tx, rx) = tokio::sync::oneshot::channel();
    if precise_timer().send((deadline, tx)).is_ok() {
        let _ = rx.await;
    } else {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

type TimerEntry = (std::time::Instant, tokio::sync::oneshot::Sender<()>);

fn precise_timer() -> &'static std::sync::mpsc::Sender<TimerEntry> {
    static TIMER: std::sync::OnceLock<std::sync::mpsc::Sender<TimerEntry>> =
        std::sync::OnceLock::new();
    TIMER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<TimerEntry>();
        let spawned = std::thread::Builder::new()
            .name("sim-timer".into())
            .spawn(move || run_timer(&rx));
        if let Err(e) = spawned {
            // Dropping the receiver makes every sleep fall back to tokio's.
            tracing::warn!(error = %e, "no precise timer thread; latencies round up to whole ms");
        }
        tx
    })
}

/// A pending wake-up, ordered by its deadline alone.
struct Due(TimerEntry);

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.0 .0 == other.0 .0
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0 .0.cmp(&other.0 .0)
    }
}

fn run_timer(rx: &std::sync::mpsc::Receiver<TimerEntry>) {
    use std::cmp::Reverse;
    use std::sync::mpsc::RecvTimeoutError;
    let mut heap: std::collections::BinaryHeap<Reverse<Due>> = std::collections::BinaryHeap::new();
    loop {
        let now = std::time::Instant::now();
        while heap.peek().is_some_and(|Reverse(Due((at, _)))| *at <= now) {
            if let Some(Reverse(Due((_, waiter)))) = heap.pop() {
                let _ = waiter.send(());
            }
        }
        let next = match heap.peek() {
            Some(Reverse(Due((at, _)))) => rx.recv_timeout(at.saturating_duration_since(now)),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(entry) => heap.push(Reverse(Due(entry))),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn precise_sleeps_never_end_early_and_end_in_deadline_order() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for ms in [30u64, 10, 20] {
            let tx = tx.clone();
            tokio::spawn(async move {
                // Each sleep's own deadline: on a loaded machine the tasks
                // may start several milliseconds apart.
                let start = std::time::Instant::now();
                let deadline = start + Duration::from_millis(ms);
                precise_sleep(Duration::from_millis(ms)).await;
                let _ = tx.send((ms, deadline, start.elapsed()));
            });
        }
        drop(tx);
        let mut ended = Vec::new();
        while let Some((ms, deadline, elapsed)) = rx.recv().await {
            assert!(
                elapsed >= Duration::from_millis(ms),
                "{ms} ms ended after {elapsed:?}"
            );
            ended.push((deadline, ms));
        }
        let mut by_deadline = ended.clone();
        by_deadline.sort();
        assert_eq!(ended, by_deadline, "woken in deadline order");
    }
}
