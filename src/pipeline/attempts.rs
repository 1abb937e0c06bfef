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
//! A count is of *deliveries*, whatever ended them: messages that were
//! merely in flight when the process died are counted too, so the limit
//! should leave room for a few restarts that were not their fault. A
//! counted message found already stored has its count dropped (see
//! [`forget`]).

use std::collections::HashMap;

use sha2::{Digest as _, Sha256};

use super::Context;
use crate::downstream::retry::FullJitter;
use crate::outcome::{DeadLetterReason, Stage};
use crate::source::{DeadLetter, Delivery, Position};
use crate::telemetry::{events, Health};

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

/// The key this delivery was counted under, if it was counted in the store.
pub(super) fn counted_key(d: &Delivery) -> Option<String> {
    (d.prior_deliveries.is_none() && d.redelivered).then(|| message_key(d))
}

/// Drops the counts of counted deliveries found already stored. On Kafka a
/// crash sends a partition back to its committed offset, so the messages
/// that were finished after it come again, each counted: forgetting them
/// once seen stored keeps them from running up a count they did not
/// cause. Best effort.
pub(super) async fn forget(ctx: &Context, mut keys: Vec<String>) {
    if keys.is_empty() || ctx.config.source.max_deliveries == 0 {
        return;
    }
    keys.sort_unstable();
    keys.dedup();
    if let Err(e) = ctx.store.forget_deliveries(&keys).await {
        tracing::debug!(error = %e, "cannot clear the delivery counts of stored orders");
    }
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
    let mut keys: Vec<Option<String>> = Vec::with_capacity(batch.len());
    let mut wanted: Vec<String> = Vec::new();
    for d in &batch {
        let key = counted_key(d);
        if let Some(k) = &key {
            if !wanted.contains(k) {
                wanted.push(k.clone());
            }
        }
        keys.push(key);
    }
    let counts = if wanted.is_empty() {
        HashMap::new()
    } else {
        count(ctx, &wanted).await
    };
    let mut kept = Vec::with_capacity(batch.len());
    let mut over: Vec<String> = Vec::new();
    for (d, key) in batch.into_iter().zip(keys) {
        let deliveries = match (d.prior_deliveries, &key) {
            (Some(prior), _) => prior.saturating_add(1),
            (None, Some(k)) => counts
                .get(k)
                .copied()
                .unwrap_or(0)
                .saturating_add(uncounted_first(&d)),
            (None, None) => 1,
        };
        if deliveries <= max {
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
    if !over.is_empty() {
        // A replay of the dead letter starts with a clean count. Best
        // effort: a count left behind only shortens that replay's budget.
        if let Err(e) = ctx.store.forget_deliveries(&over).await {
            tracing::warn!(error = %e, "cannot clear the delivery counts of dead letters");
        }
    }
    kept
}

/// One more delivery of each key on record, asking until the store answers.
async fn count(ctx: &Context, keys: &[String]) -> HashMap<String, u32> {
    let cfg = &ctx.config.batch;
    let mut backoff = FullJitter::doubling(cfg.retry_initial_interval, cfg.retry_max_interval);
    loop {
        match ctx.store.count_deliveries(keys).await {
            Ok(found) => return found,
            Err(e) => {
                Health::set(&ctx.health.database_ok, false);
                let wait = backoff.next_wait();
                tracing::warn!(error = %e, messages = keys.len(), retry_in = ?wait,
                    "cannot count redeliveries; retrying before any work");
                tokio::time::sleep(wait).await;
            }
        }
    }
}
