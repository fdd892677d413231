//! A published message as the broker keeps it: the content header's property bytes exactly as
//! received, the body, and the few decoded facts routing and expiry need.

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

/// An immutable published message. Exchange name, routing key, property bytes (as received)
/// and body sit back to back in one buffer, so a queued message costs one allocation; the
/// queues it was routed to share that buffer (a clone counts a reference, the first one also
/// allocates the count).
#[derive(Clone, Debug)]
pub(crate) struct Message {
    data: Bytes,
    exchange_len: u8,
    routing_key_len: u8,
    properties_len: u32,
}

impl Message {
    fn text(bytes: &[u8]) -> &str {
        // Both were short strings, so valid UTF-8; an empty string cannot happen otherwise.
        std::str::from_utf8(bytes).unwrap_or_default()
    }

    /// The exchange it was published to.
    pub(crate) fn exchange(&self) -> &str {
        Self::text(self.exchange_bytes())
    }

    /// The routing key it was published with.
    pub(crate) fn routing_key(&self) -> &str {
        Self::text(self.routing_key_bytes())
    }

    /// The exchange's bytes, for writing it out (no UTF-8 check, unlike [`Self::exchange`]).
    pub(crate) fn exchange_bytes(&self) -> &[u8] {
        &self.data[..self.exchange_len as usize]
    }

    /// The routing key's bytes, likewise.
    pub(crate) fn routing_key_bytes(&self) -> &[u8] {
        let start = self.exchange_len as usize;
        &self.data[start..start + self.routing_key_len as usize]
    }

    /// Property flags and list, as received.
    pub(crate) fn properties(&self) -> &[u8] {
        let start = self.exchange_len as usize + self.routing_key_len as usize;
        &self.data[start..start + self.properties_len as usize]
    }

    /// The first byte of its buffer (0 if empty), to bring it into cache.
    pub(crate) fn first_byte(&self) -> u8 {
        self.data.first().copied().unwrap_or(0)
    }

    /// Bytes it holds: exchange, routing key, properties and body.
    pub(crate) fn size(&self) -> usize {
        self.data.len()
    }

    /// The whole body.
    pub(crate) fn body(&self) -> &[u8] {
        &self.data[self.body_start()..]
    }

    /// Part of the body, sharing the message's buffer.
    pub(crate) fn body_slice(&self, range: std::ops::Range<usize>) -> Bytes {
        let start = self.body_start();
        self.data.slice(start + range.start..start + range.end)
    }

    fn body_start(&self) -> usize {
        self.exchange_len as usize + self.routing_key_len as usize + self.properties_len as usize
    }
}

/// Largest initial reservation for a body: a client announcing a huge body must send it
/// before the broker holds that much memory for it.
const MAX_RESERVE: usize = 1 << 20;

/// A message whose body is arriving frame by frame.
#[derive(Debug)]
pub(crate) struct MessageBuilder {
    data: BytesMut,
    exchange_len: u8,
    routing_key_len: u8,
    properties_len: u32,
    body_size: u64,
    body_len: u64,
    overflowed: bool,
}

impl MessageBuilder {
    /// Starts a message from its publish method and content header.
    pub(crate) fn new(
        exchange: &str,
        routing_key: &str,
        properties: &[u8],
        body_size: u64,
    ) -> Self {
        let head = exchange.len() + routing_key.len() + properties.len();
        let mut data = BytesMut::with_capacity(head + (body_size as usize).min(MAX_RESERVE));
        data.extend_from_slice(exchange.as_bytes());
        data.extend_from_slice(routing_key.as_bytes());
        data.extend_from_slice(properties);
        Self {
            data,
            exchange_len: exchange.len() as u8,
            routing_key_len: routing_key.len() as u8,
            properties_len: properties.len() as u32,
            body_size,
            body_len: 0,
            overflowed: false,
        }
    }

    /// A body frame went past the declared size: the message can never complete.
    pub(crate) fn overflow(&mut self) {
        self.overflowed = true;
    }

    /// Whether a body frame went past the declared size.
    pub(crate) fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Body bytes still expected.
    pub(crate) fn remaining(&self) -> u64 {
        self.body_size - self.body_len
    }

    /// Appends a body frame's payload (the caller checks it fits in [`Self::remaining`]).
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.data.extend_from_slice(chunk);
        self.body_len += chunk.len() as u64;
    }

    /// The finished message (TTL not yet applied).
    pub(crate) fn finish(self) -> Message {
        Message {
            data: self.data.freeze(),
            exchange_len: self.exchange_len,
            routing_key_len: self.routing_key_len,
            properties_len: self.properties_len,
        }
    }
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
    pub(crate) message: Message,
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
    fn a_message_keeps_its_parts_in_one_buffer() {
        let mut builder = super::MessageBuilder::new("amq.direct", "jobs", &[0x10, 0], 5);
        builder.push(b"he");
        assert_eq!(builder.remaining(), 3);
        builder.push(b"llo");
        let message = builder.finish();
        assert_eq!(message.exchange(), "amq.direct");
        assert_eq!(message.routing_key(), "jobs");
        assert_eq!(message.properties(), &[0x10, 0]);
        assert_eq!(message.body(), b"hello");
    }

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
