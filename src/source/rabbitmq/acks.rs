//! AMQP ack runs: which `basic.ack`s settlement sends, pure bookkeeping.
//!
//! [`AmqpAckRuns`] turns "these delivery tags are done" into the fewest
//! `basic.ack` frames that never acknowledge a tag that is not done:
//! `multiple=true` for a run that starts right after the highest tag already
//! covered, single acks for tags beyond a gap (so they do not hold the
//! broker's prefetch window while an earlier one is still retrying).

use std::collections::BTreeSet;

/// One `basic.ack` to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmqpAck {
    pub delivery_tag: u64,
    pub multiple: bool,
}

/// Per-channel ack state. Delivery tags on a channel start at 1 and grow by
/// one per delivery, so "every tag up to N was delivered" holds by protocol.
#[derive(Debug, Default)]
pub struct AmqpAckRuns {
    /// Every tag `<= covered` is acknowledged.
    covered: u64,
    /// Done, beyond `covered + 1`'s gap, not yet acknowledged.
    done: BTreeSet<u64>,
    /// Acknowledged singly, beyond `covered`.
    acked_singly: BTreeSet<u64>,
}

impl AmqpAckRuns {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a done delivery tag. Duplicates and tags already covered are
    /// ignored (an ack is never sent twice: the broker closes the channel on
    /// an unknown tag).
    pub fn done(&mut self, tag: u64) {
        if tag > self.covered && !self.acked_singly.contains(&tag) {
            self.done.insert(tag);
        }
    }

    /// The acks to send now, in order. Afterwards every done tag is acked.
    pub fn take_acks(&mut self) -> Vec<AmqpAck> {
        let mut acks = Vec::new();
        // Extend the covered prefix over done and singly-acked tags.
        let mut run_top_done = None;
        let mut run_len = 0usize;
        loop {
            let next = self.covered + 1;
            if self.done.remove(&next) {
                run_top_done = Some(next);
                run_len += 1;
            } else if !self.acked_singly.remove(&next) {
                break;
            }
            self.covered = next;
        }
        if let Some(top) = run_top_done {
            acks.push(AmqpAck {
                delivery_tag: top,
                multiple: run_len > 1,
            });
        }
        // Tags past a gap cannot use `multiple`: ack them one by one.
        for tag in std::mem::take(&mut self.done) {
            acks.push(AmqpAck {
                delivery_tag: tag,
                multiple: false,
            });
            self.acked_singly.insert(tag);
        }
        acks
    }

    /// Highest tag below which everything is acknowledged.
    pub fn covered(&self) -> u64 {
        self.covered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(tag: u64, multiple: bool) -> AmqpAck {
        AmqpAck {
            delivery_tag: tag,
            multiple,
        }
    }

    #[test]
    fn contiguous_run_is_one_multiple_ack() {
        let mut r = AmqpAckRuns::new();
        for t in [3, 1, 2, 4] {
            r.done(t);
        }
        assert_eq!(r.take_acks(), vec![ack(4, true)]);
        assert_eq!(r.covered(), 4);
        assert!(r.take_acks().is_empty());
    }

    #[test]
    fn a_single_next_tag_is_a_plain_ack() {
        let mut r = AmqpAckRuns::new();
        r.done(1);
        assert_eq!(r.take_acks(), vec![ack(1, false)]);
    }

    #[test]
    fn tags_past_a_gap_are_acked_singly_and_never_again() {
        let mut r = AmqpAckRuns::new();
        for t in [1, 2, 5, 6] {
            r.done(t);
        }
        assert_eq!(
            r.take_acks(),
            vec![ack(2, true), ack(5, false), ack(6, false)]
        );
        // Tag 3 closes part of the gap; 4 still missing.
        r.done(3);
        assert_eq!(r.take_acks(), vec![ack(3, false)]);
        assert_eq!(r.covered(), 3);
        // 4 closes it: the run 4..=6 is covered, but 5 and 6 were acked
        // already, so the multiple ack must target 4, not 6.
        r.done(4);
        assert_eq!(r.take_acks(), vec![ack(4, false)]);
        assert_eq!(r.covered(), 6);
        r.done(7);
        r.done(8);
        assert_eq!(r.take_acks(), vec![ack(8, true)]);
    }

    #[test]
    fn duplicate_and_stale_tags_are_ignored() {
        let mut r = AmqpAckRuns::new();
        r.done(1);
        r.done(1);
        assert_eq!(r.take_acks(), vec![ack(1, false)]);
        r.done(1);
        r.done(3);
        assert_eq!(r.take_acks(), vec![ack(3, false)]);
        r.done(3);
        assert!(r.take_acks().is_empty());
    }

    #[test]
    fn random_orders_never_ack_an_undone_tag() {
        use rand::seq::SliceRandom;
        let mut rng = rand::rng();
        for _ in 0..200 {
            let n = 50u64;
            let mut tags: Vec<u64> = (1..=n).collect();
            tags.shuffle(&mut rng);
            let mut r = AmqpAckRuns::new();
            let mut done = BTreeSet::new();
            let mut acked = BTreeSet::new();
            for chunk in tags.chunks(3) {
                for &t in chunk {
                    r.done(t);
                    done.insert(t);
                }
                for a in r.take_acks() {
                    let newly: Vec<u64> = if a.multiple {
                        (1..=a.delivery_tag)
                            .filter(|t| !acked.contains(t))
                            .collect()
                    } else {
                        vec![a.delivery_tag]
                    };
                    assert!(!acked.contains(&a.delivery_tag), "acked twice: {a:?}");
                    for t in newly {
                        assert!(done.contains(&t), "acked undone tag {t} via {a:?}");
                        acked.insert(t);
                    }
                }
            }
            assert_eq!(acked.len() as u64, n);
        }
    }
}
