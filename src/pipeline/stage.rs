//! The worker pool each downstream stage runs on.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{contain, Context, InFlight};
use crate::downstream::concurrency::ConcurrencyLimit;
use crate::downstream::CircuitBreaker;
use crate::outcome::Stage;

/// A bounded worker pool: at most the downstream's concurrency limit of
/// items are worked on at once (the pool follows the limit as it moves; see
/// `downstream::concurrency`), and no item is taken from `input` until a worker is free and the
/// downstream's circuit lets calls through, so a slow or failing stage
/// pushes back on the one before it.
pub(super) async fn stage<F, Fut>(
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
        slot.busy();
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
