//! Resource alarms (embedded only: a test cannot raise RabbitMQ's memory alarm over AMQP; the
//! behaviour is RabbitMQ 3.10's `rabbit_reader`, memory alarm probed with pika, see ORACLE.md).
//! A connection that publishes while an alarm is raised is blocked: told with
//! `connection.blocked`, its input held (nothing lost) until the alarm clears; connections that
//! only consume go on.

use lapin::{BasicProperties, options::BasicPublishOptions};
use std::time::Duration;
use warren_broker::{BrokerHandle, ResourceAlarm};
use warren_harness::{TestBroker, wait_until};
use warren_tests::{
    TIMEOUT, assert_no_delivery, channel, close_conn, confirm_channel, consume, declare,
    next_delivery, publish, publish_confirmed, within,
};

/// How long a held message is checked not to arrive (a negative check: kept short).
const QUIET: Duration = Duration::from_millis(300);

/// Whether the broker's connection `id` is blocked.
fn blocked(handle: &BrokerHandle, id: u64) -> bool {
    handle.connections().iter().any(|c| c.id == id && c.blocked)
}

/// Waits until the broker's connection `id` is blocked.
async fn until_blocked(handle: &BrokerHandle, id: u64) {
    wait_until("the connection is blocked", TIMEOUT, || async {
        if blocked(handle, id) {
            Ok(())
        } else {
            Err("not blocked".to_owned())
        }
    })
    .await;
}

#[tokio::test]
#[cfg_attr(
    warren_external,
    ignore = "embedded only: an alarm cannot be raised over AMQP"
)]
async fn a_publisher_is_blocked_under_an_alarm_and_its_message_arrives_when_it_clears() {
    let broker = TestBroker::start().await;
    let handle = broker.embedded().expect("embedded");
    let consumer_conn = broker.connect_named("consumer").await;
    let consumer_id = broker
        .connection_id("consumer")
        .await
        .expect("the consumer's connection");
    let publisher = broker.connect_named("publisher").await;
    let publisher_id = broker
        .connection_id("publisher")
        .await
        .expect("the publisher's connection");
    let ch = confirm_channel(&publisher).await;
    let queue = broker.unique_name("alarm");
    declare(&ch, &queue).await;
    let mut consumer = consume(&channel(&consumer_conn).await, &queue, true).await;
    publish_confirmed(&ch, &queue, b"before").await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"before");

    handle.raise_alarm(ResourceAlarm::Memory);
    // Raising it blocks nobody yet: only a publish does.
    assert!(!blocked(handle, publisher_id));
    let confirm = within(
        "basic.publish",
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"during",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("basic.publish is written");
    until_blocked(handle, publisher_id).await;
    wait_until("lapin hears connection.blocked", TIMEOUT, || async {
        if publisher.status().blocked() {
            Ok(())
        } else {
            Err("no connection.blocked".to_owned())
        }
    })
    .await;
    // Its message waits unread; the consumer's connection is not blocked and still works.
    assert_no_delivery(&mut consumer, QUIET).await;
    assert!(!blocked(handle, consumer_id));
    assert_eq!(handle.queue(&queue).expect("the queue").ready, 0);

    handle.clear_alarm(ResourceAlarm::Memory);
    assert_eq!(next_delivery(&mut consumer).await.data, b"during");
    let confirmation = within("the confirm", confirm).await.expect("confirm");
    assert!(confirmation.is_ack());
    assert!(!blocked(handle, publisher_id));
    wait_until("lapin hears connection.unblocked", TIMEOUT, || async {
        if publisher.status().blocked() {
            Err("still blocked".to_owned())
        } else {
            Ok(())
        }
    })
    .await;
    close_conn(&publisher).await;
    close_conn(&consumer_conn).await;
}

#[tokio::test]
#[cfg_attr(
    warren_external,
    ignore = "embedded only: an alarm cannot be raised over AMQP"
)]
async fn a_connection_opened_under_an_alarm_is_blocked_at_its_first_publish() {
    let broker = TestBroker::start().await;
    let handle = broker.embedded().expect("embedded");
    handle.raise_alarm(ResourceAlarm::Disk);
    let conn = broker.connect_named("late").await;
    let id = broker.connection_id("late").await.expect("the connection");
    let ch = channel(&conn).await;
    let queue = broker.unique_name("alarm-new");
    // Declaring is not publishing: it works under the alarm.
    declare(&ch, &queue).await;
    assert!(!blocked(handle, id));
    publish(&ch, &queue, b"held").await;
    until_blocked(handle, id).await;
    assert_eq!(handle.queue(&queue).expect("the queue").ready, 0);
    handle.clear_alarm(ResourceAlarm::Disk);
    broker.wait_for_messages(&queue, 1).await;
    close_conn(&conn).await;
}
