//! Direct reply-to (`amq.rabbitmq.reply-to`), against the embedded broker or `AMQP_URL`.

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use warren_harness::TestBroker;

// Every wait for the broker: the suite-wide bound.
use warren_tests::TIMEOUT as WAIT;
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

#[tokio::test]
async fn a_reply_reaches_the_requesting_channel_through_no_queue() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let requests = broker.unique_name("direct-reply-requests");
    let server = conn.create_channel().await.unwrap();
    server
        .queue_declare(
            requests.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let client = conn.create_channel().await.unwrap();
    let mut replies = client
        .basic_consume(
            REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    client
        .basic_publish(
            "".into(),
            requests.as_str().into(),
            BasicPublishOptions::default(),
            b"ping",
            BasicProperties::default()
                .with_reply_to(REPLY_TO.into())
                .with_correlation_id("c1".into()),
        )
        .await
        .unwrap();

    let mut incoming = server
        .basic_consume(
            requests.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let request = tokio::time::timeout(WAIT, incoming.next())
        .await
        .expect("no request")
        .unwrap()
        .unwrap();
    let reply_to = request
        .properties
        .reply_to()
        .clone()
        .expect("reply_to set")
        .to_string();
    assert!(
        reply_to.starts_with("amq.rabbitmq.reply-to."),
        "reply_to is rewritten to an address, got {reply_to}"
    );
    server
        .basic_publish(
            "".into(),
            reply_to.as_str().into(),
            BasicPublishOptions::default(),
            b"pong",
            BasicProperties::default().with_correlation_id("c1".into()),
        )
        .await
        .unwrap();
    let reply = tokio::time::timeout(WAIT, replies.next())
        .await
        .expect("no reply")
        .unwrap()
        .unwrap();
    assert_eq!(reply.data, b"pong");
    assert_eq!(
        reply.properties.correlation_id().as_ref().unwrap().as_str(),
        "c1"
    );
    server
        .queue_delete(requests.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn publishing_with_reply_to_without_the_consumer_is_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let result = ch
        .basic_publish(
            "".into(),
            "anywhere".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default().with_reply_to(REPLY_TO.into()),
        )
        .await
        .unwrap()
        .await;
    match result {
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(p) => assert_eq!(p.get_id(), 406, "{p}"),
            other => panic!("expected a 406 channel error, got {other:?}"),
        },
        other => panic!("expected a 406 channel error, got {other:?}"),
    }
    // Only the channel closed.
    let again = conn.create_channel().await.unwrap();
    assert!(again.status().connected());
}

#[tokio::test]
async fn an_acknowledging_reply_consumer_is_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let result = ch
        .basic_consume(
            REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    match result {
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(p) => assert_eq!(p.get_id(), 406, "{p}"),
            other => panic!("expected a 406 channel error, got {other:?}"),
        },
        other => panic!("expected a 406 channel error, got {other:?}"),
    }
}
