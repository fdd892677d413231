//! Queue expiry (`x-expires`): a queue without consumers that goes unused (no declare, passive
//! or not, no basic.get) for that long is deleted; publishing to it is no use, and its
//! consumers keep it. Its presence is probed with mandatory publishes, which do not count as
//! use (a passive declare would renew it).

use lapin::{
    options::{BasicCancelOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use std::time::{Duration, Instant};
use warren_harness::TestBroker;
use warren_tests::{
    assert_amqp_error, assert_channel_closed_only, channel, close_conn, confirm_channel, consume,
    declare_args, declare_with, expect_err, get, long_string, next_delivery, passive, routed,
    until_gone, within,
};

fn expiring(ms: i64) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    t
}

/// The expiry of the queues whose deletion time is checked, and of those renewed by use.
const EXPIRY_MS: i64 = 1500;
/// The expiry of the queue kept by a consumer (the test waits 2.5 times as long).
const CONSUMED_EXPIRY_MS: i64 = 1000;
/// How much earlier than its expiry a queue may seem to go: the broker's clock started when it
/// handled the declare, the test's when the declare-ok arrived.
const CLOCK_SLACK: Duration = Duration::from_millis(100);

fn ms(n: i64) -> Duration {
    Duration::from_millis(n.unsigned_abs())
}

#[tokio::test]
async fn an_unused_queue_is_deleted_after_its_expiry_even_while_published_to() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("expiring");
    declare_args(&ch, &q, expiring(EXPIRY_MS)).await;
    let declared = Instant::now();
    assert!(routed(&ch, &q).await, "there at first");
    until_gone(&ch, &q).await;
    assert!(
        declared.elapsed() >= ms(EXPIRY_MS) - CLOCK_SLACK,
        "deleted after {:?}, before its expiry",
        declared.elapsed()
    );
    let probe = channel(&conn).await;
    let err = expect_err(
        "a passive declare of the expired queue",
        passive(&probe, &q).await,
    );
    assert_amqp_error(&err, 404, None);
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_consumer_keeps_an_expiring_queue_and_its_leaving_starts_the_clock() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let consumer_ch = channel(&conn).await;
    let q = broker.unique_name("consumed");
    declare_args(&ch, &q, expiring(CONSUMED_EXPIRY_MS)).await;
    let mut consumer = consume(&consumer_ch, &q, true).await;
    // Two and a half times its expiry with a consumer: still there, and delivering.
    tokio::time::sleep(ms(CONSUMED_EXPIRY_MS * 5 / 2)).await;
    assert!(routed(&ch, &q).await, "a consumed queue does not expire");
    assert_eq!(next_delivery(&mut consumer).await.data, b"probe");
    within(
        "basic.cancel",
        consumer_ch.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
    )
    .await
    .expect("basic.cancel");
    let cancelled = Instant::now();
    until_gone(&ch, &q).await;
    assert!(
        cancelled.elapsed() >= ms(CONSUMED_EXPIRY_MS) - CLOCK_SLACK,
        "deleted {:?} after its consumer left: the clock did not restart",
        cancelled.elapsed()
    );
    close_conn(&conn).await;
}

#[tokio::test]
async fn passive_declares_and_gets_renew_an_expiring_queue() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let by_declare = broker.unique_name("renewed-by-declare");
    let by_get = broker.unique_name("renewed-by-get");
    declare_args(&ch, &by_declare, expiring(EXPIRY_MS)).await;
    declare_args(&ch, &by_get, expiring(EXPIRY_MS)).await;
    let other = channel(&conn).await;
    // Uses a fifth of their expiry apart, for more than twice their expiry.
    for _ in 0..12 {
        tokio::time::sleep(ms(EXPIRY_MS / 5)).await;
        passive(&other, &by_declare).await.expect("still there");
        assert!(get(&other, &by_get, true).await.is_none());
    }
    assert!(
        routed(&ch, &by_declare).await,
        "renewed by passive declares"
    );
    assert!(routed(&ch, &by_get).await, "renewed by basic.get");
    for q in [&by_declare, &by_get] {
        let _ = within(
            "queue.delete",
            other.queue_delete(q.as_str().into(), Default::default()),
        )
        .await;
    }
    close_conn(&conn).await;
}

#[tokio::test]
async fn expiry_arguments_are_checked_as_rabbitmq_checks_them() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = broker.unique_name("bad-expiry");
    let resource = format!("queue '{q}' in vhost '/'");
    let mut text = FieldTable::default();
    text.insert("x-expires".into(), long_string("a"));
    let cases = [
        (expiring(0), "{value_zero,0}"),
        (expiring(-1), "{value_negative,-1}"),
        (text, "\"expected integer, got longstr\""),
        (expiring(315_360_000_001), "{value_too_large,315360000001}"),
    ];
    for (arguments, detail) in cases {
        let ch = channel(&conn).await;
        let err = expect_err(
            "a declare with a bad x-expires",
            declare_with(&ch, &q, QueueDeclareOptions::default(), arguments).await,
        );
        let expected =
            format!("PRECONDITION_FAILED - invalid arg 'x-expires' for {resource}: {detail}");
        assert_amqp_error(&err, 406, Some(&expected));
        assert_channel_closed_only(&conn, &ch).await;
    }
    close_conn(&conn).await;
}
