//! A client connection: the handshake, then one task that owns the connection's channels and
//! multiplexes the socket (read and write halves), its mailbox and the heartbeat timer. No
//! lock is held across an `.await`; the vhost lock is taken briefly inside handlers.

mod consumer_timeout;
mod handshake;
mod output;
mod read_pacing;
pub(crate) mod teardown;

use crate::alarm::{Alarms, Throttle};
use crate::channel::{Channel, ChannelState, SettleCount};
use crate::codec::{self, Decoded, Frame};
use crate::error::AmqpError;
use crate::mailbox::{Mailbox, MailboxReceiver, Outbound, mailbox};
use crate::message::{Message, SHARED_BODY_MIN};
use crate::queue::ConnId;
use crate::server::{BrokerShared, ConnectionEntry};
use crate::trace::Direction;
use crate::vhost::Vhost;
use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
use bytes::{Buf, Bytes, BytesMut};
use consumer_timeout::Steps;
pub(crate) use handshake::method_name;
use handshake::{HandshakeError, Tuning, handshake};
use output::{MAX_SLICES, Output};
use read_pacing::ReadPacing;
use rustc_hash::FxHashMap;
use std::borrow::Cow;
use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

/// Stop reading from a client while this much output waits to be written (backpressure), and
/// stop taking deliveries from the mailbox.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// The frame size limit before tune-ok: the spec's minimum frame size.
pub(crate) const HANDSHAKE_FRAME_MAX: u32 = 4096;
/// How long to wait, after the close handshake, for the client to close its socket.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Why a connection ended when its close handshake completed.
const CLOSED_CLEANLY: &str = "closed";
/// How long to wait for connection.close-ok after sending connection.close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a connection is in its life after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Normal operation.
    Open,
    /// The server sent connection.close and waits for close-ok until the deadline.
    Closing(Instant),
    /// Done: flush what is pending and end.
    Closed,
}

/// A connection's state, apart from its socket: everything the handlers touch.
#[derive(Debug)]
pub(crate) struct Connection {
    /// Its id within the broker.
    pub(crate) id: ConnId,
    /// The broker.
    pub(crate) shared: Arc<BrokerShared>,
    /// Its vhost.
    pub(crate) vhost: Arc<Vhost>,
    /// Frames waiting to be written.
    pub(crate) out: Output,
    /// Open (or closing) channels.
    pub(crate) channels: FxHashMap<u16, Channel>,
    /// Negotiated limits.
    pub(crate) tuning: Tuning,
    /// The sending side of its own mailbox, given to its consumers.
    pub(crate) mailbox: Mailbox,
    /// Life cycle.
    pub(crate) state: ConnState,
    /// Open channels, published for inspection.
    pub(crate) channel_count: Arc<AtomicUsize>,
    /// Channels with publisher confirms to send once the current batch of frames is handled.
    pub(crate) confirms_due: Vec<u16>,
    /// Frames read but not yet handled because the output reached [`OUT_HIGH_WATER`]: they are
    /// handled once it drains (a read can hold thousands of basic.get, each answered with a
    /// whole message).
    input_held: bool,
    /// Per-source (queue and consumer) counts of the ack being handled, by the shared
    /// [`Source`](crate::queue::Source)'s address; kept between acks to reuse its table.
    pub(crate) settle_counts: FxHashMap<usize, SettleCount>,
    /// Messages an ack settled, freed once the vhost lock is released (see
    /// `methods::basic::free_settled`); kept empty between acks for its capacity.
    pub(crate) settled_messages: Vec<Message>,
    /// Where the next [`Connection::redispatch`] starts among the connection's consumers.
    redispatch_from: usize,
    /// Complete publishes not yet routed: a run of publishes is routed under one hold of the
    /// vhost lock, and each mailbox then takes its share of the deliveries at once (see
    /// [`crate::mailbox::Outbox`]). Routed once `MAX_STAGED` wait, before any other frame is
    /// handled, before a channel or connection error is reported, and when the input read is
    /// done, so nothing else this connection does can tell.
    pub(crate) staged: Vec<(u16, crate::channel::Publication, crate::message::Message)>,
    /// How much it reads at a time and when it lets other tasks run, which depends on how
    /// its publishes' deliveries spread over consumer connections (see [`ReadPacing`]).
    pub(crate) pacing: ReadPacing,
    /// Publisher throttling under resource alarms.
    throttle: Throttle,
    /// Whether the throttle holds its input, published for inspection.
    blocked: Arc<AtomicBool>,
    /// The consumer-timeout clock: steps since the connection opened (see
    /// [`consumer_timeout`]), stamped on deliveries awaiting an ack.
    pub(crate) clock: u32,
}

/// Serves one client connection over any byte stream until it ends, then returns its
/// unacknowledged and undelivered messages to their queues.
pub(crate) async fn serve<S>(stream: S, shared: Arc<BrokerShared>, peer: String)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let shutdown = shared.shutdown.clone();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut rbuf = BytesMut::with_capacity(16 * 1024);
    let handshake_timeout = shared.config.handshake_timeout;
    let tuning = tokio::select! {
        result = tokio::time::timeout(handshake_timeout, handshake(&mut rd, &mut wr, &mut rbuf, &shared)) => match result {
            Ok(Ok(tuning)) => tuning,
            Ok(Err(e)) => {
                refuse(&mut rd, &mut wr, &mut rbuf, &peer, e).await;
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, "closing connection: handshake timeout ({:?})", handshake_timeout);
                return;
            }
        },
        _ = shutdown.cancelled() => return,
    };
    let (mailbox, mut inbox) = mailbox();
    let channel_count = Arc::new(AtomicUsize::new(0));
    let blocked = Arc::new(AtomicBool::new(false));
    let (id, alarms) = shared.register_connection(ConnectionEntry {
        blocked: blocked.clone(),
        channels: channel_count.clone(),
        peer: peer.clone(),
        user: tuning.user.clone(),
        client: tuning.client.clone(),
        name: tuning.name.clone(),
        mailbox: mailbox.clone(),
        vhost: tuning.vhost.clone(),
    });
    if !shared.has_vhost(&tuning.vhost) {
        // Deleted between connection.open and here: as if it had been deleted just after.
        let text = format!("vhost '{}' is deleted", tuning.vhost.name);
        let _ = mailbox.send(Outbound::Close(AmqpError::connection_forced(text)));
    } else if !shared.has_user(&tuning.user) {
        // Likewise for a user deleted meanwhile.
        let text = format!("user '{}' is deleted", tuning.user);
        let _ = mailbox.send(Outbound::Close(AmqpError::connection_forced(text)));
    }
    tracing::info!(%peer, conn = id, user = %tuning.user, client = %tuning.client, "accepting AMQP connection");
    let vhost = tuning.vhost.clone();
    let throttle = Throttle::new(alarms, tuning.blocked_notify);
    let mut conn = Connection {
        id,
        shared: shared.clone(),
        vhost,
        out: Output::with_capacity(16 * 1024),
        channels: FxHashMap::default(),
        tuning,
        mailbox,
        state: ConnState::Open,
        channel_count,
        confirms_due: Vec::new(),
        input_held: false,
        settle_counts: FxHashMap::default(),
        settled_messages: Vec::new(),
        redispatch_from: 0,
        staged: Vec::new(),
        pacing: ReadPacing::default(),
        throttle,
        blocked,
        clock: 0,
    };
    // Frames the client pipelined behind connection.open are already buffered.
    conn.process_input(&mut rbuf);
    let end = conn
        .run(&mut rd, &mut wr, &mut rbuf, &mut inbox, &shutdown)
        .await;
    conn.teardown(&mut inbox);
    shared.unregister_connection(id);
    tracing::info!(%peer, conn = id, "closing AMQP connection ({end})");
    if end == CLOSED_CLEANLY {
        // After the close handshake the client closes its socket first (clients such as lapin
        // report an error when the server's close arrives first): give it a moment.
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            let mut scratch = [0u8; 512];
            while matches!(rd.read(&mut scratch).await, Ok(n) if n > 0) {}
        })
        .await;
    }
    let _ = wr.shutdown().await;
}

/// Answers a failed handshake as RabbitMQ does, then lets the socket close.
async fn refuse<R, W>(rd: &mut R, wr: &mut W, rbuf: &mut BytesMut, peer: &str, e: HandshakeError)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match e {
        HandshakeError::Io => tracing::debug!(%peer, "connection closed during handshake"),
        HandshakeError::BadHeader => {
            tracing::warn!(%peer, "bad protocol header: answered with AMQP 0-9-1's")
        }
        HandshakeError::Silent(e) => tracing::warn!(%peer, "handshake failed: {}", e.text),
        HandshakeError::Protocol(e) => {
            tracing::warn!(%peer, "handshake failed: {}", e.text);
            let mut out = Vec::new();
            codec::write_method(&mut out, 0, close_method(&e));
            if wr.write_all(&out).await.is_err() {
                return;
            }
            // Wait (briefly) for close-ok, so the client reads the close before the socket goes.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                loop {
                    match codec::decode(rbuf, HANDSHAKE_FRAME_MAX) {
                        Ok(Some(Frame::Method(
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)),
                        ))) => return,
                        Ok(Some(_)) => continue,
                        Ok(None) => {}
                        Err(_) => return,
                    }
                    match rd.read_buf(rbuf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
    }
}

/// connection.close for an error.
fn close_method(e: &AmqpError) -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
        reply_code: e.code,
        reply_text: e.reply_text(),
        class_id: e.class_id,
        method_id: e.method_id,
    }))
}

impl Connection {
    /// The main loop: returns why the connection ended.
    async fn run<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        rbuf: &mut BytesMut,
        inbox: &mut MailboxReceiver,
        shutdown: &CancellationToken,
    ) -> &'static str
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let heartbeat = Duration::from_secs(self.tuning.heartbeat as u64);
        // As RabbitMQ: a heartbeat every half interval when nothing else was written, and the
        // peer dropped after two intervals of silence.
        let period = if heartbeat.is_zero() {
            Duration::from_secs(3600)
        } else {
            heartbeat / 2
        };
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout_steps = self.shared.config.consumer_timeout.map(Steps::new);
        let step = timeout_steps.map_or(Duration::from_secs(3600), |s| s.period);
        let mut timeout_ticker = tokio::time::interval_at(Instant::now() + step, step);
        timeout_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_read = Instant::now();
        let mut wrote_since_tick = false;
        let mut shutting_down = false;
        loop {
            if self.input_held && self.out_pending() < OUT_HIGH_WATER && !self.input_blocked() {
                self.process_input(rbuf);
            }
            if self.state == ConnState::Closed && self.out_pending() == 0 {
                return CLOSED_CLEANLY;
            }
            let closing_deadline = match self.state {
                ConnState::Closing(at) => Some(at),
                _ => None,
            };
            // A blocked connection's socket is not read (its heartbeats neither, so their
            // monitoring pauses below).
            let reading = self.state != ConnState::Closed
                && self.out_pending() < OUT_HIGH_WATER
                && !self.input_blocked();
            let taking = self.state == ConnState::Open && self.out_pending() < OUT_HIGH_WATER;
            if reading {
                self.pacing.prepare(rbuf);
            }
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let filled = self.out.slices(&mut slices);
            tokio::select! {
                read = rd.read_buf(rbuf), if reading => match read {
                    Ok(0) => return "client closed the socket",
                    Err(_) => return "socket error",
                    Ok(n) => {
                        self.pacing.read(n);
                        last_read = Instant::now();
                        self.process_input(rbuf);
                        if self.pacing.after_handling(rbuf) {
                            // Let the consumers this input fed (and every other connection)
                            // run before reading more.
                            tokio::task::yield_now().await;
                        }
                    }
                },
                written = wr.write_vectored(&slices[..filled]), if filled > 0 => match written {
                    Ok(0) | Err(_) => return "socket error while writing",
                    Ok(n) => {
                        self.out.wrote(n);
                        wrote_since_tick = true;
                    }
                },
                item = inbox.recv(), if taking => {
                    if let Some(item) = item {
                        self.handle_outbound(item);
                        while self.state == ConnState::Open && self.out_pending() < OUT_HIGH_WATER
                            && let Some(item) = inbox.try_recv()
                        {
                            self.handle_outbound(item);
                        }
                    }
                    if inbox.take_starved() {
                        self.redispatch();
                    }
                },
                _ = ticker.tick(), if !heartbeat.is_zero() => {
                    if self.input_blocked() {
                        last_read = Instant::now();
                    }
                    if last_read.elapsed() >= heartbeat * 2 {
                        tracing::warn!(conn = self.id, "missed heartbeats from client, timeout: {}s", heartbeat.as_secs());
                        return "missed heartbeats";
                    }
                    if !wrote_since_tick && self.out_pending() == 0 {
                        codec::write_heartbeat(&mut self.out.bytes);
                    }
                    wrote_since_tick = false;
                },
                _ = timeout_ticker.tick(), if timeout_steps.is_some() => {
                    if let Some(steps) = timeout_steps {
                        self.consumer_timeout_step(steps);
                    }
                },
                _ = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    self.close_connection(AmqpError::connection_forced(
                        "broker forced connection closure with reason 'shutdown'",
                    ));
                },
                _ = sleep_until(closing_deadline.unwrap_or_else(Instant::now)), if closing_deadline.is_some() => {
                    return "no close-ok in time";
                }
            }
        }
    }

    /// Decodes and handles the complete frames in `rbuf`, stopping early (see
    /// [`Connection::input_held`]) while the output is above [`OUT_HIGH_WATER`].
    fn process_input(&mut self, rbuf: &mut BytesMut) {
        loop {
            if self.state == ConnState::Closed {
                rbuf.clear();
                self.route_staged();
                self.flush_confirms();
                return;
            }
            self.input_held = self.out_pending() >= OUT_HIGH_WATER || self.input_blocked();
            let decoded = if self.input_held {
                Ok(None)
            } else {
                codec::decode_at(rbuf, self.tuning.frame_max).map(Some)
            };
            match decoded {
                Ok(Some(Decoded::Frame(Frame::Body(channel, body), len)))
                    if body.len() >= SHARED_BODY_MIN =>
                {
                    // A large body is taken as a slice of the read buffer, not copied: the
                    // payload sits between the frame's header and its frame-end byte.
                    let payload_len = body.len();
                    let frame = rbuf.split_to(len).freeze();
                    let payload = frame.slice(len - 1 - payload_len..len - 1);
                    self.handle_frame(
                        Frame::Body(channel, Cow::Borrowed(&payload)),
                        Some(&payload),
                    );
                }
                Ok(Some(Decoded::Frame(frame, len))) => {
                    self.handle_frame(frame, None);
                    rbuf.advance(len);
                }
                Ok(incomplete) => {
                    if let Some(Decoded::Incomplete(needed)) = incomplete {
                        codec::reserve_for(rbuf, needed);
                    }
                    self.route_staged();
                    self.flush_confirms();
                    self.channel_count
                        .store(self.channels.len(), Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    // The stream cannot be resynchronised after a framing error.
                    rbuf.clear();
                    self.route_staged();
                    self.flush_confirms();
                    self.close_connection(e);
                    return;
                }
            }
        }
    }

    /// Bytes waiting to be written.
    fn out_pending(&self) -> usize {
        self.out.pending()
    }

    /// Appends a method frame to the output.
    pub(crate) fn send(&mut self, channel: u16, method: AMQPClass) {
        if let Some(trace) = &self.shared.trace {
            trace.record(self.id, Direction::Sent, channel, &method);
        }
        codec::write_method(&mut self.out.bytes, channel, method);
    }

    /// Records a method written directly rather than through [`Connection::send`] in the
    /// trace, when one is kept; `method` is built only then.
    pub(crate) fn trace_sent(&self, channel: u16, method: impl FnOnce() -> AMQPClass) {
        if let Some(trace) = &self.shared.trace {
            trace.record(self.id, Direction::Sent, channel, &method());
        }
    }

    /// Handles one frame; `shared_body` is a body frame's payload as a slice of the read
    /// buffer, when it was split off (see [`SHARED_BODY_MIN`]).
    fn handle_frame(&mut self, frame: Frame<'_>, shared_body: Option<&Bytes>) {
        // Staged publishes are routed (and answered) before anything else is handled.
        if !matches!(
            frame,
            Frame::Header { .. }
                | Frame::Body(..)
                | Frame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Publish(_)))
        ) {
            self.route_staged();
        }
        if let (Some(trace), Frame::Method(channel, method)) = (&self.shared.trace, &frame) {
            trace.record(self.id, Direction::Received, *channel, method);
        }
        if let ConnState::Closing(_) | ConnState::Closed = self.state {
            // Once a close is sent, only the close handshake counts.
            match frame {
                Frame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(_))) => {
                    self.send(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    );
                    self.state = ConnState::Closed;
                }
                Frame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {
                    self.state = ConnState::Closed;
                }
                _ => {}
            }
            return;
        }
        let result = match frame {
            Frame::Heartbeat => Ok(()),
            Frame::Method(0, method) => self.connection_method(method),
            Frame::Header {
                channel: 0,
                raw_properties,
                ..
            } => Err((
                0,
                AmqpError::unexpected_frame(format!(
                    "type 2, all octets = {}",
                    codec::erlang_binary(&raw_properties)
                )),
            )),
            Frame::Body(0, body) => Err((
                0,
                AmqpError::unexpected_frame(format!(
                    "type 3, all octets = {}",
                    codec::erlang_binary(&body[..body.len().min(64)])
                )),
            )),
            Frame::Method(channel, method) => self.channel_method(channel, method),
            Frame::Header {
                channel,
                class_id,
                body_size,
                properties,
                raw_properties,
            } => self.content_header(channel, class_id, body_size, properties, raw_properties),
            Frame::Body(channel, body) => self.content_body(channel, &body, shared_body),
        };
        if let Err((channel, e)) = result {
            self.fail(channel, e);
        }
    }

    /// Reports an error in its scope: channel.close, or connection.close.
    pub(crate) fn fail(&mut self, channel: u16, e: AmqpError) {
        // Publishes handled before the error are routed and confirmed before the close.
        self.route_staged();
        self.flush_confirms();
        if e.is_connection_error() || channel == 0 {
            self.close_connection(e);
        } else {
            tracing::warn!(conn = self.id, channel, "channel error: {}", e.text);
            self.send(
                channel,
                AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                    reply_code: e.code,
                    reply_text: e.reply_text(),
                    class_id: e.class_id,
                    method_id: e.method_id,
                })),
            );
            self.release_channel(channel);
            if let Some(ch) = self.channels.get_mut(&channel) {
                ch.state = ChannelState::Closing;
            }
        }
    }

    /// Sends connection.close and waits for close-ok.
    pub(crate) fn close_connection(&mut self, e: AmqpError) {
        if self.state != ConnState::Open {
            return;
        }
        if e.code == 320 {
            tracing::info!(conn = self.id, "closing connection: {}", e.text);
        } else {
            tracing::warn!(conn = self.id, "connection error: {}", e.text);
        }
        self.send(0, close_method(&e));
        self.state = ConnState::Closing(Instant::now() + CLOSE_TIMEOUT);
    }

    /// Methods on channel 0.
    fn connection_method(&mut self, method: AMQPClass) -> Result<(), (u16, AmqpError)> {
        match method {
            AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                // Publishes read before the close are confirmed before close-ok.
                self.flush_confirms();
                self.send(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                self.state = ConnState::Closed;
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                self.state = ConnState::Closed;
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => Err((
                0,
                AmqpError::not_implemented("connection.update_secret").during(&method),
            )),
            AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
            | AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => Ok(()),
            other => Err((
                0,
                AmqpError::channel_error("unexpected method in connection state running")
                    .during(&other),
            )),
        }
    }

    /// Asks the queues this connection consumes from to dispatch again (its mailbox has room
    /// after being full), until the mailbox is full again. Each call starts where the last one
    /// stopped, so every queue gets its turn, and the queues after the one that filled the
    /// mailbox are not looked at (with a thousand queues, that is most of them).
    fn redispatch(&mut self) {
        let now = Instant::now();
        let mut state = self.vhost.lock();
        let consumed = self.channels.values().flat_map(|ch| ch.consumers.values());
        let total = consumed.clone().count();
        if total == 0 {
            return;
        }
        let start = self.redispatch_from % total;
        let mut visited = 0;
        for consumer in consumed.cycle().skip(start).take(total) {
            if !self.mailbox.has_room() {
                break;
            }
            state.dispatch(consumer.queue(), now);
            visited += 1;
        }
        self.redispatch_from = start + visited;
    }

    /// Acts on an item from the mailbox.
    fn handle_outbound(&mut self, item: Outbound) {
        match item {
            Outbound::Deliver {
                channel,
                source,
                no_ack,
                message,
            } => self.deliver(channel, source, no_ack, message),
            Outbound::Cancel { channel, source } => self.server_cancel(channel, &source),
            Outbound::Close(e) => self.close_connection(e),
            Outbound::Alarms(alarms) => self.set_alarms(alarms),
        }
    }

    /// The broker's resource alarms changed (or were read when the connection opened).
    fn set_alarms(&mut self, alarms: Alarms) {
        if let Some(unblocked) = self.throttle.set_alarms(alarms) {
            self.send(0, unblocked);
        }
        self.blocked
            .store(self.throttle.is_blocked(), Ordering::Relaxed);
    }

    /// Whether a resource alarm holds the input: only while the connection is open (a closing
    /// one still reads its peer's close-ok).
    fn input_blocked(&self) -> bool {
        self.throttle.is_blocked() && self.state == ConnState::Open
    }

    /// A basic.publish arrived: under a resource alarm the connection is blocked from here on
    /// (the frames after this one stay unread until the alarms clear).
    pub(crate) fn publish_received(&mut self) {
        if let Some(blocked) = self.throttle.publish_received() {
            self.send(0, blocked);
        }
        if self.throttle.is_blocked() {
            self.blocked.store(true, Ordering::Relaxed);
        }
    }
}
