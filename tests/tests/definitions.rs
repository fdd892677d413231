//! RabbitMQ definitions (`rabbitmqctl export_definitions`'s JSON), loaded with
//! `TestBroker::load_definitions` (`rabbitmqctl import_definitions` on RabbitMQ): the
//! topology a team keeps for its RabbitMQ, ready before the service under test starts.

use lapin::Confirmation;
use warren_harness::TestBroker;
use warren_tests::{close_conn, confirm_channel, get_eventually, publish_confirmed_to};

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
    // For a pattern the regex crate refuses (PCRE's look-ahead), after a valid policy.
    let err = refused_untouched(
        r#"{"vhosts": [{"name": "never"}],
            "policies": [{"vhost": "/", "name": "ok", "pattern": ".*", "definition": {"max-length": 5}},
                         {"vhost": "/", "name": "p", "pattern": "^(?!amq\\.).*", "definition": {"max-length": 1}}]}"#,
    );
    assert!(err.starts_with("policy 'p' in vhost '/': pattern"), "{err}");
    assert!(handle.policies().is_empty(), "no policy set");
    // Users are left out (their passwords are hashes), and counted.
    let loaded = handle
        .load_definitions(r#"{"users": [{"name": "app", "password_hash": "x", "tags": []}]}"#)
        .expect("loaded");
    assert_eq!(loaded.users_ignored, 1);
    assert!(handle.load_definitions("[]").is_err());
}
