//! Consumer priorities (`x-priority` on basic.consume): a queue delivers to its
//! highest-priority consumers that can take a message (prefetch not full), round robin among
//! those of one priority; lower ones get messages only while every higher one is full.

use lapin::types::AMQPValue;
use std::time::Duration;
use warren_harness::TestBroker;
use warren_tests::{
    ack_all, assert_amqp_error, assert_channel_closed_only, assert_no_delivery, channel,
    close_conn, confirm_channel, consume_prefetched, declare, expect_err, long_string, next_bodies,
    not_redelivered, passive, publish_confirmed, within,
};

const QUIET: Duration = Duration::from_millis(300);

fn priority(p: i32) -> Option<AMQPValue> {
    Some(AMQPValue::LongInt(p))
}

#[tokio::test]
async fn higher_priority_consumers_get_messages_first_and_lower_ones_only_when_they_are_full() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let admin = confirm_channel(&conn).await;
    let queue = broker.unique_name("consumer-priority");
    declare(&admin, &queue).await;
    // Subscribed lowest first, so that subscription order cannot explain the outcome.
    let (_low_ch, mut low) = consume_prefetched(&conn, &queue, 2, None).await;
    let (high_ch, mut high) = consume_prefetched(&conn, &queue, 2, priority(10)).await;
    let (_mid_ch, mut mid) = consume_prefetched(&conn, &queue, 2, priority(5)).await;
    for body in ["0", "1", "2", "3", "4", "5", "6"] {
        publish_confirmed(&admin, &queue, body.as_bytes()).await;
    }
    assert_eq!(
        next_bodies(&mut high, 2).await,
        not_redelivered(&["0", "1"])
    );
    assert_eq!(next_bodies(&mut mid, 2).await, not_redelivered(&["2", "3"]));
    assert_eq!(next_bodies(&mut low, 2).await, not_redelivered(&["4", "5"]));
    // Every prefetch is full: the last one waits in the queue...
    let waiting = within("passive declare", passive(&admin, &queue))
        .await
        .expect("passive declare");
    assert_eq!(waiting.message_count(), 1);
    if let Some(embedded) = broker.embedded() {
        let info = embedded.queue(&queue).expect("the queue");
        let priorities: Vec<i64> = info.consumers.iter().map(|c| c.priority).collect();
        assert_eq!(
            priorities,
            [10, 5, 0],
            "consumers listed highest priority first"
        );
    }
    // ...until the highest-priority consumer has room again.
    ack_all(&high_ch).await;
    assert_eq!(next_bodies(&mut high, 1).await, not_redelivered(&["6"]));
    assert_no_delivery(&mut mid, QUIET).await;
    assert_no_delivery(&mut low, QUIET).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn consumers_of_one_priority_share_round_robin_while_a_higher_one_is_full() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let admin = confirm_channel(&conn).await;
    let queue = broker.unique_name("consumer-priority-peers");
    declare(&admin, &queue).await;
    let mut peers = Vec::new();
    for _ in 0..3 {
        peers.push(consume_prefetched(&conn, &queue, 100, priority(1)).await);
    }
    // Subscribed last, served first.
    let (_top_ch, mut top) = consume_prefetched(&conn, &queue, 1, priority(10)).await;
    for body in ["0", "1", "2", "3", "4", "5", "6"] {
        publish_confirmed(&admin, &queue, body.as_bytes()).await;
    }
    assert_eq!(next_bodies(&mut top, 1).await, not_redelivered(&["0"]));
    let expected = [["1", "4"], ["2", "5"], ["3", "6"]];
    for ((_, consumer), bodies) in peers.iter_mut().zip(expected) {
        assert_eq!(next_bodies(consumer, 2).await, not_redelivered(&bodies));
    }
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_lower_priority_keeps_its_own_round_robin_while_a_higher_one_comes_and_goes() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let admin = confirm_channel(&conn).await;
    let queue = broker.unique_name("consumer-priority-rotation");
    declare(&admin, &queue).await;
    let (top_ch, mut top) = consume_prefetched(&conn, &queue, 1, priority(10)).await;
    let (_one_ch, mut one) = consume_prefetched(&conn, &queue, 100, None).await;
    let (_two_ch, mut two) = consume_prefetched(&conn, &queue, 100, None).await;
    // Each round: the top consumer takes one and is full, the next goes to a low one; the top
    // one acks. The low ones take turns all the same.
    for round in 0..4 {
        let (first, second) = (format!("{round}a"), format!("{round}b"));
        publish_confirmed(&admin, &queue, first.as_bytes()).await;
        publish_confirmed(&admin, &queue, second.as_bytes()).await;
        assert_eq!(
            next_bodies(&mut top, 1).await,
            not_redelivered(&[first.as_str()])
        );
        let receiver = if round % 2 == 0 { &mut one } else { &mut two };
        assert_eq!(
            next_bodies(receiver, 1).await,
            not_redelivered(&[second.as_str()])
        );
        ack_all(&top_ch).await;
        // RabbitMQ's channel hands the ack to the queue without a reply, and the next round's
        // publish reaches the queue from another channel: it could overtake the ack and find
        // the top consumer still full. A passive declare on the acking channel is answered by
        // the queue after it has the ack (one channel's messages to it stay in order).
        within("passive declare", passive(&top_ch, &queue))
            .await
            .expect("passive declare");
    }
    close_conn(&conn).await;
}

#[tokio::test]
async fn priorities_may_be_negative_or_of_any_integer_type() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let admin = confirm_channel(&conn).await;
    let queue = broker.unique_name("consumer-priority-types");
    declare(&admin, &queue).await;
    let (_neg_ch, mut negative) = consume_prefetched(&conn, &queue, 1, priority(-5)).await;
    let (_none_ch, mut default) = consume_prefetched(&conn, &queue, 1, None).await;
    let (_byte_ch, mut byte) =
        consume_prefetched(&conn, &queue, 1, Some(AMQPValue::ShortShortInt(3))).await;
    let (_long_ch, mut long) =
        consume_prefetched(&conn, &queue, 1, Some(AMQPValue::LongLongInt(1 << 40))).await;
    for body in ["0", "1", "2", "3"] {
        publish_confirmed(&admin, &queue, body.as_bytes()).await;
    }
    assert_eq!(next_bodies(&mut long, 1).await, not_redelivered(&["0"]));
    assert_eq!(next_bodies(&mut byte, 1).await, not_redelivered(&["1"]));
    assert_eq!(next_bodies(&mut default, 1).await, not_redelivered(&["2"]));
    assert_eq!(next_bodies(&mut negative, 1).await, not_redelivered(&["3"]));
    close_conn(&conn).await;
}

#[tokio::test]
async fn x_priority_must_be_an_integer() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let admin = channel(&conn).await;
    let queue = broker.unique_name("consumer-priority-bad");
    declare(&admin, &queue).await;
    for (value, type_name) in [
        (long_string("high"), "longstr"),
        (AMQPValue::Boolean(true), "bool"),
        (AMQPValue::Void, "void"),
    ] {
        let ch = channel(&conn).await;
        let mut args = lapin::types::FieldTable::default();
        args.insert("x-priority".into(), value);
        let err = expect_err(
            "basic.consume",
            within(
                "basic.consume",
                ch.basic_consume(queue.as_str().into(), "".into(), Default::default(), args),
            )
            .await,
        );
        let text = format!(
            "PRECONDITION_FAILED - invalid arg 'x-priority' for queue '{queue}' in vhost '/': \"expected integer, got {type_name}\""
        );
        assert_amqp_error(&err, 406, Some(&text));
        assert_channel_closed_only(&conn, &ch).await;
    }
    let counted = within("passive declare", passive(&admin, &queue))
        .await
        .expect("passive declare");
    assert_eq!(counted.consumer_count(), 0, "no refused consumer was added");
    close_conn(&conn).await;
}
