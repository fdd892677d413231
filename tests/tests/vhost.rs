//! Virtual hosts (`TestBroker::add_vhost`: `rabbitmqctl add_vhost` and `set_permissions` on
//! RabbitMQ): each has its own queues, exchanges and policies; a missing one is refused at
//! connection.open with 530; deleting one closes its connections with 320 and leaves the
//! others alone.

use amq_protocol::{
    frame::AMQPFrame,
    protocol::{AMQPClass, connection},
};
use lapin::{ExchangeKind, options::QueueDeclareOptions, types::FieldTable};
use warren_broker::{ApplyTo, Policy, PolicyError};
use warren_harness::{TestBroker, connect_to};
use warren_tests::raw::{Incoming, RawClient};
use warren_tests::{
    assert_amqp_error, assert_connection_closed, assert_connection_works, close_conn,
    confirm_channel, declare, declare_exchange, declare_with, expect_err, publish_confirmed,
    within,
};

#[tokio::test]
async fn each_vhost_has_its_own_queues_exchanges_and_policies() {
    let broker = TestBroker::start().await;
    let vhost = broker.unique_name("vh");
    broker.add_vhost(&vhost).await;
    let root = broker.connect().await;
    let other = connect_to(&broker.url_for(&vhost)).await;
    let root_ch = confirm_channel(&root).await;
    let other_ch = confirm_channel(&other).await;
    let q = broker.unique_name("vh-q");

    // The same name in both, apart; a policy of the vhost reaches only its queue.
    broker
        .set_policy(
            &Policy::new(&q, format!("^{q}$"))
                .vhost(&vhost)
                .apply_to(ApplyTo::Queues)
                .max_length(1),
        )
        .await
        .expect("set_policy in the vhost");
    declare(&root_ch, &q).await;
    declare(&other_ch, &q).await;
    for body in [b"1", b"2"] {
        publish_confirmed(&root_ch, &q, body).await;
        publish_confirmed(&other_ch, &q, body).await;
    }
    let count = |ch: &lapin::Channel| {
        let ch = ch.clone();
        let q = q.clone();
        async move {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            declare_with(&ch, &q, passive, FieldTable::default())
                .await
                .expect("passive declare")
                .message_count()
        }
    };
    assert_eq!(count(&root_ch).await, 2);
    assert_eq!(count(&other_ch).await, 1, "the vhost's policy");

    // An exchange of one vhost does not exist in the other.
    let x = broker.unique_name("vh-x");
    declare_exchange(
        &other_ch,
        &x,
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await;
    let err = expect_err(
        "a passive exchange.declare in /",
        within(
            "exchange.declare",
            root_ch.exchange_declare(
                x.as_str().into(),
                ExchangeKind::Fanout,
                lapin::options::ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await,
    );
    assert_amqp_error(
        &err,
        404,
        Some(&format!("NOT_FOUND - no exchange '{x}' in vhost '/'")),
    );

    if let Some(handle) = broker.embedded() {
        assert_eq!(handle.queue_in(&vhost, &q).map(|i| i.ready), Some(1));
        assert_eq!(
            handle.queue(&q).map(|i| (i.ready, i.vhost)),
            Some((2, "/".to_owned()))
        );
        assert!(handle.connections().iter().any(|c| c.vhost == vhost));
    }
    // A policy for a vhost that does not exist is refused.
    let missing = broker.unique_name("vh-missing");
    assert_eq!(
        broker
            .set_policy(&Policy::new("p", ".*").vhost(&missing).max_length(1))
            .await,
        Err(PolicyError::NoVhost(missing))
    );
    close_conn(&other).await;
    close_conn(&root).await;
}

#[tokio::test]
async fn a_missing_vhost_is_refused_at_open() {
    let broker = TestBroker::start().await;
    let missing = broker.unique_name("vh-none");
    let err = expect_err(
        "a connection to a missing vhost",
        within(
            "connect",
            lapin::Connection::connect(&broker.url_for(&missing), Default::default()),
        )
        .await,
    );
    assert_amqp_error(
        &err,
        530,
        Some(&format!("NOT_ALLOWED - vhost {missing} not found")),
    );
}

#[tokio::test]
async fn deleting_a_vhost_closes_its_connections_and_only_them() {
    let broker = TestBroker::start().await;
    let vhost = broker.unique_name("vh-del");
    broker.add_vhost(&vhost).await;
    let root = broker.connect().await;
    let doomed = connect_to(&broker.url_for(&vhost)).await;
    let ch = confirm_channel(&doomed).await;
    declare(&ch, &broker.unique_name("vh-del-q")).await;
    // A raw client sees the close itself (lapin reports RabbitMQ's as a reset socket: see
    // below).
    let mut raw = RawClient::open(&broker.url_for(&vhost)).await;

    broker.delete_vhost(&vhost).await;
    // RabbitMQ closes the socket right after its connection.close, so no close-ok is sent;
    // its text races between two of its own paths ("is deleted" or "is down"); Warren's is
    // "is deleted".
    let close = match raw.recv().await {
        Incoming::Frame(AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(close)),
        )) => close,
        other => panic!("expected connection.close 320, got {other:?}"),
    };
    let deleted = format!("CONNECTION_FORCED - vhost '{vhost}' is deleted");
    let down = format!("CONNECTION_FORCED - vhost '{vhost}' is down");
    assert_eq!(close.reply_code, 320);
    let text = close.reply_text.as_str();
    assert!(
        text == deleted || (!broker.is_embedded() && text == down),
        "connection.close text {text:?}"
    );
    assert_connection_closed(&doomed).await;
    assert_connection_works(&root).await;
    if let Some(handle) = broker.embedded() {
        assert!(!handle.vhosts().contains(&vhost));
    }
    // It can be added again, empty.
    broker.add_vhost(&vhost).await;
    let again = connect_to(&broker.url_for(&vhost)).await;
    assert_connection_works(&again).await;
    close_conn(&again).await;
    close_conn(&root).await;
}
