//! Policies (`rabbitmqctl set_policy`; `TestBroker::set_policy` on both targets): they govern
//! queues and exchanges declared without arguments, take effect on existing ones at once and
//! end when cleared; the highest priority applies alone; with a declaration argument, the
//! smaller limit wins and the argument's exchange and overflow win, as in RabbitMQ 3.10.
//! Policies a test leaves are cleared when its `TestBroker` drops.

use lapin::{
    Confirmation, ExchangeKind,
    options::{BasicNackOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use warren_broker::{ApplyTo, Overflow, Policy, PolicyError};
use warren_harness::TestBroker;
use warren_tests::{
    bind_queue, close_conn, confirm_channel, declare, declare_args, declare_exchange, declare_with,
    drain_bodies, get, get_eventually, long_string, publish_confirmed, publish_confirmed_to,
    until_gone, within,
};

/// A policy for queues named exactly `queue` (tests share an external broker), in the vhost
/// the test runs in.
fn queue_policy(broker: &TestBroker, name: &str, queue: &str) -> Policy {
    Policy::new(name, format!("^{queue}$"))
        .vhost(broker.vhost())
        .apply_to(ApplyTo::Queues)
}

#[tokio::test]
async fn a_length_policy_trims_an_existing_queue_at_once_and_ends_when_cleared() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("pol-len");
    declare(&ch, &q).await;
    for body in ["0", "1", "2", "3", "4"] {
        publish_confirmed(&ch, &q, body.as_bytes()).await;
    }

    let policy = queue_policy(&broker, &q, &q).max_length(2);
    broker.set_policy(&policy).await.expect("set_policy");
    broker.wait_for_messages(&q, 2).await;
    if let Some(handle) = broker.embedded() {
        assert_eq!(
            handle.queue(&q).unwrap().policy.as_deref(),
            Some(q.as_str())
        );
        assert_eq!(handle.policies(), vec![policy.clone()]);
    }
    // The head went: the newest two are left, and a publish still drops the head.
    publish_confirmed(&ch, &q, b"5").await;
    assert_eq!(drain_bodies(&ch, &q).await, [b"4", b"5"]);

    broker
        .clear_policy(&broker.vhost(), &q)
        .await
        .expect("clear_policy");
    for body in ["6", "7", "8"] {
        publish_confirmed(&ch, &q, body.as_bytes()).await;
    }
    broker.wait_for_messages(&q, 3).await;
    if let Some(handle) = broker.embedded() {
        assert_eq!(handle.queue(&q).unwrap().policy, None);
    }
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_dead_letter_and_ttl_policy_governs_a_queue_declared_without_arguments() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("pol-work");
    let dlq = broker.unique_name("pol-dead");
    // As an operator would: the policy first, then the service declares its queue plainly.
    let policy = queue_policy(&broker, &q, &q)
        .message_ttl(50)
        .dead_letter_exchange("")
        .dead_letter_routing_key(&dlq);
    broker.set_policy(&policy).await.expect("set_policy");
    declare(&ch, &q).await;
    declare(&ch, &dlq).await;

    publish_confirmed(&ch, &q, b"late").await;
    let dead = get_eventually(&ch, &dlq, true).await.delivery;
    assert_eq!(dead.data, b"late");
    let headers = dead.properties.headers().clone().unwrap_or_default();
    assert_eq!(
        headers.inner().get("x-first-death-reason"),
        Some(&long_string("expired"))
    );
    assert_eq!(
        headers.inner().get("x-first-death-queue"),
        Some(&long_string(&q))
    );
    assert_eq!(get(&ch, &q, true).await.map(|m| m.delivery.data), None);
    close_conn(&conn).await;
}

#[tokio::test]
async fn an_expires_policy_deletes_an_unused_existing_queue() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("pol-exp");
    declare(&ch, &q).await;
    broker
        .set_policy(&queue_policy(&broker, &q, &q).expires(100))
        .await
        .expect("set_policy");
    until_gone(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn arguments_and_a_policy_combine_key_by_key() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("pol-mix");
    let dlq = broker.unique_name("pol-mix-dead");
    declare(&ch, &dlq).await;
    // The argument sets a dead-letter exchange and no routing key, the policy both: the
    // argument's exchange wins, the policy's routing key is used. The smaller length wins.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(4));
    args.insert("x-dead-letter-exchange".into(), long_string(""));
    declare_args(&ch, &q, args).await;
    let policy = queue_policy(&broker, &q, &q)
        .max_length(2)
        .dead_letter_exchange(broker.unique_name("pol-no-such-exchange"))
        .dead_letter_routing_key(&dlq);
    broker.set_policy(&policy).await.expect("set_policy");
    for body in ["0", "1", "2", "3", "4"] {
        publish_confirmed(&ch, &q, body.as_bytes()).await;
    }
    broker.wait_for_messages(&dlq, 3).await;
    assert_eq!(drain_bodies(&ch, &q).await, [b"3", b"4"]);
    assert_eq!(drain_bodies(&ch, &dlq).await, [b"0", b"1", b"2"]);
    close_conn(&conn).await;
}

#[tokio::test]
async fn the_policy_of_highest_priority_applies_alone() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("pol-prio");
    let low = format!("{q}-low");
    let high = format!("{q}-high");
    broker
        .set_policy(&queue_policy(&broker, &low, &q).priority(1).max_length(1))
        .await
        .expect("set_policy low");
    broker
        .set_policy(
            &queue_policy(&broker, &high, &q)
                .priority(5)
                .message_ttl(600_000),
        )
        .await
        .expect("set_policy high");
    declare(&ch, &q).await;
    for body in ["0", "1", "2"] {
        publish_confirmed(&ch, &q, body.as_bytes()).await;
    }
    // Only the high one applies: no length limit.
    broker.wait_for_messages(&q, 3).await;
    // Without it, the low one does, at once.
    broker
        .clear_policy(&broker.vhost(), &high)
        .await
        .expect("clear high");
    broker.wait_for_messages(&q, 1).await;
    assert_eq!(drain_bodies(&ch, &q).await, [b"2"]);
    broker
        .clear_policy(&broker.vhost(), &low)
        .await
        .expect("clear low");
    close_conn(&conn).await;
}

#[tokio::test]
async fn an_alternate_exchange_policy_applies_to_exchanges_and_yields_to_the_argument() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let main = broker.unique_name("pol-x");
    let own = broker.unique_name("pol-x-own");
    let ae = broker.unique_name("pol-ae");
    let own_ae = broker.unique_name("pol-ae-own");
    let caught = broker.unique_name("pol-caught");
    let caught_own = broker.unique_name("pol-caught-own");
    for (exchange, queue) in [(&ae, &caught), (&own_ae, &caught_own)] {
        declare_exchange(
            &ch,
            exchange,
            ExchangeKind::Fanout,
            Default::default(),
            FieldTable::default(),
        )
        .await;
        declare(&ch, queue).await;
        bind_queue(&ch, queue, exchange, "").await;
    }
    declare_exchange(
        &ch,
        &main,
        ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await;
    let mut args = FieldTable::default();
    args.insert("alternate-exchange".into(), long_string(&own_ae));
    declare_exchange(&ch, &own, ExchangeKind::Direct, Default::default(), args).await;
    let returned = |c: &Confirmation| matches!(c, Confirmation::Ack(Some(_)));

    // A policy for queues does not reach exchanges: the mandatory publish comes back.
    let pattern = format!("^({main}|{own})$");
    let for_queues = Policy::new(&main, &pattern)
        .vhost(broker.vhost())
        .apply_to(ApplyTo::Queues)
        .alternate_exchange(&ae);
    broker.set_policy(&for_queues).await.expect("set_policy");
    let c = publish_confirmed_to(&ch, &main, "nowhere", b"0", true).await;
    assert!(returned(&c), "{c:?}");

    broker
        .set_policy(&for_queues.clone().apply_to(ApplyTo::Exchanges))
        .await
        .expect("set_policy");
    let c = publish_confirmed_to(&ch, &main, "nowhere", b"1", true).await;
    assert!(
        !returned(&c),
        "routed by the policy's alternate exchange: {c:?}"
    );
    let c = publish_confirmed_to(&ch, &own, "nowhere", b"2", true).await;
    assert!(
        !returned(&c),
        "routed by the argument's alternate exchange: {c:?}"
    );
    assert_eq!(get_eventually(&ch, &caught, true).await.delivery.data, b"1");
    assert_eq!(
        get_eventually(&ch, &caught_own, true).await.delivery.data,
        b"2"
    );
    assert_eq!(get(&ch, &caught, true).await.map(|m| m.delivery.data), None);
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_delivery_limit_policy_lowers_a_quorum_queues_own() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("pol-qq");
    broker
        .set_policy(&queue_policy(&broker, &q, &q).delivery_limit(1))
        .await
        .expect("set_policy");
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(5));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    declare_with(&ch, &q, durable, args)
        .await
        .expect("quorum queue.declare");
    publish_confirmed(&ch, &q, b"poison").await;
    // Returned once (one delivery counted: within the limit of 1), then once more: dropped.
    for _ in 0..2 {
        let m = get_eventually(&ch, &q, false).await;
        within(
            "basic.nack",
            ch.basic_nack(
                m.delivery.delivery_tag,
                BasicNackOptions {
                    requeue: true,
                    multiple: false,
                },
            ),
        )
        .await
        .expect("nack");
    }
    broker.wait_for_messages(&q, 0).await;
    assert_eq!(get(&ch, &q, false).await.map(|m| m.delivery.data), None);
    close_conn(&conn).await;
}

#[tokio::test]
async fn invalid_policies_are_refused() {
    let broker = TestBroker::start().await;
    let q = broker.unique_name("pol-bad");
    let refused = |r: Result<(), PolicyError>| r.expect_err("refused");
    assert!(matches!(
        refused(
            broker
                .set_policy(&queue_policy(&broker, &q, &q).expires(0))
                .await
        ),
        PolicyError::InvalidDefinition(_)
    ));
    assert!(matches!(
        refused(broker.set_policy(&queue_policy(&broker, &q, &q)).await),
        PolicyError::InvalidDefinition(_)
    ));
    assert!(matches!(
        refused(
            broker
                .set_policy(&Policy::new(&q, "(unclosed").max_length(1))
                .await
        ),
        PolicyError::InvalidPattern(_)
    ));
    assert_eq!(
        refused(broker.clear_policy(&broker.vhost(), &q).await),
        PolicyError::NotFound
    );
}

#[tokio::test]
async fn a_new_limit_trims_under_the_overflow_the_queue_had_until_then() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("pol-trim");
    declare(&ch, &q).await;
    for body in ["0", "1", "2", "3", "4"] {
        publish_confirmed(&ch, &q, body.as_bytes()).await;
    }
    // The queue dropped its head until now, so the new limit drops it at once, though the
    // policy's own overflow refuses publishes from now on.
    let policy = queue_policy(&broker, &q, &q)
        .max_length(2)
        .overflow(Overflow::RejectPublish);
    broker.set_policy(&policy).await.expect("set_policy");
    broker.wait_for_messages(&q, 2).await;
    let refused = publish_confirmed_to(&ch, "", &q, b"5", false).await;
    assert!(refused.is_nack(), "{refused:?}");
    assert_eq!(drain_bodies(&ch, &q).await, [b"3", b"4"]);
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_new_drop_head_overflow_trims_at_once_and_a_new_dlx_overflow_does_not() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let (to_drop, to_dlx) = (broker.unique_name("pol-hd"), broker.unique_name("pol-dlx"));
    let dlq = broker.unique_name("pol-dlx-dead");
    declare(&ch, &dlq).await;
    declare(&ch, &to_drop).await;
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), long_string(""));
    args.insert("x-dead-letter-routing-key".into(), long_string(&dlq));
    declare_args(&ch, &to_dlx, args).await;
    for q in [&to_drop, &to_dlx] {
        let refusing = queue_policy(&broker, q, q)
            .max_length(5)
            .overflow(Overflow::RejectPublish);
        broker.set_policy(&refusing).await.expect("set_policy");
        for body in ["0", "1", "2", "3", "4"] {
            publish_confirmed(&ch, q, body.as_bytes()).await;
        }
    }
    // No overflow in the new policy: drop-head, which drops the head over the limit at once.
    let dropping = queue_policy(&broker, &to_drop, &to_drop).max_length(2);
    broker.set_policy(&dropping).await.expect("set_policy");
    broker.wait_for_messages(&to_drop, 2).await;
    assert_eq!(drain_bodies(&ch, &to_drop).await, [b"3", b"4"]);
    // reject-publish-dlx keeps what is there and dead-letters what it refuses from now on.
    let dead_lettering = queue_policy(&broker, &to_dlx, &to_dlx)
        .max_length(2)
        .overflow(Overflow::RejectPublishDlx);
    broker
        .set_policy(&dead_lettering)
        .await
        .expect("set_policy");
    warren_harness::wait_until(
        "a refused publish dead-lettered",
        warren_tests::TIMEOUT,
        async || {
            let refused = publish_confirmed_to(&ch, "", &to_dlx, b"5", false).await;
            assert!(refused.is_nack(), "{refused:?}");
            get(&ch, &dlq, true)
                .await
                .map(|_| ())
                .ok_or_else(|| "nothing dead-lettered yet".to_owned())
        },
    )
    .await;
    assert_eq!(
        drain_bodies(&ch, &to_dlx).await,
        [b"0", b"1", b"2", b"3", b"4"]
    );
    close_conn(&conn).await;
}

#[tokio::test]
async fn keys_without_effect_on_one_node_are_taken_beside_those_that_act() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("pol-inert");
    declare(&ch, &q).await;
    // As a definitions export of a mirrored, lazy-queue RabbitMQ carries them.
    let policy = Policy::from_json(
        &serde_json::json!({
            "name": q, "pattern": format!("^{q}$"), "apply-to": "queues",
            "vhost": broker.vhost(),
            "definition": {"ha-mode": "all", "ha-sync-mode": "automatic",
                           "queue-mode": "lazy", "max-length": 1},
        })
        .to_string(),
    )
    .expect("from_json");
    assert_eq!(policy.definition.inert.len(), 3, "{policy:?}");
    broker.set_policy(&policy).await.expect("set_policy");
    for body in ["0", "1"] {
        publish_confirmed(&ch, &q, body.as_bytes()).await;
    }
    broker.wait_for_messages(&q, 1).await;
    assert_eq!(drain_bodies(&ch, &q).await, [b"1"]);
    close_conn(&conn).await;
}

/// Patterns are PCRE's, as RabbitMQ's: look-around and back-references work (as in the common
/// `^(?!amq\.).*`: every name but the `amq.` ones).
#[tokio::test]
async fn patterns_may_look_around_and_refer_back() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let p = broker.unique_name("pol-pcre");
    // `skip-skip` would match the back-reference but for the look-ahead; `ab-cd` is no
    // repeat. (Unique names of their own, which the harness deletes whatever happens.)
    let name = |suffix: &str| broker.unique_name(&format!("{p}-{suffix}"));
    let (kept, twice, skipped, differ) = (
        name("kept"),
        name("ab-ab"),
        name("skip-skip"),
        name("ab-cd"),
    );
    let queues = [&kept, &twice, &skipped, &differ];
    for q in queues {
        declare(&ch, q).await;
        for body in ["0", "1", "2"] {
            publish_confirmed(&ch, q, body.as_bytes()).await;
        }
    }
    let policy = Policy::new(&p, format!(r"^{p}-(?!skip)(?:(\w+)-\1-|kept-)"))
        .vhost(broker.vhost())
        .apply_to(ApplyTo::Queues)
        .max_length(1);
    broker.set_policy(&policy).await.expect("set_policy");
    // The two queues it matches are trimmed to their newest message; the others keep all.
    broker.wait_for_messages(&kept, 1).await;
    broker.wait_for_messages(&twice, 1).await;
    for q in queues {
        publish_confirmed(&ch, q, b"3").await;
    }
    assert_eq!(drain_bodies(&ch, &kept).await, [b"3"]);
    assert_eq!(drain_bodies(&ch, &twice).await, [b"3"]);
    for q in [&skipped, &differ] {
        assert_eq!(drain_bodies(&ch, q).await, [b"0", b"1", b"2", b"3"], "{q}");
    }
    if let Some(handle) = broker.embedded() {
        assert_eq!(handle.queue(&skipped).unwrap().policy, None);
        assert_eq!(
            handle.queue(&twice).unwrap().policy.as_deref(),
            Some(p.as_str())
        );
    }
    broker
        .clear_policy(&broker.vhost(), &p)
        .await
        .expect("clear_policy");
    close_conn(&conn).await;
}
