//! The stages between a delivery and its settlement:
//!
//! ```text
//! deliveries ─▶ decode ─▶ validate (pool) ─▶ charge (pool) ─▶ batcher ─▶ writers (pool) ─▶ settlements
//! ```
//!
//! Each stage has its own concurrency limit and the stages are joined by
//! small bounded channels, so a slow stage fills its input, then the one
//! before it, until the prefetch permits run out and the source stops.
//!
//! A downstream outage uses the same chain. While the circuit breaker of a
//! stage's downstream is open, the stage takes no new order, and the orders
//! it holds wait for the circuit instead of spending their retry budget
//! (see `downstream::retry` for the exact rule). Its input fills, the stages
//! before it stop, the permits run out and intake pauses, holding at most
//! `source.prefetch` messages, none of them dead-lettered, until a half-open
//! probe succeeds and the circuit closes. A circuit that has not closed for
//! `breaker.not_ready_after` also makes `/readyz` false.
//!
//! Shutdown needs no signal here: when the source drops its sender, each
//! stage finishes what it holds and drops its own output, and the close
//! travels down to the writers; the last settlement sender goes with them.

mod attempts;
mod batch;
mod contain;

pub use contain::panic_is_contained;
use contain::TokenSlot;

use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::config::Config;
use crate::downstream::concurrency::ConcurrencyLimit;
use crate::downstream::retry::FullJitter;
use crate::downstream::{
    ChargeStatus, CircuitBreaker, PaymentClient, RetryError, RuleEngineClient,
};
use crate::order::{self, Decoded, Digest, Order};
use crate::outcome::{DeadLetterReason, Outcome, Stage};
use crate::source::{AckToken, DeadLetter, Delivery, Position, Settlement};
use crate::store::{Record, Status, Store, StoredDigests};
use crate::telemetry::{events, traces, Health, Metrics};

/// Everything the stages share.
pub struct Context {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub rules: RuleEngineClient,
    pub payments: PaymentClient,
    pub store: Store,
    pub settle: mpsc::UnboundedSender<Settlement>,
}

/// An order between decode and the batcher.
struct InFlight {
    order: Order,
    /// Canonical JSON: what the store holds.
    payload: Bytes,
    digest: Digest,
    /// The message body as received: what the rule engine and a dead letter get.
    raw: Bytes,
    key: Option<Bytes>,
    position: Position,
    received_at: Instant,
    received_wall: DateTime<Utc>,
    timestamp_ms: Option<i64>,
    /// W3C trace context from the message, forwarded to both downstreams.
    traceparent: Option<String>,
    /// The order's `process` span (its token holds it too, until settled).
    span: tracing::Span,
    /// Taken by whoever settles the order, or by its stage if the work on
    /// it panicked (see `contain`).
    token: TokenSlot,
}

/// An order whose outcome is known and waits for its batch to commit.
pub(crate) struct Finished {
    pub record: Record,
    pub token: AckToken,
    pub raw: Bytes,
    pub key: Option<Bytes>,
    pub position: Position,
    /// Where end-to-end latency starts.
    pub origin: Origin,
    /// `batch wait`, from the outcome to the cut of its batch.
    pub waiting: tracing::Span,
}

pub(crate) enum Origin {
    /// Producer/broker timestamp, Unix milliseconds.
    Timestamp(i64),
    Received(Instant),
}

impl Origin {
    pub fn elapsed_secs(&self) -> f64 {
        match self {
            Origin::Received(at) => at.elapsed().as_secs_f64(),
            Origin::Timestamp(ms) => {
                let now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(*ms);
                (now_ms - ms).max(0) as f64 / 1000.0
            }
        }
    }
}

impl InFlight {
    /// `None` only if the token was taken already (never, outside a panic).
    fn finish(
        self,
        status: Status,
        charge_id: Option<String>,
        reasons: Vec<String>,
    ) -> Option<Finished> {
        let Self {
            order,
            payload,
            digest,
            raw,
            key,
            position,
            received_at,
            received_wall,
            timestamp_ms,
            traceparent: _,
            span: _,
            token,
        } = self;
        let token = token.take()?;
        Some(Finished {
            record: Record {
                order_id: order.order_id,
                status,
                customer_id: order.customer_id,
                amount_cents: order.amount_cents,
                currency: order.currency,
                charge_id,
                reasons,
                payload,
                payload_digest: digest.to_hex(),
                source_position: position.to_string(),
                received_at: received_wall,
            },
            waiting: traces::order_step!(parent: &token.span, "batch wait"),
            token,
            raw,
            key,
            position,
            origin: match timestamp_ms {
                Some(ms) => Origin::Timestamp(ms),
                None => Origin::Received(received_at),
            },
        })
    }
}

impl Context {
    pub(crate) fn dead_letter(&self, dl: DeadLetter) {
        if self
            .settle
            .send(Settlement::DeadLetter(Box::new(dl)))
            .is_err()
        {
            tracing::error!("settlement channel closed; the delivery stays unacknowledged");
        }
    }

    pub(crate) fn done(&self, tokens: Vec<AckToken>) {
        if self.settle.send(Settlement::Done(tokens)).is_err() {
            tracing::error!("settlement channel closed; deliveries stay unacknowledged");
        }
    }

    fn give_up(&self, it: InFlight, stage: Stage, err: RetryError) {
        let Some(token) = it.token.take() else {
            return;
        };
        let reason = match &err {
            RetryError::Exhausted { .. } => DeadLetterReason::RetriesExhausted,
            RetryError::Permanent(_) => DeadLetterReason::DownstreamRefused,
        };
        self.dead_letter(DeadLetter {
            token,
            body: it.raw,
            key: it.key,
            position: it.position,
            reason,
            detail: err.to_string(),
            stage,
            order_id: Some(it.order.order_id),
            extra_headers: Vec::new(),
        });
    }
}

/// The dead letter for a message whose `order_id` is stored with another
/// payload digest: another order reusing the id, not a redelivery.
/// `digests` are this message's and the stored row's.
pub(crate) fn conflicting_duplicate(
    (token, body, key, position): (AckToken, Bytes, Option<Bytes>, Position),
    order_id: String,
    (digest, stored): (&str, &str),
    stage: Stage,
) -> DeadLetter {
    DeadLetter {
        token,
        body,
        key,
        position,
        reason: DeadLetterReason::ConflictingDuplicate,
        detail: format!(
            "order_id {order_id:?} is already stored with other contents \
             (stored payload digest {stored}, this message's {digest})"
        ),
        stage,
        order_id: Some(order_id),
        extra_headers: vec![
            ("x-conveyor-payload-digest", digest.to_string()),
            ("x-conveyor-stored-digest", stored.to_string()),
        ],
    }
}

/// Runs every stage until `deliveries` is closed and all that was in it is
/// settled.
pub async fn run(ctx: Arc<Context>, deliveries: mpsc::Receiver<Delivery>) {
    let cap = ctx.config.pipeline.channel_capacity;
    let (validate_tx, validate_rx) = mpsc::channel::<InFlight>(cap);
    let (charge_tx, charge_rx) = mpsc::channel::<InFlight>(cap);
    let (finished_tx, finished_rx) = mpsc::channel::<Finished>(cap);
    let (batch_tx, batch_rx) = mpsc::channel::<Vec<Finished>>(ctx.config.batch.writers);

    let decode = decode_loop(ctx.clone(), deliveries, validate_tx);

    let validate = {
        let ctx2 = ctx.clone();
        let finished_tx = finished_tx.clone();
        stage(
            ctx.clone(),
            Stage::Validate,
            ctx.rules.concurrency(),
            ctx.rules.breaker(),
            validate_rx,
            move |it: InFlight| {
                let ctx = ctx2.clone();
                let charge_tx = charge_tx.clone();
                let finished_tx = finished_tx.clone();
                let span = traces::order_step!(parent: &it.span, "validate");
                async move {
                    let verdict = ctx
                        .rules
                        .validate(
                            &it.order.order_id,
                            it.raw.clone(),
                            it.traceparent.as_deref(),
                        )
                        .await;
                    match verdict {
                        Ok(v) if v.valid => {
                            // A send fails only if the next stage is gone;
                            // the delivery then stays unacked and comes back.
                            let _ = charge_tx.send(it).await;
                        }
                        Ok(v) => {
                            if let Some(f) = it.finish(Status::Rejected, None, v.reasons) {
                                let _ = finished_tx.send(f).await;
                            }
                        }
                        Err(e) => ctx.give_up(it, Stage::Validate, e),
                    }
                }
                .instrument(span)
            },
        )
    };

    let charge = {
        let ctx2 = ctx.clone();
        stage(
            ctx.clone(),
            Stage::Charge,
            ctx.payments.concurrency(),
            ctx.payments.breaker(),
            charge_rx,
            move |it: InFlight| {
                let ctx = ctx2.clone();
                let finished_tx = finished_tx.clone();
                let span = traces::order_step!(parent: &it.span, "charge");
                async move {
                    let charge = ctx
                        .payments
                        .charge(&it.order, it.traceparent.as_deref())
                        .await;
                    match charge {
                        Ok(c) => {
                            let (status, reasons) = match c.status {
                                ChargeStatus::Succeeded => (Status::Accepted, Vec::new()),
                                ChargeStatus::Declined => (
                                    Status::Declined,
                                    vec![c.reason.unwrap_or_else(|| "declined".into())],
                                ),
                            };
                            if let Some(f) = it.finish(status, Some(c.charge_id), reasons) {
                                let _ = finished_tx.send(f).await;
                            }
                        }
                        Err(e) => ctx.give_up(it, Stage::Charge, e),
                    }
                }
                .instrument(span)
            },
        )
    };

    let batcher = batch::batcher(ctx.clone(), finished_rx, batch_tx);
    let writers = batch::writers(ctx.clone(), batch_rx);
    tokio::join!(decode, validate, charge, batcher, writers);
}

/// Most deliveries decoded in one go.
const DECODE_BATCH: usize = 128;

/// Most orders looked up in one store query.
const LOOKUP_BATCH: usize = 256;

/// Decodes each delivery; poison goes to the dead-letter destination, the
/// rest on to [`screen_loop`]. First of all, a delivery over
/// `source.max_deliveries` is dead-lettered (see `attempts`). Decoding goes on while the screen waits for
/// the store.
async fn decode_loop(
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
    // Counted redeliveries found already stored: done, so their counts go.
    let mut settled_counted: Vec<String> = Vec::new();
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
                    settled_counted.extend(attempts::counted_key(&d));
                    ctx.done(vec![d.token]);
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
        attempts::forget(&ctx, std::mem::take(&mut settled_counted)).await;
    }
}

/// The stored digests of `ids`, asking until the store answers: an order
/// is charged only once it is known not to be stored already, so while the
/// database is unreachable intake waits (readiness false) rather than
/// moving money it may not be able to record.
async fn lookup(ctx: &Context, ids: &[String]) -> StoredDigests {
    let cfg = &ctx.config.batch;
    let mut backoff = FullJitter::doubling(cfg.retry_initial_interval, cfg.retry_max_interval);
    loop {
        match ctx.store.stored(ids).await {
            Ok(found) => return found,
            Err(e) => {
                Health::set(&ctx.health.database_ok, false);
                let wait = backoff.next_wait();
                tracing::warn!(error = %e, orders = ids.len(), retry_in = ?wait,
                    "cannot look up stored orders; retrying before any charge");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// A bounded worker pool: at most the downstream's concurrency limit of
/// items are worked on at once (the pool follows the limit as it moves; see
/// `downstream::concurrency`), and no item is taken from `input` until a worker is free and the
/// downstream's circuit lets calls through, so a slow or failing stage
/// pushes back on the one before it.
async fn stage<F, Fut>(
    ctx: Arc<Context>,
    name: Stage,
    limit: Arc<ConcurrencyLimit>,
    breaker: Arc<CircuitBreaker>,
    mut input: mpsc::Receiver<InFlight>,
    work: F,
) where
    F: Fn(InFlight) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Owned by the stage: when the stage is dropped (the run aborted at
    // the drain deadline) its workers go with it.
    let mut tasks = JoinSet::new();
    let in_flight = ctx
        .metrics
        .stage_in_flight
        .with_label_values(&[name.as_str()]);
    let duration = ctx
        .metrics
        .stage_duration
        .with_label_values(&[name.as_str()]);
    // The stage is what an outage stops, so it is also what reports one.
    ctx.health.watch(breaker.clone());
    loop {
        let Some(mut slot) = limit.acquire().await else {
            break;
        };
        // While the circuit is open an item taken now could only wait, and
        // taking it would make room for one more upstream: leaving it in the
        // channel is what lets the backpressure reach the broker. (On drain
        // this can delay noticing the closed input by up to `open_for`.)
        breaker.admitting().await;
        let Some(item) = input.recv().await else {
            break;
        };
        slot.busy(&limit);
        // Reap the finished ones, or the set would keep every result.
        while tasks.try_join_next().is_some() {}
        let salvage = item.salvage();
        let fut = work(item);
        let in_flight = in_flight.clone();
        let duration = duration.clone();
        let ctx = ctx.clone();
        in_flight.inc();
        tasks.spawn(async move {
            let started = Instant::now();
            if let Err(panic) = contain::contain(fut).await {
                salvage.dead_letter(&ctx, name, panic);
            }
            duration.observe(started.elapsed().as_secs_f64());
            in_flight.dec();
            drop(slot);
        });
    }
    while tasks.join_next().await.is_some() {}
}
