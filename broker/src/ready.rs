//! A queue's ready messages in delivery order: first in, first out, or, for a priority queue
//! (`x-max-priority`), highest priority first and first in, first out within a priority, as
//! RabbitMQ's classic priority queues order them. Its head is the message delivered next:
//! the one expiry, `drop-head` and basic.get look at.

use crate::message::QueuedMessage;
use std::collections::VecDeque;

/// A queue's ready messages.
#[derive(Debug)]
pub(crate) enum ReadyMessages {
    /// One line, in publish order.
    Fifo(VecDeque<QueuedMessage>),
    /// One line per priority, from 0 to the queue's `x-max-priority`; a message of a higher
    /// priority than that goes in the highest line.
    Priority(Box<PriorityLines>),
}

/// A priority queue's lines, and how many messages they hold.
#[derive(Debug)]
pub(crate) struct PriorityLines {
    lines: Vec<VecDeque<QueuedMessage>>,
    len: usize,
}

impl ReadyMessages {
    /// Empty, first in first out, or with priorities 0 to `max_priority`.
    ///
    /// ```ignore
    /// let mut ready = ReadyMessages::new(Some(9));
    /// ready.push_back(low); // priority 1
    /// ready.push_back(high); // priority 5
    /// assert_eq!(ready.pop_front(), Some(high));
    /// ```
    pub(crate) fn new(max_priority: Option<u8>) -> Self {
        match max_priority {
            None => Self::Fifo(VecDeque::new()),
            Some(max) => Self::Priority(Box::new(PriorityLines {
                lines: (0..=max).map(|_| VecDeque::new()).collect(),
                len: 0,
            })),
        }
    }

    /// How many.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Fifo(line) => line.len(),
            Self::Priority(p) => p.len,
        }
    }

    /// Whether there are none.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message delivered next.
    pub(crate) fn front(&self) -> Option<&QueuedMessage> {
        match self {
            Self::Fifo(line) => line.front(),
            Self::Priority(p) => p.lines.iter().rev().find_map(VecDeque::front),
        }
    }

    /// Takes the message delivered next.
    pub(crate) fn pop_front(&mut self) -> Option<QueuedMessage> {
        match self {
            Self::Fifo(line) => line.pop_front(),
            Self::Priority(p) => {
                let message = p.lines.iter_mut().rev().find_map(VecDeque::pop_front)?;
                p.len -= 1;
                Some(message)
            }
        }
    }

    /// Adds a newly published message, last of its priority.
    pub(crate) fn push_back(&mut self, message: QueuedMessage) {
        match self {
            Self::Fifo(line) => line.push_back(message),
            Self::Priority(p) => {
                p.line_of(message.priority).push_back(message);
                p.len += 1;
            }
        }
    }

    /// The message published last, if it is still here and its sequence number is `seq`.
    pub(crate) fn newest_mut(&mut self, seq: u64, priority: u8) -> Option<&mut QueuedMessage> {
        let line = match self {
            Self::Fifo(line) => line,
            Self::Priority(p) => p.line_of(priority),
        };
        line.back_mut().filter(|m| m.seq == seq)
    }

    /// Puts a message back where it was: before every later message of its priority.
    pub(crate) fn insert_in_place(&mut self, message: QueuedMessage) {
        let line = match self {
            Self::Fifo(line) => line,
            Self::Priority(p) => {
                p.len += 1;
                p.line_of(message.priority)
            }
        };
        let at = line.partition_point(|m| m.seq < message.seq);
        line.insert(at, message);
    }

    /// Drops every message.
    pub(crate) fn clear(&mut self) {
        match self {
            Self::Fifo(line) => line.clear(),
            Self::Priority(p) => {
                p.lines.iter_mut().for_each(VecDeque::clear);
                p.len = 0;
            }
        }
    }

    /// Every message, in delivery order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &QueuedMessage> {
        let lines: &[VecDeque<QueuedMessage>] = match self {
            Self::Fifo(line) => std::slice::from_ref(line),
            Self::Priority(p) => &p.lines,
        };
        lines.iter().rev().flat_map(VecDeque::iter)
    }

    /// Every message, in no particular order.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut QueuedMessage> {
        let lines: &mut [VecDeque<QueuedMessage>] = match self {
            Self::Fifo(line) => std::slice::from_mut(line),
            Self::Priority(p) => &mut p.lines,
        };
        lines.iter_mut().flat_map(VecDeque::iter_mut)
    }
}

impl PriorityLines {
    /// The line of messages of `priority` (the highest line for a priority above it).
    fn line_of(&mut self, priority: u8) -> &mut VecDeque<QueuedMessage> {
        let highest = self.lines.len() - 1;
        &mut self.lines[usize::from(priority).min(highest)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageBuilder;

    fn message(seq: u64, priority: u8) -> QueuedMessage {
        QueuedMessage {
            seq,
            priority,
            deliveries: 0,
            redelivered: false,
            expires_at: None,
            message: MessageBuilder::new("", "q", &[], 0).finish(),
        }
    }

    fn order(ready: &mut ReadyMessages) -> Vec<u64> {
        std::iter::from_fn(|| ready.pop_front().map(|m| m.seq)).collect()
    }

    #[test]
    fn a_priority_queue_delivers_the_highest_priority_first_and_in_order_within_one() {
        let mut ready = ReadyMessages::new(Some(10));
        for (seq, priority) in [(0, 0), (1, 1), (2, 5), (3, 10), (4, 20), (5, 5), (6, 255)] {
            ready.push_back(message(seq, priority));
        }
        assert_eq!(ready.len(), 7);
        assert_eq!(ready.front().map(|m| m.seq), Some(3));
        assert_eq!(order(&mut ready), [3, 4, 6, 2, 5, 1, 0]);
        assert!(ready.is_empty());
    }

    #[test]
    fn a_message_put_back_goes_before_later_ones_of_its_priority() {
        for max in [None, Some(9)] {
            let mut ready = ReadyMessages::new(max);
            for seq in 0..4 {
                ready.push_back(message(seq, 3));
            }
            let first = ready.pop_front().expect("one");
            let second = ready.pop_front().expect("two");
            ready.insert_in_place(second);
            ready.insert_in_place(first);
            assert_eq!(order(&mut ready), [0, 1, 2, 3], "max priority {max:?}");
        }
    }

    #[test]
    fn a_fifo_ignores_priorities() {
        let mut ready = ReadyMessages::new(None);
        ready.push_back(message(0, 0));
        ready.push_back(message(1, 9));
        assert_eq!(ready.newest_mut(1, 9).map(|m| m.seq), Some(1));
        assert!(ready.newest_mut(0, 0).is_none());
        assert_eq!(ready.iter_mut().count(), 2);
        assert_eq!(order(&mut ready), [0, 1]);
    }
}
