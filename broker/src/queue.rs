//! A queue: ready messages in order, its consumers, and dispatch, the single place that takes
//! messages off a queue for consumers.

use crate::dead_letter::{DeadLetter, DeadLetterTarget, DeathReason};
use crate::mailbox::{Mailbox, Outbound, Outbox};
use crate::message::{Message, QueuedMessage};
use crate::policy::Policy;
use crate::ready::ReadyMessages;
use amq_protocol::types::FieldTable;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use tokio::time::Instant;

/// Identifies a client connection within a broker.
pub(crate) type ConnId = u64;

/// A channel's shared prefetch window (`basic.qos` with `global=true`): every consumer of the
/// channel draws on it.
#[derive(Debug, Default)]
pub(crate) struct ChannelCredit {
    /// Most unacknowledged deliveries on the channel; 0 is unlimited.
    pub(crate) limit: AtomicU32,
    /// Unacknowledged deliveries counted against `limit`.
    pub(crate) in_flight: AtomicU32,
}

impl ChannelCredit {
    fn has_room(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        limit == 0 || self.in_flight.load(Ordering::Relaxed) < limit
    }

    /// Gives back one unit of credit.
    pub(crate) fn release(&self) {
        self.release_many(1);
    }

    /// Gives back `n` units of credit.
    pub(crate) fn release_many(&self, n: u32) {
        if n > 0 {
            let _ = self
                .in_flight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                    Some(f.saturating_sub(n))
                });
        }
    }
}

/// A consumer's tag, shared by its queue, its channel and its [`Source`].
pub(crate) type ConsumerTag = Arc<str>;

/// Where a delivery came from: its queue, and the consumer it went to (`None` for basic.get).
/// One per consumer, and one per queue for basic.get, shared by all their deliveries in flight
/// and unacknowledged: a delivery counts one reference to it (one atomic increment, one
/// decrement) rather than cloning two names.
#[derive(Debug)]
pub(crate) struct Source {
    /// The queue (the pseudo-queue for direct reply-to).
    pub(crate) queue: Arc<str>,
    /// The consumer's tag; `None` for basic.get.
    pub(crate) consumer_tag: Option<ConsumerTag>,
    /// Whether the consumer is still on its channel: cleared when the channel drops it, so a
    /// delivery still on its way to a cancelled consumer is put back, even when a new one
    /// took its tag. Checked by the connection that owns the consumer, which alone clears it.
    attached: AtomicBool,
    /// The prefetch window its channel had when the consumer started, which its deliveries
    /// are charged to (never charged for basic.get): a delivery that never reaches the client
    /// gives its credit back there, not to a channel reopened under the same number.
    pub(crate) channel_credit: Arc<ChannelCredit>,
}

impl Source {
    /// The source of a queue's basic.get deliveries.
    pub(crate) fn basic_get(queue: Arc<str>) -> Arc<Self> {
        Arc::new(Self {
            queue,
            consumer_tag: None,
            attached: AtomicBool::new(false),
            channel_credit: Arc::default(),
        })
    }

    /// The source of a consumer's deliveries, attached until [`Source::detach`], charged to
    /// its channel's window `channel_credit`.
    pub(crate) fn consumer(
        queue: Arc<str>,
        tag: ConsumerTag,
        channel_credit: Arc<ChannelCredit>,
    ) -> Arc<Self> {
        Arc::new(Self {
            queue,
            consumer_tag: Some(tag),
            attached: AtomicBool::new(true),
            channel_credit,
        })
    }

    /// Whether its consumer is still on its channel.
    pub(crate) fn is_attached(&self) -> bool {
        self.attached.load(Ordering::Relaxed)
    }

    /// Its consumer left its channel.
    pub(crate) fn detach(&self) {
        self.attached.store(false, Ordering::Relaxed);
    }
}

/// A consumer attached to a queue.
#[derive(Debug)]
pub(crate) struct Consumer {
    /// Its queue and tag (unique within its channel), as its deliveries carry them.
    pub(crate) source: Arc<Source>,
    /// Its connection.
    pub(crate) conn: ConnId,
    /// Its channel.
    pub(crate) channel: u16,
    /// Deliveries need no acknowledgement.
    pub(crate) no_ack: bool,
    /// Consuming exclusively.
    pub(crate) exclusive: bool,
    /// Its priority (`x-priority`, default 0): a queue delivers to its highest-priority
    /// consumers that can take a message.
    pub(crate) priority: i64,
    /// Most unacknowledged deliveries (`basic.qos` with `global=false`); 0 is unlimited.
    pub(crate) prefetch: u32,
    /// Unacknowledged deliveries to this consumer.
    pub(crate) in_flight: u32,
    /// Where its deliveries go.
    pub(crate) mailbox: Mailbox,
}

impl Consumer {
    /// Its tag.
    pub(crate) fn tag(&self) -> &str {
        self.source.consumer_tag.as_deref().unwrap_or_default()
    }

    fn can_take(&self) -> bool {
        if !self.no_ack {
            if self.prefetch != 0 && self.in_flight >= self.prefetch {
                return false;
            }
            if !self.source.channel_credit.has_room() {
                return false;
            }
        }
        self.mailbox.has_room()
    }
}

/// How a queue was declared.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct QueueOptions {
    /// Declared durable (kept in memory all the same).
    pub(crate) durable: bool,
    /// Owned by this connection, if exclusive.
    pub(crate) exclusive: Option<ConnId>,
    /// Deleted when its last consumer goes.
    pub(crate) auto_delete: bool,
    /// Declaration arguments, as given.
    pub(crate) arguments: FieldTable,
}

/// What a queue's declaration arguments make it do (checked when it is declared).
#[derive(Clone, Debug, Default)]
pub(crate) struct QueueArgs {
    /// `x-message-ttl`, in milliseconds.
    pub(crate) message_ttl: Option<u64>,
    /// `x-dead-letter-exchange` and `x-dead-letter-routing-key`.
    pub(crate) dead_letter: Option<DeadLetterTarget>,
    /// `x-max-length`, `x-max-length-bytes` and `x-overflow`.
    pub(crate) limits: Option<LengthLimits>,
    /// `x-expires`, in milliseconds.
    pub(crate) expires: Option<u64>,
    /// `x-single-active-consumer`: only its longest-standing consumer gets messages.
    pub(crate) single_active_consumer: bool,
    /// `x-max-priority`: a priority queue, with priorities 0 to this.
    pub(crate) max_priority: Option<u8>,
    /// `x-queue-type: quorum`: a quorum queue's behaviour.
    pub(crate) quorum: Option<Quorum>,
}

/// How a delivered message comes back to its queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Return {
    /// The client put it back: nack, reject or recover with requeue.
    Requeued,
    /// Its channel or connection closed with it unacknowledged.
    Released,
}

/// Where a quorum queue's published messages start: positions below are for messages
/// released by closing channels, which go first.
const QUORUM_FIRST_SEQ: u64 = 1 << 63;

/// What sets a quorum queue (`x-queue-type: quorum`) apart, as RabbitMQ 3.10's: a message
/// returned to it counts a delivery and goes to its back (requeued by the client) or front
/// (left unacked by a closing channel); a redelivery carries that count in its
/// `x-delivery-count` header (a basic.get always does); past `x-delivery-limit` returns it is
/// dead-lettered (reason `delivery_limit`) or dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Quorum {
    /// `x-delivery-limit`, if an integer (RabbitMQ ignores any other value).
    pub(crate) delivery_limit: Option<i64>,
}

/// A queue's length limits: of its ready messages (unacknowledged ones do not count), by number
/// and by body bytes, and what a publish past them does.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LengthLimits {
    /// `x-max-length`.
    pub(crate) max_length: Option<u64>,
    /// `x-max-length-bytes`.
    pub(crate) max_bytes: Option<u64>,
    /// `x-overflow`.
    pub(crate) overflow: Overflow,
}

/// What a publish past a queue's length limit does (`x-overflow`, or a policy's `overflow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// The oldest ready messages make room (dead-lettered as `maxlen`): the default.
    DropHead,
    /// The new message is refused (a publisher in confirm mode gets basic.nack).
    RejectPublish,
    /// The same, and the refused message is dead-lettered (`maxlen`).
    RejectPublishDlx,
}

impl Overflow {
    /// From its name: `drop-head`, `reject-publish` or `reject-publish-dlx`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "drop-head" => Some(Overflow::DropHead),
            "reject-publish" => Some(Overflow::RejectPublish),
            "reject-publish-dlx" => Some(Overflow::RejectPublishDlx),
            _ => None,
        }
    }

    /// What `overflow` (the argument's or the policy's) does in a queue: a quorum queue takes
    /// `reject-publish-dlx` as `drop-head`, as RabbitMQ 3.10's do; none is `drop-head`.
    pub(crate) fn of_queue(overflow: Option<Overflow>, quorum: bool) -> Overflow {
        match overflow {
            Some(Overflow::RejectPublishDlx) if quorum => Overflow::DropHead,
            Some(overflow) => overflow,
            None => Overflow::DropHead,
        }
    }

    /// Its name, as `x-overflow` and policies spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

impl LengthLimits {
    /// Whether `len` ready messages of `bytes` body bytes are past the limits.
    fn exceeded(&self, len: usize, bytes: usize) -> bool {
        self.max_length.is_some_and(|max| len as u64 > max)
            || self.max_bytes.is_some_and(|max| bytes as u64 > max)
    }
}

/// What a queue's arguments make it do besides holding messages.
#[derive(Debug)]
struct Extras {
    /// `x-message-ttl`.
    message_ttl: Option<std::time::Duration>,
    /// Where its rejected, expired and overflowing messages go, if anywhere.
    dead_letter: Option<DeadLetterTarget>,
    /// Its length limits.
    limits: Option<LengthLimits>,
    /// How long it may go unused before it is deleted (`x-expires`).
    expires: Option<std::time::Duration>,
    /// When it was last used (declared, read with basic.get, or left by its last consumer).
    used_at: Instant,
    /// Only the first of its consumers (the longest-standing) gets messages.
    single_active_consumer: bool,
    /// A quorum queue's behaviour.
    quorum: Option<Quorum>,
    /// Messages released to a quorum queue's front so far (their positions).
    released: u64,
}

impl Extras {
    /// `None` when the arguments ask for nothing.
    fn of(args: QueueArgs) -> Option<Box<Self>> {
        let QueueArgs {
            message_ttl,
            dead_letter,
            limits,
            expires,
            single_active_consumer,
            max_priority: _,
            quorum,
        } = args;
        if message_ttl.is_none()
            && dead_letter.is_none()
            && limits.is_none()
            && expires.is_none()
            && !single_active_consumer
            && quorum.is_none()
        {
            return None;
        }
        Some(Box::new(Self {
            message_ttl: message_ttl.map(std::time::Duration::from_millis),
            dead_letter,
            limits,
            expires: expires.map(std::time::Duration::from_millis),
            used_at: Instant::now(),
            single_active_consumer,
            quorum,
            released: 0,
        }))
    }
}

/// A queue and its consumers.
#[derive(Debug)]
pub(crate) struct Queue {
    /// Its name.
    pub(crate) name: Arc<str>,
    /// How it was declared.
    pub(crate) options: QueueOptions,
    /// The source of its basic.get deliveries, shared by them.
    get_source: Arc<Source>,
    ready: ReadyMessages,
    next_seq: u64,
    consumers: Vec<Consumer>,
    next_consumer: usize,
    /// Whether it ever had a consumer (auto-delete applies only after the first).
    had_consumer: bool,
    /// Messages delivered and not yet settled, for inspection.
    pub(crate) unacked: usize,
    /// What its arguments make it do besides holding messages; boxed, and `None` for most
    /// queues, so that their publishes check one pointer for all of it.
    extras: Option<Box<Extras>>,
    /// Body bytes of the ready messages, counted only for a queue with `x-max-length-bytes`
    /// (reading each message's length on the way in and out cost 5% of the broker's CPU per
    /// small message).
    ready_bytes: Option<usize>,
    /// Whether a ready message may still pin its read buffer (see [`Queue::keep`]).
    may_pin: bool,
    /// The policy that applies to it, if any (its arguments are already merged in).
    pub(crate) policy: Option<Arc<Policy>>,
}

impl Queue {
    /// An empty queue.
    pub(crate) fn new(name: &str, options: QueueOptions, args: QueueArgs) -> Self {
        let name: Arc<str> = name.into();
        Self {
            ready_bytes: args.limits.as_ref().and_then(|l| l.max_bytes).map(|_| 0),
            ready: ReadyMessages::new(args.max_priority),
            next_seq: if args.quorum.is_some() {
                QUORUM_FIRST_SEQ
            } else {
                0
            },
            extras: Extras::of(args),
            get_source: Source::basic_get(name.clone()),
            name,
            options,
            consumers: Vec::new(),
            next_consumer: 0,
            had_consumer: false,
            unacked: 0,
            may_pin: false,
            policy: None,
        }
    }

    /// Takes the behaviour a policy set or cleared gives it (`args`, its declaration arguments
    /// merged with `policy`), as RabbitMQ applies a policy to a live queue: new length limits
    /// at once (the head over them is dropped when the old or the new overflow is
    /// `drop-head`), a TTL for the messages published from
    /// now on, `expires` counted from now.
    pub(crate) fn reconfigure(
        &mut self,
        args: QueueArgs,
        policy: Option<Arc<Policy>>,
        overflow_until_now: Overflow,
        now: Instant,
        outbox: &mut Outbox,
    ) {
        let released = self.extras.as_ref().map_or(0, |x| x.released);
        self.extras = Extras::of(args);
        if let Some(extras) = &mut self.extras {
            extras.released = released;
        }
        self.ready_bytes = self
            .extras
            .as_ref()
            .and_then(|x| x.limits.as_ref()?.max_bytes)
            .map(|_| self.ready.iter_mut().map(|m| m.message.body().len()).sum());
        self.policy = policy;
        // RabbitMQ 3.10 applies a classic queue's new limits under the overflow it had until
        // now, then the new overflow, which drops the head at once when it is drop-head; a
        // quorum queue looks at the new overflow only.
        let under_old = overflow_until_now == Overflow::DropHead && self.quorum().is_none();
        if under_old || self.overflow() == Overflow::DropHead {
            self.drop_head_over_limit(outbox);
        }
        self.arm_expiry(outbox);
        self.touch(now, outbox);
    }

    /// What a publish past its length limits does now: its limits' overflow, or, with no
    /// limit, what its arguments and policy would give one (RabbitMQ keeps it apart).
    pub(crate) fn overflow(&self) -> Overflow {
        if let Some(limits) = self.extras.as_ref().and_then(|x| x.limits.as_ref()) {
            return limits.overflow;
        }
        let declared = self
            .options
            .arguments
            .inner()
            .get("x-overflow")
            .and_then(crate::methods::queue::string_value)
            .and_then(|name| Overflow::parse(&name));
        let from_policy = self.policy.as_ref().and_then(|p| p.definition.overflow);
        let overflow = if self.quorum().is_some() {
            from_policy.or(declared)
        } else {
            declared.or(from_policy)
        };
        Overflow::of_queue(overflow, self.quorum().is_some())
    }

    /// Takes a published message: straight to a consumer that can take it when nothing is
    /// ready, else appended (after every message of its `priority` or higher, in a priority
    /// queue) and dispatched. A message that a consumer can take at once is
    /// delivered even with a TTL of 0, as RabbitMQ does. Returns false if the queue refused it
    /// (`x-overflow` `reject-publish`: the publisher's confirm is a nack).
    pub(crate) fn publish(
        &mut self,
        message: Message,
        expires_at: Option<Instant>,
        priority: u8,
        now: Instant,
        outbox: &mut Outbox,
    ) -> bool {
        if let Some(extras) = &self.extras
            && let Some(limits) = &extras.limits
            && limits.overflow != Overflow::DropHead
        {
            // A quorum queue refuses a publish once it is over its limits (so it can hold one
            // message more than them), a classic one a publish that would take it over, as
            // RabbitMQ 3.10's do.
            let (len, bytes) = if extras.quorum.is_some() {
                (0, 0)
            } else {
                (1, message.body().len())
            };
            if limits.exceeded(
                self.ready.len() + len,
                self.ready_bytes.unwrap_or(0) + bytes,
            ) {
                if limits.overflow == Overflow::RejectPublishDlx {
                    self.dead_letter(message, DeathReason::Maxlen, outbox);
                }
                return false;
            }
        }
        let seq = self.take_seq();
        let queue_expiry = self
            .extras
            .as_ref()
            .and_then(|x| x.message_ttl)
            .map(|ttl| now + ttl);
        let expires_at = match (expires_at, queue_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let fresh = QueuedMessage {
            seq,
            priority,
            deliveries: 0,
            redelivered: false,
            expires_at,
            message,
        };
        if self.ready.is_empty() {
            // The usual case under load: straight to a consumer that can take it, without
            // a trip through the ready line (whose slot, with many queues, is cold).
            let (n, mixed) = self.takers();
            if let Some((index, peers)) = self.next_taker(n, mixed) {
                self.hand_to(index, peers, mixed, fresh, outbox);
                return true;
            }
        }
        if let Some(bytes) = &mut self.ready_bytes {
            *bytes += fresh.message.body().len();
        }
        self.ready.push_back(fresh);
        // Dispatch drops expired messages only when a consumer can take one; a publish with a
        // TTL drops those at the head too, so they do not pile up in a queue whose consumers
        // are all blocked (or that has none).
        if expires_at.is_some() {
            self.drop_expired_head(now, Some(seq), outbox);
        }
        self.dispatch_inner(now, Some(seq), outbox);
        if let Some(kept) = self.ready.newest_mut(seq, priority) {
            Self::keep(&mut kept.message, &self.consumers, &mut self.may_pin);
        }
        if self.extras.is_some() {
            self.drop_over_limit(outbox);
            self.arm_expiry(outbox);
        }
        true
    }

    /// With `drop-head`, takes the oldest ready messages off (dead-lettering them as `maxlen`)
    /// until the queue is within its limits.
    fn drop_over_limit(&mut self, outbox: &mut Outbox) {
        if let Some(limits) = self.extras.as_ref().and_then(|x| x.limits.as_ref())
            && limits.overflow == Overflow::DropHead
        {
            self.drop_head_over_limit(outbox);
        }
    }

    /// Takes the oldest ready messages off (dead-lettering them as `maxlen`) until the queue
    /// is within its limits, whatever its overflow.
    fn drop_head_over_limit(&mut self, outbox: &mut Outbox) {
        let Some(limits) = self.extras.as_ref().and_then(|x| x.limits.as_ref()) else {
            return;
        };
        while limits.exceeded(self.ready.len(), self.ready_bytes.unwrap_or(0)) {
            let Some(head) = Self::pop_ready(&mut self.ready, &mut self.ready_bytes) else {
                return;
            };
            self.dead_letter(head.message, DeathReason::Maxlen, outbox);
        }
    }

    /// Takes the head ready message, keeping the byte count.
    fn pop_ready(
        ready: &mut ReadyMessages,
        ready_bytes: &mut Option<usize>,
    ) -> Option<QueuedMessage> {
        let head = ready.pop_front()?;
        if let Some(bytes) = ready_bytes {
            *bytes -= head.message.body().len();
        }
        Some(head)
    }

    /// A dead-lettering queue's head message must leave when it expires, whether or not
    /// anything touches the queue then: the outbox tells the vhost's expiry task when.
    fn arm_expiry(&self, outbox: &mut Outbox) {
        if self.has_dead_letter_exchange()
            && let Some(at) = self.ready.front().and_then(|m| m.expires_at)
        {
            outbox.expire_at(at);
        }
    }

    /// Dead-letters (or drops) the expired messages at its head; returns when its head
    /// message expires next, if it dead-letters and that message has a TTL.
    pub(crate) fn expire(&mut self, now: Instant, outbox: &mut Outbox) -> Option<Instant> {
        self.drop_expired_head(now, None, outbox);
        if !self.has_dead_letter_exchange() {
            return None;
        }
        self.ready.front().and_then(|m| m.expires_at)
    }

    /// Whether the expiry task must look at it: it dead-letters or it can expire itself.
    pub(crate) fn has_timers(&self) -> bool {
        self.extras
            .as_ref()
            .is_some_and(|x| x.dead_letter.is_some() || x.expires.is_some())
    }

    /// Whether it has a dead-letter exchange.
    pub(crate) fn has_dead_letter_exchange(&self) -> bool {
        self.extras
            .as_ref()
            .is_some_and(|x| x.dead_letter.is_some())
    }

    /// Notes a use (queue.declare, passive too; basic.get; its last consumer leaving): an
    /// `x-expires` queue without consumers is deleted once unused for that long.
    pub(crate) fn touch(&mut self, now: Instant, outbox: &mut Outbox) {
        let Some(extras) = &mut self.extras else {
            return;
        };
        extras.used_at = now;
        if let Some(at) = self.unused_deadline() {
            outbox.expire_at(at);
        }
    }

    /// When it is to be deleted for want of use (`x-expires`), if it can be: never while it
    /// has consumers.
    pub(crate) fn unused_deadline(&self) -> Option<Instant> {
        let extras = self.extras.as_ref()?;
        let expires = extras.expires?;
        self.consumers.is_empty().then(|| extras.used_at + expires)
    }

    /// Hands a message that leaves the queue for `reason` to its dead-letter exchange, if it
    /// has one; otherwise it is dropped.
    pub(crate) fn dead_letter(&self, message: Message, reason: DeathReason, outbox: &mut Outbox) {
        if let Some(target) = self.extras.as_ref().and_then(|x| x.dead_letter.as_ref()) {
            outbox.dead_letters.push(DeadLetter {
                queue: self.name.clone(),
                target: target.clone(),
                reason,
                message,
                from_quorum: self.quorum().is_some(),
            });
        }
    }

    /// Decides whether a message the queue keeps may go on pinning the read buffer its body
    /// is a slice of ([`Message::unpin`]). With a consumer, it may: the message is on its way
    /// out (waiting for prefetch credit), and its read buffer's neighbours are mostly its own
    /// queue's messages, so copying it would only move the same bytes into colder memory (a
    /// sixth of the broker's CPU per 4 KiB message when a consumer lags behind a publisher).
    /// Without one it could stay for ever, so it gets a buffer of its own; a queue's last
    /// consumer leaving does the same for every ready message ([`Queue::remove_consumer`]).
    fn keep(message: &mut Message, consumers: &[Consumer], may_pin: &mut bool) {
        if consumers.is_empty() {
            message.unpin();
        } else if message.is_pinning() {
            *may_pin = true;
        }
    }

    /// Takes back a delivered message, flagged redelivered: at its original position; in a
    /// quorum queue, one delivery more (dead-lettered instead past its delivery limit), at the
    /// back when the client requeued it, at the front (after others released before it) when
    /// its channel closed, as RabbitMQ 3.10's quorum queues do.
    pub(crate) fn requeue(&mut self, mut message: QueuedMessage, how: Return, outbox: &mut Outbox) {
        message.redelivered = true;
        let Some(quorum) = self.quorum() else {
            self.put_back(message);
            return;
        };
        message.deliveries = message.deliveries.saturating_add(1);
        if quorum
            .delivery_limit
            .is_some_and(|limit| i64::from(message.deliveries) > limit)
        {
            self.dead_letter(message.message, DeathReason::DeliveryLimit, outbox);
            return;
        }
        message.seq = match how {
            // A position after every message there.
            Return::Requeued => self.take_seq(),
            // Below every published message's (they start at `QUORUM_FIRST_SEQ`), above those
            // released before it.
            Return::Released => {
                let extras = self.extras.as_mut().expect("a quorum queue has extras");
                extras.released += 1;
                extras.released - 1
            }
        };
        self.put_back(message);
    }

    /// The next position at the back.
    fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// A quorum queue's behaviour, if it is one.
    pub(crate) fn quorum(&self) -> Option<Quorum> {
        self.extras.as_ref().and_then(|x| x.quorum)
    }

    /// Puts a message that was never written to its consumer back at its original position,
    /// its redelivered flag unchanged: the client never saw it.
    pub(crate) fn put_back(&mut self, mut message: QueuedMessage) {
        Self::keep(&mut message.message, &self.consumers, &mut self.may_pin);
        if let Some(bytes) = &mut self.ready_bytes {
            *bytes += message.message.body().len();
        }
        self.ready.insert_in_place(message);
    }

    /// A delivery dispatched to `source` that never reached the client (its connection,
    /// channel or consumer was gone): back at its position, its redelivered flag unchanged
    /// (the client never saw it), and what dispatch charged for it given back: to this very
    /// consumer, if the queue still has it, and to the channel window it was charged to, never
    /// to a newer consumer or channel that reuses its tag or number.
    pub(crate) fn undo_dispatch(&mut self, source: &Source, no_ack: bool, message: QueuedMessage) {
        if !no_ack {
            self.unacked = self.unacked.saturating_sub(1);
            if let Some(c) = self
                .consumers
                .iter_mut()
                .find(|c| std::ptr::eq(&*c.source, source))
            {
                c.in_flight = c.in_flight.saturating_sub(1);
            }
            source.channel_credit.release();
        }
        self.put_back(message);
    }

    /// Hands ready messages to consumers with credit, round-robin (only to the first consumer
    /// of a single-active-consumer queue).
    /// A queue with length limits first drops what messages put back (requeued, or never
    /// delivered) took over them, as RabbitMQ does before it delivers requeued messages.
    pub(crate) fn dispatch(&mut self, now: Instant, outbox: &mut Outbox) {
        if self.extras.is_some() {
            self.drop_over_limit(outbox);
        }
        self.dispatch_inner(now, None, outbox);
        if self.extras.is_some() {
            self.arm_expiry(outbox);
        }
    }

    fn dispatch_inner(&mut self, now: Instant, fresh: Option<u64>, outbox: &mut Outbox) {
        let (n, mixed) = self.takers();
        while !self.ready.is_empty() {
            let Some((index, peers)) = self.next_taker(n, mixed) else {
                return;
            };
            self.drop_expired_head(now, fresh, outbox);
            let Some(message) = Self::pop_ready(&mut self.ready, &mut self.ready_bytes) else {
                return;
            };
            self.hand_to(index, peers, mixed, message, outbox);
        }
    }

    /// How many consumers may take messages (the first of them), and whether they have more
    /// than one priority.
    fn takers(&self) -> (usize, bool) {
        let n = self.active_consumers();
        // Sorted by priority, so the first and last tell whether there is more than one.
        let mixed = n > 1 && self.consumers[0].priority != self.consumers[n - 1].priority;
        (n, mixed)
    }

    /// Delivers `message` to the consumer at `index` (one of `peers`, those of its priority;
    /// see [`Queue::next_taker`]), charges its credit, and moves the round robin on.
    fn hand_to(
        &mut self,
        index: usize,
        peers: Range<usize>,
        mixed: bool,
        mut message: QueuedMessage,
        outbox: &mut Outbox,
    ) {
        if message.deliveries > 0 {
            message.message = message.message.with_delivery_count(message.deliveries);
        }
        let consumer = &mut self.consumers[index];
        let item = Outbound::Deliver {
            channel: consumer.channel,
            source: consumer.source.clone(),
            no_ack: consumer.no_ack,
            message,
        };
        outbox.send(&consumer.mailbox, item);
        if !consumer.no_ack {
            consumer.in_flight += 1;
            consumer
                .source
                .channel_credit
                .in_flight
                .fetch_add(1, Ordering::Relaxed);
            self.unacked += 1;
        }
        if mixed {
            // Round robin within each priority, whatever the others do: the consumer served
            // goes to the back of its priority (as RabbitMQ does).
            self.consumers[index..peers.end].rotate_left(1);
        } else {
            self.next_consumer = if index + 1 == peers.end {
                peers.start
            } else {
                index + 1
            };
        }
    }

    /// The consumer the next message goes to, and the consumers of its priority: of the first
    /// `n` consumers, one of the highest priority that has credit (`mixed`: they have more than
    /// one priority, and each priority's first is the one to serve next). `None` when none has
    /// credit (a full mailbox, say): the messages, whose memory is likely cold, are not
    /// touched at all.
    fn next_taker(&self, n: usize, mixed: bool) -> Option<(usize, Range<usize>)> {
        if !mixed {
            return self.taker_among(0..n).map(|index| (index, 0..n));
        }
        let mut peers = 0..0;
        while peers.end < n {
            peers.start = peers.end;
            let priority = self.consumers[peers.start].priority;
            peers.end = peers.start
                + self.consumers[peers.start..n]
                    .iter()
                    .take_while(|c| c.priority == priority)
                    .count();
            if let Some(index) = peers.clone().find(|&i| self.consumers[i].can_take()) {
                return Some((index, peers));
            }
        }
        None
    }

    /// Of the consumers `peers`, the first with credit, round robin from `next_consumer` (no
    /// division per step).
    fn taker_among(&self, peers: Range<usize>) -> Option<usize> {
        let start = if peers.contains(&self.next_consumer) {
            self.next_consumer
        } else {
            peers.start
        };
        (start..peers.end)
            .chain(peers.start..start)
            .find(|&i| self.consumers[i].can_take())
    }

    /// Takes the expired messages off its head (all but `keep`, a message being published),
    /// dead-lettering them if it dead-letters.
    fn drop_expired_head(&mut self, now: Instant, keep: Option<u64>, outbox: &mut Outbox) {
        while let Some(head) = self.ready.front() {
            if Some(head.seq) == keep || !head.is_expired(now) {
                return;
            }
            if let Some(expired) = Self::pop_ready(&mut self.ready, &mut self.ready_bytes) {
                self.dead_letter(expired.message, DeathReason::Expired, outbox);
            }
        }
    }

    /// The source of its basic.get deliveries.
    pub(crate) fn get_source(&self) -> Arc<Source> {
        self.get_source.clone()
    }

    /// Takes the head message for basic.get.
    pub(crate) fn get(
        &mut self,
        now: Instant,
        no_ack: bool,
        outbox: &mut Outbox,
    ) -> Option<QueuedMessage> {
        self.drop_expired_head(now, None, outbox);
        let message = Self::pop_ready(&mut self.ready, &mut self.ready_bytes);
        // A new head may expire before anything else was armed.
        self.arm_expiry(outbox);
        let mut message = message?;
        if self.quorum().is_some() {
            message.message = message.message.with_delivery_count(message.deliveries);
        }
        if !no_ack {
            self.unacked += 1;
        }
        Some(message)
    }

    /// Ready messages (expired ones at the head are dropped first).
    pub(crate) fn message_count(&mut self, now: Instant, outbox: &mut Outbox) -> u32 {
        self.drop_expired_head(now, None, outbox);
        self.arm_expiry(outbox);
        self.ready.len() as u32
    }

    /// Drops every ready message; returns how many.
    pub(crate) fn purge(&mut self) -> u32 {
        let n = self.ready.len() as u32;
        self.ready.clear();
        if let Some(bytes) = &mut self.ready_bytes {
            *bytes = 0;
        }
        n
    }

    /// How many of its consumers, from the first, dispatch may send messages to: all, or one
    /// for a single-active-consumer queue (its first consumer: the longest-standing, as
    /// consumers are kept in the order they came).
    pub(crate) fn active_consumers(&self) -> usize {
        let n = self.consumers.len();
        if self.single_active() { n.min(1) } else { n }
    }

    /// Whether only its first consumer gets messages (`x-single-active-consumer`).
    fn single_active(&self) -> bool {
        self.extras
            .as_ref()
            .is_some_and(|x| x.single_active_consumer)
    }

    /// Number of consumers.
    pub(crate) fn consumer_count(&self) -> u32 {
        self.consumers.len() as u32
    }

    /// The consumers.
    pub(crate) fn consumers(&self) -> &[Consumer] {
        &self.consumers
    }

    /// Whether some consumer consumes exclusively.
    pub(crate) fn has_exclusive_consumer(&self) -> bool {
        self.consumers.iter().any(|c| c.exclusive)
    }

    /// Adds a consumer (dispatch is the caller's next step): after those of its priority or
    /// higher, or last in a single-active-consumer queue, whose active consumer is the
    /// longest-standing whatever the priorities (as in RabbitMQ 3.10).
    pub(crate) fn add_consumer(&mut self, consumer: Consumer) {
        self.had_consumer = true;
        let index = if self.single_active() {
            self.consumers.len()
        } else {
            self.consumers
                .partition_point(|c| c.priority >= consumer.priority)
        };
        if index <= self.next_consumer && self.next_consumer < self.consumers.len() {
            self.next_consumer += 1;
        }
        self.consumers.insert(index, consumer);
    }

    /// Removes a consumer; returns it if it was there.
    pub(crate) fn remove_consumer(
        &mut self,
        conn: ConnId,
        channel: u16,
        tag: &str,
    ) -> Option<Consumer> {
        let index = self
            .consumers
            .iter()
            .position(|c| c.conn == conn && c.channel == channel && c.tag() == tag)?;
        let consumer = self.consumers.remove(index);
        if self.consumers.is_empty() && std::mem::take(&mut self.may_pin) {
            for kept in self.ready.iter_mut() {
                kept.message.unpin();
            }
        }
        if self.next_consumer > index {
            self.next_consumer -= 1;
        }
        if self.next_consumer >= self.consumers.len() {
            self.next_consumer = 0;
        }
        Some(consumer)
    }

    /// Whether an auto-delete queue has lost its last consumer.
    pub(crate) fn should_auto_delete(&self) -> bool {
        self.options.auto_delete && self.had_consumer && self.consumers.is_empty()
    }

    /// Settles `n` deliveries from `source` on `conn`'s `channel` (acked, rejected or
    /// requeued): frees their prefetch credit.
    pub(crate) fn settle(&mut self, conn: ConnId, channel: u16, source: &Source, n: u32) {
        self.unacked = self.unacked.saturating_sub(n as usize);
        // By channel and tag, not by consumer: as in RabbitMQ, acks for a cancelled consumer's
        // deliveries free the window of a later consumer that reuses its tag on the channel
        // (tests/tests/work_queue.rs holds both brokers to it).
        // The consumer the deliveries went to is the usual match: compared by address first,
        // so its tag's bytes (likely cold with many queues) are not read.
        if let Some(tag) = source.consumer_tag.as_deref()
            && let Some(c) = self.consumers.iter_mut().find(|c| {
                std::ptr::eq(&*c.source, source)
                    || (c.conn == conn && c.channel == channel && c.tag() == tag)
            })
        {
            c.in_flight = c.in_flight.saturating_sub(n);
        }
    }

    /// Ready messages, for inspection.
    pub(crate) fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Its ready messages, in delivery order (expired ones not yet dropped included).
    pub(crate) fn ready_messages(&self) -> impl Iterator<Item = &QueuedMessage> {
        self.ready.iter()
    }

    /// Takes every consumer (the queue is being deleted).
    pub(crate) fn take_consumers(&mut self) -> Vec<Consumer> {
        std::mem::take(&mut self.consumers)
    }
}

#[cfg(test)]
mod tests {
    use super::{ChannelCredit, Consumer, Queue, QueueOptions, Return, Source};
    use crate::mailbox::{MailboxReceiver, Outbound, Outbox};
    use crate::message::{Message, SHARED_BODY_MIN};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use tokio::time::Instant;

    #[test]
    fn a_kept_message_does_not_pin_its_read_buffer() {
        let mut queue = Queue::new("q", QueueOptions::default(), Default::default());
        let read_buffer = bytes::Bytes::from(vec![7u8; SHARED_BODY_MIN * 4]);
        let message = Message::with_shared_body("", "q", &[], read_buffer.slice(..SHARED_BODY_MIN));
        assert!(message.is_pinning());

        // No consumer: the message stays in the queue, in a buffer of its own.
        let mut outbox = Outbox::default();
        queue.publish(message, None, 0, Instant::now(), &mut outbox);
        let kept = queue
            .get(Instant::now(), true, &mut outbox)
            .expect("the message was kept");
        assert!(!kept.message.is_pinning());
        assert_eq!(kept.message.body(), &read_buffer[..SHARED_BODY_MIN]);

        // Nor does one put back after a delivery.
        let mut delivered = kept;
        delivered.message = Message::with_shared_body(
            "",
            "q",
            &[],
            read_buffer.slice(SHARED_BODY_MIN..SHARED_BODY_MIN * 2),
        );
        assert!(delivered.message.is_pinning());
        queue.requeue(delivered, Return::Requeued, &mut outbox);
        let requeued = queue
            .get(Instant::now(), true, &mut outbox)
            .expect("the message was requeued");
        assert!(requeued.redelivered);
        assert!(!requeued.message.is_pinning());
    }

    #[test]
    fn a_message_waiting_for_a_consumer_stays_pinned_until_the_last_consumer_leaves() {
        let mut queue = Queue::new("q", QueueOptions::default(), Default::default());
        let source = Source::consumer("q".into(), "c".into(), Default::default());
        let (mut consumer, _receiver) = consumer_on(source, 1);
        // Its window is full: what is published now waits in the queue.
        consumer.in_flight = 1;
        queue.add_consumer(consumer);
        let read_buffer = bytes::Bytes::from(vec![7u8; SHARED_BODY_MIN * 2]);
        for half in [0..SHARED_BODY_MIN, SHARED_BODY_MIN..SHARED_BODY_MIN * 2] {
            let message = Message::with_shared_body("", "q", &[], read_buffer.slice(half));
            queue.publish(message, None, 0, Instant::now(), &mut Outbox::default());
        }
        assert_eq!(queue.ready_len(), 2);
        assert!(queue.ready.iter_mut().all(|kept| kept.message.is_pinning()));

        // Nobody may ever take them now: each gets a buffer of its own.
        assert!(queue.remove_consumer(1, 1, "c").is_some());
        assert!(
            queue
                .ready
                .iter_mut()
                .all(|kept| !kept.message.is_pinning())
        );
        let bodies: Vec<_> = queue
            .ready
            .iter_mut()
            .map(|kept| kept.message.body())
            .collect();
        assert_eq!(
            bodies,
            [
                &read_buffer[..SHARED_BODY_MIN],
                &read_buffer[SHARED_BODY_MIN..]
            ]
        );
    }

    fn consumer_on(source: Arc<Source>, prefetch: u32) -> (Consumer, MailboxReceiver) {
        let (mailbox, receiver) = crate::mailbox::mailbox();
        let consumer = Consumer {
            source,
            conn: 1,
            channel: 1,
            no_ack: false,
            exclusive: false,
            priority: 0,
            prefetch,
            in_flight: 0,
            mailbox,
        };
        (consumer, receiver)
    }

    fn publish_n(queue: &mut Queue, n: usize) -> Vec<Outbound> {
        let mut outbox = Outbox::default();
        for _ in 0..n {
            let message = crate::message::MessageBuilder::new("", "q", &[], 0).finish();
            queue.publish(message, None, 0, Instant::now(), &mut outbox);
        }
        outbox.flush()
    }

    fn drain(receiver: &mut MailboxReceiver) -> Vec<Outbound> {
        std::iter::from_fn(|| receiver.try_recv()).collect()
    }

    /// Deliveries to a cancelled consumer still in its connection's mailbox come back after
    /// a new consumer took its tag on a channel reopened under the same number: they must
    /// give back what they were charged for, not free the new consumer's windows (it would
    /// then hold more unacknowledged deliveries than its prefetch).
    #[test]
    fn an_undelivered_return_frees_only_the_window_it_was_charged_to() {
        let mut queue = Queue::new("q", QueueOptions::default(), Default::default());
        let old_window = Arc::new(ChannelCredit::default());
        let old = Source::consumer("q".into(), "t".into(), old_window.clone());
        let (consumer, mut old_receiver) = consumer_on(old.clone(), 10);
        queue.add_consumer(consumer);
        assert!(publish_n(&mut queue, 10).is_empty());
        let stale = drain(&mut old_receiver);
        assert_eq!(stale.len(), 10);
        assert_eq!(old_window.in_flight.load(Ordering::Relaxed), 10);

        // The channel closes and is reopened: a new window, a new consumer with the same tag
        // (and a global prefetch of 10).
        assert!(queue.remove_consumer(1, 1, "t").is_some());
        old.detach();
        let new_window = Arc::new(ChannelCredit::default());
        new_window.limit.store(10, Ordering::Relaxed);
        let new = Source::consumer("q".into(), "t".into(), new_window.clone());
        let (consumer, mut new_receiver) = consumer_on(new, 10);
        queue.add_consumer(consumer);
        assert!(publish_n(&mut queue, 20).is_empty());
        assert_eq!(drain(&mut new_receiver).len(), 10);

        for item in stale {
            let Outbound::Deliver {
                source,
                no_ack,
                message,
                ..
            } = item
            else {
                panic!("a delivery");
            };
            queue.undo_dispatch(&source, no_ack, message);
        }
        let mut outbox = Outbox::default();
        queue.dispatch(Instant::now(), &mut outbox);
        assert!(outbox.flush().is_empty());
        assert_eq!(
            drain(&mut new_receiver).len(),
            0,
            "the new consumer's windows are full"
        );
        assert_eq!(queue.consumers[0].in_flight, 10);
        assert_eq!(new_window.in_flight.load(Ordering::Relaxed), 10);
        assert_eq!(old_window.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!((queue.ready_len(), queue.unacked), (20, 10));
        // Put back at their places, ahead of the ten never delivered.
        assert!(queue.ready_messages().take(10).all(|m| !m.redelivered));
    }
}
