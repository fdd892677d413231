//! The consumer timeout (RabbitMQ's `consumer_timeout`, set with
//! `TestBroker::start_with_consumer_timeout`: on RabbitMQ with `rabbitmqctl eval`, probed with
//! pika, see ORACLE.md): a channel whose delivery waits longer than the timeout for its ack
//! is closed with 406, its messages requeued; a channel that acks in time, or consumes
//! without acks, is left alone.
//!
//! On RabbitMQ the timeout is the node's, for every channel opened meanwhile: the tests of
//! this file take turns ([`TURNS`]), and no other file sets it.

use lapin::options::BasicAckOptions;
use std::time::Duration;
use warren_harness::TestBroker;
use warren_tests::{
    ErrorEvents, assert_amqp_error, assert_connection_works, channel, close_conn, consume,
    consume_prefetched, declare, get, next_bodies, next_delivery, publish, within,
};

const TIMEOUT: Duration = Duration::from_millis(400);

/// How long the prompt consumer works between acks: well under [`TIMEOUT`].
const WORK_TIME: Duration = Duration::from_millis(TIMEOUT.as_millis() as u64 / 3);

/// Held by each test for its whole run: on RabbitMQ the timeout is the node's.
static TURNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn a_delivery_left_unacked_past_the_timeout_closes_its_channel_and_goes_back() {
    let _turn = TURNS.lock().await;
    let broker = TestBroker::start_with_consumer_timeout(TIMEOUT).await;
    let conn = broker.connect().await;
    let admin = channel(&conn).await;
    let queue = broker.unique_name("consumer-timeout");
    declare(&admin, &queue).await;
    // A consumer without acks on the same connection is never timed out.
    let quiet_queue = broker.unique_name("consumer-timeout-no-ack");
    declare(&admin, &quiet_queue).await;
    let quiet_ch = channel(&conn).await;
    let mut quiet = consume(&quiet_ch, &quiet_queue, true).await;
    publish(&admin, &quiet_queue, b"fire and forget").await;
    next_delivery(&mut quiet).await;

    for body in ["a", "b", "c"] {
        publish(&admin, &queue, body.as_bytes()).await;
    }
    let mut events = ErrorEvents::new(&conn);
    let (slow_ch, mut slow) = consume_prefetched(&conn, &queue, 2, None).await;
    let taken = next_bodies(&mut slow, 2).await;
    assert_eq!(taken, [("a".to_owned(), false), ("b".to_owned(), false)]);
    let err = events.next_error().await;
    let text = format!(
        "PRECONDITION_FAILED - delivery acknowledgement on channel {} timed out. Timeout value used: {} ms. This timeout value can be configured, see consumers doc guide to learn more",
        slow_ch.id(),
        TIMEOUT.as_millis()
    );
    assert_amqp_error(&err, 406, Some(&text));
    // Its two come back, flagged redelivered, ahead of the third.
    broker.wait_for_messages(&queue, 3).await;
    let mut back = Vec::new();
    while let Some(m) = get(&admin, &queue, true).await {
        back.push((
            String::from_utf8_lossy(&m.delivery.data).into_owned(),
            m.delivery.redelivered,
        ));
    }
    assert_eq!(
        back,
        [
            ("a".to_owned(), true),
            ("b".to_owned(), true),
            ("c".to_owned(), false)
        ]
    );
    assert!(
        quiet_ch.status().connected(),
        "the no-ack consumer's channel stays open"
    );
    assert_connection_works(&conn).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_consumer_that_acks_in_time_keeps_its_channel_however_long_it_runs() {
    let _turn = TURNS.lock().await;
    let broker = TestBroker::start_with_consumer_timeout(TIMEOUT).await;
    let conn = broker.connect().await;
    let admin = channel(&conn).await;
    let queue = broker.unique_name("consumer-timeout-prompt");
    declare(&admin, &queue).await;
    let (ch, mut consumer) = consume_prefetched(&conn, &queue, 1, None).await;
    // Eight messages over about three timeouts, each acked as it comes: the channel's work
    // outlasts the timeout, no delivery waits for its ack as long.
    for i in 0..8 {
        publish(&admin, &queue, format!("job {i}").as_bytes()).await;
        let d = next_delivery(&mut consumer).await;
        within(
            "basic.ack",
            ch.basic_ack(d.delivery_tag, BasicAckOptions::default()),
        )
        .await
        .expect("basic.ack");
        // Time passing is the point here, not a condition to wait for.
        tokio::time::sleep(WORK_TIME).await;
    }
    assert!(ch.status().connected(), "the channel is still open");
    publish(&admin, &queue, b"last").await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"last");
    close_conn(&conn).await;
}
