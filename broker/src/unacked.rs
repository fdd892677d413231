//! A channel's unacknowledged deliveries, in delivery-tag order.
//!
//! Tags only grow, so a delivery is a push at the back and a `multiple` ack drains the front:
//! neither allocates per message (a `BTreeMap` allocated nodes on insert and, for a `multiple`
//! ack, split itself and was collected into a fresh `Vec`). A single ack in the middle leaves a
//! hole, dropped once it reaches either end, or compacted away when holes outnumber deliveries.

use crate::channel::Unacked;
use std::collections::VecDeque;

/// Holes are compacted away once there are more than this many and more holes than
/// deliveries: a client that acks everything but its oldest delivery one by one keeps memory
/// in proportion to what it has not acked.
const HOLES_BEFORE_COMPACTING: usize = 64;

/// Unacknowledged deliveries by tag, in tag order.
#[derive(Debug, Default)]
pub(crate) struct UnackedDeliveries {
    /// Ascending tags; `None` is a delivery settled out of order.
    entries: VecDeque<(u64, Option<Unacked>)>,
    /// How many entries are deliveries (not holes).
    live: usize,
    /// When they were delivered, by the connection's consumer-timeout clock: the first tag
    /// delivered at each reading (one entry per tick with deliveries, not one per delivery).
    delivered_at: VecDeque<(u64, u32)>,
}

impl UnackedDeliveries {
    /// Adds a delivery made at `clock` (the connection's consumer-timeout clock). New
    /// deliveries have the highest tag so far; any other goes through the merge of
    /// [`Extend::extend`].
    pub(crate) fn insert(&mut self, tag: u64, delivery: Unacked, clock: u32) {
        if self.entries.back().is_some_and(|last| last.0 >= tag) {
            self.extend([(tag, delivery)]);
            return;
        }
        if self.delivered_at.back().is_none_or(|at| at.1 != clock) {
            self.delivered_at.push_back((tag, clock));
        }
        self.entries.push_back((tag, Some(delivery)));
        self.live += 1;
    }

    /// The clock reading when its oldest delivery awaiting settlement was made, if any.
    pub(crate) fn oldest_delivered_at(&mut self) -> Option<u32> {
        // A `multiple` ack can leave holes at the front: the oldest is the first delivery.
        let Some(&(oldest, _)) = self.entries.iter().find(|e| e.1.is_some()) else {
            self.delivered_at.clear();
            return None;
        };
        while self
            .delivered_at
            .get(1)
            .is_some_and(|next| next.0 <= oldest)
        {
            self.delivered_at.pop_front();
        }
        self.delivered_at.front().map(|at| at.1)
    }

    /// Where the delivery with this tag is, if it awaits settlement.
    fn position(&self, tag: u64) -> Option<usize> {
        self.entries
            .binary_search_by_key(&tag, |e| e.0)
            .ok()
            .filter(|&i| self.entries[i].1.is_some())
    }

    /// Takes the deliveries an ack, nack or reject selects, in tag order: one tag, every tag
    /// up to it (`multiple`), or all of them (tag 0 with `multiple`). `None`, and nothing
    /// taken, if a named tag is not awaiting settlement. The deliveries leave as the iterator
    /// yields them (no buffer is filled first); those it did not yield are dropped with it.
    pub(crate) fn take(
        &mut self,
        tag: u64,
        multiple: bool,
    ) -> Option<impl Iterator<Item = (u64, Unacked)> + '_> {
        let (one, end) = if multiple {
            let end = if tag == 0 {
                self.entries.len()
            } else {
                self.position(tag)? + 1
            };
            self.live -= self.entries.range(..end).filter(|e| e.1.is_some()).count();
            (None, end)
        } else {
            let i = self.position(tag)?;
            let one = self.entries[i].1.take().map(|u| (tag, u));
            self.live -= 1;
            self.drop_holes();
            (one, 0)
        };
        Some(
            one.into_iter().chain(
                self.entries
                    .drain(..end)
                    .filter_map(|(t, u)| u.map(|u| (t, u))),
            ),
        )
    }

    /// Puts back deliveries a rolled-back transaction had acked, as [`Extend::extend`] does,
    /// stamped `clock` when no older stamp covers them (their own went with the ack): the
    /// consumer timeout then counts them from the rollback at the latest, never not at all.
    pub(crate) fn put_back(
        &mut self,
        deliveries: impl IntoIterator<Item = (u64, Unacked)>,
        clock: u32,
    ) {
        let before = self.entries.len();
        self.extend(deliveries);
        let oldest = self.entries.iter().find(|e| e.1.is_some()).map(|e| e.0);
        if let Some(oldest) = oldest.filter(|_| self.entries.len() != before)
            && self.delivered_at.front().is_none_or(|at| at.0 > oldest)
        {
            self.delivered_at.push_front((oldest, clock));
        }
    }

    /// Takes every delivery, in tag order.
    pub(crate) fn take_all(&mut self) -> impl Iterator<Item = (u64, Unacked)> + use<> {
        self.live = 0;
        self.delivered_at.clear();
        std::mem::take(&mut self.entries)
            .into_iter()
            .filter_map(|(t, u)| u.map(|u| (t, u)))
    }

    /// Drops holes at both ends, and all of them once they outnumber the deliveries.
    fn drop_holes(&mut self) {
        while self.entries.front().is_some_and(|e| e.1.is_none()) {
            self.entries.pop_front();
        }
        while self.entries.back().is_some_and(|e| e.1.is_none()) {
            self.entries.pop_back();
        }
        let holes = self.entries.len() - self.live;
        if holes > HOLES_BEFORE_COMPACTING && holes > self.live {
            self.entries.retain(|e| e.1.is_some());
        }
    }
}

impl Extend<(u64, Unacked)> for UnackedDeliveries {
    /// Puts deliveries back (a rolled-back transaction's acks) in one merge, not one insert
    /// each: a delivery that goes back below others moves them, so a rollback of k acks under
    /// n unacked deliveries would cost k times n moves. Callers pass all of them in one call.
    fn extend<I: IntoIterator<Item = (u64, Unacked)>>(&mut self, deliveries: I) {
        let mut back: Vec<(u64, Unacked)> = deliveries.into_iter().collect();
        back.sort_by_key(|d| d.0);
        if self
            .entries
            .back()
            .is_none_or(|last| back.first().is_none_or(|first| first.0 > last.0))
        {
            self.live += back.len();
            self.entries
                .extend(back.into_iter().map(|(t, u)| (t, Some(u))));
            return;
        }
        let mut merged = VecDeque::with_capacity(self.entries.len() + back.len());
        let mut back = back.into_iter().peekable();
        for (tag, delivery) in std::mem::take(&mut self.entries) {
            while let Some((t, u)) = back.next_if(|b| b.0 <= tag) {
                merged.push_back((t, Some(u)));
                self.live += 1;
            }
            // A hole whose delivery just came back is not kept beside it.
            if delivery.is_some() || merged.back().is_none_or(|m: &(u64, _)| m.0 != tag) {
                merged.push_back((tag, delivery));
            }
        }
        for (t, u) in back {
            merged.push_back((t, Some(u)));
            self.live += 1;
        }
        self.entries = merged;
        self.drop_holes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{MessageBuilder, QueuedMessage};
    use std::sync::Arc;

    fn delivery() -> Unacked {
        Unacked {
            source: crate::queue::Source::basic_get(Arc::from("q")),
            message: QueuedMessage {
                seq: 0,
                deliveries: 0,
                priority: 0,
                redelivered: false,
                expires_at: None,
                message: MessageBuilder::new("", "q", &[], 0).finish(),
            },
        }
    }

    fn filled(tags: impl IntoIterator<Item = u64>) -> UnackedDeliveries {
        let mut u = UnackedDeliveries::default();
        u.extend(tags.into_iter().map(|t| (t, delivery())));
        u
    }

    fn take(u: &mut UnackedDeliveries, tag: u64, multiple: bool) -> Option<Vec<u64>> {
        Some(u.take(tag, multiple)?.map(|(t, _)| t).collect())
    }

    fn tags(u: &mut UnackedDeliveries) -> Vec<u64> {
        take(u, 0, true).unwrap()
    }

    #[test]
    fn multiple_takes_every_tag_up_to_the_one_named_skipping_settled_ones() {
        let mut u = filled(1..=6);
        assert_eq!(take(&mut u, 3, false), Some(vec![3]));
        assert_eq!(take(&mut u, 3, false), None, "already settled");
        assert_eq!(take(&mut u, 3, true), None, "a settled tag is unknown");
        assert_eq!(take(&mut u, 4, true), Some(vec![1, 2, 4]));
        assert_eq!(u.live, 2);
        assert_eq!(take(&mut u, 9, false), None, "never delivered");
        assert_eq!(tags(&mut u), vec![5, 6]);
        assert_eq!(u.live, 0);
        assert_eq!(
            take(&mut u, 0, true),
            Some(vec![]),
            "tag 0 with multiple: all of none"
        );
    }

    #[test]
    fn tags_put_back_take_their_place_in_the_order() {
        let mut u = filled([2, 5]);
        let mut back: Vec<_> = u.take(5, false).unwrap().collect();
        back.extend(u.take(2, false).unwrap());
        u.insert(7, delivery(), 0);
        u.extend(back);
        u.insert(1, delivery(), 0);
        assert_eq!(u.live, 4);
        assert_eq!(tags(&mut u), vec![1, 2, 5, 7]);
    }

    #[test]
    fn many_deliveries_put_back_below_others_are_merged_in_order() {
        let mut u = filled(1..=20_000);
        let mut back: Vec<_> = u.take(10_000, true).unwrap().collect();
        back.extend(u.take(15_000, false).unwrap());
        assert_eq!(back.len(), 10_001);
        u.extend(back);
        assert_eq!(u.live, 20_000);
        assert_eq!(
            u.entries.len(),
            20_000,
            "no hole is left beside its delivery"
        );
        assert_eq!(tags(&mut u), (1..=20_000).collect::<Vec<_>>());
    }

    #[test]
    fn the_oldest_delivery_s_time_follows_settlements() {
        let mut u = UnackedDeliveries::default();
        assert_eq!(u.oldest_delivered_at(), None);
        for (tag, clock) in [(1, 10), (2, 10), (3, 11), (4, 13)] {
            u.insert(tag, delivery(), clock);
        }
        assert_eq!(u.delivered_at.len(), 3, "one entry per reading");
        assert_eq!(u.oldest_delivered_at(), Some(10));
        assert_eq!(take(&mut u, 2, false), Some(vec![2]));
        assert_eq!(u.oldest_delivered_at(), Some(10), "1 is still out");
        assert_eq!(take(&mut u, 1, false), Some(vec![1]));
        assert_eq!(u.oldest_delivered_at(), Some(11));
        assert_eq!(take(&mut u, 3, true), Some(vec![3]));
        assert_eq!(u.oldest_delivered_at(), Some(13));
        assert_eq!(take(&mut u, 4, false), Some(vec![4]));
        assert_eq!(u.oldest_delivered_at(), None);
        assert!(u.delivered_at.is_empty());
    }

    #[test]
    fn a_hole_left_at_the_front_by_a_multiple_ack_does_not_date_the_next_delivery() {
        let mut u = UnackedDeliveries::default();
        for (tag, clock) in [(1, 0), (2, 1), (3, 5)] {
            u.insert(tag, delivery(), clock);
        }
        assert_eq!(take(&mut u, 2, false), Some(vec![2]));
        assert_eq!(take(&mut u, 1, true), Some(vec![1]));
        assert_eq!(u.oldest_delivered_at(), Some(5), "3 is the oldest left");
    }

    #[test]
    fn deliveries_a_rollback_puts_back_are_stamped_again() {
        let mut u = UnackedDeliveries::default();
        u.insert(1, delivery(), 0);
        let acked: Vec<_> = u.take(1, false).unwrap().collect();
        assert_eq!(
            u.oldest_delivered_at(),
            None,
            "nothing unacked while the ack is pending"
        );
        u.put_back(acked, 7);
        assert_eq!(u.oldest_delivered_at(), Some(7));
    }

    #[test]
    fn holes_left_by_single_acks_do_not_accumulate() {
        let mut u = filled(1..=10_000);
        for tag in 2..=10_000 {
            assert_eq!(take(&mut u, tag, false), Some(vec![tag]));
        }
        assert_eq!(u.live, 1);
        assert!(u.entries.len() <= 1 + HOLES_BEFORE_COMPACTING + 1);
        assert_eq!(u.take_all().map(|(t, _)| t).collect::<Vec<_>>(), vec![1]);
    }
}
