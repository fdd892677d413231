//! Definitions and policies from generated JSON (embedded only: they are an operator's input,
//! loaded through `BrokerHandle::load_definitions`): whatever the document, the load answers
//! `Ok` or a named refusal, never panics, counts no more than the document holds, and the
//! broker still serves a client afterwards. The documents mix RabbitMQ's own keys (objects,
//! policy keys, queue arguments) with wrong types, out-of-range numbers and bad patterns.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;
use warren_broker::{Broker, BrokerConfig};
use warren_tests::{TIMEOUT, close_conn, declare};

/// Generated documents per run, and most shrinking steps after a failure.
const CASES: u32 = 256;
const SHRINK: u32 = 256;

/// The keys of a definitions document's objects (with [`POLICY_KEYS`] and [`QUEUE_ARGS`],
/// every key generated objects take).
const KEYS: &[&str] = &[
    "name",
    "vhost",
    "type",
    "durable",
    "auto_delete",
    "internal",
    "arguments",
    "pattern",
    "apply-to",
    "priority",
    "definition",
    "source",
    "destination",
    "destination_type",
    "routing_key",
];

/// A policy definition's keys.
const POLICY_KEYS: &[&str] = &[
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "overflow",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "delivery-limit",
    "alternate-exchange",
    "ha-mode",
    "queue-mode",
    "queue-version",
    "max-age",
];

/// A queue's arguments.
const QUEUE_ARGS: &[&str] = &[
    "x-queue-type",
    "x-max-length",
    "x-message-ttl",
    "x-expires",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-max-priority",
    "x-single-active-consumer",
    "x-delivery-limit",
];

/// The strings RabbitMQ's objects take, and some they refuse.
const WORDS: &[&str] = &[
    "",
    "/",
    "q",
    "x",
    "v",
    "queue",
    "exchange",
    "direct",
    "topic",
    "fanout",
    "headers",
    "bogus",
    "all",
    "queues",
    "exchanges",
    ".*",
    "^q$",
    "(unclosed",
    "lazy",
    "exactly",
    "drop-head",
    "reject-publish",
    "reject-publish-dlx",
    "quorum",
    "classic",
    "stream",
    "1D",
    "amq.direct",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![
            Just(-1i64),
            Just(0),
            Just(1),
            Just(2),
            Just(256),
            Just(i64::MAX),
            any::<i64>()
        ]
        .prop_map(Value::from),
        Just(Value::from(1.5)),
        prop::sample::select(WORDS).prop_map(Value::from),
        "[a-z/.*()^$-]{0,8}".prop_map(Value::from),
    ]
}

fn object(value: BoxedStrategy<Value>) -> impl Strategy<Value = Value> {
    let keys: Vec<&str> = [KEYS, POLICY_KEYS, QUEUE_ARGS].concat();
    prop::collection::vec((prop::sample::select(keys), value), 0..8).prop_map(|pairs| {
        Value::Object(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    })
}

fn value() -> BoxedStrategy<Value> {
    leaf()
        .prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                object(inner.boxed()),
            ]
        })
        .boxed()
}

/// A small set of names, so that bindings and policies meet the queues and exchanges.
fn name() -> impl Strategy<Value = Value> {
    prop::sample::select(&["q", "x", "a", "b", "amq.direct", "", "v"][..]).prop_map(Value::from)
}

/// A value RabbitMQ takes for `key`.
fn good(key: &'static str) -> BoxedStrategy<Value> {
    let words = |w: &'static [&'static str]| prop::sample::select(w).prop_map(Value::from).boxed();
    match key {
        "overflow" | "x-overflow" => words(&["drop-head", "reject-publish", "reject-publish-dlx"]),
        "dead-letter-exchange"
        | "dead-letter-routing-key"
        | "alternate-exchange"
        | "x-dead-letter-exchange" => words(&["x", "amq.direct", ""]),
        "ha-mode" => words(&["all"]),
        "queue-mode" => words(&["lazy", "default"]),
        "max-age" => words(&["1D", "7h"]),
        "x-queue-type" => words(&["classic", "quorum"]),
        "x-single-active-consumer" => any::<bool>().prop_map(Value::from).boxed(),
        "queue-version" => (1u64..3).prop_map(Value::from).boxed(),
        _ => (0u64..20).prop_map(Value::from).boxed(),
    }
}

/// Pairs of `keys` with values, mostly ones RabbitMQ takes: a policy definition or arguments.
fn settings(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let pair = prop::sample::select(keys)
        .prop_flat_map(|key| prop_oneof![12 => good(key), 1 => leaf()].prop_map(move |v| (key, v)));
    prop::collection::vec(pair, 1..4).prop_map(|pairs| {
        Value::Object(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    })
}

/// One object of RabbitMQ's kind `list`, well formed but for its generated values, and now
/// and then with generated keys over it.
fn entry(list: &'static str) -> BoxedStrategy<Value> {
    let vhost = prop_oneof![3 => Just(Value::from("/")), 1 => name()];
    let flag = any::<bool>().prop_map(Value::from);
    let base: BoxedStrategy<Value> = match list {
        "vhosts" => name().prop_map(|n| serde_json::json!({"name": n})).boxed(),
        "policies" => (
            name(),
            vhost,
            prop_oneof![
                8 => prop::sample::select(&[".*", "^q$", "^x", "a|b", "(unclosed"][..])
                    .prop_map(Value::from),
                1 => leaf(),
            ],
            prop::sample::select(&["all", "queues", "exchanges", "all", "queues", "bogus"][..]),
            prop_oneof![8 => (-2i64..3).prop_map(Value::from), 1 => leaf()],
            settings(POLICY_KEYS),
        )
            .prop_map(|(n, v, pattern, apply, priority, definition)| {
                serde_json::json!({"name": n, "vhost": v, "pattern": pattern,
                    "apply-to": apply, "priority": priority, "definition": definition})
            })
            .boxed(),
        "queues" => (name(), vhost, flag.clone(), flag, settings(QUEUE_ARGS))
            .prop_map(|(n, v, durable, auto_delete, arguments)| {
                serde_json::json!({"name": n, "vhost": v, "durable": durable,
                    "auto_delete": auto_delete, "arguments": arguments})
            })
            .boxed(),
        "exchanges" => (
            name(),
            vhost,
            prop::sample::select(&["direct", "topic", "fanout", "headers", "bogus"][..]),
            flag.clone(),
            flag,
            settings(&["alternate-exchange", "x-bogus"]),
        )
            .prop_map(|(n, v, kind, durable, internal, arguments)| {
                serde_json::json!({"name": n, "vhost": v, "type": kind, "durable": durable,
                    "auto_delete": false, "internal": internal, "arguments": arguments})
            })
            .boxed(),
        _ => (
            name(),
            vhost,
            name(),
            prop::sample::select(&["queue", "exchange", "bogus"][..]),
            leaf(),
        )
            .prop_map(|(source, v, destination, kind, key)| {
                serde_json::json!({"source": source, "vhost": v, "destination": destination,
                    "destination_type": kind, "routing_key": key, "arguments": {}})
            })
            .boxed(),
    };
    prop_oneof![
        8 => base.clone(),
        1 => (base, object(value())).prop_map(|(mut entry, over)| {
            if let (Value::Object(entry), Value::Object(over)) = (&mut entry, over) {
                entry.extend(over);
            }
            entry
        }),
    ]
    .boxed()
}

/// A document: some of RabbitMQ's lists, each of generated objects, or a stray value.
fn document() -> impl Strategy<Value = Value> {
    let lists = ["vhosts", "policies", "queues", "exchanges", "bindings"].map(|list| {
        prop::option::weighted(0.7, prop::collection::vec(entry(list), 0..4))
            .prop_map(move |entries| entries.map(|e| (list, Value::Array(e))))
    });
    prop_oneof![
        9 => lists.prop_map(|lists| Value::Object(
            lists
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.to_owned(), v))
                .collect()
        )),
        1 => value(),
    ]
}

fn listed(document: &Value, key: &str) -> usize {
    document
        .get(key)
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

#[cfg_attr(
    warren_external,
    ignore = "definitions are loaded into the embedded broker"
)]
#[test]
fn generated_definitions_load_or_are_refused_and_the_broker_serves_on() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let handle = runtime
        .block_on(Broker::start(BrokerConfig::default()))
        .expect("start");
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        max_shrink_iters: SHRINK,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&document(), |document| {
            let text = document.to_string();
            let _entered = runtime.enter();
            if let Ok(loaded) = handle.load_definitions(&text) {
                prop_assert!(loaded.vhosts <= listed(&document, "vhosts"), "{loaded:?}");
                prop_assert!(loaded.policies <= listed(&document, "policies"));
                prop_assert!(loaded.queues <= listed(&document, "queues"));
                prop_assert!(loaded.exchanges <= listed(&document, "exchanges"));
                prop_assert!(loaded.bindings <= listed(&document, "bindings"));
            }
            // The broker's state stays readable.
            let _ = handle.queues();
            let _ = handle.policies();
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    runtime.block_on(async {
        let conn = tokio::time::timeout(
            TIMEOUT,
            lapin::Connection::connect(&handle.url(), lapin::ConnectionProperties::default()),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        declare(&ch, "after-the-generated-definitions").await;
        close_conn(&conn).await;
    });
}
