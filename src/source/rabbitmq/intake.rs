//! Intake: session after session until stopped — a prefetch permit, then a
//! delivery, then a [`Delivery`] for the pipeline stamped with the
//! session's generation. Intake owns reconnection: when a session is lost
//! it closes it (the broker requeues what was unacknowledged), opens the
//! next one and publishes it to settlement.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use lapin::types::AMQPValue;
use lapin::Consumer;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::session::{Link, Session};
use super::swap::{Feed, Next};
use super::{RabbitError, TIMESTAMP_HEADER};
use crate::config::{QueueType, RabbitConfig};
use crate::source::prefetch::Prefetch;
use crate::source::{AckToken, Delivery, Held, Position, TokenKind};
use crate::telemetry::{traces, Health, Metrics};

/// Set by quorum queues on a message returned to the queue before: how many
/// times it was (absent on the first delivery).
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

fn delivery_count(v: &AMQPValue) -> Option<u32> {
    let n: i64 = match v {
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok()?,
        _ => return None,
    };
    Some(u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

/// How one session's intake ended.
enum Ended {
    /// `stop_intake` fired or the pipeline is gone: the daemon is stopping.
    Stopped,
    /// The session failed; intake reconnects.
    Lost(String),
}

/// Consumes session after session until stopped. Owns reconnection: it is
/// the only writer of `sessions`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn intake(
    link: &Link,
    consumer: Consumer,
    sessions: &watch::Sender<Arc<Session>>,
    queue: Arc<str>,
    permits: Arc<Prefetch>,
    deliveries: mpsc::Sender<Delivery>,
    stop: CancellationToken,
    health: &Health,
) -> Result<(), RabbitError> {
    let feed_of = |consumer: Consumer, session: &Session| {
        // Quorum queues follow the limit by swapping the consumer; classic
        // ones by the per-channel basic.qos (`follow_qos`).
        let follow = link
            .follow
            .clone()
            .filter(|_| link.cfg.queue_type == QueueType::Quorum);
        Feed::new(consumer, follow.map(|rx| (rx, session.consumer_prefetch)))
    };
    let mut feed = feed_of(consumer, &sessions.borrow());
    loop {
        let session = sessions.borrow().clone();
        let ended = consume_session(
            &session,
            &mut feed,
            &link.cfg,
            &queue,
            &permits,
            &deliveries,
            &stop,
            &link.metrics,
        )
        .await;
        match ended {
            Ended::Stopped => break,
            Ended::Lost(why) => {
                session.lose(&why);
                Health::set(&health.broker_connected, false);
                // Whatever of this session is still unacknowledged comes
                // back from the broker once the connection is closed.
                session.close("conveyor: session lost").await;
                let next = session.generation + 1;
                drop(session);
                let Some((fresh, c)) = link.reopen(next, &stop).await else {
                    break;
                };
                feed = feed_of(c, &fresh);
                sessions.send_replace(Arc::new(fresh));
                Health::set(&health.broker_connected, true);
                tracing::info!(
                    generation = next,
                    queue = %link.cfg.queue,
                    "RabbitMQ reconnected; consuming again"
                );
            }
        }
    }
    // Stop the flow of new deliveries; what lapin has buffered but we did
    // not take stays unacknowledged and is requeued when the channel closes.
    let session = sessions.borrow().clone();
    if !session.lost.is_cancelled() {
        feed.cancel(&session).await;
    }
    tracing::info!("intake stopped");
    Ok(())
}

/// Intake on one session: a permit, then a message, then hand it on.
#[allow(clippy::too_many_arguments)]
async fn consume_session(
    session: &Session,
    feed: &mut Feed,
    cfg: &RabbitConfig,
    queue: &Arc<str>,
    permits: &Prefetch,
    deliveries: &mpsc::Sender<Delivery>,
    stop: &CancellationToken,
    metrics: &Arc<Metrics>,
) -> Ended {
    let generation = session.generation;
    let lost = || Ended::Lost("reported by settlement or the connection".into());
    loop {
        // The permit first: without one, nothing more is taken from the
        // broker. This is where backpressure stops intake.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ended::Stopped,
            _ = session.lost.cancelled() => return lost(),
            p = permits.acquire() => match p {
                Some(p) => p,
                None => return Ended::Stopped,
            },
        };
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ended::Stopped,
            _ = session.lost.cancelled() => return lost(),
            n = feed.next(session, cfg, metrics) => n,
        };
        let (d, consumer) = match next {
            Next::Delivery(d, consumer) => (*d, consumer),
            Next::Failed(why) => return Ended::Lost(why),
        };
        metrics.received.inc();
        let timestamp_ms = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(TIMESTAMP_HEADER))
            .and_then(|v| match v {
                AMQPValue::LongLongInt(ms) => Some(*ms),
                AMQPValue::Timestamp(ms) => i64::try_from(*ms).ok(),
                _ => None,
            })
            .or_else(|| {
                d.properties
                    .timestamp()
                    .and_then(|s| i64::try_from(s).ok())
                    .map(|s| s * 1000)
            });
        let traceparent = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("traceparent"))
            .and_then(|v| match v {
                AMQPValue::LongString(s) => Some(s.to_string()),
                AMQPValue::ShortString(s) => Some(s.to_string()),
                _ => None,
            });
        let position = Position::Rabbit {
            queue: queue.clone(),
            delivery_tag: d.delivery_tag,
        };
        let span = traces::process_span(&position, None, d.data.len(), traceparent.as_deref());
        let delivery = Delivery {
            position,
            redelivered: d.redelivered,
            prior_deliveries: (cfg.queue_type == QueueType::Quorum).then(|| {
                d.properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get(DELIVERY_COUNT_HEADER))
                    .and_then(delivery_count)
                    .unwrap_or(0)
            }),
            received_at: Instant::now(),
            timestamp_ms,
            traceparent,
            token: AckToken {
                kind: TokenKind::Rabbit {
                    generation,
                    delivery_tag: d.delivery_tag,
                },
                _permit: permit,
                _held: Held::of_consumer(metrics, consumer),
                span,
                screened: Default::default(),
            },
            body: Bytes::from(d.data),
            key: None,
        };
        if deliveries.send(delivery).await.is_err() {
            return Ended::Stopped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delivery_count_is_read_from_any_integer_type() {
        assert_eq!(delivery_count(&AMQPValue::LongLongInt(3)), Some(3));
        assert_eq!(delivery_count(&AMQPValue::LongInt(2)), Some(2));
        assert_eq!(delivery_count(&AMQPValue::LongLongInt(-1)), Some(0));
        assert_eq!(
            delivery_count(&AMQPValue::LongString("3".into())),
            None,
            "not a number"
        );
    }
}
