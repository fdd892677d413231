//! Quorum queues (`x-queue-type: quorum`), as RabbitMQ 3.10 has them: declared durable only,
//! with the arguments of their type; a message the client requeues goes to the back, one its
//! closing channel releases to the front, each counting a delivery (`x-delivery-count`), and
//! past `x-delivery-limit` it is dead-lettered with reason `delivery_limit`; no global qos, no conditional delete. Quorum queues are durable, so every
//! test deletes its own (they would outlive it on RabbitMQ).

use lapin::{
    Channel,
    message::BasicGetMessage,
    options::{BasicNackOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use warren_broker::{ApplyTo, Overflow, Policy};
use warren_harness::TestBroker;
use warren_tests::{
    ErrorEvents, assert_amqp_error, assert_channel_closed_only, assert_connection_closed, channel,
    cleanup, close_channel, close_conn, confirm_channel, consume_prefetched, declare_with,
    delivery_count, drain_bodies, expect_err, get, long_string, next_delivery, publish_confirmed,
    publish_confirmed_to, within,
};

fn args(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert((*key).into(), value.clone());
    }
    table
}

fn quorum_args(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = args(extra);
    table.insert("x-queue-type".into(), long_string("quorum"));
    table
}

const DURABLE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

async fn declare_quorum(ch: &Channel, name: &str, extra: &[(&str, AMQPValue)]) {
    declare_with(ch, name, DURABLE, quorum_args(extra))
        .await
        .unwrap_or_else(|e| panic!("declare quorum queue {name}: {e}"));
}

fn body(m: &BasicGetMessage) -> String {
    String::from_utf8_lossy(&m.delivery.data).into_owned()
}

/// Takes every message left in `queue` with basic.get: body, redelivered flag and delivery
/// count.
async fn drain(ch: &Channel, queue: &str) -> Vec<(String, bool, Option<AMQPValue>)> {
    let mut rest = Vec::new();
    while let Some(m) = get(ch, queue, true).await {
        let count = delivery_count(&m.delivery.properties);
        rest.push((body(&m), m.delivery.redelivered, count));
    }
    rest
}

async fn nack(ch: &Channel, tag: u64) {
    within(
        "basic.nack",
        ch.basic_nack(
            tag,
            BasicNackOptions {
                multiple: false,
                requeue: true,
            },
        ),
    )
    .await
    .expect("basic.nack");
}

#[tokio::test]
async fn a_quorum_queue_must_be_durable_and_refuses_the_flags_and_arguments_rabbitmq_refuses() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let name = broker.unique_name("qq-declare");
    let resource = format!("queue '{name}' in vhost '/'");
    let plain = QueueDeclareOptions::default();
    let cases: Vec<(QueueDeclareOptions, FieldTable, String)> = vec![
        (
            plain,
            quorum_args(&[]),
            format!("invalid property 'non-durable' for {resource}"),
        ),
        (
            QueueDeclareOptions {
                exclusive: true,
                ..DURABLE
            },
            quorum_args(&[]),
            format!("invalid property 'exclusive-owner' for {resource}"),
        ),
        (
            QueueDeclareOptions {
                auto_delete: true,
                exclusive: true,
                ..DURABLE
            },
            quorum_args(&[]),
            format!("invalid property 'auto-delete' for {resource}"),
        ),
        (
            DURABLE,
            quorum_args(&[("x-max-priority", AMQPValue::LongInt(5))]),
            format!(
                "invalid arg 'x-max-priority' for {resource} of queue type rabbit_quorum_queue"
            ),
        ),
        (
            DURABLE,
            quorum_args(&[("x-dead-letter-strategy", long_string("sometimes"))]),
            format!("invalid arg 'x-dead-letter-strategy' for {resource}: invalid_dlx_strategy"),
        ),
        (
            plain,
            args(&[("x-delivery-limit", AMQPValue::LongInt(3))]),
            format!(
                "invalid arg 'x-delivery-limit' for {resource} of queue type rabbit_classic_queue"
            ),
        ),
        (
            DURABLE,
            args(&[("x-queue-type", long_string("Quorum"))]),
            format!(
                "invalid arg 'x-queue-type' for {resource}: \"unsupported queue type 'Quorum'\""
            ),
        ),
        (
            DURABLE,
            args(&[("x-queue-type", AMQPValue::LongInt(1))]),
            format!("invalid arg 'x-queue-type' for {resource}: {{unacceptable_type,signedint}}"),
        ),
    ];
    for (options, arguments, text) in cases {
        let ch = channel(&conn).await;
        let err = expect_err(
            "queue.declare",
            declare_with(&ch, &name, options, arguments).await,
        );
        assert_amqp_error(&err, 406, Some(&format!("PRECONDITION_FAILED - {text}")));
        assert_channel_closed_only(&conn, &ch).await;
    }
    // A server-named quorum queue is refused before anything else.
    let ch = channel(&conn).await;
    let err = expect_err(
        "queue.declare",
        declare_with(&ch, "", DURABLE, quorum_args(&[])).await,
    );
    assert_amqp_error(
        &err,
        406,
        Some(
            "PRECONDITION_FAILED - Cannot declare a server-named queue for type rabbit_quorum_queue",
        ),
    );

    // Declared right, it takes a redeclare with the same type only.
    let ch = channel(&conn).await;
    declare_quorum(&ch, &name, &[("x-delivery-limit", AMQPValue::LongInt(3))]).await;
    let limit = [("x-delivery-limit", AMQPValue::LongInt(3))];
    declare_quorum(&ch, &name, &limit).await;
    let err = expect_err(
        "queue.declare",
        declare_with(&ch, &name, DURABLE, args(&limit)).await,
    );
    let text = format!(
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for {resource}: received none but current is the value 'quorum' of type 'longstr'"
    );
    assert_amqp_error(&err, 406, Some(&text));
    // `x-queue-type: classic` is the same as none.
    let ch = channel(&conn).await;
    let classic = broker.unique_name("qq-declare-classic");
    declare_with(&ch, &classic, plain, FieldTable::default())
        .await
        .expect("declare classic");
    declare_with(
        &ch,
        &classic,
        plain,
        args(&[("x-queue-type", long_string("classic"))]),
    )
    .await
    .expect("redeclare with an explicit classic type");
    close_conn(&conn).await;
    cleanup(&broker, &[&name, &classic]).await;
}

#[tokio::test]
async fn a_returned_message_goes_to_the_back_and_counts_a_delivery() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let queue = broker.unique_name("qq-returns");
    declare_quorum(&ch, &queue, &[]).await;
    for b in ["1", "2", "3", "4", "5"] {
        publish_confirmed(&ch, &queue, b.as_bytes()).await;
    }
    let mut taken = Vec::new();
    for _ in 0..3 {
        let m = get(&ch, &queue, false).await.expect("a message");
        // basic.get always carries the count, 0 the first time.
        assert_eq!(
            delivery_count(&m.delivery.properties),
            Some(AMQPValue::LongLongInt(0))
        );
        taken.push(m);
    }
    // Returned 3 then 1: they go behind 4 and 5, in the order they came back.
    nack(&ch, taken[2].delivery.delivery_tag).await;
    nack(&ch, taken[0].delivery.delivery_tag).await;
    let rest = drain(&ch, &queue).await;
    let one = Some(AMQPValue::LongLongInt(1));
    let zero = Some(AMQPValue::LongLongInt(0));
    assert_eq!(
        rest,
        [
            ("4".to_owned(), false, zero.clone()),
            ("5".to_owned(), false, zero),
            ("3".to_owned(), true, one.clone()),
            ("1".to_owned(), true, one),
        ]
    );
    close_conn(&conn).await;
    cleanup(&broker, &[&queue]).await;
}

#[tokio::test]
async fn a_closing_channel_s_unacked_messages_go_to_the_front_in_the_order_released() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let admin = confirm_channel(&conn).await;
    let queue = broker.unique_name("qq-release");
    declare_quorum(&admin, &queue, &[]).await;
    for b in ["1", "2", "3", "4", "5"] {
        publish_confirmed(&admin, &queue, b.as_bytes()).await;
    }
    let first = channel(&conn).await;
    let second = channel(&conn).await;
    assert_eq!(body(&get(&first, &queue, false).await.expect("1")), "1");
    assert_eq!(body(&get(&second, &queue, false).await.expect("2")), "2");
    // The second closes first: its message goes back first, both ahead of 3, 4 and 5.
    close_channel(&second).await;
    close_channel(&first).await;
    let rest: Vec<_> = drain(&admin, &queue)
        .await
        .into_iter()
        .map(|(body, _, count)| (body, count))
        .collect();
    let count = |n| Some(AMQPValue::LongLongInt(n));
    assert_eq!(
        rest,
        [
            ("2".to_owned(), count(1)),
            ("1".to_owned(), count(1)),
            ("3".to_owned(), count(0)),
            ("4".to_owned(), count(0)),
            ("5".to_owned(), count(0)),
        ]
    );
    close_conn(&conn).await;
    cleanup(&broker, &[&queue]).await;
}

#[tokio::test]
async fn a_consumer_sees_the_delivery_count_from_its_first_redelivery() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let admin = confirm_channel(&conn).await;
    let queue = broker.unique_name("qq-count");
    declare_quorum(&admin, &queue, &[]).await;
    publish_confirmed(&admin, &queue, b"job").await;
    let (ch, mut consumer) = consume_prefetched(&conn, &queue, 1, None).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let d = next_delivery(&mut consumer).await;
        seen.push((d.redelivered, delivery_count(&d.properties)));
        nack(&ch, d.delivery_tag).await;
    }
    assert_eq!(
        seen,
        [
            (false, None),
            (true, Some(AMQPValue::LongLongInt(1))),
            (true, Some(AMQPValue::LongLongInt(2))),
        ]
    );
    close_conn(&conn).await;
    cleanup(&broker, &[&queue]).await;
}

#[tokio::test]
async fn past_its_delivery_limit_a_message_is_dead_lettered_with_reason_delivery_limit() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let queue = broker.unique_name("qq-limit");
    let parked = broker.unique_name("qq-limit-parked");
    declare_with(
        &ch,
        &parked,
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare the dead-letter queue");
    declare_quorum(
        &ch,
        &queue,
        &[
            ("x-delivery-limit", AMQPValue::LongInt(1)),
            ("x-dead-letter-exchange", long_string("")),
            ("x-dead-letter-routing-key", long_string(&parked)),
        ],
    )
    .await;
    publish_confirmed(&ch, &queue, b"poison").await;
    // Delivered twice (counts 0 and 1); the second return is past the limit.
    for _ in 0..2 {
        let m = get(&ch, &queue, false).await.expect("the message");
        nack(&ch, m.delivery.delivery_tag).await;
    }
    let dead = warren_tests::get_eventually(&ch, &parked, true).await;
    assert_eq!(dead.delivery.data, b"poison");
    assert!(get(&ch, &queue, true).await.is_none(), "it left the queue");
    let headers = dead.delivery.properties.headers().clone().expect("headers");
    let headers = headers.inner();
    assert_eq!(
        headers.get("x-first-death-reason"),
        Some(&long_string("delivery_limit"))
    );
    assert_eq!(
        headers.get("x-first-death-queue"),
        Some(&long_string(&queue))
    );
    assert!(
        !headers.contains_key("x-delivery-count"),
        "the count belongs to deliveries, not to the dead letter: {headers:?}"
    );
    let Some(AMQPValue::FieldArray(deaths)) = headers.get("x-death") else {
        panic!("no x-death: {headers:?}");
    };
    let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
        panic!("an x-death entry that is not a table");
    };
    assert_eq!(
        death.inner().get("reason"),
        Some(&long_string("delivery_limit"))
    );
    assert_eq!(death.inner().get("count"), Some(&AMQPValue::LongLongInt(1)));
    close_conn(&conn).await;
    cleanup(&broker, &[&queue, &parked]).await;
}

#[tokio::test]
async fn a_quorum_queue_refuses_global_qos_consumers_and_conditional_deletes_with_540() {
    let broker = TestBroker::start().await;
    let queue = broker.unique_name("qq-540");
    let resource = format!("queue '{queue}' in vhost '/'");
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare_quorum(&ch, &queue, &[]).await;
    within(
        "basic.qos",
        ch.basic_qos(3, BasicQosOptions { global: true }),
    )
    .await
    .expect("basic.qos global");
    let mut events = ErrorEvents::new(&conn);
    let _ = within(
        "basic.consume",
        ch.basic_consume(
            queue.as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let err = events.next_error().await;
    let text = format!("NOT_IMPLEMENTED - {resource} does not support global qos");
    assert_amqp_error(&err, 540, Some(&text));
    assert_connection_closed(&conn).await;

    for (options, flag) in [
        (
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
            "if-unused",
        ),
        (
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
            "if-empty",
        ),
    ] {
        let conn = broker.connect().await;
        let ch = channel(&conn).await;
        let mut events = ErrorEvents::new(&conn);
        let _ = within(
            "queue.delete",
            ch.queue_delete(queue.as_str().into(), options),
        )
        .await;
        let err = events.next_error().await;
        let text = format!(
            "NOT_IMPLEMENTED - cannot delete {resource}. queue.delete operations with {flag} flag set are not supported by quorum queues"
        );
        assert_amqp_error(&err, 540, Some(&text));
        assert_connection_closed(&conn).await;
    }
    cleanup(&broker, &[&queue]).await;
}

#[tokio::test]
async fn a_quorum_queue_refuses_publishes_once_over_its_limit_and_takes_dlx_overflow_as_drop_head()
{
    let broker = TestBroker::start().await;
    let by_argument = broker.unique_name("qq-reject");
    let by_policy = broker.unique_name("qq-reject-policy");
    let dlx = broker.unique_name("qq-reject-dlx");
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let limit = ("x-max-length", AMQPValue::LongInt(2));
    let overflow = |name: &str| ("x-overflow", long_string(name));
    declare_quorum(
        &ch,
        &by_argument,
        &[limit.clone(), overflow("reject-publish")],
    )
    .await;
    declare_quorum(&ch, &dlx, &[limit.clone(), overflow("reject-publish-dlx")]).await;
    // A quorum queue takes the policy's overflow over its argument's.
    let policy = Policy::new(&by_policy, format!("^{by_policy}$"))
        .vhost(broker.vhost())
        .apply_to(ApplyTo::Queues)
        .overflow(Overflow::RejectPublish);
    broker.set_policy(&policy).await.expect("set_policy");
    declare_quorum(&ch, &by_policy, &[limit.clone(), overflow("drop-head")]).await;

    // It refuses a publish only once it is over its limit: it holds one more.
    for queue in [&by_argument, &by_policy] {
        let mut acked = Vec::new();
        for _ in 0..4 {
            let confirmation = publish_confirmed_to(&ch, "", queue, b"m", false).await;
            acked.push(confirmation.is_ack());
        }
        assert_eq!(acked, [true, true, true, false], "{queue}");
        broker.wait_for_messages(queue, 3).await;
    }
    // reject-publish-dlx is drop-head in a quorum queue.
    for body in ["0", "1", "2"] {
        publish_confirmed(&ch, &dlx, body.as_bytes()).await;
    }
    assert_eq!(drain_bodies(&ch, &dlx).await, [b"1", b"2"]);
    close_conn(&conn).await;
    cleanup(&broker, &[&by_argument, &by_policy, &dlx]).await;
}

#[tokio::test]
async fn a_reject_publish_policy_keeps_what_a_quorum_queue_holds_over_its_new_limit() {
    let broker = TestBroker::start().await;
    let q = broker.unique_name("qq-new-limit");
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    declare_quorum(&ch, &q, &[]).await;
    for body in ["0", "1", "2", "3", "4"] {
        publish_confirmed(&ch, &q, body.as_bytes()).await;
    }
    // Unlike a classic queue, which would drop 3 under the drop-head it had until then.
    let policy = Policy::new(&q, format!("^{q}$"))
        .vhost(broker.vhost())
        .apply_to(ApplyTo::Queues)
        .max_length(2)
        .overflow(Overflow::RejectPublish);
    broker.set_policy(&policy).await.expect("set_policy");
    // RabbitMQ applies it a moment later: publishes are taken until it does.
    let mut taken = 0;
    warren_harness::wait_until("a publish refused", warren_tests::TIMEOUT, async || {
        if publish_confirmed_to(&ch, "", &q, b"late", false)
            .await
            .is_ack()
        {
            taken += 1;
            Err("taken".to_owned())
        } else {
            Ok(())
        }
    })
    .await;
    let bodies = drain_bodies(&ch, &q).await;
    assert_eq!(bodies.len(), 5 + taken, "{bodies:?}");
    assert_eq!(bodies[..5], [b"0", b"1", b"2", b"3", b"4"]);
    close_conn(&conn).await;
    cleanup(&broker, &[&q]).await;
}
