//! Settlement: acknowledges what the pipeline finished on the current
//! session, in as few `basic.ack`s as the ack runs allow, and acks a dead
//! letter's original once the broker has confirmed the dead letter. Tokens
//! of a lost session are dropped, never acked on its successor.

use std::sync::Arc;

use lapin::options::BasicAckOptions;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::acks::AmqpAckRuns;
use super::dead_letter::publish_dead_letter;
use super::session::Session;
use crate::config::RabbitConfig;
use crate::source::{AckToken, DeadLetter, Settlement, TokenKind};
use crate::telemetry::{events, Destination, Metrics};

/// A dead-letter publish in progress: the letter, the session it was
/// published on, and how it went.
type Publishing = JoinSet<(Box<DeadLetter>, Arc<Session>, Result<(), String>)>;

/// Acknowledges settled deliveries on the current session; publishes dead
/// letters and acks their originals once the broker has confirmed them.
///
/// A token of another generation than the current session's is dropped
/// unacknowledged: its channel is gone, the broker redelivers the message
/// (flagged redelivered) and the stored outcome makes that a no-op. The ack
/// runs are per channel, so they start afresh with each generation.
pub(super) async fn settle(
    mut settlements: mpsc::UnboundedReceiver<Settlement>,
    sessions: watch::Receiver<Arc<Session>>,
    cfg: &RabbitConfig,
    metrics: &Metrics,
) {
    let queue = Destination::Queue(cfg.queue.clone());
    let mut runs = AmqpAckRuns::new();
    let mut runs_generation = sessions.borrow().generation;
    let mut held: Vec<AckToken> = Vec::new();
    let mut publishing: Publishing = JoinSet::new();
    let mut closed = false;
    loop {
        tokio::select! {
            s = settlements.recv(), if !closed => match s {
                Some(s) => {
                    accept(s, &mut held, &mut publishing, &sessions, cfg);
                    // Take whatever else is ready so one ack covers it.
                    while let Ok(s) = settlements.try_recv() {
                        accept(s, &mut held, &mut publishing, &sessions, cfg);
                    }
                }
                None => closed = true,
            },
            Some(joined) = publishing.join_next(), if !publishing.is_empty() => match joined {
                Ok((dl, _, Ok(()))) => {
                    events::dead_lettered(metrics, &dl);
                    held.push(dl.token);
                }
                Ok((dl, session, Err(e))) => {
                    // Dropping the token of a live channel would leave the
                    // original unacknowledged there until the channel
                    // closes; losing the session closes it, and the broker
                    // redelivers.
                    tracing::error!(position = %dl.position, error = %e,
                        "dead-letter publish failed; the original stays unacknowledged");
                    session.lose("a dead-letter publish failed");
                }
                Err(e) => tracing::error!(error = %e, "dead-letter task failed"),
            },
            else => break,
        }
        let session = sessions.borrow().clone();
        if session.generation != runs_generation {
            runs = AmqpAckRuns::new();
            runs_generation = session.generation;
        }
        // Acks on a channel being torn down are pointless: until intake
        // publishes the next session, everything settled comes back too.
        let live = !session.lost.is_cancelled();
        // Kept until their acks are sent: a token holds a prefetch permit.
        let mut acking = Vec::with_capacity(held.len());
        let mut stale = 0usize;
        for token in held.drain(..) {
            match token.kind {
                TokenKind::Rabbit {
                    generation,
                    delivery_tag,
                } if live && generation == session.generation => {
                    runs.done(delivery_tag);
                    acking.push(token);
                }
                _ => stale += 1,
            }
        }
        if stale > 0 {
            tracing::info!(
                stale,
                generation = session.generation,
                "settled deliveries of a lost session dropped; the broker redelivers them"
            );
        }
        if acking.is_empty() {
            continue;
        }
        // One `ack` span per order, over the basic.acks that cover it.
        let acks: Vec<tracing::Span> = acking
            .iter()
            .map(|t| crate::telemetry::traces::order_step!(parent: &t.span, "ack", "messaging.operation.type" = "settle"))
            .collect();
        let mut failed = false;
        for ack in runs.take_acks() {
            let options = BasicAckOptions {
                multiple: ack.multiple,
            };
            if let Err(e) = session.consume.basic_ack(ack.delivery_tag, options).await {
                // The channel is gone: its deliveries come back, and their
                // stored outcomes make the redelivery a no-op.
                tracing::error!(delivery_tag = ack.delivery_tag, error = %e,
                    "ack failed; unacknowledged deliveries will be redelivered");
                session.lose("an ack failed");
                failed = true;
                break;
            }
        }
        if !failed {
            metrics.acked.inc_by(acking.len() as u64);
            metrics.drain.acked(&queue, acking.len() as u64);
        }
        drop(acks);
        drop(acking);
    }
}

fn accept(
    s: Settlement,
    held: &mut Vec<AckToken>,
    publishing: &mut Publishing,
    sessions: &watch::Receiver<Arc<Session>>,
    cfg: &RabbitConfig,
) {
    match s {
        Settlement::Done(tokens) => held.extend(tokens),
        Settlement::DeadLetter(dl) => {
            let session = sessions.borrow().clone();
            let current = matches!(dl.token.kind,
                TokenKind::Rabbit { generation, .. } if generation == session.generation);
            if !current || session.lost.is_cancelled() {
                // The original cannot be acked any more: it is redelivered
                // and dead-lettered again then. Publishing now would only
                // make a second copy.
                tracing::info!(position = %dl.position, reason = %dl.reason,
                    "dead letter of a lost session dropped; the broker redelivers the original");
                return;
            }
            let exchange = cfg.dead_letter_exchange.clone();
            let routing_key = if exchange.is_empty() {
                cfg.dead_letter_queue()
            } else {
                cfg.queue.clone()
            };
            publishing.spawn(async move {
                let result =
                    publish_dead_letter(&session.publish, &exchange, &routing_key, &dl).await;
                (dl, session, result)
            });
        }
    }
}
