//! RabbitMQ definitions (the JSON of `rabbitmqctl export_definitions` or the management UI's
//! export, which `load_definitions` loads at a RabbitMQ node's start): users and their
//! limits, vhosts, permissions, topic permissions, vhost limits, policies, queues, exchanges
//! and bindings, loaded into a running broker in RabbitMQ's order.
//!
//! A user logs in with its exported `password_hash` (RabbitMQ's salted SHA-256, SHA-512 or
//! MD5, as its `hashing_algorithm` or the exporting version says) or a `password` in the
//! clear, never with an empty one; one that exists already gets the new one, as in
//! RabbitMQ, and its tags and limits come along. Of the runtime parameters only
//! the vhosts' limits (`vhost-limits`) are loaded (federation, shovels and the like are left
//! out). A queue or exchange that exists already is left as it is. Each object is checked as a client's declaration of it would
//! be: the first refused stops the load, naming it, and what came before it stays
//! (RabbitMQ's import is not atomic either); the users, permission patterns and policies
//! are all parsed first, so one refused for its form stops the load before it has changed
//! anything.

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};
use serde_json::Value;
use tokio::time::Instant;

use crate::credential::{Credential, HashAlgorithm};
use crate::exchange::{Binding, Destination, ExchangeKind};
use crate::limits::{UserLimits, VhostLimits};
use crate::methods::exchange::{ExchangeFlags, create_exchange};
use crate::methods::queue::create_queue;
use crate::permissions::{Permissions, TopicPermission};
use crate::policy::{Policy, PolicyError};
use crate::queue::QueueOptions;
use crate::server::BrokerHandle;

/// What a load of definitions created.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadedDefinitions {
    /// Vhosts added.
    pub vhosts: usize,
    /// Policies set.
    pub policies: usize,
    /// Queues declared (those that existed are not counted).
    pub queues: usize,
    /// Exchanges declared (those that existed are not counted).
    pub exchanges: usize,
    /// Bindings made.
    pub bindings: usize,
    /// Users added or given a new password.
    pub users: usize,
    /// Permissions set (a user's in one vhost).
    pub permissions: usize,
    /// Topic permissions set (a user's on one exchange in one vhost).
    pub topic_permissions: usize,
    /// Vhosts whose limits were set (the `vhost-limits` runtime parameter).
    pub vhost_limits: usize,
}

/// Why definitions could not be loaded (entirely or from one object on).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionsError {
    /// Not JSON, or not an object of RabbitMQ's definitions.
    #[error("definitions are not valid JSON: {0}")]
    Json(String),
    /// An object was refused.
    #[error("{what}: {reason}")]
    Refused {
        /// The object, e.g. `queue 'jobs' in vhost '/'`.
        what: String,
        /// Why, in RabbitMQ's words where it has them.
        reason: String,
    },
}

/// Loads `json` into the broker behind `handle`: first everything that can be refused for
/// its form is parsed (policies, users, limits, permission patterns), then it is applied in
/// RabbitMQ's order.
pub(crate) fn load(
    handle: &BrokerHandle,
    json: &str,
) -> Result<LoadedDefinitions, DefinitionsError> {
    let root: Value =
        serde_json::from_str(json).map_err(|e| DefinitionsError::Json(e.to_string()))?;
    if !root.is_object() {
        return Err(DefinitionsError::Json("not a JSON object".into()));
    }
    let list = |key: &str| {
        root.get(key)
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice)
    };
    let version = ["rabbitmq_version", "rabbit_version"]
        .iter()
        .find_map(|key| root.get(key).and_then(Value::as_str));
    let policies = parse_policies(handle, list("policies"), list("vhosts"))?;
    let users = parse_users(list("users"), version)?;
    let vhost_limits = parse_vhost_limits(list("parameters"))?;
    let permissions = parse_permissions(list("permissions"))?;
    let topic_permissions = parse_topic_permissions(list("topic_permissions"))?;

    let mut loaded = LoadedDefinitions::default();
    for user in users {
        handle.put_user(&user.name, user.credential, user.tags);
        if let Some(limits) = user.limits {
            handle.set_user_limits(&user.name, limits);
        }
        loaded.users += 1;
    }
    for vhost in list("vhosts") {
        let name = text(vhost, "name", "a vhost")?;
        if handle.add_vhost(&name) {
            loaded.vhosts += 1;
        }
    }
    for (parsed, user, vhost, what) in permissions {
        handle
            .change_permissions(&vhost, &user, Some(parsed))
            .map_err(|e| refused(&what, e))?;
        loaded.permissions += 1;
    }
    for (parsed, user, vhost, exchange, what) in topic_permissions {
        handle
            .change_topic_permissions(&vhost, &user, Some(&exchange), Some(parsed))
            .map_err(|e| refused(&what, e))?;
        loaded.topic_permissions += 1;
    }
    for (vhost, limits, what) in vhost_limits {
        if !handle.set_vhost_limits(&vhost, limits) {
            return Err(refused(&what, "no such vhost"));
        }
        loaded.vhost_limits += 1;
    }
    for (parsed, what) in policies {
        handle.set_policy(parsed).map_err(|e| refused(&what, e))?;
        loaded.policies += 1;
    }
    let now = Instant::now();
    for queue in list("queues") {
        loaded.queues += usize::from(load_queue(handle, queue, now)?);
    }
    for exchange in list("exchanges") {
        loaded.exchanges += usize::from(load_exchange(handle, exchange)?);
    }
    for binding in list("bindings") {
        load_binding(handle, binding)?;
        loaded.bindings += 1;
    }
    Ok(loaded)
}

/// The policies, each checked (keys, values, pattern, vhost) before anything is created:
/// one Warren refuses (the usual reason an export is refused) leaves the broker as it was.
fn parse_policies(
    handle: &BrokerHandle,
    policies: &[Value],
    vhosts: &[Value],
) -> Result<Vec<(Policy, String)>, DefinitionsError> {
    let listed_vhosts: Vec<&str> = vhosts
        .iter()
        .filter_map(|v| v.get("name").and_then(Value::as_str))
        .collect();
    policies
        .iter()
        .map(|policy| {
            let parsed =
                Policy::from_json(&policy.to_string()).map_err(|e| refused("a policy", e))?;
            let what = format!("policy '{}' in vhost '{}'", parsed.name, parsed.vhost);
            parsed.check().map_err(|e| refused(&what, e))?;
            if handle.vhost_of(&parsed.vhost).is_none() && !listed_vhosts.contains(&&*parsed.vhost)
            {
                return Err(refused(&what, PolicyError::NoVhost(parsed.vhost.clone())));
            }
            Ok((parsed, what))
        })
        .collect()
}

/// A user of the definitions, parsed.
struct UserDefinition {
    name: String,
    credential: Credential,
    tags: Vec<String>,
    /// Its own `limits`, if it has them.
    limits: Option<UserLimits>,
}

/// The users: how each logs in, its tags and its limits.
fn parse_users(
    users: &[Value],
    version: Option<&str>,
) -> Result<Vec<UserDefinition>, DefinitionsError> {
    users
        .iter()
        .map(|user| {
            let name = text(user, "name", "a user")?;
            let what = format!("user '{name}'");
            let limits = match user.get("limits") {
                Some(own) => Some(UserLimits {
                    max_connections: limit(own, "max-connections", &what)?,
                    max_channels: limit(own, "max-channels", &what)?,
                }),
                None => None,
            };
            Ok(UserDefinition {
                credential: credential(user, &what, version)?,
                tags: user_tags(user, &what)?,
                limits,
                name,
            })
        })
        .collect()
}

/// Of the runtime parameters, the vhosts' limits: (vhost, limits, what).
fn parse_vhost_limits(
    parameters: &[Value],
) -> Result<Vec<(String, VhostLimits, String)>, DefinitionsError> {
    parameters
        .iter()
        .filter(|p| p.get("component").and_then(Value::as_str) == Some("vhost-limits"))
        .map(|parameter| {
            let vhost = vhost_of(parameter);
            let what = format!("limits of vhost '{vhost}'");
            let value = parameter.get("value").unwrap_or(&Value::Null);
            let limits = VhostLimits {
                max_connections: limit(value, "max-connections", &what)?,
                max_queues: limit(value, "max-queues", &what)?,
            };
            Ok((vhost, limits, what))
        })
        .collect()
}

/// The permissions, their patterns compiled: (permissions, user, vhost, what).
fn parse_permissions(
    entries: &[Value],
) -> Result<Vec<(Permissions, String, String, String)>, DefinitionsError> {
    entries
        .iter()
        .map(|entry| {
            let user = text(entry, "user", "a permission")?;
            let vhost = vhost_of(entry);
            let what = format!("permissions of user '{user}' in vhost '{vhost}'");
            let [configure, write, read] =
                ["configure", "write", "read"].map(|key| text(entry, key, &what));
            let parsed =
                Permissions::new(&configure?, &write?, &read?).map_err(|e| refused(&what, e))?;
            Ok((parsed, user, vhost, what))
        })
        .collect()
}

/// A topic permission, parsed: (permission, user, vhost, exchange, what).
type TopicPermissionDefinition = (TopicPermission, String, String, String, String);

/// The topic permissions, their patterns compiled.
fn parse_topic_permissions(
    entries: &[Value],
) -> Result<Vec<TopicPermissionDefinition>, DefinitionsError> {
    entries
        .iter()
        .map(|entry| {
            let user = text(entry, "user", "a topic permission")?;
            let vhost = vhost_of(entry);
            let exchange = text(entry, "exchange", "a topic permission")?;
            let what = format!(
                "topic permissions of user '{user}' on exchange '{exchange}' in vhost '{vhost}'"
            );
            let [write, read] = ["write", "read"].map(|key| text(entry, key, &what));
            let parsed = TopicPermission::new(&user, &vhost, &write?, &read?)
                .map_err(|e| refused(&what, e))?;
            Ok((parsed, user, vhost, exchange, what))
        })
        .collect()
}

/// Declares a queue of the definitions, checked as a client's declaration would be; false if
/// it exists already (it is left as it is).
fn load_queue(
    handle: &BrokerHandle,
    queue: &Value,
    now: Instant,
) -> Result<bool, DefinitionsError> {
    let name = text(queue, "name", "a queue")?;
    let vhost = vhost_of(queue);
    let what = format!("queue '{name}' in vhost '{vhost}'");
    let options = QueueOptions {
        durable: flag(queue, "durable"),
        exclusive: None,
        auto_delete: flag(queue, "auto_delete"),
        arguments: arguments(queue, &what)?,
    };
    let target = handle
        .vhost_of(&vhost)
        .ok_or_else(|| refused(&what, "no such vhost"))?;
    let mut state = target.lock();
    if state.queues.contains_key(name.as_str()) {
        return Ok(false);
    }
    create_queue(&mut state, &vhost, &name, options, now).map_err(|e| refused(&what, e))?;
    Ok(true)
}

/// Declares an exchange of the definitions, checked as a client's declaration would be;
/// false if it exists already (it is left as it is) or is the default one.
fn load_exchange(handle: &BrokerHandle, exchange: &Value) -> Result<bool, DefinitionsError> {
    let name = text(exchange, "name", "an exchange")?;
    let vhost = vhost_of(exchange);
    let what = format!("exchange '{name}' in vhost '{vhost}'");
    let kind = text(exchange, "type", &what)?;
    let flags = ExchangeFlags {
        durable: flag(exchange, "durable"),
        auto_delete: flag(exchange, "auto_delete"),
        internal: flag(exchange, "internal"),
    };
    let args = arguments(exchange, &what)?;
    let target = handle
        .vhost_of(&vhost)
        .ok_or_else(|| refused(&what, "no such vhost"))?;
    let mut state = target.lock();
    if name.is_empty() || state.exchanges.contains_key(&name) {
        return Ok(false);
    }
    ExchangeKind::parse(&kind)
        .and_then(|kind| create_exchange(&mut state, &vhost, &name, kind, flags, args))
        .map_err(|e| refused(&what, e))?;
    Ok(true)
}

/// Binds as a binding of the definitions says; its source and destination must exist.
fn load_binding(handle: &BrokerHandle, binding: &Value) -> Result<(), DefinitionsError> {
    let source = text(binding, "source", "a binding")?;
    let destination = text(binding, "destination", "a binding")?;
    let vhost = vhost_of(binding);
    let what = format!("binding from '{source}' to '{destination}' in vhost '{vhost}'");
    let destination = match text(binding, "destination_type", &what)?.as_str() {
        "queue" => Destination::Queue(Arc::from(destination.as_str())),
        "exchange" => Destination::Exchange(Arc::from(destination.as_str())),
        other => {
            return Err(refused(
                &what,
                format!("unknown destination_type '{other}'"),
            ));
        }
    };
    let routing_key = binding
        .get("routing_key")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let args = arguments(binding, &what)?;
    let target = handle
        .vhost_of(&vhost)
        .ok_or_else(|| refused(&what, "no such vhost"))?;
    let mut state = target.lock();
    let exists = match &destination {
        Destination::Queue(q) => state.queues.contains_key(q),
        Destination::Exchange(x) => state.exchanges.contains_key(&**x),
    };
    if !exists {
        return Err(refused(&what, "its destination does not exist"));
    }
    let Some(exchange) = state
        .exchanges
        .get_mut(&source)
        .filter(|_| !source.is_empty())
    else {
        return Err(refused(&what, "its source exchange does not exist"));
    };
    exchange.bind(Binding {
        destination,
        routing_key,
        arguments: args,
    });
    Ok(())
}

/// How a user of the definitions logs in: its `password`, or its `password_hash` (none: no
/// password lets it in), hashed as its `hashing_algorithm` says or, without one, as
/// RabbitMQ hashed in the version that exported it (`rabbit_version` before 3.6.0: MD5,
/// later SHA-256). A user must have `tags`, as RabbitMQ requires (`tags_not_present`).
fn credential(
    user: &Value,
    what: &str,
    version: Option<&str>,
) -> Result<Credential, DefinitionsError> {
    if user.get("tags").is_none() && user.get("administrator").is_none() {
        return Err(refused(what, "tags_not_present"));
    }
    let field = |key: &str| user.get(key).and_then(Value::as_str);
    match (field("password"), field("password_hash")) {
        (Some(_), Some(_)) => Err(refused(
            what,
            "both password and password_hash are provided",
        )),
        (Some(password), None) => Ok(Credential::Password(password.to_owned())),
        (None, hash) => {
            let algorithm = match field("hashing_algorithm") {
                None if version.is_some_and(before_3_6) => Some(HashAlgorithm::Md5),
                None => Some(HashAlgorithm::Sha256),
                // RabbitMQ takes any name, and then lets no password in.
                Some(name) => HashAlgorithm::parse(name),
            };
            Credential::from_hash(algorithm, hash.unwrap_or_default())
                .ok_or_else(|| refused(what, "password_hash is not base64"))
        }
    }
}

/// A user's tags, read as RabbitMQ 3.10.8 reads them (probed): a list of strings, integers
/// or booleans (each written as text, spaces stripped from the ends), or (older exports) one
/// string of comma-separated tags (empty parts dropped, then spaces stripped: `" , "` is two
/// empty tags), or
/// (the oldest) `"administrator": true` (or `"true"`).
fn user_tags(user: &Value, what: &str) -> Result<Vec<String>, DefinitionsError> {
    let strip = |tag: &str| tag.trim_matches(' ').to_owned();
    // RabbitMQ: function_clause.
    let not_tags = || refused(what, "tags must be a list of strings or a string");
    match user.get("tags") {
        None => match user.get("administrator") {
            None | Some(Value::Bool(false)) => Ok(Vec::new()),
            Some(Value::Bool(true)) => Ok(vec!["administrator".to_owned()]),
            Some(Value::String(flag)) if flag == "true" => Ok(vec!["administrator".to_owned()]),
            Some(Value::String(flag)) if flag == "false" => Ok(Vec::new()),
            Some(other) => Err(refused(what, format!("{{not_boolean,{other}}}"))),
        },
        Some(Value::String(tags)) => Ok(tags
            .split(',')
            .filter(|part| !part.is_empty())
            .map(strip)
            .collect()),
        Some(Value::Array(tags)) => tags
            .iter()
            .map(|tag| match tag {
                Value::String(tag) => Ok(strip(tag)),
                Value::Bool(flag) => Ok(flag.to_string()),
                Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
                _ => Err(not_tags()),
            })
            .collect(),
        Some(_) => Err(not_tags()),
    }
}

/// A limit of a user's `limits` or of a `vhost-limits` parameter's `value`: `None` when
/// absent or negative (RabbitMQ's `-1`), else how many.
fn limit(object: &Value, key: &str, what: &str) -> Result<Option<u32>, DefinitionsError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_i64() {
            Some(n) if n < 0 => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| refused(what, format!("{key} {n} is too large"))),
            None => Err(refused(what, format!("{key} {value} is not an integer"))),
        },
    }
}

/// Whether a RabbitMQ version (`3.5.7`) is older than 3.6.0, when SHA-256 replaced MD5.
fn before_3_6(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) < (3, 6)
}

fn refused(what: &str, reason: impl std::fmt::Display) -> DefinitionsError {
    DefinitionsError::Refused {
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}

/// A string field that must be there.
fn text(object: &Value, key: &str, what: &str) -> Result<String, DefinitionsError> {
    object
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| refused(what, format!("no string '{key}' in {object}")))
}

/// A boolean field (false when missing).
fn flag(object: &Value, key: &str) -> bool {
    object.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// Its vhost (`/` when missing).
fn vhost_of(object: &Value) -> String {
    object
        .get("vhost")
        .and_then(Value::as_str)
        .unwrap_or("/")
        .to_owned()
}

/// Its `arguments`, as the AMQP table RabbitMQ makes of them (integers as long-long ints,
/// strings as long strings).
fn arguments(object: &Value, what: &str) -> Result<FieldTable, DefinitionsError> {
    match object.get("arguments") {
        None | Some(Value::Null) => Ok(FieldTable::default()),
        Some(Value::Object(map)) => Ok(table(map)),
        Some(other) => Err(refused(
            what,
            format!("arguments {other} are not an object"),
        )),
    }
}

fn table(map: &serde_json::Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in map {
        table.insert(key.as_str().into(), amqp_value(value));
    }
    table
}

fn amqp_value(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(amqp_value).collect::<Vec<_>>(),
        )),
        Value::Object(map) => AMQPValue::FieldTable(table(map)),
    }
}
