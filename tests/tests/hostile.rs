//! Hostile input (issue 5, "Bad input"): each malformed input, sent over raw TCP, gets
//! RabbitMQ 3.10's answer (code, scope, class/method and text, as probed on the wire; see
//! `tests/ORACLE.md` and RELIABILITY.md) on that connection only. Every test keeps a lapin
//! connection open throughout and, at the end, completes a declare/publish/get round trip on it
//! and on a fresh connection: other clients keep working.
//!
//! Runs against the embedded broker (`cargo test`) and against RabbitMQ (`AMQP_URL=...`).
//! Where RabbitMQ's own reader or channel crashes (unknown method ids, some malformed content
//! headers, absurd long-string lengths), any connection-level close or a socket close is
//! accepted, as ORACLE.md records.

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use std::time::Duration;
use warren_harness::TestBroker;
use warren_tests::external;
use warren_tests::raw::{Incoming, PROTOCOL_HEADER, RawClient, method_payload, raw_frame};

/// The longest any single network wait may take.
const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Bytes on the wire
// ---------------------------------------------------------------------------------------------

/// A well-formed method frame from raw class/method ids and argument bytes.
fn method(channel: u16, class_id: u16, method_id: u16, args: &[u8]) -> Vec<u8> {
    raw_frame(1, channel, &method_payload(class_id, method_id, args), 0xCE)
}

/// A short string: length octet and bytes (any bytes, valid UTF-8 or not).
fn sstr(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![bytes.len() as u8];
    out.extend_from_slice(bytes);
    out
}

/// A long string or field table body: 32-bit length and bytes.
fn long(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// queue.declare on channel 1 with raw name bytes, flag octet and argument-table body.
fn declare(name: &[u8], flags: u8, table: &[u8]) -> Vec<u8> {
    let mut args = vec![0, 0];
    args.extend(sstr(name));
    args.push(flags);
    args.extend(long(table));
    method(1, 50, 10, &args)
}

/// queue.declare flags: exclusive (the queue goes with the connection).
const EXCLUSIVE: u8 = 4;

/// basic.publish on channel 1 with raw exchange and routing-key bytes.
fn publish(exchange: &[u8], routing_key: &[u8]) -> Vec<u8> {
    let mut args = vec![0, 0];
    args.extend(sstr(exchange));
    args.extend(sstr(routing_key));
    args.push(0);
    method(1, 60, 40, &args)
}

/// A content header on `channel` with raw class, body size, property flags and property bytes.
fn header(channel: u16, class_id: u16, body_size: u64, flags: u16, props: &[u8]) -> Vec<u8> {
    let mut payload = class_id.to_be_bytes().to_vec();
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.extend_from_slice(&body_size.to_be_bytes());
    payload.extend_from_slice(&flags.to_be_bytes());
    payload.extend_from_slice(props);
    raw_frame(2, channel, &payload, 0xCE)
}

fn body(channel: u16, data: &[u8]) -> Vec<u8> {
    raw_frame(3, channel, data, 0xCE)
}

/// basic.qos prefetch_count=5 on `channel`: a harmless method that gets qos-ok.
fn qos(channel: u16) -> Vec<u8> {
    method(channel, 60, 10, &[0, 0, 0, 0, 0, 5, 0])
}

/// basic.get no_ack on channel 1.
fn get(queue: &[u8]) -> Vec<u8> {
    let mut args = vec![0, 0];
    args.extend(sstr(queue));
    args.push(1);
    method(1, 60, 70, &args)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------------------------------------
// A raw client
// ---------------------------------------------------------------------------------------------

/// What the server did next.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "a test helper matched by value; boxing would only add noise"
)]
enum Reply {
    /// connection.close on channel 0.
    ConnectionClose(connection::Close),
    /// channel.close on a channel (channel, code, text), shown in failure messages.
    #[allow(dead_code, reason = "only printed, in failure messages")]
    ChannelClose(u16, u16, String),
    /// The socket closed (EOF or reset) with no AMQP reply.
    SocketClosed,
    /// Any other frame.
    Frame(AMQPFrame),
    /// Nothing within the wait.
    Nothing,
}

/// The PLAIN start-ok with the `authentication_failure_close` capability.
fn start_ok(user: &str, password: &str, client_properties: Option<&[u8]>) -> Vec<u8> {
    let caps = concat(&[
        &sstr(b"authentication_failure_close"),
        b"t\x01",
        &sstr(b"consumer_cancel_notify"),
        b"t\x01",
    ]);
    let props = match client_properties {
        Some(p) => p.to_vec(),
        None => concat(&[&sstr(b"capabilities"), b"F", &long(&caps)]),
    };
    let response = format!("\0{user}\0{password}");
    let args = concat(&[
        &long(&props),
        &sstr(b"PLAIN"),
        &long(response.as_bytes()),
        &sstr(b"en_US"),
    ]);
    method(0, 10, 11, &args)
}

fn tune_ok() -> Vec<u8> {
    method(0, 10, 31, &[0x07, 0xff, 0, 2, 0, 0, 0, 0])
}

fn connection_open() -> Vec<u8> {
    method(0, 10, 40, &concat(&[&sstr(b"/"), &sstr(b""), &[0]]))
}

fn channel_open(channel: u16) -> Vec<u8> {
    method(channel, 20, 10, &sstr(b""))
}

/// What this file asks of the suite's raw client beyond its own methods: replies sorted into
/// [`Reply`], and the close handshake as RabbitMQ's answers need it.
trait RawReplies {
    /// The next frame (heartbeats skipped), a socket close, or nothing within `wait`.
    async fn next(&mut self, wait: Duration) -> Reply;
    /// The next reply, which must come within [`TIMEOUT`].
    async fn reply(&mut self) -> Reply;
    /// The next reply, which must be the method `class_id`.`method_id`.
    async fn expect_method(&mut self, class_id: u16, method_id: u16) -> AMQPFrame;
    /// After a connection.close: answer close-ok; the socket must then close.
    async fn finish_close(&mut self) -> Result<(), String>;
}

impl RawReplies for RawClient {
    async fn next(&mut self, wait: Duration) -> Reply {
        match self.recv_timeout(wait).await {
            None => Reply::Nothing,
            Some(Incoming::Closed) => Reply::SocketClosed,
            Some(Incoming::Frame(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(c)),
            ))) => Reply::ConnectionClose(c),
            Some(Incoming::Frame(AMQPFrame::Method(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::Close(c)),
            ))) => Reply::ChannelClose(ch, c.reply_code, c.reply_text.to_string()),
            Some(Incoming::Frame(frame)) => Reply::Frame(frame),
        }
    }

    async fn reply(&mut self) -> Reply {
        match self.next(TIMEOUT).await {
            Reply::Nothing => panic!("no reply within {TIMEOUT:?}"),
            r => r,
        }
    }

    async fn expect_method(&mut self, class_id: u16, method_id: u16) -> AMQPFrame {
        match self.reply().await {
            Reply::Frame(f @ AMQPFrame::Method(_, _)) => {
                let AMQPFrame::Method(_, m) = &f else {
                    unreachable!()
                };
                assert_eq!(
                    (m.get_amqp_class_id(), m.get_amqp_method_id()),
                    (class_id, method_id),
                    "unexpected method {f:?}"
                );
                f
            }
            other => panic!("expected method {class_id}.{method_id}, got {other:?}"),
        }
    }

    async fn finish_close(&mut self) -> Result<(), String> {
        let close_ok = RawClient::encode(&AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        ));
        let _ = self.try_send_bytes(&close_ok).await;
        match self.next(TIMEOUT).await {
            Reply::SocketClosed => Ok(()),
            Reply::Nothing => Err("socket still open after close-ok".into()),
            other => Err(format!("after close-ok: {other:?}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Expected answers
// ---------------------------------------------------------------------------------------------

/// RabbitMQ's answer to one malformed input.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// connection.close with this code, class/method and exact text.
    Close(u16, (u16, u16), &'static str),
    /// A connection-level close with one of these codes (any text, any ids), or the socket
    /// closed without a word: where RabbitMQ itself crashes on the input.
    CloseOrDrop(&'static [u16]),
    /// Not an error: basic.qos sent afterwards on channel 1 gets qos-ok.
    Accepted,
}

/// Sends `input` on a fresh connection (channel 1 open) and checks the answer.
async fn case(url: &str, name: &str, input: &[u8], answer: Answer) -> Result<(), String> {
    let mut c = RawClient::open_on_channel(url, 1).await;
    let input = match answer {
        Answer::Accepted => concat(&[input, &qos(1)]),
        _ => input.to_vec(),
    };
    // The server may close before reading everything: a failed write is fine.
    let _ = c.try_send_bytes(&input).await;
    let fail = |why: String| Err(format!("{name}: {why}"));
    // Replies to the valid methods of the input (channel.open-ok, declare-ok, ...) come first.
    let got = loop {
        match c.next(TIMEOUT).await {
            Reply::Nothing => {
                return fail(format!(
                    "expected {answer:?}, got nothing within {TIMEOUT:?}"
                ));
            }
            Reply::Frame(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::QosOk(_))))
                if matches!(answer, Answer::Accepted) =>
            {
                return Ok(());
            }
            Reply::Frame(AMQPFrame::Method(..)) => continue,
            other => break other,
        }
    };
    match (answer, got) {
        (Answer::Close(code, ids, text), Reply::ConnectionClose(close)) => {
            let got = (
                close.reply_code,
                (close.class_id, close.method_id),
                close.reply_text.as_str(),
            );
            if got != (code, ids, text) {
                return fail(format!(
                    "expected connection.close {code} {ids:?} {text:?}, got {got:?}"
                ));
            }
            c.finish_close().await.or_else(fail)
        }
        (Answer::CloseOrDrop(codes), Reply::ConnectionClose(close)) => {
            if !codes.contains(&close.reply_code) {
                return fail(format!(
                    "expected a connection.close with a code in {codes:?}, got {close:?}"
                ));
            }
            c.finish_close().await.or_else(fail)
        }
        (Answer::CloseOrDrop(_), Reply::SocketClosed) => Ok(()),
        (answer, got) => fail(format!("expected {answer:?}, got {got:?}")),
    }
}

/// Runs every case (each on its own connection) and fails listing each wrong answer.
async fn cases(url: &str, list: Vec<(&str, Vec<u8>, Answer)>) {
    let mut failures = Vec::new();
    for (name, input, answer) in list {
        if let Err(e) = case(url, name, &input, answer).await {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} wrong answer(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The witness: another client that must keep working
// ---------------------------------------------------------------------------------------------

/// A lapin connection opened before the hostile input; [`Witness::check`] then completes a
/// round trip on it and on a fresh connection.
struct Witness {
    conn: Connection,
}

impl Witness {
    async fn new(broker: &TestBroker) -> Witness {
        let witness = Witness {
            conn: broker.connect().await,
        };
        round_trip(&witness.conn).await;
        witness
    }

    async fn check(self, broker: &TestBroker) {
        round_trip(&self.conn).await;
        let fresh = broker.connect().await;
        round_trip(&fresh).await;
        let _ = tokio::time::timeout(TIMEOUT, fresh.close(200, "bye".into())).await;
        let _ = tokio::time::timeout(TIMEOUT, self.conn.close(200, "bye".into())).await;
    }
}

/// Declares a queue, publishes to it with a confirm, gets the message back, deletes the queue.
async fn round_trip(conn: &Connection) {
    let work = async {
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        let queue = unique("hostile-witness");
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"still here",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
        let got = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("a message");
        assert_eq!(got.delivery.data, b"still here");
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
        ch.close(200, "bye".into()).await.expect("channel close");
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .expect("the witness round trip timed out: another client was affected");
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

/// The basic.qos payload sent by `qos`: <<0,60,0,10,0,0,0,0,0,5,0>>.
const QOS_OCTETS: &str = "<<0,60,0,10,0,0,0,0,0,5,0>>";

#[tokio::test]
async fn bad_frame_end_is_501() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    let mut wrong_end = qos(1);
    *wrong_end.last_mut().expect("end") = 0;
    // A size field 6 short of the payload: the octet where the end should be is 0.
    let mut short_size = qos(1);
    short_size[6] -= 6;
    let text =
        format!("FRAME_ERROR - type 1, all octets = {QOS_OCTETS}: {{invalid_frame_end_marker,0}}");
    let text: &'static str = Box::leak(text.into_boxed_str());
    cases(
        broker.url(),
        vec![
            ("end 0x00", wrong_end, Answer::Close(501, (0, 0), text)),
            (
                "size too small",
                short_size,
                Answer::Close(
                    501,
                    (0, 0),
                    "FRAME_ERROR - type 1, all octets = <<0,60,0,10,0>>: {invalid_frame_end_marker,0}",
                ),
            ),
        ],
    )
    .await;
    witness.check(&broker).await;
}

#[tokio::test]
async fn unknown_frame_types_are_501() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    cases(
        broker.url(),
        vec![
            (
                "type 4",
                raw_frame(4, 1, b"", 0xCE),
                Answer::Close(
                    501,
                    (0, 0),
                    "FRAME_ERROR - type 4, all octets = <<>>: unknown_frame",
                ),
            ),
            (
                "type 9",
                raw_frame(9, 0, b"", 0xCE),
                Answer::Close(
                    501,
                    (0, 0),
                    "FRAME_ERROR - type 9, all octets = <<>>: unknown_frame",
                ),
            ),
            (
                "type 255",
                raw_frame(255, 1, b"", 0xCE),
                Answer::Close(
                    501,
                    (0, 0),
                    "FRAME_ERROR - type 255, all octets = <<>>: unknown_frame",
                ),
            ),
        ],
    )
    .await;
    witness.check(&broker).await;
}

#[tokio::test]
async fn oversize_frame_is_501_from_its_header_alone() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    // Only the 7 header octets are sent: the answer cannot wait for the payload.
    cases(
        broker.url(),
        vec![
            (
                "10 MiB body frame",
                vec![3, 0, 1, 0, 0xa0, 0, 0],
                Answer::Close(
                    501,
                    (0, 0),
                    "FRAME_ERROR - type 3, all octets = <<>>: {frame_too_large,10485760,131064}",
                ),
            ),
            (
                "2 GiB method frame on channel 0",
                vec![1, 0, 0, 0x7f, 0, 0, 0],
                Answer::Close(
                    501,
                    (0, 0),
                    "FRAME_ERROR - type 1, all octets = <<>>: {frame_too_large,2130706432,131064}",
                ),
            ),
            (
                "payload of frame_max + 1",
                vec![3, 0, 1, 0, 2, 0, 1],
                Answer::Close(
                    501,
                    (0, 0),
                    "FRAME_ERROR - type 3, all octets = <<>>: {frame_too_large,131073,131064}",
                ),
            ),
        ],
    )
    .await;
    witness.check(&broker).await;
}

const EXPECTED_METHOD: &str =
    "UNEXPECTED_FRAME - expected method frame, got non method frame instead";
const EXPECTED_HEADER: &str =
    "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead";
const EXPECTED_BODY: &str =
    "UNEXPECTED_FRAME - expected content body, got non content body frame instead";

#[tokio::test]
async fn content_frames_out_of_order_are_505() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    let p = publish(b"", b"nowhere");
    cases(
        broker.url(),
        vec![
            (
                "body without publish",
                body(1, b"abc"),
                Answer::Close(505, (0, 0), EXPECTED_METHOD),
            ),
            (
                "header without publish",
                header(1, 60, 3, 0, b""),
                Answer::Close(505, (0, 0), EXPECTED_METHOD),
            ),
            (
                "publish then body",
                concat(&[&p, &body(1, b"abc")]),
                Answer::Close(505, (60, 40), EXPECTED_HEADER),
            ),
            (
                "publish then a method",
                concat(&[&p, &qos(1)]),
                Answer::Close(505, (60, 40), EXPECTED_HEADER),
            ),
            (
                "publish, header, then a method",
                concat(&[&p, &header(1, 60, 3, 0, b""), &qos(1)]),
                Answer::Close(505, (60, 40), EXPECTED_BODY),
            ),
            (
                "body after a complete message",
                concat(&[&p, &header(1, 60, 3, 0, b""), &body(1, b"abc"), &body(1, b"x")]),
                Answer::Close(505, (0, 0), EXPECTED_METHOD),
            ),
            (
                "publish then a header of class 50",
                concat(&[&p, &header(1, 50, 0, 0, b"")]),
                Answer::Close(
                    505,
                    (60, 40),
                    "UNEXPECTED_FRAME - expected content header for class 60, got one for class 50 instead",
                ),
            ),
            (
                "content of channel 1 interleaved on channel 2",
                concat(&[
                    &channel_open(2),
                    &p,
                    &header(2, 60, 3, 0, b""),
                ]),
                Answer::Close(505, (0, 0), EXPECTED_METHOD),
            ),
        ],
    )
    .await;
    witness.check(&broker).await;
}

#[tokio::test]
async fn body_longer_or_shorter_than_its_header_says() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    let p = publish(b"", b"nowhere");
    cases(
        broker.url(),
        vec![
            // RabbitMQ keeps waiting for body after an overlong one; the next method is 505.
            (
                "body of 6 for a header of 3, then a method",
                concat(&[&p, &header(1, 60, 3, 0, b""), &body(1, b"abcdef"), &qos(1)]),
                Answer::Close(505, (60, 40), EXPECTED_BODY),
            ),
            (
                "body of 3 for a header of 10, then a method",
                concat(&[&p, &header(1, 60, 10, 0, b""), &body(1, b"abc"), &qos(1)]),
                Answer::Close(505, (60, 40), EXPECTED_BODY),
            ),
            (
                "body of 3 + 7 for a header of 10 is a whole message",
                concat(&[
                    &p,
                    &header(1, 60, 10, 0, b""),
                    &body(1, b"abc"),
                    &body(1, b"defghij"),
                ]),
                Answer::Accepted,
            ),
        ],
    )
    .await;
    witness.check(&broker).await;
}

#[tokio::test]
async fn frames_on_unopened_channels() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    let close_ch2 = method(
        2,
        20,
        40,
        &concat(&[&[0, 200], &sstr(b"bye"), &[0, 0, 0, 0]]),
    );
    cases(
        broker.url(),
        vec![
            (
                "method on channel 5",
                qos(5),
                Answer::Close(504, (60, 10), "CHANNEL_ERROR - expected 'channel.open'"),
            ),
            (
                "header on channel 5",
                header(5, 60, 0, 0, b""),
                Answer::Close(505, (0, 0), EXPECTED_METHOD),
            ),
            (
                "body on channel 5",
                body(5, b"abc"),
                Answer::Close(505, (0, 0), EXPECTED_METHOD),
            ),
            (
                "heartbeat on channel 5",
                raw_frame(8, 5, b"", 0xCE),
                Answer::Close(505, (0, 0), "UNEXPECTED_FRAME - type 8, all octets = <<>>"),
            ),
        ],
    )
    .await;

    // A method on a channel the client closed (close-ok received).
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.send_bytes(&channel_open(2)).await;
    c.expect_method(20, 11).await;
    c.send_bytes(&close_ch2).await;
    c.expect_method(20, 41).await;
    c.send_bytes(&qos(2)).await;
    match c.reply().await {
        Reply::ConnectionClose(close) => {
            assert_eq!(
                (
                    close.reply_code,
                    close.class_id,
                    close.method_id,
                    close.reply_text.as_str()
                ),
                (504, 60, 10, "CHANNEL_ERROR - expected 'channel.open'")
            );
            c.finish_close().await.expect("close handshake");
        }
        other => {
            panic!("a method on a closed channel: expected connection.close 504, got {other:?}")
        }
    }
    witness.check(&broker).await;
}

#[tokio::test]
async fn methods_invalid_in_the_state_are_503() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    const UNIMPLEMENTED: &str = "COMMAND_INVALID - unimplemented method";
    let mut list = Vec::new();
    // Server-only methods sent by a client on an open channel.
    for (name, class_id, method_id, args) in [
        ("queue.declare-ok", 50, 11, concat(&[&sstr(b"q"), &[0; 8]])),
        ("channel.open-ok", 20, 11, long(b"")),
        ("channel.flow-ok", 20, 21, vec![1]),
        ("basic.qos-ok", 60, 11, vec![]),
        ("tx.select-ok", 90, 11, vec![]),
        ("confirm.select-ok", 85, 11, vec![]),
        (
            "connection.tune-ok on channel 1",
            10,
            31,
            vec![0x07, 0xff, 0, 2, 0, 0, 0, 0],
        ),
        ("connection.close-ok on channel 1", 10, 51, vec![]),
    ] {
        list.push((
            name,
            method(1, class_id, method_id, &args),
            Answer::Close(503, (class_id, method_id), UNIMPLEMENTED),
        ));
    }
    cases(broker.url(), list).await;
    witness.check(&broker).await;
}

#[tokio::test]
async fn unknown_class_or_method_ids_close_the_connection() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    // RabbitMQ's reader crashes (the socket is reset); Warren may answer 540 or 503.
    cases(
        broker.url(),
        vec![
            (
                "basic 60.99",
                method(1, 60, 99, b""),
                Answer::CloseOrDrop(&[503, 540]),
            ),
            (
                "class 99",
                method(1, 99, 10, b""),
                Answer::CloseOrDrop(&[503, 540]),
            ),
            (
                "on channel 0",
                method(0, 10, 99, b""),
                Answer::CloseOrDrop(&[503, 540]),
            ),
        ],
    )
    .await;
    witness.check(&broker).await;
}

#[tokio::test]
async fn truncated_frames() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    cases(
        broker.url(),
        vec![
            (
                "queue.declare with no arguments",
                method(1, 50, 10, b""),
                Answer::Close(501, (50, 10), "FRAME_ERROR - cannot decode <<>>"),
            ),
            (
                "basic.publish cut inside its routing key",
                method(1, 60, 40, &[0, 0, 0, 9, b'a']),
                Answer::Close(501, (60, 40), "FRAME_ERROR - cannot decode <<0,0,0,9,97>>"),
            ),
            (
                "content header of 3 octets",
                concat(&[
                    &publish(b"", b"nowhere"),
                    &raw_frame(2, 1, &[0, 60, 0], 0xCE),
                ]),
                Answer::Close(
                    501,
                    (0, 0),
                    "FRAME_ERROR - type 2, all octets = <<0,60,0>>: unknown_frame",
                ),
            ),
        ],
    )
    .await;

    // A frame cut short, then the client closes its side: the server closes too, silently.
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.send_bytes(&qos(1)[..6]).await;
    c.shutdown_write().await;
    match c.reply().await {
        Reply::SocketClosed => {}
        other => panic!("a cut frame then EOF: expected the socket to close, got {other:?}"),
    }

    // A frame sent one octet per write (each its own segment: no delay) is a frame like any
    // other.
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    for octet in qos(1) {
        c.send_bytes(&[octet]).await;
    }
    c.expect_method(60, 11).await;

    witness.check(&broker).await;
}

/// A field table of `depth` tables nested in one another (7 octets a level).
fn nested_tables(depth: usize) -> Vec<u8> {
    let mut table = Vec::new();
    for _ in 0..depth {
        table = concat(&[&sstr(b"a"), b"F", &long(&table)]);
    }
    table
}

/// A field table holding `depth` arrays nested in one another (5 octets a level).
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut value = b"V".to_vec();
    for _ in 0..depth {
        value = concat(&[b"A", &long(&value)]);
    }
    concat(&[&sstr(b"x-a"), &value])
}

#[tokio::test]
async fn huge_field_tables() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    let many: Vec<u8> = (0..10_000)
        .flat_map(|i: i32| {
            concat(&[
                &sstr(format!("x-{i:05}").as_bytes()),
                b"I",
                &i.to_be_bytes(),
            ])
        })
        .collect();
    assert!(many.len() > 100_000);
    let too_big: Vec<u8> = (0..12_000)
        .flat_map(|i: i32| {
            concat(&[
                &sstr(format!("x-{i:05}").as_bytes()),
                b"I",
                &i.to_be_bytes(),
            ])
        })
        .collect();
    let mut lying_length = declare(b"", EXCLUSIVE, b"");
    let at = lying_length.len() - 5;
    lying_length.splice(at..at + 4, [0x7f, 0xff, 0xff, 0xff, b'a', b'b', b'c']);
    let size = (lying_length.len() - 8) as u32;
    lying_length[3..7].copy_from_slice(&size.to_be_bytes());
    let huge_long_string = concat(&[&sstr(b"x-s"), b"S", &[0xff; 4], b"ab"]);
    let too_big_frame = declare(b"", EXCLUSIVE, &too_big);
    let too_big_text = format!(
        "FRAME_ERROR - type 1, all octets = <<>>: {{frame_too_large,{},131064}}",
        too_big_frame.len() - 8
    );
    cases(
        broker.url(),
        vec![
            (
                "10000 entries (130 KB)",
                declare(b"", EXCLUSIVE, &many),
                Answer::Accepted,
            ),
            (
                "table length beyond the frame",
                lying_length,
                Answer::Close(
                    501,
                    (50, 10),
                    "FRAME_ERROR - cannot decode <<0,0,0,4,127,255,255,255,97,98,99>>",
                ),
            ),
            (
                "table larger than frame_max",
                too_big_frame,
                Answer::Close(501, (0, 0), Box::leak(too_big_text.into_boxed_str())),
            ),
            // RabbitMQ's reader crashes on this one (socket reset).
            (
                "long string of length 2^32-1 in a table",
                declare(b"", EXCLUSIVE, &huge_long_string),
                Answer::CloseOrDrop(&[501]),
            ),
        ],
    )
    .await;
    witness.check(&broker).await;
}

/// Runs the nesting cases in a child process (this test binary, filtered to
/// `deeply_nested_field_tables_child`): unbounded recursion overflows the stack, and a stack
/// overflow aborts the whole process, which would take every other test down with it.
#[test]
fn deeply_nested_field_tables_do_not_crash_the_broker() {
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "deeply_nested_field_tables_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WARREN_HOSTILE_CHILD", "1")
        .output()
        .expect("run the child");
    assert!(
        out.status.success(),
        "the child process failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn deeply_nested_field_tables_child() {
    if std::env::var("WARREN_HOSTILE_CHILD").is_err() {
        return; // run by deeply_nested_field_tables_do_not_crash_the_broker only
    }
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    let too_deep = if broker.is_embedded() {
        Answer::Close(
            501,
            (0, 0),
            "FRAME_ERROR - cannot decode: field tables nested deeper than 2000 levels",
        )
    } else {
        Answer::Accepted
    };
    // RabbitMQ accepts all of these (it ignores unknown x- arguments).
    cases(
        broker.url(),
        vec![
            (
                "100 nested tables",
                declare(b"", EXCLUSIVE, &nested_tables(100)),
                Answer::Accepted,
            ),
            (
                "1000 nested tables",
                declare(b"", EXCLUSIVE, &nested_tables(1000)),
                Answer::Accepted,
            ),
            // RabbitMQ accepts these too; Warren refuses nesting past 2,000 levels with a
            // connection-level 501 (see the README's differences), and must not crash.
            (
                "18000 nested tables (126 KB)",
                declare(b"", EXCLUSIVE, &nested_tables(18_000)),
                too_deep,
            ),
            (
                "25000 nested arrays (125 KB)",
                declare(b"", EXCLUSIVE, &nested_arrays(25_000)),
                too_deep,
            ),
        ],
    )
    .await;
    // Before authentication, within the handshake's 4096-octet frames: nested client
    // properties in start-ok.
    let mut c = RawClient::connect(broker.url()).await;
    c.send_bytes(PROTOCOL_HEADER).await;
    c.expect_method(10, 10).await;
    c.send_bytes(&start_ok("guest", "guest", Some(&nested_tables(500))))
        .await;
    c.expect_method(10, 30).await;
    witness.check(&broker).await;
}

const MALFORMED_UTF8: &str = "FRAME_ERROR - Malformed UTF-8 in shortstr";

#[tokio::test]
async fn invalid_utf8_in_short_strings() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    let bad: &[u8] = b"\xff\xfeq";
    let unchecked = if broker.is_embedded() {
        Answer::Close(501, (0, 0), MALFORMED_UTF8)
    } else {
        Answer::Accepted
    };
    let consume = method(
        1,
        60,
        20,
        &concat(&[&[0, 0], &sstr(b"nope"), &sstr(bad), &[0], &long(b"")]),
    );
    let exchange_declare = method(
        1,
        40,
        10,
        &concat(&[&[0, 0], &sstr(bad), &sstr(b"direct"), &[0], &long(b"")]),
    );
    cases(
        broker.url(),
        vec![
            // Names RabbitMQ checks: a connection-level 501 without class/method.
            (
                "queue.declare name",
                declare(bad, EXCLUSIVE, b""),
                Answer::Close(501, (0, 0), MALFORMED_UTF8),
            ),
            (
                "exchange.declare name",
                exchange_declare,
                Answer::Close(501, (0, 0), MALFORMED_UTF8),
            ),
            (
                "basic.consume tag",
                consume,
                Answer::Close(501, (0, 0), MALFORMED_UTF8),
            ),
            // Strings RabbitMQ passes through unchecked. Warren's parser (amq-protocol) needs
            // UTF-8 there too, so it refuses them with the same 501 (a documented difference).
            (
                "basic.publish routing key",
                concat(&[&publish(b"", bad), &header(1, 60, 0, 0, b"")]),
                unchecked,
            ),
            (
                "content_type property",
                concat(&[
                    &publish(b"", b"nowhere"),
                    &header(1, 60, 0, 0x8000, &sstr(bad)),
                ]),
                unchecked,
            ),
            (
                "field table key",
                declare(b"", EXCLUSIVE, &concat(&[&sstr(bad), b"t\x01"])),
                if broker.is_embedded() {
                    Answer::CloseOrDrop(&[501])
                } else {
                    Answer::Accepted
                },
            ),
        ],
    )
    .await;
    witness.check(&broker).await;
}

#[tokio::test]
async fn property_flags_with_unknown_bits() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    let p = publish(b"", b"nowhere");
    cases(
        broker.url(),
        vec![
            (
                "reserved bit 1",
                concat(&[&p, &header(1, 60, 0, 0x0002, b"")]),
                Answer::Accepted,
            ),
            (
                "continuation bit with no further flags",
                concat(&[&p, &header(1, 60, 0, 0x0001, b"")]),
                Answer::Accepted,
            ),
            // RabbitMQ's channel crashes decoding these: 541 INTERNAL_ERROR (0,0).
            (
                "continuation bit and a second flag word",
                concat(&[&p, &header(1, 60, 0, 0x0001, &[0, 0])]),
                Answer::CloseOrDrop(&[541, 501]),
            ),
            (
                "trailing octets after the properties",
                concat(&[&p, &header(1, 60, 0, 0, &[1, 2, 3])]),
                Answer::CloseOrDrop(&[541, 501]),
            ),
        ],
    )
    .await;

    // A message whose header has the reserved bit set is routed and delivered.
    let queue = unique("hostile-flags");
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.send_bytes(&declare(queue.as_bytes(), EXCLUSIVE, b""))
        .await;
    c.expect_method(50, 11).await;
    c.send_bytes(&concat(&[
        &publish(b"", queue.as_bytes()),
        &header(1, 60, 3, 0x0002, b""),
        &body(1, b"abc"),
        &get(queue.as_bytes()),
    ]))
    .await;
    c.expect_method(60, 71).await;
    match c.reply().await {
        Reply::Frame(AMQPFrame::Header(1, h)) => assert_eq!(h.body_size, 3),
        other => panic!("expected the content header, got {other:?}"),
    }
    match c.reply().await {
        Reply::Frame(AMQPFrame::Body(1, b)) => assert_eq!(b, b"abc"),
        other => panic!("expected the body, got {other:?}"),
    }
    witness.check(&broker).await;
}

#[tokio::test]
async fn frames_pipelined_behind_connection_open_are_processed() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    // Everything up to channel.open and a basic.qos in one write, after start-ok.
    let mut c = RawClient::connect(broker.url()).await;
    c.send_bytes(PROTOCOL_HEADER).await;
    c.expect_method(10, 10).await;
    c.send_bytes(&start_ok("guest", "guest", None)).await;
    c.expect_method(10, 30).await;
    c.send_bytes(&concat(&[
        &tune_ok(),
        &connection_open(),
        &channel_open(1),
        &qos(1),
    ]))
    .await;
    c.expect_method(10, 41).await;
    c.expect_method(20, 11).await;
    c.expect_method(60, 11).await;
    witness.check(&broker).await;
}

#[tokio::test]
async fn failed_login_then_an_oversize_frame_is_not_buffered() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    let mut c = RawClient::connect(broker.url()).await;
    c.send_bytes(PROTOCOL_HEADER).await;
    c.expect_method(10, 10).await;
    c.send_bytes(&start_ok("guest", "wrong password", None))
        .await;
    match c.reply().await {
        Reply::ConnectionClose(close) => assert_eq!(close.reply_code, 403),
        other => panic!("expected connection.close 403, got {other:?}"),
    }
    // Instead of close-ok: a frame header announcing 2 GiB, then 256 MiB of it. The server
    // must not take it in (RabbitMQ resets the socket at once).
    let mut accepted = c.try_send_bytes(&[3, 0, 1, 0x7f, 0xff, 0xff, 0xff]).await;
    let chunk = vec![b'x'; 1 << 20];
    let mut sent_mib = 0;
    while accepted && sent_mib < 256 {
        accepted = c.try_send_bytes(&chunk).await;
        if accepted {
            sent_mib += 1;
        }
    }
    assert!(
        !accepted,
        "the server took in {sent_mib} MiB of a 2 GiB frame from a client whose login failed"
    );
    witness.check(&broker).await;
}

#[tokio::test]
async fn many_hostile_connections_at_once_leave_others_working() {
    let broker = TestBroker::start().await;
    let witness = Witness::new(&broker).await;
    let url = broker.url().to_owned();
    let mut tasks = Vec::new();
    for i in 0..20u16 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::open_on_channel(&url, 1).await;
            let input = match i % 4 {
                0 => vec![9, 0, 0, 0, 0, 0, 0, 0xCE],
                1 => qos(7),
                2 => vec![3, 0, 1, 0x7f, 0, 0, 0],
                _ => body(1, b"abc"),
            };
            let _ = c.try_send_bytes(&input).await;
            match c.reply().await {
                Reply::ConnectionClose(close) => {
                    assert!(matches!(close.reply_code, 501 | 504 | 505), "{close:?}");
                    c.finish_close().await.expect("close handshake");
                }
                other => panic!("expected a connection.close, got {other:?}"),
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(TIMEOUT, t)
            .await
            .expect("a hostile connection hung")
            .expect("a hostile connection failed");
    }
    witness.check(&broker).await;
}

#[tokio::test]
async fn hostile_connections_leave_no_state_behind_embedded_only() {
    if external() {
        println!("skipped: embedded only");
        return;
    }
    let broker = TestBroker::start().await;
    let handle = broker.embedded().expect("embedded");
    for input in [
        vec![9, 0, 0, 0, 0, 0, 0, 0xCE],
        concat(&[&publish(b"", b"nowhere"), &body(1, b"abc")]),
        vec![3, 0, 1, 0x7f, 0, 0, 0],
    ] {
        let mut c = RawClient::open_on_channel(broker.url(), 1).await;
        let _ = c.try_send_bytes(&input).await;
        match c.reply().await {
            Reply::ConnectionClose(_) => c.finish_close().await.expect("close handshake"),
            other => panic!("expected a connection.close, got {other:?}"),
        }
    }
    // Every hostile connection is gone from the broker's list.
    warren_harness::wait_until("closed connections leave the list", TIMEOUT, || {
        let left = handle.connections().len();
        async move {
            if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} still listed"))
            }
        }
    })
    .await;
    let witness = Witness::new(&broker).await;
    witness.check(&broker).await;
}
