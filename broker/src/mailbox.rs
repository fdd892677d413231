//! A connection's inbound mailbox: what other tasks (dispatch from any connection, queue
//! deletion, an operator) hand to a connection. Dispatch runs under the vhost lock, so sending
//! never blocks; the mailbox is bounded by credit instead: dispatch skips a consumer whose
//! connection already holds [`MAILBOX_LIMIT`] undelivered messages, and the connection asks for
//! dispatch again once it has drained them.

use crate::error::AmqpError;
use crate::message::QueuedMessage;
use crate::queue::ConsumerTag;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::mpsc;

/// Most deliveries waiting in one connection's mailbox before dispatch skips its consumers.
pub(crate) const MAILBOX_LIMIT: usize = 1024;

/// Something for a connection task to act on.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Write this delivery to a consumer (or requeue it if the consumer is gone).
    Deliver {
        /// Channel of the consumer.
        channel: u16,
        /// The consumer's tag.
        consumer_tag: ConsumerTag,
        /// Whether the consumer acknowledges (false) or not (true).
        no_ack: bool,
        /// The queue the message came from.
        queue: Arc<str>,
        /// The message.
        message: QueuedMessage,
    },
    /// The server cancelled this consumer (its queue was deleted).
    Cancel {
        /// Channel of the consumer.
        channel: u16,
        /// The consumer's tag.
        consumer_tag: ConsumerTag,
    },
    /// Close the connection with this error (operator's forced close, broker shutdown).
    Close(AmqpError),
}

/// The sending side, cloned into every consumer of the connection.
#[derive(Clone, Debug)]
pub(crate) struct Mailbox {
    tx: mpsc::UnboundedSender<Outbound>,
    shared: Arc<MailboxShared>,
}

#[derive(Debug, Default)]
struct MailboxShared {
    /// Deliveries sent and not yet taken by the connection.
    queued: AtomicUsize,
    /// Dispatch skipped a consumer because the mailbox was full.
    starved: AtomicBool,
}

/// The receiving side, owned by the connection task.
#[derive(Debug)]
pub(crate) struct MailboxReceiver {
    rx: mpsc::UnboundedReceiver<Outbound>,
    shared: Arc<MailboxShared>,
}

/// A new mailbox.
pub(crate) fn mailbox() -> (Mailbox, MailboxReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(MailboxShared::default());
    (
        Mailbox {
            tx,
            shared: shared.clone(),
        },
        MailboxReceiver { rx, shared },
    )
}

impl Mailbox {
    /// Whether the connection can take another delivery now; if not, remembers that dispatch
    /// was refused so the connection asks again when drained.
    pub(crate) fn has_room(&self) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        if self.shared.queued.load(Ordering::Relaxed) < MAILBOX_LIMIT {
            true
        } else {
            self.shared.starved.store(true, Ordering::Relaxed);
            false
        }
    }

    /// Sends an item; gives it back if the connection is gone.
    pub(crate) fn send(&self, item: Outbound) -> Result<(), Outbound> {
        let is_delivery = matches!(item, Outbound::Deliver { .. });
        if is_delivery {
            self.shared.queued.fetch_add(1, Ordering::Relaxed);
        }
        self.tx.send(item).map_err(|e| {
            if is_delivery {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            }
            e.0
        })
    }
}

impl MailboxReceiver {
    /// The next item, waiting for one.
    pub(crate) async fn recv(&mut self) -> Option<Outbound> {
        let item = self.rx.recv().await;
        self.taken(&item);
        item
    }

    /// The next item if one is waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Outbound> {
        let item = self.rx.try_recv().ok();
        self.taken(&item);
        item
    }

    fn taken(&self, item: &Option<Outbound>) {
        if let Some(Outbound::Deliver { .. }) = item {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// True once after dispatch was refused for lack of room and room has come back.
    pub(crate) fn take_starved(&self) -> bool {
        self.shared.queued.load(Ordering::Relaxed) < MAILBOX_LIMIT / 2
            && self.shared.starved.swap(false, Ordering::Relaxed)
    }

    /// Stops new items and returns those already sent.
    pub(crate) fn close_and_drain(&mut self) -> Vec<Outbound> {
        self.rx.close();
        let mut items = Vec::new();
        while let Some(item) = self.try_recv() {
            items.push(item);
        }
        items
    }
}
