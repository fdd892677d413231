//! Resource alarms, raised with `TestBroker::raise_alarm` (on RabbitMQ by `rabbitmqctl`,
//! setting the memory or disk threshold out of reach; the behaviour is RabbitMQ 3.10's
//! `rabbit_reader`, probed with pika, see ORACLE.md). A connection that publishes while an
//! alarm is raised is blocked: told with `connection.blocked`, its input held (nothing lost)
//! until the alarm clears; connections that only consume go on.
//!
//! On RabbitMQ an alarm blocks every publisher of the node: the tests of this file take
//! turns ([`ALARMS`]), and no other file raises one.

use lapin::{BasicProperties, options::BasicPublishOptions};
use std::time::Duration;
use warren_broker::{BrokerHandle, ResourceAlarm};
use warren_harness::{TestBroker, wait_until};
use warren_tests::{
    ErrorEvents, TIMEOUT, assert_no_delivery, channel, close_conn, confirm_channel, consume,
    declare, get, next_delivery, publish, publish_confirmed, within,
};

/// How long a held message is checked not to arrive (a negative check: kept short).
const QUIET: Duration = Duration::from_millis(300);

/// Held by each test for its whole run: on RabbitMQ, one test's alarm would block the other's
/// publishes.
static ALARMS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
async fn a_publisher_is_blocked_under_an_alarm_and_its_message_arrives_when_it_clears() {
    let _turn = ALARMS.lock().await;
    let broker = TestBroker::start().await;
    let consumer_conn = broker.connect_named("consumer").await;
    let publisher = broker.connect_named("publisher").await;
    // The broker's ids, where it has them (embedded).
    let id = async |name| {
        if broker.is_embedded() {
            Some(broker.connection_id(name).await.expect("listed"))
        } else {
            None
        }
    };
    let (consumer_id, publisher_id) = (id("consumer").await, id("publisher").await);
    // The broker's own view, where there is one (embedded).
    let broker_blocked = |id: Option<u64>| {
        broker
            .embedded()
            .zip(id)
            .is_some_and(|(handle, id)| blocked(handle, id))
    };
    let ch = confirm_channel(&publisher).await;
    let queue = broker.unique_name("alarm");
    declare(&ch, &queue).await;
    let mut consumer = consume(&channel(&consumer_conn).await, &queue, true).await;
    publish_confirmed(&ch, &queue, b"before").await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"before");

    let mut events = ErrorEvents::new(&publisher);
    broker.raise_alarm(ResourceAlarm::Memory).await;
    // Raising it blocks nobody yet: only a publish does.
    assert!(!broker_blocked(publisher_id));
    assert!(!publisher.status().blocked());
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
    if let (Some(handle), Some(id)) = (broker.embedded(), publisher_id) {
        until_blocked(handle, id).await;
    }
    assert_eq!(events.next_blocked().await, "low on memory");
    assert!(publisher.status().blocked());
    // Its message waits unread; the consumer's connection is not blocked and still works.
    assert_no_delivery(&mut consumer, QUIET).await;
    assert!(!broker_blocked(consumer_id));
    assert!(!consumer_conn.status().blocked());
    assert_eq!(broker.queue_counts(&queue).await, Some((0, 1)));
    // The consumer's connection still works: it declares and gets from a queue of its own.
    let own = broker.unique_name("alarm-own");
    let consumer_ch = channel(&consumer_conn).await;
    declare(&consumer_ch, &own).await;
    assert!(get(&consumer_ch, &own, true).await.is_none());

    broker.clear_alarm(ResourceAlarm::Memory).await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"during");
    let confirmation = within("the confirm", confirm).await.expect("confirm");
    assert!(confirmation.is_ack());
    assert!(!broker_blocked(publisher_id));
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
async fn a_connection_opened_under_an_alarm_is_blocked_at_its_first_publish() {
    let _turn = ALARMS.lock().await;
    let broker = TestBroker::start().await;
    broker.raise_alarm(ResourceAlarm::Disk).await;
    let conn = broker.connect_named("late").await;
    let ch = channel(&conn).await;
    let queue = broker.unique_name("alarm-new");
    // Declaring is not publishing: it works under the alarm.
    declare(&ch, &queue).await;
    assert!(!conn.status().blocked());
    let mut events = ErrorEvents::new(&conn);
    publish(&ch, &queue, b"held").await;
    if let Some(handle) = broker.embedded() {
        let id = broker.connection_id("late").await.expect("the connection");
        until_blocked(handle, id).await;
    }
    assert_eq!(events.next_blocked().await, "low on disk");
    assert_eq!(broker.queue_counts(&queue).await, Some((0, 0)));
    broker.clear_alarm(ResourceAlarm::Disk).await;
    broker.wait_for_messages(&queue, 1).await;
    close_conn(&conn).await;
}

/// An alarm a test leaves raised (it failed, say) goes when its `TestBroker` is dropped: on
/// RabbitMQ the threshold is put back, and the next test's publishes go through.
#[tokio::test]
async fn an_alarm_left_raised_is_cleared_when_its_test_broker_drops() {
    let _turn = ALARMS.lock().await;
    let forgetful = TestBroker::start().await;
    forgetful.raise_alarm(ResourceAlarm::Memory).await;
    drop(forgetful);
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let queue = broker.unique_name("alarm-after");
    declare(&ch, &queue).await;
    publish_confirmed(&ch, &queue, b"free").await;
    assert!(!conn.status().blocked());
    close_conn(&conn).await;
}
