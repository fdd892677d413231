//! `TestBroker::peek`: a queue's ready messages in delivery order, with their properties and
//! routing, left in the queue (read in place on an embedded broker; taken and put back on
//! RabbitMQ).

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};
use warren_harness::TestBroker;
use warren_tests::{
    close_conn, confirm_channel, declare, declare_args, drain_bodies, get, get_eventually,
    long_string, publish_confirmed, publish_confirmed_with, reject,
};

#[tokio::test]
async fn peek_shows_ready_messages_in_order_and_leaves_them() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("peek");
    declare(&ch, &q).await;
    let mut headers = FieldTable::default();
    headers.insert("tenant".into(), long_string("acme"));
    let props = BasicProperties::default()
        .with_correlation_id(ShortString::from("c-1"))
        .with_headers(headers.clone());
    publish_confirmed_with(&ch, "", &q, b"first", false, props).await;
    publish_confirmed(&ch, &q, b"second").await;

    let seen = broker.peek(&q).await.expect("the queue exists");
    let bodies: Vec<&[u8]> = seen.iter().map(|m| m.body.as_slice()).collect();
    assert_eq!(bodies, [b"first".as_slice(), b"second"]);
    assert_eq!(
        (seen[0].exchange.as_str(), seen[0].routing_key.as_str()),
        ("", q.as_str())
    );
    assert_eq!(
        seen[0]
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("c-1")
    );
    assert_eq!(seen[0].properties.headers().as_ref(), Some(&headers));
    assert!(seen.iter().all(|m| !m.redelivered));

    // Still there, in the same order; untouched on an embedded broker.
    broker.wait_for_messages(&q, 2).await;
    let first = get(&ch, &q, true).await.expect("first").delivery;
    assert_eq!(first.data, b"first");
    if broker.is_embedded() {
        assert!(!first.redelivered);
    }
    assert_eq!(drain_bodies(&ch, &q).await, [b"second"]);
    assert_eq!(broker.peek(&q).await, Some(Vec::new()));
    assert_eq!(broker.peek(&broker.unique_name("peek-none")).await, None);
    close_conn(&conn).await;
}

#[tokio::test]
async fn peek_follows_priorities_and_shows_what_was_dead_lettered() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let work = broker.unique_name("peek-work");
    let dead = broker.unique_name("peek-dead");
    declare(&ch, &dead).await;
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(5));
    args.insert("x-dead-letter-exchange".into(), long_string(""));
    args.insert("x-dead-letter-routing-key".into(), long_string(&dead));
    declare_args(&ch, &work, args).await;
    for (body, priority) in [(b"low", 1), (b"top", 5)] {
        let props = BasicProperties::default().with_priority(priority);
        publish_confirmed_with(&ch, "", &work, body, false, props).await;
    }
    let seen = broker.peek(&work).await.expect("the queue exists");
    let bodies: Vec<&[u8]> = seen.iter().map(|m| m.body.as_slice()).collect();
    assert_eq!(bodies, [b"top".as_slice(), b"low"]);

    let top = get_eventually(&ch, &work, false).await.delivery;
    assert_eq!(top.data, b"top");
    reject(&ch, top.delivery_tag, false).await;
    broker.wait_for_messages(&dead, 1).await;
    let dead_letters = broker.peek(&dead).await.expect("the queue exists");
    assert_eq!(dead_letters.len(), 1);
    let headers = dead_letters[0]
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    assert_eq!(
        headers.inner().get("x-first-death-reason"),
        Some(&long_string("rejected"))
    );
    assert_eq!(dead_letters[0].routing_key, dead);
    close_conn(&conn).await;
}
