//! Limits under abuse: a stalled consumer socket keeps the broker's memory bounded (deliveries
//! wait in the queue, not in buffers) and does not stall other connections.

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use warren_harness::{DEFAULT_TIMEOUT, TestBroker, connect_to, wait_until, within};
use warren_tests::{
    channel, close_conn, confirm_channel, consume, declare_with, next_delivery, publish,
    publish_with,
};

const MESSAGES: usize = 20_000;
const BODY: usize = 1024;

#[tokio::test]
#[cfg_attr(
    warren_external,
    ignore = "embedded only: reads the broker's queue snapshot"
)]
async fn embedded_only_a_stalled_no_ack_consumer_leaves_deliveries_in_the_queue() {
    let broker = TestBroker::start().await;
    let handle = broker.embedded().expect("embedded");
    let queue = broker.unique_name("stalled-reader");
    let proxy = broker.proxy().await;

    let publisher = broker.connect().await;
    let ch = publisher.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let reader = connect_to(proxy.url()).await;
    let reader_ch = reader.create_channel().await.unwrap();
    let mut deliveries = reader_ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    broker.wait_for_consumers(&queue, 1).await;
    proxy.stall();

    let body = vec![7u8; BODY];
    for _ in 0..MESSAGES {
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    within("the confirms", ch.wait_for_confirms())
        .await
        .unwrap();

    // Bounded in flight: the mailbox (2 MiB), the connection's output buffer (256 KiB) and the
    // sockets' buffers hold a few thousand 1 KiB deliveries at most; the rest stay queued.
    let info = handle.queue(&queue).unwrap();
    println!(
        "{} of {MESSAGES} messages left the queue for a stalled reader",
        MESSAGES - info.ready
    );
    assert!(
        info.ready >= MESSAGES - 8_000,
        "{} of {MESSAGES} messages left the queue for a stalled reader",
        MESSAGES - info.ready
    );

    // Another connection is not held up by the stalled one.
    let other = broker.connect().await;
    let other_ch = other.create_channel().await.unwrap();
    let side = broker.unique_name("side");
    other_ch
        .queue_declare(
            side.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    other_ch
        .basic_publish(
            "".into(),
            side.as_str().into(),
            Default::default(),
            b"hi",
            Default::default(),
        )
        .await
        .unwrap();
    let got = wait_until(
        "the side message can be fetched",
        DEFAULT_TIMEOUT,
        || async {
            match other_ch
                .basic_get(side.as_str().into(), BasicGetOptions { no_ack: true })
                .await
            {
                Ok(Some(m)) => Ok(m.delivery.data.clone()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(got, b"hi");

    // Once the reader reads again, everything arrives.
    proxy.resume();
    let mut received = 0;
    while received < MESSAGES {
        let delivery = within("the next delivery after resuming", deliveries.next())
            .await
            .expect("consumer ended")
            .expect("delivery");
        assert_eq!(delivery.data.len(), BODY);
        received += 1;
    }
    assert_eq!(handle.queue(&queue).unwrap().ready, 0);
}

/// One connection consuming many queues whose ready messages far outnumber what its mailbox
/// holds (2 MiB; here 6,000 messages of 1 KiB): dispatch stops at the full mailbox and
/// resumes, queue after queue, as the connection drains it. Every message of every queue must
/// arrive.
#[tokio::test]
async fn a_connection_consuming_many_backlogged_queues_receives_every_message() {
    const QUEUES: usize = 30;
    const PER_QUEUE: usize = 200;
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let publisher = confirm_channel(&conn).await;
    let mut queues = Vec::new();
    for i in 0..QUEUES {
        let queue = broker.unique_name(&format!("backlog-{i}"));
        declare_exclusive(&publisher, &queue).await;
        for n in 0..PER_QUEUE {
            let body = format!("{i}:{n}:{}", ".".repeat(BODY));
            publish(&publisher, &queue, body.as_bytes()).await;
        }
        queues.push(queue);
    }
    within("the confirms", publisher.wait_for_confirms())
        .await
        .unwrap();

    // All the consumes at once (lapin pipelines them), so the broker handles them in one go
    // and the mailbox is full long before the last queue gets its turn.
    let consuming = channel(&conn).await;
    let consumes = queues.iter().map(|queue| consume(&consuming, queue, true));
    let mut all = futures_util::stream::select_all(futures_util::future::join_all(consumes).await);
    let mut next_of_queue = vec![0usize; QUEUES];
    for _ in 0..QUEUES * PER_QUEUE {
        let delivery = within("the next delivery", all.next())
            .await
            .expect("a consumer ended")
            .expect("delivery");
        let text = String::from_utf8(delivery.data.clone()).unwrap();
        let mut fields = text.split(':');
        let (queue, n) = (fields.next().unwrap(), fields.next().unwrap());
        let (queue, n): (usize, usize) = (queue.parse().unwrap(), n.parse().unwrap());
        assert_eq!(
            n, next_of_queue[queue],
            "queue {queue} delivered out of order"
        );
        next_of_queue[queue] += 1;
    }
    assert!(next_of_queue.iter().all(|&n| n == PER_QUEUE));
    close_conn(&conn).await;
}

/// Expired messages do not pile up behind a blocked consumer (prefetch 1, never acks): the
/// next publish with a TTL drops those at the head of the queue.
#[tokio::test]
#[cfg_attr(
    warren_external,
    ignore = "embedded only: reads the broker's queue snapshot"
)]
async fn embedded_only_expired_messages_do_not_pile_up_behind_a_blocked_consumer() {
    /// Messages published with [`SHORT_TTL`] while the consumer is blocked.
    const EXPIRING: usize = 100;
    /// Their TTL, in milliseconds (an `expiration` property).
    const SHORT_TTL: &str = "1";
    /// The TTL of the last message, which must outlive the test.
    const LONG_TTL: &str = "60000";
    /// How long the test lets [`SHORT_TTL`] run out.
    const TTL_RUNS_OUT: std::time::Duration = std::time::Duration::from_millis(50);
    let broker = TestBroker::start().await;
    let handle = broker.embedded().expect("embedded");
    let queue = broker.unique_name("blocked-ttl");
    let conn = broker.connect().await;
    let publisher = confirm_channel(&conn).await;
    declare_exclusive(&publisher, &queue).await;
    let consuming = channel(&conn).await;
    consuming
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut deliveries = consume(&consuming, &queue, false).await;
    let expiring = |ttl: &str| BasicProperties::default().with_expiration(ttl.into());
    publish(&publisher, &queue, b"m").await;
    next_delivery(&mut deliveries).await;
    // The consumer now holds its one unacked delivery: nothing more can go to it.
    for _ in 0..EXPIRING {
        publish_with(&publisher, &queue, b"m", expiring(SHORT_TTL)).await;
    }
    within("the confirms", publisher.wait_for_confirms())
        .await
        .unwrap();
    // Let the TTL run out (the point of the test, not a stand-in for a condition).
    tokio::time::sleep(TTL_RUNS_OUT).await;
    publish_with(&publisher, &queue, b"m", expiring(LONG_TTL)).await;
    within("the confirms", publisher.wait_for_confirms())
        .await
        .unwrap();
    assert_eq!(
        handle.queue(&queue).unwrap().ready,
        1,
        "only the message published last is left"
    );
    close_conn(&conn).await;
}

/// Declares an exclusive queue (gone with the test's connection, on both targets).
async fn declare_exclusive(ch: &lapin::Channel, queue: &str) {
    let options = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    declare_with(ch, queue, options, FieldTable::default())
        .await
        .unwrap_or_else(|e| panic!("queue.declare {queue}: {e}"));
}
