//! Dead-lettering (`x-dead-letter-exchange`, `x-dead-letter-routing-key`): messages rejected
//! without requeue or expired go to the queue's dead-letter exchange with RabbitMQ's `x-death`
//! header, expired ones without anything touching their queue; expiry cycles are cut. A dead
//! letter keeps its `CC` keys unless its queue sets the routing key.

use lapin::{
    BasicProperties, ExchangeKind,
    options::{BasicNackOptions, ExchangeDeclareOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldArray, FieldTable},
};
use std::time::{Duration, SystemTime};
use warren_harness::TestBroker;
use warren_tests::{
    assert_amqp_error, assert_channel_closed_only, assert_no_delivery, bind_queue, channel,
    close_conn, confirm_channel, consume, declare, declare_args, declare_exchange, declare_with,
    expect_err, get, get_eventually, long_string, next_delivery, publish, publish_confirmed,
    publish_confirmed_with, publish_with, reject, within,
};

const QUIET: Duration = Duration::from_millis(300);

/// Declaration arguments from string-valued pairs, and an optional message TTL.
fn args(pairs: &[(&str, &str)], ttl_ms: Option<i32>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), long_string(v));
    }
    if let Some(ttl) = ttl_ms {
        t.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl));
    }
    t
}

fn headers(m: &lapin::message::Delivery) -> std::collections::BTreeMap<String, AMQPValue> {
    m.properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The `x-death` entries, each as its fields by name.
fn deaths(m: &lapin::message::Delivery) -> Vec<std::collections::BTreeMap<String, AMQPValue>> {
    match headers(m).get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a
            .as_slice()
            .iter()
            .map(|d| match d {
                AMQPValue::FieldTable(t) => t
                    .inner()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
                other => panic!("an x-death entry that is not a table: {other:?}"),
            })
            .collect(),
        other => panic!("no x-death array: {other:?}"),
    }
}

/// Asserts an `x-death` entry's fields, and that its time is now (within a day: clocks).
#[track_caller]
fn assert_death(
    entry: &std::collections::BTreeMap<String, AMQPValue>,
    queue: &str,
    reason: &str,
    count: i64,
    routing_keys: &[&str],
    original_expiration: Option<&str>,
) {
    assert_eq!(entry.get("queue"), Some(&long_string(queue)), "{entry:?}");
    assert_eq!(entry.get("reason"), Some(&long_string(reason)), "{entry:?}");
    assert_eq!(entry.get("count"), Some(&AMQPValue::LongLongInt(count)));
    assert_eq!(entry.get("exchange"), Some(&long_string("")));
    let keys: Vec<AMQPValue> = routing_keys.iter().map(|k| long_string(k)).collect();
    assert_eq!(
        entry.get("routing-keys"),
        Some(&AMQPValue::FieldArray(FieldArray::from(keys)))
    );
    assert_eq!(
        entry.get("original-expiration"),
        original_expiration.map(long_string).as_ref()
    );
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    match entry.get("time") {
        Some(AMQPValue::Timestamp(t)) => assert!(t.abs_diff(now) < 86_400, "time {t}"),
        other => panic!("time: {other:?}"),
    }
    let expected_fields = 6 + usize::from(original_expiration.is_some());
    assert_eq!(entry.len(), expected_fields, "fields of {entry:?}");
}

#[tokio::test]
async fn a_rejected_message_goes_to_the_dead_letter_exchange_with_its_death_recorded() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let dlx = broker.unique_name("dlx");
    declare_exchange(
        &ch,
        &dlx,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await;
    let dead = broker.unique_name("dead");
    declare(&ch, &dead).await;
    bind_queue(&ch, &dead, &dlx, "").await;
    let work = broker.unique_name("work");
    declare_args(&ch, &work, args(&[("x-dead-letter-exchange", &dlx)], None)).await;
    let mut app_headers = FieldTable::default();
    app_headers.insert("attempt".into(), AMQPValue::LongInt(1));
    let props = BasicProperties::default()
        .with_expiration("60000".into())
        .with_correlation_id("c-1".into())
        .with_headers(app_headers);
    publish_with(&ch, &work, b"job", props).await;

    // A reject with requeue puts it back; nothing is dead-lettered.
    let m = get_eventually(&ch, &work, false).await;
    reject(&ch, m.delivery.delivery_tag, true).await;
    let m = get_eventually(&ch, &work, false).await;
    assert!(m.delivery.redelivered);
    assert!(get(&ch, &dead, true).await.is_none());

    reject(&ch, m.delivery.delivery_tag, false).await;
    let d = get_eventually(&ch, &dead, true).await.delivery;
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str(), &d.data[..]),
        (dlx.as_str(), work.as_str(), &b"job"[..])
    );
    assert!(
        !d.redelivered,
        "a dead letter is a new message in its queue"
    );
    assert_eq!(d.properties.correlation_id(), &Some("c-1".into()));
    assert_eq!(
        d.properties.expiration(),
        &None,
        "the expiration moves into x-death"
    );
    let h = headers(&d);
    assert_eq!(h.get("attempt"), Some(&AMQPValue::LongInt(1)));
    assert_eq!(
        h.get("x-first-death-reason"),
        Some(&long_string("rejected"))
    );
    assert_eq!(h.get("x-first-death-queue"), Some(&long_string(&work)));
    assert_eq!(h.get("x-first-death-exchange"), Some(&long_string("")));
    assert_eq!(h.len(), 5, "{h:?}");
    let deaths = deaths(&d);
    assert_eq!(deaths.len(), 1);
    assert_death(&deaths[0], &work, "rejected", 1, &[&work], Some("60000"));
    assert!(get(&ch, &work, true).await.is_none(), "it left its queue");
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_multiple_nack_dead_letters_each_message_in_order_with_the_dead_letter_routing_key() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let dead = broker.unique_name("dead");
    declare(&ch, &dead).await;
    let work = broker.unique_name("work");
    let dl = [
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", dead.as_str()),
    ];
    declare_args(&ch, &work, args(&dl, None)).await;
    for i in 0..3u8 {
        publish(&ch, &work, &[i]).await;
    }
    let mut last = 0;
    for _ in 0..3 {
        last = get_eventually(&ch, &work, false)
            .await
            .delivery
            .delivery_tag;
    }
    within(
        "basic.nack",
        ch.basic_nack(
            last,
            BasicNackOptions {
                multiple: true,
                requeue: false,
            },
        ),
    )
    .await
    .expect("basic.nack");
    for i in 0..3u8 {
        let d = get_eventually(&ch, &dead, true).await.delivery;
        assert_eq!(d.data, [i]);
        assert_eq!(
            (d.exchange.as_str(), d.routing_key.as_str()),
            ("", dead.as_str())
        );
        assert_death(&deaths(&d)[0], &work, "rejected", 1, &[&work], None);
    }
    assert!(get(&ch, &dead, true).await.is_none());
    close_conn(&conn).await;
}

#[tokio::test]
async fn an_expired_message_is_dead_lettered_without_anything_touching_its_queue() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let dead = broker.unique_name("dead");
    declare(&ch, &dead).await;
    let mut consumer = consume(&ch, &dead, true).await;
    // A queue of delayed retries: no consumer; its messages come back when their time is up.
    let delay = broker.unique_name("delay");
    let dl = [
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", dead.as_str()),
    ];
    declare_args(&ch, &delay, args(&dl, Some(200))).await;
    publish_with(
        &ch,
        &delay,
        b"own",
        BasicProperties::default().with_expiration("100".into()),
    )
    .await;
    publish(&ch, &delay, b"queue's").await;

    let first = next_delivery(&mut consumer).await;
    assert_eq!(first.data, b"own");
    assert_eq!(
        (first.exchange.as_str(), first.routing_key.as_str()),
        ("", dead.as_str())
    );
    assert_eq!(first.properties.expiration(), &None);
    assert_eq!(
        headers(&first).get("x-first-death-reason"),
        Some(&long_string("expired"))
    );
    assert_death(
        &deaths(&first)[0],
        &delay,
        "expired",
        1,
        &[&delay],
        Some("100"),
    );
    let second = next_delivery(&mut consumer).await;
    assert_eq!(second.data, b"queue's");
    assert_death(&deaths(&second)[0], &delay, "expired", 1, &[&delay], None);
    assert_eq!(broker.queue_counts(&delay).await, Some((0, 0)));
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_message_dead_lettered_twice_lists_its_deaths_most_recent_first() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let (first, second, dead) = (
        broker.unique_name("first"),
        broker.unique_name("second"),
        broker.unique_name("dead"),
    );
    declare(&ch, &dead).await;
    let to = |target: &str| {
        args(
            &[
                ("x-dead-letter-exchange", ""),
                ("x-dead-letter-routing-key", target),
            ],
            None,
        )
    };
    declare_args(&ch, &second, to(&dead)).await;
    declare_args(&ch, &first, to(&second)).await;
    publish(&ch, &first, b"m").await;
    let m = get_eventually(&ch, &first, false).await;
    reject(&ch, m.delivery.delivery_tag, false).await;
    let m = get_eventually(&ch, &second, false).await;
    assert_eq!(deaths(&m.delivery).len(), 1);
    reject(&ch, m.delivery.delivery_tag, false).await;
    let d = get_eventually(&ch, &dead, true).await.delivery;
    let deaths = deaths(&d);
    assert_eq!(deaths.len(), 2);
    assert_death(&deaths[0], &second, "rejected", 1, &[&second], None);
    assert_death(&deaths[1], &first, "rejected", 1, &[&first], None);
    assert_eq!(
        headers(&d).get("x-first-death-queue"),
        Some(&long_string(&first))
    );
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_message_rejected_back_into_its_own_queue_counts_its_deaths() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("again");
    // Dead letters go through the default exchange with their own routing key: back here.
    // Rejections are a consumer's choice, so this is no cycle.
    declare_args(&ch, &q, args(&[("x-dead-letter-exchange", "")], None)).await;
    publish(&ch, &q, b"m").await;
    for count in 1..=2 {
        let m = get_eventually(&ch, &q, false).await;
        reject(&ch, m.delivery.delivery_tag, false).await;
        let again = get_eventually(&ch, &q, false).await;
        let deaths = deaths(&again.delivery);
        assert_eq!(deaths.len(), 1, "one entry per queue and reason");
        assert_death(&deaths[0], &q, "rejected", count, &[&q], None);
        reject(&ch, again.delivery.delivery_tag, true).await;
    }
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_message_that_would_expire_back_into_its_own_queue_goes_only_elsewhere() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    // Its dead letters fan out to itself and to `seen`: an expiry cycle through itself is
    // cut, the copy for `seen` is not.
    let dlx = broker.unique_name("dlx");
    declare_exchange(
        &ch,
        &dlx,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await;
    let q = broker.unique_name("cycle");
    let seen = broker.unique_name("seen");
    declare_args(&ch, &q, args(&[("x-dead-letter-exchange", &dlx)], Some(50))).await;
    declare(&ch, &seen).await;
    for name in [&q, &seen] {
        bind_queue(&ch, name, &dlx, "").await;
    }
    publish_confirmed(&ch, &q, b"m").await;
    let d = get_eventually(&ch, &seen, true).await.delivery;
    assert_death(&deaths(&d)[0], &q, "expired", 1, &[&q], None);
    let mut consumer = consume(&ch, &q, true).await;
    assert_no_delivery(&mut consumer, QUIET).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_message_left_at_the_head_by_a_get_is_dead_lettered_when_it_expires() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let dead = broker.unique_name("dead");
    declare(&ch, &dead).await;
    let mut consumer = consume(&ch, &dead, true).await;
    let q = broker.unique_name("head");
    let dl = [
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", dead.as_str()),
    ];
    declare_args(&ch, &q, args(&dl, None)).await;
    publish_confirmed(&ch, &q, b"lasting").await;
    publish_with(
        &ch,
        &q,
        b"brief",
        BasicProperties::default().with_expiration("300".into()),
    )
    .await;
    broker.wait_for_messages(&q, 2).await;
    // Taking the head leaves the expiring one there; nothing touches the queue after.
    assert_eq!(
        get_eventually(&ch, &q, true).await.delivery.data,
        b"lasting"
    );
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.data, b"brief");
    assert_death(&deaths(&d)[0], &q, "expired", 1, &[&q], Some("300"));
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_message_for_a_missing_dead_letter_exchange_is_dropped() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("nowhere");
    let missing = broker.unique_name("missing-dlx");
    declare_args(&ch, &q, args(&[("x-dead-letter-exchange", &missing)], None)).await;
    publish(&ch, &q, b"m").await;
    let m = get_eventually(&ch, &q, false).await;
    reject(&ch, m.delivery.delivery_tag, false).await;
    assert!(get(&ch, &q, true).await.is_none());
    assert!(ch.status().connected(), "nothing to tell the client");
    close_conn(&conn).await;
}

#[tokio::test]
async fn dead_letter_arguments_are_checked_as_rabbitmq_checks_them() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = broker.unique_name("bad-dlx");
    let resource = format!("queue '{q}' in vhost '/'");
    let cases: [(FieldTable, String); 3] = [
        (
            {
                let mut t = FieldTable::default();
                t.insert("x-dead-letter-exchange".into(), AMQPValue::LongInt(5));
                t
            },
            format!(
                "PRECONDITION_FAILED - invalid type 'signedint' for arg 'x-dead-letter-exchange' in {resource}"
            ),
        ),
        (
            args(&[("x-dead-letter-routing-key", "k")], None),
            format!(
                "PRECONDITION_FAILED - invalid arg 'x-dead-letter-routing-key' for {resource}: routing_key_but_no_dlx_defined"
            ),
        ),
        (
            {
                let mut t = args(&[("x-dead-letter-exchange", "dlx")], None);
                t.insert("x-dead-letter-routing-key".into(), AMQPValue::LongInt(7));
                t
            },
            format!(
                "PRECONDITION_FAILED - invalid arg 'x-dead-letter-routing-key' for {resource}: {{unacceptable_type,signedint}}"
            ),
        ),
    ];
    for (arguments, expected) in cases {
        let ch = channel(&conn).await;
        let err = expect_err(
            "a declare with bad dead-letter arguments",
            declare_with(&ch, &q, QueueDeclareOptions::default(), arguments).await,
        );
        assert_amqp_error(&err, 406, Some(&expected));
        assert_channel_closed_only(&conn, &ch).await;
    }
    close_conn(&conn).await;
}

/// A direct exchange `name` with default options, for a dead-letter exchange.
async fn declare_direct(ch: &lapin::Channel, name: &str) {
    declare_exchange(
        ch,
        name,
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await;
}

#[tokio::test]
async fn a_dead_letter_is_routed_with_the_bcc_keys_its_message_had() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let dlx = broker.unique_name("dlx-bcc");
    declare_direct(&ch, &dlx).await;
    let by_bcc = broker.unique_name("dead-by-bcc");
    declare(&ch, &by_bcc).await;
    bind_queue(&ch, &by_bcc, &dlx, "bcc-key").await;
    let work = broker.unique_name("work-bcc");
    declare_args(&ch, &work, args(&[("x-dead-letter-exchange", &dlx)], None)).await;
    let mut bcc_headers = FieldTable::default();
    let bcc = AMQPValue::FieldArray(FieldArray::from(vec![long_string("bcc-key")]));
    bcc_headers.insert("BCC".into(), bcc);
    let props = BasicProperties::default().with_headers(bcc_headers);
    publish_confirmed_with(&ch, "", &work, b"bcc", false, props).await;
    let m = get_eventually(&ch, &work, false).await;
    assert_eq!(
        headers(&m.delivery).get("BCC"),
        None,
        "BCC is removed on delivery"
    );
    reject(&ch, m.delivery.delivery_tag, false).await;

    // The header is gone, but the message remembers its BCC key: the dead letter goes there,
    // and x-death lists only its own key.
    let d = get_eventually(&ch, &by_bcc, true).await.delivery;
    assert_eq!(d.routing_key.as_str(), work.as_str());
    assert_eq!(headers(&d).get("BCC"), None);
    assert_death(&deaths(&d)[0], &work, "rejected", 1, &[&work], None);
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_dead_letter_is_routed_with_its_cc_keys_unless_its_queue_sets_a_routing_key() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let dlx = broker.unique_name("dlx-cc");
    declare_direct(&ch, &dlx).await;
    let by_cc = broker.unique_name("dead-by-cc");
    declare(&ch, &by_cc).await;
    bind_queue(&ch, &by_cc, &dlx, "cc-key").await;
    let by_key = broker.unique_name("dead-by-key");
    declare(&ch, &by_key).await;
    bind_queue(&ch, &by_key, &dlx, "parked").await;
    let plain = broker.unique_name("work-cc");
    declare_args(&ch, &plain, args(&[("x-dead-letter-exchange", &dlx)], None)).await;
    let keyed = broker.unique_name("work-cc-keyed");
    let keyed_args = args(
        &[
            ("x-dead-letter-exchange", &dlx),
            ("x-dead-letter-routing-key", "parked"),
        ],
        None,
    );
    declare_args(&ch, &keyed, keyed_args).await;
    let cc = AMQPValue::FieldArray(FieldArray::from(vec![long_string("cc-key")]));
    let mut cc_headers = FieldTable::default();
    cc_headers.insert("CC".into(), cc.clone());
    for queue in [&plain, &keyed] {
        let props = BasicProperties::default().with_headers(cc_headers.clone());
        publish_confirmed_with(&ch, "", queue, b"cc", false, props).await;
        let m = get_eventually(&ch, queue, false).await;
        reject(&ch, m.delivery.delivery_tag, false).await;
    }

    // Without a routing key of its queue's, its own key and its CC keys route it.
    let d = get_eventually(&ch, &by_cc, true).await.delivery;
    assert_eq!(d.routing_key.as_str(), plain.as_str());
    assert_eq!(headers(&d).get("CC"), Some(&cc), "CC stays");
    assert_death(
        &deaths(&d)[0],
        &plain,
        "rejected",
        1,
        &[&plain, "cc-key"],
        None,
    );
    // The queue's routing key replaces both, and CC goes; x-death still lists them.
    let d = get_eventually(&ch, &by_key, true).await.delivery;
    assert_eq!(d.routing_key.as_str(), "parked");
    assert_eq!(headers(&d).get("CC"), None, "CC removed");
    assert_death(
        &deaths(&d)[0],
        &keyed,
        "rejected",
        1,
        &[&keyed, "cc-key"],
        None,
    );
    assert!(get(&ch, &by_cc, true).await.is_none());
    assert!(get(&ch, &by_key, true).await.is_none());
    close_conn(&conn).await;
}
