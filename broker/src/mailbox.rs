//! A connection's inbound mailbox: what other tasks (dispatch from any connection, queue
//! deletion, an operator) hand to a connection. Dispatch runs under the vhost lock and gathers
//! its items in an [`Outbox`], which hands each mailbox its batch when the lock is released.
//! Sending never blocks; the mailbox is bounded by credit instead: dispatch skips a consumer
//! whose connection already holds [`MAILBOX_BYTES`] of undelivered messages, and the
//! connection asks for dispatch again once it has drained half of them.

use crate::error::AmqpError;
use crate::message::QueuedMessage;
use crate::queue::Source;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Memory of the deliveries (messages and their mailbox entries) waiting in one connection's
/// mailbox beyond which dispatch skips its consumers: about 13,000 small messages, or 500 of
/// 4 KiB. Room for a publisher's whole turn of small messages matters: when the mailbox fills
/// mid-turn, the rest of the turn waits in the queues and is delivered queue by queue when the
/// connection drains it, an order unlike the one the messages were allocated in, which makes
/// reading and freeing them much slower (1,000 queues on a connection: -19% broker CPU per
/// message with the room for the turn).
pub(crate) const MAILBOX_BYTES: usize = 2 * 1024 * 1024;

/// Something for a connection task to act on.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Write this delivery to a consumer (or requeue it if the consumer is gone).
    Deliver {
        /// Channel of the consumer.
        channel: u16,
        /// The queue the message came from and the consumer it goes to.
        source: Arc<Source>,
        /// Whether the consumer acknowledges (false) or not (true).
        no_ack: bool,
        /// The message.
        message: QueuedMessage,
    },
    /// The server cancelled this consumer (its queue was deleted).
    Cancel {
        /// Channel of the consumer.
        channel: u16,
        /// The consumer (its tag, and which consumer of that tag it is).
        source: Arc<Source>,
    },
    /// Close the connection with this error (operator's forced close, broker shutdown).
    Close(AmqpError),
    /// The broker's resource alarms changed (see [`crate::alarm`]).
    Alarms(crate::alarm::Alarms),
}

/// What an item counts against [`MAILBOX_BYTES`]: a delivery, its entry and its message's heap
/// bytes (none for a message kept inline, which the entry holds); other items nothing.
fn bytes_held(item: &Outbound) -> usize {
    match item {
        Outbound::Deliver { message, .. } => {
            message.message.heap_size() + std::mem::size_of::<Outbound>()
        }
        _ => 0,
    }
}

/// The sending side, cloned into every consumer of the connection.
#[derive(Clone, Debug)]
pub(crate) struct Mailbox {
    shared: Arc<MailboxShared>,
}

#[derive(Debug, Default)]
struct MailboxShared {
    /// Items sent and not yet moved to the receiver's side; `None` once closed.
    items: Mutex<Option<VecDeque<Outbound>>>,
    /// Wakes the connection task when items arrive in an empty mailbox.
    arrived: Notify,
    /// Memory of the deliveries sent (or gathered in an [`Outbox`] for it) and not yet taken
    /// by the connection (see [`bytes_held`]); meaningless once closed.
    queued: AtomicUsize,
    /// Dispatch skipped a consumer because the mailbox was full.
    starved: AtomicBool,
    /// The connection no longer takes items.
    closed: AtomicBool,
}

impl MailboxShared {
    fn items(&self) -> MutexGuard<'_, Option<VecDeque<Outbound>>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The receiving side, owned by the connection task. It takes everything sent so far in one
/// step (swapping buffers, so neither side allocates once both have grown), then hands items
/// out one by one.
#[derive(Debug)]
pub(crate) struct MailboxReceiver {
    taken: VecDeque<Outbound>,
    shared: Arc<MailboxShared>,
}

/// A new mailbox.
pub(crate) fn mailbox() -> (Mailbox, MailboxReceiver) {
    let shared = Arc::new(MailboxShared {
        items: Mutex::new(Some(VecDeque::new())),
        ..MailboxShared::default()
    });
    (
        Mailbox {
            shared: shared.clone(),
        },
        MailboxReceiver {
            taken: VecDeque::new(),
            shared,
        },
    )
}

impl Mailbox {
    /// Whether the connection can take another delivery now; if not, remembers that dispatch
    /// was refused so the connection asks again when drained.
    pub(crate) fn has_room(&self) -> bool {
        if self.shared.closed.load(Ordering::Relaxed) {
            return false;
        }
        if self.shared.queued.load(Ordering::Relaxed) < MAILBOX_BYTES {
            true
        } else {
            self.shared.starved.store(true, Ordering::Relaxed);
            false
        }
    }

    /// Sends an item; gives it back if the connection is gone.
    pub(crate) fn send(&self, item: Outbound) -> Result<(), Outbound> {
        let was_empty = {
            let mut items = self.shared.items();
            let Some(items) = items.as_mut() else {
                return Err(item);
            };
            // Counted before the receiver can take it, so the count never goes below zero.
            self.shared
                .queued
                .fetch_add(bytes_held(&item), Ordering::Relaxed);
            items.push_back(item);
            items.len() == 1
        };
        if was_empty {
            self.shared.arrived.notify_one();
        }
        Ok(())
    }

    /// Moves `items` (already counted against the room) into the mailbox under one lock; false
    /// (leaving them in `items`) if the connection is gone.
    fn send_all(&self, items: &mut Vec<Outbound>) -> bool {
        let was_empty = {
            let mut guard = self.shared.items();
            let Some(queue) = guard.as_mut() else {
                return false;
            };
            let was_empty = queue.is_empty();
            queue.extend(items.drain(..));
            was_empty
        };
        if was_empty {
            self.shared.arrived.notify_one();
        }
        true
    }
}

/// Items for mailboxes, gathered while the vhost lock is held and handed over, one batch per
/// mailbox, before it is released (see [`crate::vhost::VhostGuard`]), so each mailbox receives
/// the items sent through the outbox in the order they were sent. (A direct reply-to reply is
/// sent straight to its mailbox, to return it to a mandatory publisher if the connection is
/// gone: it may overtake queue deliveries of the same lock hold, which RabbitMQ does not
/// order against it either.)
///
/// With many consumer connections, a delivery stored straight into its mailbox lands in memory
/// not touched since the connection last drained it, and the mailbox's mutex then waits for
/// that store; gathered here, each mailbox takes its batch in one copy and one lock.
///
/// It also carries what else a lock hold leaves for its end: messages leaving their queues for
/// a dead-letter exchange, and when the next one expires (see [`crate::dead_letter`]).
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Each mailbox sent to since the last flush, with its items in order.
    batches: Vec<(Mailbox, Vec<Outbound>)>,
    /// Messages rejected or expired in a queue that dead-letters, to publish to its
    /// dead-letter exchange before the lock is released.
    pub(crate) dead_letters: Vec<crate::dead_letter::DeadLetter>,
    /// The earliest expiry of a dead-lettering queue's head message seen during this hold.
    pub(crate) expiry: Option<tokio::time::Instant>,
    /// Index in `batches` by mailbox.
    index: FxHashMap<usize, usize>,
    /// Emptied item buffers, kept for the next batches.
    spare: Vec<Vec<Outbound>>,
}

impl Outbox {
    /// Gathers an item for `mailbox`. A delivery counts against the mailbox's room at once.
    pub(crate) fn send(&mut self, mailbox: &Mailbox, item: Outbound) {
        mailbox
            .shared
            .queued
            .fetch_add(bytes_held(&item), Ordering::Relaxed);
        let key = Arc::as_ptr(&mailbox.shared) as usize;
        let at = *self.index.entry(key).or_insert_with(|| {
            let items = self.spare.pop().unwrap_or_default();
            self.batches.push((mailbox.clone(), items));
            self.batches.len() - 1
        });
        self.batches[at].1.push(item);
    }

    /// How the items gathered since the last flush are spread over mailboxes. The outbox is
    /// flushed whenever the vhost lock is released, so read just before, this is what the
    /// hold sent.
    pub(crate) fn spread(&self) -> Spread {
        Spread {
            mailboxes: self.batches.len(),
            fullest: self
                .batches
                .iter()
                .map(|(mailbox, _)| mailbox.shared.queued.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0),
        }
    }

    /// Notes that a dead-lettering queue's head message expires at `at`.
    pub(crate) fn expire_at(&mut self, at: tokio::time::Instant) {
        self.expiry = Some(self.expiry.map_or(at, |e| e.min(at)));
    }

    /// Whether nothing waits to be handed over.
    pub(crate) fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Hands every gathered item to its mailbox; returns those whose connection is gone.
    pub(crate) fn flush(&mut self) -> Vec<Outbound> {
        let mut undelivered = Vec::new();
        self.index.clear();
        for (mailbox, mut items) in self.batches.drain(..) {
            if !mailbox.send_all(&mut items) {
                undelivered.append(&mut items);
            }
            if self.spare.len() < MAX_SPARE_BATCHES && items.capacity() <= MAX_SPARE_ITEMS {
                self.spare.push(items);
            }
        }
        undelivered
    }
}

/// How a hold of the vhost lock spread its deliveries (see [`Outbox::spread`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Spread {
    /// Mailboxes sent to.
    pub(crate) mailboxes: usize,
    /// The most memory one of them holds (see [`bytes_held`]), what it held before included.
    pub(crate) fullest: usize,
}

/// Emptied batch buffers an [`Outbox`] keeps.
const MAX_SPARE_BATCHES: usize = 256;
/// Largest batch buffer kept (a catch-up after a full mailbox can gather thousands).
const MAX_SPARE_ITEMS: usize = 1024;

impl MailboxReceiver {
    /// The next item, waiting for one.
    pub(crate) async fn recv(&mut self) -> Option<Outbound> {
        loop {
            if let Some(item) = self.try_recv() {
                return Some(item);
            }
            if self.shared.closed.load(Ordering::Relaxed) {
                return None;
            }
            // A send between the check above and this wait leaves a permit: no wake-up is lost.
            self.shared.arrived.notified().await;
        }
    }

    /// The next item if one is waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Outbound> {
        if self.taken.is_empty()
            && let Some(items) = self.shared.items().as_mut()
        {
            std::mem::swap(items, &mut self.taken);
            self.touch_taken();
        }
        let item = self.taken.pop_front()?;
        self.shared
            .queued
            .fetch_sub(bytes_held(&item), Ordering::Relaxed);
        Some(item)
    }

    /// Reads a byte of each delivery just taken (its message's heap buffer, if it has one, and
    /// its consumer tag): the loads are independent, so their cache misses overlap here rather
    /// than stalling the writing of each delivery in turn (with many queues and connections,
    /// the messages were written long enough ago to have left the cache).
    fn touch_taken(&self) {
        let mut sum = 0u8;
        for item in &self.taken {
            if let Outbound::Deliver {
                source, message, ..
            } = item
            {
                let tag = source.consumer_tag.as_deref().unwrap_or_default();
                sum ^= message.message.first_byte() ^ tag.as_bytes().first().unwrap_or(&0);
            }
        }
        std::hint::black_box(sum);
    }

    /// True once after dispatch was refused for lack of room and room has come back.
    pub(crate) fn take_starved(&self) -> bool {
        self.shared.queued.load(Ordering::Relaxed) < MAILBOX_BYTES / 2
            && self.shared.starved.swap(false, Ordering::Relaxed)
    }

    /// Stops new items and returns those already sent.
    pub(crate) fn close_and_drain(&mut self) -> Vec<Outbound> {
        self.shared.closed.store(true, Ordering::Relaxed);
        let rest = self.shared.items().take().unwrap_or_default();
        let items: Vec<Outbound> = self.taken.drain(..).chain(rest).collect();
        let queued: usize = items.iter().map(bytes_held).sum();
        self.shared.queued.fetch_sub(queued, Ordering::Relaxed);
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cancel(n: u16) -> Outbound {
        Outbound::Cancel {
            channel: n,
            source: crate::queue::Source::consumer("q".into(), "t".into(), Default::default()),
        }
    }

    fn channel_of(item: Option<Outbound>) -> Option<u16> {
        match item {
            Some(Outbound::Cancel { channel, .. }) => Some(channel),
            _ => None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn items_sent_from_another_thread_wake_the_receiver_in_order() {
        let (tx, mut rx) = mailbox();
        let sender = std::thread::spawn(move || {
            for n in 0..10_000 {
                tx.send(cancel(n % 100)).map_err(|_| "closed").unwrap();
                if n % 1000 == 0 {
                    std::thread::yield_now();
                }
            }
            tx
        });
        for n in 0..10_000u16 {
            let item = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a sent item wakes the receiver");
            assert_eq!(channel_of(item), Some(n % 100));
        }
        let tx = sender.join().unwrap();
        assert!(rx.try_recv().is_none());
        tx.send(cancel(7)).map_err(|_| "closed").unwrap();
        assert_eq!(rx.close_and_drain().len(), 1);
        assert!(
            tx.send(cancel(8)).is_err(),
            "a closed mailbox gives items back"
        );
        assert!(!tx.has_room());
        assert!(rx.recv().await.is_none());
    }

    fn delivery() -> Outbound {
        Outbound::Deliver {
            channel: 1,
            source: crate::queue::Source::consumer("q".into(), "t".into(), Default::default()),
            no_ack: false,
            message: QueuedMessage {
                seq: 0,
                priority: 0,
                deliveries: 0,
                redelivered: false,
                expires_at: None,
                message: crate::message::MessageBuilder::new("", "q", &[], 0).finish(),
            },
        }
    }

    #[test]
    fn an_outbox_tells_how_many_mailboxes_it_sent_to_and_the_most_one_holds() {
        let (a, mut a_rx) = mailbox();
        let (b, _b_rx) = mailbox();
        let mut outbox = Outbox::default();
        assert_eq!(outbox.spread(), Spread::default());
        let one = bytes_held(&delivery());
        outbox.send(&a, delivery());
        outbox.send(&b, delivery());
        outbox.send(&b, delivery());
        outbox.send(&a, cancel(1));
        assert_eq!(
            outbox.spread(),
            Spread {
                mailboxes: 2,
                fullest: 2 * one
            }
        );
        assert!(outbox.flush().is_empty());
        assert_eq!(outbox.spread(), Spread::default(), "a flush starts again");
        // What a mailbox already held counts, until its connection takes it.
        outbox.send(&a, delivery());
        let spread = |mailboxes, n| Spread {
            mailboxes,
            fullest: n * one,
        };
        assert_eq!(outbox.spread(), spread(1, 2));
        assert!(a_rx.try_recv().is_some());
        assert_eq!(outbox.spread(), spread(1, 1));
    }

    #[test]
    fn an_outbox_hands_each_mailbox_its_items_in_order_when_flushed() {
        let (a, mut a_rx) = mailbox();
        let (b, mut b_rx) = mailbox();
        let (gone, mut gone_rx) = mailbox();
        drop(gone_rx.close_and_drain());
        let mut outbox = Outbox::default();
        for n in 0..6 {
            outbox.send(&a, cancel(n));
            outbox.send(&b, cancel(100 + n));
        }
        outbox.send(&gone, cancel(7));
        assert!(
            a_rx.try_recv().is_none(),
            "nothing arrives before the flush"
        );
        let undelivered = outbox.flush();
        assert!(outbox.is_empty());
        assert_eq!(undelivered.len(), 1, "the closed mailbox's item comes back");
        for n in 0..6 {
            assert_eq!(channel_of(a_rx.try_recv()), Some(n));
            assert_eq!(channel_of(b_rx.try_recv()), Some(100 + n));
        }
        assert!(a_rx.try_recv().is_none() && b_rx.try_recv().is_none());
        // A second round reuses the buffers and still keeps the order.
        outbox.send(&b, cancel(1));
        outbox.send(&b, cancel(2));
        assert!(outbox.flush().is_empty());
        assert_eq!(channel_of(b_rx.try_recv()), Some(1));
        assert_eq!(channel_of(b_rx.try_recv()), Some(2));
    }
}
