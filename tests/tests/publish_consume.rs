//! basic.publish through the default exchange, mandatory returns, properties, body sizes,
//! per-message TTL, basic.consume (tags, exclusive, round robin, cancel) and basic.get.

use amq_protocol::{
    frame::AMQPFrame,
    protocol::{AMQPClass, basic},
};
use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
};
use std::time::Duration;
use warren_harness::TestBroker;
use warren_tests::{
    ErrorEvents, TIMEOUT, assert_amqp_error, assert_channel_closed_only, assert_connection_closed,
    assert_connection_works, assert_no_delivery, channel, close_conn, confirm_channel, consume,
    declare, delete_quietly, drain_bodies, expect_err, get, get_eventually, next_delivery, passive,
    publish, publish_confirmed, publish_with,
    raw::{self, RawClient},
    user_id_refused, within,
};

#[tokio::test]
async fn default_exchange_routes_by_queue_name() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let a = broker.unique_name("route-a");
    let b = broker.unique_name("route-b");
    declare(&ch, &a).await;
    declare(&ch, &b).await;
    publish(&ch, &a, b"for a").await;
    publish(&ch, &b, b"for b").await;
    publish(&ch, &a, b"for a again").await;
    // Unroutable, not mandatory: silently dropped, the channel lives on.
    publish(&ch, &broker.unique_name("nobody"), b"dropped").await;
    let got = get_eventually(&ch, &a, true).await;
    assert_eq!(got.delivery.data, b"for a");
    assert_eq!(got.delivery.exchange.as_str(), "");
    assert_eq!(got.delivery.routing_key.as_str(), a);
    assert!(!got.delivery.redelivered);
    assert_eq!(got.message_count, 1, "one more left on a");
    let got = get(&ch, &a, true).await.expect("second message on a");
    assert_eq!(got.delivery.data, b"for a again");
    let got = get(&ch, &b, true).await.expect("message on b");
    assert_eq!(got.delivery.data, b"for b");
    assert_eq!(got.delivery.routing_key.as_str(), b);
    assert!(get(&ch, &a, true).await.is_none());
    assert!(ch.status().connected());
    delete_quietly(&ch, &a).await;
    delete_quietly(&ch, &b).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn publishing_to_a_missing_exchange_is_404_on_the_channel_only() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let mut events = ErrorEvents::new(&conn);
    let x = broker.unique_name("no-such-exchange");
    within(
        "basic.publish",
        ch.basic_publish(
            x.as_str().into(),
            "rk".into(),
            Default::default(),
            b"lost",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("the publish itself is written");
    let err = events.next_error().await;
    assert_amqp_error(
        &err,
        404,
        Some(&format!("NOT_FOUND - no exchange '{x}' in vhost '/'")),
    );
    assert_channel_closed_only(&conn, &ch).await;

    // "amq.default" is not an alias of the default exchange for publishing in RabbitMQ 3.10.
    let ch = channel(&conn).await;
    let mut events = ErrorEvents::new(&conn);
    within(
        "basic.publish",
        ch.basic_publish(
            "amq.default".into(),
            "rk".into(),
            Default::default(),
            b"lost",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("the publish itself is written");
    let err = events.next_error().await;
    assert_amqp_error(
        &err,
        404,
        Some("NOT_FOUND - no exchange 'amq.default' in vhost '/'"),
    );
    assert_channel_closed_only(&conn, &ch).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn mandatory_publish_with_no_route_comes_back_as_basic_return_312() {
    // Raw client: without confirms lapin does not surface basic.return.
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    let nowhere = broker.unique_name("no-route");
    let props = basic::AMQPProperties::default()
        .with_correlation_id("corr-1".into())
        .with_content_type("text/plain".into());
    c.publish_full(1, "", &nowhere, true, b"come back", props.clone())
        .await;
    match c.recv_frame().await {
        AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Return(r))) => {
            assert_eq!(r.reply_code, 312);
            assert_eq!(r.reply_text.as_str(), "NO_ROUTE");
            assert_eq!(r.exchange.as_str(), "");
            assert_eq!(r.routing_key.as_str(), nowhere);
        }
        other => panic!("expected basic.return, got {other:?}"),
    }
    match c.recv_frame().await {
        AMQPFrame::Header(1, h) => {
            assert_eq!(h.body_size, 9);
            assert_eq!(h.properties, props);
        }
        other => panic!("expected the returned message's header, got {other:?}"),
    }
    assert_eq!(
        c.recv_frame().await,
        AMQPFrame::Body(1, b"come back".to_vec())
    );

    // A mandatory publish that routes is not returned; an empty routing key is returned too.
    let q = broker.unique_name("routed");
    c.declare_queue(1, &q).await;
    c.publish_full(1, "", &q, true, b"stays", Default::default())
        .await;
    c.publish_full(1, "", "", true, b"", Default::default())
        .await;
    match c.recv_frame().await {
        AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Return(r))) => {
            assert_eq!(
                (r.reply_code, r.routing_key.as_str()),
                (312, ""),
                "only the empty-key publish comes back"
            );
        }
        other => panic!("expected basic.return for the empty routing key, got {other:?}"),
    }
    match c.recv_frame().await {
        AMQPFrame::Header(1, h) => assert_eq!(h.body_size, 0),
        other => panic!("expected the returned header, got {other:?}"),
    }
    assert_eq!(
        c.purge(1, &q).await,
        1,
        "the routed mandatory message arrived"
    );
    c.delete_queue(1, &q).await;
    c.close().await;
}

fn all_properties(queue: &str) -> BasicProperties {
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongLongInt(-42));
    let mut headers = FieldTable::default();
    headers.insert("x-string".into(), AMQPValue::LongString("héllo".into()));
    headers.insert("x-int".into(), AMQPValue::LongInt(-7));
    headers.insert("x-long".into(), AMQPValue::LongLongInt(1 << 40));
    headers.insert("x-bool".into(), AMQPValue::Boolean(true));
    headers.insert("x-double".into(), AMQPValue::Double(2.5));
    headers.insert("x-timestamp".into(), AMQPValue::Timestamp(1_700_000_000));
    headers.insert("x-void".into(), AMQPValue::Void);
    headers.insert("x-table".into(), AMQPValue::FieldTable(nested));
    headers.insert(
        "x-array".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongInt(1),
            AMQPValue::LongString(LongString::from("two")),
        ])),
    );
    headers.insert(
        "x-bytes".into(),
        AMQPValue::ByteArray(vec![0u8, 1, 2, 255].into()),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id(ShortString::from(format!("corr-{queue}")))
        .with_reply_to("some-reply-queue".into())
        .with_expiration("60000".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_699_999_999)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("warren-tests".into())
        .with_cluster_id("cluster-x".into())
}

#[tokio::test]
async fn every_property_passes_through_untouched() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("props");
    declare(&ch, &q).await;
    let props = all_properties(&q);
    publish_with(&ch, &q, b"{\"id\":1}", props.clone()).await;
    publish_with(&ch, &q, b"{\"id\":2}", props.clone()).await;
    // Through basic.get ...
    let got = get_eventually(&ch, &q, true).await;
    assert_eq!(got.delivery.properties, props, "properties via basic.get");
    // ... and through basic.deliver.
    let mut consumer = consume(&ch, &q, true).await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.data, b"{\"id\":2}");
    assert_eq!(d.properties, props, "properties via basic.deliver");
    // No properties at all stays no properties.
    publish(&ch, &q, b"bare").await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.properties, BasicProperties::default());
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn user_id_other_than_the_login_is_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let mut events = ErrorEvents::new(&conn);
    publish_with(
        &ch,
        "anything",
        b"x",
        BasicProperties::default().with_user_id("someone-else".into()),
    )
    .await;
    let err = events.next_error().await;
    assert_amqp_error(&err, 406, Some(&user_id_refused("someone-else", "guest")));
    assert_channel_closed_only(&conn, &ch).await;
    close_conn(&conn).await;
}

/// A publish refused for several reasons gets RabbitMQ's first: a missing exchange, then a
/// direct reply-to without its consumer, then `user_id`, then `expiration`.
#[tokio::test]
async fn a_publish_refused_twice_gets_rabbitmqs_first_reason() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    let missing = broker.unique_name("no-such-exchange");
    let foreign = || basic::AMQPProperties::default().with_user_id("someone-else".into());
    let cases = [
        (
            missing.as_str(),
            foreign().with_expiration("bad".into()),
            404,
            format!(
                "NOT_FOUND - no exchange '{missing}' in vhost '{}'",
                broker.vhost()
            ),
        ),
        (
            "amq.direct",
            foreign().with_reply_to("amq.rabbitmq.reply-to".into()),
            406,
            "PRECONDITION_FAILED - fast reply consumer does not exist".to_owned(),
        ),
        (
            "amq.direct",
            foreign().with_expiration("bad".into()),
            406,
            user_id_refused("someone-else", "guest"),
        ),
    ];
    for (exchange, properties, code, text) in cases {
        c.publish_full(1, exchange, "k", false, b"m", properties)
            .await;
        let ids = c.expect_channel_close(1, code, Some(&text)).await;
        assert_eq!(ids, (60, 40), "{text}");
        c.open_channel(1).await;
    }
    c.close().await;
}

#[tokio::test]
async fn bodies_of_any_size_are_reassembled() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("sizes");
    declare(&ch, &q).await;
    let frame_max = 131_072usize;
    let sizes = [
        0,
        1,
        frame_max - 9,
        frame_max - 8,
        frame_max - 7,
        frame_max,
        3 * frame_max + 5,
        4 * 1024 * 1024 + 3,
    ];
    let bodies: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| (0..n).map(|i| (i * 31 % 256) as u8).collect())
        .collect();
    let mut consumer = consume(&ch, &q, true).await;
    for body in &bodies {
        publish(&ch, &q, body).await;
    }
    for (size, body) in sizes.iter().zip(&bodies) {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(d.data.len(), *size, "delivered size");
        assert!(d.data == *body, "body of {size} bytes altered");
    }
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn empty_body_is_a_header_with_no_body_frame() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    let q = broker.unique_name("empty-body");
    c.declare_queue(1, &q).await;
    c.publish(1, &q, b"").await;
    let reply = c
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
            reply,
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetOk(_)))
        ),
        "got {reply:?}"
    );
    match c.recv_frame().await {
        AMQPFrame::Header(1, h) => assert_eq!(h.body_size, 0),
        other => panic!("expected a header, got {other:?}"),
    }
    // The next frame is the reply to the next request, not an empty body frame.
    let ok = c.declare_queue(1, &q).await;
    assert_eq!(ok.message_count, 0);
    c.delete_queue(1, &q).await;
    c.close().await;
}

#[tokio::test]
async fn consumer_tags_are_echoed_or_generated() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("tags");
    declare(&ch, &q).await;
    let mut generated = consume(&ch, &q, true).await;
    let tag = generated.tag();
    let suffix = tag
        .as_str()
        .strip_prefix("amq.ctag-")
        .unwrap_or_else(|| panic!("server tag {tag:?} must start with amq.ctag-"));
    assert!(suffix.len() >= 16, "server tag {tag:?} too short");
    publish(&ch, &q, b"1").await;
    let _ = next_delivery(&mut generated).await;
    within("cancel", ch.basic_cancel(tag.clone(), Default::default()))
        .await
        .expect("cancel");
    let other = consume(&ch, &q, true).await;
    assert_ne!(other.tag(), tag, "generated tags are unique");

    let mut chosen = within(
        "consume",
        ch.basic_consume(
            q.as_str().into(),
            "my-own-tag".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume with a client tag");
    assert_eq!(chosen.tag().as_str(), "my-own-tag");
    within("cancel", ch.basic_cancel(other.tag(), Default::default()))
        .await
        .expect("cancel");
    publish(&ch, &q, b"2").await;
    let d = next_delivery(&mut chosen).await;
    assert_eq!(d.data, b"2");
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn deliveries_round_robin_over_consumers() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("round-robin");
    declare(&ch, &q).await;
    let c1 = channel(&conn).await;
    let c2 = channel(&conn).await;
    let mut a = consume(&c1, &q, true).await;
    let mut b = consume(&c2, &q, true).await;
    for i in 0..10u8 {
        publish(&ch, &q, &[i]).await;
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for _ in 0..5 {
        got_a.push(next_delivery(&mut a).await.data[0]);
        got_b.push(next_delivery(&mut b).await.data[0]);
    }
    let (evens, odds) = if got_a[0] == 0 {
        (got_a, got_b)
    } else {
        (got_b, got_a)
    };
    assert_eq!(evens, [0, 2, 4, 6, 8], "strict alternation");
    assert_eq!(odds, [1, 3, 5, 7, 9], "strict alternation");
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn exclusive_consumer_conflicts_are_403() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let other = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("exclusive-consumer");
    declare(&ch, &q).await;
    let text = format!("ACCESS_REFUSED - queue '{q}' in vhost '/' in exclusive use");
    let excl = BasicConsumeOptions {
        exclusive: true,
        ..Default::default()
    };
    let holder = within(
        "exclusive consume",
        ch.basic_consume(q.as_str().into(), "".into(), excl, FieldTable::default()),
    )
    .await
    .expect("the first exclusive consumer");

    // Any consumer while an exclusive one holds the queue: 403, from any connection.
    for (conn_, exclusive) in [(&other, false), (&other, true), (&conn, false)] {
        let c = channel(conn_).await;
        let err = expect_err(
            "consume on an exclusively consumed queue",
            within(
                "consume",
                c.basic_consume(
                    q.as_str().into(),
                    "".into(),
                    BasicConsumeOptions {
                        exclusive,
                        ..Default::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await,
        );
        assert_amqp_error(&err, 403, Some(&text));
        assert_channel_closed_only(conn_, &c).await;
    }

    // An exclusive consumer while any other consumer exists: 403 too.
    within("cancel", ch.basic_cancel(holder.tag(), Default::default()))
        .await
        .expect("cancel the exclusive consumer");
    let _plain = consume(&ch, &q, false).await;
    let c = channel(&other).await;
    let err = expect_err(
        "exclusive consume on a consumed queue",
        within(
            "consume",
            c.basic_consume(q.as_str().into(), "".into(), excl, FieldTable::default()),
        )
        .await,
    );
    assert_amqp_error(&err, 403, Some(&text));
    assert_channel_closed_only(&other, &c).await;
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
    close_conn(&other).await;
}

#[tokio::test]
async fn reusing_a_consumer_tag_on_a_channel_is_530_on_the_connection() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let bystander = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("tag-reuse");
    declare(&ch, &q).await;
    let opts = BasicConsumeOptions::default();
    let _first = within(
        "consume",
        ch.basic_consume(q.as_str().into(), "dup".into(), opts, FieldTable::default()),
    )
    .await
    .expect("first consumer");
    // The same tag on another channel is fine.
    let ch2 = channel(&conn).await;
    let _second = within(
        "consume",
        ch2.basic_consume(q.as_str().into(), "dup".into(), opts, FieldTable::default()),
    )
    .await
    .expect("same tag, other channel");
    // lapin 4.12 may resolve this consume as Ok even though the server closes the connection,
    // so the error is read from the connection's events.
    let mut events = ErrorEvents::new(&conn);
    let _ = within(
        "consume",
        ch.basic_consume(q.as_str().into(), "dup".into(), opts, FieldTable::default()),
    )
    .await;
    let err = events.next_error().await;
    assert_amqp_error(
        &err,
        530,
        Some("NOT_ALLOWED - attempt to reuse consumer tag 'dup'"),
    );
    assert_connection_closed(&conn).await;
    // Nothing one client does affects another.
    assert_connection_works(&bystander).await;
    let bch = channel(&bystander).await;
    delete_quietly(&bch, &q).await;
    close_conn(&bystander).await;
}

#[tokio::test]
async fn basic_cancel_stops_deliveries() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("cancel");
    declare(&ch, &q).await;
    let mut consumer = consume(&ch, &q, true).await;
    publish(&ch, &q, b"before").await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"before");
    within(
        "cancel",
        ch.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
    )
    .await
    .expect("cancel");
    let end = within("the end of the consumer", consumer.next()).await;
    assert!(end.is_none(), "consumer must end after cancel, got {end:?}");
    publish(&ch, &q, b"after").await;
    let left = get_eventually(&ch, &q, true).await;
    assert_eq!(left.delivery.data, b"after", "it stays in the queue");
    // Cancelling an unknown tag is answered with cancel-ok.
    within(
        "cancel unknown",
        ch.basic_cancel("no-such-consumer".into(), BasicCancelOptions::default()),
    )
    .await
    .expect("cancel of an unknown tag is fine");
    assert!(ch.status().connected());
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
#[cfg_attr(
    warren_external,
    ignore = "embedded only: RabbitMQ 3.10 answers 541 to consume and cancel in one write (ORACLE.md)"
)]
async fn a_reused_consumer_tag_never_gets_the_cancelled_consumers_messages() {
    // consume, cancel and consume again with the same tag on another queue, in one write: the
    // first consumer's deliveries are still on their way to the connection when the second
    // consumer appears. They must go back to their queue, not to the new consumer.
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    let first = broker.unique_name("tag-first");
    let second = broker.unique_name("tag-second");
    c.declare_queue(1, &first).await;
    c.declare_queue(1, &second).await;
    for body in [b"a1", b"a2", b"a3"] {
        c.publish(1, &first, body).await;
    }
    let tag = "reused";
    let mut batch = Vec::new();
    for method in [
        raw::consume(&first, tag, false),
        raw::cancel(tag),
        raw::consume(&second, tag, false),
    ] {
        batch.extend(RawClient::encode(&AMQPFrame::Method(1, method)));
    }
    c.send_bytes(&batch).await;
    c.publish(1, &second, b"b1").await;
    // Everything up to the delivery of b1: no delivery may come from the first queue.
    loop {
        match c.recv_frame().await {
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                assert_eq!(d.consumer_tag.as_str(), tag);
                assert_eq!(
                    d.routing_key.as_str(),
                    second,
                    "a delivery from the cancelled consumer's queue reached the new consumer"
                );
                assert!(matches!(c.recv_frame().await, AMQPFrame::Header(1, _)));
                assert!(matches!(c.recv_frame().await, AMQPFrame::Body(1, _)));
                break;
            }
            AMQPFrame::Method(1, AMQPClass::Basic(_))
            | AMQPFrame::Header(..)
            | AMQPFrame::Body(..) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // The first queue's three messages are back in it, ready.
    assert_eq!(c.declare_passive(1, &first).await.message_count, 3);
    c.close().await;
}

#[tokio::test]
async fn thousands_of_pipelined_gets_are_all_answered() {
    // 2,000 basic.get in one write, each answered with 2 KiB: far more output than the broker
    // buffers before it stops handling input, so it must come back to the gets it holds.
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    let q = broker.unique_name("many-gets");
    c.declare_queue(1, &q).await;
    const BODY: usize = 2048;
    const COUNT: usize = 2000;
    let body = vec![7u8; BODY];
    for _ in 0..COUNT {
        c.publish(1, &q, &body).await;
    }
    let get = RawClient::encode(&AMQPFrame::Method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: q.as_str().into(),
            no_ack: true,
        })),
    ));
    c.send_bytes(&get.repeat(COUNT)).await;
    let mut answered = 0;
    while answered < COUNT {
        match c.recv_frame().await {
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetOk(ok))) => {
                assert_eq!(ok.message_count as usize, COUNT - answered - 1);
                answered += 1;
            }
            AMQPFrame::Header(1, h) => assert_eq!(h.body_size, BODY as u64),
            AMQPFrame::Body(1, b) => assert_eq!(b.len(), BODY),
            other => panic!("after {answered} answers: unexpected {other:?}"),
        }
    }
    assert!(
        matches!(c.recv_frame().await, AMQPFrame::Header(1, _)),
        "the last header"
    );
    assert!(
        matches!(c.recv_frame().await, AMQPFrame::Body(1, _)),
        "the last body"
    );
    c.delete_queue(1, &q).await;
    c.close().await;
}

#[tokio::test]
async fn basic_get_reports_remaining_count_and_get_empty() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("get");
    declare(&ch, &q).await;
    assert!(
        get(&ch, &q, false).await.is_none(),
        "get-empty on an empty queue"
    );
    for i in 0..3u8 {
        publish_confirmed(&ch, &q, &[i]).await;
    }
    let m1 = get(&ch, &q, false).await.expect("first");
    assert_eq!(
        (m1.delivery.data.as_slice(), m1.message_count),
        (&[0u8][..], 2)
    );
    assert!(!m1.delivery.redelivered);
    let m2 = get(&ch, &q, true).await.expect("second");
    assert_eq!(
        (m2.delivery.data.as_slice(), m2.message_count),
        (&[1u8][..], 1)
    );
    assert!(
        m2.delivery.delivery_tag > m1.delivery.delivery_tag,
        "delivery tags increase on a channel"
    );
    let m3 = get(&ch, &q, false).await.expect("third");
    assert_eq!(m3.message_count, 0);
    assert!(get(&ch, &q, false).await.is_none());
    within(
        "ack",
        ch.basic_ack(
            m3.delivery.delivery_tag,
            lapin::options::BasicAckOptions { multiple: true },
        ),
    )
    .await
    .expect("ack");
    // All acked: closing the channel brings nothing back.
    within("close", ch.close(200, "OK".into()))
        .await
        .expect("close");
    let ch = channel(&conn).await;
    assert!(get(&ch, &q, true).await.is_none());
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn no_ack_deliveries_are_gone_once_sent() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("no-ack");
    declare(&ch, &q).await;
    let cch = channel(&conn).await;
    let mut consumer = consume(&cch, &q, true).await;
    for i in 0..3u8 {
        publish(&ch, &q, &[i]).await;
    }
    for i in 0..3u8 {
        assert_eq!(next_delivery(&mut consumer).await.data, [i]);
    }
    within("close", cch.close(200, "OK".into()))
        .await
        .expect("close");
    assert!(
        get(&ch, &q, true).await.is_none(),
        "no_ack deliveries are not requeued"
    );
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn messages_are_delivered_in_publish_order() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("fifo");
    declare(&ch, &q).await;
    for i in 0..200u32 {
        publish(&ch, &q, &i.to_be_bytes()).await;
    }
    let mut consumer = consume(&ch, &q, true).await;
    for i in 0..200u32 {
        assert_eq!(next_delivery(&mut consumer).await.data, i.to_be_bytes());
    }
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn expired_messages_are_never_delivered() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("ttl");
    declare(&ch, &q).await;
    let exp = |ms: &str| BasicProperties::default().with_expiration(ms.into());
    // expiration "0" with no consumer waiting: expired at once.
    publish_with(&ch, &q, b"expired-at-once", exp("0")).await;
    publish_confirmed(&ch, &q, b"kept").await;
    let got = get(&ch, &q, true).await.expect("the unexpired message");
    assert_eq!(got.delivery.data, b"kept");
    assert!(get(&ch, &q, true).await.is_none());

    // A short TTL at the head, with live messages behind it.
    publish_with(&ch, &q, b"short-lived", exp("50")).await;
    publish_confirmed(&ch, &q, b"long-lived").await;
    // Let the TTL elapse (the waiting is the point of this test).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = get(&ch, &q, true).await.expect("the unexpired message");
    assert_eq!(got.delivery.data, b"long-lived");
    assert_eq!(got.message_count, 0);
    assert!(get(&ch, &q, true).await.is_none());

    // Expired at the head with nobody reading: dropped from the queue's count.
    publish_with(&ch, &q, b"alone", exp("50")).await;
    broker.wait_for_messages(&q, 0).await;

    // A consumer never sees an expired message.
    publish_with(&ch, &q, b"gone", exp("20")).await;
    publish_confirmed(&ch, &q, b"seen").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut consumer = consume(&ch, &q, true).await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"seen");
    assert_no_delivery(&mut consumer, Duration::from_millis(200)).await;
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn expiration_is_passed_through_and_valid_forms_are_accepted() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("ttl-forms");
    declare(&ch, &q).await;
    for e in ["60000", "+5000", "0100000", "315360000000"] {
        let confirm = within(
            "publish",
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                Default::default(),
                e.as_bytes(),
                BasicProperties::default().with_expiration(e.into()),
            ),
        )
        .await
        .expect("publish");
        assert!(within("confirm", confirm).await.expect("confirm").is_ack());
    }
    let got: Vec<_> = drain_bodies(&ch, &q).await;
    assert_eq!(
        got,
        [&b"60000"[..], b"+5000", b"0100000", b"315360000000"],
        "all four accepted and kept"
    );
    publish_with(
        &ch,
        &q,
        b"x",
        BasicProperties::default().with_expiration("60000".into()),
    )
    .await;
    let got = get_eventually(&ch, &q, true).await;
    assert_eq!(
        got.delivery
            .properties
            .expiration()
            .as_ref()
            .map(|s| s.as_str()),
        Some("60000"),
        "the expiration property is delivered as sent"
    );
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn invalid_expiration_is_406_on_the_channel() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = broker.unique_name("bad-expiration");
    let setup = channel(&conn).await;
    declare(&setup, &q).await;
    let cases = [
        ("abc", "no_integer".to_owned()),
        ("", "no_integer".to_owned()),
        (" 100", "no_integer".to_owned()),
        ("-1", "{value_negative,-1}".to_owned()),
        ("1.5", "{leftover_string,\".5\"}".to_owned()),
        ("1e3", "{leftover_string,\"e3\"}".to_owned()),
    ];
    for (value, why) in cases {
        let ch = channel(&conn).await;
        let mut events = ErrorEvents::new(&conn);
        publish_with(
            &ch,
            &q,
            b"x",
            BasicProperties::default().with_expiration(value.into()),
        )
        .await;
        let err = events.next_error().await;
        assert_amqp_error(
            &err,
            406,
            Some(&format!(
                "PRECONDITION_FAILED - invalid expiration '{value}': {why}"
            )),
        );
        assert_channel_closed_only(&conn, &ch).await;
    }
    // Over the 10-year limit.
    let ch = channel(&conn).await;
    let mut events = ErrorEvents::new(&conn);
    publish_with(
        &ch,
        &q,
        b"x",
        BasicProperties::default().with_expiration("315360000001".into()),
    )
    .await;
    let err = events.next_error().await;
    assert_amqp_error(
        &err,
        406,
        Some(
            "PRECONDITION_FAILED - invalid expiration '315360000001': \
             {value_too_large,315360000001}",
        ),
    );
    assert_channel_closed_only(&conn, &ch).await;
    assert!(
        get(&setup, &q, true).await.is_none(),
        "nothing was enqueued"
    );
    delete_quietly(&setup, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn qos_zero_means_unlimited() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("qos-zero");
    declare(&ch, &q).await;
    within("qos", ch.basic_qos(0, BasicQosOptions::default()))
        .await
        .expect("qos 0");
    let mut consumer = consume(&ch, &q, false).await;
    for i in 0..50u8 {
        publish(&ch, &q, &[i]).await;
    }
    // All 50 arrive without any ack.
    for i in 0..50u8 {
        assert_eq!(next_delivery(&mut consumer).await.data, [i]);
    }
    let counter = channel(&conn).await;
    assert_eq!(
        passive(&counter, &q)
            .await
            .expect("passive")
            .message_count(),
        0
    );
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn large_messages_waiting_behind_a_full_prefetch_come_out_whole_after_their_consumer_leaves()
{
    // 4 KiB bodies, each in one frame: Warren keeps such a body as a slice of the connection's
    // read buffer while its queue has a consumer, and copies it out when the last consumer
    // leaves. Several read buffers' worth of them wait behind a prefetch of 1, then the
    // consumer is cancelled: every body must come back intact, in order.
    const MESSAGES: usize = 300;
    const BODY: usize = 4096;
    // Its index up front, then a fill that differs between neighbours.
    let body = |i: usize| -> Vec<u8> {
        let mut body = vec![i as u8; BODY];
        body[..8].copy_from_slice(&(i as u64).to_be_bytes());
        body
    };
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("pinned-backlog");
    declare(&ch, &q).await;
    within("qos", ch.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("qos 1");
    let mut consumer = consume(&ch, &q, false).await;
    let publisher = channel(&conn).await;
    for i in 0..MESSAGES {
        publish(&publisher, &q, &body(i)).await;
    }
    assert_eq!(next_delivery(&mut consumer).await.data, body(0));
    let counter = channel(&conn).await;
    warren_harness::wait_until("the rest queued", TIMEOUT, async || {
        let ready = passive(&counter, &q).await.map_err(|e| e.to_string())?;
        match ready.message_count() as usize {
            n if n == MESSAGES - 1 => Ok(()),
            n => Err(format!("{n} ready")),
        }
    })
    .await;
    within(
        "cancel",
        ch.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
    )
    .await
    .expect("cancel");
    let rest = drain_bodies(&counter, &q).await;
    assert_eq!(rest.len(), MESSAGES - 1);
    for (i, got) in rest.iter().enumerate() {
        assert!(*got == body(i + 1), "message {} came back changed", i + 1);
    }
    // The first one, delivered and unacked, returns to the queue when its channel closes.
    within("channel.close", ch.close(200, "OK".into()))
        .await
        .expect("channel.close");
    assert_eq!(
        get_eventually(&counter, &q, true).await.delivery.data,
        body(0)
    );
    delete_quietly(&counter, &q).await;
    close_conn(&conn).await;
}
