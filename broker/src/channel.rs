//! Per-channel state, owned by its connection task: content assembly, unacknowledged
//! deliveries (ordered by delivery tag), consumers, prefetch and confirm mode.

use crate::message::{Message, MessageBuilder, QueuedMessage};
use crate::queue::{ChannelCredit, ConsumerTag, Source};
use crate::unacked::UnackedDeliveries;
use amq_protocol::protocol::basic;
use amq_protocol::types::{FieldTable, ShortString};
use rustc_hash::FxHashMap;
use std::sync::Arc;

/// Whether a channel is usable or closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChannelState {
    /// Open for business.
    Open,
    /// The server sent channel.close and waits for close-ok; other frames are dropped.
    Closing,
}

/// Where content assembly is: a publish is a method, a header, then bodies up to its size.
#[derive(Debug, Default)]
pub(crate) enum Assembly {
    /// Expecting a method.
    #[default]
    Idle,
    /// basic.publish seen, expecting its content header.
    Header(basic::Publish),
    /// Header seen, expecting body frames until the body is complete.
    Body(Box<(Publication, MessageBuilder)>),
}

/// What routing needs of a publish besides its message.
#[derive(Debug, Default)]
pub(crate) struct Publication {
    /// Return it with basic.return if it routes nowhere.
    pub(crate) mandatory: bool,
    /// Its headers (without `BCC`), for headers exchanges.
    pub(crate) headers: Option<FieldTable>,
    /// The keys its `CC` and `BCC` headers add to its routing key
    /// ([`crate::sender_selected`]).
    pub(crate) extra_routing_keys: Vec<String>,
    /// How many of `extra_routing_keys`, at the end, came from `BCC` (the message keeps them
    /// for dead-lettering, [`crate::message::Message::bcc_keys`]).
    pub(crate) bcc_count: usize,
    /// Its `expiration`, in milliseconds; the clock starts when it is routed.
    pub(crate) ttl: Option<u64>,
    /// Its `priority` (0 if none), for priority queues.
    pub(crate) priority: u8,
}

impl Publication {
    /// The keys its `BCC` header added.
    pub(crate) fn bcc_keys(&self) -> impl Iterator<Item = &str> {
        let extra = &self.extra_routing_keys;
        extra[extra.len() - self.bcc_count..]
            .iter()
            .map(String::as_str)
    }
}

/// A delivery awaiting ack, nack or reject.
#[derive(Debug)]
pub(crate) struct Unacked {
    /// The queue it came from and the consumer it went to.
    pub(crate) source: Arc<Source>,
    /// The message, to requeue.
    pub(crate) message: QueuedMessage,
}

/// Deliveries settled at once from one source (queue and consumer): the source, how many.
pub(crate) type SettleCount = (Arc<Source>, u32);

/// What an ack, nack or reject does.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Settle {
    /// Done with it.
    Ack,
    /// Rejected: back to the queue or dropped.
    Reject {
        /// Back to the queue (true) or dropped.
        requeue: bool,
    },
}

/// What a transactional channel holds until tx.commit.
#[derive(Debug, Default)]
pub(crate) struct TxBuffer {
    /// Publishes, in order.
    pub(crate) publishes: Vec<(Publication, Message)>,
    /// Acks, nacks and rejects, with the deliveries they took from the unacked ones.
    pub(crate) settles: Vec<(Vec<(u64, Unacked)>, Settle)>,
}

/// A consumer as its channel knows it. Dropping it (cancel, channel or connection close)
/// detaches its [`Source`], so deliveries already on their way to it are put back.
#[derive(Debug)]
pub(crate) struct ChannelConsumer {
    /// What its deliveries carry: its queue and tag.
    pub(crate) source: Arc<Source>,
}

impl ChannelConsumer {
    /// The queue consumed.
    pub(crate) fn queue(&self) -> &Arc<str> {
        &self.source.queue
    }
}

impl Drop for ChannelConsumer {
    fn drop(&mut self) {
        self.source.detach();
    }
}

/// One open channel.
#[derive(Debug)]
pub(crate) struct Channel {
    /// Open or closing.
    pub(crate) state: ChannelState,
    /// Content assembly.
    pub(crate) assembly: Assembly,
    /// Next delivery tag (tags start at 1).
    pub(crate) next_delivery_tag: u64,
    /// Unacknowledged deliveries by tag, in order.
    pub(crate) unacked: UnackedDeliveries,
    /// Consumers by tag.
    pub(crate) consumers: FxHashMap<ConsumerTag, ChannelConsumer>,
    /// Prefetch for consumers created from now on (basic.qos global=false).
    pub(crate) consumer_prefetch: u32,
    /// The channel-wide prefetch window (basic.qos global=true).
    pub(crate) credit: Arc<ChannelCredit>,
    /// Publisher confirms: the sequence number of the next publish, once confirm.select.
    pub(crate) next_confirm: Option<u64>,
    /// Publishes handled but not yet confirmed: the first and last sequence numbers.
    pub(crate) confirm_due: Option<(u64, u64)>,
    /// The last queue declared on this channel, for the empty-name shortcut.
    pub(crate) last_queue: Option<ShortString>,
    /// Transactional (tx.select): what waits for tx.commit.
    pub(crate) tx: Option<TxBuffer>,
    /// The reply address of this channel's direct reply-to consumer, if it has one.
    pub(crate) reply_address: Option<String>,
}

impl Channel {
    /// A new open channel.
    pub(crate) fn new() -> Self {
        Self {
            state: ChannelState::Open,
            assembly: Assembly::Idle,
            next_delivery_tag: 1,
            unacked: UnackedDeliveries::default(),
            consumers: FxHashMap::default(),
            consumer_prefetch: 0,
            credit: Arc::default(),
            next_confirm: None,
            confirm_due: None,
            last_queue: None,
            tx: None,
            reply_address: None,
        }
    }
}
