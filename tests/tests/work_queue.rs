//! Work queues: basic.qos per consumer (global=false) and per channel (global=true), dispatch
//! only to consumers with prefetch credit, and redelivery when a worker dies.

use lapin::{
    Channel, Connection,
    options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use std::time::Duration;
use warren_harness::TestBroker;
use warren_tests::{
    assert_no_delivery, channel, close_conn, confirm_channel, consume, declare, delete_quietly,
    next_delivery, passive, publish_confirmed, within,
};

/// A queue holding `n` one-byte messages 0..n (published with confirms, so they are there).
async fn filled(broker: &TestBroker, conn: &Connection, prefix: &str, n: u8) -> String {
    let ch = confirm_channel(conn).await;
    let q = broker.unique_name(prefix);
    declare(&ch, &q).await;
    for i in 0..n {
        publish_confirmed(&ch, &q, &[i]).await;
    }
    let _ = ch.close(200, "OK".into()).await;
    q
}

async fn qos(ch: &Channel, count: u16, global: bool) {
    within("basic.qos", ch.basic_qos(count, BasicQosOptions { global }))
        .await
        .expect("basic.qos");
}

async fn ready(ch: &Channel, q: &str) -> u32 {
    passive(ch, q).await.expect("passive").message_count()
}

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn prefetch_count_limits_unacked_deliveries_per_consumer() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled(&broker, &conn, "prefetch", 5).await;
    let ch = channel(&conn).await;
    qos(&ch, 2, false).await;
    let mut consumer = consume(&ch, &q, false).await;
    let d0 = next_delivery(&mut consumer).await;
    let d1 = next_delivery(&mut consumer).await;
    assert_eq!((d0.data[0], d1.data[0]), (0, 1));
    assert_no_delivery(&mut consumer, QUIET).await;
    let counter = channel(&conn).await;
    assert_eq!(ready(&counter, &q).await, 3);
    // One ack, one more delivery.
    within("ack", d0.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    let d2 = next_delivery(&mut consumer).await;
    assert_eq!(d2.data, [2]);
    assert_no_delivery(&mut consumer, QUIET).await;
    // A multiple ack frees two slots.
    within("ack", d2.acker.ack(BasicAckOptions { multiple: true }))
        .await
        .expect("ack multiple");
    assert_eq!(next_delivery(&mut consumer).await.data, [3]);
    assert_eq!(next_delivery(&mut consumer).await.data, [4]);
    delete_quietly(&counter, &q).await;
    close_conn(&conn).await;
}

/// RabbitMQ counts a consumer's prefetch window by channel and consumer tag: acks for the
/// deliveries of a cancelled consumer free the window of a later consumer that reuses its tag
/// on the same channel.
#[tokio::test]
async fn acks_for_a_cancelled_consumer_credit_a_new_consumer_with_its_tag() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled(&broker, &conn, "qos-reused-tag", 7).await;
    let ch = channel(&conn).await;
    qos(&ch, 2, false).await;
    let consume_as_t = || {
        within(
            "basic.consume",
            ch.basic_consume(
                q.as_str().into(),
                "t".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
    };
    let mut first = consume_as_t().await.expect("basic.consume");
    assert_eq!(next_delivery(&mut first).await.data, [0]);
    let d1 = next_delivery(&mut first).await;
    assert_eq!(d1.data, [1]);
    within(
        "basic.cancel",
        ch.basic_cancel("t".into(), BasicCancelOptions::default()),
    )
    .await
    .expect("basic.cancel");
    // A new consumer under the same tag starts with an empty window: two deliveries.
    let mut second = consume_as_t().await.expect("basic.consume again");
    assert_eq!(next_delivery(&mut second).await.data, [2]);
    assert_eq!(next_delivery(&mut second).await.data, [3]);
    assert_no_delivery(&mut second, QUIET).await;
    // Acking the first consumer's two deliveries frees two places in the second's window.
    within(
        "ack",
        ch.basic_ack(d1.delivery_tag, BasicAckOptions { multiple: true }),
    )
    .await
    .expect("ack the first consumer's deliveries");
    assert_eq!(next_delivery(&mut second).await.data, [4]);
    assert_eq!(next_delivery(&mut second).await.data, [5]);
    assert_no_delivery(&mut second, QUIET).await;
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn per_consumer_qos_applies_to_consumers_created_after_it() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let early_q = filled(&broker, &conn, "qos-early", 4).await;
    let late_q = filled(&broker, &conn, "qos-late", 4).await;
    let ch = channel(&conn).await;
    let mut early = consume(&ch, &early_q, false).await;
    qos(&ch, 1, false).await;
    let mut late = consume(&ch, &late_q, false).await;
    // The consumer created before basic.qos is unlimited ...
    for i in 0..4u8 {
        assert_eq!(next_delivery(&mut early).await.data, [i]);
    }
    // ... the one created after it gets one at a time.
    assert_eq!(next_delivery(&mut late).await.data, [0]);
    assert_no_delivery(&mut late, QUIET).await;
    let counter = channel(&conn).await;
    assert_eq!(ready(&counter, &late_q).await, 3);
    delete_quietly(&counter, &early_q).await;
    delete_quietly(&counter, &late_q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn global_qos_limits_the_whole_channel() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q1 = filled(&broker, &conn, "global-qos-1", 5).await;
    let q2 = filled(&broker, &conn, "global-qos-2", 5).await;
    let ch = channel(&conn).await;
    qos(&ch, 3, true).await;
    let mut c1 = consume(&ch, &q1, false).await;
    let mut c2 = consume(&ch, &q2, false).await;
    // Three unacked deliveries in total, across both consumers.
    let mut held = Vec::new();
    while held.len() < 3 {
        tokio::select! {
            d = next_delivery(&mut c1) => held.push(d),
            d = next_delivery(&mut c2) => held.push(d),
        }
    }
    assert_no_delivery(&mut c1, QUIET).await;
    assert_no_delivery(&mut c2, Duration::from_millis(50)).await;
    let counter = channel(&conn).await;
    assert_eq!(
        ready(&counter, &q1).await + ready(&counter, &q2).await,
        7,
        "the channel holds exactly 3 of the 10 messages"
    );
    // Acking one lets exactly one more through.
    within("ack", held[0].acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    let more = tokio::select! {
        d = next_delivery(&mut c1) => d,
        d = next_delivery(&mut c2) => d,
    };
    held.push(more);
    assert_no_delivery(&mut c1, QUIET).await;
    assert_no_delivery(&mut c2, Duration::from_millis(50)).await;
    assert_eq!(ready(&counter, &q1).await + ready(&counter, &q2).await, 6);
    delete_quietly(&counter, &q1).await;
    delete_quietly(&counter, &q2).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn per_consumer_and_per_channel_limits_combine() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled(&broker, &conn, "qos-both", 10).await;
    let ch = channel(&conn).await;
    qos(&ch, 3, true).await; // channel: 3
    qos(&ch, 1, false).await; // each new consumer: 1
    let mut a = consume(&ch, &q, false).await;
    let mut b = consume(&ch, &q, false).await;
    let da = next_delivery(&mut a).await;
    let db = next_delivery(&mut b).await;
    assert_ne!(da.data, db.data);
    assert_no_delivery(&mut a, QUIET).await;
    assert_no_delivery(&mut b, Duration::from_millis(50)).await;
    let counter = channel(&conn).await;
    assert_eq!(
        ready(&counter, &q).await,
        8,
        "one per consumer, under the channel's 3"
    );
    delete_quietly(&counter, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn deliveries_go_only_to_consumers_with_credit() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled(&broker, &conn, "credit", 10).await;
    let slow_ch = channel(&conn).await;
    let fast_ch = channel(&conn).await;
    qos(&slow_ch, 1, false).await;
    qos(&fast_ch, 1, false).await;
    let mut slow = consume(&slow_ch, &q, false).await;
    let held = next_delivery(&mut slow).await;
    let mut fast = consume(&fast_ch, &q, false).await;
    // The slow worker sits on its message; the fast one does all the rest.
    let mut done = Vec::new();
    for _ in 0..9 {
        let d = next_delivery(&mut fast).await;
        done.push(d.data[0]);
        within("ack", d.acker.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    let mut all = done.clone();
    all.push(held.data[0]);
    all.sort_unstable();
    assert_eq!(all, (0..10).collect::<Vec<u8>>(), "each message once");
    assert!(!done.contains(&held.data[0]));
    assert_no_delivery(&mut slow, Duration::from_millis(50)).await;
    within("ack", held.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    let counter = channel(&conn).await;
    delete_quietly(&counter, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_dead_workers_message_is_redelivered_to_another_worker() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled(&broker, &conn, "dead-worker", 5).await;

    // Worker A connects through a proxy so that its socket can be cut.
    let proxy = warren_harness::Proxy::start(broker.url()).await;
    let a_conn = within(
        "connect through the proxy",
        lapin::Connection::connect(proxy.url(), lapin::ConnectionProperties::default()),
    )
    .await
    .expect("connect through the proxy");
    let a_ch = channel(&a_conn).await;
    qos(&a_ch, 1, false).await;
    let mut a = consume(&a_ch, &q, false).await;
    let taken = next_delivery(&mut a).await;
    assert_eq!(taken.data, [0]);
    assert!(!taken.redelivered);

    // Worker B (prefetch 1) does the rest.
    let b_ch = channel(&conn).await;
    qos(&b_ch, 1, false).await;
    let mut b = consume(&b_ch, &q, false).await;
    for i in 1..5u8 {
        let d = next_delivery(&mut b).await;
        assert_eq!(d.data, [i]);
        assert!(!d.redelivered);
        within("ack", d.acker.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    // A dies holding message 0: B gets it, marked redelivered.
    proxy.sever_all();
    let d = next_delivery(&mut b).await;
    assert_eq!(d.data, [0]);
    assert!(d.redelivered, "a requeued message is marked redelivered");
    within("ack", d.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    let counter = channel(&conn).await;
    assert_eq!(ready(&counter, &q).await, 0);
    delete_quietly(&counter, &q).await;
    close_conn(&conn).await;
    drop(a_conn);
}

#[tokio::test]
async fn a_cleanly_closed_workers_unacked_go_to_the_next_worker() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = filled(&broker, &conn, "closed-worker", 3).await;
    let a_conn = broker.connect().await;
    let a_ch = channel(&a_conn).await;
    qos(&a_ch, 2, false).await;
    let mut a = consume(&a_ch, &q, false).await;
    assert_eq!(next_delivery(&mut a).await.data, [0]);
    assert_eq!(next_delivery(&mut a).await.data, [1]);
    let b_ch = channel(&conn).await;
    let mut b = consume(&b_ch, &q, false).await;
    assert_eq!(next_delivery(&mut b).await.data, [2]);
    within("close A", a_conn.close(200, "OK".into()))
        .await
        .expect("close worker A");
    let r0 = next_delivery(&mut b).await;
    let r1 = next_delivery(&mut b).await;
    assert_eq!(
        (r0.data[0], r1.data[0]),
        (0, 1),
        "requeued in original order"
    );
    assert!(r0.redelivered && r1.redelivered);
    let counter = channel(&conn).await;
    delete_quietly(&counter, &q).await;
    close_conn(&conn).await;
}
