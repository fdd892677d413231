//! Sender-selected distribution: the `CC` and `BCC` headers (arrays of strings) add routing
//! keys to a publish, through the same exchange; `BCC` is removed before any queue gets the
//! message, and a `CC` or `BCC` that is not an array closes the channel with 406.

use lapin::{
    BasicProperties, Channel, Confirmation, ExchangeKind,
    types::{AMQPValue, FieldArray, FieldTable},
};
use warren_harness::TestBroker;
use warren_tests::{
    ErrorEvents, assert_amqp_error, assert_channel_closed_only, bind_queue, channel, close_conn,
    confirm_channel, declare, declare_exchange, drain_bodies, get_eventually, long_string,
    publish_confirmed_with, publish_with,
};

fn keys(keys: &[&str]) -> AMQPValue {
    AMQPValue::FieldArray(FieldArray::from(
        keys.iter().map(|k| long_string(k)).collect::<Vec<_>>(),
    ))
}

fn with_headers(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in pairs {
        headers.insert((*k).into(), v.clone());
    }
    BasicProperties::default().with_headers(headers)
}

/// A direct exchange with one queue per key, bound with that key; returns the queues.
async fn direct_with_queues(
    broker: &TestBroker,
    ch: &Channel,
    exchange: &str,
    keys: &[&str],
) -> Vec<String> {
    declare_exchange(
        ch,
        exchange,
        ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await;
    let mut queues = Vec::new();
    for key in keys {
        let queue = broker.unique_name(&format!("cc-{key}"));
        declare(ch, &queue).await;
        bind_queue(ch, &queue, exchange, key).await;
        queues.push(queue);
    }
    queues
}

#[tokio::test]
async fn cc_and_bcc_keys_route_a_message_to_more_queues_and_bcc_is_removed() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let x = broker.unique_name("cc-x");
    let queues = direct_with_queues(&broker, &ch, &x, &["a", "b", "c", "d"]).await;
    // Entries that are not long strings (here an integer) route nowhere.
    let cc = AMQPValue::FieldArray(FieldArray::from(vec![
        long_string("b"),
        AMQPValue::LongInt(1),
    ]));
    let props = with_headers(&[
        ("CC", cc.clone()),
        ("BCC", keys(&["c"])),
        ("other", AMQPValue::LongInt(7)),
    ]);
    let confirmation = publish_confirmed_with(&ch, &x, "a", b"hello", false, props).await;
    assert_eq!(confirmation, Confirmation::Ack(None));
    for queue in &queues[..3] {
        let d = get_eventually(&ch, queue, true).await.delivery;
        assert_eq!(
            d.routing_key.as_str(),
            "a",
            "the delivery keeps its own key"
        );
        let headers = d.properties.headers().clone().expect("headers");
        let names: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["CC", "other"], "BCC is removed in {queue}");
        assert_eq!(headers.inner().get("CC"), Some(&cc));
    }
    assert!(drain_bodies(&ch, &queues[3]).await.is_empty());

    // Keys named twice, or the message's own key again, still give each queue one copy.
    let props = with_headers(&[("CC", keys(&["a", "b", "b"])), ("BCC", keys(&["a"]))]);
    publish_confirmed_with(&ch, &x, "a", b"once", false, props).await;
    for queue in &queues[..2] {
        assert_eq!(drain_bodies(&ch, queue).await, [b"once".to_vec()]);
    }
    close_conn(&conn).await;
}

#[tokio::test]
async fn cc_keys_route_through_the_default_and_topic_exchanges_and_count_for_mandatory() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    // The default exchange: a CC key names a queue.
    let (first, second) = (broker.unique_name("cc-1"), broker.unique_name("cc-2"));
    declare(&ch, &first).await;
    declare(&ch, &second).await;
    let props = with_headers(&[("CC", keys(&[&second]))]);
    publish_confirmed_with(&ch, "", &first, b"both", false, props).await;
    assert_eq!(drain_bodies(&ch, &first).await, [b"both".to_vec()]);
    assert_eq!(drain_bodies(&ch, &second).await, [b"both".to_vec()]);

    // A topic exchange matches CC keys against its patterns.
    let topic = broker.unique_name("cc-topic");
    declare_exchange(
        &ch,
        &topic,
        ExchangeKind::Topic,
        Default::default(),
        FieldTable::default(),
    )
    .await;
    bind_queue(&ch, &second, &topic, "k.*").await;
    let props = with_headers(&[("CC", keys(&["k.x"]))]);
    publish_confirmed_with(&ch, &topic, "nothing", b"topic", false, props).await;
    assert_eq!(drain_bodies(&ch, &second).await, [b"topic".to_vec()]);

    // A mandatory publish that only a BCC key routes is not returned; one that nothing routes
    // comes back without its BCC.
    let props = with_headers(&[("BCC", keys(&["k.y"]))]);
    let confirmation = publish_confirmed_with(&ch, &topic, "nowhere", b"bcc", true, props).await;
    assert_eq!(confirmation, Confirmation::Ack(None));
    assert_eq!(drain_bodies(&ch, &second).await, [b"bcc".to_vec()]);
    let props = with_headers(&[("CC", keys(&["no.route.1"])), ("BCC", keys(&["none"]))]);
    match publish_confirmed_with(&ch, &topic, "nowhere", b"back", true, props).await {
        Confirmation::Ack(Some(returned)) => {
            assert_eq!(returned.delivery.data, b"back");
            let headers = returned.delivery.properties.headers().clone();
            let names: Vec<String> = headers
                .map(|h| h.inner().keys().map(|k| k.to_string()).collect())
                .unwrap_or_default();
            assert_eq!(names, ["CC"], "BCC is removed from a returned message too");
        }
        other => panic!("expected a returned message, got {other:?}"),
    }
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_cc_or_bcc_that_is_not_an_array_closes_the_channel_with_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let queue = broker.unique_name("cc-bad");
    declare(&channel(&conn).await, &queue).await;
    let mut table = FieldTable::default();
    table.insert("b".into(), long_string("b"));
    let mut events = ErrorEvents::new(&conn);
    for (header, value, type_name) in [
        ("CC", long_string("b"), "longstr"),
        ("BCC", AMQPValue::LongInt(5), "signedint"),
        ("CC", AMQPValue::FieldTable(table), "table"),
        ("BCC", AMQPValue::Void, "void"),
    ] {
        let ch = channel(&conn).await;
        publish_with(&ch, &queue, b"bad", with_headers(&[(header, value)])).await;
        let err = events.next_error().await;
        let text = format!(
            "PRECONDITION_FAILED - invalid message: {{unacceptable_type_in_header,\"{header}\",{type_name}}}"
        );
        assert_amqp_error(&err, 406, Some(&text));
        assert_channel_closed_only(&conn, &ch).await;
    }
    let ch = channel(&conn).await;
    assert!(
        drain_bodies(&ch, &queue).await.is_empty(),
        "none was routed"
    );
    close_conn(&conn).await;
}
