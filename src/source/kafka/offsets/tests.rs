use super::*;
use std::sync::Arc;

fn tp(p: i32) -> TopicPartition {
    (Arc::from("orders"), p)
}

/// Takes the commits and has the coordinator accept them.
fn commit_ok(t: &mut OffsetTracker) -> Vec<(TopicPartition, i64)> {
    let mut c = t.take_commits();
    t.confirm(&c);
    c.sort();
    c
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
    assert_eq!(commit_ok(&mut t), vec![(tp(0), 10)]);
    assert!(t.done(&tp(0), 10, e));
    // 11 still missing: position 11.
    assert_eq!(commit_ok(&mut t), vec![(tp(0), 11)]);
    assert!(t.done(&tp(0), 11, e));
    // 14 outstanding: position 14 (12 and 13 were done).
    assert_eq!(commit_ok(&mut t), vec![(tp(0), 14)]);
    assert!(t.take_commits().is_empty(), "nothing moved");
    assert!(t.done(&tp(0), 14, e));
    assert_eq!(commit_ok(&mut t), vec![(tp(0), 15)]);
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
    assert_eq!(commit_ok(&mut t), vec![(tp(1), 8)]);
    t.done(&tp(1), 20, e);
    t.done(&tp(1), 8, e);
    assert_eq!(commit_ok(&mut t), vec![(tp(1), 21)]);
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
    assert_eq!(commit_ok(&mut t), vec![(tp(0), 3)]);
}

#[test]
fn revoke_and_final_commits_resend_positions_already_confirmed() {
    let mut t = OffsetTracker::new();
    let e = t.assign(tp(0));
    t.received(&tp(0), 0);
    t.done(&tp(0), 0, e);
    assert_eq!(commit_ok(&mut t), vec![(tp(0), 1)]);
    assert!(t.take_commits().is_empty(), "confirmed");
    // The final commit and the revoke say every position again.
    assert_eq!(t.positions(), vec![(tp(0), 1)]);
    assert_eq!(t.revoke(&tp(0), e), Some(1));
    assert_eq!(t.revoke(&tp(0), e), None, "not owned any more");
    assert!(t.positions().is_empty());
}

#[test]
fn a_refused_commit_is_sent_again_until_confirmed() {
    let mut t = OffsetTracker::new();
    let e0 = t.assign(tp(0));
    let e1 = t.assign(tp(1));
    for o in 0..3 {
        t.received(&tp(0), o);
        t.done(&tp(0), o, e0);
    }
    t.received(&tp(1), 0);
    t.done(&tp(1), 0, e1);
    let mut sent = t.take_commits();
    sent.sort();
    assert_eq!(sent, vec![(tp(0), 3), (tp(1), 1)]);
    // Refused (a rebalance in progress): nothing is confirmed, and the
    // backlog being finished, nothing moves any more.
    let mut again = t.take_commits();
    again.sort();
    assert_eq!(again, sent, "resent as long as it is not confirmed");
    t.confirm(&again);
    assert!(t.take_commits().is_empty(), "confirmed: nothing to send");
    // Refused again after moving on: the newest position is what is resent.
    t.received(&tp(0), 3);
    t.done(&tp(0), 3, e0);
    assert_eq!(t.take_commits(), vec![(tp(0), 4)]);
    t.received(&tp(0), 4);
    t.done(&tp(0), 4, e0);
    assert_eq!(t.take_commits(), vec![(tp(0), 5)]);
    // A late answer for a position no longer the one sent confirms nothing.
    t.confirm(&[(tp(0), 4)]);
    assert_eq!(t.take_commits(), vec![(tp(0), 5)]);
    t.confirm(&[(tp(0), 5)]);
    assert!(t.take_commits().is_empty());
}

#[test]
fn a_confirmation_for_an_earlier_assignment_confirms_nothing() {
    let mut t = OffsetTracker::new();
    let e = t.assign(tp(0));
    t.received(&tp(0), 0);
    t.done(&tp(0), 0, e);
    let sent = t.take_commits();
    // Revoked and assigned again while the commit was in flight.
    t.revoke(&tp(0), e);
    let e2 = t.assign(tp(0));
    t.confirm(&sent);
    t.received(&tp(0), 0);
    t.done(&tp(0), 0, e2);
    assert_eq!(
        t.take_commits(),
        vec![(tp(0), 1)],
        "the new assignment commits"
    );
}

#[test]
fn a_commit_the_group_does_not_hold_is_sent_again() {
    let mut t = OffsetTracker::new();
    let e0 = t.assign(tp(0));
    let e1 = t.assign(tp(1));
    let e2 = t.assign(tp(2));
    for (p, e) in [(0, e0), (1, e1), (2, e2)] {
        t.received(&tp(p), 0);
        t.done(&tp(p), 0, e);
    }
    commit_ok(&mut t);
    // Read back: partition 0 holds it, partition 1 kept an older offset,
    // partition 2 nothing at all (a partial refusal reported as success).
    t.group_committed(&[(tp(0), Some(1)), (tp(1), Some(0)), (tp(2), None)]);
    let mut again = t.take_commits();
    again.sort();
    assert_eq!(again, vec![(tp(1), 1), (tp(2), 1)]);
    t.confirm(&again);
    // The group ahead of this member (read before a commit that raced it
    // landed, or another member's) is no reason to resend.
    t.group_committed(&[(tp(0), Some(5))]);
    assert!(t.take_commits().is_empty());
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
    let sent = t.positions();
    t.confirm(&sent);
    t.received(&tp(1), 1);
    assert!(t.done(&tp(1), 1, e1));
    assert_eq!(t.release(&tp(0)), None, "committed already");
    assert_eq!(t.release(&tp(1)), Some(2), "moved since");
    assert!(t.owned().is_empty());
    let e2 = t.assign(tp(2));
    t.received(&tp(2), 0);
    assert!(t.done(&tp(2), 0, e2));
    t.positions();
    assert_eq!(
        t.release(&tp(2)),
        Some(1),
        "the final commit failed: not confirmed"
    );
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
    assert_eq!(commit_ok(&mut t), vec![(tp(0), 10)]);
    // The group's committed offset was 7: 7, 8, 9 arrive again.
    let e2 = t.epoch(&tp(0)).expect("owned");
    for o in 7..12 {
        t.received(&tp(0), o);
    }
    assert!(t.take_commits().is_empty(), "never backwards");
    for o in 7..12 {
        t.done(&tp(0), o, e2);
    }
    assert_eq!(commit_ok(&mut t), vec![(tp(0), 12)]);
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
