//! Error scopes: a channel error closes only that channel (the connection and its other
//! channels go on), a connection error closes only that connection, nothing one client sends
//! affects another, and the close handshake initiated by the server.

use amq_protocol::{
    frame::AMQPFrame,
    protocol::{AMQPClass, basic, channel as chan, queue},
    types::FieldTable,
};
use lapin::options::{BasicAckOptions, ChannelFlowOptions};
use warren_harness::TestBroker;
use warren_tests::{
    ErrorEvents, assert_amqp_error, assert_channel_closed_only, assert_connection_closed,
    assert_connection_works, channel, close_conn, consume, declare, delete_quietly, expect_err,
    next_delivery, passive, publish, raw::RawClient, within,
};

#[tokio::test]
async fn a_channel_error_leaves_the_other_channels_working() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("survivor");
    declare(&ch, &q).await;
    let cch = channel(&conn).await;
    let mut consumer = consume(&cch, &q, false).await;
    publish(&ch, &q, b"before").await;
    let before = next_delivery(&mut consumer).await;
    assert_eq!(before.data, b"before");

    // A third channel fails.
    let bad = channel(&conn).await;
    let err = expect_err(
        "passive declare of a missing queue",
        passive(&bad, &broker.unique_name("missing")).await,
    );
    assert_amqp_error(&err, 404, None);
    assert_channel_closed_only(&conn, &bad).await;
    assert!(
        bad.basic_qos(1, Default::default()).await.is_err(),
        "a closed channel refuses methods"
    );

    // The consumer channel, its unacked delivery and the publisher channel are untouched.
    assert!(cch.status().connected() && ch.status().connected());
    publish(&ch, &q, b"after").await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"after");
    within("ack", before.acker.ack(BasicAckOptions { multiple: true }))
        .await
        .expect("ack on the surviving channel");
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_connection_error_does_not_touch_other_connections() {
    let broker = TestBroker::start().await;
    let victim = broker.connect().await;
    let bystander = broker.connect().await;
    let bch = channel(&bystander).await;
    let q = broker.unique_name("bystander");
    declare(&bch, &q).await;
    let mut consumer = consume(&bch, &q, true).await;

    // channel.flow(active=false) is a connection error (540) in RabbitMQ 3.10.
    let vch = channel(&victim).await;
    let mut events = ErrorEvents::new(&victim);
    let _ = within(
        "channel.flow",
        vch.channel_flow(ChannelFlowOptions { active: false }),
    )
    .await;
    let err = events.next_error().await;
    assert_amqp_error(&err, 540, Some("NOT_IMPLEMENTED - active=false"));
    assert_connection_closed(&victim).await;

    assert!(bystander.status().connected());
    publish(&bch, &q, b"unaffected").await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"unaffected");
    assert_connection_works(&bystander).await;
    delete_quietly(&bch, &q).await;
    close_conn(&bystander).await;
}

#[tokio::test]
async fn channel_flow_active_true_is_acknowledged() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let active = within(
        "channel.flow",
        ch.channel_flow(ChannelFlowOptions { active: true }),
    )
    .await
    .expect("flow active=true");
    assert!(active);
    assert_connection_works(&conn).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_channel_error_on_one_connection_does_not_touch_another() {
    let broker = TestBroker::start().await;
    let a = broker.connect().await;
    let b = broker.connect().await;
    let ach = channel(&a).await;
    let bch = channel(&b).await;
    let q = broker.unique_name("shared");
    declare(&bch, &q).await;
    let err = expect_err(
        "redeclare durable",
        warren_tests::declare_with(
            &ach,
            &q,
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await,
    );
    assert_amqp_error(&err, 406, None);
    assert_channel_closed_only(&a, &ach).await;
    assert!(bch.status().connected());
    let p = passive(&bch, &q).await.expect("b's channel still works");
    assert_eq!(p.consumer_count(), 0);
    delete_quietly(&bch, &q).await;
    close_conn(&a).await;
    close_conn(&b).await;
}

#[tokio::test]
async fn after_a_server_channel_close_only_close_ok_counts_then_the_channel_reopens() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.open_channel(2).await;
    let missing = broker.unique_name("missing");
    c.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: missing.as_str().into(),
            passive: true,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    // Sent after the failing method, before our close-ok: the server must ignore it.
    c.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 1,
            global: false,
        })),
    )
    .await;
    let ids = c
        .expect_channel_close(
            1,
            404,
            Some(&format!("NOT_FOUND - no queue '{missing}' in vhost '/'")),
        )
        .await;
    assert_eq!(ids, (50, 10));
    // Channel 2 is untouched; its reply is the next frame (no qos-ok for channel 1).
    let q = broker.unique_name("raw-after-close");
    let ok = c.declare_queue(2, &q).await;
    assert_eq!(ok.queue.as_str(), q);
    // Channel 1 can be opened again and works.
    c.open_channel(1).await;
    let reply = c
        .rpc(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 1,
                global: false,
            })),
        )
        .await;
    assert!(
        matches!(
            reply,
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::QosOk(_)))
        ),
        "got {reply:?}"
    );
    c.delete_queue(2, &q).await;
    c.close().await;
}

#[tokio::test]
async fn a_connection_error_closes_every_channel_of_that_connection() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.open_channel(2).await;
    // Second channel.open on channel 2: 504, connection-level.
    c.send_method(2, AMQPClass::Channel(chan::AMQPMethod::Open(chan::Open {})))
        .await;
    c.expect_connection_close_and_eof(504, Some("CHANNEL_ERROR - second 'channel.open' seen"))
        .await;
    // A new connection is fine.
    let fresh = RawClient::open_on_channel(broker.url(), 1).await;
    fresh.close().await;
}

#[tokio::test]
async fn unacked_messages_of_a_failed_channel_are_requeued() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("failed-channel-requeue");
    declare(&ch, &q).await;
    publish(&ch, &q, b"held").await;
    let mut consumer = consume(&ch, &q, false).await;
    let d = next_delivery(&mut consumer).await;
    assert!(!d.redelivered);
    // The channel dies of a 404 while holding the message.
    let err = expect_err(
        "passive declare of a missing queue",
        passive(&ch, &broker.unique_name("missing")).await,
    );
    assert_amqp_error(&err, 404, None);
    assert_channel_closed_only(&conn, &ch).await;
    let other = channel(&conn).await;
    let m = warren_tests::get_eventually(&other, &q, true).await;
    assert_eq!(m.delivery.data, b"held");
    assert!(m.delivery.redelivered);
    delete_quietly(&other, &q).await;
    close_conn(&conn).await;
}

/// Publishes pipelined in one write around a publish to a missing exchange (the broker routes
/// a run of publishes together): those before it are routed, its channel closes with 404, the
/// channel's later publishes are dropped, and another channel's publish in the same write is
/// routed.
#[tokio::test]
async fn a_failing_publish_among_pipelined_ones_closes_its_channel_and_drops_only_what_follows() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.open_channel(2).await;
    let q = broker.unique_name("pipelined");
    c.declare_queue(2, &q).await;
    let missing = broker.unique_name("no-such-exchange");
    let publish = |ch, exchange: &str, body: &[u8]| {
        RawClient::publish_frames(ch, exchange, &q, false, body, Default::default())
    };
    let mut batch = publish(1, "", b"routed");
    batch.extend(publish(1, &missing, b"fails"));
    batch.extend(publish(1, "", b"dropped: its channel is closing"));
    batch.extend(publish(2, "", b"routed: another channel"));
    c.send_bytes(&batch).await;
    c.expect_channel_close(
        1,
        404,
        Some(&format!("NOT_FOUND - no exchange '{missing}' in vhost '/'")),
    )
    .await;
    assert_eq!(c.purge(2, &q).await, 2, "the first and the last publish");
    c.delete_queue(2, &q).await;
    c.close().await;
}
