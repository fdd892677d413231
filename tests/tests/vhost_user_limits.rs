//! Vhost and user limits (`TestBroker::set_vhost_limits` and `set_user_limits`:
//! `rabbitmqctl set_vhost_limits` / `set_user_limits` on RabbitMQ), as RabbitMQ 3.10 refuses
//! what goes beyond them: connections and queues of a vhost, connections and channels of a
//! user.

use lapin::types::FieldTable;
use warren_broker::{UserLimits, VhostLimits};
use warren_harness::{TestBroker, connect_to};
use warren_tests::{
    assert_amqp_error, channel, close_conn, declare, declare_with, expect_err, refused_connection,
    within,
};

#[tokio::test]
async fn a_vhost_refuses_connections_and_queues_beyond_its_limits() {
    let broker = TestBroker::start().await;
    let vhost = broker.unique_name("limited");
    broker.add_vhost(&vhost).await;
    let one = Some(1);
    let limits = VhostLimits {
        max_connections: one,
        max_queues: one,
    };
    broker.set_vhost_limits(&vhost, limits).await;
    let url = broker.url_for(&vhost);
    let conn = connect_to(&url).await;
    let err = refused_connection(&url).await;
    let vhost_refusal = |user: &str| {
        format!(
            "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}': connection limit \
             (1) is reached"
        )
    };
    assert_amqp_error(&err, 530, Some(&vhost_refusal("guest")));
    // The vhost's limit is checked before the user's.
    let user = broker.unique_name("no-connections");
    broker.add_user(&user, "secret").await;
    broker
        .set_permissions(&vhost, &user, ".*", ".*", ".*")
        .await;
    let none = UserLimits {
        max_connections: Some(0),
        ..Default::default()
    };
    broker.set_user_limits(&user, none).await;
    let err = refused_connection(&broker.url_as(&user, "secret", &vhost)).await;
    assert_amqp_error(&err, 530, Some(&vhost_refusal(&user)));

    let ch = channel(&conn).await;
    let (first, second) = (broker.unique_name("q1"), broker.unique_name("q2"));
    declare(&ch, &first).await;
    declare(&ch, &first).await; // a redeclare creates nothing
    let err = expect_err(
        "a queue beyond the limit",
        declare_with(&ch, &second, Default::default(), FieldTable::default()).await,
    );
    assert_amqp_error(
        &err,
        406,
        Some(&format!(
            "PRECONDITION_FAILED - cannot declare queue '{second}': queue limit in vhost \
             '{vhost}' (1) is reached"
        )),
    );

    // Raised, the limit lets them in; what was open stays open.
    broker
        .set_vhost_limits(&vhost, VhostLimits::default())
        .await;
    let ch = channel(&conn).await;
    declare(&ch, &second).await;
    let another = connect_to(&url).await;
    close_conn(&another).await;
    close_conn(&conn).await;
}

#[tokio::test]
async fn a_user_is_refused_connections_and_channels_beyond_its_limits() {
    let broker = TestBroker::start().await;
    // Another user's connection and channels, open first, do not count.
    let other = broker.connect().await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(channel(&other).await);
    }
    let user = broker.unique_name("limited-user");
    broker.add_user(&user, "secret").await;
    let vhost = broker.vhost();
    broker
        .set_permissions(&vhost, &user, ".*", ".*", ".*")
        .await;
    let limits = UserLimits {
        max_connections: Some(2),
        max_channels: Some(3),
    };
    broker.set_user_limits(&user, limits).await;
    let url = broker.url_as(&user, "secret", &vhost);
    let (first, second) = (connect_to(&url).await, connect_to(&url).await);
    let err = refused_connection(&url).await;
    assert_amqp_error(
        &err,
        530,
        Some(&format!(
            "NOT_ALLOWED - connection refused for user '{user}': user connection limit (2) is \
             reached"
        )),
    );

    // The channel limit counts the user's channels over both its connections. Kept open:
    // lapin closes a channel whose last handle is dropped.
    let mut open = Vec::new();
    for conn in [&first, &first, &second] {
        let ch = within("channel.open", conn.create_channel())
            .await
            .expect("a channel within the limit");
        open.push(ch);
    }
    let err = expect_err(
        "a channel beyond the limit",
        within("channel.open", second.create_channel()).await,
    );
    assert_amqp_error(
        &err,
        530,
        Some(&format!(
            "NOT_ALLOWED - number of channels opened for user '{user}' has reached the maximum \
             allowed user limit of (3)"
        )),
    );
    assert!(!second.status().connected(), "that connection is closed");
    assert!(
        first.status().connected(),
        "the user's other connection goes on"
    );
    within("channel.open", other.create_channel())
        .await
        .expect("the other user's connection goes on");
    close_conn(&first).await;
    close_conn(&other).await;
}

/// Limits come with definitions: a user's `limits`, and a vhost's as the `vhost-limits`
/// runtime parameter `rabbitmqctl export_definitions` writes.
#[tokio::test]
async fn limits_come_with_definitions() {
    let broker = TestBroker::start().await;
    let vhost = broker.unique_name("defs-limited");
    let user = broker.unique_name("defs-limited-user");
    let json = format!(
        r#"{{
  "vhosts": [{{"name": "{vhost}"}}],
  "users": [{{"name": "{user}", "password": "secret", "tags": [], "limits": {{"max-connections": 1, "max-channels": -1}}}}],
  "permissions": [{{"user": "{user}", "vhost": "{vhost}", "configure": ".*", "write": ".*", "read": ".*"}}],
  "parameters": [{{"component": "vhost-limits", "name": "limits", "vhost": "{vhost}", "value": {{"max-queues": 0}}}}]
}}"#
    );
    broker.load_definitions(&json).await;
    let url = broker.url_as(&user, "secret", &vhost);
    let conn = connect_to(&url).await;
    let err = refused_connection(&url).await;
    assert_amqp_error(
        &err,
        530,
        Some(&format!(
            "NOT_ALLOWED - connection refused for user '{user}': user connection limit (1) is \
             reached"
        )),
    );
    let ch = channel(&conn).await;
    let q = broker.unique_name("none-allowed");
    let err = expect_err(
        "a queue in a vhost that allows none",
        declare_with(&ch, &q, Default::default(), FieldTable::default()).await,
    );
    assert_amqp_error(
        &err,
        406,
        Some(&format!(
            "PRECONDITION_FAILED - cannot declare queue '{q}': queue limit in vhost '{vhost}' \
             (0) is reached"
        )),
    );
    close_conn(&conn).await;
}
