//! Intake: a prefetch permit, then a message from the consumer, then a
//! [`Delivery`] for the pipeline, registered with the offset tracker under
//! its partition's epoch. After intake stops, the consumer is still polled
//! (messages dropped) so that rebalances can complete until the source
//! closes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use rdkafka::consumer::Consumer;
use rdkafka::message::Headers;
use rdkafka::Message;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::consumable::Consumable;
use super::offsets::OffsetTracker;
use super::{KafkaConsumer, KafkaSourceError};
use crate::source::{AckToken, Delivery, Held, Position, TokenKind};
use crate::telemetry::{traces, Metrics};

#[allow(clippy::too_many_arguments)]
pub(super) async fn intake(
    consumer: Arc<KafkaConsumer>,
    tracker: Arc<Mutex<OffsetTracker>>,
    prefetch: u64,
    permits: Arc<Semaphore>,
    deliveries: mpsc::Sender<Delivery>,
    stop: CancellationToken,
    closing: CancellationToken,
    metrics: Arc<Metrics>,
    consumable: Arc<Consumable>,
    group: Arc<str>,
) -> Result<(), KafkaSourceError> {
    let mut topics: HashMap<String, Arc<str>> = HashMap::new();
    let outcome = loop {
        // Without a permit nothing more is received: librdkafka's fetch
        // queue fills up to its cap and fetching stops.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
        };
        let msg = tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            m = consumer.recv() => m,
        };
        let m = match msg {
            Ok(m) => m,
            Err(e) => {
                if let Some(fatal) = fatal_error(&consumer) {
                    break Err(fatal);
                }
                metrics
                    .broker_errors
                    .with_label_values(&["kafka", "consumer_error"])
                    .inc();
                // Permanent ones are counted, logged rate-limited and
                // surfaced in /readyz there.
                if !consumable.consumer_error(&e) {
                    tracing::warn!(error = %e, "kafka consumer error");
                }
                continue;
            }
        };
        let topic = match topics.get(m.topic()) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = Arc::from(m.topic());
                topics.insert(m.topic().to_string(), t.clone());
                t
            }
        };
        let tp = (topic.clone(), m.partition());
        let offset = m.offset();
        let received = match tracker.lock() {
            Ok(mut t) => t
                .received(&tp, offset)
                .map(|epoch| (epoch, t.received_since_assign(&tp))),
            Err(_) => None,
        };
        let Some((epoch, nth)) = received else {
            // A message of a partition we do not own (revoked meanwhile):
            // not processed, its next owner will.
            continue;
        };
        // Kafka has no redelivered flag. The previous owner of a partition
        // may have stored orders it had not committed yet: at a handover
        // (revoke commits synchronously) at most the `prefetch` it held in
        // flight, so the first `prefetch` messages of each assignment are
        // flagged and the pipeline acks those already stored without
        // calling anyone. After a crash the uncommitted window can be
        // longer (up to `commit_interval` of throughput); orders past the
        // flag go through the stages again, harmless thanks to the
        // idempotency key and the upsert, only not short-circuited.
        let redelivered = nth <= prefetch;
        metrics.received.inc();
        let traceparent = m.headers().and_then(|h| header_text(h, "traceparent"));
        let position = Position::Kafka {
            topic: topic.clone(),
            partition: m.partition(),
            offset,
        };
        let span = traces::process_span(
            &position,
            Some(&group),
            m.payload().map_or(0, <[u8]>::len),
            traceparent.as_deref(),
        );
        let delivery = Delivery {
            body: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
            key: m.key().map(Bytes::copy_from_slice),
            position,
            redelivered,
            prior_deliveries: None,
            received_at: Instant::now(),
            timestamp_ms: m.timestamp().to_millis(),
            traceparent,
            token: AckToken {
                kind: TokenKind::Kafka {
                    topic,
                    partition: m.partition(),
                    offset,
                    epoch,
                },
                _permit: permit,
                _held: Held::new(&metrics),
                span,
                screened: Default::default(),
            },
        };
        drop(m);
        if deliveries.send(delivery).await.is_err() {
            break Ok(());
        }
    };
    drop(deliveries);
    match &outcome {
        Ok(()) => tracing::info!("intake stopped"),
        Err(e) => {
            tracing::error!(error = %e, "intake failed");
            return outcome;
        }
    }
    serve_rebalances(&consumer, &closing).await
}

/// The client's fatal error, if it has one: the consumer cannot go on.
fn fatal_error(consumer: &KafkaConsumer) -> Option<KafkaSourceError> {
    consumer
        .client()
        .fatal_error()
        .map(|(code, reason)| KafkaSourceError::Fatal {
            code: format!("{code:?}"),
            reason,
        })
}

/// After intake stopped and until the source closes: polls the consumer so
/// that librdkafka can run a rebalance (its callbacks run inside `recv()`),
/// else this member could neither rejoin nor commit until the group evicts
/// it. Messages are not processed: not tracked, their offsets are never
/// committed by this member.
async fn serve_rebalances(
    consumer: &KafkaConsumer,
    closing: &CancellationToken,
) -> Result<(), KafkaSourceError> {
    // Paused partitions stop fetching; a partition assigned from now on is
    // fetched and its messages dropped.
    if let Ok(assigned) = consumer.assignment() {
        if let Err(e) = consumer.pause(&assigned) {
            tracing::debug!(error = %e, "cannot pause the assignment");
        }
    }
    loop {
        let msg = tokio::select! {
            biased;
            _ = closing.cancelled() => return Ok(()),
            m = consumer.recv() => m,
        };
        if msg.is_err() {
            if let Some(fatal) = fatal_error(consumer) {
                return Err(fatal);
            }
        }
    }
}

/// Reads a header of a Kafka message as text (tests, tools).
pub fn header_text<H: Headers>(headers: &H, name: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
