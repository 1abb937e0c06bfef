//! Crash-loop containment: a message delivered more than
//! `source.max_deliveries` times is dead-lettered as `redelivery_limit`
//! before any work is done on it, so that a message which keeps killing
//! the process (an abort, an OOM kill, a hang the supervisor ends with
//! SIGKILL) cannot block its queue or partition for ever.
//!
//! Who counts:
//! * a quorum queue counts itself: `x-delivery-count`, the returns so far,
//!   arrives as [`Delivery::prior_deliveries`];
//! * elsewhere the store does. A delivery the source flags as redelivered
//!   (RabbitMQ's `redelivered` bit; on Kafka the first `source.prefetch`
//!   messages of each assignment) adds one to a durable record keyed by the
//!   message's identity — `rabbitmq:<queue>:<sha256 of the body>`,
//!   `kafka:<topic>/<partition>@<offset>` — written before any work, so a
//!   crash in the middle of that work has already been counted. Only
//!   flagged deliveries cost a write.
//!
//! A count on record is of deliveries that have not settled: a counted
//! delivery that settles (stored, or found stored already) has its count
//! dropped before it is acknowledged. So what a count says at start-up is
//! how many processes died (or lost the message) while it was in flight.
//!
//! Innocent neighbours. A process that dies takes with it every message in
//! flight, not only the one that killed it, and each of them is counted. So
//! that they do not reach the limit with the culprit, a delivery on its last
//! chance (`max_deliveries`, and at least the second) is worked on **alone**:
//! the screen waits until nothing else is in flight, counts it, lets it
//! through, and lets nothing else through until it has settled. An innocent
//! one settles and its count goes; the culprit kills the process alone, and
//! only its count goes past the limit. Its count is written only once it is
//! let through, so the last chances queued behind it when it struck are not
//! charged with its death.
//!
//! On quorum queues the broker counts, and counts every message the process
//! held when it died, those queued behind a last chance included. So the
//! store also keeps a record of each last chance let through alone, and a
//! broker's count past the limit convicts only a message that has one: the
//! others get a last chance of their own. (The broker's own
//! `x-delivery-limit` stays the backstop: keep `rabbitmq.delivery_limit` a
//! few above `source.max_deliveries`.)

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use super::Context;
use crate::outcome::{DeadLetterReason, Stage};
use crate::source::{AckToken, DeadLetter, Delivery, Position};
use crate::telemetry::events;

/// The identity a delivery's count is kept under in the store.
fn message_key(d: &Delivery) -> String {
    match &d.position {
        Position::Kafka { .. } => format!("kafka:{}", d.position),
        Position::Rabbit { queue, .. } => {
            let digest = Sha256::digest(&d.body);
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("rabbitmq:{queue}:{hex}")
        }
    }
}

/// Deliveries before this one that the store's count does not include: a
/// RabbitMQ message flagged `redelivered` was delivered at least once
/// unflagged, which was not counted; a flagged Kafka message may be on its
/// first delivery, so its count is all there is.
fn uncounted_first(d: &Delivery) -> u32 {
    match d.position {
        Position::Rabbit { .. } => 1,
        Position::Kafka { .. } => 0,
    }
}

/// What the screen decided about one delivery, carried on its token until
/// the delivery settles.
#[derive(Debug, Default)]
pub(crate) struct Screened {
    /// The key its count is kept under, when the store counts it.
    counted: Option<String>,
    /// Its last chance: worked on with nothing else in flight.
    alone: bool,
    /// Which delivery this is, as far as anyone counted.
    deliveries: u32,
    /// Held until the delivery settles.
    pass: Option<Pass>,
}

/// A place in the pipeline: shared with everything else in flight, or the
/// whole of it.
#[derive(Debug)]
enum Pass {
    Shared { _guard: OwnedRwLockReadGuard<()> },
    Alone { _guard: OwnedRwLockWriteGuard<()> },
}

/// The gate every delivery goes through on its way from the screen to the
/// stages (see the module doc).
pub(super) type Gate = Arc<RwLock<()>>;

/// The key a settled delivery's count is to be dropped under, if it has one.
pub(super) fn settled(token: &mut AckToken) -> Option<String> {
    token.screened.counted.take()
}

/// Drops the counts of counted deliveries that settled. Best effort: a count
/// left behind costs that message one delivery of its budget if it comes
/// again, and is pruned in time.
pub(super) async fn forget(ctx: &Context, mut keys: Vec<String>) {
    if keys.is_empty() || ctx.config.source.max_deliveries == 0 {
        return;
    }
    keys.sort_unstable();
    keys.dedup();
    if let Err(e) = ctx.store.forget_deliveries(&keys).await {
        tracing::debug!(error = %e, "cannot clear the delivery counts of settled orders");
    }
}

/// Lets a screened delivery through `gate` into the stages: most share it;
/// a last chance waits until nothing else is in flight, is counted, and
/// keeps the others out until it settles.
pub(super) async fn admit(ctx: &Context, gate: &Gate, token: &mut AckToken) {
    if ctx.config.source.max_deliveries == 0 {
        return;
    }
    let screened = &mut token.screened;
    if !screened.alone {
        screened.pass = Some(Pass::Shared {
            _guard: gate.clone().read_owned().await,
        });
        return;
    }
    let alone = gate.clone().write_owned().await;
    tracing::warn!(
        deliveries = screened.deliveries,
        max_deliveries = ctx.config.source.max_deliveries,
        "last delivery allowed: working on this message alone"
    );
    if let Some(key) = &screened.counted {
        count(ctx, std::slice::from_ref(key)).await;
    }
    screened.pass = Some(Pass::Alone { _guard: alone });
}

/// Dead-letters the deliveries of `batch` that are over the limit and
/// returns the others, in order. Waits (readiness false) while the store
/// cannot count: a redelivered message is not worked on before its
/// delivery is on record.
pub(super) async fn screen(ctx: &Context, batch: Vec<Delivery>) -> Vec<Delivery> {
    let max = ctx.config.source.max_deliveries;
    if max == 0 {
        return batch;
    }
    // Who counts: the broker (quorum queues), the store (flagged
    // redeliveries elsewhere), or nobody (a first delivery). The store also
    // keeps a record of every last chance let through alone, whoever
    // counts, so a broker's count past the limit convicts only a message
    // that died alone.
    let mut keys: Vec<Option<String>> = Vec::with_capacity(batch.len());
    let mut wanted: Vec<String> = Vec::new();
    for d in &batch {
        let (key, look) = match d.prior_deliveries {
            Some(prior) => {
                let n = prior.saturating_add(1);
                let last = n >= 2 && n >= max;
                (last.then(|| message_key(d)), n > max)
            }
            None if d.redelivered => (Some(message_key(d)), true),
            None => (None, false),
        };
        if let (Some(k), true) = (&key, look) {
            if !wanted.contains(k) {
                wanted.push(k.clone());
            }
        }
        keys.push(key);
    }
    let recorded = if wanted.is_empty() {
        HashMap::new()
    } else {
        recorded(ctx, &wanted).await
    };
    let on_record = |k: &Option<String>| {
        k.as_ref()
            .and_then(|k| recorded.get(k))
            .copied()
            .unwrap_or(0)
    };
    let mut kept = Vec::with_capacity(batch.len());
    let mut over: Vec<String> = Vec::new();
    let mut counting: Vec<String> = Vec::new();
    for (mut d, key) in batch.into_iter().zip(keys) {
        let (deliveries, guilty) = match (d.prior_deliveries, &key) {
            // Past the limit by the broker's count, but never let through
            // alone: it was queued behind another's last chance when the
            // process died. It gets a last chance of its own.
            (Some(prior), _) => {
                let n = prior.saturating_add(1);
                // (With a limit of one there is no last chance to give.)
                (n, n > max && (max == 1 || on_record(&key) > 0))
            }
            (None, Some(_)) => {
                let n = on_record(&key)
                    .saturating_add(1)
                    .saturating_add(uncounted_first(&d));
                (n, n > max)
            }
            (None, None) => (1, false),
        };
        if !guilty {
            let alone = deliveries >= 2 && deliveries >= max;
            let store_counts = d.prior_deliveries.is_none();
            if let (Some(k), false, true) = (&key, alone, store_counts) {
                if !counting.contains(k) {
                    counting.push(k.clone());
                }
            }
            d.token.screened = Screened {
                counted: key,
                alone,
                deliveries,
                pass: None,
            };
            kept.push(d);
            continue;
        }
        events::limited(&ctx.metrics, "redelivery_limit", |suppressed| {
            tracing::warn!(position = %d.position, deliveries, max_deliveries = max, suppressed,
                "message delivered too many times; dead-lettering it before any work");
        });
        if let Some(k) = key {
            over.push(k);
        }
        ctx.dead_letter(DeadLetter {
            token: d.token,
            body: d.body,
            key: d.key,
            position: d.position,
            reason: DeadLetterReason::RedeliveryLimit,
            detail: format!(
                "delivered {deliveries} times, more than source.max_deliveries ({max}): \
                 it may be what keeps the daemon from finishing its work"
            ),
            stage: Stage::Decode,
            order_id: None,
            extra_headers: vec![("x-conveyor-deliveries", deliveries.to_string())],
        });
    }
    if !counting.is_empty() {
        count(ctx, &counting).await;
    }
    if !over.is_empty() {
        // A replay of the dead letter starts with a clean count. Best
        // effort: a count left behind only shortens that replay's budget.
        if let Err(e) = ctx.store.forget_deliveries(&over).await {
            tracing::warn!(error = %e, "cannot clear the delivery counts of dead letters");
        }
    }
    kept
}

/// The counts on record of `keys`, asking until the store answers.
async fn recorded(ctx: &Context, keys: &[String]) -> HashMap<String, u32> {
    ctx.ask_store(
        "cannot read delivery counts; retrying before any work",
        keys.len(),
        || ctx.store.recorded_deliveries(keys),
    )
    .await
}

/// One more delivery of each of `keys` on record, before any work on them:
/// asks until the store answers.
async fn count(ctx: &Context, keys: &[String]) {
    ctx.ask_store(
        "cannot count redeliveries; retrying before any work",
        keys.len(),
        || ctx.store.count_deliveries(keys),
    )
    .await;
}
