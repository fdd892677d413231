//! Priority queues (`x-max-priority`): messages leave highest `priority` first, first in first
//! out within a priority; a priority above the queue's maximum counts as the maximum. The head
//! (what `drop-head` drops and expiry looks at) is the message delivered next.

use lapin::{
    BasicProperties, Channel, Confirmation,
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable},
};
use std::time::Duration;
use warren_harness::TestBroker;
use warren_tests::{
    assert_amqp_error, assert_channel_closed_only, channel, close_conn, confirm_channel, consume,
    declare_args, declare_with, expect_err, get, get_eventually, long_string, next_delivery,
    publish_confirmed_with, reject,
};

/// Declaration arguments: `x-max-priority` and others.
fn args(max_priority: i32, more: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-max-priority".into(), AMQPValue::LongInt(max_priority));
    for (k, v) in more {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// Publishes `body` with `priority` (none if `None`), confirmed.
async fn publish(ch: &Channel, queue: &str, body: &str, priority: Option<u8>) -> Confirmation {
    let mut props = BasicProperties::default();
    if let Some(p) = priority {
        props = props.with_priority(p);
    }
    publish_confirmed_with(ch, "", queue, body.as_bytes(), false, props).await
}

/// Gets every ready message: body, priority property and redelivered flag.
async fn drain(ch: &Channel, queue: &str) -> Vec<(String, Option<u8>, bool)> {
    let mut out = Vec::new();
    while let Some(m) = get(ch, queue, true).await {
        let d = m.delivery;
        out.push((
            String::from_utf8_lossy(&d.data).into_owned(),
            *d.properties.priority(),
            d.redelivered,
        ));
    }
    out
}

fn bodies(drained: &[(String, Option<u8>, bool)]) -> Vec<&str> {
    drained.iter().map(|(b, _, _)| b.as_str()).collect()
}

async fn ready_count(ch: &Channel, queue: &str) -> u32 {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    declare_with(ch, queue, options, FieldTable::default())
        .await
        .expect("passive declare")
        .message_count()
}

#[tokio::test]
async fn messages_leave_highest_priority_first_and_in_order_within_a_priority() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let queue = broker.unique_name("prio");
    declare_args(&ch, &queue, args(10, &[])).await;
    for (body, priority) in [
        ("none", None),
        ("p1", Some(1)),
        ("p5a", Some(5)),
        ("p10", Some(10)),
        ("p20", Some(20)),
        ("p5b", Some(5)),
        ("p0", Some(0)),
        ("p255", Some(255)),
    ] {
        publish(&ch, &queue, body, priority).await;
    }
    assert_eq!(ready_count(&ch, &queue).await, 8);
    let drained = drain(&ch, &queue).await;
    // Above the maximum counts as the maximum; no priority is 0.
    assert_eq!(
        bodies(&drained),
        ["p10", "p20", "p255", "p5a", "p5b", "p1", "none", "p0"]
    );
    assert_eq!(
        drained[1].1,
        Some(20),
        "the priority property is kept as sent"
    );

    // A consumer gets them in the same order.
    for (body, priority) in [("low", 1), ("mid", 4), ("high", 9)] {
        publish(&ch, &queue, body, Some(priority)).await;
    }
    let mut consumer = consume(&ch, &queue, true).await;
    for expected in ["high", "mid", "low"] {
        assert_eq!(next_delivery(&mut consumer).await.data, expected.as_bytes());
    }
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_requeued_message_goes_back_to_its_place_within_its_priority() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let queue = broker.unique_name("prio-requeue");
    declare_args(&ch, &queue, args(10, &[])).await;
    for (body, priority) in [("a1", 1), ("b5", 5), ("c5", 5), ("d9", 9)] {
        publish(&ch, &queue, body, Some(priority)).await;
    }
    let first = get_eventually(&ch, &queue, false).await.delivery;
    let second = get_eventually(&ch, &queue, false).await.delivery;
    assert_eq!(
        (&first.data[..], &second.data[..]),
        (&b"d9"[..], &b"b5"[..])
    );
    reject(&ch, second.delivery_tag, true).await;
    reject(&ch, first.delivery_tag, true).await;
    let drained = drain(&ch, &queue).await;
    assert_eq!(bodies(&drained), ["d9", "b5", "c5", "a1"]);
    let redelivered: Vec<bool> = drained.iter().map(|(_, _, r)| *r).collect();
    assert_eq!(redelivered, [true, true, false, false]);

    // Taken before a higher and a same-priority message came: back between them.
    publish(&ch, &queue, "x3", Some(3)).await;
    let taken = get_eventually(&ch, &queue, false).await.delivery;
    publish(&ch, &queue, "y7", Some(7)).await;
    publish(&ch, &queue, "z3", Some(3)).await;
    reject(&ch, taken.delivery_tag, true).await;
    assert_eq!(bodies(&drain(&ch, &queue).await), ["y7", "x3", "z3"]);
    close_conn(&conn).await;
}

#[tokio::test]
async fn length_limits_drop_the_head_which_is_the_highest_priority_message() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let drop_head = broker.unique_name("prio-drop-head");
    let max3 = [("x-max-length", AMQPValue::LongInt(3))];
    declare_args(&ch, &drop_head, args(10, &max3)).await;
    for (body, priority) in [("l1a", 1), ("l9", 9), ("l1b", 1), ("l5", 5), ("l0", 0)] {
        publish(&ch, &drop_head, body, Some(priority)).await;
    }
    assert_eq!(
        bodies(&drain(&ch, &drop_head).await),
        ["l1a", "l1b", "l0"],
        "l9 then l5 were the head when the queue overflowed"
    );

    let reject_publish = broker.unique_name("prio-reject-publish");
    let max2 = [
        ("x-max-length", AMQPValue::LongInt(2)),
        ("x-overflow", long_string("reject-publish")),
    ];
    declare_args(&ch, &reject_publish, args(10, &max2)).await;
    assert!(publish(&ch, &reject_publish, "r1", Some(1)).await.is_ack());
    assert!(publish(&ch, &reject_publish, "r2", Some(2)).await.is_ack());
    assert!(
        publish(&ch, &reject_publish, "r9", Some(9)).await.is_nack(),
        "a full queue refuses a higher priority too"
    );
    assert_eq!(bodies(&drain(&ch, &reject_publish).await), ["r2", "r1"]);
    close_conn(&conn).await;
}

#[tokio::test]
async fn an_expired_message_is_dropped_once_it_is_the_head() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let queue = broker.unique_name("prio-ttl");
    declare_args(&ch, &queue, args(10, &[])).await;
    let expiring = |priority: u8| {
        BasicProperties::default()
            .with_priority(priority)
            .with_expiration("100".into())
    };
    // Published first, but behind t9.
    publish_confirmed_with(&ch, "", &queue, b"t1-expiring", false, expiring(1)).await;
    publish(&ch, &queue, "t9", Some(9)).await;
    publish(&ch, &queue, "t1", Some(1)).await;
    // The TTL under test runs out.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Behind t9, the expired message still counts; it goes when it would be next.
    assert_eq!(ready_count(&ch, &queue).await, 3);
    assert_eq!(bodies(&drain(&ch, &queue).await), ["t9", "t1"]);

    publish_confirmed_with(&ch, "", &queue, b"h9-expiring", false, expiring(9)).await;
    publish(&ch, &queue, "h1", Some(1)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // At the head, it is dropped as soon as the queue is counted.
    assert_eq!(ready_count(&ch, &queue).await, 1);
    assert_eq!(bodies(&drain(&ch, &queue).await), ["h1"]);
    close_conn(&conn).await;
}

#[tokio::test]
async fn x_max_priority_must_be_an_integer_from_0_to_255() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    for ok in [0, 255] {
        let ch = channel(&conn).await;
        declare_args(&ch, &broker.unique_name("prio-ok"), args(ok, &[])).await;
    }
    let ch = channel(&conn).await;
    let queue = broker.unique_name("prio-arg");
    declare_args(&ch, &queue, args(10, &[])).await;
    for (value, detail) in [
        (
            long_string("yes"),
            "\"expected integer, got longstr\"".to_owned(),
        ),
        (
            AMQPValue::Boolean(true),
            "\"expected integer, got bool\"".to_owned(),
        ),
        (AMQPValue::LongInt(-1), "{value_negative,-1}".to_owned()),
        (
            AMQPValue::LongInt(256),
            "{max_value_exceeded,256}".to_owned(),
        ),
    ] {
        let ch = channel(&conn).await;
        let name = broker.unique_name("prio-bad");
        let mut bad = FieldTable::default();
        bad.insert("x-max-priority".into(), value);
        let err = expect_err(
            "queue.declare",
            declare_with(&ch, &name, Default::default(), bad).await,
        );
        let text = format!(
            "PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue '{name}' in vhost '/': {detail}"
        );
        assert_amqp_error(&err, 406, Some(&text));
        assert_channel_closed_only(&conn, &ch).await;
    }
    let ch = channel(&conn).await;
    let err = expect_err(
        "queue.declare",
        declare_with(&ch, &queue, Default::default(), args(5, &[])).await,
    );
    let text = format!(
        "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue '{queue}' in vhost '/': received '5' but current is '10'"
    );
    assert_amqp_error(&err, 406, Some(&text));
    close_conn(&conn).await;
}
