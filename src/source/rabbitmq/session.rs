//! One RabbitMQ session — a connection with its consume and publish
//! channels, its generation and its watchers — and how the next one is
//! opened when it dies: reconnect with jittered exponential backoff,
//! topology declared again, `basic.qos` set, consuming resumed.
//!
//! # `basic.qos` when the prefetch follows the stages
//!
//! RabbitMQ reads the `global` flag of `basic.qos` its own way: with
//! `global = false` the count applies to each consumer created *after* it
//! on the channel, so re-issuing it leaves a running consumer at its old
//! limit; with `global = true` it is one limit shared by every consumer of
//! the channel, and a new one takes effect on the live channel at once (a
//! cut makes the broker hold back deliveries until fewer than the new count
//! are unacknowledged; nothing delivered is taken back). So the per-consumer
//! count stays `source.prefetch`, the ceiling, and the following limit is a
//! per-channel `basic.qos` re-issued whenever it moves (see
//! [`follow_qos`](super::follow_qos)); the broker enforces the lower of the
//! two. Quorum queues do not support the per-channel limit (and RabbitMQ 4
//! deprecates it): there the per-consumer count is the followed limit
//! itself, and the consumer is swapped for a new one when it moves (see
//! [`swap`](super::swap)).

use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::{broker, declare_topology, short, RabbitError};
use crate::config::{QueueType, RabbitConfig};
use crate::telemetry::{Destination, Metrics};

/// Reconnect backoff: the ceiling of the wait doubles from
/// `RECONNECT_INITIAL` up to `RECONNECT_MAX`, each wait jittered so that
/// many daemons losing the same broker do not come back in lockstep.
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The reconnect schedule, on the `backoff` crate's exponential schedule
/// like every other retry loop in conveyor. Each wait is uniform in
/// `[ceiling / 2, ceiling]` ("equal jitter"), so it never collapses to zero:
/// full jitter would let a broker that refuses at once be hammered.
///
/// The crate draws uniformly in `interval × [1 − f, 1 + f]`; with the
/// interval at three quarters of the ceiling and `f = 1/3` that is exactly
/// `[ceiling / 2, ceiling]`. It never runs out (no elapsed-time limit):
/// reconnecting goes on until it works or the daemon stops.
fn reconnect_schedule(initial: Duration, max: Duration) -> ExponentialBackoff {
    backoff::ExponentialBackoffBuilder::new()
        .with_initial_interval(initial.mul_f64(0.75))
        .with_multiplier(2.0)
        .with_max_interval(max.mul_f64(0.75))
        .with_randomization_factor(1.0 / 3.0)
        .with_max_elapsed_time(None)
        .build()
}
/// An attempt that hangs (a broker that accepts TCP but never answers)
/// counts as failed after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Closing a session that may already be dead must not hold up intake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What opening a session needs: the broker address and everything that is
/// declared or set on each new connection.
pub(super) struct Link {
    pub(super) cfg: RabbitConfig,
    pub(super) prefetch: u16,
    /// The following prefetch limit, set per channel on each new session;
    /// `None` when the prefetch is fixed.
    pub(super) follow: Option<tokio::sync::watch::Receiver<u32>>,
    pub(super) metrics: Arc<Metrics>,
}

/// One connection's worth of broker state, all of which dies together.
///
/// `consume` carries deliveries and their acks (delivery tags are per
/// channel, so an ack is only meaningful on the channel that delivered);
/// `publish` is in confirm mode for dead letters.
pub(super) struct Session {
    /// Stamped on every token this session hands out; settlement acks a
    /// token only on the session of the same generation.
    pub(super) generation: u64,
    /// The per-consumer `basic.qos` the session's first consumer started
    /// with.
    pub(super) consumer_prefetch: u16,
    pub(super) connection: Connection,
    pub(super) consume: Channel,
    pub(super) publish: Channel,
    /// Cancelled by whoever first sees this session fail (intake, an ack,
    /// a dead-letter publish, a connection error event); intake then
    /// replaces it.
    pub(super) lost: CancellationToken,
    /// Connection-event and queue-depth watchers, aborted with the session.
    pub(super) _watchers: Vec<AbortOnDropHandle<()>>,
}

impl Session {
    /// Marks the session lost (idempotent); says why the first time.
    pub(super) fn lose(&self, why: &str) {
        if !self.lost.is_cancelled() {
            tracing::warn!(
                generation = self.generation,
                reason = why,
                "RabbitMQ session lost"
            );
            self.lost.cancel();
        }
    }

    /// Closes the connection, which is what makes the broker requeue every
    /// delivery of this session that was not acknowledged. Best effort: a
    /// dead connection has nothing left to close.
    pub(super) async fn close(&self, reason: &str) {
        let close = async {
            if let Err(e) = self.consume.close(200, reason.into()).await {
                tracing::debug!(error = %e, "closing the consume channel");
            }
            if let Err(e) = self.publish.close(200, reason.into()).await {
                tracing::debug!(error = %e, "closing the publish channel");
            }
            if let Err(e) = self.connection.close(200, reason.into()).await {
                tracing::debug!(error = %e, "closing the connection");
            }
        };
        if tokio::time::timeout(CLOSE_TIMEOUT, close).await.is_err() {
            tracing::debug!(
                generation = self.generation,
                "closing the session timed out"
            );
        }
    }
}

impl Link {
    /// Connects, declares the topology, sets `basic.qos` and starts the
    /// consumer: everything lapin's own recovery would otherwise replay
    /// behind our back, done explicitly so the generation boundary is ours.
    pub(super) async fn open(&self, generation: u64) -> Result<(Session, Consumer), RabbitError> {
        let cfg = &self.cfg;
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from("conveyor".to_string()));
        let connection = super::connect(cfg, props).await?;
        // From here on an early return drops `connection`, which closes it,
        // and the watchers, which aborts them.
        let lost = CancellationToken::new();
        let mut watchers = vec![AbortOnDropHandle::new(tokio::spawn(watch_events(
            connection.events_listener(),
            lost.clone(),
            generation,
        )))];
        let consume = connection
            .create_channel()
            .await
            .map_err(broker("opening a channel"))?;
        if cfg.declare {
            declare_topology(&consume, cfg).await?;
        }
        // A quorum queue follows the limit with the per-consumer count
        // itself (see `swap`); a classic queue with a per-channel one.
        let consumer_prefetch = match &self.follow {
            Some(follow) if cfg.queue_type == QueueType::Quorum => {
                channel_prefetch(*follow.borrow())
            }
            _ => self.prefetch,
        };
        consume
            .basic_qos(consumer_prefetch, BasicQosOptions::default())
            .await
            .map_err(broker("setting basic.qos"))?;
        if let Some(follow) = self
            .follow
            .as_ref()
            .filter(|_| cfg.queue_type == QueueType::Classic)
        {
            let count = channel_prefetch(*follow.borrow());
            consume
                .basic_qos(count, BasicQosOptions { global: true })
                .await
                .map_err(broker("setting the per-channel basic.qos"))?;
        }
        let publish = connection
            .create_channel()
            .await
            .map_err(broker("opening a channel"))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker("enabling publisher confirms"))?;
        let consumer = consume
            .basic_consume(
                short("queue", &cfg.queue)?,
                short("consumer_tag", &cfg.consumer_tag)?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker("starting the consumer"))?;
        watchers.push(AbortOnDropHandle::new(tokio::spawn(watch_depth(
            connection.create_channel().await.ok(),
            cfg.queue.clone(),
            self.metrics.clone(),
        ))));
        let session = Session {
            generation,
            consumer_prefetch,
            connection,
            consume,
            publish,
            lost,
            _watchers: watchers,
        };
        Ok((session, consumer))
    }

    /// Opens the session of `generation`, retrying with backoff until it
    /// works. `None` when `stop` fires first.
    pub(super) async fn reopen(
        &self,
        generation: u64,
        stop: &CancellationToken,
    ) -> Option<(Session, Consumer)> {
        let mut backoff = reconnect_schedule(RECONNECT_INITIAL, RECONNECT_MAX);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let opened = tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                r = tokio::time::timeout(CONNECT_TIMEOUT, self.open(generation)) => r,
            };
            let error = match opened {
                Ok(Ok(opened)) => return Some(opened),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
            };
            let wait = backoff.next_backoff().unwrap_or(RECONNECT_MAX);
            tracing::warn!(attempt, error = %error, retry_in = ?wait, "RabbitMQ reconnect failed");
            self.metrics
                .broker_errors
                .with_label_values(&["rabbitmq", "reconnect_failed"])
                .inc();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// A prefetch limit as an AMQP prefetch count (at most 65535; 0 would mean
/// no limit, so at least 1).
pub(super) fn channel_prefetch(limit: u32) -> u16 {
    u16::try_from(limit.max(1)).unwrap_or(u16::MAX)
}

/// Turns the first connection-level error into "this session is lost", so
/// a dead connection is noticed even while intake is waiting for a permit
/// and nothing is being acknowledged.
async fn watch_events(
    events: impl futures::Stream<Item = lapin::Event> + Send + 'static,
    lost: CancellationToken,
    generation: u64,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        if let lapin::Event::Error(e) = event {
            if !lost.is_cancelled() {
                tracing::warn!(generation, error = %e, "RabbitMQ connection error");
                lost.cancel();
            }
            return;
        }
    }
}

/// How often `conveyor_rabbitmq_queue_messages` is refreshed.
const DEPTH_INTERVAL: Duration = Duration::from_secs(5);

/// Refreshes the queue depth with a passive declare on its own channel (a
/// failed passive declare closes the channel it ran on).
async fn watch_depth(channel: Option<Channel>, queue: String, metrics: Arc<Metrics>) {
    let Some(channel) = channel else {
        return;
    };
    let Ok(name) = ShortString::try_new(queue.as_str()) else {
        return;
    };
    let gauge = metrics.rabbitmq_queue.with_label_values(&[queue.as_str()]);
    let dest = Destination::Queue(queue.clone());
    let mut tick = tokio::time::interval(DEPTH_INTERVAL);
    loop {
        tick.tick().await;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match channel
            .queue_declare(name.clone(), passive, FieldTable::default())
            .await
        {
            Ok(q) => {
                gauge.set(i64::from(q.message_count()));
                metrics.drain.backlog(&dest, u64::from(q.message_count()));
            }
            Err(e) => {
                tracing::debug!(error = %e, "queue depth unavailable");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_doubles_to_its_cap_and_never_collapses() {
        let mut b = reconnect_schedule(Duration::from_millis(100), Duration::from_secs(5));
        let mut ceiling = Duration::from_millis(100);
        for _ in 0..20 {
            let wait = b
                .next_backoff()
                .expect("the reconnect schedule never runs out");
            assert!(
                wait >= ceiling / 2 && wait <= ceiling,
                "{wait:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(Duration::from_secs(5));
        }
        // At its cap: three quarters of 5 s, the centre of [2.5 s, 5 s].
        assert_eq!(b.current_interval, Duration::from_millis(3750));
    }
}
