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
    /// When it expires in this queue: the earlier of its own TTL and the queue's.
    pub(crate) expires_at: Option<Instant>,
    /// The message itself.
    pub(crate) message: Arc<Message>,
}

impl QueuedMessage {
    /// Whether its TTL has run out at `now`.
    pub(crate) fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// The longest TTL RabbitMQ accepts: ten years, in milliseconds.
pub(crate) const MAX_TTL_MS: u64 = 315_360_000_000;

/// Parses the `expiration` property as RabbitMQ does: an optionally signed decimal integer of
/// milliseconds, from 0 to ten years. The error is the detail of RabbitMQ's 406, in its words.
pub(crate) fn parse_expiration(value: &str) -> Result<u64, String> {
    let invalid = |reason: String| format!("invalid expiration '{value}': {reason}");
    let digits_start = usize::from(value.starts_with(['+', '-']));
    let digits_len = value[digits_start..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    if digits_len == 0 {
        return Err(invalid("no_integer".into()));
    }
    let end = digits_start + digits_len;
    if end < value.len() {
        return Err(invalid(format!(
            "{{leftover_string,\"{}\"}}",
            &value[end..]
        )));
    }
    let number: i128 = value[digits_start..end]
        .parse::<i128>()
        .unwrap_or(i128::MAX);
    let number = if value.starts_with('-') {
        -number
    } else {
        number
    };
    if number < 0 {
        return Err(invalid(format!("{{value_negative,{number}}}")));
    }
    if number > MAX_TTL_MS as i128 {
        return Err(invalid(format!("{{value_too_large,{number}}}")));
    }
    Ok(number as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_expiration;

    #[test]
    fn expiration_must_be_a_non_negative_integer() {
        assert_eq!(parse_expiration("0"), Ok(0));
        assert_eq!(parse_expiration("60000"), Ok(60_000));
        assert_eq!(parse_expiration("+5"), Ok(5));
        assert_eq!(parse_expiration("0100"), Ok(100));
        assert_eq!(parse_expiration("315360000000"), Ok(315_360_000_000));
        let err = |v| parse_expiration(v).unwrap_err();
        assert_eq!(err("abc"), "invalid expiration 'abc': no_integer");
        assert_eq!(err(""), "invalid expiration '': no_integer");
        assert_eq!(err(" 100"), "invalid expiration ' 100': no_integer");
        assert_eq!(err("-1"), "invalid expiration '-1': {value_negative,-1}");
        assert_eq!(
            err("1.5"),
            "invalid expiration '1.5': {leftover_string,\".5\"}"
        );
        assert_eq!(
            err("315360000001"),
            "invalid expiration '315360000001': {value_too_large,315360000001}"
        );
    }
}
