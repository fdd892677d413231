//! Users and their per-vhost permissions (`TestBroker::add_user` and `set_permissions`:
//! `rabbitmqctl` on RabbitMQ): a user with none in a vhost is refused at connection.open with
//! 530; each operation needs configure, write or read permission on the queues and exchanges
//! it names (403 on its channel otherwise, before the resource is even looked up); changes
//! apply to open connections; deleting a user closes its connections with 320.

use amq_protocol::{
    frame::AMQPFrame,
    protocol::{AMQPClass, connection},
};
use lapin::{
    BasicProperties, Channel, Connection, ExchangeKind,
    options::{
        BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
    },
    types::FieldTable,
};
use warren_harness::{TestBroker, connect_to};
use warren_tests::raw::{Incoming, RawClient};
use warren_tests::{
    assert_amqp_error, assert_connection_closed, assert_connection_works, channel, close_conn,
    declare, declare_exchange, expect_err, get_eventually, long_string, refused_connection,
    user_id_refused, within,
};

const PASSWORD: &str = "s3cret";

/// A new user of the target, with no permissions yet.
async fn new_user(broker: &TestBroker) -> String {
    let user = broker.unique_name("user");
    broker.add_user(&user, PASSWORD).await;
    user
}

/// The `user_id` property of a message got with basic.get.
fn user_id_of(got: &lapin::message::BasicGetMessage) -> Option<&str> {
    got.delivery
        .properties
        .user_id()
        .as_ref()
        .map(|u| u.as_str())
}

/// 403 ACCESS_REFUSED's text for `kind` `name`.
fn refused(broker: &TestBroker, user: &str, kind: &str, name: &str) -> String {
    format!(
        "ACCESS_REFUSED - access to {kind} '{name}' in vhost '{}' refused for user '{user}'",
        broker.vhost()
    )
}

#[tokio::test]
async fn a_user_without_permissions_in_a_vhost_cannot_open_it() {
    let broker = TestBroker::start().await;
    let user = new_user(&broker).await;
    let vhost = broker.vhost();
    let url = broker.url_as(&user, PASSWORD, &vhost);
    let err = refused_connection(&url).await;
    assert_amqp_error(
        &err,
        530,
        Some(&format!(
            "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}'"
        )),
    );

    // Empty patterns open the vhost, and allow nothing in it.
    broker.set_permissions(&vhost, &user, "", "", "").await;
    let conn = connect_to(&url).await;
    let ch = channel(&conn).await;
    let q = broker.unique_name("perm-none");
    let err = expect_err(
        "queue.declare without configure permission",
        within(
            "queue.declare",
            ch.queue_declare(q.as_str().into(), Default::default(), FieldTable::default()),
        )
        .await,
    );
    assert_amqp_error(&err, 403, Some(&refused(&broker, &user, "queue", &q)));

    // Cleared, the vhost is refused again.
    broker.clear_permissions(&vhost, &user).await;
    let err = refused_connection(&url).await;
    assert_amqp_error(
        &err,
        530,
        Some(&format!(
            "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}'"
        )),
    );
    close_conn(&conn).await;
}

/// What a user may do, with the queues and exchanges named after `p`: it configures `p-c*`,
/// writes `p-w`, the default exchange and `amq.direct`, reads `p-r`, `p-c-r*` and
/// `amq.direct`.
struct Setup {
    broker: TestBroker,
    user: String,
    conn: Connection,
    admin: Channel,
    p: String,
}

impl Setup {
    async fn new() -> Self {
        let broker = TestBroker::start().await;
        let user = new_user(&broker).await;
        let p = broker.unique_name("perm");
        broker
            .set_permissions(
                &broker.vhost(),
                &user,
                &format!("^{p}-c"),
                &format!(r"^({p}-w|amq\.default|amq\.direct)$"),
                &format!(r"^({p}-r|{p}-c-r.*|amq\.direct)$"),
            )
            .await;
        let conn = connect_to(&broker.url_as(&user, PASSWORD, &broker.vhost())).await;
        let admin_conn = broker.connect().await;
        let admin = channel(&admin_conn).await;
        for suffix in ["w", "r", "x"] {
            declare(&admin, &format!("{p}-{suffix}")).await;
        }
        Self {
            broker,
            user,
            conn,
            admin,
            p,
        }
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.p)
    }

    async fn channel(&self) -> Channel {
        channel(&self.conn).await
    }

    /// Asserts that `what` closed its channel with 403 naming `kind` `name`.
    #[track_caller]
    fn assert_refused<T: std::fmt::Debug>(
        &self,
        what: &str,
        result: lapin::Result<T>,
        kind: &str,
        name: &str,
    ) {
        let err = expect_err(what, result);
        let text = refused(&self.broker, &self.user, kind, name);
        assert_amqp_error(&err, 403, Some(&text));
    }

    async fn cleanup(self) {
        for suffix in ["c", "c-dlx", "c-rd", "w", "r", "x"] {
            let _ = within(
                "queue.delete",
                self.admin
                    .queue_delete(self.name(suffix).as_str().into(), Default::default()),
            )
            .await;
        }
        close_conn(&self.conn).await;
    }
}

#[tokio::test]
async fn queue_operations_need_their_permission() {
    let s = Setup::new().await;
    let (c, w, r, x) = (s.name("c"), s.name("w"), s.name("r"), s.name("x"));
    let none = FieldTable::default;

    let ch = s.channel().await;
    declare(&ch, &c).await;
    let result = within(
        "queue.declare",
        ch.queue_declare(x.as_str().into(), Default::default(), none()),
    )
    .await;
    s.assert_refused("declaring a queue", result, "queue", &x);

    // A passive declare needs no permission.
    let ch = s.channel().await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    within(
        "passive queue.declare",
        ch.queue_declare(x.as_str().into(), passive, none()),
    )
    .await
    .expect("a passive declare");

    // Checked before the queue is looked up: a missing one is refused, not 404. (And the
    // refused purge leaves the message in `x` alone.)
    warren_tests::publish(&s.admin, &x, b"kept").await;
    s.broker.wait_for_messages(&x, 1).await;
    let missing = s.name("missing");
    for name in [&x, &missing] {
        let ch = s.channel().await;
        let result = within(
            "queue.delete",
            ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()),
        )
        .await;
        s.assert_refused("deleting a queue", result, "queue", name);
        let ch = s.channel().await;
        let result = within(
            "queue.purge",
            ch.queue_purge(name.as_str().into(), QueuePurgeOptions::default()),
        )
        .await;
        s.assert_refused("purging a queue", result, "queue", name);
    }
    let ch = s.channel().await;
    within(
        "queue.purge",
        ch.queue_purge(r.as_str().into(), QueuePurgeOptions::default()),
    )
    .await
    .expect("read permits purge");

    // Consuming and getting need read.
    let result = within(
        "basic.consume",
        ch.basic_consume(
            x.as_str().into(),
            "t".into(),
            BasicConsumeOptions::default(),
            none(),
        ),
    )
    .await;
    s.assert_refused("consuming", result, "queue", &x);
    let ch = s.channel().await;
    let result = within(
        "basic.get",
        ch.basic_get(x.as_str().into(), BasicGetOptions::default()),
    )
    .await;
    s.assert_refused("basic.get", result, "queue", &x);
    let ch = s.channel().await;
    within(
        "basic.get",
        ch.basic_get(r.as_str().into(), BasicGetOptions::default()),
    )
    .await
    .expect("read permits basic.get");
    within(
        "basic.consume",
        ch.basic_consume(
            r.as_str().into(),
            "t".into(),
            BasicConsumeOptions::default(),
            none(),
        ),
    )
    .await
    .expect("read permits consuming");

    // A binding: write on the queue first, then read on the exchange.
    let bind = |ch: Channel, queue: String, exchange: &'static str| async move {
        within(
            "queue.bind",
            ch.queue_bind(
                queue.as_str().into(),
                exchange.into(),
                queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
    };
    let result = bind(s.channel().await, x.clone(), "amq.fanout").await;
    s.assert_refused("binding a queue", result, "queue", &x);
    let result = bind(s.channel().await, w.clone(), "amq.fanout").await;
    s.assert_refused("binding from an exchange", result, "exchange", "amq.fanout");
    bind(s.channel().await, w.clone(), "amq.direct")
        .await
        .expect("write on the queue and read on the exchange permit binding");

    // A new queue that dead-letters needs read on itself and write on its exchange.
    let dlx = s.name("c-dlx");
    let ch = s.channel().await;
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), long_string("amq.direct"));
    let result = within(
        "queue.declare",
        ch.queue_declare(dlx.as_str().into(), Default::default(), args),
    )
    .await;
    s.assert_refused("declaring a dead-lettering queue", result, "queue", &dlx);
    // Read on it, but no write on its dead-letter exchange.
    let dlx = s.name("c-rd");
    let ch = s.channel().await;
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), long_string("amq.fanout"));
    let result = within(
        "queue.declare",
        ch.queue_declare(dlx.as_str().into(), Default::default(), args),
    )
    .await;
    s.assert_refused(
        "declaring a dead-lettering queue",
        result,
        "exchange",
        "amq.fanout",
    );

    // The admin's view: nothing the refused operations named changed.
    assert_eq!(
        s.broker.queue_counts(&x).await,
        Some((1, 0)),
        "{x} is still there, with its message"
    );
    s.cleanup().await;
}

/// Publishes `m` to `exchange` with routing key `key` on `ch`, in confirm mode: the
/// broker's confirm, or the error that closed the channel.
async fn publish(ch: Channel, exchange: &str, key: &str) -> lapin::Result<lapin::Confirmation> {
    within(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .expect("confirm.select");
    let confirm = within(
        "basic.publish",
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        ),
    )
    .await?;
    within("the confirm", confirm).await
}

#[tokio::test]
async fn exchange_operations_and_publishes_need_their_permission() {
    let s = Setup::new().await;
    let (w, x) = (s.name("w"), s.name("x"));

    // Publishing needs write on the exchange, the default one included (`amq.default`).
    let result = publish(s.channel().await, "amq.fanout", &w).await;
    s.assert_refused("publishing", result, "exchange", "amq.fanout");
    // Before the exchange is looked up: a missing one is refused, not 404.
    let result = publish(s.channel().await, &x, &w).await;
    s.assert_refused("publishing to a missing exchange", result, "exchange", &x);
    let result = publish(s.channel().await, "", &w).await;
    assert!(
        result.is_ok_and(|c| c.is_ack()),
        "write on amq.default permits publishing to the default exchange"
    );
    s.broker.wait_for_messages(&w, 1).await;

    let ch = s.channel().await;
    let result = within(
        "exchange.declare",
        ch.exchange_declare(
            x.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    s.assert_refused("declaring an exchange", result, "exchange", &x);
    // A passive declare needs none.
    let ch = s.channel().await;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    within(
        "passive exchange.declare",
        ch.exchange_declare(
            "amq.fanout".into(),
            ExchangeKind::Fanout,
            passive,
            FieldTable::default(),
        ),
    )
    .await
    .expect("a passive declare");
    // A system exchange is refused as such before permissions are looked at.
    let result = within(
        "exchange.delete",
        ch.exchange_delete("amq.fanout".into(), ExchangeDeleteOptions::default()),
    )
    .await;
    let err = expect_err("deleting amq.fanout", result);
    assert_amqp_error(
        &err,
        403,
        Some(&format!(
            "ACCESS_REFUSED - deletion of system exchange 'amq.fanout' in vhost '{}' not allowed",
            s.broker.vhost()
        )),
    );
    let ch = s.channel().await;
    let result = within(
        "exchange.delete",
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()),
    )
    .await;
    s.assert_refused("deleting an exchange", result, "exchange", &x);

    // exchange.bind: write on the destination, then read on the source (both refused: the
    // destination is named).
    for (destination, source) in [
        ("amq.fanout", "amq.direct"),
        ("amq.direct", "amq.fanout"),
        ("amq.fanout", "amq.topic"),
    ] {
        let ch = s.channel().await;
        let result = within(
            "exchange.bind",
            ch.exchange_bind(
                destination.into(),
                source.into(),
                w.as_str().into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
        s.assert_refused("binding exchanges", result, "exchange", "amq.fanout");
    }
    // An unknown exchange type is refused before the permission is looked at (503, which
    // closes the connection: a connection of its own).
    let conn = connect_to(&s.broker.url_as(&s.user, PASSWORD, &s.broker.vhost())).await;
    let ch = channel(&conn).await;
    let result = within(
        "exchange.declare",
        ch.exchange_declare(
            x.as_str().into(),
            ExchangeKind::Custom("x-no-such-type".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let err = expect_err("declaring an exchange of an unknown type", result);
    assert_amqp_error(
        &err,
        503,
        Some("COMMAND_INVALID - unknown exchange type 'x-no-such-type'"),
    );
    s.cleanup().await;
}

/// basic.get from `q` on a new channel of `conn`.
async fn get(conn: &Connection, q: &str) -> lapin::Result<Option<lapin::message::BasicGetMessage>> {
    let ch = channel(conn).await;
    within(
        "basic.get",
        ch.basic_get(q.into(), BasicGetOptions::default()),
    )
    .await
}

#[tokio::test]
async fn changed_permissions_apply_to_open_connections() {
    let broker = TestBroker::start().await;
    let user = new_user(&broker).await;
    let vhost = broker.vhost();
    let q = broker.unique_name("perm-change");
    let admin = broker.connect().await;
    let admin_ch = channel(&admin).await;
    declare(&admin_ch, &q).await;
    broker.set_permissions(&vhost, &user, "", "", ".*").await;
    let conn = connect_to(&broker.url_as(&user, PASSWORD, &vhost)).await;
    get(&conn, &q).await.expect("read permitted");
    broker.set_permissions(&vhost, &user, "", "", "^$").await;
    let err = expect_err("basic.get after read was taken away", get(&conn, &q).await);
    assert_amqp_error(&err, 403, Some(&refused(&broker, &user, "queue", &q)));
    broker.set_permissions(&vhost, &user, "", "", ".*").await;
    get(&conn, &q).await.expect("read permitted again");
    assert_connection_works(&admin).await;
    let _ = within(
        "queue.delete",
        admin_ch.queue_delete(q.as_str().into(), Default::default()),
    )
    .await;
    close_conn(&conn).await;
    close_conn(&admin).await;
}

#[tokio::test]
async fn deleting_a_user_closes_its_connections_and_only_them() {
    let broker = TestBroker::start().await;
    let user = new_user(&broker).await;
    let vhost = broker.vhost();
    broker
        .set_permissions(&vhost, &user, ".*", ".*", ".*")
        .await;
    let url = broker.url_as(&user, PASSWORD, &vhost);
    let doomed = connect_to(&url).await;
    let mut raw = RawClient::open(&url).await;
    let other = broker.connect().await;

    broker.delete_user(&user).await;
    let close = match raw.recv().await {
        Incoming::Frame(AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(close)),
        )) => close,
        other => panic!("expected connection.close 320, got {other:?}"),
    };
    assert_eq!(close.reply_code, 320);
    assert_eq!(
        close.reply_text.as_str(),
        format!("CONNECTION_FORCED - user '{user}' is deleted")
    );
    assert_connection_closed(&doomed).await;
    assert_connection_works(&other).await;
    // It can no longer log in.
    let err = expect_err(
        "logging in as a deleted user",
        within("connect", Connection::connect(&url, Default::default())).await,
    );
    assert_amqp_error(&err, 403, None);
    close_conn(&other).await;
}

#[tokio::test]
async fn permissions_are_refused_for_a_missing_user_or_vhost_or_a_bad_pattern() {
    let broker = TestBroker::start().await;
    let Some(handle) = broker.embedded() else {
        // On RabbitMQ these are rabbitmqctl's own refusals.
        return;
    };
    use warren_broker::PermissionError;
    assert_eq!(
        handle.set_permissions("/", "nobody", ".*", ".*", ".*"),
        Err(PermissionError::NoUser("nobody".into()))
    );
    assert_eq!(
        handle.set_permissions("missing", "guest", ".*", ".*", ".*"),
        Err(PermissionError::NoVhost("missing".into()))
    );
    assert_eq!(
        handle.set_permissions("/", "guest", "(", ".*", ".*"),
        Err(PermissionError::InvalidPattern("(".into()))
    );
    assert!(handle.add_user("u", "p"));
    assert!(!handle.add_user("u", "other"), "the name is taken");
    // The configured users may open vhosts added later; others may not.
    assert!(handle.add_vhost("later"));
    let guest = connect_to(&handle.url_for("later")).await;
    assert_connection_works(&guest).await;
    close_conn(&guest).await;
    let url = handle.url_for("later").replacen("guest:guest@", "u:p@", 1);
    let err = expect_err(
        "opening a later vhost as an added user",
        within("connect", Connection::connect(&url, Default::default())).await,
    );
    assert_amqp_error(
        &err,
        530,
        Some("NOT_ALLOWED - access to vhost 'later' refused for user 'u'"),
    );
}

/// A publish is checked for its size before its write permission, and for that before its
/// properties (RabbitMQ 3.10 too: an oversized publish to an exchange the user may not
/// write gets 406, probed with a 128 MiB + 1 body; a small one gets 403 even with a
/// `user_id` that is not the user's). Embedded: a small max message size keeps it cheap.
#[tokio::test]
#[cfg_attr(warren_external, ignore = "embedded only: RabbitMQ's limit is 128 MiB")]
async fn embedded_only_a_publish_is_checked_for_size_then_permission_then_properties() {
    let broker = TestBroker::start_embedded(warren_broker::BrokerConfig {
        max_message_size: 1024,
        ..Default::default()
    })
    .await;
    let user = new_user(&broker).await;
    broker
        .set_permissions("/", &user, "", "^amq\\.direct$", "")
        .await;
    let url = broker.url_as(&user, PASSWORD, "/");
    let mut c = RawClient::open_on_channel(&url, 1).await;
    c.publish_full(1, "amq.fanout", "k", false, &[0; 1025], Default::default())
        .await;
    c.expect_channel_close(
        1,
        406,
        Some("PRECONDITION_FAILED - message size 1025 is larger than configured max size 1024"),
    )
    .await;
    c.open_channel(1).await;
    let not_the_user = amq_protocol::protocol::basic::AMQPProperties::default()
        .with_user_id("someone-else".into());
    c.publish_full(1, "amq.fanout", "k", false, b"m", not_the_user.clone())
        .await;
    let text = refused(&broker, &user, "exchange", "amq.fanout");
    let ids = c.expect_channel_close(1, 403, Some(&text)).await;
    assert_eq!(ids, (60, 40));
    c.open_channel(1).await;
    c.publish_full(1, "amq.direct", "k", false, b"m", not_the_user)
        .await;
    let text = user_id_refused("someone-else", &user);
    c.expect_channel_close(1, 406, Some(&text)).await;
    c.close().await;
}

/// Topic permissions (`rabbitmqctl set_topic_permissions`), as probed on RabbitMQ 3.10.8:
/// on a topic exchange, publishing needs the routing key to match `write` and binding from
/// it (queue.bind, queue.unbind, exchange.bind with it as source) the binding key to match
/// `read`; `{username}` is expanded; other exchange types ignore them; clearing them applies
/// to open connections.
#[tokio::test]
async fn topic_permissions_limit_the_routing_keys_of_topic_exchanges() {
    let broker = TestBroker::start().await;
    let vhost = broker.vhost();
    let user = new_user(&broker).await;
    broker.set_permissions(&vhost, &user, "", ".*", ".*").await;
    let p = broker.unique_name("topic");
    let (topic, direct, q) = (format!("{p}-t"), format!("{p}-d"), format!("{p}-q"));
    let admin_conn = broker.connect().await;
    let admin = channel(&admin_conn).await;
    for (name, kind) in [
        (&topic, ExchangeKind::Topic),
        (&direct, ExchangeKind::Direct),
    ] {
        declare_exchange(
            &admin,
            name,
            kind,
            Default::default(),
            FieldTable::default(),
        )
        .await;
    }
    declare(&admin, &q).await;
    broker
        .set_topic_permissions(&vhost, &user, &topic, r"^(a|{username})\.", r"^r\.")
        .await;
    broker
        .set_topic_permissions(&vhost, &user, &direct, "^a", "^r")
        .await;
    let conn = connect_to(&broker.url_as(&user, PASSWORD, &vhost)).await;
    let refused_topic = |key: &str| {
        format!(
            "ACCESS_REFUSED - access to topic '{key}' in exchange '{topic}' in vhost '{vhost}' refused for user '{user}'"
        )
    };

    for key in ["a.1".to_owned(), format!("{user}.1")] {
        let confirmation = publish(channel(&conn).await, &topic, &key).await;
        assert!(confirmation.is_ok_and(|c| c.is_ack()), "{key} is allowed");
    }
    let err = expect_err(
        "publishing b.1",
        publish(channel(&conn).await, &topic, "b.1").await,
    );
    assert_amqp_error(&err, 403, Some(&refused_topic("b.1")));
    let confirmation = publish(channel(&conn).await, &direct, "b.1").await;
    assert!(
        confirmation.is_ok_and(|c| c.is_ack()),
        "a direct exchange ignores topic permissions"
    );

    let bind = |ch: Channel, key: &'static str| {
        let (q, topic) = (q.clone(), topic.clone());
        async move {
            within(
                "queue.bind",
                ch.queue_bind(
                    q.as_str().into(),
                    topic.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await
        }
    };
    bind(channel(&conn).await, "r.#")
        .await
        .expect("r.# may be bound");
    let err = expect_err("binding a.#", bind(channel(&conn).await, "a.#").await);
    assert_amqp_error(&err, 403, Some(&refused_topic("a.#")));
    let ch = channel(&conn).await;
    let result = within(
        "queue.unbind",
        ch.queue_unbind(
            q.as_str().into(),
            topic.as_str().into(),
            "a.#".into(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        &expect_err("unbinding a.#", result),
        403,
        Some(&refused_topic("a.#")),
    );
    let ch = channel(&conn).await;
    let result = within(
        "exchange.bind",
        ch.exchange_bind(
            direct.as_str().into(),
            topic.as_str().into(),
            "a.#".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        &expect_err("binding from the topic exchange with a.#", result),
        403,
        Some(&refused_topic("a.#")),
    );

    // Cleared, every key goes, on the open connection too.
    broker.clear_topic_permissions(&vhost, &user, &topic).await;
    let confirmation = publish(channel(&conn).await, &topic, "b.1").await;
    assert!(confirmation.is_ok_and(|c| c.is_ack()), "b.1 once cleared");

    for name in [&topic, &direct] {
        within(
            "exchange.delete",
            admin.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()),
        )
        .await
        .expect("exchange.delete");
    }
    within(
        "queue.delete",
        admin.queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("queue.delete");
    close_conn(&conn).await;
    close_conn(&admin_conn).await;
}

/// A user tagged `impersonator` may publish with another user's name as `user_id`; without
/// the tag that is 406. As probed on RabbitMQ 3.10.8: tags are read at login (a connection
/// opened before the tag was set is still refused, and one opened before it was cleared
/// still may), compared exactly (`Impersonator` is another tag), and the message keeps the
/// `user_id` it was published with.
#[tokio::test]
async fn an_impersonator_may_publish_as_another_user_from_its_next_login() {
    let broker = TestBroker::start().await;
    let vhost = broker.vhost();
    let user = new_user(&broker).await;
    broker
        .set_permissions(&vhost, &user, ".*", ".*", ".*")
        .await;
    let url = broker.url_as(&user, PASSWORD, &vhost);
    let q = broker.unique_name("impersonated");
    let admin_conn = broker.connect().await;
    let admin = channel(&admin_conn).await;
    declare(&admin, &q).await;
    let as_someone_else = amq_protocol::protocol::basic::AMQPProperties::default()
        .with_user_id("someone-else".into());
    let refused_text = user_id_refused("someone-else", &user);
    let expect_refused = async |c: &mut RawClient| {
        c.open_channel(1).await;
        c.publish_full(1, "", &q, false, b"m", as_someone_else.clone())
            .await;
        c.expect_channel_close(1, 406, Some(&refused_text)).await;
    };
    // A channel of its own each time: the one it published on stays open.
    let expect_accepted = async |c: &mut RawClient, ch: u16| {
        c.open_channel(ch).await;
        c.publish_full(ch, "", &q, false, b"m", as_someone_else.clone())
            .await;
        let got = get_eventually(&admin, &q, true).await;
        assert_eq!(user_id_of(&got), Some("someone-else"));
    };

    let mut before_tag = RawClient::open(&url).await;
    expect_refused(&mut before_tag).await;
    broker
        .set_user_tags(&user, &["monitoring", "impersonator"])
        .await;
    expect_refused(&mut before_tag).await;
    let mut tagged = RawClient::open(&url).await;
    expect_accepted(&mut tagged, 1).await;

    broker.set_user_tags(&user, &["Impersonator"]).await;
    expect_accepted(&mut tagged, 2).await;
    let mut wrong_case = RawClient::open(&url).await;
    expect_refused(&mut wrong_case).await;
    broker.set_user_tags(&user, &[]).await;
    let mut untagged = RawClient::open(&url).await;
    expect_refused(&mut untagged).await;
    for c in [before_tag, tagged, wrong_case, untagged] {
        c.close().await;
    }
    // A user deleted and added again starts without tags.
    broker.set_user_tags(&user, &["impersonator"]).await;
    broker.delete_user(&user).await;
    broker.add_user(&user, PASSWORD).await;
    broker
        .set_permissions(&vhost, &user, ".*", ".*", ".*")
        .await;
    let mut added_again = RawClient::open(&url).await;
    expect_refused(&mut added_again).await;
    added_again.close().await;
    close_conn(&admin_conn).await;
}

/// A configured user comes with its tags from the first connection on, and the default
/// `guest` is tagged `administrator`, as RabbitMQ's is.
#[tokio::test]
#[cfg_attr(warren_external, ignore = "embedded only: the broker's configuration")]
async fn embedded_only_configured_users_have_their_tags_from_the_start() {
    assert_eq!(
        warren_broker::BrokerConfig::default().users,
        [warren_broker::User::guest()]
    );
    let broker = TestBroker::start_embedded(warren_broker::BrokerConfig {
        users: vec![
            warren_broker::User::guest(),
            warren_broker::User::new("relay", PASSWORD).with_tags(&["impersonator"]),
        ],
        ..Default::default()
    })
    .await;
    let handle = broker.embedded().expect("embedded");
    assert_eq!(handle.user_tags("guest").unwrap(), ["administrator"]);
    let q = broker.unique_name("relayed");
    let mut c = RawClient::open_on_channel(&broker.url_as("relay", PASSWORD, "/"), 1).await;
    c.declare_queue(1, &q).await;
    let as_guest =
        amq_protocol::protocol::basic::AMQPProperties::default().with_user_id("guest".into());
    c.publish_full(1, "", &q, false, b"m", as_guest).await;
    let admin = broker.connect().await;
    let got = get_eventually(&channel(&admin).await, &q, true).await;
    assert_eq!(user_id_of(&got), Some("guest"));
    c.close().await;
    close_conn(&admin).await;
}

/// Permission patterns are PCRE's, as RabbitMQ's: a negative look-ahead carves names out of
/// what a user may configure.
#[tokio::test]
async fn permission_patterns_may_look_ahead() {
    let broker = TestBroker::start().await;
    let user = new_user(&broker).await;
    let p = broker.unique_name("perm-pcre");
    broker
        .set_permissions(&broker.vhost(), &user, &format!("^{p}-(?!locked)"), "", "")
        .await;
    let conn = connect_to(&broker.url_as(&user, PASSWORD, &broker.vhost())).await;
    let (open, locked) = (
        broker.unique_name(&format!("{p}-open")),
        broker.unique_name(&format!("{p}-locked")),
    );
    let ch = channel(&conn).await;
    declare(&ch, &open).await;
    let result = within(
        "queue.declare",
        ch.queue_declare(
            locked.as_str().into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let err = expect_err("declaring a queue the look-ahead excludes", result);
    assert_amqp_error(&err, 403, Some(&refused(&broker, &user, "queue", &locked)));
    let ch = channel(&conn).await;
    within(
        "queue.delete",
        ch.queue_delete(open.as_str().into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("deleting the queue it may configure");
    close_conn(&conn).await;
}
