//! Decoding and screening: each delivery is decoded, then looked up in the
//! store before any downstream is called.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::mpsc;

use super::contain::TokenSlot;
use super::{attempts, conflicting_duplicate, Context, InFlight};
use crate::order::{self, Decoded};
use crate::outcome::{DeadLetterReason, Outcome, Stage};
use crate::source::{AckToken, DeadLetter, Delivery};
use crate::store::StoredDigests;
use crate::telemetry::{events, traces};

/// Most deliveries decoded in one go.
const DECODE_BATCH: usize = 128;

/// Most orders looked up in one store query.
const LOOKUP_BATCH: usize = 256;

/// Decodes each delivery; poison goes to the dead-letter destination, the
/// rest on to [`screen_loop`]. First of all, a delivery over
/// `source.max_deliveries` is dead-lettered (see `attempts`). Decoding goes on while the screen waits for
/// the store.
pub(super) async fn decode_loop(
    ctx: Arc<Context>,
    mut deliveries: mpsc::Receiver<Delivery>,
    validate: mpsc::Sender<InFlight>,
) {
    let (decoded_tx, decoded_rx) = mpsc::channel(LOOKUP_BATCH);
    let screen = screen_loop(ctx.clone(), decoded_rx, validate);
    let decode = async move {
        let max = ctx.config.source.max_message_bytes;
        let mut waiting = Vec::with_capacity(DECODE_BATCH);
        while deliveries.recv_many(&mut waiting, DECODE_BATCH).await > 0 {
            let screened = attempts::screen(&ctx, std::mem::take(&mut waiting)).await;
            for d in screened {
                let decoding = traces::order_step!(parent: &d.token.span, "decode");
                match decoding.in_scope(|| order::decode_canonical(&d.body, max)) {
                    Ok(order) => {
                        traces::identify(&d.token.span, &order.order.order_id);
                        if decoded_tx.send((d, order)).await.is_err() {
                            return;
                        }
                    }
                    Err(poison) => ctx.dead_letter(DeadLetter {
                        token: d.token,
                        order_id: None,
                        body: d.body,
                        key: d.key,
                        position: d.position,
                        reason: DeadLetterReason::Poison(poison.kind),
                        detail: poison.detail,
                        stage: Stage::Decode,
                        extra_headers: Vec::new(),
                    }),
                }
            }
        }
    };
    tokio::join!(decode, screen);
}

/// Before any downstream call, every decoded order is looked up in the
/// store: an `order_id` stored with the same payload digest (a redelivery, a
/// producer's resend) is acknowledged without calling anyone again; one
/// stored with another digest is dead-lettered as `conflicting_duplicate`.
/// Checking every order, not only those the broker flags as redelivered,
/// is what keeps a resend days later — past the provider's idempotency
/// window — from being charged again.
///
/// Orders share lookups: once one arrives, the screen gathers those that
/// follow for up to a quarter of `batch.max_wait` (or until it has
/// [`LOOKUP_BATCH`]) and asks for all of them in one query. Under load that
/// turns one query per order into one per few dozen, which is most of the
/// database's cost of the check; idle, it delays an order by no more than
/// its batch would wait anyway.
async fn screen_loop(
    ctx: Arc<Context>,
    mut decoded: mpsc::Receiver<(Delivery, Decoded)>,
    validate: mpsc::Sender<InFlight>,
) {
    let linger = ctx.config.batch.max_wait / 4;
    let mut pending: Vec<(Delivery, Decoded)> = Vec::with_capacity(LOOKUP_BATCH);
    let gate = attempts::Gate::default();
    // Found already stored: done, their counts dropped first.
    let mut settled: Vec<AckToken> = Vec::new();
    let mut fresh = Vec::with_capacity(LOOKUP_BATCH);
    while decoded.recv_many(&mut pending, LOOKUP_BATCH).await > 0 {
        let until = tokio::time::Instant::now() + linger;
        while pending.len() < LOOKUP_BATCH {
            let room = LOOKUP_BATCH - pending.len();
            match tokio::time::timeout_at(until, decoded.recv_many(&mut pending, room)).await {
                Ok(n) if n > 0 => {}
                // Closed, or lingered long enough.
                _ => break,
            }
        }
        let ids: Vec<String> = pending
            .iter()
            .map(|(_, o)| o.order.order_id.clone())
            .collect();
        let stored = lookup(&ctx, &ids).await;
        for (
            d,
            Decoded {
                order,
                payload,
                digest,
            },
        ) in pending.drain(..)
        {
            match stored.get(&order.order_id) {
                None => {}
                // Same contents, or stored before digests existed (nothing
                // to compare with): the outcome is already durable.
                Some(theirs) if theirs.as_deref().is_none_or(|t| t == digest.to_hex()) => {
                    events::limited(&ctx.metrics, "duplicate", |suppressed| {
                        tracing::info!(order_id = %order.order_id, position = %d.position,
                            suppressed, "order already stored; acknowledging");
                    });
                    ctx.metrics.outcome(Outcome::Duplicate);
                    settled.push(d.token);
                    continue;
                }
                Some(theirs) => {
                    let theirs = theirs.as_deref().unwrap_or_default();
                    events::limited(&ctx.metrics, "conflicting_duplicate", |suppressed| {
                        tracing::warn!(order_id = %order.order_id, position = %d.position,
                            suppressed, "order_id already stored with other contents; dead-lettering");
                    });
                    ctx.dead_letter(conflicting_duplicate(
                        (d.token, d.body, d.key, d.position),
                        order.order_id,
                        (&digest.to_hex(), theirs),
                        Stage::Decode,
                    ));
                    continue;
                }
            }
            fresh.push((d, order, payload, digest));
        }
        if !settled.is_empty() {
            let keys = settled.iter_mut().filter_map(attempts::settled).collect();
            attempts::forget(&ctx, keys).await;
            ctx.done(std::mem::take(&mut settled));
        }
        for (mut d, order, payload, digest) in fresh.drain(..) {
            attempts::admit(&ctx, &gate, &mut d.token).await;
            let it = InFlight {
                order,
                payload,
                digest,
                raw: d.body,
                key: d.key,
                position: d.position,
                received_at: d.received_at,
                received_wall: Utc::now(),
                timestamp_ms: d.timestamp_ms,
                traceparent: d.traceparent,
                span: d.token.span.clone(),
                token: TokenSlot::new(d.token),
            };
            if validate.send(it).await.is_err() {
                return;
            }
        }
    }
}

/// The stored digests of `ids`, asking until the store answers: an order
/// is charged only once it is known not to be stored already, so while the
/// database is unreachable intake waits (readiness false) rather than
/// moving money it may not be able to record.
async fn lookup(ctx: &Context, ids: &[String]) -> StoredDigests {
    ctx.ask_store(
        "cannot look up stored orders; retrying before any charge",
        ids.len(),
        || ctx.store.stored(ids),
    )
    .await
}
