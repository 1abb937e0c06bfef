//! Panics inside a stage's work on one order are contained: the worker's
//! future runs under `catch_unwind`, and the order's token — kept in a
//! [`TokenSlot`] the stage can still reach — goes to the dead-letter
//! destination as `internal_error` with the panic message, so that the
//! order neither blocks its queue or partition nor comes back to panic
//! again.
//!
//! The daemon's panic hook (`main`) aborts the process on any other panic;
//! it asks [`panic_is_contained`] first, which is true exactly while a
//! stage worker's future is being polled on this thread.

use std::any::Any;
use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use futures::FutureExt as _;

use bytes::Bytes;

use super::{Context, InFlight};
use crate::outcome::{DeadLetterReason, Stage};
use crate::source::{AckToken, DeadLetter, Position};

thread_local! {
    static CONTAINED: Cell<u32> = const { Cell::new(0) };
}

/// Whether a panic raised now on this thread will be caught by a stage and
/// turned into an `internal_error` dead letter.
pub fn panic_is_contained() -> bool {
    CONTAINED.with(|c| c.get() > 0)
}

/// Polls the inner future with [`panic_is_contained`] true.
struct Contained<F>(Pin<Box<F>>);

impl<F: Future> Future for Contained<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        struct Leave;
        impl Drop for Leave {
            fn drop(&mut self) {
                CONTAINED.with(|c| c.set(c.get().saturating_sub(1)));
            }
        }
        CONTAINED.with(|c| c.set(c.get() + 1));
        let _leave = Leave;
        self.get_mut().0.as_mut().poll(cx)
    }
}

/// Runs `fut`; `Err` with the panic's message if it panicked.
pub(super) async fn contain<F: Future<Output = ()>>(fut: F) -> Result<(), String> {
    AssertUnwindSafe(Contained(Box::pin(fut)))
        .catch_unwind()
        .await
        .map_err(|p| panic_message(p.as_ref()))
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// An order's token, shared between the order and the stage working on it:
/// whoever settles the order takes it; if the work panicked first, the
/// stage takes it to dead-letter the order.
#[derive(Clone, Debug)]
pub(crate) struct TokenSlot(Arc<Mutex<Option<AckToken>>>);

impl TokenSlot {
    pub(crate) fn new(token: AckToken) -> Self {
        Self(Arc::new(Mutex::new(Some(token))))
    }

    /// The token, unless it was taken already.
    pub(crate) fn take(&self) -> Option<AckToken> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl InFlight {
    /// What the stage keeps to dead-letter this order if its work panics.
    pub(super) fn salvage(&self) -> Salvage {
        Salvage {
            token: self.token.clone(),
            body: self.raw.clone(),
            key: self.key.clone(),
            position: self.position.clone(),
            order_id: self.order.order_id.clone(),
        }
    }
}

/// An order's dead letter in waiting, held by its stage while it works.
pub(super) struct Salvage {
    token: TokenSlot,
    body: Bytes,
    key: Option<Bytes>,
    position: Position,
    order_id: String,
}

impl Salvage {
    /// The work panicked: dead-letter the order as `internal_error`, unless
    /// it was settled before the panic.
    pub(super) fn dead_letter(self, ctx: &Context, stage: Stage, panic: String) {
        let Some(token) = self.token.take() else {
            return;
        };
        tracing::error!(order_id = %self.order_id, position = %self.position, %stage,
            panic = %panic, "a stage panicked on this order; dead-lettering it");
        ctx.dead_letter(DeadLetter {
            token,
            body: self.body,
            key: self.key,
            position: self.position,
            reason: DeadLetterReason::InternalError,
            detail: format!("the {stage} stage panicked: {panic}"),
            stage,
            order_id: Some(self.order_id),
            extra_headers: Vec::new(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::downstream::{PaymentClient, RuleEngineClient};
    use crate::pipeline::{stage, Context, InFlight};
    use crate::source::{Held, Position, Settlement, TokenKind};
    use crate::store::Store;
    use crate::telemetry::Metrics;
    use tokio::sync::{mpsc, Semaphore};

    /// A stage whose work panics on one order: that order is dead-lettered
    /// as `internal_error` with the panic message, the others settle, and
    /// the stage goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_order_is_dead_lettered_and_the_stage_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.database.url = format!("sqlite://{}", dir.path().join("c.db").display());
        config.pipeline.charge_concurrency = 2;
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let (settle, mut settled) = mpsc::unbounded_channel();
        let ctx = Arc::new(Context {
            rules: RuleEngineClient::new(
                &config.rule_engine,
                config.pipeline.validate_concurrency,
                metrics.clone(),
            )
            .expect("client"),
            payments: PaymentClient::new(
                &config.payment,
                config.pipeline.charge_concurrency,
                metrics.clone(),
            )
            .expect("client"),
            health: Default::default(),
            store: Store::connect(&config.database).await.expect("store"),
            settle,
            metrics: metrics.clone(),
            config,
        });
        let permits = Arc::new(Semaphore::new(8));
        let (tx, rx) = mpsc::channel(8);
        for (tag, id) in [(1u64, "ok-1"), (2, "boom"), (3, "ok-2")] {
            let body = format!(
                r#"{{"order_id":"{id}","customer_id":"c","currency":"EUR","amount_cents":5,
                   "items":[{{"sku":"A","qty":1,"unit_price_cents":5}}],
                   "created_at":"2026-11-22T10:00:00Z"}}"#
            );
            let d = crate::order::decode_canonical(body.as_bytes(), 65536).expect("an order");
            let token = AckToken {
                kind: TokenKind::Rabbit {
                    generation: 1,
                    delivery_tag: tag,
                },
                _permit: permits.clone().acquire_owned().await.expect("permit"),
                _held: Held::new(&metrics),
                span: tracing::Span::none(),
                screened: Default::default(),
            };
            let it = InFlight {
                order: d.order,
                payload: d.payload,
                digest: d.digest,
                raw: bytes::Bytes::from(body),
                key: None,
                position: Position::Rabbit {
                    queue: Arc::from("q"),
                    delivery_tag: tag,
                },
                received_at: std::time::Instant::now(),
                received_wall: chrono::Utc::now(),
                timestamp_ms: None,
                traceparent: None,
                span: tracing::Span::none(),
                token: TokenSlot::new(token),
            };
            tx.send(it).await.expect("queued");
        }
        drop(tx);
        let worker_ctx = ctx.clone();
        stage(
            ctx.clone(),
            Stage::Charge,
            ctx.payments.concurrency(),
            ctx.payments.breaker(),
            rx,
            move |it: InFlight| {
                let ctx = worker_ctx.clone();
                async move {
                    tokio::task::yield_now().await;
                    assert!(it.order.order_id != "boom", "boom: the work gave up");
                    ctx.done(it.token.take().into_iter().collect());
                }
            },
        )
        .await;
        drop(ctx);
        let (mut done, mut dead) = (0, Vec::new());
        while let Some(s) = settled.recv().await {
            match s {
                Settlement::Done(tokens) => done += tokens.len(),
                Settlement::DeadLetter(dl) => dead.push(dl),
            }
        }
        assert_eq!(done, 2);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].reason, DeadLetterReason::InternalError);
        assert_eq!(dead[0].stage, Stage::Charge);
        assert_eq!(dead[0].order_id.as_deref(), Some("boom"));
        assert!(
            dead[0].detail.contains("boom: the work gave up"),
            "{}",
            dead[0].detail
        );
    }

    #[tokio::test]
    async fn a_panic_is_caught_with_its_message_and_flagged_only_while_polled() {
        assert!(!panic_is_contained());
        let seen = contain(async {
            assert!(panic_is_contained());
        })
        .await;
        assert_eq!(seen, Ok(()));
        assert!(!panic_is_contained());
        let caught = contain(async {
            tokio::task::yield_now().await;
            panic!("boom {}", 7);
        })
        .await;
        assert_eq!(caught, Err("boom 7".to_string()));
        assert!(!panic_is_contained(), "the flag is reset on unwind");
    }
}
