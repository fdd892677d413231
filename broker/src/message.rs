//! A published message as the broker keeps it: the content header's property bytes exactly as
//! received, the body, and the few decoded facts routing and expiry need.

use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::BasicProperties;
use amq_protocol::protocol::basic::{gen_properties, parse_properties};
use amq_protocol::types::AMQPValue;
use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

/// An immutable published message. Exchange name, routing key, property bytes (as received)
/// and body sit back to back in one buffer ([`Storage`]): inside the message itself when they
/// are small ([`INLINE_MAX`] bytes in all), so that such a message costs no allocation, and
/// otherwise in one buffer of its own that the queues it was routed to share (a clone counts a
/// reference, the first one also allocates the count).
///
/// A large body that arrived in one frame is not copied: it stays a slice of the connection's
/// read buffer ([`MessageBuilder::wants_shared`]), and the rest sits in a small `head` of its
/// own. Such a message pins the read buffer it came in, so a queue that keeps it where no
/// consumer will take it calls [`Message::unpin`] to copy it into a buffer of its own.
#[derive(Clone, Debug)]
pub(crate) struct Message {
    storage: Storage,
    exchange_len: u8,
    routing_key_len: u8,
    properties_len: u32,
    /// Bytes of its `BCC` keys (see [`MessageBuilder::with_bcc`]), after the properties.
    bcc_len: u16,
}

/// Where a message's bytes are.
#[derive(Clone, Debug)]
enum Storage {
    /// Up to [`INLINE_MAX`] bytes, in the message: nothing to allocate when it is published,
    /// nothing to free (and no cold heap memory to touch) when its last delivery is acked.
    Inline(InlineBytes),
    /// Exchange, routing key, properties and body in one buffer.
    Heap(Bytes),
    /// A body that is a slice of a read buffer, and the rest in a head of its own.
    Shared { body: Bytes, head: Box<[u8]> },
}

/// Most bytes (exchange, routing key, properties, `BCC` keys and body together) a message
/// keeps inside itself: a 16-byte body published to the default exchange with a routing key
/// of up to 44 bytes and no properties fits. Chosen so that [`Storage`] is 64 bytes.
pub(crate) const INLINE_MAX: usize = 62;

/// Up to [`INLINE_MAX`] bytes held by value: a message's bytes, kept inline.
#[derive(Clone, Debug)]
struct InlineBytes {
    len: u8,
    bytes: [u8; INLINE_MAX],
}

impl InlineBytes {
    const EMPTY: Self = Self {
        len: 0,
        bytes: [0; INLINE_MAX],
    };

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// Whether `more` bytes would still fit.
    fn has_room(&self, more: usize) -> bool {
        self.len as usize + more <= INLINE_MAX
    }

    /// Appends `more` (the caller checked [`Self::has_room`]).
    fn push(&mut self, more: &[u8]) {
        let at = self.len as usize;
        self.bytes[at..at + more.len()].copy_from_slice(more);
        self.len += more.len() as u8;
    }
}

// What a queued message costs counts against issue 6's memory target (under 200 B of overhead
// per message): Message has no padding left; QueuedMessage's fields fill its padding.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(
    std::mem::size_of::<Storage>() == 64
        && std::mem::size_of::<Message>() == 72
        && std::mem::size_of::<QueuedMessage>() == 104
);

/// Smallest body kept as a slice of the read buffer rather than copied: below it, copying
/// costs less than the slice's bookkeeping. It also bounds what a message can pin: its read
/// buffer (at most 128 KiB of read room besides its own frame) is at most about 64 times its
/// size. Only messages on their way out pin: delivered and unacked, or waiting in a queue that
/// has a consumer; a queue without consumers keeps nothing pinned (`Queue::keep`).
pub(crate) const SHARED_BODY_MIN: usize = 2048;

impl Message {
    fn text(bytes: &[u8]) -> &str {
        // Both were short strings, so valid UTF-8; an empty string cannot happen otherwise.
        std::str::from_utf8(bytes).unwrap_or_default()
    }

    /// Exchange, routing key and properties, back to back, then the `BCC` keys and the body
    /// unless the body is shared.
    fn head(&self) -> &[u8] {
        match &self.storage {
            Storage::Inline(inline) => inline.as_slice(),
            Storage::Heap(data) => data,
            Storage::Shared { head, .. } => head,
        }
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
        &self.head()[..self.exchange_len as usize]
    }

    /// The routing key's bytes, likewise.
    pub(crate) fn routing_key_bytes(&self) -> &[u8] {
        let start = self.exchange_len as usize;
        &self.head()[start..start + self.routing_key_len as usize]
    }

    /// Property flags and list, as received.
    pub(crate) fn properties(&self) -> &[u8] {
        let start = self.exchange_len as usize + self.routing_key_len as usize;
        &self.head()[start..start + self.properties_len as usize]
    }

    /// The keys its `BCC` header added to its routing key (the header itself is gone): a dead
    /// letter is routed with them too, as RabbitMQ does.
    pub(crate) fn bcc_keys(&self) -> impl Iterator<Item = &str> {
        let start = self.exchange_len as usize
            + self.routing_key_len as usize
            + self.properties_len as usize;
        let mut rest = &self.head()[start..start + self.bcc_len as usize];
        std::iter::from_fn(move || {
            let (&len, tail) = rest.split_first()?;
            let (key, tail) = tail.split_at(len as usize);
            rest = tail;
            Some(Self::text(key))
        })
    }

    /// The first byte of its heap buffer (0 if it has none, or it is empty), to bring that
    /// buffer into cache.
    pub(crate) fn first_byte(&self) -> u8 {
        match &self.storage {
            Storage::Inline(_) => 0,
            _ => self.head().first().copied().unwrap_or(0),
        }
    }

    /// Bytes it holds outside itself: exchange, routing key, properties and body, unless it
    /// keeps them inline.
    pub(crate) fn heap_size(&self) -> usize {
        match &self.storage {
            Storage::Inline(_) => 0,
            Storage::Heap(data) => data.len(),
            Storage::Shared { body, head } => head.len() + body.len(),
        }
    }

    /// The whole body.
    pub(crate) fn body(&self) -> &[u8] {
        match &self.storage {
            Storage::Shared { body, .. } => body,
            _ => &self.head()[self.body_start()..],
        }
    }

    /// Part of the body, sharing the message's buffer (copied from a message kept inline,
    /// whose body is too small for the caller to want a slice of it).
    pub(crate) fn body_slice(&self, range: std::ops::Range<usize>) -> Bytes {
        match &self.storage {
            Storage::Inline(_) => Bytes::copy_from_slice(&self.body()[range]),
            Storage::Heap(data) => {
                let start = self.body_start();
                data.slice(start + range.start..start + range.end)
            }
            Storage::Shared { body, .. } => body.slice(range),
        }
    }

    /// Where the body starts in [`Self::head`] (the head holds the body unless it is shared).
    fn body_start(&self) -> usize {
        self.exchange_len as usize
            + self.routing_key_len as usize
            + self.properties_len as usize
            + self.bcc_len as usize
    }

    /// The same message with an `x-delivery-count` header of `count` (a long long, as
    /// RabbitMQ's quorum queues send it), replacing any it had; the body is copied. `self`
    /// unchanged if its properties cannot be read (they were checked when it was published).
    pub(crate) fn with_delivery_count(&self, count: u32) -> Message {
        let Ok((_, properties)) = parse_properties(self.properties()) else {
            return self.clone();
        };
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-delivery-count".into(),
            AMQPValue::LongLongInt(count.into()),
        );
        let raw = encode_properties(&properties.with_headers(headers));
        let body = self.body();
        let mut builder =
            MessageBuilder::new(self.exchange(), self.routing_key(), &raw, body.len() as u64);
        builder.with_bcc(self.bcc_keys());
        builder.push(body);
        builder.finish()
    }

    /// Whether its body is a slice of a read buffer (see [`Message::unpin`]).
    pub(crate) fn is_pinning(&self) -> bool {
        matches!(self.storage, Storage::Shared { .. })
    }

    /// A message whose body is `body`, kept as a slice as a large body frame's payload is.
    #[cfg(test)]
    pub(crate) fn with_shared_body(
        exchange: &str,
        routing_key: &str,
        properties: &[u8],
        body: Bytes,
    ) -> Self {
        let mut builder = MessageBuilder::new(exchange, routing_key, properties, body.len() as u64);
        assert!(builder.wants_shared(body.len()));
        builder.push_shared(body);
        builder.finish()
    }

    /// Copies a shared body and the head into one buffer of its own, so that a message that
    /// stays queued does not keep the whole read buffer it came in alive. A no-op for a
    /// message that has its own buffer already.
    pub(crate) fn unpin(&mut self) {
        let Storage::Shared { body, head } = &self.storage else {
            return;
        };
        let mut data = BytesMut::with_capacity(head.len() + body.len());
        data.extend_from_slice(head);
        data.extend_from_slice(body);
        self.storage = Storage::Heap(data.freeze());
    }
}

/// Largest initial reservation for a body: a client announcing a huge body must send it
/// before the broker holds that much memory for it.
const MAX_RESERVE: usize = 1 << 20;

/// A message whose body is arriving frame by frame.
#[derive(Debug)]
pub(crate) struct MessageBuilder {
    data: Building,
    /// A body that came whole in one frame of at least [`SHARED_BODY_MIN`] bytes.
    shared_body: Option<Bytes>,
    exchange_len: u8,
    routing_key_len: u8,
    properties_len: u32,
    bcc_len: u16,
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
        // A large body will likely come whole in one frame and be shared: room is made for
        // it only if it comes in pieces after all (see `push`).
        let body_room = if Self::is_large(body_size) {
            0
        } else {
            body_size as usize
        };
        let mut data = Building::with_capacity(head + body_room);
        data.extend(exchange.as_bytes());
        data.extend(routing_key.as_bytes());
        data.extend(properties);
        Self {
            data,
            shared_body: None,
            exchange_len: exchange.len() as u8,
            routing_key_len: routing_key.len() as u8,
            properties_len: properties.len() as u32,
            bcc_len: 0,
            body_size,
            body_len: 0,
            overflowed: false,
        }
    }

    /// Keeps the keys a `BCC` header added (before any body is pushed), each as a length
    /// byte and its bytes. A key longer than 255 bytes is left out (no binding key or queue
    /// name is that long, so it routes nothing), and keys past 64 KiB in all.
    pub(crate) fn with_bcc<'k>(&mut self, keys: impl IntoIterator<Item = &'k str>) {
        debug_assert_eq!(self.body_len, 0, "BCC keys go before the body");
        for key in keys {
            let Ok(len) = u8::try_from(key.len()) else {
                continue;
            };
            let Some(total) = (self.bcc_len as usize + 1 + key.len()).try_into().ok() else {
                break;
            };
            self.data.extend(&[len]);
            self.data.extend(key.as_bytes());
            self.bcc_len = total;
        }
    }

    fn is_large(body_size: u64) -> bool {
        body_size >= SHARED_BODY_MIN as u64
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

    /// Whether a body frame of `len` bytes would be the whole of a large body: then the
    /// caller hands it over with [`Self::push_shared`] rather than [`Self::push`].
    pub(crate) fn wants_shared(&self, len: usize) -> bool {
        self.body_len == 0
            && !self.overflowed
            && len as u64 == self.body_size
            && Self::is_large(self.body_size)
    }

    /// Appends a body frame's payload (the caller checks it fits in [`Self::remaining`]).
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        if self.body_len == 0 && Self::is_large(self.body_size) {
            self.data
                .reserve((self.body_size as usize).min(MAX_RESERVE));
        }
        self.data.extend(chunk);
        self.body_len += chunk.len() as u64;
    }

    /// Takes the whole body as a slice of the read buffer (see [`Self::wants_shared`]).
    pub(crate) fn push_shared(&mut self, body: Bytes) {
        debug_assert!(self.wants_shared(body.len()));
        self.body_len = body.len() as u64;
        self.shared_body = Some(body);
    }

    /// The finished message (TTL not yet applied).
    pub(crate) fn finish(self) -> Message {
        let storage = match (self.shared_body, self.data) {
            (Some(body), data) => Storage::Shared {
                body,
                head: data.into_boxed_slice(),
            },
            (None, Building::Inline(inline)) => Storage::Inline(inline),
            (None, Building::Heap(data)) => Storage::Heap(data.freeze()),
        };
        Message {
            storage,
            exchange_len: self.exchange_len,
            routing_key_len: self.routing_key_len,
            properties_len: self.properties_len,
            bcc_len: self.bcc_len,
        }
    }
}

/// A message's bytes as they arrive: inside the builder while they fit in [`INLINE_MAX`], then
/// in a buffer of their own.
#[derive(Debug)]
enum Building {
    Inline(InlineBytes),
    Heap(BytesMut),
}

impl Building {
    /// Room for `capacity` bytes.
    fn with_capacity(capacity: usize) -> Self {
        if capacity <= INLINE_MAX {
            Self::Inline(InlineBytes::EMPTY)
        } else {
            Self::Heap(BytesMut::with_capacity(capacity))
        }
    }

    /// Appends `more`, moving to a buffer of its own if it no longer fits inline.
    fn extend(&mut self, more: &[u8]) {
        self.reserve(more.len());
        match self {
            Self::Inline(inline) => inline.push(more),
            Self::Heap(data) => data.extend_from_slice(more),
        }
    }

    /// Makes room for `additional` more bytes: a buffer of its own, holding what was inline,
    /// once they no longer fit inline.
    fn reserve(&mut self, additional: usize) {
        match self {
            Self::Inline(inline) if !inline.has_room(additional) => {
                let kept = inline.as_slice();
                let mut heap = BytesMut::with_capacity(kept.len() + additional);
                heap.extend_from_slice(kept);
                *self = Self::Heap(heap);
            }
            Self::Inline(_) => {}
            Self::Heap(data) => data.reserve(additional),
        }
    }

    fn into_boxed_slice(self) -> Box<[u8]> {
        match self {
            Self::Inline(inline) => Box::from(inline.as_slice()),
            Self::Heap(data) => Vec::from(data).into_boxed_slice(),
        }
    }
}

/// A message in a queue: its position (for requeueing in place) and redelivery flag.
#[derive(Clone, Debug)]
pub(crate) struct QueuedMessage {
    /// Position in its queue; requeued messages go back to their original position.
    pub(crate) seq: u64,
    /// Its `priority` property (0 if none), which orders it in a priority queue.
    pub(crate) priority: u8,
    /// Times a quorum queue had it back from a consumer (RabbitMQ's delivery count); always 0
    /// in a classic queue.
    pub(crate) deliveries: u32,
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
/// Content header property bytes (flags and list) for `properties`, as a message keeps them:
/// for a message whose properties the broker changes (direct reply-to, `BCC`, dead letters).
pub(crate) fn encode_properties(properties: &BasicProperties) -> Vec<u8> {
    match gen_properties(properties)(WriteContext::from(Vec::new())) {
        Ok(ctx) => ctx.into_inner().0,
        Err(e) => unreachable!("serialising into a Vec cannot fail: {e}"),
    }
}

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
    use amq_protocol::protocol::basic::parse_properties;
    use amq_protocol::types::AMQPValue;

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
    fn bcc_keys_are_kept_between_the_properties_and_the_body_whatever_the_body() {
        let long = "x".repeat(300);
        let keys = ["audit", long.as_str(), "", "archive"];
        let mut small = super::MessageBuilder::new("ex", "rk", &[0, 0], 5);
        small.with_bcc(keys);
        small.push(b"hello");
        let small = small.finish();
        let read_buffer = bytes::Bytes::from(vec![7u8; super::SHARED_BODY_MIN * 2]);
        let mut large =
            super::MessageBuilder::new("ex", "rk", &[0, 0], super::SHARED_BODY_MIN as u64);
        large.with_bcc(keys);
        large.push_shared(read_buffer.slice(..super::SHARED_BODY_MIN));
        let mut large = large.finish();
        let mut unpinned = large.clone();
        unpinned.unpin();
        for (message, body) in [
            (&small, &b"hello"[..]),
            (&large, &read_buffer[..super::SHARED_BODY_MIN]),
            (&unpinned, &read_buffer[..super::SHARED_BODY_MIN]),
        ] {
            // The key over 255 bytes routes nothing and is not kept.
            assert_eq!(
                message.bcc_keys().collect::<Vec<_>>(),
                ["audit", "", "archive"]
            );
            assert_eq!(message.properties(), &[0, 0]);
            assert_eq!(message.body(), body);
        }
        large = large.with_delivery_count(2);
        assert_ne!(large.properties(), &[0, 0], "the copy has the count header");
        assert_eq!(large.bcc_keys().count(), 3, "a redelivery copy keeps them");
        assert_eq!(large.body(), &read_buffer[..super::SHARED_BODY_MIN]);
    }

    #[test]
    fn a_large_body_in_one_frame_is_shared_until_unpinned() {
        let read_buffer = bytes::Bytes::from((0..10_000).map(|i| i as u8).collect::<Vec<_>>());
        let body = read_buffer.slice(100..100 + super::SHARED_BODY_MIN);
        let properties = [0x10, 0];
        let mut message = super::Message::with_shared_body("", "jobs", &properties, body.clone());
        let same_parts = |message: &super::Message| {
            assert_eq!(message.routing_key(), "jobs");
            assert_eq!(message.properties(), &properties);
            assert_eq!(message.body(), &body[..]);
            assert_eq!(
                message.heap_size(),
                "jobs".len() + properties.len() + body.len()
            );
            assert_eq!(message.body_slice(10..20), body.slice(10..20));
        };
        assert!(message.is_pinning());
        assert_eq!(
            message.body().as_ptr(),
            body.as_ptr(),
            "the body was copied"
        );
        same_parts(&message);

        message.unpin();
        assert!(!message.is_pinning());
        assert_ne!(
            message.body().as_ptr(),
            body.as_ptr(),
            "still in the read buffer"
        );
        same_parts(&message);
    }

    #[test]
    fn small_bodies_and_bodies_in_pieces_are_copied() {
        let small = super::MessageBuilder::new("", "q", &[], super::SHARED_BODY_MIN as u64 - 1);
        assert!(!small.wants_shared(super::SHARED_BODY_MIN - 1));

        let size = super::SHARED_BODY_MIN * 2;
        let mut pieces = super::MessageBuilder::new("", "q", &[], size as u64);
        assert!(
            !pieces.wants_shared(size / 2),
            "half a body is not the body"
        );
        pieces.push(&vec![1; size / 2]);
        assert!(!pieces.wants_shared(size / 2));
        pieces.push(&vec![2; size / 2]);
        let message = pieces.finish();
        assert!(matches!(message.storage, super::Storage::Heap(_)));
        assert!(!message.is_pinning());
        assert_eq!(message.body().len(), size);
        assert_eq!(message.body()[size / 2], 2);
    }

    #[test]
    fn a_small_message_is_kept_inline_and_a_larger_one_on_the_heap() {
        use super::{INLINE_MAX, MessageBuilder, Storage};
        let properties = [0x10, 0];
        // The routing key, properties and body fill the inline room exactly, then one byte more.
        for (body_len, inline) in [(10, true), (INLINE_MAX - 4, true), (INLINE_MAX - 3, false)] {
            let body: Vec<u8> = (0..body_len).map(|i| i as u8).collect();
            let mut builder = MessageBuilder::new("", "rk", &properties, body_len as u64);
            builder.push(&body);
            let message = builder.finish();
            assert_eq!(
                matches!(message.storage, Storage::Inline(_)),
                inline,
                "{body_len}-byte body"
            );
            assert_eq!(message.exchange(), "");
            assert_eq!(message.routing_key(), "rk");
            assert_eq!(message.properties(), &properties);
            assert_eq!(message.body(), &body[..]);
            assert_eq!(
                message.heap_size(),
                if inline { 0 } else { 2 + 2 + body_len }
            );
            assert_eq!(message.body_slice(1..3), &body[1..3]);
            assert_eq!(message.clone().body(), &body[..]);
        }
    }

    #[test]
    fn a_message_outgrowing_the_inline_room_moves_to_the_heap_whole() {
        use super::{INLINE_MAX, MessageBuilder, Storage};
        // BCC keys past the room (a large body in pieces starts with its head inline and
        // moves at its first piece: `small_bodies_and_bodies_in_pieces_are_copied`).
        let long_key = "k".repeat(INLINE_MAX);
        let mut with_keys = MessageBuilder::new("ex", "rk", &[0, 0], 3);
        with_keys.with_bcc(["a", long_key.as_str()]);
        with_keys.push(b"abc");
        let with_keys = with_keys.finish();
        assert!(matches!(with_keys.storage, Storage::Heap(_)));
        assert_eq!(
            with_keys.bcc_keys().collect::<Vec<_>>(),
            ["a", long_key.as_str()]
        );
        assert_eq!(
            (with_keys.exchange(), with_keys.routing_key()),
            ("ex", "rk")
        );
        assert_eq!(with_keys.body(), b"abc");
    }

    #[test]
    fn a_shared_body_keeps_a_head_too_long_to_be_inline() {
        let routing_key = "r".repeat(super::INLINE_MAX + 1);
        let read_buffer = bytes::Bytes::from(vec![3u8; super::SHARED_BODY_MIN]);
        let mut message =
            super::Message::with_shared_body("ex", &routing_key, &[0, 0], read_buffer.clone());
        for pinning in [true, false] {
            assert_eq!(message.is_pinning(), pinning);
            assert_eq!(message.exchange(), "ex");
            assert_eq!(message.routing_key(), routing_key);
            assert_eq!(message.properties(), &[0, 0]);
            assert_eq!(message.body(), &read_buffer[..]);
            message.unpin();
        }
    }

    #[test]
    fn a_delivery_count_header_is_added_to_an_inline_message() {
        use super::{MessageBuilder, Storage};
        let mut builder = MessageBuilder::new("", "q", &[0, 0], 2);
        builder.push(b"hi");
        let message = builder.finish();
        assert!(matches!(message.storage, Storage::Inline(_)));
        let counted = message.with_delivery_count(3);
        let (_, properties) = parse_properties(counted.properties()).expect("properties");
        assert_eq!(
            properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-delivery-count")),
            Some(&AMQPValue::LongLongInt(3))
        );
        assert_eq!((counted.routing_key(), counted.body()), ("q", &b"hi"[..]));
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
