//! What both publishers share: a schedule that paces messages under a rate
//! limit, and a bounded window of unacknowledged publishes.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt as _;

/// When each message is due under a rate limit.
pub(super) struct Pace {
    rate_per_sec: Option<f64>,
    started: Instant,
}

impl Pace {
    pub(super) fn new(rate_per_sec: Option<f64>) -> anyhow::Result<Self> {
        if let Some(r) = rate_per_sec {
            anyhow::ensure!(
                r.is_finite() && r > 0.0,
                "the rate must be a positive number of messages per second, not {r}"
            );
        }
        Ok(Self {
            rate_per_sec,
            started: Instant::now(),
        })
    }

    /// The schedule starts now (after connecting, not before).
    pub(super) fn start(&mut self) {
        self.started = Instant::now();
    }

    /// When message `n` (from 0) is due; `None` without a rate limit.
    pub(super) fn due(&self, n: u64) -> anyhow::Result<Option<Instant>> {
        let Some(rate) = self.rate_per_sec else {
            return Ok(None);
        };
        Duration::try_from_secs_f64(n as f64 / rate)
            .ok()
            .and_then(|offset| self.started.checked_add(offset))
            .map(Some)
            .ok_or_else(|| anyhow::anyhow!("message {n} at {rate}/s is due too far in the future"))
    }
}

/// Published messages awaiting their acknowledgement, at most `window`.
pub(super) struct InFlight<F> {
    pending: FuturesUnordered<F>,
    window: usize,
    settled: u64,
}

impl<F: Future<Output = anyhow::Result<()>>> InFlight<F> {
    pub(super) fn new(window: usize) -> Self {
        Self {
            pending: FuturesUnordered::new(),
            window: window.max(1),
            settled: 0,
        }
    }

    pub(super) fn push(&mut self, acknowledgement: F) {
        self.pending.push(acknowledgement);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn settled(
        &mut self,
        result: anyhow::Result<()>,
        on_progress: &mut impl FnMut(u64),
    ) -> anyhow::Result<()> {
        result?;
        self.settled += 1;
        on_progress(self.settled);
        Ok(())
    }

    /// Waits for one acknowledgement, if any is pending.
    pub(super) async fn settle_one(
        &mut self,
        on_progress: &mut impl FnMut(u64),
    ) -> anyhow::Result<()> {
        match self.pending.next().await {
            Some(result) => self.settled(result, on_progress),
            None => Ok(()),
        }
    }

    /// Settles what is already acknowledged, then waits while the window is full.
    pub(super) async fn make_room(
        &mut self,
        on_progress: &mut impl FnMut(u64),
    ) -> anyhow::Result<()> {
        while let Some(Some(result)) = self.pending.next().now_or_never() {
            self.settled(result, on_progress)?;
        }
        while self.pending.len() >= self.window {
            self.settle_one(on_progress).await?;
        }
        Ok(())
    }

    /// Sleeps until `due`, settling acknowledgements meanwhile so progress
    /// stays current at low rates.
    pub(super) async fn sleep_until(
        &mut self,
        due: Instant,
        on_progress: &mut impl FnMut(u64),
    ) -> anyhow::Result<()> {
        let sleep = tokio::time::sleep_until(due.into());
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return Ok(()),
                Some(result) = self.pending.next() => self.settled(result, on_progress)?,
            }
        }
    }

    /// Waits for every pending acknowledgement.
    pub(super) async fn drain(&mut self, on_progress: &mut impl FnMut(u64)) -> anyhow::Result<()> {
        while !self.pending.is_empty() {
            self.settle_one(on_progress).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_schedules_each_message_from_the_start() {
        let pace = Pace::new(Some(4.0)).expect("pace");
        assert_eq!(pace.due(0).expect("due"), Some(pace.started));
        assert_eq!(
            pace.due(3).expect("due"),
            Some(pace.started + Duration::from_millis(750))
        );
        assert_eq!(Pace::new(None).expect("pace").due(7).expect("due"), None);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Pace::new(Some(bad)).is_err(), "{bad}");
        }
        let slow = Pace::new(Some(1e-300)).expect("pace");
        assert!(slow.due(1).is_err(), "due past the end of time");
    }

    /// An acknowledgement that arrives after `ms` (paused time).
    async fn ack_after(ms: u64, ok: bool) -> anyhow::Result<()> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        anyhow::ensure!(ok, "nacked");
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_stays_within_the_window_and_reports_every_acknowledgement() {
        let mut seen = Vec::new();
        let mut progress = |n| seen.push(n);
        let mut in_flight = InFlight::new(3);
        for _ in 0..10 {
            in_flight.make_room(&mut progress).await.expect("room");
            assert!(in_flight.pending.len() < 3);
            in_flight.push(ack_after(10, true));
        }
        in_flight.drain(&mut progress).await.expect("drain");
        assert!(in_flight.is_empty());
        assert_eq!(seen, (1..=10).collect::<Vec<u64>>());
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_settles_while_pacing_and_fails_on_a_nack() {
        let mut last = 0;
        let mut progress = |n| last = n;
        let mut in_flight = InFlight::new(100);
        in_flight.push(ack_after(10, true));
        in_flight.push(ack_after(20, true));
        let due = Instant::now() + Duration::from_millis(50);
        in_flight
            .sleep_until(due, &mut progress)
            .await
            .expect("sleep");
        assert!(in_flight.is_empty(), "settled during the sleep");
        in_flight.push(ack_after(10, false));
        assert!(in_flight.drain(&mut progress).await.is_err());
        assert_eq!(last, 2);
    }
}
