//! The per-partition offset tracker: which position may be committed
//! (never past a gap), the epoch of each assignment (a completion after a
//! revoke is never committed), and the positions kept when a revoke commit
//! was refused. Pure bookkeeping, no client calls.

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
    /// The last position committed (or handed out to be committed).
    committed: Option<i64>,
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
                committed: None,
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

    /// Positions that moved since the last call, marked as committed.
    pub fn take_commits(&mut self) -> Vec<(TopicPartition, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.partitions {
            if let Some(pos) = p.position() {
                if p.committed.is_none_or(|c| pos > c) {
                    p.committed = Some(pos);
                    out.push((tp.clone(), pos));
                }
            }
        }
        out
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
                p.committed = None;
            }
        }
    }

    /// Stops tracking a partition released on close; returns its position
    /// only if it differs from the last one committed (or handed out to be
    /// committed and not reported failed).
    pub fn release(&mut self, tp: &TopicPartition) -> Option<i64> {
        let p = self.partitions.remove(tp)?;
        p.position().filter(|pos| p.committed != Some(*pos))
    }

    /// Every owned partition's position, moved or not, for the final
    /// synchronous commit.
    pub fn positions(&mut self) -> Vec<(TopicPartition, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.partitions {
            if let Some(pos) = p.position() {
                p.committed = Some(pos);
                out.push((tp.clone(), pos));
            }
        }
        out
    }

    /// Forgets what was committed, so the next [`take_commits`] sends every
    /// position again: an asynchronous commit failed and which one is
    /// not known.
    ///
    /// [`take_commits`]: OffsetTracker::take_commits
    pub fn forget_commits(&mut self) {
        for p in self.partitions.values_mut() {
            p.committed = None;
        }
    }

    pub fn owned(&self) -> Vec<TopicPartition> {
        self.partitions.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn tp(p: i32) -> TopicPartition {
        (Arc::from("orders"), p)
    }

    #[test]
    fn out_of_order_completions_never_commit_past_a_gap() {
        let mut t = OffsetTracker::new();
        let e = t.assign(tp(0));
        for o in 10..15 {
            assert_eq!(t.received(&tp(0), o), Some(e));
        }
        assert!(t.done(&tp(0), 12, e));
        assert!(t.done(&tp(0), 13, e));
        // 10 is still outstanding: the position stays at 10.
        assert_eq!(t.take_commits(), vec![(tp(0), 10)]);
        assert!(t.done(&tp(0), 10, e));
        // 11 still missing: position 11.
        assert_eq!(t.take_commits(), vec![(tp(0), 11)]);
        assert!(t.done(&tp(0), 11, e));
        // 14 outstanding: position 14 (12 and 13 were done).
        assert_eq!(t.take_commits(), vec![(tp(0), 14)]);
        assert!(t.take_commits().is_empty(), "nothing moved");
        assert!(t.done(&tp(0), 14, e));
        assert_eq!(t.take_commits(), vec![(tp(0), 15)]);
    }

    #[test]
    fn non_contiguous_offsets_are_handled() {
        let mut t = OffsetTracker::new();
        let e = t.assign(tp(1));
        for o in [3, 7, 8, 20] {
            t.received(&tp(1), o);
        }
        t.done(&tp(1), 7, e);
        t.done(&tp(1), 3, e);
        assert_eq!(t.take_commits(), vec![(tp(1), 8)]);
        t.done(&tp(1), 20, e);
        t.done(&tp(1), 8, e);
        assert_eq!(t.take_commits(), vec![(tp(1), 21)]);
    }

    #[test]
    fn revoke_returns_the_final_position_and_late_completions_are_ignored() {
        let mut t = OffsetTracker::new();
        let e = t.assign(tp(0));
        for o in 0..4 {
            t.received(&tp(0), o);
        }
        t.done(&tp(0), 0, e);
        t.done(&tp(0), 1, e);
        assert_eq!(t.outstanding(&tp(0)), 2);
        assert_eq!(t.revoke(&tp(0), e), Some(2));
        // Offset 2 finishes after the revoke: ignored, nothing to commit.
        assert!(!t.done(&tp(0), 2, e));
        assert!(t.take_commits().is_empty());
        // Assigned again (say the group gave it back): a new epoch, and the
        // old epoch's completions still count for nothing.
        let e2 = t.assign(tp(0));
        assert_ne!(e, e2);
        t.received(&tp(0), 2);
        assert!(!t.done(&tp(0), 2, e), "stale epoch");
        assert!(t.done(&tp(0), 2, e2));
        assert_eq!(t.take_commits(), vec![(tp(0), 3)]);
    }

    #[test]
    fn revoke_and_final_commits_resend_positions_already_sent() {
        let mut t = OffsetTracker::new();
        let e = t.assign(tp(0));
        t.received(&tp(0), 0);
        t.done(&tp(0), 0, e);
        assert_eq!(t.take_commits(), vec![(tp(0), 1)]);
        // The asynchronous commit may have been rejected: say it again.
        assert_eq!(t.positions(), vec![(tp(0), 1)]);
        t.forget_commits();
        assert_eq!(t.take_commits(), vec![(tp(0), 1)]);
        assert_eq!(t.revoke(&tp(0), e), Some(1));
        assert_eq!(t.revoke(&tp(0), e), None, "not owned any more");
        assert!(t.positions().is_empty());
    }

    #[test]
    fn release_on_close_returns_only_positions_not_committed() {
        let mut t = OffsetTracker::new();
        let e0 = t.assign(tp(0));
        let e1 = t.assign(tp(1));
        t.received(&tp(0), 0);
        t.received(&tp(1), 0);
        assert!(t.done(&tp(0), 0, e0));
        assert!(t.done(&tp(1), 0, e1));
        t.positions();
        t.received(&tp(1), 1);
        assert!(t.done(&tp(1), 1, e1));
        assert_eq!(t.release(&tp(0)), None, "committed already");
        assert_eq!(t.release(&tp(1)), Some(2), "moved since");
        assert!(t.owned().is_empty());
        let e2 = t.assign(tp(2));
        t.received(&tp(2), 0);
        assert!(t.done(&tp(2), 0, e2));
        t.positions();
        t.forget_commits();
        assert_eq!(t.release(&tp(2)), Some(1), "the final commit failed");
    }

    #[test]
    fn a_late_revoke_leaves_a_newer_assignment_alone() {
        let mut t = OffsetTracker::new();
        let e1 = t.assign(tp(0));
        t.received(&tp(0), 0);
        // Revoked, and assigned again before the revoke was served.
        let e2 = t.assign(tp(0));
        assert_eq!(t.revoke(&tp(0), e1), None);
        assert_eq!(t.owned(), vec![tp(0)]);
        t.received(&tp(0), 5);
        assert!(t.done(&tp(0), 5, e2));
        assert_eq!(t.revoke(&tp(0), e2), Some(6));
    }

    #[test]
    fn a_refused_revoke_commit_is_resumed_if_the_partition_comes_back() {
        let mut t = OffsetTracker::new();
        let e = t.assign(tp(0));
        t.assign(tp(1));
        for o in 0..10 {
            t.received(&tp(0), o);
            t.done(&tp(0), o, e);
        }
        let revoked = vec![(tp(0), t.revoke(&tp(0), e).expect("position"))];
        t.keep_unsettled(&revoked);
        t.keep_unsettled(&[(tp(2), 4)]);
        assert!(t.has_unsettled());
        // The next assignment gives partition 0 back, not partition 2.
        t.assign(tp(0));
        assert_eq!(t.take_unsettled(&[tp(0)]), vec![(tp(0), 10)]);
        assert!(!t.has_unsettled(), "partition 2 went elsewhere: forgotten");
        t.resume_from(&tp(0), 10);
        assert_eq!(t.take_commits(), vec![(tp(0), 10)]);
        // The group's committed offset was 7: 7, 8, 9 arrive again.
        let e2 = t.epoch(&tp(0)).expect("owned");
        for o in 7..12 {
            t.received(&tp(0), o);
        }
        assert!(t.take_commits().is_empty(), "never backwards");
        for o in 7..12 {
            t.done(&tp(0), o, e2);
        }
        assert_eq!(t.take_commits(), vec![(tp(0), 12)]);
    }

    #[test]
    fn received_since_assign_counts_per_assignment() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.received_since_assign(&tp(0)), 0, "not owned");
        let e = t.assign(tp(0));
        t.assign(tp(1));
        assert_eq!(t.received_since_assign(&tp(0)), 0);
        for o in 40..43 {
            t.received(&tp(0), o);
        }
        t.received(&tp(1), 7);
        assert_eq!(t.received_since_assign(&tp(0)), 3);
        assert_eq!(
            t.received_since_assign(&tp(1)),
            1,
            "partitions are independent"
        );
        // Completions and commits do not reset it: only a new assignment does.
        t.done(&tp(0), 40, e);
        t.take_commits();
        assert_eq!(t.received_since_assign(&tp(0)), 3);
        t.revoke(&tp(0), e);
        assert_eq!(t.received_since_assign(&tp(0)), 0, "revoked");
        t.assign(tp(0));
        t.received(&tp(0), 43);
        assert_eq!(t.received_since_assign(&tp(0)), 1, "counted afresh");
    }

    #[test]
    fn messages_of_unowned_partitions_are_refused() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.received(&tp(5), 0), None);
        assert!(!t.done(&tp(5), 0, 1));
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        let a = t.assign(tp(0));
        let b = t.assign(tp(1));
        t.received(&tp(0), 0);
        t.received(&tp(1), 0);
        t.received(&tp(1), 1);
        t.done(&tp(1), 1, b);
        t.done(&tp(0), 0, a);
        let mut commits = t.take_commits();
        commits.sort();
        assert_eq!(commits, vec![(tp(0), 1), (tp(1), 0)]);
    }
}
