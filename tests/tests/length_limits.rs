//! Queue length limits (`x-max-length`, `x-max-length-bytes`, `x-overflow`): ready messages
//! only count; `drop-head` pushes the oldest out (dead-lettered as `maxlen`), `reject-publish`
//! refuses the new one (a nack in confirm mode), `reject-publish-dlx` also dead-letters it.

use lapin::{
    Channel, ExchangeKind,
    options::{BasicAckOptions, ExchangeDeclareOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use warren_harness::TestBroker;
use warren_tests::{
    assert_amqp_error, assert_channel_closed_only, bind_queue, channel, close_conn,
    confirm_channel, consume, declare, declare_args, declare_exchange, declare_with, drain_bodies,
    expect_err, get_eventually, long_string, next_delivery, publish_confirmed,
    publish_confirmed_to, reject, within,
};

fn limits(max_length: Option<i64>, max_bytes: Option<i64>, overflow: Option<&str>) -> FieldTable {
    let mut t = FieldTable::default();
    if let Some(n) = max_length {
        t.insert("x-max-length".into(), AMQPValue::LongLongInt(n));
    }
    if let Some(n) = max_bytes {
        t.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(n));
    }
    if let Some(o) = overflow {
        t.insert("x-overflow".into(), long_string(o));
    }
    t
}

fn dead_letter_to(mut args: FieldTable, queue: &str) -> FieldTable {
    args.insert("x-dead-letter-exchange".into(), long_string(""));
    args.insert("x-dead-letter-routing-key".into(), long_string(queue));
    args
}

/// Publishes on a confirm-mode channel; true if the broker acked, false if it nacked.
async fn publish_acked(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) -> bool {
    publish_confirmed_to(ch, exchange, routing_key, body, false)
        .await
        .is_ack()
}

fn death_reason(d: &lapin::message::Delivery) -> Option<AMQPValue> {
    d.properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-first-death-reason")
        .cloned()
}

#[tokio::test]
async fn drop_head_pushes_the_oldest_messages_out_to_the_dead_letter_exchange() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let dead = broker.unique_name("dead");
    declare(&ch, &dead).await;
    let q = broker.unique_name("max2");
    declare_args(&ch, &q, dead_letter_to(limits(Some(2), None, None), &dead)).await;
    for i in 0..4u8 {
        publish_confirmed(&ch, &q, &[i]).await;
    }
    assert_eq!(drain_bodies(&ch, &q).await, [vec![2], vec![3]]);
    for i in 0..2u8 {
        let d = get_eventually(&ch, &dead, true).await.delivery;
        assert_eq!(d.data, [i]);
        assert_eq!(death_reason(&d), Some(long_string("maxlen")));
    }
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_requeue_past_the_limit_drops_the_head() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let dead = broker.unique_name("dead");
    declare(&ch, &dead).await;
    let q = broker.unique_name("requeue");
    declare_args(&ch, &q, dead_letter_to(limits(Some(1), None, None), &dead)).await;
    publish_confirmed(&ch, &q, b"a").await;
    let a = get_eventually(&ch, &q, false).await;
    publish_confirmed(&ch, &q, b"b").await;
    // `a` goes back to the head, one over the limit: it is the one to go.
    reject(&ch, a.delivery.delivery_tag, true).await;
    let d = get_eventually(&ch, &dead, true).await.delivery;
    assert_eq!(d.data, b"a");
    assert_eq!(death_reason(&d), Some(long_string("maxlen")));
    assert_eq!(drain_bodies(&ch, &q).await, [b"b".to_vec()]);
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_byte_limit_counts_body_bytes_of_ready_messages() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("max10b");
    declare_args(&ch, &q, limits(None, Some(10), None)).await;
    for body in [b"aaaa", b"bbbb", b"cccc"] {
        publish_confirmed(&ch, &q, body).await;
    }
    assert_eq!(
        drain_bodies(&ch, &q).await,
        [b"bbbb".to_vec(), b"cccc".to_vec()]
    );
    close_conn(&conn).await;
}

#[tokio::test]
async fn reject_publish_nacks_what_does_not_fit_and_keeps_what_is_there() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("reject");
    declare_args(&ch, &q, limits(Some(1), None, Some("reject-publish"))).await;
    assert!(publish_acked(&ch, "", &q, b"first").await);
    assert!(!publish_acked(&ch, "", &q, b"second").await, "nacked");
    assert!(!publish_acked(&ch, "", &q, b"third").await, "nacked");
    assert_eq!(drain_bodies(&ch, &q).await, [b"first".to_vec()]);
    // Room again: accepted.
    assert!(publish_acked(&ch, "", &q, b"fourth").await);
    close_conn(&conn).await;
}

#[tokio::test]
async fn reject_publish_dlx_dead_letters_what_it_refuses() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let dead = broker.unique_name("dead");
    declare(&ch, &dead).await;
    let q = broker.unique_name("reject-dlx");
    let args = dead_letter_to(limits(Some(1), None, Some("reject-publish-dlx")), &dead);
    declare_args(&ch, &q, args).await;
    assert!(publish_acked(&ch, "", &q, b"kept").await);
    assert!(!publish_acked(&ch, "", &q, b"refused").await);
    let d = get_eventually(&ch, &dead, true).await.delivery;
    assert_eq!(d.data, b"refused");
    assert_eq!(death_reason(&d), Some(long_string("maxlen")));
    assert_eq!(drain_bodies(&ch, &q).await, [b"kept".to_vec()]);
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_publish_refused_by_one_of_its_queues_is_nacked_and_the_others_keep_it() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let ex = broker.unique_name("fan");
    declare_exchange(
        &ch,
        &ex,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await;
    let open = broker.unique_name("open");
    let full = broker.unique_name("full");
    declare(&ch, &open).await;
    declare_args(&ch, &full, limits(Some(0), None, Some("reject-publish"))).await;
    for q in [&open, &full] {
        bind_queue(&ch, q, &ex, "").await;
    }
    assert!(!publish_acked(&ch, &ex, "", b"m").await);
    assert_eq!(drain_bodies(&ch, &open).await, [b"m".to_vec()]);
    assert!(drain_bodies(&ch, &full).await.is_empty());
    close_conn(&conn).await;
}

#[tokio::test]
async fn unacknowledged_messages_do_not_count_and_a_waiting_consumer_takes_past_a_zero_limit() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("unacked");
    declare_args(&ch, &q, limits(Some(1), None, None)).await;
    publish_confirmed(&ch, &q, b"u1").await;
    let u1 = get_eventually(&ch, &q, false).await;
    publish_confirmed(&ch, &q, b"u2").await;
    assert_eq!(broker.queue_counts(&q).await, Some((1, 0)));
    within("basic.ack", u1.acker.ack(BasicAckOptions::default()))
        .await
        .expect("the unacked one is still there to ack");
    assert_eq!(drain_bodies(&ch, &q).await, [b"u2".to_vec()]);

    let zero = broker.unique_name("zero");
    declare_args(&ch, &zero, limits(Some(0), None, None)).await;
    publish_confirmed(&ch, &zero, b"gone").await;
    assert_eq!(broker.queue_counts(&zero).await, Some((0, 0)));
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, &zero, true).await;
    publish_confirmed(&ch, &zero, b"taken").await;
    let d = within("a delivery", next_delivery(&mut consumer)).await;
    assert_eq!(d.data, b"taken");
    close_conn(&conn).await;
}

#[tokio::test]
async fn length_limit_arguments_are_checked_as_rabbitmq_checks_them() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = broker.unique_name("bad-limit");
    let resource = format!("queue '{q}' in vhost '/'");
    let refused = |key: &str, detail: &str| {
        format!("PRECONDITION_FAILED - invalid arg '{key}' for {resource}: {detail}")
    };
    let mut overflow_int = FieldTable::default();
    overflow_int.insert("x-overflow".into(), AMQPValue::LongInt(5));
    let mut length_text = FieldTable::default();
    length_text.insert("x-max-length".into(), long_string("a"));
    let cases = [
        (
            limits(Some(-1), None, None),
            refused("x-max-length", "{value_negative,-1}"),
        ),
        (
            length_text,
            refused("x-max-length", "\"expected integer, got longstr\""),
        ),
        (
            limits(None, Some(-3), None),
            refused("x-max-length-bytes", "{value_negative,-3}"),
        ),
        (
            limits(None, None, Some("foo")),
            refused("x-overflow", "invalid_overflow"),
        ),
        (
            overflow_int,
            refused("x-overflow", "{unacceptable_type,signedint}"),
        ),
    ];
    // An existing queue's arguments are compared, not checked.
    let ch = channel(&conn).await;
    declare_args(&ch, &q, limits(Some(1), None, None)).await;
    let err = expect_err(
        "a redeclare with another limit",
        declare_with(
            &ch,
            &q,
            QueueDeclareOptions::default(),
            limits(Some(-1), None, None),
        )
        .await,
    );
    let expected = format!(
        "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for {resource}: received '-1' but current is '1'"
    );
    assert_amqp_error(&err, 406, Some(&expected));
    assert_channel_closed_only(&conn, &ch).await;
    let ch = channel(&conn).await;
    let _ = within(
        "queue.delete",
        ch.queue_delete(q.as_str().into(), Default::default()),
    )
    .await;
    for (arguments, expected) in cases {
        let ch = channel(&conn).await;
        let err = expect_err(
            "a declare with a bad length limit",
            declare_with(&ch, &q, QueueDeclareOptions::default(), arguments).await,
        );
        assert_amqp_error(&err, 406, Some(&expected));
        assert_channel_closed_only(&conn, &ch).await;
    }
    close_conn(&conn).await;
}
