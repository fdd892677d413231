//! Policy keys that RabbitMQ 3.10 accepts but that change nothing on one in-memory node:
//! classic queue mirroring (`ha-*`), `queue-mode`, `queue-version`, the leader locators, the
//! quorum queues' in-memory limits and the streams' settings. Exports of real brokers carry
//! them, so [`super::Policy::from_json`] takes them and keeps them as given; every policy set
//! has them checked as `rabbitmqctl` checks them.

use serde_json::Value;
use std::collections::BTreeMap;

/// Whether `key` is one of them.
pub(super) fn is_inert(key: &str) -> bool {
    KEYS.contains(&key)
}

const KEYS: &[&str] = &[
    "ha-mode",
    "ha-params",
    "ha-sync-mode",
    "ha-sync-batch-size",
    "ha-promote-on-shutdown",
    "ha-promote-on-failure",
    "queue-mode",
    "queue-version",
    "queue-master-locator",
    "queue-leader-locator",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "max-age",
    "stream-max-segment-size-bytes",
    "initial-cluster-size",
];

/// Checks them together (the `ha-*` keys depend on `ha-mode`), in `rabbitmqctl`'s words.
pub(super) fn validate(keys: &BTreeMap<String, Value>) -> Result<(), String> {
    let one_of = |key: &str, allowed: &[&str]| match keys.get(key) {
        Some(v) if !v.as_str().is_some_and(|s| allowed.contains(&s)) => {
            Err(format!("{v} is not a valid {key} value"))
        }
        _ => Ok(()),
    };
    let count = |key: &str, min: u64| match keys.get(key) {
        Some(v) if v.as_u64().is_none_or(|n| n < min) => {
            Err(format!("{v} is not a valid {key} value"))
        }
        _ => Ok(()),
    };
    one_of("ha-mode", &["all", "exactly", "nodes"])?;
    let params = keys.get("ha-params");
    match keys.get("ha-mode").and_then(Value::as_str) {
        None if keys.keys().any(|k| k.starts_with("ha-")) => {
            return Err(
                "ha-mode must be specified to specify ha-params, ha-sync-mode or \
                 ha-promote-on-shutdown"
                    .into(),
            );
        }
        Some("exactly") if params.and_then(Value::as_u64).is_none_or(|n| n == 0) => {
            return Err(match params {
                None => "ha-mode=\"exactly\" takes an integer, none given".into(),
                Some(p) => format!("ha-mode=\"exactly\" takes an integer, {p} given"),
            });
        }
        Some("nodes")
            if params
                .and_then(Value::as_array)
                .is_none_or(|a| a.is_empty()) =>
        {
            return Err(match params {
                None => "ha-mode=\"nodes\" takes a list, none given".into(),
                Some(p) => format!("ha-mode=\"nodes\" takes a non-empty list, {p} given"),
            });
        }
        Some("all") if params.is_some() => {
            return Err(format!(
                "ha-mode=\"all\" does not take parameters, {} given",
                params.map_or_else(String::new, Value::to_string)
            ));
        }
        _ => {}
    }
    one_of("ha-sync-mode", &["manual", "automatic"])?;
    one_of("ha-promote-on-shutdown", &["always", "when-synced"])?;
    one_of("ha-promote-on-failure", &["always", "when-synced"])?;
    count("ha-sync-batch-size", 1)?;
    one_of("queue-mode", &["default", "lazy"])?;
    match keys.get("queue-version") {
        Some(v) if !matches!(v.as_u64(), Some(1 | 2)) => {
            return Err(format!("{v} is not a valid queue-version value"));
        }
        _ => {}
    }
    one_of(
        "queue-master-locator",
        &["min-masters", "client-local", "random"],
    )?;
    one_of(
        "queue-leader-locator",
        &["client-local", "balanced", "random", "least-leaders"],
    )?;
    count("max-in-memory-length", 0)?;
    count("max-in-memory-bytes", 0)?;
    count("stream-max-segment-size-bytes", 0)?;
    count("initial-cluster-size", 0)?;
    match keys.get("max-age") {
        Some(v) if !v.as_str().is_some_and(is_age) => {
            Err(format!("{v} is not a valid max-age value"))
        }
        _ => Ok(()),
    }
}

/// A stream's `max-age`: a number and one of the units Y, M, D, h, m, s (`7D`).
fn is_age(text: &str) -> bool {
    let digits = text.trim_end_matches(['Y', 'M', 'D', 'h', 'm', 's']);
    text.len() == digits.len() + 1
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::validate;
    use serde_json::{Value, json};
    use std::collections::BTreeMap;

    fn keys(value: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(value).expect("an object")
    }

    #[test]
    fn accepts_what_rabbitmq_accepts() {
        for ok in [
            json!({"ha-mode": "all"}),
            json!({"ha-mode": "exactly", "ha-params": 2}),
            json!({"ha-mode": "nodes", "ha-params": ["rabbit@a"]}),
            json!({"ha-mode": "all", "ha-sync-mode": "automatic",
                   "ha-promote-on-shutdown": "always", "ha-promote-on-failure": "when-synced",
                   "ha-sync-batch-size": 10}),
            json!({"queue-mode": "lazy", "queue-version": 2, "queue-master-locator": "min-masters"}),
            json!({"max-in-memory-length": 5, "max-age": "1D", "initial-cluster-size": 3}),
            json!({"initial-cluster-size": 0}),
        ] {
            assert_eq!(validate(&keys(ok.clone())), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_what_rabbitmq_refuses() {
        for (bad, text) in [
            (
                json!({"ha-mode": "exactly"}),
                "ha-mode=\"exactly\" takes an integer, none given",
            ),
            (
                json!({"ha-mode": "bogus"}),
                "\"bogus\" is not a valid ha-mode value",
            ),
            (
                json!({"ha-params": 2}),
                "ha-mode must be specified to specify ha-params, ha-sync-mode or \
                 ha-promote-on-shutdown",
            ),
            (
                json!({"ha-sync-batch-size": 10}),
                "ha-mode must be specified to specify ha-params, ha-sync-mode or \
                 ha-promote-on-shutdown",
            ),
            (
                json!({"queue-mode": "bogus"}),
                "\"bogus\" is not a valid queue-mode value",
            ),
            (
                json!({"queue-version": 3}),
                "3 is not a valid queue-version value",
            ),
            (
                json!({"max-age": "1W"}),
                "\"1W\" is not a valid max-age value",
            ),
        ] {
            assert_eq!(validate(&keys(bad)), Err(text.to_owned()));
        }
    }
}
