//! Frame-level and connection-level errors on an open connection, through the raw client:
//! 501 FRAME_ERROR, 504 CHANNEL_ERROR, 505 UNEXPECTED_FRAME, 530 NOT_ALLOWED, 540
//! NOT_IMPLEMENTED, and what is *not* an error (flow active=true, channel numbers above
//! channel_max, bodies split to frame_max, consume-ok before the first delivery).

use amq_protocol::{
    frame::AMQPFrame,
    protocol::{AMQPClass, basic, channel, connection, queue},
    types::FieldTable,
};
use warren_harness::TestBroker;
use warren_tests::raw::{Handshake, Incoming, RawClient, method_payload, raw_frame};

fn qos(count: u16) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
        prefetch_count: count,
        global: false,
    }))
}

fn publish_method(rk: &str) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: rk.into(),
        mandatory: false,
        immediate: false,
    }))
}

fn declare_method(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn method_on_an_unopened_channel_is_504() {
    let broker = TestBroker::start().await;
    for (method, ids) in [(qos(1), (60, 10)), (declare_method("x"), (50, 10))] {
        let mut c = RawClient::open(broker.url()).await;
        c.send_method(5, method).await;
        let got = c
            .expect_connection_close_and_eof(504, Some("CHANNEL_ERROR - expected 'channel.open'"))
            .await;
        assert_eq!(got, ids);
    }
    // channel.close and channel.close-ok on a never-opened channel too.
    for (method, ids) in [
        (
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 200,
                reply_text: "".into(),
                class_id: 0,
                method_id: 0,
            })),
            (20, 40),
        ),
        (
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
            (20, 41),
        ),
    ] {
        let mut c = RawClient::open(broker.url()).await;
        c.send_method(5, method).await;
        let got = c
            .expect_connection_close_and_eof(504, Some("CHANNEL_ERROR - expected 'channel.open'"))
            .await;
        assert_eq!(got, ids);
    }
}

#[tokio::test]
async fn content_frames_on_an_unopened_channel_are_505() {
    let broker = TestBroker::start().await;
    for body in [false, true] {
        let mut c = RawClient::open(broker.url()).await;
        if body {
            c.send_body(5, b"abc").await;
        } else {
            c.send_header(5, 3, Default::default()).await;
        }
        let ids = c
            .expect_connection_close_and_eof(
                505,
                Some("UNEXPECTED_FRAME - expected method frame, got non method frame instead"),
            )
            .await;
        assert_eq!(ids, (0, 0));
    }
}

#[tokio::test]
async fn second_channel_open_is_504() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    let ids = c
        .expect_connection_close_and_eof(504, Some("CHANNEL_ERROR - second 'channel.open' seen"))
        .await;
    assert_eq!(ids, (20, 10));
}

#[tokio::test]
async fn content_header_or_body_without_publish_is_505() {
    let broker = TestBroker::start().await;
    for body in [false, true] {
        let mut c = RawClient::open_on_channel(broker.url(), 1).await;
        if body {
            c.send_body(1, b"abc").await;
        } else {
            c.send_header(1, 3, Default::default()).await;
        }
        let ids = c
            .expect_connection_close_and_eof(
                505,
                Some("UNEXPECTED_FRAME - expected method frame, got non method frame instead"),
            )
            .await;
        assert_eq!(ids, (0, 0));
    }
}

#[tokio::test]
async fn publish_followed_by_a_body_or_a_method_instead_of_a_header_is_505() {
    let broker = TestBroker::start().await;
    for body in [false, true] {
        let mut c = RawClient::open_on_channel(broker.url(), 1).await;
        c.send_method(1, publish_method("nowhere")).await;
        if body {
            c.send_body(1, b"abc").await;
        } else {
            c.send_method(1, qos(1)).await;
        }
        let ids = c
            .expect_connection_close_and_eof(
                505,
                Some(
                    "UNEXPECTED_FRAME - expected content header for class 60, \
                     got non content header frame instead",
                ),
            )
            .await;
        assert_eq!(ids, (60, 40));
    }
}

#[tokio::test]
async fn a_method_before_the_body_is_complete_is_505() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.send_method(1, publish_method("nowhere")).await;
    c.send_header(1, 3, Default::default()).await;
    c.send_method(1, qos(1)).await;
    let ids = c
        .expect_connection_close_and_eof(
            505,
            Some("UNEXPECTED_FRAME - expected content body, got non content body frame instead"),
        )
        .await;
    assert_eq!(ids, (60, 40));
}

#[tokio::test]
async fn non_connection_methods_on_channel_zero_are_504() {
    let broker = TestBroker::start().await;
    for (method, ids) in [
        (
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            (20, 10),
        ),
        (declare_method("x"), (50, 10)),
    ] {
        let mut c = RawClient::open(broker.url()).await;
        c.send_method(0, method).await;
        let got = c
            .expect_connection_close_and_eof(
                504,
                Some("CHANNEL_ERROR - unexpected method in connection state running"),
            )
            .await;
        assert_eq!(got, ids);
    }
}

#[tokio::test]
async fn handshake_methods_after_open_are_504() {
    let broker = TestBroker::start().await;
    let methods = [
        (
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 2047,
                frame_max: 131_072,
                heartbeat: 0,
            })),
            (10, 31),
        ),
        (
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
            (10, 40),
        ),
    ];
    for (method, ids) in methods {
        let mut c = RawClient::open(broker.url()).await;
        c.send_method(0, method).await;
        let got = c
            .expect_connection_close_and_eof(
                504,
                Some("CHANNEL_ERROR - unexpected method in connection state running"),
            )
            .await;
        assert_eq!(got, ids);
    }
}

#[tokio::test]
async fn content_frames_on_channel_zero_and_heartbeats_off_channel_zero_are_505() {
    let broker = TestBroker::start().await;
    // Content header on channel 0: the text dumps the frame as an Erlang binary, so only its
    // start is checked.
    let mut c = RawClient::open(broker.url()).await;
    c.send_header(0, 3, Default::default()).await;
    let ids = c.expect_connection_close_and_eof(505, None).await;
    assert_eq!(ids, (0, 0));

    let mut c = RawClient::open(broker.url()).await;
    c.send_body(0, b"abc").await;
    c.expect_connection_close_and_eof(
        505,
        Some("UNEXPECTED_FRAME - type 3, all octets = <<\"abc\">>"),
    )
    .await;

    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.send_bytes(&raw_frame(8, 1, b"", 0xCE)).await;
    c.expect_connection_close_and_eof(505, Some("UNEXPECTED_FRAME - type 8, all octets = <<>>"))
        .await;
}

#[tokio::test]
async fn bad_frame_end_byte_is_501() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    // basic.qos prefetch_count=1 with a frame end of 0x00 instead of 0xCE.
    let payload = method_payload(60, 10, &[0, 0, 0, 0, 0, 1, 0]);
    c.send_bytes(&raw_frame(1, 1, &payload, 0x00)).await;
    let ids = c
        .expect_connection_close_and_eof(
            501,
            Some(
                "FRAME_ERROR - type 1, all octets = <<0,60,0,10,0,0,0,0,0,1,0>>: \
                 {invalid_frame_end_marker,0}",
            ),
        )
        .await;
    assert_eq!(ids, (0, 0));
}

#[tokio::test]
async fn unknown_frame_type_is_501() {
    let broker = TestBroker::start().await;
    for frame_type in [4u8, 9] {
        let mut c = RawClient::open_on_channel(broker.url(), 1).await;
        c.send_bytes(&raw_frame(frame_type, 1, b"", 0xCE)).await;
        let ids = c
            .expect_connection_close_and_eof(
                501,
                Some(&format!(
                    "FRAME_ERROR - type {frame_type}, all octets = <<>>: unknown_frame"
                )),
            )
            .await;
        assert_eq!(ids, (0, 0));
    }
}

#[tokio::test]
async fn oversize_frame_is_501() {
    let broker = TestBroker::start().await;
    // Body frame of 5000 bytes with frame_max 4096.
    let hs = Handshake {
        frame_max: Some(4096),
        ..Handshake::from_url(broker.url())
    };
    let mut c = RawClient::open_with(broker.url(), hs).await;
    c.open_channel(1).await;
    c.send_method(1, publish_method("nowhere")).await;
    c.send_header(1, 5000, Default::default()).await;
    c.send_body(1, &[1u8; 5000]).await;
    let ids = c
        .expect_connection_close(
            501,
            Some("FRAME_ERROR - type 3, all octets = <<>>: {frame_too_large,5000,4088}"),
        )
        .await;
    assert_eq!(ids, (0, 0));

    // A method frame over the default 131072 (a queue.declare with a big argument table).
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-padding".into(),
        warren_tests::raw::long_str(&"p".repeat(140_000)),
    );
    c.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "x".into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: args,
        })),
    )
    .await;
    let (_, _) = c.expect_connection_close(501, None).await;
}

#[tokio::test]
async fn channel_flow_active_false_is_540_and_active_true_is_flow_ok() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    let reply = c
        .rpc(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: true })),
        )
        .await;
    assert_eq!(
        reply,
        AMQPFrame::Method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                active: true
            }))
        )
    );
    c.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: false })),
    )
    .await;
    let ids = c
        .expect_connection_close_and_eof(540, Some("NOT_IMPLEMENTED - active=false"))
        .await;
    assert_eq!(ids, (20, 20));
}

#[tokio::test]
async fn qos_with_prefetch_size_is_540() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    // basic.qos prefetch_size=1 prefetch_count=1 global=false (amq-protocol cannot encode
    // prefetch_size, so the frame is made by hand).
    let payload = method_payload(60, 10, &[0, 0, 0, 1, 0, 1, 0]);
    c.send_bytes(&raw_frame(1, 1, &payload, 0xCE)).await;
    let ids = c
        .expect_connection_close_and_eof(540, Some("NOT_IMPLEMENTED - prefetch_size!=0 (1)"))
        .await;
    assert_eq!(ids, (60, 10));
}

#[tokio::test]
async fn opening_more_channels_than_channel_max_is_530() {
    let broker = TestBroker::start().await;
    let hs = Handshake {
        channel_max: Some(2),
        ..Handshake::from_url(broker.url())
    };
    let mut c = RawClient::open_with(broker.url(), hs).await;
    c.open_channel(1).await;
    c.open_channel(2).await;
    c.send_method(
        3,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    let ids = c
        .expect_connection_close_and_eof(
            530,
            Some(
                "NOT_ALLOWED - number of channels opened (2) has reached the \
                 negotiated channel_max (2)",
            ),
        )
        .await;
    assert_eq!(ids, (0, 0));
}

#[tokio::test]
async fn channel_numbers_above_channel_max_are_fine_while_the_count_is_under_it() {
    // RabbitMQ counts open channels; it does not check the channel number.
    let broker = TestBroker::start().await;
    let hs = Handshake {
        channel_max: Some(2),
        ..Handshake::from_url(broker.url())
    };
    let mut c = RawClient::open_with(broker.url(), hs).await;
    c.open_channel(7).await;
    c.open_channel(2047).await;
    c.close().await;
}

#[tokio::test]
async fn unknown_method_closes_the_connection() {
    // RabbitMQ 3.10's reader crashes on an unknown class/method id: the socket is closed with
    // no connection.close. A connection.close 503 or 540 is accepted too (better behaviour).
    let broker = TestBroker::start().await;
    for (class_id, method_id) in [(60u16, 99u16), (99, 10)] {
        let mut c = RawClient::open_on_channel(broker.url(), 1).await;
        c.send_bytes(&raw_frame(
            1,
            1,
            &method_payload(class_id, method_id, &[]),
            0xCE,
        ))
        .await;
        match c.recv().await {
            Incoming::Closed => {}
            Incoming::Frame(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(close)),
            )) => assert!(
                [503, 540].contains(&close.reply_code),
                "unknown method ({class_id},{method_id}): got {close:?}"
            ),
            other => panic!("unknown method ({class_id},{method_id}): got {other:?}"),
        }
    }
}

#[tokio::test]
async fn truncated_method_arguments_are_501() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    // queue.declare with no argument bytes at all.
    c.send_bytes(&raw_frame(1, 1, &method_payload(50, 10, &[]), 0xCE))
        .await;
    c.expect_connection_close(501, None).await;
}

#[tokio::test]
async fn deliveries_are_split_to_the_negotiated_frame_max() {
    let broker = TestBroker::start().await;
    let hs = Handshake {
        frame_max: Some(4096),
        ..Handshake::from_url(broker.url())
    };
    let mut c = RawClient::open_with(broker.url(), hs).await;
    c.open_channel(1).await;
    let q = unique("split");
    c.declare_queue(1, &q).await;
    let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    // Published in several body frames that each respect frame_max.
    c.send_method(1, publish_method(&q)).await;
    c.send_header(1, body.len() as u64, Default::default())
        .await;
    for chunk in body.chunks(4088) {
        c.send_body(1, chunk).await;
    }
    let get = c
        .rpc(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: q.as_str().into(),
                no_ack: true,
            })),
        )
        .await;
    assert!(
        matches!(
            get,
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetOk(_)))
        ),
        "got {get:?}"
    );
    match c.recv_frame().await {
        AMQPFrame::Header(1, h) => assert_eq!(h.body_size, body.len() as u64),
        other => panic!("expected a content header, got {other:?}"),
    }
    let mut got = Vec::new();
    let mut frames = 0;
    while got.len() < body.len() {
        match c.recv_frame().await {
            AMQPFrame::Body(1, part) => {
                assert!(
                    part.len() <= 4088,
                    "body frame of {} bytes exceeds frame_max 4096",
                    part.len()
                );
                assert!(!part.is_empty(), "empty body frame");
                got.extend(part);
                frames += 1;
            }
            other => panic!("expected a body frame, got {other:?}"),
        }
    }
    assert_eq!(got, body);
    assert_eq!(frames, 3, "10000 bytes in frames of at most 4088");
    c.delete_queue(1, &q).await;
    c.close().await;
}

#[tokio::test]
async fn consume_ok_comes_before_the_first_delivery() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    let q = unique("consume-ok-first");
    c.declare_queue(1, &q).await;
    for i in 0..20u8 {
        c.publish(1, &q, &[i]).await;
    }
    // Messages are waiting: consume-ok must still be the very next frame.
    let first = c
        .rpc(1, warren_tests::raw::consume(&q, "first-tag", true))
        .await;
    match first {
        AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok))) => {
            assert_eq!(ok.consumer_tag.as_str(), "first-tag")
        }
        other => panic!("expected consume-ok before any delivery, got {other:?}"),
    }
    match c.recv_frame().await {
        AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
            assert_eq!(d.consumer_tag.as_str(), "first-tag");
            assert_eq!(d.delivery_tag, 1);
            assert!(!d.redelivered);
            assert_eq!(d.routing_key.as_str(), q);
        }
        other => panic!("expected basic.deliver, got {other:?}"),
    }
    c.delete_queue_skipping_deliveries(1, &q).await;
    c.close().await;
}

#[tokio::test]
async fn unknown_exchange_type_is_503_command_invalid() {
    use amq_protocol::protocol::exchange;
    let broker = TestBroker::start().await;
    // The type is checked first: before the default exchange's 403, the reserved prefix's
    // 403 and an existing exchange's 406 (RabbitMQ says "invalid" instead of "unknown" for
    // a name that happens to be an Erlang atom, such as 'foo').
    let new = unique("x-bad-type");
    for name in [new.as_str(), "", "amq.direct", "amq.not-there"] {
        let mut c = RawClient::open_on_channel(broker.url(), 1).await;
        c.send_method(
            1,
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: name.into(),
                kind: "x-no-such-type".into(),
                passive: false,
                durable: false,
                auto_delete: false,
                internal: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await;
        let ids = c
            .expect_connection_close_and_eof(
                503,
                Some("COMMAND_INVALID - unknown exchange type 'x-no-such-type'"),
            )
            .await;
        assert_eq!(ids, (40, 10), "exchange '{name}'");
    }
}

#[tokio::test]
async fn publish_with_immediate_is_540() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "anything".into(),
            mandatory: false,
            immediate: true,
        })),
    )
    .await;
    c.send_header(1, 1, Default::default()).await;
    c.send_body(1, b"i").await;
    let ids = c
        .expect_connection_close_and_eof(540, Some("NOT_IMPLEMENTED - immediate=true"))
        .await;
    assert_eq!(ids, (60, 40));
}

#[tokio::test]
async fn message_over_the_default_128_mib_limit_is_406_on_the_channel() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.open_channel(2).await;
    let size: u64 = 128 * 1024 * 1024 + 1;
    c.send_method(1, publish_method("nowhere")).await;
    c.send_header(1, size, Default::default()).await;
    // Body frames written straight from one buffer (131064 bytes of payload each).
    let chunk = 131_064usize;
    let full = raw_frame(3, 1, &vec![b'm'; chunk], 0xCE);
    let mut left = size as usize;
    while left >= chunk {
        c.send_bytes(&full).await;
        left -= chunk;
    }
    if left > 0 {
        c.send_bytes(&raw_frame(3, 1, &vec![b'm'; left], 0xCE))
            .await;
    }
    let ids = c
        .expect_channel_close(
            1,
            406,
            Some(
                "PRECONDITION_FAILED - message size 134217729 is larger than configured max \
                 size 134217728",
            ),
        )
        .await;
    assert_eq!(ids, (60, 40));
    // Channel scope: the other channel and the connection go on.
    let q = unique("after-oversize");
    c.declare_queue(2, &q).await;
    c.delete_queue(2, &q).await;
    c.close().await;
}

#[tokio::test]
async fn a_method_on_a_channel_closed_by_the_client_is_504() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    let reply = c
        .rpc(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 200,
                reply_text: "done".into(),
                class_id: 0,
                method_id: 0,
            })),
        )
        .await;
    assert!(
        matches!(
            reply,
            AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))
        ),
        "got {reply:?}"
    );
    c.send_method(1, qos(1)).await;
    let ids = c
        .expect_connection_close_and_eof(504, Some("CHANNEL_ERROR - expected 'channel.open'"))
        .await;
    assert_eq!(ids, (60, 10));
}
