//! A tiny raw-socket AMQP 0-9-1 client: it writes frames with amq-protocol's `gen_frame` (or
//! hand-made bytes), reads them back with `parse_frame`, and never waits without a timeout.
//! It does only what a test tells it to, so it can break every rule lapin keeps.

use amq_protocol::{
    auth::{Credentials, SASLMechanism},
    frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame, parse_frame},
    protocol::{AMQPClass, basic, channel, connection, queue},
    types::{AMQPValue, FieldTable, LongString, ShortString},
    uri::AMQPUri,
};
use std::{io::ErrorKind as IoKind, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::TIMEOUT;

/// The 0-9-1 protocol header.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// What came in from the server.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "a test helper matched by value everywhere; boxing would only add noise"
)]
pub enum Incoming {
    /// One whole frame.
    Frame(AMQPFrame),
    /// The server closed the socket (EOF or reset).
    Closed,
}

/// How to run the handshake.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// SASL mechanism: PLAIN or AMQPLAIN.
    pub mechanism: SASLMechanism,
    /// Client capabilities sent in start-ok.
    pub capabilities: FieldTable,
    /// Virtual host for connection.open.
    pub vhost: String,
    /// tune-ok channel_max; `None` echoes the server's offer.
    pub channel_max: Option<u16>,
    /// tune-ok frame_max; `None` echoes the server's offer.
    pub frame_max: Option<u32>,
    /// tune-ok heartbeat (seconds).
    pub heartbeat: u16,
}

impl Handshake {
    /// Credentials and vhost from `url`, capabilities `authentication_failure_close` and
    /// `consumer_cancel_notify`, the server's channel_max and frame_max, heartbeats off.
    ///
    /// # Panics
    /// When the URL cannot be parsed.
    pub fn from_url(url: &str) -> Self {
        let uri: AMQPUri = url.parse().expect("AMQP URL");
        let mut capabilities = FieldTable::default();
        capabilities.insert(
            "authentication_failure_close".into(),
            AMQPValue::Boolean(true),
        );
        capabilities.insert("consumer_cancel_notify".into(), AMQPValue::Boolean(true));
        Self {
            user: uri.authority.userinfo.username,
            password: uri.authority.userinfo.password,
            mechanism: SASLMechanism::Plain,
            capabilities,
            vhost: uri.vhost,
            channel_max: None,
            frame_max: None,
            heartbeat: 0,
        }
    }
}

/// A raw AMQP connection.
#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The server's connection.start, once received.
    pub start: Option<connection::Start>,
    /// The server's connection.tune, once received.
    pub tune: Option<connection::Tune>,
}

impl RawClient {
    /// Opens a TCP connection to the broker of `url` (nothing sent yet).
    ///
    /// # Panics
    /// When the connection fails within [`TIMEOUT`].
    pub async fn connect(url: &str) -> Self {
        let uri: AMQPUri = url.parse().expect("AMQP URL");
        let addr = format!("{}:{}", uri.authority.host, uri.authority.port);
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(&addr))
            .await
            .unwrap_or_else(|_| panic!("TCP connect to {addr} timed out"))
            .unwrap_or_else(|e| panic!("TCP connect to {addr}: {e}"));
        stream.set_nodelay(true).expect("nodelay");
        Self {
            stream,
            buf: Vec::new(),
            start: None,
            tune: None,
        }
    }

    /// Connects and completes the handshake with `Handshake::from_url(url)`, up to open-ok.
    ///
    /// # Panics
    /// When the handshake does not end with connection.open-ok.
    pub async fn open(url: &str) -> Self {
        Self::open_with(url, Handshake::from_url(url)).await
    }

    /// Connects and completes the handshake `hs`, up to open-ok.
    ///
    /// # Panics
    /// When the handshake does not end with connection.open-ok.
    pub async fn open_with(url: &str, hs: Handshake) -> Self {
        let mut c = Self::connect(url).await;
        c.start_and_tune(&hs).await;
        c.send_tune_ok_and_open(&hs).await;
        match c.recv_frame().await {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => c,
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
    }

    /// Connects, completes the handshake with `Handshake::from_url(url)` and opens `channel`.
    ///
    /// # Panics
    /// When the handshake or channel.open does not succeed.
    pub async fn open_on_channel(url: &str, channel: u16) -> Self {
        let mut c = Self::open(url).await;
        c.open_channel(channel).await;
        c
    }

    /// Sends the protocol header, reads connection.start, sends start-ok (credentials of
    /// `hs`) and returns what came next (connection.tune when the login is accepted).
    ///
    /// # Panics
    /// When connection.start does not come.
    pub async fn start_ok(&mut self, hs: &Handshake) -> Incoming {
        self.send_bytes(PROTOCOL_HEADER).await;
        match self.recv_frame().await {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(s))) => {
                self.start = Some(s)
            }
            other => panic!("expected connection.start, got {other:?}"),
        }
        let mut props = FieldTable::default();
        props.insert(
            "product".into(),
            AMQPValue::LongString("warren-tests raw client".into()),
        );
        props.insert(
            "capabilities".into(),
            AMQPValue::FieldTable(hs.capabilities.clone()),
        );
        let creds = Credentials::new(hs.user.as_str().into(), hs.password.as_str().into());
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: hs.mechanism.to_string().as_str().into(),
                response: creds.sasl_auth_string(hs.mechanism),
                locale: "en_US".into(),
            })),
        )
        .await;
        let next = self.recv().await;
        if let Incoming::Frame(AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(t)),
        )) = &next
        {
            self.tune = Some(t.clone());
        }
        next
    }

    /// [`Self::start_ok`], asserting that connection.tune follows.
    ///
    /// # Panics
    /// When it does not.
    pub async fn start_and_tune(&mut self, hs: &Handshake) -> connection::Tune {
        match self.start_ok(hs).await {
            Incoming::Frame(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Tune(t)),
            )) => t,
            other => panic!("expected connection.tune, got {other:?}"),
        }
    }

    /// Sends tune-ok (values of `hs`, defaulting to the server's offer) and connection.open.
    pub async fn send_tune_ok_and_open(&mut self, hs: &Handshake) {
        let tune = self.tune.clone().expect("connection.tune received");
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: hs.channel_max.unwrap_or(tune.channel_max),
                frame_max: hs.frame_max.unwrap_or(tune.frame_max),
                heartbeat: hs.heartbeat,
            })),
        )
        .await;
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: hs.vhost.as_str().into(),
            })),
        )
        .await;
    }

    /// Writes bytes as they are.
    ///
    /// # Panics
    /// When the write fails or times out.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        tokio::time::timeout(TIMEOUT, self.stream.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write");
    }

    /// Writes bytes, returning whether the write succeeded (the peer may have closed).
    pub async fn try_send_bytes(&mut self, bytes: &[u8]) -> bool {
        matches!(
            tokio::time::timeout(TIMEOUT, self.stream.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// Serializes a frame.
    pub fn encode(frame: &AMQPFrame) -> Vec<u8> {
        gen_frame(frame)(WriteContext::from(Vec::new()))
            .expect("serialize frame")
            .write
    }

    /// Writes one frame.
    pub async fn send(&mut self, frame: AMQPFrame) {
        let bytes = Self::encode(&frame);
        self.send_bytes(&bytes).await;
    }

    /// Writes a method frame.
    pub async fn send_method(&mut self, channel: u16, method: AMQPClass) {
        self.send(AMQPFrame::Method(channel, method)).await;
    }

    /// Writes a content header frame for class basic.
    pub async fn send_header(
        &mut self,
        channel: u16,
        body_size: u64,
        properties: basic::AMQPProperties,
    ) {
        self.send(AMQPFrame::Header(
            channel,
            AMQPContentHeader {
                class_id: 60,
                body_size,
                properties,
            },
        ))
        .await;
    }

    /// Writes a body frame.
    pub async fn send_body(&mut self, channel: u16, data: &[u8]) {
        self.send(AMQPFrame::Body(channel, data.to_vec())).await;
    }

    /// Publishes `body` to the default exchange (method, header, one body frame if non-empty).
    pub async fn publish(&mut self, channel: u16, routing_key: &str, body: &[u8]) {
        self.publish_full(channel, "", routing_key, false, body, Default::default())
            .await;
    }

    /// Publishes with every knob.
    pub async fn publish_full(
        &mut self,
        channel: u16,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: basic::AMQPProperties,
    ) {
        let bytes =
            Self::publish_frames(channel, exchange, routing_key, mandatory, body, properties);
        self.send_bytes(&bytes).await;
    }

    /// The frames of a publish (method, header, one body frame if non-empty), to send later,
    /// e.g. several publishes in one write.
    pub fn publish_frames(
        channel: u16,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: basic::AMQPProperties,
    ) -> Vec<u8> {
        let mut bytes = Self::encode(&AMQPFrame::Method(
            channel,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: exchange.into(),
                routing_key: routing_key.into(),
                mandatory,
                immediate: false,
            })),
        ));
        bytes.extend(Self::encode(&AMQPFrame::Header(
            channel,
            AMQPContentHeader {
                class_id: 60,
                body_size: body.len() as u64,
                properties,
            },
        )));
        if !body.is_empty() {
            bytes.extend(Self::encode(&AMQPFrame::Body(channel, body.to_vec())));
        }
        bytes
    }

    /// Sends channel.open on `channel` and expects channel.open-ok.
    ///
    /// # Panics
    /// When open-ok does not come.
    pub async fn open_channel(&mut self, channel: u16) {
        self.send_method(
            channel,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        match self.recv_frame().await {
            AMQPFrame::Method(ch, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))
                if ch == channel => {}
            other => panic!("expected channel.open-ok on {channel}, got {other:?}"),
        }
    }

    /// Sends a method and returns the next non-heartbeat frame (its reply).
    ///
    /// # Panics
    /// When nothing comes, or the socket closes.
    pub async fn rpc(&mut self, channel: u16, method: AMQPClass) -> AMQPFrame {
        self.send_method(channel, method).await;
        self.recv_frame().await
    }

    /// The next incoming frame or close, skipping heartbeats, within `wait`; `None` on timeout.
    pub async fn recv_timeout(&mut self, wait: Duration) -> Option<Incoming> {
        tokio::time::timeout(wait, async {
            loop {
                match self.recv_any().await {
                    Incoming::Frame(AMQPFrame::Heartbeat) => continue,
                    other => return other,
                }
            }
        })
        .await
        .ok()
    }

    /// The next incoming frame or close, skipping heartbeats.
    ///
    /// # Panics
    /// When nothing comes within [`TIMEOUT`].
    pub async fn recv(&mut self) -> Incoming {
        match self.recv_timeout(TIMEOUT).await {
            Some(i) => i,
            None => panic!("nothing received within {TIMEOUT:?}"),
        }
    }

    /// The next frame (skipping heartbeats).
    ///
    /// # Panics
    /// When the socket closes or nothing comes within [`TIMEOUT`].
    pub async fn recv_frame(&mut self) -> AMQPFrame {
        match self.recv().await {
            Incoming::Frame(f) => f,
            Incoming::Closed => panic!("server closed the socket while a frame was expected"),
        }
    }

    /// The next frame or close, heartbeats included, with no timeout of its own.
    pub async fn recv_any(&mut self) -> Incoming {
        loop {
            if self.buf.len() >= 7 {
                if self.buf.starts_with(b"AMQP") && self.buf.len() >= 8 {
                    let frame = parse_frame(&self.buf[..8]).map(|(_, f)| f);
                    self.buf.drain(..8);
                    return Incoming::Frame(frame.expect("protocol header from server"));
                }
                let size = u32::from_be_bytes(self.buf[3..7].try_into().expect("4 bytes")) as usize;
                let total = 7 + size + 1;
                if self.buf.len() >= total {
                    let frame = match parse_frame(&self.buf[..total]) {
                        Ok((_, f)) => f,
                        Err(e) => panic!(
                            "cannot parse a frame from the server ({e}): {:02x?}",
                            &self.buf[..total.min(64)]
                        ),
                    };
                    self.buf.drain(..total);
                    return Incoming::Frame(frame);
                }
            }
            self.buf.reserve(64 * 1024);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Incoming::Closed,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        IoKind::ConnectionReset | IoKind::ConnectionAborted | IoKind::BrokenPipe
                    ) =>
                {
                    return Incoming::Closed;
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Closes the sending side of the socket (the server reads EOF), keeping the reading side.
    ///
    /// # Panics
    /// When the shutdown fails.
    pub async fn shutdown_write(&mut self) {
        self.stream.shutdown().await.expect("shutdown");
    }

    /// Reads raw bytes until the server closes the socket (for the protocol-header reply).
    ///
    /// # Panics
    /// When the socket is not closed within [`TIMEOUT`].
    pub async fn read_until_closed(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        tokio::time::timeout(TIMEOUT, async {
            loop {
                out.reserve(4096);
                match self.stream.read_buf(&mut out).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("the server did not close the socket");
        out
    }

    /// Expects a connection.close with `code` (and `text` when given), answers close-ok, and
    /// expects the socket to be closed. Returns the close's (class_id, method_id).
    ///
    /// # Panics
    /// When something else comes.
    pub async fn expect_connection_close(&mut self, code: u16, text: Option<&str>) -> (u16, u16) {
        let close = match self.recv().await {
            Incoming::Frame(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(c)),
            )) => c,
            other => panic!("expected connection.close {code}, got {other:?}"),
        };
        assert_eq!(
            close.reply_code, code,
            "connection.close reply code (text {:?})",
            close.reply_text
        );
        if let Some(text) = text {
            assert_eq!(
                close.reply_text.as_str(),
                crate::wire_text(text),
                "connection.close text"
            );
        }
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        )
        .await;
        (close.class_id, close.method_id)
    }

    /// [`Self::expect_connection_close`], then expects the socket to be closed with nothing
    /// more sent (frames received after close-ok are a failure).
    ///
    /// # Panics
    /// When something else comes.
    pub async fn expect_connection_close_and_eof(
        &mut self,
        code: u16,
        text: Option<&str>,
    ) -> (u16, u16) {
        let ids = self.expect_connection_close(code, text).await;
        self.expect_closed().await;
        ids
    }

    /// Expects the socket to be closed with no further frame.
    ///
    /// # Panics
    /// When a frame comes, or the socket stays open beyond [`TIMEOUT`].
    pub async fn expect_closed(&mut self) {
        match self.recv().await {
            Incoming::Closed => {}
            other => panic!("expected the socket to be closed, got {other:?}"),
        }
    }

    /// Expects a channel.close on `channel` with `code` (and `text`), answers close-ok.
    /// Returns the close's (class_id, method_id).
    ///
    /// # Panics
    /// When something else comes.
    pub async fn expect_channel_close(
        &mut self,
        channel: u16,
        code: u16,
        text: Option<&str>,
    ) -> (u16, u16) {
        let close = match self.recv().await {
            Incoming::Frame(AMQPFrame::Method(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::Close(c)),
            )) if ch == channel => c,
            other => panic!("expected channel.close {code} on {channel}, got {other:?}"),
        };
        assert_eq!(
            close.reply_code, code,
            "channel.close reply code (text {:?})",
            close.reply_text
        );
        if let Some(text) = text {
            assert_eq!(
                close.reply_text.as_str(),
                crate::wire_text(text),
                "channel.close text"
            );
        }
        self.send_method(
            channel,
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        )
        .await;
        (close.class_id, close.method_id)
    }

    /// queue.declare (plain, non-passive) on `channel`, expecting declare-ok.
    ///
    /// # Panics
    /// When declare-ok does not come.
    pub async fn declare_queue(&mut self, channel: u16, name: &str) -> queue::DeclareOk {
        self.declare(channel, name, false).await
    }

    /// queue.declare passive on `channel`, expecting declare-ok (its counts).
    ///
    /// # Panics
    /// When declare-ok does not come.
    pub async fn declare_passive(&mut self, channel: u16, name: &str) -> queue::DeclareOk {
        self.declare(channel, name, true).await
    }

    async fn declare(&mut self, channel: u16, name: &str, passive: bool) -> queue::DeclareOk {
        match self
            .rpc(
                channel,
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: name.into(),
                    passive,
                    durable: false,
                    exclusive: false,
                    auto_delete: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            )
            .await
        {
            AMQPFrame::Method(ch, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)))
                if ch == channel =>
            {
                ok
            }
            other => panic!("expected queue.declare-ok, got {other:?}"),
        }
    }

    /// queue.purge on `channel`, returning the purged count.
    ///
    /// # Panics
    /// When purge-ok does not come.
    pub async fn purge(&mut self, channel: u16, name: &str) -> u32 {
        match self
            .rpc(
                channel,
                AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
                    queue: name.into(),
                    nowait: false,
                })),
            )
            .await
        {
            AMQPFrame::Method(ch, AMQPClass::Queue(queue::AMQPMethod::PurgeOk(ok)))
                if ch == channel =>
            {
                ok.message_count
            }
            other => panic!("expected queue.purge-ok, got {other:?}"),
        }
    }

    /// queue.delete on `channel`, expecting delete-ok.
    ///
    /// # Panics
    /// When delete-ok does not come.
    pub async fn delete_queue(&mut self, channel: u16, name: &str) {
        match self
            .rpc(
                channel,
                AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                    queue: name.into(),
                    if_unused: false,
                    if_empty: false,
                    nowait: false,
                })),
            )
            .await
        {
            AMQPFrame::Method(ch, AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_)))
                if ch == channel => {}
            other => panic!("expected queue.delete-ok, got {other:?}"),
        }
    }

    /// Reads frames until one satisfies `pred` (the others, e.g. deliveries, are skipped).
    ///
    /// # Panics
    /// When the socket closes or no such frame comes within [`TIMEOUT`].
    pub async fn recv_until(&mut self, pred: impl Fn(&AMQPFrame) -> bool) -> AMQPFrame {
        loop {
            let f = self.recv_frame().await;
            if pred(&f) {
                return f;
            }
        }
    }

    /// queue.delete on `channel`, skipping any deliveries that come before delete-ok.
    ///
    /// # Panics
    /// When delete-ok does not come.
    pub async fn delete_queue_skipping_deliveries(&mut self, channel: u16, name: &str) {
        self.send_method(
            channel,
            AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: name.into(),
                if_unused: false,
                if_empty: false,
                nowait: false,
            })),
        )
        .await;
        self.recv_until(|f| {
            matches!(
                f,
                AMQPFrame::Method(ch, AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_)))
                    if *ch == channel
            )
        })
        .await;
    }

    /// Closes the connection cleanly (connection.close 200), skipping whatever still comes
    /// before close-ok (deliveries, cancels).
    ///
    /// # Panics
    /// When close-ok does not come.
    pub async fn close(mut self) {
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        )
        .await;
        self.recv_until(|f| {
            matches!(
                f,
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))
            )
        })
        .await;
    }
}

/// A frame's bytes with a raw type, channel and payload (for malformed frames).
pub fn raw_frame(frame_type: u8, channel: u16, payload: &[u8], end: u8) -> Vec<u8> {
    let mut out = vec![frame_type];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(end);
    out
}

/// A method frame's payload for class/method ids and raw argument bytes.
pub fn method_payload(class_id: u16, method_id: u16, args: &[u8]) -> Vec<u8> {
    let mut out = class_id.to_be_bytes().to_vec();
    out.extend_from_slice(&method_id.to_be_bytes());
    out.extend_from_slice(args);
    out
}

/// basic.consume of `queue` with `tag` (not exclusive, no arguments, a consume-ok wanted).
pub fn consume(queue: &str, tag: &str, no_ack: bool) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
        queue: queue.into(),
        consumer_tag: tag.into(),
        no_local: false,
        no_ack,
        exclusive: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

/// basic.cancel of `tag`, a cancel-ok wanted.
pub fn cancel(tag: &str) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
        consumer_tag: tag.into(),
        nowait: false,
    }))
}

/// A `LongString` table value.
pub fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A `ShortString`.
pub fn short(s: &str) -> ShortString {
    s.into()
}
