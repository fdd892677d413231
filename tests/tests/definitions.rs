//! RabbitMQ definitions (`rabbitmqctl export_definitions`'s JSON), loaded with
//! `TestBroker::load_definitions` (`rabbitmqctl import_definitions` on RabbitMQ): the
//! topology a team keeps for its RabbitMQ, ready before the service under test starts.

use lapin::Confirmation;
use lapin::types::FieldTable;
use warren_harness::{TestBroker, connect_to};
use warren_tests::raw::RawClient;
use warren_tests::{
    PLAIN_LOGIN_REFUSED, assert_amqp_error, channel, close_conn, confirm_channel, declare,
    declare_with, expect_err, get_eventually, publish_confirmed_to, refused_connection,
    user_id_refused, within,
};

#[tokio::test]
async fn definitions_declare_exchanges_queues_bindings_and_policies() {
    let broker = TestBroker::start().await;
    let exchange = broker.unique_name("defs-x");
    let jobs = broker.unique_name("defs-jobs");
    let dead = broker.unique_name("defs-dead");
    let json = format!(
        r#"{{
  "rabbit_version": "3.10.8",
  "policies": [{{"vhost": "/", "name": "{jobs}", "pattern": "^{jobs}$", "apply-to": "queues",
                 "definition": {{"dead-letter-exchange": "", "dead-letter-routing-key": "{dead}"}}, "priority": 0}}],
  "queues": [
    {{"name": "{jobs}", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {{"x-max-length": 1}}}},
    {{"name": "{dead}", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {{}}}}
  ],
  "exchanges": [{{"name": "{exchange}", "vhost": "/", "type": "topic", "durable": true, "auto_delete": false,
                  "internal": false, "arguments": {{}}}}],
  "bindings": [{{"source": "{exchange}", "vhost": "/", "destination": "{jobs}", "destination_type": "queue",
                 "routing_key": "job.*", "arguments": {{}}}}]
}}"#
    );
    broker.load_definitions(&json).await;
    if let Some(handle) = broker.embedded() {
        assert_eq!(
            handle.queue(&jobs).and_then(|q| q.policy),
            Some(jobs.clone())
        );
    }

    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    // Routed by the binding; the queue's x-max-length argument drops the older one, which the
    // policy's dead-lettering sends on.
    for body in [b"one", b"two"] {
        let confirmation = publish_confirmed_to(&ch, &exchange, "job.mail", body, true).await;
        assert_eq!(
            confirmation,
            Confirmation::Ack(None),
            "routed: not returned"
        );
    }
    assert_eq!(get_eventually(&ch, &dead, true).await.delivery.data, b"one");
    assert_eq!(get_eventually(&ch, &jobs, true).await.delivery.data, b"two");
    let stray = publish_confirmed_to(&ch, &exchange, "other", b"x", true).await;
    assert!(matches!(stray, Confirmation::Ack(Some(_))), "{stray:?}");
    close_conn(&conn).await;
}

#[cfg_attr(warren_external, ignore = "the embedded broker's own refusal")]
#[tokio::test]
async fn embedded_only_a_refused_object_stops_the_load_and_names_it() {
    let broker = TestBroker::start().await;
    let handle = broker.embedded().expect("embedded");
    let err = handle
        .load_definitions(
            r#"{"queues": [{"name": "ok", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}},
                           {"name": "bad", "vhost": "/", "durable": true, "auto_delete": false,
                            "arguments": {"x-max-length": -1}}]}"#,
        )
        .expect_err("refused");
    assert_eq!(
        err.to_string(),
        "queue 'bad' in vhost '/': 406 PRECONDITION_FAILED - invalid arg 'x-max-length' for queue 'bad' in vhost '/': {value_negative,-1}"
    );
    assert!(handle.queue("ok").is_some(), "what came before stays");
    // A policy refused stops the load before anything is created (the document's vhost
    // `never` included): its error, in words.
    let refused_untouched = |json: &str| {
        let err = handle.load_definitions(json).expect_err("refused");
        assert!(
            !handle.vhosts().contains(&"never".to_owned()),
            "no vhost added"
        );
        err.to_string()
    };
    // For its keys.
    let err = refused_untouched(
        r#"{"vhosts": [{"name": "never"}],
            "policies": [{"vhost": "/", "name": "p", "pattern": ".*", "apply-to": "queues",
                          "priority": 0, "definition": {"federation-upstream-set": "all"}}]}"#,
    );
    assert!(err.contains("are not recognised policy settings"), "{err}");
    // For a pattern that is no regular expression, after a valid policy.
    let err = refused_untouched(
        r#"{"vhosts": [{"name": "never"}],
            "policies": [{"vhost": "/", "name": "ok", "pattern": ".*", "definition": {"max-length": 5}},
                         {"vhost": "/", "name": "p", "pattern": "(unclosed", "definition": {"max-length": 1}}]}"#,
    );
    assert!(err.starts_with("policy 'p' in vhost '/': pattern"), "{err}");
    assert!(handle.policies().is_empty(), "no policy set");
    // Users and permission patterns are checked before anything is created too.
    for (json, reason) in [
        (
            r#"{"vhosts": [{"name": "never"}], "users": [{"name": "u", "password": "p", "password_hash": "AQIDBA==", "tags": []}]}"#,
            "user 'u': both password and password_hash are provided",
        ),
        (
            r#"{"vhosts": [{"name": "never"}], "users": [{"name": "u", "password": "p"}]}"#,
            "user 'u': tags_not_present",
        ),
        (
            // RabbitMQ 3.10.8: function_clause, also for a null or 2.5 in the list.
            r#"{"vhosts": [{"name": "never"}], "users": [{"name": "u", "password": "p", "tags": 5}]}"#,
            "user 'u': tags must be a list of strings or a string",
        ),
        (
            r#"{"vhosts": [{"name": "never"}], "users": [{"name": "u", "password": "p", "tags": [null]}]}"#,
            "user 'u': tags must be a list of strings or a string",
        ),
        (
            r#"{"vhosts": [{"name": "never"}], "users": [{"name": "u", "password": "p", "administrator": "yes"}]}"#,
            "user 'u': {not_boolean,\"yes\"}",
        ),
        (
            r#"{"vhosts": [{"name": "never"}], "users": [{"name": "u", "password_hash": "not base64!", "tags": []}]}"#,
            "user 'u': password_hash is not base64",
        ),
        (
            r#"{"vhosts": [{"name": "never"}], "users": [{"name": "u", "password": "p", "tags": []}],
                "permissions": [{"user": "u", "vhost": "/", "configure": "(", "write": "", "read": ""}]}"#,
            "permissions of user 'u' in vhost '/': invalid regular expression '('",
        ),
        (
            r#"{"vhosts": [{"name": "never"}], "users": [{"name": "u", "password": "p", "tags": []}],
                "topic_permissions": [{"user": "u", "vhost": "/", "exchange": "x", "write": "", "read": "("}]}"#,
            "topic permissions of user 'u' on exchange 'x' in vhost '/': invalid regular expression '('",
        ),
    ] {
        assert_eq!(refused_untouched(json), reason);
        assert_eq!(handle.users(), ["guest"], "no user added");
    }
    // Permissions of a user that is nowhere are refused when they are set (RabbitMQ:
    // `no_such_user`), after the users and vhosts before them.
    let err = handle
        .load_definitions(
            r#"{"users": [{"name": "first", "password": "p", "tags": []}],
                "permissions": [{"user": "nobody", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}]}"#,
        )
        .expect_err("refused");
    assert_eq!(
        err.to_string(),
        "permissions of user 'nobody' in vhost '/': no such user 'nobody'"
    );
    assert!(handle.users().contains(&"first".to_owned()));
    assert!(handle.load_definitions("[]").is_err());
}

/// RabbitMQ's `password_hash` of "secret" with SHA-256 (the default `hashing_algorithm`),
/// salt 01 02 03 04.
const SECRET_SHA256: &str = "AQIDBDB9kM21iEUzN1lZ+6VReCsdNqS0sERdAQTcY6Xs3PMz";
/// RabbitMQ's MD5 `password_hash` (before 3.6.0) of "old", salt 01 02 03 04.
const OLD_MD5: &str = "AQIDBGxb0KNJl2lwiTXCqEm6tzM=";
/// The same with SHA-512, salt 09 08 07 06, of "secret5".
const SECRET5_SHA512: &str =
    "CQgHBpMTJ5jX6mPK2LLBcbWDhf0PohTKKhzFlNCi28YLeGe46//nFLhlqSPjV+HjAN8jTqyK9912CKqpKULObCJ4Hzo=";

#[tokio::test]
async fn definitions_users_log_in_with_their_exported_hashes_and_get_their_permissions() {
    let broker = TestBroker::start().await;
    let vhost = broker.vhost();
    let (app, ops, plain) = (
        broker.unique_name("defs-app"),
        broker.unique_name("defs-ops"),
        broker.unique_name("defs-plain"),
    );
    let q = broker.unique_name("defs-q");
    let json = format!(
        r#"{{
  "users": [
    {{"name": "{app}", "password_hash": "{SECRET_SHA256}", "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": [], "limits": {{}}}},
    {{"name": "{ops}", "password_hash": "{SECRET5_SHA512}", "hashing_algorithm": "rabbit_password_hashing_sha512", "tags": ["administrator"]}},
    {{"name": "{plain}", "password": "clear", "tags": []}}
  ],
  "topic_permissions": [
    {{"user": "{app}", "vhost": "{vhost}", "exchange": "amq.topic", "write": "^{{username}}\\.", "read": ".*"}}
  ],
  "permissions": [
    {{"user": "{app}", "vhost": "{vhost}", "configure": "^{q}$", "write": ".*", "read": ".*"}},
    {{"user": "{ops}", "vhost": "{vhost}", "configure": ".*", "write": ".*", "read": ".*"}},
    {{"user": "{plain}", "vhost": "{vhost}", "configure": ".*", "write": ".*", "read": ".*"}}
  ]
}}"#
    );
    broker.load_definitions(&json).await;

    for (user, password) in [(&app, "secret"), (&ops, "secret5"), (&plain, "clear")] {
        let conn = connect_to(&broker.url_as(user, password, &vhost)).await;
        close_conn(&conn).await;
        let err = refused_connection(&broker.url_as(user, "not-the-password", &vhost)).await;
        assert_amqp_error(&err, 403, Some(PLAIN_LOGIN_REFUSED));
    }
    // Without a hashing_algorithm, an export from before 3.6.0 means MD5; an algorithm
    // RabbitMQ does not have is taken, and lets no password in; nor does an empty password.
    let (old, unknown, empty) = (
        broker.unique_name("defs-old"),
        broker.unique_name("defs-unknown"),
        broker.unique_name("defs-empty"),
    );
    let json = format!(
        r#"{{
  "rabbit_version": "3.5.7",
  "users": [
    {{"name": "{old}", "password_hash": "{OLD_MD5}", "tags": ""}},
    {{"name": "{unknown}", "password_hash": "{SECRET_SHA256}", "hashing_algorithm": "bcrypt", "tags": ""}},
    {{"name": "{empty}", "password": "", "tags": ""}}
  ],
  "permissions": [
    {{"user": "{old}", "vhost": "{vhost}", "configure": ".*", "write": ".*", "read": ".*"}},
    {{"user": "{unknown}", "vhost": "{vhost}", "configure": ".*", "write": ".*", "read": ".*"}},
    {{"user": "{empty}", "vhost": "{vhost}", "configure": ".*", "write": ".*", "read": ".*"}}
  ]
}}"#
    );
    broker.load_definitions(&json).await;
    let conn = connect_to(&broker.url_as(&old, "old", &vhost)).await;
    close_conn(&conn).await;
    for (user, password) in [(&unknown, "secret"), (&empty, "")] {
        let err = refused_connection(&broker.url_as(user, password, &vhost)).await;
        assert_amqp_error(&err, 403, None);
    }

    // The topic permissions came along: app publishes to amq.topic under its own name only.
    let conn = connect_to(&broker.url_as(&app, "secret", &vhost)).await;
    let ch = confirm_channel(&conn).await;
    let own = publish_confirmed_to(&ch, "amq.topic", &format!("{app}.event"), b"e", false).await;
    assert!(own.is_ack(), "{own:?}");
    let result = within(
        "basic.publish",
        ch.basic_publish(
            "amq.topic".into(),
            "other.event".into(),
            Default::default(),
            b"e",
            Default::default(),
        ),
    )
    .await;
    let result = match result {
        Ok(confirm) => within("the confirm", confirm).await,
        Err(e) => Err(e),
    };
    assert_amqp_error(
        &expect_err("publishing under another name", result),
        403,
        Some(&format!(
            "ACCESS_REFUSED - access to topic 'other.event' in exchange 'amq.topic' in vhost '{vhost}' refused for user '{app}'"
        )),
    );
    close_conn(&conn).await;
    // The permissions came along: app configures its queue and nothing else.
    let conn = connect_to(&broker.url_as(&app, "secret", &vhost)).await;
    let ch = channel(&conn).await;
    declare(&ch, &q).await;
    let other = broker.unique_name("defs-other");
    let err = expect_err(
        "declaring a queue outside its configure pattern",
        declare_with(&ch, &other, Default::default(), FieldTable::default()).await,
    );
    assert_amqp_error(
        &err,
        403,
        Some(&format!(
            "ACCESS_REFUSED - access to queue '{other}' in vhost '{vhost}' refused for user '{app}'"
        )),
    );
    let admin = broker.connect().await;
    let ch = channel(&admin).await;
    within(
        "queue.delete",
        ch.queue_delete(q.as_str().into(), Default::default()),
    )
    .await
    .expect("queue.delete");
    close_conn(&admin).await;
    close_conn(&conn).await;
}

/// Users' tags come along, in each form RabbitMQ 3.10.8 reads (probed): a list (spaces
/// stripped from each tag's ends, and only spaces), a comma-separated string, or the oldest
/// exports' `"administrator": true`; an import replaces an existing user's tags. What a
/// client sees of them: a user tagged `impersonator` may publish with another user's name as
/// `user_id`.
#[tokio::test]
async fn definitions_users_bring_their_tags() {
    let broker = TestBroker::start().await;
    let vhost = broker.vhost();
    let [listed, spaced, tabbed, joined, untagged, replaced] =
        ["list", "spaced", "tabbed", "joined", "untagged", "replaced"]
            .map(|n| broker.unique_name(&format!("defs-tags-{n}")));
    let users = [
        (&listed, r#"["monitoring", "impersonator"]"#),
        (&spaced, r#"[" impersonator "]"#),
        (&tabbed, r#"["\timpersonator"]"#),
        (&joined, r#""management, impersonator""#),
        (&untagged, r#""""#),
        (&replaced, r#"["impersonator"]"#),
    ];
    let definitions = |users: &[(&String, &str)]| {
        let users: Vec<String> = users
            .iter()
            .map(|(name, tags)| format!(r#"{{"name": "{name}", "password": "p", "tags": {tags}}}"#))
            .collect();
        format!(r#"{{"users": [{}]}}"#, users.join(", "))
    };
    broker.load_definitions(&definitions(&users)).await;
    // The second import of `replaced` drops its tag.
    broker
        .load_definitions(&definitions(&[(&replaced, r#""monitoring""#)]))
        .await;
    let q = broker.unique_name("defs-tags-q");
    let admin_conn = broker.connect().await;
    let admin = channel(&admin_conn).await;
    declare(&admin, &q).await;
    for (user, impersonator) in [
        (&listed, true),
        (&spaced, true),
        (&tabbed, false),
        (&joined, true),
        (&untagged, false),
        (&replaced, false),
    ] {
        broker.set_permissions(&vhost, user, ".*", ".*", ".*").await;
        let mut c = RawClient::open_on_channel(&broker.url_as(user, "p", &vhost), 1).await;
        let as_someone_else = amq_protocol::protocol::basic::AMQPProperties::default()
            .with_user_id("someone-else".into());
        c.publish_full(1, "", &q, false, b"m", as_someone_else)
            .await;
        if impersonator {
            get_eventually(&admin, &q, true).await;
        } else {
            let text = user_id_refused("someone-else", user);
            c.expect_channel_close(1, 406, Some(&text)).await;
        }
        c.close().await;
    }
    if let Some(handle) = broker.embedded() {
        assert_eq!(
            handle.user_tags(&listed).unwrap(),
            ["monitoring", "impersonator"]
        );
        assert_eq!(handle.user_tags(&spaced).unwrap(), ["impersonator"]);
        assert_eq!(handle.user_tags(&tabbed).unwrap(), ["\timpersonator"]);
        assert_eq!(
            handle.user_tags(&joined).unwrap(),
            ["management", "impersonator"]
        );
        assert!(handle.user_tags(&untagged).unwrap().is_empty());
        assert_eq!(handle.user_tags(&replaced).unwrap(), ["monitoring"]);
        // The rarer forms, as RabbitMQ 3.10.8 stores them (rabbitmqctl list_users).
        let rare = r#"{"users": [{"name": "old-admin", "password": "p", "administrator": true},
                                 {"name": "old-text", "password": "p", "administrator": "true"},
                                 {"name": "old-user", "password": "p", "administrator": false},
                                 {"name": "empties", "password": "p", "tags": " , "},
                                 {"name": "doubled", "password": "p", "tags": "a,,b,"},
                                 {"name": "scalars", "password": "p", "tags": [1, true]}]}"#;
        handle.load_definitions(rare).expect("loaded");
        for (user, tags) in [
            ("old-admin", &["administrator"][..]),
            ("old-text", &["administrator"]),
            ("old-user", &[]),
            ("empties", &["", ""]),
            ("doubled", &["a", "b"]),
            ("scalars", &["1", "true"]),
        ] {
            assert_eq!(handle.user_tags(user).unwrap(), tags, "{user}");
        }
    }
    close_conn(&admin_conn).await;
}
