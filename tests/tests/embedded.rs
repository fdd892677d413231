//! Embedded-only tests: behaviour that depends on Warren's own configuration (limits offered
//! in connection.tune, the max message size, the handshake timeout, the connection limit,
//! shutdown with 320). Each prints `skipped: embedded only` and passes when `AMQP_URL` is set.

use amq_protocol::{
    frame::AMQPFrame,
    protocol::{AMQPClass, connection},
};
use std::time::{Duration, Instant};
use warren_broker::{Broker, BrokerConfig};
use warren_harness::TestBroker;
use warren_tests::{
    assert_connection_works, close_conn,
    raw::{Handshake, Incoming, RawClient},
    within,
};

#[tokio::test]
#[cfg_attr(warren_external, ignore = "embedded only")]
async fn embedded_only_tune_offers_the_configured_limits() {
    let broker = TestBroker::start_embedded(BrokerConfig {
        frame_max: 8192,
        channel_max: 16,
        heartbeat: Duration::from_secs(7),
        ..BrokerConfig::default()
    })
    .await;
    let hs = Handshake::from_url(broker.url());
    let mut c = RawClient::connect(broker.url()).await;
    let tune = c.start_and_tune(&hs).await;
    assert_eq!(
        (tune.channel_max, tune.frame_max, tune.heartbeat),
        (16, 8192, 7)
    );
    // tune-ok above the offer is refused like RabbitMQ does: the socket closes, no reply.
    c.send_tune_ok_and_open(&Handshake {
        frame_max: Some(8193),
        ..hs.clone()
    })
    .await;
    assert_eq!(c.recv().await, Incoming::Closed);
    // Lowered values are accepted.
    let mut ok = RawClient::open_with(
        broker.url(),
        Handshake {
            frame_max: Some(4096),
            channel_max: Some(4),
            ..hs
        },
    )
    .await;
    ok.open_channel(4).await;
    ok.close().await;
}

#[tokio::test]
#[cfg_attr(warren_external, ignore = "embedded only")]
async fn embedded_only_message_over_max_size_is_406() {
    let broker = TestBroker::start_embedded(BrokerConfig {
        max_message_size: 1024,
        ..BrokerConfig::default()
    })
    .await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    let q = broker.unique_name("max-size");
    c.declare_queue(1, &q).await;
    c.publish(1, &q, &[1u8; 1024]).await;
    assert_eq!(c.purge(1, &q).await, 1, "exactly the max size is accepted");
    c.publish(1, &q, &[1u8; 1025]).await;
    let ids = c
        .expect_channel_close(
            1,
            406,
            Some("PRECONDITION_FAILED - message size 1025 is larger than configured max size 1024"),
        )
        .await;
    assert_eq!(ids, (60, 40));
    c.open_channel(1).await;
    assert_eq!(
        c.purge(1, &q).await,
        0,
        "the oversized message was not enqueued"
    );
    c.delete_queue(1, &q).await;
    c.close().await;
}

#[tokio::test]
#[cfg_attr(warren_external, ignore = "embedded only")]
async fn embedded_only_heartbeat_offer_of_one_second_drops_a_silent_client() {
    let broker = TestBroker::start_embedded(BrokerConfig {
        heartbeat: Duration::from_secs(1),
        ..BrokerConfig::default()
    })
    .await;
    // lapin takes the server's 1 s and keeps the connection alive with its own heartbeats.
    let conn = broker.connect().await;
    let mut raw = RawClient::open_with(
        broker.url(),
        Handshake {
            heartbeat: 1,
            ..Handshake::from_url(broker.url())
        },
    )
    .await;
    let opened = Instant::now();
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), raw.recv_any()).await {
            Ok(Incoming::Frame(AMQPFrame::Heartbeat)) => {}
            Ok(Incoming::Closed) => break opened.elapsed(),
            Ok(other) => panic!("expected heartbeats then a close, got {other:?}"),
            Err(_) => panic!("a silent client was not dropped within 10 s"),
        }
    };
    assert!(closed <= Duration::from_secs(5), "dropped after {closed:?}");
    assert!(
        conn.status().connected(),
        "the lapin connection heartbeats and stays"
    );
    assert_connection_works(&conn).await;
    close_conn(&conn).await;
}

#[tokio::test]
#[cfg_attr(warren_external, ignore = "embedded only")]
async fn embedded_only_handshake_timeout_closes_a_stalled_client() {
    let broker = TestBroker::start_embedded(BrokerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..BrokerConfig::default()
    })
    .await;
    // Nothing at all after connecting.
    let mut silent = RawClient::connect(broker.url()).await;
    let started = Instant::now();
    assert_eq!(silent.recv().await, Incoming::Closed);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Header sent, then stalled after connection.start.
    let mut stalled = RawClient::connect(broker.url()).await;
    stalled.send_bytes(warren_tests::raw::PROTOCOL_HEADER).await;
    match stalled.recv().await {
        Incoming::Frame(AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(_)),
        )) => {}
        other => panic!("expected connection.start, got {other:?}"),
    }
    assert_eq!(stalled.recv().await, Incoming::Closed);
    // A prompt client is fine.
    let ok = RawClient::open(broker.url()).await;
    ok.close().await;
}

#[tokio::test]
#[cfg_attr(warren_external, ignore = "embedded only")]
async fn embedded_only_connections_over_the_limit_are_closed_at_once() {
    let broker = TestBroker::start_embedded(BrokerConfig {
        max_connections: Some(1),
        ..BrokerConfig::default()
    })
    .await;
    let first = broker.connect().await;
    let second = within(
        "a connection over the limit",
        lapin::Connection::connect(broker.url(), lapin::ConnectionProperties::default()),
    )
    .await;
    assert!(second.is_err(), "the second connection must be refused");
    assert_connection_works(&first).await;
    close_conn(&first).await;
    // Once the first is gone, a new one is accepted.
    let third = within("connect", async {
        loop {
            match lapin::Connection::connect(broker.url(), lapin::ConnectionProperties::default())
                .await
            {
                Ok(c) => return c,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    close_conn(&third).await;
}

#[tokio::test]
#[cfg_attr(warren_external, ignore = "embedded only")]
async fn embedded_only_shutdown_closes_connections_with_320() {
    let handle = Broker::start(BrokerConfig::default())
        .await
        .expect("start an embedded broker");
    let url = handle.url();
    let conn = within(
        "connect",
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
    )
    .await
    .expect("connect");
    let mut events = warren_tests::ErrorEvents::new(&conn);
    let mut raw = RawClient::open_on_channel(&url, 1).await;
    let shutdown = tokio::spawn(handle.shutdown());
    // RabbitMQ's own text on shutdown is
    // "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'".
    let close = match raw.recv().await {
        Incoming::Frame(AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(c)),
        )) => c,
        other => panic!("expected connection.close 320, got {other:?}"),
    };
    assert_eq!(close.reply_code, 320);
    assert!(
        close
            .reply_text
            .as_str()
            .starts_with("CONNECTION_FORCED - "),
        "{:?}",
        close.reply_text
    );
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
    )
    .await;
    let err = events.next_error().await;
    warren_tests::assert_amqp_error(&err, 320, None);
    within("shutdown", shutdown).await.expect("shutdown task");
    // Nothing listens any more.
    let addr = url
        .trim_start_matches("amqp://guest:guest@")
        .trim_end_matches("/%2F")
        .to_owned();
    let refused = within(
        "connect after shutdown",
        tokio::net::TcpStream::connect(addr),
    )
    .await;
    assert!(refused.is_err(), "the listener is closed after shutdown");
}
