//! Settlement: what the pipeline finished moves the offset tracker, dead
//! letters are produced and confirmed before their offset counts as done,
//! positions are committed every `kafka.commit_interval`, pending revokes
//! are answered once their partitions have nothing in flight (or at
//! `kafka.revoke_timeout`), and the final commit is retried through a
//! rebalance before the source closes.
//!
//! The periodic commit is synchronous, on the blocking pool, one attempt
//! in flight at a time, so that its answer is known: rdkafka 0.39 submits
//! an asynchronous commit without a reply queue, and librdkafka then
//! reports its result to no one (rust-rdkafka issue #856; it only logs
//! `COMMITFAIL`): `ConsumerContext::commit_callback` is never called for
//! it. A commit the coordinator refuses (a cooperative rebalance in
//! progress) would then be lost for a partition whose backlog is finished,
//! as nothing moves its position any more. The tracker keeps what was
//! confirmed, and the next tick sends whatever is behind the settled
//! position again.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaResult;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::dead_letter::produce_dead_letter;
use super::lag::refresh_lag;
use super::offsets::TopicPartition;
use super::rebalance::{finish_revoke, Revoke};
use super::{tpl_of, KafkaSource};
use crate::downstream::retry::FullJitter;
use crate::source::{AckToken, DeadLetter, Position, Settlement, TokenKind};
use crate::telemetry::{events, Destination};

/// Bounds of the jittered wait between refused final commits.
const FINAL_COMMIT_RETRY_INITIAL: Duration = Duration::from_millis(100);
const FINAL_COMMIT_RETRY_MAX: Duration = Duration::from_millis(1000);

/// Marks completions in the tracker, produces dead letters, commits
/// periodically, serves revokes, refreshes lag; commits synchronously last.
pub(super) async fn settle(
    src: &KafkaSource,
    mut settlements: mpsc::UnboundedReceiver<Settlement>,
    revokes: &mut mpsc::UnboundedReceiver<Revoke>,
) {
    let cfg = &src.cfg;
    let metrics = &src.metrics;
    let mut revokes_rx_closed = false;
    let mut publishing: JoinSet<(Box<DeadLetter>, Result<(), String>)> = JoinSet::new();
    let mut closed = false;
    let mut pending_revoke: Option<(Revoke, tokio::time::Instant)> = None;
    let mut commit_tick = tokio::time::interval(cfg.commit_interval);
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // At most one periodic commit in flight (see the module's doc).
    let mut committing: JoinSet<Attempt> = JoinSet::new();
    let mut lag_tick = tokio::time::interval(cfg.lag_interval);
    let mut lag_task: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        if closed && publishing.is_empty() && pending_revoke.is_none() {
            break;
        }
        let revoke_deadline = pending_revoke.as_ref().map(|(_, d)| *d);
        tokio::select! {
            s = settlements.recv(), if !closed => match s {
                Some(s) => {
                    accept(src, s, &mut publishing);
                    while let Ok(s) = settlements.try_recv() {
                        accept(src, s, &mut publishing);
                    }
                }
                None => closed = true,
            },
            Some(joined) = publishing.join_next(), if !publishing.is_empty() => match joined {
                Ok((dl, Ok(()))) => {
                    events::dead_lettered(metrics, &dl);
                    mark_done(src, vec![dl.token]);
                }
                Ok((dl, Err(e))) => tracing::error!(position = %dl.position, error = %e,
                    "dead-letter produce failed; the offset stays uncommitted"),
                Err(e) => tracing::error!(error = %e, "dead-letter task failed"),
            },
            r = revokes.recv(), if !revokes_rx_closed && pending_revoke.is_none() => match r {
                Some(r) => {
                    let deadline = tokio::time::Instant::now() + cfg.revoke_timeout;
                    pending_revoke = Some((r, deadline));
                }
                None => revokes_rx_closed = true,
            },
            _ = sleep_until_opt(revoke_deadline) => {
                tracing::warn!("revoke timeout: unfinished orders of revoked partitions go to their next owner");
                if let Some((r, _)) = pending_revoke.take() {
                    metrics.rebalance_event("revoke_timeout", r.partitions.len());
                    finish_revoke(src, r);
                }
            },
            _ = commit_tick.tick(), if committing.is_empty() => {
                if let Some(attempt) = start_commit(src) {
                    committing.spawn_blocking(attempt);
                }
            },
            Some(joined) = committing.join_next(), if !committing.is_empty() => match joined {
                Ok(answer) => commit_answered(src, answer),
                Err(e) => tracing::error!(error = %e, "offset commit task failed; resending with the next commit"),
            },
            _ = lag_tick.tick() => {
                if lag_task.as_ref().is_none_or(|t| t.is_finished()) {
                    lag_task = Some(refresh_lag(src));
                }
            },
        }
        if let Some((r, deadline)) = pending_revoke.take() {
            let busy = match src.tracker.lock() {
                Ok(t) => r
                    .partitions
                    .iter()
                    .filter(|(tp, e)| t.epoch(tp) == Some(*e))
                    .map(|(tp, _)| t.outstanding(tp))
                    .sum::<usize>(),
                Err(_) => 0,
            };
            if busy == 0 {
                finish_revoke(src, r);
            } else {
                pending_revoke = Some((r, deadline));
            }
        }
    }
    // The final commit goes after the periodic one still in flight, whose
    // answer it must not race.
    if let Some(Ok(answer)) = committing.join_next().await {
        commit_answered(src, answer);
    }
    final_commit(src, revokes).await;
    if let Some(t) = lag_task {
        let _ = t.await;
    }
}

/// The final, synchronous commit of everything done, moved or not (an
/// earlier asynchronous commit may have been rejected).
///
/// The group coordinator refuses commits while a rebalance is in progress
/// (another member just left or joined): retry with jittered backoff for up
/// to `kafka.revoke_timeout`, serving the revokes that rebalance brings
/// meanwhile (intake keeps polling, so this member takes part in it). A
/// revoke whose commit was refused leaves its positions unsettled: wait, as
/// long, for the rebalance to end, as it may give those partitions back to
/// commit them. If the commit still fails, the revoke that closing the
/// consumer triggers commits the same positions from the rebalance callback.
async fn final_commit(src: &KafkaSource, revokes: &mut mpsc::UnboundedReceiver<Revoke>) {
    let deadline = tokio::time::Instant::now() + src.cfg.revoke_timeout;
    let mut backoff = FullJitter::doubling(FINAL_COMMIT_RETRY_INITIAL, FINAL_COMMIT_RETRY_MAX);
    let mut revokes_open = true;
    let mut committed: Vec<(TopicPartition, i64)> = Vec::new();
    loop {
        // Again at every attempt: a rebalance may have taken partitions
        // away or given back one to resume.
        let (mut positions, unsettled) = match src.tracker.lock() {
            Ok(mut t) => (t.positions(), t.has_unsettled()),
            Err(_) => (Vec::new(), false),
        };
        positions.sort();
        let mut refused = None;
        if !positions.is_empty() && positions != committed {
            let consumer = src.consumer.clone();
            let attempt = tpl_of(&positions);
            let result =
                tokio::task::spawn_blocking(move || consumer.commit(&attempt, CommitMode::Sync))
                    .await;
            match result {
                Ok(Ok(())) => {
                    tracing::info!(?positions, "final offsets committed");
                    if let Ok(mut t) = src.tracker.lock() {
                        t.confirm(&positions);
                    }
                    committed = positions;
                }
                Ok(Err(e)) => refused = Some(e.to_string()),
                Err(e) => refused = Some(e.to_string()),
            }
        }
        if refused.is_none() && !unsettled {
            return;
        }
        let wait = backoff.next_wait();
        if tokio::time::Instant::now() + wait >= deadline {
            match refused {
                // Not confirmed: releasing the partitions commits them.
                Some(error) => {
                    tracing::error!(error = %error, "final commit failed; committing again when the partitions are released")
                }
                None => tracing::warn!(
                    "the rebalance did not give back the partitions whose revoke commit was refused; their next owner re-processes from the last commit"
                ),
            }
            return;
        }
        match &refused {
            Some(error) => {
                tracing::warn!(error = %error, retry_in = ?wait, "final commit refused; retrying")
            }
            None => tracing::debug!(
                retry_in = ?wait,
                "waiting for the rebalance to give back partitions to commit"
            ),
        }
        let retry_at = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(retry_at) => break,
                r = revokes.recv(), if revokes_open => match r {
                    // Nothing is in flight any more: answer at once.
                    Some(r) => finish_revoke(src, r),
                    None => revokes_open = false,
                },
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn mark_done(src: &KafkaSource, tokens: Vec<AckToken>) {
    let Ok(mut t) = src.tracker.lock() else {
        return;
    };
    // The order is done once its offset is marked: the next periodic (or
    // revoke, or final) commit covers it.
    let acks: Vec<tracing::Span> = tokens
        .iter()
        .map(
            |t| crate::telemetry::traces::order_step!(parent: &t.span, "ack", "messaging.operation.type" = "settle"),
        )
        .collect();
    let mut count = 0;
    // Per topic, for the drain estimate; a settlement rarely spans many.
    let mut by_topic: Vec<(&Arc<str>, u64)> = Vec::new();
    for token in &tokens {
        if let TokenKind::Kafka {
            topic,
            partition,
            offset,
            epoch,
        } = &token.kind
        {
            if t.done(&(topic.clone(), *partition), *offset, *epoch) {
                count += 1;
                match by_topic.iter_mut().find(|(t, _)| *t == topic) {
                    Some((_, n)) => *n += 1,
                    None => by_topic.push((topic, 1)),
                }
            }
        }
    }
    src.metrics.acked.inc_by(count);
    drop(t);
    drop(acks);
    for (topic, n) in by_topic {
        src.metrics
            .drain
            .acked(&Destination::Topic(topic.to_string()), n);
    }
    drop(tokens);
}

fn accept(
    src: &KafkaSource,
    s: Settlement,
    publishing: &mut JoinSet<(Box<DeadLetter>, Result<(), String>)>,
) {
    match s {
        Settlement::Done(tokens) => mark_done(src, tokens),
        Settlement::DeadLetter(dl) => {
            let producer = src.producer.clone();
            let topic = match &dl.position {
                Position::Kafka { topic, .. } => src.cfg.dead_letter_topic(topic),
                Position::Rabbit { queue, .. } => src.cfg.dead_letter_topic(queue),
            };
            publishing.spawn(async move {
                let result = produce_dead_letter(&producer, &topic, &dl).await;
                (dl, result)
            });
        }
    }
}

/// A periodic commit's positions and the coordinator's answer.
type Attempt = (Vec<(TopicPartition, i64)>, KafkaResult<()>);

/// The positions not confirmed yet, as a synchronous commit to run on the
/// blocking pool; `None` when everything is confirmed.
fn start_commit(src: &KafkaSource) -> Option<impl FnOnce() -> Attempt + Send + 'static> {
    let positions = src.tracker.lock().ok()?.take_commits();
    if positions.is_empty() {
        return None;
    }
    let consumer = src.consumer.clone();
    Some(move || {
        let result = consumer.commit(&tpl_of(&positions), CommitMode::Sync);
        (positions, result)
    })
}

fn commit_answered(src: &KafkaSource, (positions, result): Attempt) {
    match result {
        Ok(()) => {
            if let Ok(mut t) = src.tracker.lock() {
                t.confirm(&positions);
            }
        }
        // A rebalance in progress, a coordinator moving: nothing is
        // confirmed, so the next tick sends the positions again.
        Err(e) => events::kafka_commit_refused(&src.metrics, &e.to_string(), positions.len()),
    }
}
