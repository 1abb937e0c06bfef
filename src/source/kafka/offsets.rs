//! The per-partition offset tracker: which position may be committed
//! (never past a gap), which position the coordinator has confirmed (a
//! refused commit is sent again until it is confirmed), the epoch of each
//! assignment (a completion after a revoke is never committed), and the
//! positions kept when a revoke commit was refused. Pure bookkeeping, no
//! client calls.

use std::collections::BTreeSet;

/// A Kafka topic-partition.
pub type TopicPartition = (std::sync::Arc<str>, i32);

/// In-order offset commits per partition.
///
/// Messages of a partition are received in offset order but complete in any
/// order. The position to commit (one past the last message to skip on
/// restart) is the lowest offset still outstanding, or one past the highest
/// received when nothing is outstanding: never past a gap. Offsets need not
/// be contiguous (compaction, transaction markers), so nothing assumes
/// `offset + 1`.
///
/// Each assignment of a partition gets a new epoch; a completion carrying an
/// older epoch (it finished after its partition was revoked) is ignored, so
/// it can never move a commit of a partition this member no longer owns.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: std::collections::HashMap<TopicPartition, PartitionOffsets>,
    next_epoch: u64,
    /// Final positions of revoked partitions whose commit the coordinator
    /// refused, kept until the next assignment: if a partition comes back
    /// to this member, it can still commit what it did.
    unsettled: std::collections::HashMap<TopicPartition, i64>,
}

#[derive(Debug)]
struct PartitionOffsets {
    epoch: u64,
    outstanding: BTreeSet<i64>,
    /// One past the highest offset received.
    received_end: Option<i64>,
    /// The position handed out by the last commit attempt, until its
    /// answer comes (see [`OffsetTracker::confirm`]).
    sent: Option<i64>,
    /// The highest position the coordinator accepted for this assignment
    /// (or that the group was read back as having): whatever is behind the
    /// settled position is sent again by the next [`take_commits`].
    ///
    /// [`take_commits`]: OffsetTracker::take_commits
    confirmed: Option<i64>,
    /// Messages received since this assignment began.
    received_count: u64,
}

impl PartitionOffsets {
    fn position(&self) -> Option<i64> {
        match self.outstanding.first() {
            Some(lowest) => Some(*lowest),
            None => self.received_end,
        }
    }
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking a newly assigned partition; returns its epoch.
    pub fn assign(&mut self, tp: TopicPartition) -> u64 {
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        self.partitions.insert(
            tp,
            PartitionOffsets {
                epoch,
                outstanding: BTreeSet::new(),
                received_end: None,
                sent: None,
                confirmed: None,
                received_count: 0,
            },
        );
        epoch
    }

    /// The current epoch of an owned partition.
    pub fn epoch(&self, tp: &TopicPartition) -> Option<u64> {
        self.partitions.get(tp).map(|p| p.epoch)
    }

    /// Records a message handed to the pipeline. Returns the epoch its
    /// completion must carry, or `None` if the partition is not owned (the
    /// message must then not be processed).
    pub fn received(&mut self, tp: &TopicPartition, offset: i64) -> Option<u64> {
        let p = self.partitions.get_mut(tp)?;
        p.outstanding.insert(offset);
        p.received_end = Some(p.received_end.map_or(offset + 1, |e| e.max(offset + 1)));
        p.received_count += 1;
        Some(p.epoch)
    }

    /// How many messages of this partition were received since it was
    /// (last) assigned, the one just received included; 0 if not owned.
    ///
    /// The first ones after an assignment may have been processed already
    /// by the previous owner (it stored them but had not committed), so the
    /// source flags them as possibly redelivered.
    pub fn received_since_assign(&self, tp: &TopicPartition) -> u64 {
        self.partitions.get(tp).map_or(0, |p| p.received_count)
    }

    /// Records a finished message (stored or dead-lettered). Returns false
    /// when the completion is stale (revoked partition, older epoch).
    pub fn done(&mut self, tp: &TopicPartition, offset: i64, epoch: u64) -> bool {
        match self.partitions.get_mut(tp) {
            Some(p) if p.epoch == epoch => p.outstanding.remove(&offset),
            _ => false,
        }
    }

    /// Messages of this partition still in the pipeline.
    pub fn outstanding(&self, tp: &TopicPartition) -> usize {
        self.partitions.get(tp).map_or(0, |p| p.outstanding.len())
    }

    /// Positions the coordinator has not confirmed yet, marked as sent:
    /// those that moved since the last confirmed commit, and those whose
    /// commit was refused or never answered. Call it again only once the
    /// previous attempt's answer was given to [`confirm`] (or not: a
    /// refused attempt needs no call), so that one attempt is in flight at
    /// a time.
    ///
    /// [`confirm`]: OffsetTracker::confirm
    pub fn take_commits(&mut self) -> Vec<(TopicPartition, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.partitions {
            if let Some(pos) = p.position() {
                if p.confirmed.is_none_or(|c| pos > c) {
                    p.sent = Some(pos);
                    out.push((tp.clone(), pos));
                }
            }
        }
        out
    }

    /// The coordinator accepted a commit of `positions`. A partition that
    /// was revoked (and maybe assigned again) since they were sent is left
    /// alone: its new assignment has sent nothing of its own yet, and
    /// sending a position again costs only a request.
    pub fn confirm(&mut self, positions: &[(TopicPartition, i64)]) {
        for (tp, pos) in positions {
            if let Some(p) = self.partitions.get_mut(tp) {
                if p.sent == Some(*pos) {
                    p.confirmed = Some(p.confirmed.map_or(*pos, |c| c.max(*pos)));
                }
            }
        }
    }

    /// The group's committed offsets as read back from the broker (`None`:
    /// nothing committed). A partition whose confirmed position is ahead of
    /// what the group holds lost that commit somewhere (a partial refusal
    /// the client reported as success; a commit answered after the read
    /// only costs one more request): it is sent again.
    pub fn group_committed(&mut self, offsets: &[(TopicPartition, Option<i64>)]) {
        for (tp, group) in offsets {
            if let Some(p) = self.partitions.get_mut(tp) {
                if p.confirmed.is_some_and(|c| group.is_none_or(|g| g < c)) {
                    p.confirmed = *group;
                }
            }
        }
    }

    /// Stops tracking a revoked partition; returns its final position. Later
    /// completions for it are ignored.
    ///
    /// Only the assignment with this `epoch` is revoked: a revoke served
    /// late, after the partition was assigned again, leaves the new
    /// assignment alone. The position is returned even if it was committed
    /// before: an earlier asynchronous commit may have failed (a rebalance
    /// in progress rejects it), and the commit on revoke is the last chance
    /// to get it right.
    pub fn revoke(&mut self, tp: &TopicPartition, epoch: u64) -> Option<i64> {
        if self.partitions.get(tp)?.epoch != epoch {
            return None;
        }
        self.partitions.remove(tp)?.position()
    }

    /// Keeps the final positions of revoked partitions whose commit was
    /// refused (see [`take_unsettled`]).
    ///
    /// [`take_unsettled`]: OffsetTracker::take_unsettled
    pub fn keep_unsettled(&mut self, positions: &[(TopicPartition, i64)]) {
        for (tp, pos) in positions {
            self.unsettled.insert(tp.clone(), *pos);
        }
    }

    /// At an assignment: the unsettled positions of the partitions assigned,
    /// to resume from if the group has not committed further meanwhile. The
    /// others are forgotten: their new owners re-process from the last
    /// commit.
    pub fn take_unsettled(&mut self, assigned: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        let kept = std::mem::take(&mut self.unsettled);
        kept.into_iter()
            .filter(|(tp, _)| assigned.contains(tp))
            .collect()
    }

    /// Whether revoke commits were refused and no assignment came since.
    pub fn has_unsettled(&self) -> bool {
        !self.unsettled.is_empty()
    }

    /// Starts a freshly assigned partition at `position`: everything before
    /// it was done by this member under an earlier assignment, and the next
    /// commit says so. Messages before it that arrive again still count as
    /// outstanding until they are done.
    pub fn resume_from(&mut self, tp: &TopicPartition, position: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            if p.received_end.is_none() {
                p.received_end = Some(position);
                p.sent = None;
                p.confirmed = None;
            }
        }
    }

    /// Stops tracking a partition released on close; returns its position
    /// unless the coordinator confirmed that very position.
    pub fn release(&mut self, tp: &TopicPartition) -> Option<i64> {
        let p = self.partitions.remove(tp)?;
        p.position().filter(|pos| p.confirmed != Some(*pos))
    }

    /// Every owned partition's position, confirmed or not, marked as sent,
    /// for the final synchronous commit.
    pub fn positions(&mut self) -> Vec<(TopicPartition, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.partitions {
            if let Some(pos) = p.position() {
                p.sent = Some(pos);
                out.push((tp.clone(), pos));
            }
        }
        out
    }

    pub fn owned(&self) -> Vec<TopicPartition> {
        self.partitions.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests;
