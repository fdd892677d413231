//! Shared helpers for Warren's integration tests. Every test runs against the embedded Warren
//! broker, or against the broker named by `AMQP_URL` (a real RabbitMQ 3.10, the oracle).
//!
//! # Layout
//! - this file: timeouts ([`within`]), lapin error inspection ([`amqp_error`],
//!   [`assert_amqp_error`]), scope checks ([`assert_channel_closed_only`],
//!   [`assert_connection_closed`]), small lapin shortcuts ([`publish`], [`declare`],
//!   [`declare_exchange`], [`bind_queue`], [`publish_confirmed_to`], ...).
//! - [`raw`]: a tiny raw-socket AMQP client built on amq-protocol's `gen_frame`/`parse_frame`,
//!   for the handshake and framing details lapin hides.

pub mod prop;
pub mod raw;

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, Consumer, Event, ExchangeKind,
    message::{BasicGetMessage, Delivery},
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
        BasicQosOptions, BasicRejectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};
use std::time::Duration;

/// The longest any single network wait may take before the test fails.
pub use warren_harness::DEFAULT_TIMEOUT as TIMEOUT;
/// Awaits a future, failing the test when it takes longer than [`TIMEOUT`].
pub use warren_harness::within;

/// Whether `AMQP_URL` points the tests at an external broker.
pub fn external() -> bool {
    warren_harness::external_url().is_some()
}

/// The AMQP reply code and text carried by a lapin error, if it is a protocol error.
pub fn amqp_error(err: &lapin::Error) -> Option<(u16, String)> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some((e.get_id(), e.get_message().to_string())),
        _ => None,
    }
}

/// RabbitMQ's 403 text for a PLAIN login it refuses (unknown user or wrong password).
pub const PLAIN_LOGIN_REFUSED: &str = "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.";

/// RabbitMQ's 406 text for a publish whose `user_id` property (`claimed`) is not the name of
/// the user that logged in (`user`), from a user not tagged `impersonator`.
pub fn user_id_refused(claimed: &str, user: &str) -> String {
    format!(
        "PRECONDITION_FAILED - user_id property set to '{claimed}' but authenticated user was '{user}'"
    )
}

/// A reply text as RabbitMQ sends it: texts over 255 bytes are cut to their first 252 bytes
/// followed by `...` (a short string holds at most 255 bytes).
pub fn wire_text(text: &str) -> String {
    if text.len() <= 255 {
        return text.to_owned();
    }
    let mut end = 252;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Asserts that `err` is an AMQP error with `code` and, when given, exactly `text` (the full
/// text; it is cut as RabbitMQ cuts it, see [`wire_text`]).
///
/// # Panics
/// When it is not.
#[track_caller]
pub fn assert_amqp_error(err: &lapin::Error, code: u16, text: Option<&str>) {
    match amqp_error(err) {
        Some((c, t)) => {
            assert_eq!(c, code, "reply code (text {t:?})");
            if let Some(text) = text {
                assert_eq!(t, wire_text(text), "reply text");
            }
        }
        None => panic!("expected AMQP error {code}, got {err:?}"),
    }
}

/// The error of a lapin connection to `url` that the broker must refuse (a wrong password,
/// an unknown vhost, a limit reached).
///
/// # Panics
/// When the connection opens, or nothing is decided within [`TIMEOUT`].
pub async fn refused_connection(url: &str) -> lapin::Error {
    expect_err(
        "a connection the broker must refuse",
        within("connect", Connection::connect(url, Default::default())).await,
    )
}

/// Unwraps the error of `res`, panicking with `what` when it succeeded.
///
/// # Panics
/// When `res` is `Ok`.
#[track_caller]
pub fn expect_err<T: std::fmt::Debug>(what: &str, res: lapin::Result<T>) -> lapin::Error {
    match res {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e,
    }
}

/// A listener for the connection's events, to catch errors of asynchronous methods (ack,
/// publish) that have no reply of their own, and `connection.blocked`. Create it *before*
/// the method that causes the event.
pub struct ErrorEvents(std::pin::Pin<Box<dyn futures_util::Stream<Item = Event> + Send>>);

impl ErrorEvents {
    /// Starts listening on `conn`.
    pub fn new(conn: &Connection) -> Self {
        Self(Box::pin(conn.events_listener()))
    }

    /// The next error event: the close of a channel or of the connection by the server.
    ///
    /// # Panics
    /// When none comes within [`TIMEOUT`].
    pub async fn next_error(&mut self) -> lapin::Error {
        self.next_matching(
            "an error event (channel.close/connection.close)",
            |event| match event {
                Event::Error(e) => Some(e),
                _ => None,
            },
        )
        .await
    }

    /// The reason of the next `connection.blocked`.
    ///
    /// # Panics
    /// When none comes within [`TIMEOUT`].
    pub async fn next_blocked(&mut self) -> String {
        self.next_matching("connection.blocked", |event| match event {
            Event::ConnectionBlocked(reason) => Some(reason),
            _ => None,
        })
        .await
    }

    /// The next event `pick` takes, skipping the others.
    async fn next_matching<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(Event) -> Option<T>,
    ) -> T {
        within(what, async {
            loop {
                match self.0.next().await {
                    Some(event) => {
                        if let Some(found) = pick(event) {
                            return found;
                        }
                    }
                    None => panic!("the connection's events ended before {what}"),
                }
            }
        })
        .await
    }
}

/// Asserts the scope of a channel error: `ch` is closed, the connection still works (a new
/// channel can declare, publish to and get from a queue).
///
/// # Panics
/// When the channel stays open or the connection does not work.
pub async fn assert_channel_closed_only(conn: &Connection, ch: &Channel) {
    closed_by_server("the channel", || ch.status().connected()).await;
    assert!(
        conn.status().connected(),
        "a channel error must not close the connection"
    );
    assert_connection_works(conn).await;
}

/// Waits (up to [`TIMEOUT`]) until `open` says no more.
async fn closed_by_server(what: &str, open: impl Fn() -> bool) {
    let goal = format!("{what} is closed by the server");
    warren_harness::wait_until(&goal, TIMEOUT, || async {
        if open() {
            Err("still open".to_owned())
        } else {
            Ok(())
        }
    })
    .await;
}

/// Asserts that `conn` can still open a channel and move a message through a fresh queue.
///
/// # Panics
/// When it cannot.
pub async fn assert_connection_works(conn: &Connection) {
    let ch = within("create_channel", conn.create_channel())
        .await
        .expect("open a new channel on a connection that must still work");
    let q = within(
        "queue.declare",
        ch.queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare on the still-working connection");
    publish(&ch, q.name().as_str(), b"still alive").await;
    let got = get(&ch, q.name().as_str(), true)
        .await
        .expect("the message just published");
    assert_eq!(got.delivery.data, b"still alive");
    within("channel.close", ch.close(200, "OK".into()))
        .await
        .expect("close the probe channel");
}

/// Asserts that the server closed `conn` (a connection-level error), and that it stays
/// unusable.
///
/// # Panics
/// When the connection is still open after [`TIMEOUT`].
pub async fn assert_connection_closed(conn: &Connection) {
    closed_by_server("the connection", || conn.status().connected()).await;
    assert!(
        within("create_channel", conn.create_channel())
            .await
            .is_err(),
        "a closed connection must refuse new channels"
    );
}

/// Declares a plain (non-durable, non-exclusive) queue named `name`.
///
/// # Panics
/// When the declare fails.
pub async fn declare(ch: &Channel, name: &str) -> lapin::Queue {
    declare_with(
        ch,
        name,
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("queue.declare {name}: {e}"))
}

/// `queue.declare` with options and arguments, within [`TIMEOUT`].
pub async fn declare_with(
    ch: &Channel,
    name: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> lapin::Result<lapin::Queue> {
    within(
        "queue.declare",
        ch.queue_declare(name.into(), options, args),
    )
    .await
}

/// `queue.declare` of `name` with `args` (and default options), within [`TIMEOUT`].
///
/// # Panics
/// When the declare fails.
pub async fn declare_args(ch: &Channel, name: &str, args: FieldTable) {
    declare_with(ch, name, QueueDeclareOptions::default(), args)
        .await
        .unwrap_or_else(|e| panic!("queue.declare {name}: {e}"));
}

/// A long-string table value, as RabbitMQ sends strings in tables and arguments.
pub fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// `exchange.declare` of `name` of `kind`, within [`TIMEOUT`].
///
/// # Panics
/// When the declare fails.
pub async fn declare_exchange(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
    options: ExchangeDeclareOptions,
    args: FieldTable,
) {
    within(
        "exchange.declare",
        ch.exchange_declare(name.into(), kind, options, args),
    )
    .await
    .unwrap_or_else(|e| panic!("exchange.declare {name}: {e}"));
}

/// `queue.bind` of `queue` to `exchange` with `key`, within [`TIMEOUT`].
///
/// # Panics
/// When the bind fails.
pub async fn bind_queue(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    within(
        "queue.bind",
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("queue.bind {queue} to {exchange}: {e}"));
}

/// Publishes on a confirm-mode channel and returns the broker's confirmation (with the
/// returned message of an unroutable mandatory publish).
///
/// # Panics
/// When the publish cannot be written or no confirmation comes.
pub async fn publish_confirmed_to(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    mandatory: bool,
) -> Confirmation {
    publish_confirmed_with(
        ch,
        exchange,
        key,
        body,
        mandatory,
        BasicProperties::default(),
    )
    .await
}

/// [`publish_confirmed_to`] with properties.
///
/// # Panics
/// When the publish cannot be written or no confirmation comes.
pub async fn publish_confirmed_with(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    mandatory: bool,
    props: BasicProperties,
) -> Confirmation {
    let confirm = within(
        "basic.publish",
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory,
                ..Default::default()
            },
            body,
            props,
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("basic.publish to {exchange}/{key}: {e}"));
    within("publisher confirm", confirm)
        .await
        .unwrap_or_else(|e| panic!("confirm of a publish to {exchange}/{key}: {e}"))
}

/// `basic.reject` of a delivery, within [`TIMEOUT`].
///
/// # Panics
/// When the reject cannot be written.
pub async fn reject(ch: &Channel, delivery_tag: u64, requeue: bool) {
    within(
        "basic.reject",
        ch.basic_reject(delivery_tag, BasicRejectOptions { requeue }),
    )
    .await
    .expect("basic.reject");
}

/// `queue.declare passive`, within [`TIMEOUT`].
pub async fn passive(ch: &Channel, name: &str) -> lapin::Result<lapin::Queue> {
    declare_with(
        ch,
        name,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// Deletes a queue (cleanup), within [`TIMEOUT`]; errors are ignored.
pub async fn delete_quietly(ch: &Channel, name: &str) {
    let _ = within(
        "queue.delete",
        ch.queue_delete(name.into(), QueueDeleteOptions::default()),
    )
    .await;
}

/// Cleans up `names` on a fresh connection (the test's own may be closed by then).
pub async fn cleanup(broker: &warren_harness::TestBroker, names: &[&str]) {
    let conn = broker.connect().await;
    let ch = within("create_channel", conn.create_channel())
        .await
        .expect("cleanup channel");
    for name in names {
        delete_quietly(&ch, name).await;
    }
    close_conn(&conn).await;
}

/// Publishes `body` to the default exchange with routing key `queue`.
///
/// # Panics
/// When the publish cannot be written.
pub async fn publish(ch: &Channel, queue: &str, body: &[u8]) {
    publish_with(ch, queue, body, BasicProperties::default()).await;
}

/// Publishes `body` with `props` to the default exchange with routing key `queue`.
///
/// # Panics
/// When the publish cannot be written.
pub async fn publish_with(ch: &Channel, queue: &str, body: &[u8], props: BasicProperties) {
    within(
        "basic.publish",
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props,
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("basic.publish to {queue}: {e}"));
}

/// Opens a channel in confirm mode (confirm.select).
///
/// # Panics
/// When channel.open or confirm.select fails.
pub async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = channel(conn).await;
    within(
        "confirm.select",
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default()),
    )
    .await
    .expect("confirm.select");
    ch
}

/// Publishes on a confirm-mode channel and waits for the broker's ack, so that the message is
/// in its queue when this returns (RabbitMQ answers a queue.declare's counts ahead of
/// publishes still on their way, so tests that count messages publish this way).
///
/// # Panics
/// When the publish fails or is not acked.
pub async fn publish_confirmed(ch: &Channel, queue: &str, body: &[u8]) {
    let confirm = within(
        "basic.publish",
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("basic.publish to {queue}: {e}"));
    let confirmation = within("publisher confirm", confirm)
        .await
        .unwrap_or_else(|e| panic!("confirm of a publish to {queue}: {e}"));
    assert!(
        confirmation.is_ack(),
        "publish to {queue} not acked: {confirmation:?}"
    );
}

/// `basic.get`, within [`TIMEOUT`]; `None` is get-empty.
///
/// # Panics
/// When the get fails.
pub async fn get(ch: &Channel, queue: &str, no_ack: bool) -> Option<BasicGetMessage> {
    within(
        "basic.get",
        ch.basic_get(queue.into(), BasicGetOptions { no_ack }),
    )
    .await
    .unwrap_or_else(|e| panic!("basic.get {queue}: {e}"))
}

/// `basic.get` repeated until a message comes (a publish on another channel or connection may
/// still be on its way), within [`TIMEOUT`].
///
/// # Panics
/// When no message comes.
pub async fn get_eventually(ch: &Channel, queue: &str, no_ack: bool) -> BasicGetMessage {
    warren_harness::wait_until(&format!("a message on {queue}"), TIMEOUT, async || {
        get(ch, queue, no_ack)
            .await
            .ok_or_else(|| "the queue is empty".to_owned())
    })
    .await
}

/// Gets every message in `queue` (no_ack) until get-empty, returning the bodies.
pub async fn drain_bodies(ch: &Channel, queue: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(m) = get(ch, queue, true).await {
        out.push(m.delivery.data);
    }
    out
}

/// Starts a consumer with a server-generated tag.
///
/// # Panics
/// When basic.consume fails.
pub async fn consume(ch: &Channel, queue: &str, no_ack: bool) -> Consumer {
    within(
        "basic.consume",
        ch.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("basic.consume {queue}: {e}"))
}

/// Opens a channel with prefetch `prefetch` and starts a consumer on `queue` on it (manual
/// acks; consumer priority `x-priority` = `priority`, if any).
///
/// # Panics
/// When basic.qos or basic.consume fails.
pub async fn consume_prefetched(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    priority: Option<AMQPValue>,
) -> (Channel, Consumer) {
    let ch = channel(conn).await;
    within(
        "basic.qos",
        ch.basic_qos(prefetch, BasicQosOptions::default()),
    )
    .await
    .expect("basic.qos");
    let mut args = FieldTable::default();
    if let Some(priority) = priority {
        args.insert("x-priority".into(), priority);
    }
    let consumer = within(
        "basic.consume",
        ch.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            args,
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("basic.consume {queue}: {e}"));
    (ch, consumer)
}

/// The next `n` deliveries of `consumer`: their bodies (as text) and redelivered flags.
///
/// # Panics
/// As [`next_delivery`].
pub async fn next_bodies(consumer: &mut Consumer, n: usize) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let d = next_delivery(consumer).await;
        out.push((String::from_utf8_lossy(&d.data).into_owned(), d.redelivered));
    }
    out
}

/// `(body, false)` for each body: what [`next_bodies`] returns for first deliveries.
pub fn not_redelivered(bodies: &[&str]) -> Vec<(String, bool)> {
    bodies.iter().map(|b| ((*b).to_owned(), false)).collect()
}

/// The `x-delivery-count` header a quorum queue puts on a delivery, if any.
pub fn delivery_count(properties: &BasicProperties) -> Option<AMQPValue> {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned())
}

/// Closes a channel cleanly (200), within [`TIMEOUT`].
///
/// # Panics
/// When channel.close fails.
pub async fn close_channel(ch: &Channel) {
    within("channel.close", ch.close(200, "OK".into()))
        .await
        .expect("channel.close");
}

/// Acknowledges everything delivered on `ch` so far (`multiple` with tag 0).
///
/// # Panics
/// When basic.ack fails.
pub async fn ack_all(ch: &Channel) {
    within(
        "basic.ack",
        ch.basic_ack(0, BasicAckOptions { multiple: true }),
    )
    .await
    .expect("basic.ack");
}

/// The next delivery of `consumer`.
///
/// # Panics
/// When none comes within [`TIMEOUT`], or the consumer ends or errors.
pub async fn next_delivery(consumer: &mut Consumer) -> Delivery {
    within("a delivery", consumer.next())
        .await
        .expect("consumer ended while a delivery was expected")
        .expect("consumer error while a delivery was expected")
}

/// Asserts that `consumer` receives nothing during `quiet` (a negative check: keep it short).
///
/// # Panics
/// When a delivery (or the end of the consumer) arrives.
pub async fn assert_no_delivery(consumer: &mut Consumer, quiet: Duration) {
    if let Ok(item) = tokio::time::timeout(quiet, consumer.next()).await {
        panic!("expected no delivery for {quiet:?}, got {item:?}");
    }
}

/// Closes a connection cleanly (200), within [`TIMEOUT`], ignoring errors (it may be gone).
pub async fn close_conn(conn: &Connection) {
    let _ = within("connection.close", conn.close(200, "OK".into())).await;
}

/// Opens a channel, within [`TIMEOUT`].
///
/// # Panics
/// When channel.open fails.
pub async fn channel(conn: &Connection) -> Channel {
    within("create_channel", conn.create_channel())
        .await
        .expect("channel.open")
}

/// Whether a mandatory publish to `queue` (through the default exchange) is routed, i.e. the
/// queue exists; unlike a passive declare or a get, a publish does not count as a use of an
/// expiring queue. `ch` is in confirm mode.
///
/// # Panics
/// When the publish is nacked or not confirmed in time.
pub async fn routed(ch: &Channel, queue: &str) -> bool {
    match publish_confirmed_to(ch, "", queue, b"probe", true).await {
        Confirmation::Ack(returned) => returned.is_none(),
        other => panic!("unexpected confirmation {other:?}"),
    }
}

/// Waits (up to [`TIMEOUT`]) until `queue` is gone, probing with [`routed`].
///
/// # Panics
/// When it is still there after [`TIMEOUT`].
pub async fn until_gone(ch: &Channel, queue: &str) {
    warren_harness::wait_until(&format!("{queue} is gone"), TIMEOUT, async || {
        if routed(ch, queue).await {
            Err("it is still there".to_owned())
        } else {
            Ok(())
        }
    })
    .await;
}
