//! Sources: where deliveries come from and where their fate goes back to.
//!
//! A source runs two loops. *Intake* takes a prefetch permit (see
//! [`prefetch`]: the limit is fixed, or follows the stages), then a message
//! from the broker, and hands the pipeline a [`Delivery`]; when the permits are
//! gone it stops pulling, which is the daemon's backpressure. *Settlement*
//! receives [`Settlement`]s from the pipeline (stored, or to be
//! dead-lettered) and acknowledges to the broker; a delivery's permit is
//! released only when its settlement has been handled.
//!
//! The pipeline never sees a broker type: only [`Delivery`], [`AckToken`]
//! and [`Settlement`]. A Kafka source plugs in with its own token variant.

pub mod kafka;
pub mod prefetch;
pub mod rabbitmq;

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::outcome::{DeadLetterReason, Stage};
use crate::telemetry::Metrics;

/// A dead-letter publish is retried this many times (with full jitter,
/// doubling between the two bounds) before its original is left
/// unacknowledged for the broker to redeliver.
pub(crate) const DEAD_LETTER_ATTEMPTS: u32 = 5;
pub(crate) const DEAD_LETTER_RETRY_INITIAL: std::time::Duration =
    std::time::Duration::from_millis(200);
pub(crate) const DEAD_LETTER_RETRY_MAX: std::time::Duration =
    std::time::Duration::from_millis(1600);

/// Where a message sits in its broker, for logs, headers and the stored row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    Rabbit {
        queue: Arc<str>,
        delivery_tag: u64,
    },
    Kafka {
        topic: Arc<str>,
        partition: i32,
        offset: i64,
    },
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Rabbit {
                queue,
                delivery_tag,
            } => write!(f, "{queue}#{delivery_tag}"),
            Position::Kafka {
                topic,
                partition,
                offset,
            } => write!(f, "{topic}/{partition}@{offset}"),
        }
    }
}

/// What the source needs back to acknowledge one delivery. Holding it holds
/// one prefetch permit.
#[derive(Debug)]
pub struct AckToken {
    pub(crate) kind: TokenKind,
    /// Released when the settlement is handled (the broker was told).
    pub(crate) _permit: prefetch::PrefetchPermit,
    pub(crate) _held: Held,
    /// The order's span ([`process_span`](crate::telemetry::traces::process_span)):
    /// it ends when the last handle goes, which is this token's, once the
    /// broker has been told.
    pub(crate) span: tracing::Span,
    /// What the crash-loop screen made of it (and its place in the stages).
    pub(crate) screened: crate::pipeline::Screened,
}

/// Counts a delivery in `conveyor_unacked_messages` and the oldest-unacked
/// clock for as long as it lives, whichever way it ends (acked, or dropped
/// for the broker to redeliver).
pub(crate) struct Held {
    metrics: Arc<Metrics>,
    id: u64,
    /// Ties a RabbitMQ delivery to the consumer it came from, while that
    /// consumer may be swapped (`rabbitmq::swap` waits for all of them).
    _consumer: Option<tokio_util::task::task_tracker::TaskTrackerToken>,
}

impl Held {
    pub(crate) fn new(metrics: &Arc<Metrics>) -> Self {
        Self::of_consumer(metrics, None)
    }

    pub(crate) fn of_consumer(
        metrics: &Arc<Metrics>,
        consumer: Option<tokio_util::task::task_tracker::TaskTrackerToken>,
    ) -> Self {
        metrics.unacked.inc();
        Self {
            id: metrics.held_since.start(),
            metrics: metrics.clone(),
            _consumer: consumer,
        }
    }
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Held({})", self.id)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.metrics.unacked.dec();
        self.metrics.held_since.stop(self.id);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// `generation` identifies the channel: a token from a channel that has
    /// since died is dropped, never acknowledged on its successor.
    Rabbit { generation: u64, delivery_tag: u64 },
    /// `epoch` identifies the assignment of the partition: a completion
    /// arriving after a revoke is never committed.
    Kafka {
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        epoch: u64,
    },
}

/// One message as the pipeline sees it.
#[derive(Debug)]
pub struct Delivery {
    pub body: Bytes,
    /// The message key (Kafka), kept for the dead-letter copy.
    pub key: Option<Bytes>,
    pub position: Position,
    /// The broker says it may have been handed out before.
    pub redelivered: bool,
    /// How many times the broker has handed it out before, where the
    /// broker counts (quorum queues' `x-delivery-count`); `None` elsewhere,
    /// where the store keeps the count (see `pipeline::attempts`).
    pub prior_deliveries: Option<u32>,
    /// When the daemon received it; end-to-end latency starts here unless the
    /// broker stamped the message.
    pub received_at: Instant,
    /// Broker/producer timestamp (Unix milliseconds), when the message has one.
    pub timestamp_ms: Option<i64>,
    /// W3C trace context (`traceparent` header of the message), forwarded on
    /// the downstream calls made for this order.
    pub traceparent: Option<String>,
    pub token: AckToken,
}

/// A message that must go to the dead-letter destination before its
/// original is acknowledged.
#[derive(Debug)]
pub struct DeadLetter {
    pub token: AckToken,
    pub body: Bytes,
    pub key: Option<Bytes>,
    pub position: Position,
    pub reason: DeadLetterReason,
    /// Human-readable detail.
    pub detail: String,
    /// The stage that gave up.
    pub stage: Stage,
    pub order_id: Option<String>,
    /// Headers of this reason only, e.g. both payload digests of a
    /// `conflicting_duplicate`.
    pub extra_headers: Vec<(&'static str, String)>,
}

/// The fate of deliveries, reported by the pipeline to the source.
#[derive(Debug)]
pub enum Settlement {
    /// Durably stored (or already stored before): acknowledge.
    Done(Vec<AckToken>),
    /// Publish to the dead-letter destination, confirm, then acknowledge.
    DeadLetter(Box<DeadLetter>),
}
