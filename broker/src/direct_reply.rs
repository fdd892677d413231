//! Direct reply-to, as RabbitMQ does it: a client consumes (no-ack) from the pseudo-queue
//! `amq.rabbitmq.reply-to` and publishes requests with that `reply_to`; the broker rewrites it
//! to an address naming the consuming channel, and replies published to that address go
//! straight to the consumer, through no queue.

use crate::mailbox::Mailbox;

/// The pseudo-queue a client consumes from.
pub(crate) const PSEUDO_QUEUE: &str = "amq.rabbitmq.reply-to";
/// Prefix of the reply addresses the broker hands out.
pub(crate) const ADDRESS_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// A channel consuming its direct replies.
#[derive(Debug)]
pub(crate) struct ReplyConsumer {
    /// The consuming connection's mailbox.
    pub(crate) mailbox: Mailbox,
    /// Its channel.
    pub(crate) channel: u16,
    /// The pseudo-queue and its consumer tag, as its deliveries carry them.
    pub(crate) source: std::sync::Arc<crate::queue::Source>,
}

/// A fresh reply address.
pub(crate) fn new_address() -> String {
    format!("{ADDRESS_PREFIX}{}", uuid::Uuid::new_v4().simple())
}
