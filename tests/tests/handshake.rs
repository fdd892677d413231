//! Handshake: protocol header, connection.start, credentials, tune negotiation, vhost,
//! heartbeats, and the close handshakes — mostly through the raw client, since lapin hides them.

use amq_protocol::{
    auth::SASLMechanism,
    frame::AMQPFrame,
    protocol::{AMQPClass, channel, connection},
    types::{AMQPValue, FieldTable},
};
use std::time::{Duration, Instant};
use warren_harness::TestBroker;
use warren_tests::{
    PLAIN_LOGIN_REFUSED, assert_amqp_error, close_conn,
    raw::{Handshake, Incoming, RawClient},
    refused_connection, within,
};

#[tokio::test]
async fn bad_protocol_headers_get_the_091_header_back_and_the_socket_closed() {
    let broker = TestBroker::start().await;
    let headers: [&[u8]; 5] = [
        b"AMQP\x00\x00\x09\x00",
        b"AMQP\x00\x00\x08\x00",
        b"AMQP\x01\x01\x00\x0a",
        b"HTTP/1.1",
        b"XXXXXXXX",
    ];
    for header in headers {
        let mut c = RawClient::connect(broker.url()).await;
        c.send_bytes(header).await;
        let got = c.read_until_closed().await;
        assert_eq!(
            got, b"AMQP\x00\x00\x09\x01",
            "reply to bad header {header:?}"
        );
    }
}

#[tokio::test]
async fn connection_start_offers_plain_amqplain_en_us_and_capabilities() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::connect(broker.url()).await;
    c.send_bytes(warren_tests::raw::PROTOCOL_HEADER).await;
    let start = match c.recv_frame().await {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(s))) => s,
        other => panic!("expected connection.start on channel 0, got {other:?}"),
    };
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    let mechanisms = String::from_utf8(start.mechanisms.as_bytes().to_vec()).expect("utf8");
    let mut mechs: Vec<&str> = mechanisms.split(' ').collect();
    mechs.sort_unstable();
    assert_eq!(mechs, ["AMQPLAIN", "PLAIN"], "mechanisms {mechanisms:?}");
    assert_eq!(start.locales.as_bytes(), b"en_US");
    let props = start.server_properties.inner();
    for key in ["product", "version"] {
        assert!(
            matches!(props.get(key), Some(AMQPValue::LongString(s)) if !s.as_bytes().is_empty()),
            "server property {key} must be a non-empty string: {props:?}"
        );
    }
    let caps = match props.get("capabilities") {
        Some(AMQPValue::FieldTable(t)) => t.inner().clone(),
        other => panic!("capabilities must be a table, got {other:?}"),
    };
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "authentication_failure_close",
        "per_consumer_qos",
    ] {
        assert_eq!(
            caps.get(cap),
            Some(&AMQPValue::Boolean(true)),
            "capability {cap} must be advertised: {caps:?}"
        );
    }
}

#[tokio::test]
async fn tune_offers_rabbitmq_defaults_and_echoed_values_open() {
    let broker = TestBroker::start().await;
    let hs = Handshake::from_url(broker.url());
    let mut c = RawClient::connect(broker.url()).await;
    let tune = c.start_and_tune(&hs).await;
    assert_eq!(
        (tune.channel_max, tune.frame_max, tune.heartbeat),
        (2047, 131_072, 60)
    );
    c.send_tune_ok_and_open(&hs).await;
    match c.recv_frame().await {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
        other => panic!("expected open-ok, got {other:?}"),
    }
    c.open_channel(1).await;
    c.close().await;
}

#[tokio::test]
async fn amqplain_login_works() {
    let broker = TestBroker::start().await;
    let hs = Handshake {
        mechanism: SASLMechanism::AMQPlain,
        ..Handshake::from_url(broker.url())
    };
    let mut c = RawClient::open_with(broker.url(), hs).await;
    c.open_channel(1).await;
    c.close().await;
}

#[tokio::test]
async fn bad_credentials_with_authentication_failure_close_get_403() {
    let broker = TestBroker::start().await;
    for (user, password) in [("guest", "wrong-password"), ("no-such-user", "guest")] {
        let hs = Handshake {
            user: user.into(),
            password: password.into(),
            ..Handshake::from_url(broker.url())
        };
        let mut c = RawClient::connect(broker.url()).await;
        match c.start_ok(&hs).await {
            Incoming::Frame(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(close)),
            )) => {
                assert_eq!(close.reply_code, 403);
                assert_eq!(close.reply_text.as_str(), PLAIN_LOGIN_REFUSED);
                assert_eq!((close.class_id, close.method_id), (0, 0));
            }
            other => panic!("expected connection.close 403 for {user}, got {other:?}"),
        }
        c.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        )
        .await;
        c.expect_closed().await;
    }
}

#[tokio::test]
async fn bad_credentials_without_the_capability_just_close_the_socket() {
    // RabbitMQ closes silently (after a 3 s anti-brute-force delay) when the client did not
    // advertise authentication_failure_close.
    let broker = TestBroker::start().await;
    let hs = Handshake {
        password: "wrong-password".into(),
        capabilities: FieldTable::default(),
        ..Handshake::from_url(broker.url())
    };
    let mut c = RawClient::connect(broker.url()).await;
    assert_eq!(c.start_ok(&hs).await, Incoming::Closed);
}

#[tokio::test]
async fn lapin_with_bad_password_gets_access_refused() {
    let broker = TestBroker::start().await;
    let url = broker
        .url()
        .replacen("guest:guest@", "guest:not-the-password@", 1);
    assert_ne!(url, broker.url(), "the URL carries guest:guest");
    let err = refused_connection(&url).await;
    assert_amqp_error(&err, 403, Some(PLAIN_LOGIN_REFUSED));
}

#[tokio::test]
async fn unknown_vhost_is_530_not_allowed() {
    let broker = TestBroker::start().await;
    for vhost in ["no-such-vhost", ""] {
        let hs = Handshake {
            vhost: vhost.into(),
            ..Handshake::from_url(broker.url())
        };
        let mut c = RawClient::connect(broker.url()).await;
        c.start_and_tune(&hs).await;
        c.send_tune_ok_and_open(&hs).await;
        let ids = c
            .expect_connection_close_and_eof(
                530,
                Some(&format!("NOT_ALLOWED - vhost {vhost} not found")),
            )
            .await;
        assert_eq!(ids, (10, 40), "the close names connection.open");
    }
}

#[tokio::test]
async fn lapin_with_unknown_vhost_gets_530() {
    let broker = TestBroker::start().await;
    let url = broker.url().replace("/%2F", "/no-such-vhost");
    assert_ne!(url, broker.url(), "the URL names vhost /");
    let err = refused_connection(&url).await;
    assert_amqp_error(
        &err,
        530,
        Some("NOT_ALLOWED - vhost no-such-vhost not found"),
    );
}

#[tokio::test]
async fn tune_ok_may_lower_frame_max_to_4096_and_channel_max_to_1() {
    let broker = TestBroker::start().await;
    let hs = Handshake {
        frame_max: Some(4096),
        channel_max: Some(1),
        ..Handshake::from_url(broker.url())
    };
    let mut c = RawClient::open_with(broker.url(), hs).await;
    c.open_channel(1).await;
    // A body frame of exactly frame_max - 8 bytes of payload is within the limit.
    let q = format!("raw-fm-{}", uuid::Uuid::new_v4().simple());
    c.declare_queue(1, &q).await;
    c.publish(1, &q, &vec![7u8; 4088]).await;
    assert_eq!(c.purge(1, &q).await, 1, "the 4088-byte message arrived");
    c.delete_queue(1, &q).await;
    c.close().await;
}

#[tokio::test]
async fn tune_ok_out_of_range_is_refused_by_closing_the_socket() {
    // RabbitMQ sends no AMQP reply for a bad tune-ok: it closes the socket (after 3 s).
    // frame_max below 4096, above the offer, or 0 (no limit); channel_max above the offer
    // or 0 (no limit).
    let broker = TestBroker::start().await;
    let cases: [(Option<u32>, Option<u16>); 5] = [
        (Some(4095), None),
        (Some(131_073), None),
        (Some(0), None),
        (None, Some(2048)),
        (None, Some(0)),
    ];
    let runs = cases.into_iter().map(|(frame_max, channel_max)| {
        let url = broker.url().to_owned();
        async move {
            let hs = Handshake {
                frame_max,
                channel_max,
                ..Handshake::from_url(&url)
            };
            let mut c = RawClient::connect(&url).await;
            c.start_and_tune(&hs).await;
            c.send_tune_ok_and_open(&hs).await;
            let got = c.recv().await;
            assert_eq!(
                got,
                Incoming::Closed,
                "tune-ok frame_max={frame_max:?} channel_max={channel_max:?}: \
                 expected the socket closed with no reply"
            );
        }
    });
    futures_util::future::join_all(runs).await;
}

#[tokio::test]
async fn heartbeats_are_sent_and_a_silent_peer_is_dropped() {
    let broker = TestBroker::start().await;
    let hs = Handshake {
        heartbeat: 1,
        ..Handshake::from_url(broker.url())
    };
    let mut c = RawClient::open_with(broker.url(), hs).await;
    let opened = Instant::now();
    // The server sends heartbeats (at least one per interval) ...
    let mut beats = 0;
    let closed_at = loop {
        match tokio::time::timeout(Duration::from_secs(10), c.recv_any()).await {
            Ok(Incoming::Frame(AMQPFrame::Heartbeat)) => beats += 1,
            Ok(Incoming::Closed) => break opened.elapsed(),
            Ok(other) => panic!("expected heartbeats then a close, got {other:?}"),
            Err(_) => panic!("a silent client with heartbeat=1 was not dropped within 10 s"),
        }
    };
    // ... and drops us, who never sent one, after about two intervals.
    assert!(beats >= 1, "no heartbeat received before the drop");
    assert!(
        closed_at >= Duration::from_millis(1500),
        "dropped too early: {closed_at:?}"
    );
    assert!(
        closed_at <= Duration::from_secs(5),
        "dropped too late: {closed_at:?}"
    );
}

#[tokio::test]
async fn a_client_sending_heartbeats_is_kept() {
    let broker = TestBroker::start().await;
    let hs = Handshake {
        heartbeat: 1,
        ..Handshake::from_url(broker.url())
    };
    let mut c = RawClient::open_with(broker.url(), hs).await;
    let heartbeat = RawClient::encode(&AMQPFrame::Heartbeat);
    let until = Instant::now() + Duration::from_millis(3500);
    // Answer every heartbeat with one of ours for 3.5 s: the server must keep the connection.
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(5), c.recv_any()).await {
            Ok(Incoming::Frame(AMQPFrame::Heartbeat)) => c.send_bytes(&heartbeat).await,
            other => panic!("expected heartbeats, got {other:?}"),
        }
    }
    c.open_channel(1).await;
    c.close().await;
}

#[tokio::test]
async fn client_connection_close_gets_close_ok() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    let reply = c
        .rpc(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        )
        .await;
    assert!(
        matches!(
            reply,
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))
        ),
        "got {reply:?}"
    );
    // RabbitMQ then leaves the socket for the client to close: not checked.
}

#[tokio::test]
async fn client_channel_close_gets_close_ok_and_the_number_can_be_reused() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open(broker.url()).await;
    c.open_channel(3).await;
    let reply = c
        .rpc(
            3,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 200,
                reply_text: "done".into(),
                class_id: 0,
                method_id: 0,
            })),
        )
        .await;
    assert!(
        matches!(
            reply,
            AMQPFrame::Method(3, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))
        ),
        "got {reply:?}"
    );
    c.open_channel(3).await;
    c.close().await;
}

#[tokio::test]
async fn lapin_connects_and_closes_cleanly() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    assert!(conn.status().connected());
    let ch = warren_tests::channel(&conn).await;
    within("channel.close", ch.close(200, "OK".into()))
        .await
        .expect("channel.close");
    within("connection.close", conn.close(200, "OK".into()))
        .await
        .expect("connection.close");
    close_conn(&conn).await;
}

#[tokio::test]
async fn tune_ok_heartbeat_is_taken_as_sent() {
    // The server offers 60 s; the client may answer 0 (off) or even more than offered.
    let broker = TestBroker::start().await;
    let runs = [0u16, 120].map(|heartbeat| {
        let url = broker.url().to_owned();
        async move {
            let hs = Handshake {
                heartbeat,
                ..Handshake::from_url(&url)
            };
            let mut c = RawClient::open_with(&url, hs).await;
            // No heartbeat within 1.5 s (with heartbeat=1 there would be several).
            if let Ok(got) = tokio::time::timeout(Duration::from_millis(1500), c.recv_any()).await {
                panic!("heartbeat={heartbeat}: expected silence, got {got:?}");
            }
            c.open_channel(1).await;
            c.close().await;
        }
    });
    futures_util::future::join_all(runs).await;
}
