//! A published message as the broker keeps it: the content header's property bytes exactly as
//! received, the body, and the few decoded facts routing and expiry need.

use amq_protocol::types::ShortString;
use bytes::Bytes;
use std::sync::Arc;
use tokio::time::Instant;

/// An immutable published message, shared (`Arc`) by every queue it was routed to.
#[derive(Debug)]
pub(crate) struct Message {
    /// Exchange it was published to (reported in deliveries).
    pub(crate) exchange: ShortString,
    /// Routing key it was published with (reported in deliveries).
    pub(crate) routing_key: ShortString,
    /// Property flags and property list, as received.
    pub(crate) properties: Bytes,
    /// The whole body.
    pub(crate) body: Bytes,
    /// When the per-message TTL (`expiration`) runs out, if it has one.
    pub(crate) expires_at: Option<Instant>,
}

/// A message in a queue: its position (for requeueing in place) and redelivery flag.
#[derive(Clone, Debug)]
pub(crate) struct QueuedMessage {
    /// Position in its queue; requeued messages go back to their original position.
    pub(crate) seq: u64,
    /// Whether it was delivered before.
    pub(crate) redelivered: bool,
    /// The message itself.
    pub(crate) message: Arc<Message>,
}

impl QueuedMessage {
    /// Whether its TTL has run out at `now`.
    pub(crate) fn is_expired(&self, now: Instant) -> bool {
        self.message.expires_at.is_some_and(|at| at <= now)
    }
}

/// Parses the `expiration` property as RabbitMQ does: a non-negative decimal integer of
/// milliseconds. The error is the detail of RabbitMQ's 406.
pub(crate) fn parse_expiration(value: &str) -> Result<u64, String> {
    match value.parse::<i64>() {
        Ok(ms) if ms >= 0 => Ok(ms as u64),
        Ok(ms) => Err(format!(
            "invalid expiration '{value}': {{value_negative,{ms}}}"
        )),
        Err(_) => Err(format!(
            "invalid expiration '{value}': {{error,no_integer}}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_expiration;

    #[test]
    fn expiration_must_be_a_non_negative_integer() {
        assert_eq!(parse_expiration("0"), Ok(0));
        assert_eq!(parse_expiration("60000"), Ok(60_000));
        assert!(parse_expiration("-1").is_err());
        assert!(parse_expiration("1.5").is_err());
        assert!(parse_expiration("").is_err());
        assert!(parse_expiration("abc").is_err());
    }
}
