//! librdkafka's side of a rebalance, run inside `recv()` on the intake
//! task: an assignment registers the partitions with the offset tracker
//! (and resumes any whose revoke commit was refused); a revoke is a barrier
//! — the partitions go to the settlement loop with a reply channel and the
//! callback waits for their final positions, then commits them
//! synchronously before librdkafka releases the partitions.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc;

use super::consumable::Consumable;
use super::offsets::{OffsetTracker, TopicPartition};
use super::{partitions_of, tpl_of, KafkaSource};
use crate::telemetry::Metrics;

/// A revoke waiting for the settlement loop: the partitions with the epoch
/// of the assignment being revoked.
pub(super) struct Revoke {
    pub(super) partitions: Vec<(TopicPartition, u64)>,
    pub(super) reply: std::sync::mpsc::SyncSender<Vec<(TopicPartition, i64)>>,
}

/// librdkafka's callbacks land here.
pub struct KafkaContext {
    pub(super) tracker: Arc<Mutex<OffsetTracker>>,
    pub(super) revokes: mpsc::UnboundedSender<Revoke>,
    pub(super) revoke_timeout: Duration,
    /// Told of global client errors (a refused login makes `/readyz` say so).
    pub(super) consumable: Arc<Consumable>,
    pub(super) metrics: Arc<Metrics>,
}

impl KafkaContext {
    /// A revoke after the settlement loop has ended (the consumer is
    /// closing): what is done is final, so commit what was not committed
    /// yet here, inside the rebalance, where the coordinator accepts it even
    /// if the final commit was refused.
    fn release(&self, consumer: &BaseConsumer<Self>, parts: &[TopicPartition]) {
        let positions: Vec<_> = match self.tracker.lock() {
            Ok(mut t) => parts
                .iter()
                .filter_map(|tp| t.release(tp).map(|pos| (tp.clone(), pos)))
                .collect(),
            Err(_) => Vec::new(),
        };
        if positions.is_empty() {
            return;
        }
        match consumer.commit(&tpl_of(&positions), CommitMode::Sync) {
            Ok(()) => tracing::info!(?positions, "committed released partitions"),
            Err(e) => tracing::error!(error = %e, ?positions,
                "commit on close failed; the next owner re-processes from the last commit"),
        }
    }

    /// Resumes newly assigned partitions from the positions this member
    /// could not commit when they were revoked, unless the group committed
    /// further meanwhile (another member owned them in between).
    fn resume_unsettled(&self, consumer: &BaseConsumer<Self>, assigned: &[TopicPartition]) {
        let unsettled = match self.tracker.lock() {
            Ok(mut t) => t.take_unsettled(assigned),
            Err(_) => return,
        };
        if unsettled.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), _) in &unsettled {
            tpl.add_partition(topic, *partition);
        }
        let committed = match consumer.committed_offsets(tpl, self.revoke_timeout) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, ?unsettled,
                    "cannot read the group's offsets; re-processing from the last commit");
                return;
            }
        };
        let Ok(mut t) = self.tracker.lock() else {
            return;
        };
        for (tp, pos) in unsettled {
            let group = committed
                .find_partition(&tp.0, tp.1)
                .and_then(|e| e.offset().to_raw());
            if group.is_none_or(|c| c < pos) {
                t.resume_from(&tp, pos);
                self.metrics.rebalance_event("resumed", 1);
                tracing::info!(partition = ?tp, position = pos, group_offset = ?group,
                    "resuming from the position whose commit was refused at the last revoke");
            }
        }
    }
}

impl ClientContext for KafkaContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // As rdkafka's default, plus readiness.
        tracing::error!("librdkafka: {error}: {reason}");
        self.consumable.client_error(&error, reason);
    }
}

// No `commit_callback`: every commit is synchronous and answered to its
// caller (an asynchronous one would be answered to no one, see `settle`).
impl ConsumerContext for KafkaContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // Before librdkafka assigns: the tracker must know a
                // partition before its first message can arrive.
                let parts = partitions_of(tpl);
                if let Ok(mut t) = self.tracker.lock() {
                    for tp in &parts {
                        t.assign(tp.clone());
                    }
                }
                tracing::info!(partitions = ?parts, "partitions assigned");
                self.metrics.rebalance_event("assigned", parts.len());
                self.resume_unsettled(consumer, &parts);
            }
            Rebalance::Revoke(tpl) => {
                let parts = partitions_of(tpl);
                tracing::info!(partitions = ?parts, "partitions revoked; finishing their in-flight orders");
                self.metrics.rebalance_event("revoked", parts.len());
                let owned: Vec<(TopicPartition, u64)> = match self.tracker.lock() {
                    Ok(t) => parts
                        .iter()
                        .filter_map(|tp| t.epoch(tp).map(|e| (tp.clone(), e)))
                        .collect(),
                    Err(_) => Vec::new(),
                };
                let (reply, answer) = std::sync::mpsc::sync_channel(1);
                if self
                    .revokes
                    .send(Revoke {
                        partitions: owned,
                        reply,
                    })
                    .is_err()
                {
                    self.release(consumer, &parts);
                    return;
                }
                let wait = self.revoke_timeout + Duration::from_secs(1);
                let receive = || answer.recv_timeout(wait);
                // Let the runtime move other tasks (the settlement loop
                // among them) off this worker while it blocks.
                let positions =
                    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                            tokio::task::block_in_place(receive)
                        }
                        _ => receive(),
                    };
                match positions {
                    Ok(positions) if !positions.is_empty() => {
                        match consumer.commit(&tpl_of(&positions), CommitMode::Sync) {
                            Ok(()) => tracing::info!(?positions, "committed revoked partitions"),
                            Err(e) => {
                                tracing::warn!(error = %e, ?positions,
                                    "commit on revoke refused; kept in case the partitions come back, else their next owner re-processes from the last commit");
                                self.metrics
                                    .rebalance_event("revoke_commit_refused", positions.len());
                                if let Ok(mut t) = self.tracker.lock() {
                                    t.keep_unsettled(&positions);
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    // The settlement loop ended before serving it.
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        self.release(consumer, &parts)
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        tracing::error!("revoke barrier timed out")
                    }
                }
            }
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance error"),
        }
    }
}

pub(super) fn finish_revoke(src: &KafkaSource, r: Revoke) {
    let positions = match src.tracker.lock() {
        Ok(mut t) => r
            .partitions
            .iter()
            .filter_map(|(tp, e)| t.revoke(tp, *e).map(|pos| (tp.clone(), pos)))
            .collect(),
        Err(_) => Vec::new(),
    };
    for ((topic, partition), _) in &r.partitions {
        let _ = src
            .metrics
            .kafka_lag
            .remove_label_values(&[topic.as_ref(), partition.to_string().as_str()]);
    }
    // The callback may have given up waiting; nothing to do then.
    let _ = r.reply.send(positions);
}
