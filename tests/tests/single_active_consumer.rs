//! Single active consumer (`x-single-active-consumer`): of a queue's consumers only the
//! longest-standing one gets messages; when it goes, the next one takes over.

use lapin::{
    options::{BasicCancelOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use std::time::Duration;
use warren_harness::TestBroker;
use warren_tests::{
    ack_all, assert_amqp_error, assert_channel_closed_only, assert_no_delivery, channel,
    close_channel, close_conn, confirm_channel, consume_prefetched, declare_args, declare_with,
    expect_err, get, next_bodies, next_delivery, not_redelivered, publish_confirmed, within,
};

const QUIET: Duration = Duration::from_millis(300);

fn single_active(on: AMQPValue) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), on);
    args
}

#[tokio::test]
async fn only_the_first_consumer_gets_messages_and_the_next_takes_over_when_its_channel_closes() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let admin = confirm_channel(&conn).await;
    let queue = broker.unique_name("sac");
    declare_args(&admin, &queue, single_active(AMQPValue::Boolean(true))).await;
    let (first_ch, mut first) = consume_prefetched(&conn, &queue, 2, None).await;
    // A higher consumer priority does not make a later consumer the active one.
    let (second_ch, mut second) =
        consume_prefetched(&conn, &queue, 2, Some(AMQPValue::LongInt(10))).await;
    for body in ["0", "1", "2", "3", "4", "5"] {
        publish_confirmed(&admin, &queue, body.as_bytes()).await;
    }
    assert_eq!(
        next_bodies(&mut first, 2).await,
        not_redelivered(&["0", "1"])
    );
    assert_no_delivery(&mut second, QUIET).await;
    let counted = declare_with(
        &admin,
        &queue,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare");
    assert_eq!(counted.consumer_count(), 2, "every consumer counts");
    if let Some(embedded) = broker.embedded() {
        let info = embedded.queue(&queue).expect("the queue");
        let active: Vec<bool> = info.consumers.iter().map(|c| c.active).collect();
        assert_eq!(active, [true, false]);
    }

    // The first's channel closes: its two go back, and the second gets them first.
    close_channel(&first_ch).await;
    let redelivered = vec![("0".to_owned(), true), ("1".to_owned(), true)];
    assert_eq!(next_bodies(&mut second, 2).await, redelivered);
    ack_all(&second_ch).await;
    assert_eq!(
        next_bodies(&mut second, 2).await,
        not_redelivered(&["2", "3"])
    );
    close_conn(&conn).await;
}

/// Embedded only: RabbitMQ 3.10's classic queue crashes on its next delivery after its active
/// consumer is cancelled (`{badmatch,false}` in `attempt_delivery`), and restarts empty.
#[tokio::test]
#[cfg_attr(
    warren_external,
    ignore = "RabbitMQ 3.10 crashes the queue (see ORACLE.md)"
)]
async fn a_cancelled_active_consumer_keeps_its_unacked_messages_and_the_next_takes_over() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let admin = confirm_channel(&conn).await;
    let queue = broker.unique_name("sac-cancel");
    declare_args(&admin, &queue, single_active(AMQPValue::Boolean(true))).await;
    let (first_ch, mut first) = consume_prefetched(&conn, &queue, 2, None).await;
    let (second_ch, mut second) = consume_prefetched(&conn, &queue, 2, None).await;
    for body in ["0", "1", "2", "3"] {
        publish_confirmed(&admin, &queue, body.as_bytes()).await;
    }
    assert_eq!(
        next_bodies(&mut first, 2).await,
        not_redelivered(&["0", "1"])
    );
    within(
        "basic.cancel",
        first_ch.basic_cancel(first.tag(), BasicCancelOptions::default()),
    )
    .await
    .expect("basic.cancel");
    assert_eq!(
        next_bodies(&mut second, 2).await,
        not_redelivered(&["2", "3"])
    );
    // The first's two are still its own until its channel closes.
    close_channel(&first_ch).await;
    ack_all(&second_ch).await;
    let redelivered = vec![("0".to_owned(), true), ("1".to_owned(), true)];
    assert_eq!(next_bodies(&mut second, 2).await, redelivered);
    close_conn(&conn).await;
}

#[tokio::test]
async fn when_the_active_consumer_s_connection_ends_the_next_consumer_gets_everything() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let admin = confirm_channel(&conn).await;
    let queue = broker.unique_name("sac-conn");
    declare_args(&admin, &queue, single_active(AMQPValue::Boolean(true))).await;
    let first_conn = broker.connect().await;
    let (_first_ch, mut first) = consume_prefetched(&first_conn, &queue, 10, None).await;
    let (_second_ch, mut second) = consume_prefetched(&conn, &queue, 10, None).await;
    for body in ["a", "b"] {
        publish_confirmed(&admin, &queue, body.as_bytes()).await;
    }
    assert_eq!(
        next_bodies(&mut first, 2).await,
        not_redelivered(&["a", "b"])
    );
    assert_no_delivery(&mut second, QUIET).await;
    close_conn(&first_conn).await;
    let redelivered = vec![("a".to_owned(), true), ("b".to_owned(), true)];
    assert_eq!(next_bodies(&mut second, 2).await, redelivered);
    // A consumer that comes later waits its turn.
    let (_third_ch, mut third) = consume_prefetched(&conn, &queue, 10, None).await;
    publish_confirmed(&admin, &queue, b"c").await;
    assert_eq!(next_bodies(&mut second, 1).await, not_redelivered(&["c"]));
    assert_no_delivery(&mut third, QUIET).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn x_single_active_consumer_must_be_a_boolean() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let off = broker.unique_name("sac-off");
    let ch = channel(&conn).await;
    declare_args(&ch, &off, single_active(AMQPValue::Boolean(false))).await;
    // Off: both consumers get messages.
    let (_a_ch, mut a) = consume_prefetched(&conn, &off, 1, None).await;
    let (_b_ch, mut b) = consume_prefetched(&conn, &off, 1, None).await;
    publish_confirmed(&confirm_channel(&conn).await, &off, b"1").await;
    publish_confirmed(&confirm_channel(&conn).await, &off, b"2").await;
    next_delivery(&mut a).await;
    next_delivery(&mut b).await;
    assert!(get(&ch, &off, true).await.is_none());
    for (value, type_name) in [
        (warren_tests::long_string("yes"), "longstr"),
        (AMQPValue::LongInt(1), "signedint"),
        (AMQPValue::Void, "void"),
    ] {
        let ch = channel(&conn).await;
        let name = broker.unique_name("sac-bad");
        let err = expect_err(
            "queue.declare",
            declare_with(&ch, &name, Default::default(), single_active(value)).await,
        );
        let text = format!(
            "PRECONDITION_FAILED - invalid arg 'x-single-active-consumer' for queue '{name}' in vhost '/': {{unacceptable_type,{type_name}}}"
        );
        assert_amqp_error(&err, 406, Some(&text));
        assert_channel_closed_only(&conn, &ch).await;
    }
    close_conn(&conn).await;
}
