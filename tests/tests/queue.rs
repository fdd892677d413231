//! queue.declare (named, server-named, passive, durable, exclusive, auto_delete, arguments,
//! reserved names), queue.delete (if_unused, if_empty), queue.purge, the empty-name shortcut,
//! server-side basic.cancel on delete, and the nowait forms — through lapin.

use lapin::{
    Connection,
    options::{
        BasicCancelOptions, BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions,
        QueuePurgeOptions,
    },
    types::{AMQPValue, FieldTable},
};
use std::time::Duration;
use warren_harness::{TestBroker, wait_until};
use warren_tests::{
    ErrorEvents, TIMEOUT, assert_amqp_error, assert_channel_closed_only, channel, cleanup,
    close_conn, confirm_channel, consume, declare, declare_with, delete_quietly, expect_err, get,
    get_eventually, next_delivery, passive, publish, publish_confirmed, within,
};

fn locked_text(q: &str) -> String {
    format!(
        "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{q}' in vhost '/'. \
         It could be originally declared on another connection or the exclusive property \
         value does not match that of the original declaration."
    )
}

fn no_queue_text(q: &str) -> String {
    format!("NOT_FOUND - no queue '{q}' in vhost '/'")
}

fn ttl_args(ttl: i32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl));
    args
}

/// Waits until `q` no longer exists (passive declare answers 404), opening a channel per try.
async fn wait_queue_gone(conn: &Connection, q: &str) {
    wait_until(&format!("queue {q} is deleted"), TIMEOUT, async || {
        let ch = channel(conn).await;
        match passive(&ch, q).await {
            Err(e) => {
                assert_amqp_error(&e, 404, Some(&no_queue_text(q)));
                Ok(())
            }
            Ok(_) => {
                let _ = ch.close(200, "OK".into()).await;
                Err("it still exists".into())
            }
        }
    })
    .await;
}

#[tokio::test]
async fn declare_ok_carries_ready_message_and_consumer_counts() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let q = broker.unique_name("counts");
    let first = declare(&ch, &q).await;
    assert_eq!(first.name().as_str(), q);
    assert_eq!((first.message_count(), first.consumer_count()), (0, 0));
    for i in 0..3u8 {
        publish_confirmed(&ch, &q, &[i]).await;
    }
    let again = declare(&ch, &q).await;
    assert_eq!((again.message_count(), again.consumer_count()), (3, 0));

    // One consumer holding one unacked message: 2 ready, 1 consumer.
    let cch = channel(&conn).await;
    within("basic.qos", cch.basic_qos(1, Default::default()))
        .await
        .expect("qos");
    let mut consumer = consume(&cch, &q, false).await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.data, [0]);
    let counted = passive(&ch, &q).await.expect("passive declare");
    assert_eq!((counted.message_count(), counted.consumer_count()), (2, 1));
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn server_named_queues_are_amq_gen_and_unique() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let a = declare(&ch, "").await;
    let b = declare(&ch, "").await;
    for q in [&a, &b] {
        let name = q.name().as_str();
        let suffix = name
            .strip_prefix("amq.gen-")
            .unwrap_or_else(|| panic!("server-named queue {name:?} must start with amq.gen-"));
        assert!(
            suffix.len() >= 16
                && suffix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "server-named queue {name:?}: expected a long url-safe random suffix"
        );
        assert_eq!((q.message_count(), q.consumer_count()), (0, 0));
    }
    assert_ne!(a.name(), b.name());
    delete_quietly(&ch, a.name().as_str()).await;
    delete_quietly(&ch, b.name().as_str()).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn empty_name_means_the_channels_last_declared_queue() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let named = declare_with(
        &ch,
        "",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare server-named");
    let name = named.name().as_str().to_owned();
    publish(&ch, &name, b"one").await;
    publish(&ch, &name, b"two").await;
    let purged = within(
        "purge",
        ch.queue_purge("".into(), QueuePurgeOptions::default()),
    )
    .await
    .expect("purge of the last declared queue");
    assert_eq!(purged, 2);

    publish(&ch, &name, b"three").await;
    let got = get(&ch, "", true)
        .await
        .expect("get from the last declared queue");
    assert_eq!(got.delivery.data, b"three");
    assert_eq!(got.delivery.routing_key.as_str(), name);

    publish(&ch, &name, b"four").await;
    let mut consumer = consume(&ch, "", true).await;
    assert_eq!(consumer.queue().as_str(), "");
    assert_eq!(next_delivery(&mut consumer).await.data, b"four");
    within(
        "cancel",
        ch.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
    )
    .await
    .expect("cancel");

    publish(&ch, &name, b"five").await;
    let deleted = within(
        "delete",
        ch.queue_delete("".into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("delete of the last declared queue");
    assert_eq!(deleted, 1);
    let probe = channel(&conn).await;
    let err = expect_err("passive after delete", passive(&probe, &name).await);
    assert_amqp_error(&err, 404, Some(&no_queue_text(&name)));
    close_conn(&conn).await;
}

#[tokio::test]
async fn empty_name_on_a_channel_that_declared_nothing_is_404() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let declaring = channel(&conn).await;
    // A queue declared on another channel does not count.
    let other = declare(&declaring, "").await;

    let ch = channel(&conn).await;
    let err = expect_err(
        "purge \"\"",
        within(
            "purge",
            ch.queue_purge("".into(), QueuePurgeOptions::default()),
        )
        .await,
    );
    assert_amqp_error(&err, 404, Some("NOT_FOUND - no previously declared queue"));
    assert_channel_closed_only(&conn, &ch).await;

    let ch = channel(&conn).await;
    let err = expect_err(
        "consume \"\"",
        within(
            "consume",
            ch.basic_consume(
                "".into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await,
    );
    assert_amqp_error(&err, 404, Some("NOT_FOUND - no previously declared queue"));
    assert_channel_closed_only(&conn, &ch).await;

    let ch = channel(&conn).await;
    let err = expect_err(
        "delete \"\"",
        within(
            "delete",
            ch.queue_delete("".into(), QueueDeleteOptions::default()),
        )
        .await,
    );
    assert_amqp_error(&err, 404, Some("NOT_FOUND - no previously declared queue"));
    assert_channel_closed_only(&conn, &ch).await;

    // Passive declare of "" never uses the shortcut, even right after a declare.
    let ch = channel(&conn).await;
    let last = declare(&ch, "").await;
    let err = expect_err("passive \"\"", passive(&ch, "").await);
    assert_amqp_error(&err, 404, Some("NOT_FOUND - no queue '' in vhost '/'"));
    assert_channel_closed_only(&conn, &ch).await;

    delete_quietly(&declaring, last.name().as_str()).await;
    delete_quietly(&declaring, other.name().as_str()).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn passive_declare_of_a_missing_queue_is_404_on_the_channel_only() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("missing");
    let err = expect_err("passive declare", passive(&ch, &q).await);
    assert_amqp_error(&err, 404, Some(&no_queue_text(&q)));
    assert_channel_closed_only(&conn, &ch).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn passive_declare_reports_counts_and_ignores_the_other_fields() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("passive");
    declare(&ch, &q).await;
    let pub_ch = confirm_channel(&conn).await;
    publish_confirmed(&pub_ch, &q, b"x").await;
    // RabbitMQ's counts may lag a confirm by a moment under load: wait for the count first.
    broker.wait_for_messages(&q, 1).await;
    let p = passive(&ch, &q).await.expect("passive");
    assert_eq!((p.message_count(), p.consumer_count()), (1, 0));
    // durable / arguments differ from the queue's, but passive does not compare them.
    let p = declare_with(
        &ch,
        &q,
        QueueDeclareOptions {
            passive: true,
            durable: true,
            auto_delete: true,
            ..Default::default()
        },
        ttl_args(5),
    )
    .await
    .expect("passive with other flags");
    assert_eq!(p.message_count(), 1);
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn durable_queues_are_accepted_and_compared() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("durable");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    declare_with(&ch, &q, durable, FieldTable::default())
        .await
        .expect("durable declare");
    declare_with(&ch, &q, durable, FieldTable::default())
        .await
        .expect("equivalent durable redeclare");
    let err = expect_err(
        "non-durable redeclare",
        declare_with(
            &ch,
            &q,
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_amqp_error(
        &err,
        406,
        Some(&format!(
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{q}' in vhost '/': \
             received 'false' but current is 'true'"
        )),
    );
    assert_channel_closed_only(&conn, &ch).await;
    cleanup(&broker, &[&q]).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn inequivalent_redeclare_is_406_with_rabbitmq_texts() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = broker.unique_name("inequivalent");
    let qt = broker.unique_name("inequivalent-ttl");
    let setup = channel(&conn).await;
    declare(&setup, &q).await;
    declare_with(&setup, &qt, QueueDeclareOptions::default(), ttl_args(1000))
        .await
        .expect("declare with x-message-ttl");

    let cases: Vec<(&str, QueueDeclareOptions, FieldTable, String)> = vec![
        (
            q.as_str(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
            format!(
                "PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{q}' in vhost '/': \
                 received 'true' but current is 'false'"
            ),
        ),
        (
            q.as_str(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
            format!(
                "PRECONDITION_FAILED - inequivalent arg 'auto_delete' for queue '{q}' in vhost \
                 '/': received 'true' but current is 'false'"
            ),
        ),
        (
            q.as_str(),
            QueueDeclareOptions::default(),
            ttl_args(1000),
            format!(
                "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue '{q}' in vhost \
                 '/': received the value '1000' of type 'signedint' but current is none"
            ),
        ),
        (
            qt.as_str(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
            format!(
                "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue '{qt}' in \
                 vhost '/': received none but current is the value '1000' of type 'signedint'"
            ),
        ),
        (
            qt.as_str(),
            QueueDeclareOptions::default(),
            ttl_args(2000),
            format!(
                "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue '{qt}' in \
                 vhost '/': received '2000' but current is '1000'"
            ),
        ),
    ];
    for (name, options, args, text) in cases {
        let ch = channel(&conn).await;
        let err = expect_err(
            "inequivalent redeclare",
            declare_with(&ch, name, options, args).await,
        );
        assert_amqp_error(&err, 406, Some(&text));
        assert_channel_closed_only(&conn, &ch).await;
    }

    // Equivalent redeclares are fine; unknown x- arguments are not compared.
    declare_with(&setup, &qt, QueueDeclareOptions::default(), ttl_args(1000))
        .await
        .expect("same x-message-ttl");
    let mut unknown = FieldTable::default();
    unknown.insert(
        "x-not-a-known-arg".into(),
        AMQPValue::LongString("v".into()),
    );
    declare_with(&setup, &q, QueueDeclareOptions::default(), unknown)
        .await
        .expect("unknown arguments are ignored in the comparison");

    delete_quietly(&setup, &q).await;
    delete_quietly(&setup, &qt).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn invalid_x_message_ttl_argument_is_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q = broker.unique_name("bad-ttl-arg");
    let ch = channel(&conn).await;
    let err = expect_err(
        "declare x-message-ttl=-1",
        declare_with(&ch, &q, QueueDeclareOptions::default(), ttl_args(-1)).await,
    );
    assert_amqp_error(
        &err,
        406,
        Some(&format!(
            "PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue '{q}' in vhost '/': \
             {{value_negative,-1}}"
        )),
    );
    assert_channel_closed_only(&conn, &ch).await;

    let ch = channel(&conn).await;
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongString("abc".into()));
    let err = expect_err(
        "declare x-message-ttl=\"abc\"",
        declare_with(&ch, &q, QueueDeclareOptions::default(), args).await,
    );
    assert_amqp_error(
        &err,
        406,
        Some(&format!(
            "PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue '{q}' in vhost '/': \
             \"expected integer, got longstr\""
        )),
    );
    assert_channel_closed_only(&conn, &ch).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn reserved_amq_names_are_403() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    for name in ["amq.foo", "amq.gen-made-up-by-client"] {
        let ch = channel(&conn).await;
        let err = expect_err(
            "declare amq.*",
            declare_with(
                &ch,
                name,
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await,
        );
        assert_amqp_error(
            &err,
            403,
            Some(&format!(
                "ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'"
            )),
        );
        assert_channel_closed_only(&conn, &ch).await;
    }
    // Passive declare of a missing amq.* queue is a plain 404.
    let ch = channel(&conn).await;
    let err = expect_err("passive amq.foo", passive(&ch, "amq.foo").await);
    assert_amqp_error(&err, 404, Some(&no_queue_text("amq.foo")));
    assert_channel_closed_only(&conn, &ch).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn exclusive_queue_is_locked_to_its_connection_with_405() {
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let other = broker.connect().await;
    let och = channel(&owner).await;
    let q = broker.unique_name("exclusive");
    declare_with(
        &och,
        &q,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exclusive declare");
    let text = locked_text(&q);

    // Every way of touching it from another connection: 405, channel scope.
    for (what, exclusive, passive_flag) in [
        ("declare exclusive", true, false),
        ("declare non-exclusive", false, false),
        ("declare passive", false, true),
    ] {
        let ch = channel(&other).await;
        let err = expect_err(
            what,
            declare_with(
                &ch,
                &q,
                QueueDeclareOptions {
                    exclusive,
                    passive: passive_flag,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await,
        );
        assert_amqp_error(&err, 405, Some(&text));
        assert_channel_closed_only(&other, &ch).await;
    }
    let ch = channel(&other).await;
    let err = expect_err(
        "consume",
        within(
            "consume",
            ch.basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await,
    );
    assert_amqp_error(&err, 405, Some(&text));
    assert_channel_closed_only(&other, &ch).await;

    let ch = channel(&other).await;
    let err = expect_err(
        "get",
        within("get", ch.basic_get(q.as_str().into(), Default::default())).await,
    );
    assert_amqp_error(&err, 405, Some(&text));
    assert_channel_closed_only(&other, &ch).await;

    let ch = channel(&other).await;
    let err = expect_err(
        "purge",
        within(
            "purge",
            ch.queue_purge(q.as_str().into(), Default::default()),
        )
        .await,
    );
    assert_amqp_error(&err, 405, Some(&text));
    assert_channel_closed_only(&other, &ch).await;

    let ch = channel(&other).await;
    let err = expect_err(
        "delete",
        within(
            "delete",
            ch.queue_delete(q.as_str().into(), Default::default()),
        )
        .await,
    );
    assert_amqp_error(&err, 405, Some(&text));
    assert_channel_closed_only(&other, &ch).await;

    // Publishing to it from the other connection is allowed and routes.
    let ch = channel(&other).await;
    publish(&ch, &q, b"from the other connection").await;
    let got = get_eventually(&och, &q, true).await;
    assert_eq!(got.delivery.data, b"from the other connection");

    // The owner may redeclare it (exclusive); without exclusive it is 405 even for the owner.
    declare_with(
        &och,
        &q,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("owner redeclares its exclusive queue");
    let err = expect_err(
        "owner redeclare non-exclusive",
        declare_with(
            &och,
            &q,
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_amqp_error(&err, 405, Some(&text));
    assert_channel_closed_only(&owner, &och).await;

    close_conn(&owner).await;
    close_conn(&other).await;
}

#[tokio::test]
async fn exclusive_lock_405_is_checked_before_equivalence_406() {
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let other = broker.connect().await;
    let och = channel(&owner).await;
    let q = broker.unique_name("exclusive-405-first");
    declare_with(
        &och,
        &q,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        ttl_args(1000),
    )
    .await
    .expect("exclusive declare");
    // Different durable, auto_delete and arguments: still 405, not 406.
    let ch = channel(&other).await;
    let err = expect_err(
        "inequivalent declare from another connection",
        declare_with(
            &ch,
            &q,
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            ttl_args(5),
        )
        .await,
    );
    assert_amqp_error(&err, 405, Some(&locked_text(&q)));
    assert_channel_closed_only(&other, &ch).await;
    close_conn(&owner).await;
    close_conn(&other).await;
}

#[tokio::test]
async fn exclusive_queues_ignore_durable_on_redeclare() {
    // RabbitMQ forces exclusive queues to be non-durable, so the owner's redeclare with
    // durable=true is equivalent.
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let ch = channel(&owner).await;
    let q = broker.unique_name("exclusive-durable");
    let excl = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    declare_with(&ch, &q, excl, FieldTable::default())
        .await
        .expect("exclusive declare");
    declare_with(
        &ch,
        &q,
        QueueDeclareOptions {
            durable: true,
            ..excl
        },
        FieldTable::default(),
    )
    .await
    .expect("durable=true on an exclusive queue is not an inequivalence");
    close_conn(&owner).await;
}

#[tokio::test]
async fn exclusive_queue_is_deleted_when_its_connection_closes() {
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let watcher = broker.connect().await;
    let och = channel(&owner).await;
    let q = broker.unique_name("exclusive-gone");
    declare_with(
        &och,
        &q,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exclusive declare");
    publish(&och, &q, b"lost with the queue").await;
    let server_named = declare_with(
        &och,
        "",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exclusive server-named declare");
    within("owner close", owner.close(200, "OK".into()))
        .await
        .expect("close the owner");
    wait_queue_gone(&watcher, &q).await;
    wait_queue_gone(&watcher, server_named.name().as_str()).await;
    // The name is free again for anyone.
    let ch = channel(&watcher).await;
    let fresh = declare(&ch, &q).await;
    assert_eq!(fresh.message_count(), 0);
    delete_quietly(&ch, &q).await;
    close_conn(&watcher).await;
}

#[tokio::test]
async fn auto_delete_queue_goes_with_its_last_consumer() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("auto-delete");
    let ad = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    declare_with(&ch, &q, ad, FieldTable::default())
        .await
        .expect("auto_delete declare");
    // Never consumed: it stays.
    let p = passive(&ch, &q)
        .await
        .expect("an auto_delete queue stays until consumed");
    assert_eq!(p.consumer_count(), 0);

    let c1 = consume(&ch, &q, true).await;
    let c2 = consume(&ch, &q, true).await;
    within(
        "cancel c1",
        ch.basic_cancel(c1.tag(), BasicCancelOptions::default()),
    )
    .await
    .expect("cancel c1");
    let p = passive(&ch, &q).await.expect("still one consumer");
    assert_eq!(p.consumer_count(), 1);
    within(
        "cancel c2",
        ch.basic_cancel(c2.tag(), BasicCancelOptions::default()),
    )
    .await
    .expect("cancel c2");
    wait_queue_gone(&conn, &q).await;

    // A consumer that goes with its channel counts too.
    let q2 = broker.unique_name("auto-delete-chan");
    declare_with(&ch, &q2, ad, FieldTable::default())
        .await
        .expect("auto_delete declare");
    let cch = channel(&conn).await;
    let _c = consume(&cch, &q2, false).await;
    within("channel close", cch.close(200, "OK".into()))
        .await
        .expect("close the consuming channel");
    wait_queue_gone(&conn, &q2).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn delete_if_unused_and_if_empty_are_406() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let setup = channel(&conn).await;
    let q = broker.unique_name("delete-if");
    declare(&setup, &q).await;
    let _consumer = consume(&setup, &q, false).await;

    let ch = channel(&conn).await;
    let err = expect_err(
        "delete if_unused",
        within(
            "delete",
            ch.queue_delete(
                q.as_str().into(),
                QueueDeleteOptions {
                    if_unused: true,
                    ..Default::default()
                },
            ),
        )
        .await,
    );
    assert_amqp_error(
        &err,
        406,
        Some(&format!(
            "PRECONDITION_FAILED - queue '{q}' in vhost '/' in use"
        )),
    );
    assert_channel_closed_only(&conn, &ch).await;

    let q2 = broker.unique_name("delete-if-empty");
    declare(&setup, &q2).await;
    let pub_ch = confirm_channel(&conn).await;
    publish_confirmed(&pub_ch, &q2, b"keep me").await;
    let ch = channel(&conn).await;
    let err = expect_err(
        "delete if_empty",
        within(
            "delete",
            ch.queue_delete(
                q2.as_str().into(),
                QueueDeleteOptions {
                    if_empty: true,
                    ..Default::default()
                },
            ),
        )
        .await,
    );
    assert_amqp_error(
        &err,
        406,
        Some(&format!(
            "PRECONDITION_FAILED - queue '{q2}' in vhost '/' not empty"
        )),
    );
    assert_channel_closed_only(&conn, &ch).await;

    // Both still exist; an unconditional delete reports the message count.
    assert_eq!(
        passive(&setup, &q).await.expect("q stays").consumer_count(),
        1
    );
    let n = within(
        "delete",
        setup.queue_delete(q2.as_str().into(), Default::default()),
    )
    .await
    .expect("delete q2");
    assert_eq!(n, 1);
    // if_unused / if_empty on a queue that qualifies succeed.
    let q3 = broker.unique_name("delete-if-ok");
    declare(&setup, &q3).await;
    let n = within(
        "delete",
        setup.queue_delete(
            q3.as_str().into(),
            QueueDeleteOptions {
                if_unused: true,
                if_empty: true,
                nowait: false,
            },
        ),
    )
    .await
    .expect("unused and empty");
    assert_eq!(n, 0);
    delete_quietly(&setup, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn deleting_a_missing_queue_is_ok_but_purging_it_is_404() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("never-declared");
    let n = within(
        "delete",
        ch.queue_delete(q.as_str().into(), Default::default()),
    )
    .await
    .expect("RabbitMQ 3.10 answers delete-ok for a missing queue");
    assert_eq!(n, 0);
    let err = expect_err(
        "purge missing",
        within(
            "purge",
            ch.queue_purge(q.as_str().into(), Default::default()),
        )
        .await,
    );
    assert_amqp_error(&err, 404, Some(&no_queue_text(&q)));
    assert_channel_closed_only(&conn, &ch).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn purge_removes_ready_messages_and_returns_the_count() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("purge");
    declare(&ch, &q).await;
    for i in 0..5u8 {
        publish(&ch, &q, &[i]).await;
    }
    // One of them is unacked on a get: purge leaves it alone.
    let held = get(&ch, &q, false).await.expect("a message");
    let n = within(
        "purge",
        ch.queue_purge(q.as_str().into(), Default::default()),
    )
    .await
    .expect("purge");
    assert_eq!(n, 4);
    assert!(get(&ch, &q, true).await.is_none(), "purged queue is empty");
    // Rejecting the held one with requeue brings it back.
    within(
        "reject",
        held.delivery
            .acker
            .reject(lapin::options::BasicRejectOptions { requeue: true }),
    )
    .await
    .expect("reject");
    let back = get(&ch, &q, true).await.expect("the requeued message");
    assert_eq!(back.delivery.data, [0]);
    assert!(back.delivery.redelivered);
    delete_quietly(&ch, &q).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn deleting_a_queue_cancels_its_consumers() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let other = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("delete-cancels");
    declare(&ch, &q).await;
    let mut own = consume(&ch, &q, true).await;
    let och = channel(&other).await;
    let mut remote = consume(&och, &q, true).await;
    let deleter = channel(&other).await;
    within(
        "delete",
        deleter.queue_delete(q.as_str().into(), Default::default()),
    )
    .await
    .expect("delete");
    // lapin ends the consumer stream when the server sends basic.cancel.
    for (name, consumer) in [
        ("same connection", &mut own),
        ("other connection", &mut remote),
    ] {
        use futures_util::StreamExt;
        let end = within("the server's basic.cancel", consumer.next()).await;
        assert!(
            end.is_none(),
            "{name}: expected the consumer to be cancelled, got {end:?}"
        );
    }
    // The channels themselves stay open.
    assert!(ch.status().connected() && och.status().connected());
    publish(&ch, "nowhere-in-particular", b"still fine").await;
    close_conn(&conn).await;
    close_conn(&other).await;
}

#[tokio::test]
async fn nowait_forms_take_effect() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("nowait");
    declare_with(
        &ch,
        &q,
        QueueDeclareOptions {
            nowait: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare nowait");
    let pub_ch = confirm_channel(&conn).await;
    publish_confirmed(&pub_ch, &q, b"a").await;
    publish_confirmed(&pub_ch, &q, b"b").await;
    // RabbitMQ's counts may lag a confirm by a moment under load: wait for the count.
    broker.wait_for_messages(&q, 2).await;
    // (purge nowait: lapin 4.12 never resolves it, see purge_nowait_takes_effect.)
    within(
        "purge",
        ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default()),
    )
    .await
    .expect("purge");

    let mut consumer = within(
        "consume nowait",
        ch.basic_consume(
            q.as_str().into(),
            "nowait-consumer".into(),
            BasicConsumeOptions {
                nowait: true,
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume nowait");
    publish(&ch, &q, b"c").await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.data, b"c");
    within(
        "cancel nowait",
        ch.basic_cancel(
            "nowait-consumer".into(),
            BasicCancelOptions { nowait: true },
        ),
    )
    .await
    .expect("cancel nowait");
    assert_eq!(
        passive(&ch, &q)
            .await
            .expect("still there")
            .consumer_count(),
        0
    );

    within(
        "delete nowait",
        ch.queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                nowait: true,
                ..Default::default()
            },
        ),
    )
    .await
    .expect("delete nowait");
    let err = expect_err("passive after nowait delete", passive(&ch, &q).await);
    assert_amqp_error(&err, 404, Some(&no_queue_text(&q)));
    assert_channel_closed_only(&conn, &ch).await;

    // A nowait declare with a reserved name still closes the channel with 403.
    let ch = channel(&conn).await;
    let mut events = ErrorEvents::new(&conn);
    let _ = declare_with(
        &ch,
        "amq.nowait",
        QueueDeclareOptions {
            nowait: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await;
    let err = events.next_error().await;
    assert_amqp_error(
        &err,
        403,
        Some("ACCESS_REFUSED - queue name 'amq.nowait' contains reserved prefix 'amq.*'"),
    );
    assert_channel_closed_only(&conn, &ch).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn purge_nowait_takes_effect() {
    // Raw client: lapin 4.12's queue_purge with nowait=true waits for a purge-ok forever.
    use amq_protocol::protocol::{AMQPClass, queue};
    let broker = TestBroker::start().await;
    let mut c = warren_tests::raw::RawClient::open_on_channel(broker.url(), 1).await;
    let q = broker.unique_name("purge-nowait");
    c.declare_queue(1, &q).await;
    c.publish(1, &q, b"a").await;
    c.publish(1, &q, b"b").await;
    c.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
            queue: q.as_str().into(),
            nowait: true,
        })),
    )
    .await;
    // No purge-ok: the next frame is the reply to the declare that follows.
    let ok = c.declare_queue(1, &q).await;
    assert_eq!(ok.message_count, 0, "the nowait purge emptied the queue");
    match c.recv_timeout(Duration::from_millis(200)).await {
        None => {}
        Some(other) => panic!("nothing expected after declare-ok, got {other:?}"),
    }
    c.delete_queue(1, &q).await;
    c.close().await;
}

#[tokio::test]
async fn a_server_cancel_crossing_a_new_consumer_of_the_same_tag_leaves_it_alone() {
    // In one packet: channel 2 deletes the queue of consumer `c` on channel 1 (so the broker
    // cancels `c`), channel 1 cancels `c` itself and consumes another queue under the same
    // tag. The broker's cancel is for the old `c`: the new one must stay and get messages.
    use amq_protocol::frame::AMQPFrame;
    use amq_protocol::protocol::{AMQPClass, basic, queue};
    use warren_tests::raw::{RawClient, cancel, consume};
    let broker = TestBroker::start().await;
    let (old, new) = (
        broker.unique_name("xcancel-old"),
        broker.unique_name("xcancel-new"),
    );
    let mut c = RawClient::open_on_channel(broker.url(), 1).await;
    c.open_channel(2).await;
    c.declare_queue(1, &old).await;
    c.declare_queue(1, &new).await;
    c.rpc(1, consume(&old, "c", true)).await;
    let delete = AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
        queue: old.as_str().into(),
        if_unused: false,
        if_empty: false,
        nowait: false,
    }));
    let packet = [
        AMQPFrame::Method(2, delete),
        AMQPFrame::Method(1, cancel("c")),
        AMQPFrame::Method(1, consume(&new, "c", true)),
    ]
    .iter()
    .flat_map(RawClient::encode)
    .collect::<Vec<u8>>();
    c.send_bytes(&packet).await;
    c.recv_until(|f| {
        matches!(
            f,
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)))
        )
    })
    .await;
    c.publish(2, &new, b"to the new c").await;
    let deliver = c
        .recv_until(|f| {
            matches!(
                f,
                AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(_)))
            )
        })
        .await;
    let AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) = deliver else {
        unreachable!("matched above");
    };
    assert_eq!(d.consumer_tag.as_str(), "c");
    c.delete_queue_skipping_deliveries(2, &new).await;
    c.close().await;
}
