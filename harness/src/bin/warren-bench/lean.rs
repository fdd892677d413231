//! The lean load generator: a minimal AMQP 0-9-1 client on amq-protocol over one tokio TCP
//! stream, with no thread or task of its own, so it runs wherever it is awaited (lapin, by
//! contrast, does its I/O on a thread per connection).
//!
//! It does what the bench needs and no more: the handshake (PLAIN, heartbeats off), channels,
//! queue declare/delete (pipelined for many queues), qos, consume, confirm-less publish from
//! frames encoded once, and multiple acks. Output is buffered and written in large batches;
//! input is scanned in place without allocating per frame.

use crate::Result;
use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{
    AMQPClass, BasicProperties, basic, channel, connection, parse_class, queue,
};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use amq_protocol::uri::AMQPUri;
use bytes::{Buf, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Frame types.
pub(crate) const METHOD: u8 = 1;
pub(crate) const HEADER: u8 = 2;
pub(crate) const BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;

/// How long the handshake and each synchronous method may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Write when this much output is buffered.
const WRITE_BATCH: usize = 64 * 1024;

/// One connection.
#[derive(Debug)]
pub(crate) struct Lean {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    frame_max: u32,
}

/// A method frame read while waiting for a reply that is not one.
fn unexpected(method: &AMQPClass) -> String {
    match method {
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
            format!(
                "connection closed by the broker: {} {}",
                c.reply_code, c.reply_text
            )
        }
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
            format!(
                "channel closed by the broker: {} {}",
                c.reply_code, c.reply_text
            )
        }
        other => format!(
            "unexpected method {}.{}",
            other.get_amqp_class_id(),
            other.get_amqp_method_id()
        ),
    }
}

/// Appends one frame to `out`.
fn write_frame(out: &mut Vec<u8>, frame: &AMQPFrame) {
    let buf = std::mem::take(out);
    match gen_frame(frame)(WriteContext::from(buf)) {
        Ok(ctx) => *out = ctx.into_inner().0,
        Err(e) => unreachable!("serialising into a Vec cannot fail: {e}"),
    }
}

/// The method and content-header frames of a publish, encoded once and sent before each body
/// of that size.
pub(crate) fn publish_prefix(
    channel: u16,
    routing_key: &str,
    properties: BasicProperties,
    body_size: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(
        &mut out,
        &AMQPFrame::Method(
            channel,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: ShortString::from(""),
                routing_key: ShortString::from(routing_key),
                mandatory: false,
                immediate: false,
            })),
        ),
    );
    write_frame(
        &mut out,
        &AMQPFrame::Header(
            channel,
            AMQPContentHeader {
                class_id: 60,
                body_size: body_size as u64,
                properties,
            },
        ),
    );
    out
}

/// The delivery tag of a basic.deliver payload (class 60, method 60), read in place:
/// consumer-tag (short string), then the tag.
pub(crate) fn deliver_tag(payload: &[u8]) -> Option<u64> {
    if payload.len() < 5 || payload[..4] != [0, 60, 0, 60] {
        return None;
    }
    let at = 5 + payload[4] as usize;
    let bytes: [u8; 8] = payload.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Why the broker closes, if a method payload is connection.close or channel.close: its
/// reply code and text.
pub(crate) fn close_reason(payload: &[u8]) -> Option<String> {
    if !(payload.starts_with(&[0, 20, 0, 40]) || payload.starts_with(&[0, 10, 0, 50])) {
        return None;
    }
    Some(match parse_class(payload) {
        Ok((_, method)) => unexpected(&method),
        Err(_) => "the broker closed the channel or connection".to_owned(),
    })
}

impl Lean {
    /// Connects and completes the handshake (PLAIN, heartbeats off, the server's frame_max).
    pub(crate) async fn connect(url: &str) -> Result<Self> {
        let uri: AMQPUri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
        let addr = format!("{}:{}", uri.authority.host, uri.authority.port);
        let stream = tokio::time::timeout(REPLY_TIMEOUT, TcpStream::connect(&addr))
            .await
            .map_err(|_| format!("connecting to {addr} timed out"))??;
        warren_broker::tcp::tune(&stream);
        let mut conn = Self {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: Vec::with_capacity(WRITE_BATCH + 8 * 1024),
            frame_max: 131_072,
        };
        tokio::time::timeout(REPLY_TIMEOUT, conn.handshake(&uri))
            .await
            .map_err(|_| "AMQP handshake timed out")??;
        Ok(conn)
    }

    async fn handshake(&mut self, uri: &AMQPUri) -> Result<()> {
        self.stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
        match self.expect_method(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::Start(_)) => {}
            other => return Err(unexpected(&other).into()),
        }
        let mut properties = FieldTable::default();
        properties.insert(
            ShortString::from("product"),
            AMQPValue::LongString(LongString::from("warren-bench lean client")),
        );
        let user = &uri.authority.userinfo;
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: properties,
                mechanism: ShortString::from("PLAIN"),
                response: LongString::from(format!("\0{}\0{}", user.username, user.password)),
                locale: ShortString::from("en_US"),
            })),
        );
        self.flush().await?;
        let tune = match self.expect_method(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => t,
            other => return Err(unexpected(&other).into()),
        };
        self.frame_max = if tune.frame_max == 0 {
            131_072
        } else {
            tune.frame_max
        };
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max: self.frame_max,
                heartbeat: 0,
            })),
        );
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: ShortString::from(uri.vhost.as_str()),
            })),
        );
        self.flush().await?;
        match self.expect_method(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => Ok(()),
            other => Err(unexpected(&other).into()),
        }
    }

    /// Buffers a method frame.
    pub(crate) fn send_method(&mut self, channel: u16, method: AMQPClass) {
        write_frame(&mut self.wbuf, &AMQPFrame::Method(channel, method));
    }

    /// Writes everything buffered.
    pub(crate) async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Writes what is buffered once it makes a full batch ([`WRITE_BATCH`]).
    pub(crate) async fn flush_when_full(&mut self) -> Result<()> {
        if self.wbuf.len() >= WRITE_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Buffers one publish: the pre-encoded method and header (see [`publish_prefix`]), then
    /// the body in frames of at most frame_max.
    pub(crate) fn push_publish(&mut self, channel: u16, prefix: &[u8], body: &[u8]) {
        self.wbuf.extend_from_slice(prefix);
        let chunk = (self.frame_max as usize).saturating_sub(8).max(1);
        for piece in body.chunks(chunk) {
            self.wbuf.push(BODY);
            self.wbuf.extend_from_slice(&channel.to_be_bytes());
            self.wbuf
                .extend_from_slice(&(piece.len() as u32).to_be_bytes());
            self.wbuf.extend_from_slice(piece);
            self.wbuf.push(FRAME_END);
        }
    }

    /// Buffers basic.ack.
    pub(crate) fn push_ack(&mut self, channel: u16, delivery_tag: u64, multiple: bool) {
        self.send_method(
            channel,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag,
                multiple,
            })),
        );
    }

    /// Reads whatever the socket has (at least one byte); an error when it is closed.
    pub(crate) async fn read_more(&mut self) -> Result<()> {
        if self.rbuf.capacity() - self.rbuf.len() < 16 * 1024 {
            self.rbuf.reserve(64 * 1024);
        }
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            return Err("the broker closed the connection".into());
        }
        Ok(())
    }

    /// Calls `each(kind, channel, payload)` on every complete frame buffered, consuming them.
    /// Stops early (leaving the rest buffered) when `each` returns `false`.
    pub(crate) fn scan(&mut self, mut each: impl FnMut(u8, u16, &[u8]) -> bool) -> Result<()> {
        let mut at = 0;
        let buf = &self.rbuf[..];
        while buf.len() - at >= 7 {
            let kind = buf[at];
            let channel = u16::from_be_bytes([buf[at + 1], buf[at + 2]]);
            let size =
                u32::from_be_bytes([buf[at + 3], buf[at + 4], buf[at + 5], buf[at + 6]]) as usize;
            if size > self.frame_max as usize {
                return Err(format!("frame of {size} bytes exceeds frame_max").into());
            }
            if buf.len() - at < size + 8 {
                break;
            }
            if buf[at + 7 + size] != FRAME_END {
                return Err("bad frame end".into());
            }
            let keep_going = each(kind, channel, &buf[at + 7..at + 7 + size]);
            at += size + 8;
            if !keep_going {
                break;
            }
        }
        self.rbuf.advance(at);
        Ok(())
    }

    /// The next method frame on `channel`, skipping heartbeats, content and methods on other
    /// channels; connection.close and channel.close are errors.
    async fn expect_method(&mut self, channel: u16) -> Result<AMQPClass> {
        loop {
            let mut found: Option<Result<AMQPClass>> = None;
            self.scan(|kind, ch, payload| {
                if kind != METHOD {
                    return true;
                }
                let parsed = match parse_class(payload) {
                    Ok((_, method)) => method,
                    Err(e) => {
                        found = Some(Err(format!("cannot parse a method: {e:?}").into()));
                        return false;
                    }
                };
                let is_close = matches!(
                    parsed,
                    AMQPClass::Connection(connection::AMQPMethod::Close(_))
                        | AMQPClass::Channel(channel::AMQPMethod::Close(_))
                );
                if is_close {
                    found = Some(Err(unexpected(&parsed).into()));
                    false
                } else if ch == channel {
                    found = Some(Ok(parsed));
                    false
                } else {
                    true
                }
            })?;
            if let Some(result) = found {
                return result;
            }
            self.read_more().await?;
        }
    }

    /// Sends a method and waits for the reply on the same channel.
    pub(crate) async fn call(&mut self, channel: u16, method: AMQPClass) -> Result<AMQPClass> {
        self.send_method(channel, method);
        self.flush().await?;
        tokio::time::timeout(REPLY_TIMEOUT, self.expect_method(channel))
            .await
            .map_err(|_| "no reply from the broker in time")?
    }

    /// Sends many methods at once and waits for as many replies on the channel, in order.
    pub(crate) async fn call_many(
        &mut self,
        channel: u16,
        methods: Vec<AMQPClass>,
    ) -> Result<Vec<AMQPClass>> {
        let n = methods.len();
        for method in methods {
            self.send_method(channel, method);
            self.flush_when_full().await?;
        }
        self.flush().await?;
        let mut replies = Vec::with_capacity(n);
        for _ in 0..n {
            let reply = tokio::time::timeout(REPLY_TIMEOUT, self.expect_method(channel))
                .await
                .map_err(|_| "no reply from the broker in time")??;
            replies.push(reply);
        }
        Ok(replies)
    }

    /// Opens a channel.
    pub(crate) async fn open_channel(&mut self, channel: u16) -> Result<()> {
        match self
            .call(
                channel,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            )
            .await?
        {
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)) => Ok(()),
            other => Err(unexpected(&other).into()),
        }
    }

    /// Declares queues (non-durable; exclusive / auto-delete as asked); returns their names
    /// (server-named when `name` is empty) and ready-message counts.
    pub(crate) async fn declare_many(
        &mut self,
        channel: u16,
        names: &[String],
        exclusive: bool,
        auto_delete: bool,
    ) -> Result<Vec<(String, u32)>> {
        let methods = names
            .iter()
            .map(|name| {
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: ShortString::from(name.as_str()),
                    passive: false,
                    durable: false,
                    exclusive,
                    auto_delete,
                    nowait: false,
                    arguments: FieldTable::default(),
                }))
            })
            .collect();
        self.call_many(channel, methods)
            .await?
            .into_iter()
            .map(|reply| match reply {
                AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => {
                    Ok((ok.queue.to_string(), ok.message_count))
                }
                other => Err(unexpected(&other).into()),
            })
            .collect()
    }

    /// Ready messages in a queue (passive declare).
    pub(crate) async fn message_count(&mut self, channel: u16, name: &str) -> Result<u32> {
        match self
            .call(
                channel,
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: ShortString::from(name),
                    passive: true,
                    durable: false,
                    exclusive: false,
                    auto_delete: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            )
            .await?
        {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => Ok(ok.message_count),
            other => Err(unexpected(&other).into()),
        }
    }

    /// Deletes queues.
    pub(crate) async fn delete_many(&mut self, channel: u16, names: &[String]) -> Result<()> {
        let methods = names
            .iter()
            .map(|name| {
                AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                    queue: ShortString::from(name.as_str()),
                    if_unused: false,
                    if_empty: false,
                    nowait: false,
                }))
            })
            .collect();
        for reply in self.call_many(channel, methods).await? {
            if !matches!(reply, AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_))) {
                return Err(unexpected(&reply).into());
            }
        }
        Ok(())
    }

    /// Sets the per-consumer prefetch of consumers created after it.
    pub(crate) async fn qos(&mut self, channel: u16, prefetch: u16) -> Result<()> {
        match self
            .call(
                channel,
                AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                    prefetch_count: prefetch,
                    global: false,
                })),
            )
            .await?
        {
            AMQPClass::Basic(basic::AMQPMethod::QosOk(_)) => Ok(()),
            other => Err(unexpected(&other).into()),
        }
    }

    /// Starts consumers on queues (server-generated tags), all on `channel`.
    pub(crate) async fn consume_many(
        &mut self,
        channel: u16,
        queues: &[String],
        no_ack: bool,
    ) -> Result<()> {
        let methods = queues
            .iter()
            .map(|name| {
                AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                    queue: ShortString::from(name.as_str()),
                    consumer_tag: ShortString::from(""),
                    no_local: false,
                    no_ack,
                    exclusive: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                }))
            })
            .collect();
        for reply in self.call_many(channel, methods).await? {
            if !matches!(reply, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))) {
                return Err(unexpected(&reply).into());
            }
        }
        Ok(())
    }

    /// Closes the connection (connection.close, then close-ok or the socket's end, within a
    /// second).
    pub(crate) async fn close(mut self) {
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: ShortString::from("bye"),
                class_id: 0,
                method_id: 0,
            })),
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            self.flush().await?;
            loop {
                let mut done = false;
                self.scan(|kind, ch, payload| {
                    done |= kind == METHOD && ch == 0 && payload.starts_with(&[0, 10, 0, 51]);
                    !done
                })?;
                if done {
                    return Ok::<(), crate::BoxError>(());
                }
                self.read_more().await?;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliver_tag_is_read_in_place() {
        let method = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: ShortString::from("ctag-1"),
            delivery_tag: 123_456_789,
            redelivered: false,
            exchange: ShortString::from(""),
            routing_key: ShortString::from("q"),
        }));
        let mut out = Vec::new();
        write_frame(&mut out, &AMQPFrame::Method(1, method));
        assert_eq!(deliver_tag(&out[7..out.len() - 1]), Some(123_456_789));
        assert_eq!(deliver_tag(&[0, 60, 0, 80, 0]), None);
    }
}
