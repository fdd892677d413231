//! Exchange-to-exchange bindings (exchange.bind, exchange.unbind) and alternate exchanges
//! (`alternate-exchange`), as RabbitMQ routes them: through every exchange reached, each once,
//! a queue getting one copy however many routes lead to it.

use lapin::{
    Channel, Confirmation, ExchangeKind,
    options::{
        ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, ExchangeUnbindOptions,
    },
    types::{AMQPValue, FieldTable},
};
use warren_harness::TestBroker;
use warren_tests::{
    assert_amqp_error, assert_channel_closed_only, bind_queue, channel, close_conn,
    confirm_channel, declare, declare_exchange, drain_bodies, expect_err, get_eventually,
    long_string, publish_confirmed_to, within,
};

async fn exchange(ch: &Channel, name: &str, kind: ExchangeKind, options: ExchangeDeclareOptions) {
    declare_exchange(ch, name, kind, options, FieldTable::default()).await;
}

async fn exchange_exists(conn: &lapin::Connection, name: &str) -> bool {
    let ch = channel(conn).await;
    let found = within(
        "a passive exchange.declare",
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .is_ok();
    if found {
        let _ = ch.close(200, "OK".into()).await;
    }
    found
}

async fn bind_exchange(
    ch: &Channel,
    destination: &str,
    source: &str,
    key: &str,
) -> lapin::Result<()> {
    within(
        "exchange.bind",
        ch.exchange_bind(
            destination.into(),
            source.into(),
            key.into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
}

async fn unbind_exchange(ch: &Channel, destination: &str, source: &str, key: &str) {
    within(
        "exchange.unbind",
        ch.exchange_unbind(
            destination.into(),
            source.into(),
            key.into(),
            ExchangeUnbindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.unbind");
}

#[tokio::test]
async fn a_message_goes_through_bound_exchanges_and_reaches_a_queue_once_whatever_the_routes() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let (a, b) = (broker.unique_name("e2e-a"), broker.unique_name("e2e-b"));
    exchange(&ch, &a, ExchangeKind::Fanout, Default::default()).await;
    exchange(&ch, &b, ExchangeKind::Direct, Default::default()).await;
    let q = broker.unique_name("e2e-q");
    declare(&ch, &q).await;
    bind_exchange(&ch, &b, &a, "").await.expect("exchange.bind");
    bind_queue(&ch, &q, &b, "k").await;
    publish_confirmed_to(&ch, &a, "k", b"through", false).await;
    publish_confirmed_to(&ch, &a, "other", b"nowhere", false).await;
    let d = get_eventually(&ch, &q, true).await.delivery;
    assert_eq!(d.data, b"through");
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str()),
        (a.as_str(), "k"),
        "a delivery names the exchange it was published to"
    );
    assert!(drain_bodies(&ch, &q).await.is_empty());

    // A cycle (b back to a) and a second route to q (a straight to q): still one copy.
    bind_exchange(&ch, &a, &b, "k")
        .await
        .expect("exchange.bind");
    bind_queue(&ch, &q, &a, "").await;
    publish_confirmed_to(&ch, &a, "k", b"once", false).await;
    assert_eq!(drain_bodies(&ch, &q).await, [b"once".to_vec()]);

    // Unbound, b no longer gets a's messages (`only_b` is bound to b alone).
    let only_b = broker.unique_name("e2e-only-b");
    declare(&ch, &only_b).await;
    bind_queue(&ch, &only_b, &b, "x").await;
    publish_confirmed_to(&ch, &a, "x", b"before", false).await;
    assert_eq!(drain_bodies(&ch, &only_b).await, [b"before".to_vec()]);
    assert_eq!(drain_bodies(&ch, &q).await, [b"before".to_vec()]);
    unbind_exchange(&ch, &b, &a, "").await;
    unbind_exchange(&ch, &b, &a, "never-bound").await;
    publish_confirmed_to(&ch, &a, "x", b"after", false).await;
    assert_eq!(
        drain_bodies(&ch, &q).await,
        [b"after".to_vec()],
        "still bound to a"
    );
    assert!(drain_bodies(&ch, &only_b).await.is_empty());
    close_conn(&conn).await;
}

#[tokio::test]
async fn exchange_bind_refuses_missing_exchanges_and_the_default_exchange() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let a = broker.unique_name("e2e-a");
    let missing = broker.unique_name("e2e-missing");
    let setup = channel(&conn).await;
    exchange(&setup, &a, ExchangeKind::Fanout, Default::default()).await;
    let no_exchange = format!("NOT_FOUND - no exchange '{missing}' in vhost '/'");
    let default_refused = "ACCESS_REFUSED - operation not permitted on the default exchange";
    let other_missing = broker.unique_name("e2e-missing-too");
    for (destination, source, code, text) in [
        (missing.as_str(), a.as_str(), 404, no_exchange.as_str()),
        (a.as_str(), missing.as_str(), 404, no_exchange.as_str()),
        // Both missing: the source is named.
        (
            other_missing.as_str(),
            missing.as_str(),
            404,
            no_exchange.as_str(),
        ),
        ("", a.as_str(), 403, default_refused),
        (a.as_str(), "", 403, default_refused),
    ] {
        let ch = channel(&conn).await;
        let err = expect_err(
            "exchange.bind",
            bind_exchange(&ch, destination, source, "").await,
        );
        assert_amqp_error(&err, code, Some(text));
        assert_channel_closed_only(&conn, &ch).await;
    }
    // Unbinding what is not there, even from a missing exchange, succeeds.
    let ch = channel(&conn).await;
    unbind_exchange(&ch, &missing, &a, "k").await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn deleting_an_exchange_removes_the_bindings_to_it_and_auto_delete_counts_bindings_from_it() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let (x, y) = (broker.unique_name("e2e-x"), broker.unique_name("e2e-y"));
    exchange(&ch, &x, ExchangeKind::Fanout, Default::default()).await;
    exchange(&ch, &y, ExchangeKind::Fanout, Default::default()).await;
    bind_exchange(&ch, &y, &x, "").await.expect("exchange.bind");
    // x has a binding: in use.
    let err = expect_err(
        "exchange.delete if_unused",
        within(
            "exchange.delete",
            ch.exchange_delete(
                x.as_str().into(),
                ExchangeDeleteOptions {
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
            "PRECONDITION_FAILED - exchange '{x}' in vhost '/' in use"
        )),
    );
    let ch = channel(&conn).await;
    // y is only a destination: unused; deleting it takes x's binding with it.
    for name in [&y, &x] {
        within(
            "exchange.delete",
            ch.exchange_delete(
                name.as_str().into(),
                ExchangeDeleteOptions {
                    if_unused: true,
                    ..Default::default()
                },
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("exchange.delete {name} if_unused: {e}"));
    }

    let auto_source = broker.unique_name("e2e-auto-source");
    let auto_destination = broker.unique_name("e2e-auto-destination");
    let plain = broker.unique_name("e2e-plain");
    let auto = ExchangeDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    exchange(&ch, &auto_source, ExchangeKind::Fanout, auto).await;
    exchange(&ch, &auto_destination, ExchangeKind::Fanout, auto).await;
    exchange(&ch, &plain, ExchangeKind::Fanout, Default::default()).await;
    bind_exchange(&ch, &plain, &auto_source, "")
        .await
        .expect("bind");
    bind_exchange(&ch, &auto_destination, &plain, "")
        .await
        .expect("bind");
    unbind_exchange(&ch, &plain, &auto_source, "").await;
    unbind_exchange(&ch, &auto_destination, &plain, "").await;
    assert!(
        !exchange_exists(&conn, &auto_source).await,
        "an auto-delete exchange goes with its last binding from it"
    );
    assert!(
        exchange_exists(&conn, &auto_destination).await,
        "bindings to it do not count"
    );

    // A chain of auto-delete exchanges goes when the queue at its end does.
    let (first, second) = (
        broker.unique_name("e2e-chain-1"),
        broker.unique_name("e2e-chain-2"),
    );
    exchange(&ch, &first, ExchangeKind::Fanout, auto).await;
    exchange(&ch, &second, ExchangeKind::Fanout, auto).await;
    let end = broker.unique_name("e2e-chain-q");
    declare(&ch, &end).await;
    bind_exchange(&ch, &second, &first, "").await.expect("bind");
    bind_queue(&ch, &end, &second, "").await;
    within(
        "queue.delete",
        ch.queue_delete(end.as_str().into(), Default::default()),
    )
    .await
    .expect("queue.delete");
    for name in [&second, &first] {
        assert!(
            !exchange_exists(&conn, name).await,
            "{name} went with the chain"
        );
    }
    close_conn(&conn).await;
}

#[tokio::test]
async fn an_unroutable_message_goes_to_the_alternate_exchange() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let ae = broker.unique_name("ae");
    exchange(&ch, &ae, ExchangeKind::Fanout, Default::default()).await;
    let caught = broker.unique_name("ae-caught");
    declare(&ch, &caught).await;
    bind_queue(&ch, &caught, &ae, "").await;
    let main = broker.unique_name("ae-main");
    let routed = broker.unique_name("ae-routed");
    let with_ae = |name: &str| {
        let mut args = FieldTable::default();
        args.insert("alternate-exchange".into(), long_string(name));
        args
    };
    declare_exchange(
        &ch,
        &main,
        ExchangeKind::Direct,
        Default::default(),
        with_ae(&ae),
    )
    .await;
    declare(&ch, &routed).await;
    bind_queue(&ch, &routed, &main, "known").await;

    let confirmation = publish_confirmed_to(&ch, &main, "unknown", b"stray", true).await;
    assert_eq!(
        confirmation,
        Confirmation::Ack(None),
        "routed by the AE: no return"
    );
    publish_confirmed_to(&ch, &main, "known", b"expected", true).await;
    let d = get_eventually(&ch, &caught, true).await.delivery;
    assert_eq!(d.data, b"stray");
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str()),
        (main.as_str(), "unknown")
    );
    assert_eq!(drain_bodies(&ch, &routed).await, [b"expected".to_vec()]);
    assert!(
        drain_bodies(&ch, &caught).await.is_empty(),
        "only the stray one"
    );

    // An AE that does not exist routes nowhere: a mandatory publish comes back.
    let lost = broker.unique_name("ae-lost");
    declare_exchange(
        &ch,
        &lost,
        ExchangeKind::Direct,
        Default::default(),
        with_ae(&broker.unique_name("ae-missing")),
    )
    .await;
    match publish_confirmed_to(&ch, &lost, "unknown", b"back", true).await {
        Confirmation::Ack(Some(returned)) => assert_eq!(returned.delivery.data, b"back"),
        other => panic!("expected a returned message, got {other:?}"),
    }

    // An exchange whose only match is another exchange has routed the message: its AE is
    // not used, even if that exchange routes it nowhere; that exchange's own AE is.
    let outer = broker.unique_name("ae-outer");
    let inner = broker.unique_name("ae-inner");
    let inner_ae = broker.unique_name("ae-inner-ae");
    let inner_caught = broker.unique_name("ae-inner-caught");
    declare_exchange(
        &ch,
        &outer,
        ExchangeKind::Fanout,
        Default::default(),
        with_ae(&ae),
    )
    .await;
    exchange(&ch, &inner, ExchangeKind::Direct, Default::default()).await;
    bind_exchange(&ch, &inner, &outer, "")
        .await
        .expect("exchange.bind");
    publish_confirmed_to(&ch, &outer, "nobody", b"dropped", false).await;
    exchange(&ch, &inner_ae, ExchangeKind::Fanout, Default::default()).await;
    declare(&ch, &inner_caught).await;
    bind_queue(&ch, &inner_caught, &inner_ae, "").await;
    let inner2 = broker.unique_name("ae-inner2");
    declare_exchange(
        &ch,
        &inner2,
        ExchangeKind::Direct,
        Default::default(),
        with_ae(&inner_ae),
    )
    .await;
    bind_exchange(&ch, &inner2, &outer, "")
        .await
        .expect("exchange.bind");
    publish_confirmed_to(&ch, &outer, "nobody", b"inner's", false).await;
    assert_eq!(
        drain_bodies(&ch, &inner_caught).await,
        [b"inner's".to_vec()]
    );
    assert!(
        drain_bodies(&ch, &caught).await.is_empty(),
        "the outer exchange routed both: its AE got nothing"
    );

    // An AE must be a long string.
    let bad = channel(&conn).await;
    let bad_name = broker.unique_name("ae-bad");
    let mut args = FieldTable::default();
    args.insert("alternate-exchange".into(), AMQPValue::LongInt(5));
    let err = expect_err(
        "exchange.declare with an integer AE",
        within(
            "exchange.declare",
            bad.exchange_declare(
                bad_name.as_str().into(),
                ExchangeKind::Direct,
                Default::default(),
                args,
            ),
        )
        .await,
    );
    assert_amqp_error(
        &err,
        406,
        Some(&format!(
            "PRECONDITION_FAILED - invalid type 'signedint' for arg 'alternate-exchange' in exchange '{bad_name}' in vhost '/'"
        )),
    );
    close_conn(&conn).await;
}

#[tokio::test]
async fn unbinding_a_queue_from_what_is_not_there_succeeds() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("unbind-q");
    declare(&ch, &q).await;
    for (queue, exchange) in [
        (q.clone(), broker.unique_name("unbind-missing-x")),
        (
            broker.unique_name("unbind-missing-q"),
            "amq.direct".to_owned(),
        ),
        (q.clone(), "amq.direct".to_owned()),
    ] {
        within(
            "queue.unbind",
            ch.queue_unbind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "k".into(),
                FieldTable::default(),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("queue.unbind {queue} from {exchange}: {e}"));
    }
    close_conn(&conn).await;
}

/// A redeclare that differs is 406 on the channel, as RabbitMQ 3.10 answers it: the type,
/// then durable, auto_delete and internal, and only then `alternate-exchange`, with the
/// values compared as for queue arguments. Other arguments are not compared.
#[tokio::test]
async fn an_inequivalent_exchange_redeclare_is_406_flags_before_the_alternate_exchange() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let x = broker.unique_name("x-equiv");
    let y = broker.unique_name("y-equiv");
    let resource = |name: &str| format!("exchange '{name}' in vhost '{}'", broker.vhost());
    let args = |pairs: &[(&str, AMQPValue)]| {
        let mut table = FieldTable::default();
        for (key, value) in pairs {
            table.insert((*key).into(), value.clone());
        }
        table
    };
    let ch = channel(&conn).await;
    declare_exchange(
        &ch,
        &x,
        ExchangeKind::Direct,
        Default::default(),
        args(&[("alternate-exchange", long_string("a"))]),
    )
    .await;
    exchange(&ch, &y, ExchangeKind::Direct, Default::default()).await;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let cases = [
        (
            &x,
            durable,
            args(&[("alternate-exchange", long_string("b"))]),
            format!(
                "inequivalent arg 'durable' for {}: received 'true' but current is 'false'",
                resource(&x)
            ),
        ),
        (
            &x,
            ExchangeDeclareOptions::default(),
            args(&[("alternate-exchange", long_string("b"))]),
            format!(
                "inequivalent arg 'alternate-exchange' for {}: received 'b' but current is 'a'",
                resource(&x)
            ),
        ),
        (
            &x,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
            format!(
                "inequivalent arg 'alternate-exchange' for {}: received none but current is \
                 the value 'a' of type 'longstr'",
                resource(&x)
            ),
        ),
        (
            &y,
            ExchangeDeclareOptions::default(),
            args(&[("alternate-exchange", long_string("b"))]),
            format!(
                "inequivalent arg 'alternate-exchange' for {}: received the value 'b' of type \
                 'longstr' but current is none",
                resource(&y)
            ),
        ),
    ];
    for (name, options, arguments, text) in cases {
        let ch = channel(&conn).await;
        let result = within(
            "exchange.declare",
            ch.exchange_declare(
                name.as_str().into(),
                ExchangeKind::Direct,
                options,
                arguments,
            ),
        )
        .await;
        let err = expect_err("an inequivalent redeclare", result);
        assert_amqp_error(&err, 406, Some(&format!("PRECONDITION_FAILED - {text}")));
    }
    // Other arguments are not compared.
    declare_exchange(
        &channel(&conn).await,
        &x,
        ExchangeKind::Direct,
        Default::default(),
        args(&[
            ("alternate-exchange", long_string("a")),
            ("x-other", AMQPValue::LongLongInt(1)),
        ]),
    )
    .await;
    let ch = channel(&conn).await;
    for name in [&x, &y] {
        within(
            "exchange.delete",
            ch.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()),
        )
        .await
        .expect("exchange.delete");
    }
    close_conn(&conn).await;
}
