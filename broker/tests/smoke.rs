//! A smoke test of the broker through lapin: the library API, a publish with confirms, a
//! consume with ack, a mandatory publish that comes back, and shutdown. The full behaviour
//! suite lives in the `tests/` crate.

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::time::Duration;
use warren_broker::{Broker, BrokerConfig};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn publish_confirm_consume_ack_and_return() {
    let broker = Broker::start(BrokerConfig::default()).await.unwrap();
    let conn = tokio::time::timeout(
        WAIT,
        Connection::connect(&broker.url(), ConnectionProperties::default()),
    )
    .await
    .expect("connect timed out")
    .expect("connect");
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let q = ch
        .queue_declare(
            "smoke".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0);

    let props = BasicProperties::default()
        .with_correlation_id("c-1".into())
        .with_reply_to("elsewhere".into());
    let confirm = ch
        .basic_publish(
            "".into(),
            "smoke".into(),
            BasicPublishOptions::default(),
            b"hello",
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());

    let mut consumer = ch
        .basic_consume(
            "smoke".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("no delivery")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.data, b"hello");
    assert_eq!(
        delivery
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "c-1"
    );
    assert_eq!(
        delivery.properties.reply_to().as_ref().unwrap().as_str(),
        "elsewhere"
    );
    assert!(!delivery.redelivered);
    delivery.ack(BasicAckOptions::default()).await.unwrap();

    let confirm = ch
        .basic_publish(
            "".into(),
            "no-such-queue".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let returned = confirm.take_message().expect("the message comes back");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.data, b"lost");

    let info = broker.queue("smoke").unwrap();
    assert_eq!((info.ready, info.unacked, info.consumers.len()), (0, 0, 1));
    tokio::time::timeout(WAIT, broker.shutdown())
        .await
        .expect("shutdown hangs");
}
