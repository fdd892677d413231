//! Frames in and out. Decoding checks a frame's size from its 7-byte header before buffering
//! its payload, then hands method and content-header payloads to amq-protocol's parsers. Body
//! payloads and the raw property bytes of content headers are borrowed from the input buffer
//! (the connection copies them into the message, so a queued message stores exactly what the
//! publisher sent: inside itself when small, otherwise in one allocation).
//!
//! The methods every message brings (basic.publish and basic.ack in, basic.deliver and the
//! publisher confirm's basic.ack out) are parsed and written directly: amq-protocol's generic
//! parser and generator allocate per flag and per field, which cost a quarter of the broker's
//! time per message. Property tests hold the direct versions equal to amq-protocol's.

use crate::error::AmqpError;
use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame, parsing::parse_content_header};
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic, parse_class};
use amq_protocol::types::ShortString;
use bytes::{Buf, BytesMut};
use std::borrow::Cow;
use std::ops::Range;

/// Frame type octets (AMQP 0-9-1 section 4.2.3).
const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub(crate) const FRAME_END: u8 = 0xCE;
/// Type, channel and size before the payload, and the end octet after it.
pub(crate) const FRAME_OVERHEAD: usize = 8;

/// Most octets of a bad frame quoted in a reply text.
const SHOWN_OCTETS: usize = 64;
/// Most buffer space reserved ahead for a frame whose bytes have not arrived yet.
const MAX_RESERVE: usize = 256 * 1024;
/// Nesting of field tables and arrays parsed on the connection's own stack: amq-protocol parses
/// them recursively, so a frame nested deeper (RabbitMQ accepts thousands of levels) is parsed
/// on a thread with a stack sized for it. Real traffic nests a few levels.
const INLINE_NESTING: usize = 64;
/// Stack reserved per nesting level on that thread (generous: debug builds use the most).
const STACK_PER_LEVEL: usize = 64 * 1024;
/// Deepest nesting accepted at all. RabbitMQ accepts any depth a frame can hold (about 26,000
/// levels in 128 KiB); Warren refuses deeper than this with 501 rather than reserve gigabytes
/// of stack for a frame no real client sends.
const MAX_NESTING: usize = 2000;

/// An upper bound on the nesting depth of field tables and arrays in a payload, without
/// parsing it: every `F` or `A` octet followed by a length that fits in the payload is taken
/// as a container, and the most such candidates covering one octet is returned. Every real
/// container is a candidate, so the real depth is never larger.
fn nesting_bound(payload: &[u8]) -> usize {
    let mut open_ends = std::collections::BinaryHeap::new();
    let mut deepest = 0;
    for i in 0..payload.len().saturating_sub(4) {
        if payload[i] != b'F' && payload[i] != b'A' {
            continue;
        }
        let len = u32::from_be_bytes([
            payload[i + 1],
            payload[i + 2],
            payload[i + 3],
            payload[i + 4],
        ]) as usize;
        let end = i + 5 + len;
        if end > payload.len() {
            continue;
        }
        while open_ends
            .peek()
            .is_some_and(|std::cmp::Reverse(e): &std::cmp::Reverse<usize>| *e <= i)
        {
            open_ends.pop();
        }
        open_ends.push(std::cmp::Reverse(end));
        deepest = deepest.max(open_ends.len());
    }
    deepest
}

/// Runs `parse` on the payload, on a thread with a big enough stack when the payload may be
/// nested deeper than [`INLINE_NESTING`]. A payload too deep for even that is refused.
fn parse_nested<T: Send>(
    payload: &[u8],
    parse: impl FnOnce(&[u8]) -> Result<T, AmqpError> + Send,
) -> Result<T, AmqpError> {
    if payload.len() <= INLINE_NESTING * 5 {
        return parse(payload);
    }
    let depth = nesting_bound(payload);
    if depth <= INLINE_NESTING {
        return parse(payload);
    }
    if depth > MAX_NESTING {
        return Err(AmqpError::frame_error(format!(
            "cannot decode: field tables nested deeper than {MAX_NESTING} levels"
        )));
    }
    let stack = depth * STACK_PER_LEVEL + (16 << 20);
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("warren-deep-parse".into())
            .stack_size(stack)
            .spawn_scoped(scope, || parse(payload))
            .map_err(|e| AmqpError::internal_error(format!("cannot parse a deep frame: {e}")))?
            .join()
            .unwrap_or_else(|_| Err(AmqpError::internal_error("parser failed")))
    })
}

/// The protocol header a client must send, and the one a server answers a wrong header with.
pub(crate) const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// One decoded inbound frame; its payload bytes borrowed from the input (or owned, see
/// [`Frame::into_owned`]).
#[derive(Debug)]
pub(crate) enum Frame<'a> {
    /// A method frame.
    Method(u16, AMQPClass),
    /// A content header, decoded (to validate it and read what routing and expiry need) and
    /// raw (property flags and list, as received).
    Header {
        channel: u16,
        class_id: u16,
        body_size: u64,
        properties: Box<BasicProperties>,
        raw_properties: Cow<'a, [u8]>,
    },
    /// A content body frame.
    Body(u16, Cow<'a, [u8]>),
    /// A heartbeat on channel 0.
    Heartbeat,
}

impl Frame<'_> {
    /// The frame with its payload copied out of the input buffer.
    pub(crate) fn into_owned(self) -> Frame<'static> {
        match self {
            Frame::Method(channel, method) => Frame::Method(channel, method),
            Frame::Header {
                channel,
                class_id,
                body_size,
                properties,
                raw_properties,
            } => Frame::Header {
                channel,
                class_id,
                body_size,
                properties,
                raw_properties: Cow::Owned(raw_properties.into_owned()),
            },
            Frame::Body(channel, body) => Frame::Body(channel, Cow::Owned(body.into_owned())),
            Frame::Heartbeat => Frame::Heartbeat,
        }
    }
}

/// What [`decode_at`] found at the front of the input.
#[derive(Debug)]
pub(crate) enum Decoded<'a> {
    /// A frame, and how many input bytes it took.
    Frame(Frame<'a>, usize),
    /// The next frame is not complete: it needs this many bytes in all.
    Incomplete(usize),
}

/// Decodes one frame from the front of `buf` into an owned [`Frame`], consuming it, or returns
/// `Ok(None)` (having reserved room for the rest) when more bytes are needed. For the
/// handshake and other places off the hot path; the connection uses [`decode_at`].
pub(crate) fn decode(
    buf: &mut BytesMut,
    frame_max: u32,
) -> Result<Option<Frame<'static>>, AmqpError> {
    match decode_at(buf, frame_max)? {
        Decoded::Frame(frame, len) => {
            let frame = frame.into_owned();
            buf.advance(len);
            Ok(Some(frame))
        }
        Decoded::Incomplete(needed) => {
            reserve_for(buf, needed);
            Ok(None)
        }
    }
}

/// Reserves room for an incomplete frame of `needed` bytes, but never much ahead of the bytes
/// actually sent.
pub(crate) fn reserve_for(buf: &mut BytesMut, needed: usize) {
    buf.reserve(needed.saturating_sub(buf.len()).min(MAX_RESERVE));
}

/// Decodes the frame at the front of `buf`, borrowing its payload, without consuming it.
/// `frame_max` bounds the whole frame (0: no limit); a larger frame is refused from its header,
/// before its payload is buffered.
pub(crate) fn decode_at(buf: &[u8], frame_max: u32) -> Result<Decoded<'_>, AmqpError> {
    if buf.len() < 7 {
        return Ok(Decoded::Incomplete(7));
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if !matches!(
        kind,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(AmqpError::frame_error(format!(
            "type {kind}, all octets = <<>>: unknown_frame"
        )));
    }
    // RabbitMQ refuses a payload larger than frame_max (so 8 bytes of slack over the frame
    // size), and reports the limit as frame_max - 8.
    if frame_max != 0 && size > frame_max as usize {
        return Err(AmqpError::frame_error(format!(
            "type {kind}, all octets = <<>>: {{frame_too_large,{size},{}}}",
            (frame_max as usize).saturating_sub(FRAME_OVERHEAD)
        )));
    }
    if buf.len() < size + FRAME_OVERHEAD {
        return Ok(Decoded::Incomplete(size + FRAME_OVERHEAD));
    }
    if buf[size + 7] != FRAME_END {
        return Err(AmqpError::frame_error(format!(
            "type {kind}, all octets = {}: {{invalid_frame_end_marker,{}}}",
            erlang_binary(&buf[7..7 + size.min(SHOWN_OCTETS)]),
            buf[size + 7]
        )));
    }
    // No copy: a message copies its parts into one buffer of its own when it is assembled.
    let payload = &buf[7..7 + size];
    let len = size + FRAME_OVERHEAD;
    let frame = |frame| Ok(Decoded::Frame(frame, len));
    match kind {
        FRAME_METHOD
            if payload.len() >= 8 && payload[..4] == [0, 60, 0, 10] && payload[4..8] != [0; 4] =>
        {
            // basic.qos with a prefetch_size: amq-protocol drops the field while parsing, so it
            // is read here to answer as RabbitMQ does.
            let size = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
            Err(AmqpError::not_implemented(format!("prefetch_size!=0 ({size})")).during_ids(60, 10))
        }
        FRAME_METHOD => {
            if let Some(method) = parse_hot_method(payload) {
                return frame(Frame::Method(channel, method));
            }
            let method = parse_nested(payload, |p| match parse_class(p) {
                Ok(([], method)) => Ok(method),
                Err(e) if is_utf8_error(&e) => Err(malformed_utf8()),
                _ => Err(malformed_method(p)),
            })?;
            frame(Frame::Method(channel, method))
        }
        FRAME_HEADER => {
            let header = parse_nested(payload, |p| match parse_content_header(p) {
                Ok(([], header)) => Ok(header),
                Err(e) if is_utf8_error(&e) => Err(malformed_utf8()),
                _ => Err(AmqpError::frame_error(format!(
                    "type {kind}, all octets = {}: unknown_frame",
                    erlang_binary(&p[..p.len().min(SHOWN_OCTETS)])
                ))),
            })?;
            frame(Frame::Header {
                channel,
                class_id: header.class_id,
                body_size: header.body_size,
                properties: Box::new(header.properties),
                raw_properties: Cow::Borrowed(&payload[12..]),
            })
        }
        FRAME_BODY => frame(Frame::Body(channel, Cow::Borrowed(payload))),
        _ if channel != 0 || size != 0 => Err(AmqpError::unexpected_frame(format!(
            "type {kind}, all octets = {}",
            erlang_binary(&payload[..payload.len().min(SHOWN_OCTETS)])
        ))),
        _ => frame(Frame::Heartbeat),
    }
}

/// basic.publish and basic.ack, the methods every message brings, parsed directly: the result
/// equals amq-protocol's (a property test holds them equal), but without its per-call
/// allocations (one `String` per flag name). `None` for anything else, and for any payload
/// these simple rules do not accept, which then takes the generic path and its error reply.
fn parse_hot_method(payload: &[u8]) -> Option<AMQPClass> {
    fn short_string(p: &[u8]) -> Option<(ShortString, &[u8])> {
        let (&len, rest) = p.split_first()?;
        let (text, rest) = rest.split_at_checked(len as usize)?;
        Some((std::str::from_utf8(text).ok()?.into(), rest))
    }
    match payload {
        [0, 60, 0, 40, _, _, rest @ ..] => {
            let (exchange, rest) = short_string(rest)?;
            let (routing_key, rest) = short_string(rest)?;
            let [bits] = rest else { return None };
            Some(AMQPClass::Basic(basic::AMQPMethod::Publish(
                basic::Publish {
                    exchange,
                    routing_key,
                    mandatory: bits & 1 != 0,
                    immediate: bits & 2 != 0,
                },
            )))
        }
        [0, 60, 0, 80, tag @ .., bits] if tag.len() == 8 => {
            Some(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: u64::from_be_bytes(tag.try_into().ok()?),
                multiple: bits & 1 != 0,
            })))
        }
        _ => None,
    }
}

/// Whether amq-protocol failed on a short string that is not UTF-8 (its only `map_res`).
fn is_utf8_error(e: &amq_protocol::frame::ParserError) -> bool {
    format!("{e:?}").contains("MapRes")
}

/// RabbitMQ's answer to a short string that is not UTF-8.
fn malformed_utf8() -> AmqpError {
    AmqpError::frame_error("Malformed UTF-8 in shortstr")
}

/// Bytes as Erlang prints a binary in RabbitMQ's reply texts: `<<"text">>` when printable,
/// else `<<1,2,3>>`.
pub(crate) fn erlang_binary(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "<<>>".to_owned();
    }
    if bytes
        .iter()
        .all(|b| (0x20..0x7f).contains(b) && *b != b'"' && *b != b'\\')
    {
        return format!("<<\"{}\">>", String::from_utf8_lossy(bytes));
    }
    let list: Vec<String> = bytes.iter().map(|b| b.to_string()).collect();
    format!("<<{}>>", list.join(","))
}

/// The error for a method payload amq-protocol cannot parse: arguments that cannot be decoded
/// are 501 FRAME_ERROR, as RabbitMQ answers them; an unknown class or method (on which
/// RabbitMQ's reader crashes) is 540 NOT_IMPLEMENTED.
fn malformed_method(payload: &[u8]) -> AmqpError {
    if payload.len() < 4 {
        return AmqpError::frame_error(format!("cannot decode {}", erlang_binary(payload)));
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let method_id = u16::from_be_bytes([payload[2], payload[3]]);
    let known = match class_id {
        10 => matches!(
            method_id,
            10 | 11 | 20 | 21 | 30 | 31 | 40 | 41 | 50 | 51 | 60 | 61 | 70 | 71
        ),
        20 => matches!(method_id, 10 | 11 | 20 | 21 | 40 | 41),
        30 => matches!(method_id, 10 | 11),
        40 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 51),
        50 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 41 | 50 | 51),
        60 => matches!(
            method_id,
            10 | 11
                | 20
                | 21
                | 30
                | 31
                | 40
                | 50
                | 60
                | 70
                | 71
                | 72
                | 80
                | 90
                | 100
                | 110
                | 111
                | 120
        ),
        85 => matches!(method_id, 10 | 11),
        90 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31),
        _ => false,
    };
    if known {
        AmqpError::frame_error(format!(
            "cannot decode {}",
            erlang_binary(&payload[4..payload.len().min(4 + SHOWN_OCTETS)])
        ))
        .during_ids(class_id, method_id)
    } else {
        AmqpError::not_implemented(format!("unknown method {class_id}.{method_id}"))
            .during_ids(class_id, method_id)
    }
}

/// Appends a method frame to `out`.
pub(crate) fn write_method(out: &mut Vec<u8>, channel: u16, method: AMQPClass) {
    write_frame(out, &AMQPFrame::Method(channel, method));
}

/// Appends any amq-protocol frame to `out`.
pub(crate) fn write_frame(out: &mut Vec<u8>, frame: &AMQPFrame) {
    let buf = std::mem::take(out);
    match gen_frame(frame)(WriteContext::from(buf)) {
        Ok(ctx) => *out = ctx.into_inner().0,
        Err(e) => unreachable!("serialising into a Vec cannot fail: {e}"),
    }
}

/// The arguments of a basic.deliver, borrowed from the consumer and the message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deliver<'a> {
    /// The consumer's tag.
    pub(crate) consumer_tag: &'a str,
    /// The channel's delivery tag.
    pub(crate) delivery_tag: u64,
    /// Whether the message was delivered before.
    pub(crate) redelivered: bool,
    /// The exchange it was published to (UTF-8, checked when it was published).
    pub(crate) exchange: &'a [u8],
    /// Its routing key (likewise).
    pub(crate) routing_key: &'a [u8],
}

impl Deliver<'_> {
    /// The method as amq-protocol models it (for the trace, and to check [`write_deliver`]).
    pub(crate) fn method(&self) -> AMQPClass {
        use crate::error::short_string_lossy as short;
        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: short(self.consumer_tag),
            delivery_tag: self.delivery_tag,
            redelivered: self.redelivered,
            exchange: short(&String::from_utf8_lossy(self.exchange)),
            routing_key: short(&String::from_utf8_lossy(self.routing_key)),
        }))
    }
}

/// Appends a basic.deliver method frame: the bytes amq-protocol's generator writes for
/// [`Deliver::method`] (a unit test holds them equal), written directly because this is the
/// one method sent per message and the generic generator cost ~12% of the broker's CPU.
/// Every string here arrived as a short string, so none is longer than 255 bytes.
pub(crate) fn write_deliver(out: &mut Vec<u8>, channel: u16, d: &Deliver<'_>) {
    fn short_string(out: &mut Vec<u8>, s: &[u8]) {
        let s = &s[..s.len().min(255)];
        out.push(s.len() as u8);
        out.extend_from_slice(s);
    }
    write_raw_frame(out, FRAME_METHOD, channel, |out| {
        out.extend_from_slice(&[0, 60, 0, 60]); // basic.deliver
        short_string(out, d.consumer_tag.as_bytes());
        out.extend_from_slice(&d.delivery_tag.to_be_bytes());
        out.push(u8::from(d.redelivered));
        short_string(out, d.exchange);
        short_string(out, d.routing_key);
    });
}

/// Appends a basic.ack (a publisher confirm): the bytes amq-protocol writes for it (a unit test
/// holds them equal), without its generator's allocation per flag.
pub(crate) fn write_ack(out: &mut Vec<u8>, channel: u16, delivery_tag: u64, multiple: bool) {
    write_raw_frame(out, FRAME_METHOD, channel, |out| {
        out.extend_from_slice(&[0, 60, 0, 80]); // basic.ack
        out.extend_from_slice(&delivery_tag.to_be_bytes());
        out.push(u8::from(multiple));
    });
}

/// Appends a content header (with the property bytes exactly as received) and the body split
/// into frames of at most `frame_max` bytes, copied.
pub(crate) fn write_content(
    out: &mut Vec<u8>,
    channel: u16,
    raw_properties: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    out.reserve(12 + raw_properties.len() + body.len() + 2 * FRAME_OVERHEAD);
    write_content_header(out, channel, raw_properties, body.len());
    for piece in body_frames(body.len(), frame_max) {
        write_raw_frame(out, FRAME_BODY, channel, |out| {
            out.extend_from_slice(&body[piece]);
        });
    }
}

/// Appends a content header (class basic) with the property bytes exactly as received.
pub(crate) fn write_content_header(
    out: &mut Vec<u8>,
    channel: u16,
    raw_properties: &[u8],
    body_size: usize,
) {
    write_raw_frame(out, FRAME_HEADER, channel, |out| {
        out.extend_from_slice(&[0, 60, 0, 0]); // class basic, weight 0
        out.extend_from_slice(&(body_size as u64).to_be_bytes());
        out.extend_from_slice(raw_properties);
    });
}

/// The parts of a body of `len` bytes that go in one frame each, for frames of at most
/// `frame_max` bytes (0: no limit).
pub(crate) fn body_frames(len: usize, frame_max: u32) -> impl Iterator<Item = Range<usize>> {
    let chunk = (frame_max as usize).saturating_sub(FRAME_OVERHEAD);
    let chunk = if chunk == 0 { usize::MAX } else { chunk };
    (0..len)
        .step_by(chunk)
        .map(move |start| start..start.saturating_add(chunk).min(len))
}

/// Appends the type, channel and size of a body frame whose `len` bytes of payload the caller
/// writes itself, followed by [`FRAME_END`].
pub(crate) fn write_body_frame_head(out: &mut Vec<u8>, channel: u16, len: usize) {
    out.push(FRAME_BODY);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
}

/// Appends one frame around the payload `payload` writes: type, channel and size before it,
/// the end octet after it.
fn write_raw_frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&[0; 4]); // the payload size, set below
    payload(out);
    let size = (out.len() - start - 7) as u32;
    out[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
    out.push(FRAME_END);
}

/// Appends a heartbeat frame.
pub(crate) fn write_heartbeat(out: &mut Vec<u8>) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::{basic, queue};

    fn round_trip(frame: AMQPFrame) -> Frame<'static> {
        let mut out = Vec::new();
        write_frame(&mut out, &frame);
        let mut buf = BytesMut::from(&out[..]);
        let decoded = decode(&mut buf, 131_072).unwrap().unwrap();
        assert!(buf.is_empty());
        decoded
    }

    proptest::proptest! {
        /// The direct parse of basic.publish and basic.ack agrees with amq-protocol on any
        /// payload it accepts, and accepts every well-formed one.
        #[test]
        fn hot_methods_parse_as_amq_protocol_does(
            method in proptest::sample::select(vec![40u8, 80]),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            exchange in "\\PC{0,20}",
            routing_key in "\\PC{0,40}",
            delivery_tag: u64,
            bits: u8,
            flip_at: usize,
            flip_to: u8,
        ) {
            let mut arbitrary = vec![0, 60, 0, method];
            arbitrary.extend_from_slice(&tail);
            if let Some(fast) = parse_hot_method(&arbitrary) {
                let (rest, generic) = parse_class(&arbitrary[..]).expect("amq-protocol accepts it");
                proptest::prop_assert!(rest.is_empty());
                proptest::prop_assert_eq!(fast, generic);
            }
            let well_formed = AMQPClass::Basic(if method == 40 {
                basic::AMQPMethod::Publish(basic::Publish {
                    exchange: exchange.into(),
                    routing_key: routing_key.into(),
                    mandatory: bits & 1 != 0,
                    immediate: bits & 2 != 0,
                })
            } else {
                basic::AMQPMethod::Ack(basic::Ack { delivery_tag, multiple: bits & 1 != 0 })
            });
            let mut frame = Vec::new();
            write_method(&mut frame, 1, well_formed.clone());
            let payload = &frame[7..frame.len() - 1];
            proptest::prop_assert_eq!(parse_hot_method(payload), Some(well_formed));
            // One byte changed (past the method id): accepted only where amq-protocol agrees.
            let mut changed = payload.to_vec();
            changed[4 + flip_at % (payload.len() - 4)] = flip_to;
            if let Some(fast) = parse_hot_method(&changed) {
                let (rest, generic) = parse_class(&changed[..]).expect("amq-protocol accepts it");
                proptest::prop_assert!(rest.is_empty());
                proptest::prop_assert_eq!(fast, generic);
            }
        }

        /// The hand-written basic.deliver is byte for byte what amq-protocol generates.
        #[test]
        fn deliver_matches_amq_protocol(
            channel: u16,
            consumer_tag in "\\PC{0,60}",
            delivery_tag: u64,
            redelivered: bool,
            exchange in "[a-z.]{0,255}",
            routing_key in "\\PC{0,60}",
        ) {
            let deliver = Deliver {
                consumer_tag: &consumer_tag,
                delivery_tag,
                redelivered,
                exchange: exchange.as_bytes(),
                routing_key: routing_key.as_bytes(),
            };
            let mut expected = Vec::new();
            write_method(&mut expected, channel, deliver.method());
            let mut written = vec![7; 3];
            write_deliver(&mut written, channel, &deliver);
            proptest::prop_assert_eq!(&written[3..], &expected[..]);
        }

        /// So is the hand-written basic.ack.
        #[test]
        fn ack_matches_amq_protocol(channel: u16, delivery_tag: u64, multiple: bool) {
            let method = AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag, multiple }));
            let mut expected = Vec::new();
            write_method(&mut expected, channel, method);
            let mut written = Vec::new();
            write_ack(&mut written, channel, delivery_tag, multiple);
            proptest::prop_assert_eq!(written, expected);
        }
    }

    #[test]
    fn method_round_trip() {
        let method = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "jobs".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: Default::default(),
        }));
        match round_trip(AMQPFrame::Method(3, method.clone())) {
            Frame::Method(3, m) => assert_eq!(m, method),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn content_round_trip_keeps_raw_properties() {
        let props = BasicProperties::default()
            .with_correlation_id("abc".into())
            .with_reply_to("amq.gen-x".into());
        let mut out = Vec::new();
        write_frame(
            &mut out,
            &AMQPFrame::Header(
                1,
                amq_protocol::frame::AMQPContentHeader {
                    class_id: 60,
                    body_size: 10,
                    properties: props.clone(),
                },
            ),
        );
        let mut buf = BytesMut::from(&out[..]);
        let Frame::Header {
            raw_properties,
            properties,
            body_size,
            ..
        } = decode(&mut buf, 0).unwrap().unwrap()
        else {
            panic!("not a header")
        };
        assert_eq!(body_size, 10);
        assert_eq!(*properties, props);
        let mut again = Vec::new();
        write_content(&mut again, 1, &raw_properties, b"0123456789", 12);
        // The header is identical to what came in, the body split into chunks of 4 bytes.
        assert_eq!(&again[..out.len()], &out[..]);
        let mut buf = BytesMut::from(&again[out.len()..]);
        let mut body = Vec::new();
        while let Some(Frame::Body(1, chunk)) = decode(&mut buf, 12).unwrap() {
            assert!(chunk.len() <= 4);
            body.extend_from_slice(&chunk);
        }
        assert_eq!(body, b"0123456789");
    }

    #[test]
    fn oversize_frame_is_refused_from_its_header() {
        let mut buf = BytesMut::from(&[1u8, 0, 1, 0, 0, 16, 1][..]);
        let err = decode(&mut buf, 4096).unwrap_err();
        assert_eq!(
            err.text,
            "FRAME_ERROR - type 1, all octets = <<>>: {frame_too_large,4097,4088}"
        );
        // A payload of exactly frame_max is accepted, as RabbitMQ does.
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0, 0, 16, 0][..]);
        assert!(decode(&mut buf, 4096).unwrap().is_none());
    }

    #[test]
    fn deeply_nested_tables_are_refused_before_parsing() {
        // queue.declare whose arguments nest 20,000 tables: {"":{"":{...}}}
        let depth = 20_000;
        let mut table = Vec::new();
        for _ in 0..depth {
            let mut outer = vec![0u8, b'F'];
            outer.extend_from_slice(&((table.len()) as u32).to_be_bytes());
            outer.extend_from_slice(&table);
            table = outer;
        }
        let mut payload = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
        payload.extend_from_slice(&(table.len() as u32).to_be_bytes());
        payload.extend_from_slice(&table);
        let mut frame = vec![1u8, 0, 1];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(0xCE);
        let mut buf = BytesMut::from(&frame[..]);
        let err = decode(&mut buf, 0).unwrap_err();
        assert_eq!(err.code, 501);
        assert!(nesting_bound(&payload) >= depth);
    }

    #[test]
    fn a_thousand_nested_tables_are_parsed_on_a_deep_stack() {
        let mut table = Vec::new();
        for _ in 0..1000 {
            let mut outer = vec![0u8, b'F'];
            outer.extend_from_slice(&(table.len() as u32).to_be_bytes());
            outer.extend_from_slice(&table);
            table = outer;
        }
        let mut payload = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
        payload.extend_from_slice(&(table.len() as u32).to_be_bytes());
        payload.extend_from_slice(&table);
        let mut frame = vec![1u8, 0, 1];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(0xCE);
        let mut buf = BytesMut::from(&frame[..]);
        assert!(matches!(decode(&mut buf, 0), Ok(Some(Frame::Method(1, _)))));
    }

    #[test]
    fn ordinary_tables_pass_the_nesting_check() {
        let mut args = amq_protocol::types::FieldTable::default();
        let mut inner = amq_protocol::types::FieldTable::default();
        inner.insert("k".into(), amq_protocol::types::AMQPValue::LongInt(1));
        args.insert(
            "x-nested".into(),
            amq_protocol::types::AMQPValue::FieldTable(inner),
        );
        let method = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "q".into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: args,
        }));
        assert!(matches!(
            round_trip(AMQPFrame::Method(1, method)),
            Frame::Method(1, _)
        ));
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut out = Vec::new();
        write_method(
            &mut out,
            1,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 7,
                multiple: true,
            })),
        );
        for cut in 0..out.len() {
            let mut buf = BytesMut::from(&out[..cut]);
            assert!(decode(&mut buf, 0).unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn bad_frame_end_and_type() {
        let mut buf = BytesMut::from(&[8u8, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(
            decode(&mut buf, 0).unwrap_err().text,
            "FRAME_ERROR - type 8, all octets = <<>>: {invalid_frame_end_marker,0}"
        );
        let mut buf = BytesMut::from(&[9u8, 0, 0, 0, 0, 0, 0, 0xCE][..]);
        assert_eq!(decode(&mut buf, 0).unwrap_err().code, 501);
    }
}
