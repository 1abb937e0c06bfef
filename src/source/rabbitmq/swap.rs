//! The consumer intake reads from, and how its prefetch follows the stages
//! on a quorum queue: by swapping the consumer.
//!
//! A quorum queue knows only the per-consumer `basic.qos` (`global =
//! false`), which applies to consumers created after it; a running
//! consumer keeps the count it started with. So when the followed limit has
//! moved enough, [`Feed`] replaces the consumer on the same channel:
//!
//! 1. `basic.cancel` the old consumer: the broker sends it nothing more;
//!    what it was sent stays unacknowledged on the channel (RabbitMQ keeps
//!    a cancelled consumer's deliveries until they are settled or the
//!    channel closes; `tests/consumer_swap.rs` checks it on both queue
//!    types);
//! 2. intake keeps taking the old consumer's buffered deliveries until its
//!    stream ends (lapin ends it at `basic.cancel-ok`, after what had
//!    arrived), and they are acked, rejected and dead-lettered on the
//!    channel as any other: delivery tags are per channel, not per
//!    consumer;
//! 3. once every delivery of the old consumer is settled (each holds a
//!    token of the consumer's [`TaskTracker`]), or [`SETTLE_MAX`] after
//!    its stream ended, `basic.qos(new, global = false)` and a new
//!    `basic.consume` under a fresh tag.
//!
//! Deliveries of the two consumers never interleave: the old one's come
//! first, all of them, then the new one's, so nothing is lost or taken
//! twice. A channel lost meanwhile ends the session as always; intake
//! reconnects and the new session's consumer starts at the then current
//! limit.
//!
//! # The broker-side count
//!
//! The broker holds each consumer to its prefetch. Starting the new
//! consumer before the old one's deliveries are settled (`basic.consume`
//! first, then `basic.cancel`) would let the channel hold the old
//! consumer's outstanding deliveries *plus* the new prefetch, up to
//! `old + new`. Cancelling first and starting the new consumer only once
//! the old deliveries are settled keeps the channel at most at the higher
//! of the two: it holds at most what it held when the swap began (which
//! only falls) until the new consumer starts, then at most `new`. The price
//! is a gap in intake: from the old consumer's last delivery to its ack —
//! about one pass through the stages, the batch linger and the commit — at
//! most once per [`SWAP_EVERY`]. If old deliveries are still unsettled
//! [`SETTLE_MAX`] after the old stream ended (a downstream retrying for
//! long), the new consumer starts anyway, so intake never waits on one
//! stuck order; the channel may then hold those `k` plus `new`.
//!
//! Between swaps the broker-side prefetch lags the followed limit by less
//! than a quarter of itself ([`SwapRule`]), so the channel holds fewer than
//! 4/3 of the followed limit; the daemon's own permits follow it exactly.

use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::Consumer;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

use super::session::{channel_prefetch, Session};
use super::short;
use crate::config::RabbitConfig;
use crate::telemetry::Metrics;

/// At most one consumer swap this often: each costs a gap in intake, and
/// the followed limit is recomputed ten times a second.
pub const SWAP_EVERY: Duration = Duration::from_secs(1);

/// How long after the old consumer's stream ended its deliveries may take
/// to settle before the new consumer starts regardless.
pub const SETTLE_MAX: Duration = Duration::from_secs(2);

/// When the consumer is swapped for one with the followed prefetch: when
/// the followed limit differs from the consumer's prefetch by at least a
/// quarter of that prefetch, at most once per [`SWAP_EVERY`].
///
/// Why a quarter: a smaller move is not worth a gap in intake. A cut below
/// it leaves a slowed replica's channel holding under a third more than
/// the limit (the daemon takes no more than the limit; the rest waits in
/// the client's buffer), and a raise below it leaves a fast replica's
/// broker-side prefetch within a quarter of a limit that already carries
/// [`HEADROOM`](crate::source::prefetch::HEADROOM) over its rate.
#[derive(Debug, Clone, Copy)]
pub struct SwapRule {
    /// The running consumer's prefetch.
    pub applied: u16,
    /// When it started.
    pub since: Instant,
}

/// What [`SwapRule::decide`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// The prefetch is close enough.
    Keep,
    Now,
    /// Moved enough, but the last swap was too recent: look again then.
    At(Instant),
}

impl SwapRule {
    pub fn decide(&self, target: u16, now: Instant) -> Swap {
        let moved = u32::from(target.abs_diff(self.applied));
        if moved == 0 || moved * 4 < u32::from(self.applied) {
            return Swap::Keep;
        }
        let at = self.since + SWAP_EVERY;
        if now >= at {
            Swap::Now
        } else {
            Swap::At(at)
        }
    }
}

enum Stage {
    /// Deliveries come from `consumer`.
    Live,
    /// `consumer` is cancelled; taking what the broker had sent it.
    Draining,
    /// The old stream ended; waiting for its deliveries to settle.
    Settling { deadline: Instant },
}

/// What [`Feed::next`] yields.
pub(super) enum Next {
    /// A delivery, with the token that ties it to its consumer (`Some` when
    /// the consumer may be swapped): hold it until the delivery is settled.
    Delivery(Box<AmqpDelivery>, Option<TaskTrackerToken>),
    /// The session failed: the consumer errored, or the broker cancelled it.
    Failed(String),
}

/// The consumer of one session, swapped as the followed limit moves when
/// `follow` is set (quorum queues with `[source.prefetch_follow]`).
pub(super) struct Feed {
    consumer: Consumer,
    tag: ShortString,
    stage: Stage,
    /// Tracks the unsettled deliveries of `consumer`.
    lease: TaskTracker,
    follow: Option<(watch::Receiver<u32>, SwapRule)>,
    swaps: u64,
}

impl Feed {
    /// A feed of `consumer`; `follow` with the consumer's prefetch when it
    /// is to follow the limit by swapping.
    pub(super) fn new(consumer: Consumer, follow: Option<(watch::Receiver<u32>, u16)>) -> Self {
        Self {
            tag: consumer.tag(),
            consumer,
            stage: Stage::Live,
            lease: TaskTracker::new(),
            follow: follow.map(|(rx, applied)| {
                (
                    rx,
                    SwapRule {
                        applied,
                        since: Instant::now(),
                    },
                )
            }),
            swaps: 0,
        }
    }

    /// The next delivery, swapping the consumer on the way when it is due.
    /// Cancel-safe: a swap interrupted half-way resumes on the next call.
    pub(super) async fn next(
        &mut self,
        session: &Session,
        cfg: &RabbitConfig,
        metrics: &Metrics,
    ) -> Next {
        loop {
            match self.stage {
                Stage::Live => {
                    let due = match &mut self.follow {
                        Some((rx, rule)) => {
                            rule.decide(channel_prefetch(*rx.borrow_and_update()), Instant::now())
                        }
                        None => Swap::Keep,
                    };
                    if due == Swap::Now {
                        if let Err(e) = session
                            .consume
                            .basic_cancel(self.tag.clone(), BasicCancelOptions::default())
                            .await
                        {
                            return Next::Failed(format!("cancelling the consumer: {e}"));
                        }
                        self.stage = Stage::Draining;
                        continue;
                    }
                    let wake = match due {
                        Swap::At(at) => Some(at),
                        _ => None,
                    };
                    let changed = async {
                        match &mut self.follow {
                            Some((rx, _)) => rx.changed().await.is_ok(),
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        n = self.consumer.next() => return self.yielded(n, cfg),
                        alive = changed => if !alive {
                            // The limit no longer moves (the daemon stops).
                            self.follow = None;
                        },
                        () = sleep_until(wake) => {}
                    }
                }
                Stage::Draining => match self.consumer.next().await {
                    None => {
                        self.lease.close();
                        self.stage = Stage::Settling {
                            deadline: Instant::now() + SETTLE_MAX,
                        };
                    }
                    n => return self.yielded(n, cfg),
                },
                Stage::Settling { deadline } => {
                    let settled = tokio::select! {
                        () = self.lease.wait() => true,
                        () = tokio::time::sleep_until(deadline) => false,
                    };
                    if let Err(e) = self.start_next(session, cfg, settled, metrics).await {
                        return Next::Failed(e);
                    }
                }
            }
        }
    }

    fn yielded(&self, n: Option<lapin::Result<AmqpDelivery>>, cfg: &RabbitConfig) -> Next {
        match n {
            Some(Ok(d)) => Next::Delivery(
                Box::new(d),
                self.follow.as_ref().map(|_| self.lease.token()),
            ),
            Some(Err(e)) => Next::Failed(format!("consumer error: {e}")),
            None => Next::Failed(format!(
                "the broker cancelled the consumer of queue {}",
                cfg.queue
            )),
        }
    }

    /// `basic.qos` at the limit now, then the new consumer.
    async fn start_next(
        &mut self,
        session: &Session,
        cfg: &RabbitConfig,
        settled: bool,
        metrics: &Metrics,
    ) -> Result<(), String> {
        let Some((rx, rule)) = &mut self.follow else {
            // The limit stopped moving mid-swap: the ceiling is gone with
            // it, so keep the prefetch the old consumer had.
            return self.consume(session, cfg).await;
        };
        let prefetch = channel_prefetch(*rx.borrow_and_update());
        session
            .consume
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| format!("setting basic.qos: {e}"))?;
        let from = rule.applied;
        *rule = SwapRule {
            applied: prefetch,
            since: Instant::now(),
        };
        self.consume(session, cfg).await?;
        metrics.prefetch_swaps.inc();
        tracing::debug!(
            from,
            to = prefetch,
            consumer_tag = %self.tag,
            old_settled = settled,
            "consumer swapped for the followed prefetch"
        );
        Ok(())
    }

    async fn consume(&mut self, session: &Session, cfg: &RabbitConfig) -> Result<(), String> {
        self.swaps += 1;
        let tag = swapped_tag(&cfg.consumer_tag, self.swaps);
        self.consumer = session
            .consume
            .basic_consume(
                short("queue", &cfg.queue).map_err(|e| e.to_string())?,
                tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("starting the consumer: {e}"))?;
        self.tag = tag;
        self.lease = TaskTracker::new();
        self.stage = Stage::Live;
        Ok(())
    }

    /// Stops the flow of new deliveries (the daemon is stopping): cancels
    /// the consumer unless a swap already did.
    pub(super) async fn cancel(&self, session: &Session) {
        if matches!(self.stage, Stage::Live) {
            if let Err(e) = session
                .consume
                .basic_cancel(self.tag.clone(), BasicCancelOptions::default())
                .await
            {
                tracing::debug!(error = %e, "cancelling the consumer");
            }
        }
    }
}

/// The tag of the `n`th consumer after the first: `<consumer_tag>.<n>`,
/// the configured tag shortened if need be to stay an AMQP short string.
fn swapped_tag(base: &str, n: u64) -> ShortString {
    let suffix = format!(".{n}");
    let mut end = base.len().min(255 - suffix.len());
    while !base.is_char_boundary(end) {
        end -= 1;
    }
    let tag = format!("{}{suffix}", &base[..end]);
    ShortString::try_new(tag).unwrap_or_else(|_| ShortString::from(suffix))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(applied: u16) -> SwapRule {
        SwapRule {
            applied,
            since: Instant::now(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_move_of_under_a_quarter_keeps_the_consumer() {
        let r = rule(40);
        let later = Instant::now() + Duration::from_secs(10);
        assert_eq!(r.decide(40, later), Swap::Keep);
        assert_eq!(r.decide(49, later), Swap::Keep, "9 < 40 / 4");
        assert_eq!(r.decide(31, later), Swap::Keep);
        assert_eq!(r.decide(50, later), Swap::Now, "10 = 40 / 4");
        assert_eq!(r.decide(30, later), Swap::Now);
        // A prefetch under 4 moves with any change.
        assert_eq!(rule(2).decide(3, later), Swap::Now);
    }

    #[test]
    fn a_swapped_consumer_tag_stays_a_short_string() {
        assert_eq!(swapped_tag("conveyor", 3).as_str(), "conveyor.3");
        let long = "é".repeat(200);
        let tag = swapped_tag(&long, 12);
        assert!(tag.as_str().len() <= 255 && tag.as_str().ends_with("é.12"));
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_one_swap_a_second() {
        let r = rule(16);
        let start = r.since;
        assert_eq!(r.decide(64, start), Swap::At(start + SWAP_EVERY));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(r.decide(64, Instant::now()), Swap::At(start + SWAP_EVERY));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(r.decide(64, Instant::now()), Swap::Now);
    }
}
