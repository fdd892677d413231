//! basic.ack / basic.nack / basic.reject: single, multiple, tag 0, requeue to the original
//! position with redelivered=true, unknown and double acks (406), and requeue of unacked
//! messages when a channel or connection ends (cleanly or by a dropped socket), and acks
//! taken back by tx.rollback.

use lapin::{
    Channel, Connection,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
};
use warren_harness::{TestBroker, wait_until};
use warren_tests::{
    ErrorEvents, TIMEOUT, assert_amqp_error, assert_channel_closed_only, channel, close_conn,
    confirm_channel, consume, declare, delete_quietly, get, next_delivery, passive, publish,
    publish_confirmed, within,
};

/// A queue with `n` messages (bodies 0..n, one byte each), published with confirms.
async fn filled_queue(broker: &TestBroker, conn: &Connection, prefix: &str, n: u8) -> String {
    let ch = confirm_channel(conn).await;
    let q = broker.unique_name(prefix);
    declare(&ch, &q).await;
    for i in 0..n {
        publish_confirmed(&ch, &q, &[i]).await;
    }
    within("close", ch.close(200, "OK".into()))
        .await
        .expect("close the filling channel");
    q
}

/// Drains `q` with no_ack gets: (body byte, redelivered) in queue order.
async fn drain(ch: &Channel, q: &str) -> Vec<(u8, bool)> {
    let mut out = Vec::new();
    while let Some(m) = get(ch, q, true).await {
        out.push((m.delivery.data[0], m.delivery.redelivered));
    }
    out
}

/// Waits until `q` holds `n` ready messages (requeues after a close are asynchronous).
async fn wait_ready(conn: &Connection, q: &str, n: u32) {
    let ch = channel(conn).await;
    wait_until(
        &format!("{q} holds {n} ready messages"),
        TIMEOUT,
        async || match passive(&ch, q).await.expect("passive").message_count() {
            ready if ready == n => Ok(()),
            ready => Err(format!("{ready} ready")),
        },
    )
    .await;
    let _ = ch.close(200, "OK".into()).await;
}

async fn ack(ch: &Channel, tag: u64, multiple: bool) {
    within("basic.ack", ch.basic_ack(tag, BasicAckOptions { multiple }))
        .await
        .expect("basic.ack");
}

/// A round trip on `ch`: every method sent before it has been processed when it returns.
async fn sync(ch: &Channel) {
    within("basic.qos", ch.basic_qos(0, Default::default()))
        .await
        .expect("sync round trip");
}

#[tokio::test]
async fn ack_single_and_multiple_then_close_requeues_only_the_rest() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled_queue(&broker, &conn, "ack-multiple", 6).await;
    let ch = channel(&conn).await;
    let mut consumer = consume(&ch, &q, false).await;
    let mut tags = Vec::new();
    for i in 0..6u8 {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(d.data, [i]);
        assert!(!d.redelivered);
        tags.push(d.delivery_tag);
    }
    assert_eq!(
        tags,
        [1, 2, 3, 4, 5, 6],
        "delivery tags count from 1 per channel"
    );
    ack(&ch, 2, false).await; // acks 2
    ack(&ch, 4, true).await; // acks 1, 3, 4
    sync(&ch).await;
    within("close", ch.close(200, "OK".into()))
        .await
        .expect("close");
    wait_ready(&conn, &q, 2).await;
    let check = channel(&conn).await;
    assert_eq!(drain(&check, &q).await, [(4, true), (5, true)]);
    delete_quietly(&check, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn ack_tag_zero_with_multiple_acks_everything() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled_queue(&broker, &conn, "ack-zero", 5).await;
    let ch = channel(&conn).await;
    let mut consumer = consume(&ch, &q, false).await;
    for i in 0..5u8 {
        assert_eq!(next_delivery(&mut consumer).await.data, [i]);
    }
    ack(&ch, 0, true).await;
    sync(&ch).await;
    within("close", ch.close(200, "OK".into()))
        .await
        .expect("close");
    let check = channel(&conn).await;
    // Nothing comes back: a later passive count of 0 must hold after the close.
    assert_eq!(
        passive(&check, &q).await.expect("passive").message_count(),
        0
    );
    assert!(get(&check, &q, true).await.is_none());
    delete_quietly(&check, &q).await;

    // With nothing outstanding, ack(0, multiple) is not an error.
    let ch = channel(&conn).await;
    ack(&ch, 0, true).await;
    sync(&ch).await;
    assert!(ch.status().connected());
    close_conn(&conn).await;
}

#[tokio::test]
async fn requeued_messages_go_back_to_their_original_position_redelivered() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled_queue(&broker, &conn, "requeue-order", 5).await;
    let ch = channel(&conn).await;
    let m0 = get(&ch, &q, false).await.expect("m0");
    let m1 = get(&ch, &q, false).await.expect("m1");
    let m2 = get(&ch, &q, false).await.expect("m2");
    assert_eq!(
        (
            m0.delivery.data[0],
            m1.delivery.data[0],
            m2.delivery.data[0]
        ),
        (0, 1, 2)
    );
    // Out of order: nack m1, reject m0, nack m2 (all with requeue).
    within(
        "nack",
        m1.delivery.acker.nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        }),
    )
    .await
    .expect("nack m1");
    within(
        "reject",
        m0.delivery
            .acker
            .reject(BasicRejectOptions { requeue: true }),
    )
    .await
    .expect("reject m0");
    within(
        "nack",
        m2.delivery.acker.nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        }),
    )
    .await
    .expect("nack m2");
    sync(&ch).await;
    assert_eq!(
        drain(&ch, &q).await,
        [(0, true), (1, true), (2, true), (3, false), (4, false)]
    );
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn nack_multiple_requeues_every_unacked_up_to_the_tag() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled_queue(&broker, &conn, "nack-multiple", 5).await;
    let ch = channel(&conn).await;
    let mut consumer = consume(&ch, &q, false).await;
    let mut last = 0;
    for i in 0..4u8 {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(d.data, [i]);
        last = d.delivery_tag;
    }
    let fifth = next_delivery(&mut consumer).await;
    within(
        "cancel",
        ch.basic_cancel(consumer.tag(), Default::default()),
    )
    .await
    .expect("cancel, so the requeued ones stay in the queue");
    within(
        "nack",
        ch.basic_nack(
            last,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        ),
    )
    .await
    .expect("nack multiple");
    ack(&ch, fifth.delivery_tag, false).await;
    sync(&ch).await;
    assert_eq!(
        drain(&ch, &q).await,
        [(0, true), (1, true), (2, true), (3, true)]
    );
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn nack_and_reject_without_requeue_drop_the_message() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled_queue(&broker, &conn, "drop", 3).await;
    let ch = channel(&conn).await;
    let m0 = get(&ch, &q, false).await.expect("m0");
    let m1 = get(&ch, &q, false).await.expect("m1");
    within(
        "reject",
        m0.delivery
            .acker
            .reject(BasicRejectOptions { requeue: false }),
    )
    .await
    .expect("reject");
    within(
        "nack",
        m1.delivery.acker.nack(BasicNackOptions {
            multiple: false,
            requeue: false,
        }),
    )
    .await
    .expect("nack");
    sync(&ch).await;
    within("close", ch.close(200, "OK".into()))
        .await
        .expect("close");
    let check = channel(&conn).await;
    assert_eq!(drain(&check, &q).await, [(2, false)]);
    delete_quietly(&check, &q).await;
    close_conn(&conn).await;
}

/// Runs `bad` on a fresh channel holding one unacked delivery (tag 1) and expects a channel
/// close 406 with `text`.
async fn expect_406(broker: &TestBroker, what: &str, text: &str, bad: impl AsyncFnOnce(&Channel)) {
    let conn = broker.connect().await;
    let q = filled_queue(broker, &conn, "bad-ack", 1).await;
    let ch = channel(&conn).await;
    let held = get(&ch, &q, false).await.expect("one unacked message");
    assert_eq!(held.delivery.delivery_tag, 1);
    let mut events = ErrorEvents::new(&conn);
    bad(&ch).await;
    let err = events.next_error().await;
    assert_amqp_error(&err, 406, Some(text));
    assert_channel_closed_only(&conn, &ch).await;
    // The held message went back to the queue with the channel.
    let check = channel(&conn).await;
    wait_ready(&conn, &q, 1).await;
    assert_eq!(drain(&check, &q).await, [(0, true)], "{what}");
    delete_quietly(&check, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn ack_of_an_unknown_tag_is_406() {
    let broker = TestBroker::start().await;
    expect_406(
        &broker,
        "ack 5",
        "PRECONDITION_FAILED - unknown delivery tag 5",
        async |ch| {
            let _ = ch.basic_ack(5, BasicAckOptions { multiple: false }).await;
        },
    )
    .await;
    expect_406(
        &broker,
        "ack 9 multiple",
        "PRECONDITION_FAILED - unknown delivery tag 9",
        async |ch| {
            let _ = ch.basic_ack(9, BasicAckOptions { multiple: true }).await;
        },
    )
    .await;
    expect_406(
        &broker,
        "ack 0 single",
        "PRECONDITION_FAILED - unknown delivery tag 0",
        async |ch| {
            let _ = ch.basic_ack(0, BasicAckOptions { multiple: false }).await;
        },
    )
    .await;
}

#[tokio::test]
async fn nack_and_reject_of_an_unknown_tag_are_406() {
    let broker = TestBroker::start().await;
    expect_406(
        &broker,
        "nack 7",
        "PRECONDITION_FAILED - unknown delivery tag 7",
        async |ch| {
            let _ = ch
                .basic_nack(
                    7,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await;
        },
    )
    .await;
    expect_406(
        &broker,
        "reject 7",
        "PRECONDITION_FAILED - unknown delivery tag 7",
        async |ch| {
            let _ = ch
                .basic_reject(7, BasicRejectOptions { requeue: true })
                .await;
        },
    )
    .await;
}

#[tokio::test]
async fn acking_a_tag_twice_is_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled_queue(&broker, &conn, "double-ack", 2).await;
    let ch = channel(&conn).await;
    let m = get(&ch, &q, false).await.expect("a message");
    ack(&ch, m.delivery.delivery_tag, false).await;
    let mut events = ErrorEvents::new(&conn);
    let _ = ch
        .basic_ack(m.delivery.delivery_tag, BasicAckOptions { multiple: false })
        .await;
    let err = events.next_error().await;
    assert_amqp_error(
        &err,
        406,
        Some(&format!(
            "PRECONDITION_FAILED - unknown delivery tag {}",
            m.delivery.delivery_tag
        )),
    );
    assert_channel_closed_only(&conn, &ch).await;
    let check = channel(&conn).await;
    assert_eq!(drain(&check, &q).await, [(1, false)], "the first ack held");
    delete_quietly(&check, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn acking_a_no_ack_delivery_is_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled_queue(&broker, &conn, "ack-no-ack", 1).await;
    let ch = channel(&conn).await;
    let m = get(&ch, &q, true).await.expect("a message");
    let mut events = ErrorEvents::new(&conn);
    let _ = ch
        .basic_ack(m.delivery.delivery_tag, BasicAckOptions { multiple: false })
        .await;
    let err = events.next_error().await;
    assert_amqp_error(
        &err,
        406,
        Some(&format!(
            "PRECONDITION_FAILED - unknown delivery tag {}",
            m.delivery.delivery_tag
        )),
    );
    assert_channel_closed_only(&conn, &ch).await;
    let check = channel(&conn).await;
    delete_quietly(&check, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn closing_a_channel_requeues_its_unacked_in_order_marked_redelivered() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled_queue(&broker, &conn, "chan-close-requeue", 6).await;
    let ch = channel(&conn).await;
    let mut consumer = consume(&ch, &q, false).await;
    for i in 0..4u8 {
        assert_eq!(next_delivery(&mut consumer).await.data, [i]);
    }
    // Messages 4 and 5 may or may not have been delivered; all six must survive.
    ack(&ch, 2, false).await; // message 1
    sync(&ch).await;
    within("close", ch.close(200, "OK".into()))
        .await
        .expect("close");
    wait_ready(&conn, &q, 5).await;
    let check = channel(&conn).await;
    let got = drain(&check, &q).await;
    let bodies: Vec<u8> = got.iter().map(|(b, _)| *b).collect();
    assert_eq!(bodies, [0, 2, 3, 4, 5], "original order, acked one gone");
    assert!(
        got[..3].iter().all(|(_, r)| *r),
        "delivered-then-requeued are redelivered: {got:?}"
    );
    delete_quietly(&check, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn closing_a_connection_requeues_its_unacked() {
    let broker = TestBroker::start().await;
    let keeper = broker.connect().await;
    let q = filled_queue(&broker, &keeper, "conn-close-requeue", 4).await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let mut consumer = consume(&ch, &q, false).await;
    for i in 0..4u8 {
        assert_eq!(next_delivery(&mut consumer).await.data, [i]);
    }
    within("connection close", conn.close(200, "OK".into()))
        .await
        .expect("close");
    wait_ready(&keeper, &q, 4).await;
    let check = channel(&keeper).await;
    assert_eq!(
        drain(&check, &q).await,
        [(0, true), (1, true), (2, true), (3, true)]
    );
    delete_quietly(&check, &q).await;
    close_conn(&keeper).await;
}

#[tokio::test]
async fn a_dropped_socket_loses_no_message() {
    let broker = TestBroker::start().await;
    let keeper = broker.connect().await;
    let pch = confirm_channel(&keeper).await;
    let q = broker.unique_name("socket-drop");
    declare(&pch, &q).await;
    let total = 300u32;
    for i in 0..total {
        let confirm = within(
            "publish",
            pch.basic_publish(
                "".into(),
                q.as_str().into(),
                Default::default(),
                &i.to_be_bytes(),
                Default::default(),
            ),
        )
        .await
        .expect("publish");
        drop(confirm);
    }
    within("confirms", pch.wait_for_confirms())
        .await
        .expect("all confirmed");

    // A consumer behind a proxy takes messages with no prefetch limit and acks the first 100.
    let proxy = warren_harness::Proxy::start(broker.url()).await;
    let victim = within(
        "connect through the proxy",
        lapin::Connection::connect(proxy.url(), lapin::ConnectionProperties::default()),
    )
    .await
    .expect("connect through the proxy");
    let vch = channel(&victim).await;
    let mut consumer = consume(&vch, &q, false).await;
    for i in 0..100u32 {
        assert_eq!(next_delivery(&mut consumer).await.data, i.to_be_bytes());
    }
    ack(&vch, 100, true).await;
    sync(&vch).await;
    // The socket dies: no channel.close, no connection.close.
    proxy.sever_all();
    wait_ready(&keeper, &q, total - 100).await;
    let check = channel(&keeper).await;
    let mut bodies = Vec::new();
    while let Some(m) = get(&check, &q, true).await {
        bodies.push(u32::from_be_bytes(
            m.delivery.data[..].try_into().expect("4-byte body"),
        ));
    }
    assert_eq!(
        bodies,
        (100..total).collect::<Vec<_>>(),
        "every unacked message back, in order"
    );
    delete_quietly(&check, &q).await;
    close_conn(&keeper).await;
    drop(victim);
}

#[tokio::test]
async fn delivery_tags_are_per_channel_and_shared_by_get_and_consume() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled_queue(&broker, &conn, "tags-per-channel", 4).await;
    let a = channel(&conn).await;
    let b = channel(&conn).await;
    let g = get(&a, &q, false).await.expect("get on a");
    assert_eq!(g.delivery.delivery_tag, 1);
    let g = get(&b, &q, false).await.expect("get on b");
    assert_eq!(g.delivery.delivery_tag, 1, "tags are per channel");
    let mut consumer = consume(&a, &q, false).await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(
        d.delivery_tag, 2,
        "get and deliver share the channel's sequence"
    );
    publish(&a, &q, b"x").await;
    ack(&a, 0, true).await;
    ack(&b, 1, false).await;
    sync(&a).await;
    sync(&b).await;
    delete_quietly(&a, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn rolled_back_acks_leave_each_delivery_unacknowledged_once() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled_queue(&broker, &conn, "tx-rollback", 6).await;
    let ch = channel(&conn).await;
    within("tx.select", ch.tx_select())
        .await
        .expect("tx.select");
    let mut consumer = consume(&ch, &q, false).await;
    let mut tags = Vec::new();
    for _ in 0..6 {
        tags.push(next_delivery(&mut consumer).await.delivery_tag);
    }
    // Acks out of order: single ones above and below a multiple one, all rolled back.
    ack(&ch, tags[4], false).await;
    ack(&ch, tags[1], false).await;
    ack(&ch, tags[3], true).await;
    within("tx.rollback", ch.tx_rollback())
        .await
        .expect("tx.rollback");
    // Still unacknowledged: an ack of one is accepted and committed.
    ack(&ch, tags[1], false).await;
    within("tx.commit", ch.tx_commit())
        .await
        .expect("tx.commit of an ack of a rolled-back delivery");
    // The other five go back when the channel closes: each once, flagged redelivered.
    within("close", ch.close(200, "OK".into()))
        .await
        .expect("close the consuming channel");
    wait_ready(&conn, &q, 5).await;
    let check = channel(&conn).await;
    let mut left = drain(&check, &q).await;
    left.sort_unstable();
    assert_eq!(
        left,
        vec![(0, true), (2, true), (3, true), (4, true), (5, true)]
    );
    delete_quietly(&check, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_requeue_after_its_queue_was_deleted_does_not_reach_a_new_queue_of_that_name() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let consumer_ch = channel(&conn).await;
    let q = broker.unique_name("ack-redeclared");
    declare(&ch, &q).await;
    for body in [b"0", b"1", b"2"] {
        publish_confirmed(&ch, &q, body).await;
    }
    let mut consumer = consume(&consumer_ch, &q, false).await;
    let mut last = 0;
    for _ in 0..3 {
        last = next_delivery(&mut consumer).await.delivery_tag;
    }
    // Deleted with the three unacked, then declared anew under its name.
    within(
        "queue.delete",
        ch.queue_delete(q.as_str().into(), Default::default()),
    )
    .await
    .expect("queue.delete");
    declare(&ch, &q).await;
    publish_confirmed(&ch, &q, b"new").await;
    within(
        "basic.nack",
        consumer_ch.basic_nack(
            last,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        ),
    )
    .await
    .expect("basic.nack");
    // RabbitMQ drops what was in flight from the deleted queue: the new one has its own.
    let first = get(&ch, &q, true).await.map(|m| m.delivery.data);
    assert_eq!(first.as_deref(), Some(&b"new"[..]));
    assert_eq!(get(&ch, &q, true).await.map(|m| m.delivery.data), None);
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}
