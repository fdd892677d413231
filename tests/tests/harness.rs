//! The harness itself, on both targets: waits, the fault-injection proxy, cleanup of unique
//! names, forced connection closes, and (embedded only) inspection.

use futures_util::StreamExt;
use lapin::options::BasicQosOptions;
use lapin::{Channel, Connection};
use std::time::Duration;
use warren_harness::{DEFAULT_TIMEOUT, Flow, TestBroker, connect_to, wait_until, within};
use warren_tests::{
    ErrorEvents, assert_amqp_error, close_conn, consume, declare, get_eventually, publish,
};

async fn consumer(conn: &Connection, queue: &str) -> (Channel, lapin::Consumer) {
    let ch = warren_tests::channel(conn).await;
    within("basic.qos", ch.basic_qos(1, BasicQosOptions::default()))
        .await
        .unwrap();
    let consumer = consume(&ch, queue, false).await;
    (ch, consumer)
}

#[tokio::test]
async fn waits_see_messages_and_consumers() {
    let broker = TestBroker::start().await;
    let queue = broker.unique_name("harness-wait");
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, &queue).await;
    for i in 0..3u8 {
        publish(&ch, &queue, &[i]).await;
    }
    broker.wait_for_messages(&queue, 3).await;
    let (_consumer_ch, _consumer) = consumer(&conn, &queue).await;
    broker.wait_for_consumers(&queue, 1).await;
    assert_eq!(broker.queue_counts("harness-no-such-queue").await, None);
}

#[tokio::test]
async fn a_severed_consumer_has_its_unacked_message_redelivered() {
    let broker = TestBroker::start().await;
    let queue = broker.unique_name("harness-sever");
    let proxy = broker.proxy().await;
    let direct = broker.connect().await;
    let ch = direct.create_channel().await.unwrap();
    declare(&ch, &queue).await;
    publish(&ch, &queue, b"work").await;

    let doomed = connect_to(proxy.url()).await;
    let (_doomed_ch, mut doomed_consumer) = consumer(&doomed, &queue).await;
    let first = within("the first delivery", doomed_consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert!(!first.redelivered);
    assert_eq!(proxy.open_connections(), 1);
    proxy.sever_all();

    let (_ch2, mut survivor) = consumer(&direct, &queue).await;
    let again = within("the redelivery", survivor.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.data, b"work");
    assert!(again.redelivered, "a redelivery is flagged redelivered");
}

#[tokio::test]
async fn a_stalled_proxy_holds_traffic_until_resumed() {
    let broker = TestBroker::start().await;
    let queue = broker.unique_name("harness-stall");
    let proxy = broker.proxy().await;
    let direct = broker.connect().await;
    declare(&direct.create_channel().await.unwrap(), &queue).await;

    let through = connect_to(proxy.url()).await;
    let ch = through.create_channel().await.unwrap();
    proxy.stall();
    // lapin's publish completes once the frames are written to the (stalled) proxy.
    publish(&ch, &queue, b"held").await;
    assert_eq!(
        broker.queue_counts(&queue).await,
        Some((0, 0)),
        "nothing got through"
    );
    proxy.resume();
    broker.wait_for_messages(&queue, 1).await;
}

#[tokio::test]
async fn a_delayed_proxy_still_delivers() {
    let broker = TestBroker::start().await;
    let queue = broker.unique_name("harness-delay");
    let proxy = broker.proxy().await;
    proxy.set_delay(Duration::from_millis(20));
    let through = connect_to(proxy.url()).await;
    let ch = through.create_channel().await.unwrap();
    declare(&ch, &queue).await;
    publish(&ch, &queue, b"late").await;
    broker.wait_for_messages(&queue, 1).await;
}

#[tokio::test]
async fn a_one_way_cut_drops_deliveries_to_the_client() {
    let broker = TestBroker::start().await;
    let queue = broker.unique_name("harness-cut");
    let proxy = broker.proxy().await;
    let direct = broker.connect().await;
    let ch = direct.create_channel().await.unwrap();
    declare(&ch, &queue).await;

    let through = connect_to(proxy.url()).await;
    let (_consumer_ch, mut cut_off) = consumer(&through, &queue).await;
    broker.wait_for_consumers(&queue, 1).await;
    proxy.cut(Flow::ToClient);
    publish(&ch, &queue, b"lost on the way").await;
    // The broker delivered it (not ready any more), the client never sees it.
    broker.wait_for_messages(&queue, 0).await;
    let seen = tokio::time::timeout(Duration::from_millis(300), cut_off.next()).await;
    assert!(
        seen.is_err(),
        "the delivery must not reach the client: {seen:?}"
    );
    proxy.sever_all();
    // Severed while unacked: the message is back for others.
    broker.wait_for_messages(&queue, 1).await;
}

#[tokio::test]
#[cfg_attr(
    not(warren_external),
    ignore = "external broker only: an embedded broker goes with its TestBroker"
)]
async fn external_only_unique_names_are_deleted_at_the_end() {
    let url = warren_harness::external_url().expect("AMQP_URL");
    let name;
    {
        let broker = TestBroker::start().await;
        name = broker.unique_name("harness-cleanup");
        let conn = broker.connect().await;
        declare(&conn.create_channel().await.unwrap(), &name).await;
        assert!(broker.queue_counts(&name).await.is_some());
    }
    let checker = TestBroker::start().await;
    assert_eq!(checker.url(), url);
    assert_eq!(
        checker.queue_counts(&name).await,
        None,
        "queue {name} was left behind"
    );
}

/// A named connection is seen open and then closed, on both targets.
#[tokio::test]
async fn named_connections_are_seen_to_open_and_close() {
    let broker = TestBroker::start().await;
    let name = broker.unique_name("service");
    assert!(!broker.has_connection(&name).await);
    let service = broker.connect_named(&name).await;
    broker.wait_for_connection(&name).await;
    assert!(broker.has_connection(&name).await);
    let other = broker.unique_name("other");
    assert!(!broker.has_connection(&other).await, "only that name");
    close_conn(&service).await;
    broker.wait_for_connection_closed(&name).await;
    assert!(!broker.has_connection(&name).await);
}

/// `TestBroker::close_connection` closes a named connection as `rabbitmqctl
/// close_connection` does, on both targets: its client gets 320 with the reason, its
/// unacknowledged message goes back to the queue flagged redelivered, and other connections
/// carry on.
#[tokio::test]
async fn close_connection_forces_a_named_connection_closed() {
    let broker = TestBroker::start().await;
    let name = broker.unique_name("service");
    let queue = broker.unique_name("harness-forced");
    let other = broker.connect().await;
    let other_ch = warren_tests::channel(&other).await;
    declare(&other_ch, &queue).await;
    publish(&other_ch, &queue, b"job").await;
    let service = broker.connect_named(&name).await;
    let mut events = ErrorEvents::new(&service);
    let (_ch, mut deliveries) = consumer(&service, &queue).await;
    let job = within("the job", deliveries.next())
        .await
        .expect("a delivery")
        .expect("a delivery");
    assert!(!job.redelivered);

    broker.close_connection(&name, "closed by the test").await;
    assert_amqp_error(
        &events.next_error().await,
        320,
        Some("CONNECTION_FORCED - closed by the test"),
    );
    let again = get_eventually(&other_ch, &queue, true).await;
    assert_eq!(again.delivery.data, b"job");
    assert!(again.delivery.redelivered, "the unacked job came back");
    close_conn(&other).await;
}

#[tokio::test]
#[cfg_attr(warren_external, ignore = "embedded only")]
async fn embedded_only_forced_close_reaches_the_client_with_its_code() {
    let broker = TestBroker::start().await;
    let handle = broker.embedded().unwrap();
    let conn = broker.connect().await;
    let id = wait_until("the connection is listed", DEFAULT_TIMEOUT, || async {
        handle
            .connections()
            .first()
            .map(|c| c.id)
            .ok_or("none yet".to_owned())
    })
    .await;
    assert!(handle.close_connection(id, 320, "closed by the test"));
    let ch = within("the next operation", conn.create_channel()).await;
    assert!(ch.is_err(), "the connection is closed");
    wait_until(
        "the broker forgets the connection",
        DEFAULT_TIMEOUT,
        || async {
            match handle.connections().len() {
                0 => Ok(()),
                n => Err(format!("{n} connections")),
            }
        },
    )
    .await;
}

#[tokio::test]
#[cfg_attr(warren_external, ignore = "embedded only")]
async fn embedded_only_a_named_connection_is_found_by_its_name() {
    let broker = TestBroker::start().await;
    let handle = broker.embedded().unwrap();
    let _anonymous = broker.connect().await;
    let worker = broker.connect_named("worker 1").await;
    let id = broker.connection_id("worker 1").await.expect("listed");
    let info = handle.connections();
    let named: Vec<_> = info.iter().map(|c| (c.id == id, c.name.clone())).collect();
    assert_eq!(named.len(), 2);
    assert!(named.contains(&(true, Some("worker 1".to_owned()))));
    assert!(
        named.contains(&(false, None)),
        "a connection without a name has none"
    );
    assert!(handle.close_connection(id, 320, "closed by the test"));
    let ch = within("the next operation", worker.create_channel()).await;
    assert!(ch.is_err(), "the named connection is closed");
}

#[tokio::test]
#[cfg_attr(warren_external, ignore = "embedded only")]
async fn embedded_only_snapshots_show_unacked_and_prefetch() {
    let broker = TestBroker::start().await;
    let handle = broker.embedded().unwrap();
    let queue = broker.unique_name("harness-inspect");
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, &queue).await;
    publish(&ch, &queue, b"a").await;
    publish(&ch, &queue, b"b").await;
    let (_cch, mut c) = consumer(&conn, &queue).await;
    within("a delivery", c.next()).await.unwrap().unwrap();
    let info = wait_until("the delivery shows as unacked", DEFAULT_TIMEOUT, || async {
        let info = handle.queue(&queue).unwrap();
        if info.unacked == 1 {
            Ok(info)
        } else {
            Err(format!("{info:?}"))
        }
    })
    .await;
    assert_eq!(info.ready, 1);
    assert_eq!(info.consumers.len(), 1);
    assert_eq!(info.consumers[0].prefetch, 1);
    assert_eq!(info.consumers[0].in_flight, 1);
    let connections = handle.connections();
    assert_eq!(connections.len(), 1);
    assert_eq!(connections[0].channels, 2);
}
