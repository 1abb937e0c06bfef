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
mod decode;
mod stage;

pub(crate) use attempts::Screened;
pub use contain::panic_is_contained;
use contain::TokenSlot;
use decode::decode_loop;
use stage::stage;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::config::Config;
use crate::downstream::{ChargeStatus, PaymentClient, RetryError, RuleEngineClient};
use crate::order::{Digest, Order};
use crate::outcome::{DeadLetterReason, Stage};
use crate::source::{AckToken, DeadLetter, Delivery, Position, Settlement};
use crate::store::{Record, Status, Store};
use crate::telemetry::{traces, Health, Metrics};

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
    /// Asks the store until it answers, readiness false and a jittered
    /// back-off between tries: for what must not go on before the store has
    /// answered (no charge before the order is known not to be stored, no
    /// work on a redelivery before it is counted). `failed` is the warning
    /// each refusal logs, `items` how many orders or messages wait on it.
    pub(crate) async fn ask_store<T, F, Fut>(&self, failed: &str, items: usize, mut ask: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::store::StoreError>>,
    {
        let cfg = &self.config.batch;
        let mut backoff = crate::downstream::retry::FullJitter::doubling(
            cfg.retry_initial_interval,
            cfg.retry_max_interval,
        );
        loop {
            match ask().await {
                Ok(answer) => return answer,
                Err(e) => {
                    Health::set(&self.health.database_ok, false);
                    let wait = backoff.next_wait();
                    tracing::warn!(error = %e, items, retry_in = ?wait, "{failed}");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

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
