//! The queue class: declare, delete, purge (bind and unbind arrive with exchanges).

use super::Resource;
use super::exchange::{default_exchange_refused, exchange_resource};
use crate::connection::Connection;
use crate::dead_letter::DeadLetterTarget;
use crate::error::{AmqpError, AmqpResult};
use crate::exchange::{Binding, Destination, is_default};
use crate::limits;
use crate::permissions::Access;
use crate::policy::queue_args;
use crate::queue::{ConnId, LengthLimits, Overflow, Queue, QueueArgs, QueueOptions, Quorum};
use crate::vhost::VhostState;
use amq_protocol::protocol::{AMQPClass, queue};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use rustc_hash::FxHashMap;
use std::sync::Arc;
use tokio::time::Instant;

/// Arguments RabbitMQ compares when a queue is redeclared; others may differ freely.
const EQUIVALENCE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
    "x-queue-master-locator",
    "x-quorum-initial-group-size",
    "x-delivery-limit",
];

/// `queue 'name' in vhost '/'`, as RabbitMQ names a queue in reply texts.
pub(crate) fn queue_resource(name: &str, vhost: &str) -> String {
    format!("queue '{name}' in vhost '{vhost}'")
}

/// RabbitMQ's 405 for someone else's exclusive queue.
pub(crate) fn locked(name: &str, vhost: &str) -> AmqpError {
    AmqpError::resource_locked(format!(
        "cannot obtain exclusive access to locked {}. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
        queue_resource(name, vhost)
    ))
}

/// Finds a queue this connection may use: 404 if missing, 405 if another connection's
/// exclusive queue.
pub(crate) fn usable_queue<'a>(
    queues: &'a mut FxHashMap<Arc<str>, Queue>,
    name: &str,
    conn: ConnId,
    vhost: &str,
) -> AmqpResult<&'a mut Queue> {
    let queue = queues
        .get_mut(name)
        .ok_or_else(|| AmqpError::not_found(format!("no {}", queue_resource(name, vhost))))?;
    match queue.options.exclusive {
        Some(owner) if owner != conn => Err(locked(name, vhost)),
        _ => Ok(queue),
    }
}

/// An AMQP value's type as RabbitMQ names it in reply texts.
pub(crate) fn type_name(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

fn value_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortShortUInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::ShortUInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongUInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongString(s) => s.to_string(),
        other => format!("{other:?}"),
    }
}

fn describe(value: Option<&AMQPValue>) -> String {
    match value {
        Some(v) => format!("the value '{}' of type '{}'", value_text(v), type_name(v)),
        None => "none".to_owned(),
    }
}

/// An integer argument's value, if it is of an integer type.
pub(crate) fn integer_value(value: &AMQPValue) -> Option<i64> {
    match *value {
        AMQPValue::ShortShortInt(v) => Some(v.into()),
        AMQPValue::ShortShortUInt(v) => Some(v.into()),
        AMQPValue::ShortInt(v) => Some(v.into()),
        AMQPValue::ShortUInt(v) => Some(v.into()),
        AMQPValue::LongInt(v) => Some(v.into()),
        AMQPValue::LongUInt(v) => Some(v.into()),
        AMQPValue::LongLongInt(v) => Some(v),
        _ => None,
    }
}

/// Validates the declaration arguments Warren acts on.
pub(crate) fn validate_arguments(
    args: &FieldTable,
    name: &str,
    vhost: &str,
) -> AmqpResult<QueueArgs> {
    let resource = queue_resource(name, vhost);
    let quorum = is_quorum(args, &resource)?;
    let message_ttl = non_negative_integer(args, "x-message-ttl", &resource)?;
    if let Some(ttl) = message_ttl
        && ttl > crate::message::MAX_TTL_MS
    {
        return Err(invalid_arg(
            "x-message-ttl",
            &resource,
            format!("{{value_too_large,{ttl}}}"),
        ));
    }
    let mut checked = QueueArgs {
        message_ttl,
        dead_letter: dead_letter_target(args, &resource)?,
        limits: length_limits(args, &resource)?,
        expires: queue_expiry(args, &resource)?,
        single_active_consumer: single_active_consumer(args, &resource)?,
        max_priority: max_priority(args, &resource)?,
        quorum: None,
    };
    integer_arg(args, "x-queue-version", &resource)?;
    // Then the arguments RabbitMQ knows but the queue's type does not take.
    let (type_name, refused) = if quorum {
        ("rabbit_quorum_queue", NOT_FOR_QUORUM)
    } else {
        ("rabbit_classic_queue", NOT_FOR_CLASSIC)
    };
    if let Some(key) = args.inner().keys().find(|k| refused.contains(&k.as_str())) {
        return Err(AmqpError::precondition_failed(format!(
            "invalid arg '{key}' for {resource} of queue type {type_name}"
        )));
    }
    if quorum {
        dead_letter_strategy(args, &resource)?;
        if let Some(limits) = &mut checked.limits {
            limits.overflow = Overflow::of_queue(Some(limits.overflow), true);
        }
        checked.quorum = Some(Quorum {
            delivery_limit: args.inner().get("x-delivery-limit").and_then(integer_value),
        });
    }
    Ok(checked)
}

/// Arguments of other queue types that RabbitMQ 3.10 refuses for a classic queue.
const NOT_FOR_CLASSIC: &[&str] = &[
    "x-dead-letter-strategy",
    "x-delivery-limit",
    "x-initial-cluster-size",
    "x-max-age",
    "x-max-in-memory-bytes",
    "x-max-in-memory-length",
    "x-queue-leader-locator",
    "x-quorum-initial-group-size",
    "x-stream-max-segment-size-bytes",
];

/// Arguments of other queue types that RabbitMQ 3.10 refuses for a quorum queue.
const NOT_FOR_QUORUM: &[&str] = &[
    "x-initial-cluster-size",
    "x-max-age",
    "x-max-priority",
    "x-queue-master-locator",
    "x-queue-mode",
    "x-queue-version",
    "x-stream-max-segment-size-bytes",
];

/// `x-queue-type`: whether the queue is a quorum queue. `classic` (or nothing) is a classic
/// queue; other types (`stream` too) are refused as RabbitMQ refuses a type it does not have.
fn is_quorum(args: &FieldTable, resource: &str) -> AmqpResult<bool> {
    const KEY: &str = "x-queue-type";
    match string_arg(args, KEY, resource)?.as_deref() {
        None | Some("classic") => Ok(false),
        Some("quorum") => Ok(true),
        Some(other) => Err(invalid_arg(
            KEY,
            resource,
            format!("\"unsupported queue type '{other}'\""),
        )),
    }
}

/// A quorum queue's `x-dead-letter-strategy`: `at-most-once` or `at-least-once` (the same
/// here: dead letters are routed at once, inside the broker).
fn dead_letter_strategy(args: &FieldTable, resource: &str) -> AmqpResult {
    const KEY: &str = "x-dead-letter-strategy";
    match string_arg(args, KEY, resource)?.as_deref() {
        None | Some("at-most-once" | "at-least-once") => Ok(()),
        Some(_) => Err(invalid_arg(KEY, resource, "invalid_dlx_strategy".into())),
    }
}

/// An argument that must be a string (short or long), as RabbitMQ checks it: its text, or
/// 406 `{unacceptable_type,<type>}`.
fn string_arg(args: &FieldTable, key: &str, resource: &str) -> AmqpResult<Option<String>> {
    match args.inner().get(key) {
        None => Ok(None),
        Some(value @ (AMQPValue::LongString(_) | AMQPValue::ShortString(_))) => {
            Ok(Some(value_text(value)))
        }
        Some(other) => Err(invalid_arg(
            key,
            resource,
            format!("{{unacceptable_type,{}}}", type_name(other)),
        )),
    }
}

/// Creates queue `name` of vhost `vhost` (which has none of that name), checking its
/// arguments as RabbitMQ does when it creates a queue (a redeclare only compares them), with
/// the policy that applies to it.
pub(crate) fn create_queue(
    state: &mut VhostState,
    vhost: &str,
    name: &str,
    options: QueueOptions,
    now: Instant,
) -> AmqpResult {
    let args = validate_arguments(&options.arguments, name, vhost)?;
    if args.quorum.is_some() {
        check_quorum_flags(&options, &queue_resource(name, vhost))?;
    }
    let policy = state.policies.for_queue(name).cloned();
    let args = queue_args(
        args,
        &options.arguments,
        policy.as_deref().map(|p| &p.definition),
    );
    let mut queue = Queue::new(name, options, args);
    queue.policy = policy;
    queue.touch(now, &mut state.outbox);
    state.insert_queue(queue);
    Ok(())
}

/// The declare flags a quorum queue cannot have, refused as RabbitMQ refuses them (in this
/// order, after the arguments).
fn check_quorum_flags(options: &QueueOptions, resource: &str) -> AmqpResult {
    let refused = if options.auto_delete {
        "auto-delete"
    } else if options.exclusive.is_some() {
        "exclusive-owner"
    } else if !options.durable {
        "non-durable"
    } else {
        return Ok(());
    };
    Err(AmqpError::precondition_failed(format!(
        "invalid property '{refused}' for {resource}"
    )))
}

/// `x-max-priority`: an integer from 0 to 255.
fn max_priority(args: &FieldTable, resource: &str) -> AmqpResult<Option<u8>> {
    const KEY: &str = "x-max-priority";
    match non_negative_integer(args, KEY, resource)? {
        None => Ok(None),
        Some(max) => u8::try_from(max)
            .map(Some)
            .map_err(|_| invalid_arg(KEY, resource, format!("{{max_value_exceeded,{max}}}"))),
    }
}

/// `x-single-active-consumer`: a boolean.
fn single_active_consumer(args: &FieldTable, resource: &str) -> AmqpResult<bool> {
    const KEY: &str = "x-single-active-consumer";
    match args.inner().get(KEY) {
        None => Ok(false),
        Some(AMQPValue::Boolean(on)) => Ok(*on),
        Some(other) => Err(invalid_arg(
            KEY,
            resource,
            format!("{{unacceptable_type,{}}}", type_name(other)),
        )),
    }
}

/// RabbitMQ's 406 for an argument it cannot take.
fn invalid_arg(key: &str, resource: &str, detail: String) -> AmqpError {
    AmqpError::precondition_failed(format!("invalid arg '{key}' for {resource}: {detail}"))
}

/// An argument that must be an integer of any AMQP integer type, as RabbitMQ checks it (406).
pub(crate) fn integer_arg(args: &FieldTable, key: &str, resource: &str) -> AmqpResult<Option<i64>> {
    let Some(value) = args.inner().get(key) else {
        return Ok(None);
    };
    let n = integer_value(value).ok_or_else(|| {
        invalid_arg(
            key,
            resource,
            format!("\"expected integer, got {}\"", type_name(value)),
        )
    })?;
    Ok(Some(n))
}

/// An argument that must be a non-negative integer (`x-message-ttl`, `x-max-length`, ...),
/// checked as RabbitMQ checks it.
fn non_negative_integer(args: &FieldTable, key: &str, resource: &str) -> AmqpResult<Option<u64>> {
    let Some(n) = integer_arg(args, key, resource)? else {
        return Ok(None);
    };
    if n < 0 {
        return Err(invalid_arg(
            key,
            resource,
            format!("{{value_negative,{n}}}"),
        ));
    }
    Ok(Some(n as u64))
}

/// `x-expires`, checked as RabbitMQ checks it: a positive integer of at most ten years.
fn queue_expiry(args: &FieldTable, resource: &str) -> AmqpResult<Option<u64>> {
    let expires = non_negative_integer(args, "x-expires", resource)?;
    match expires {
        Some(0) => Err(invalid_arg("x-expires", resource, "{value_zero,0}".into())),
        Some(ms) if ms > crate::message::MAX_TTL_MS => Err(invalid_arg(
            "x-expires",
            resource,
            format!("{{value_too_large,{ms}}}"),
        )),
        _ => Ok(expires),
    }
}

/// `x-max-length`, `x-max-length-bytes` and `x-overflow`, checked as RabbitMQ checks them;
/// `None` when neither limit is set (an `x-overflow` alone does nothing).
fn length_limits(args: &FieldTable, resource: &str) -> AmqpResult<Option<LengthLimits>> {
    let max_length = non_negative_integer(args, "x-max-length", resource)?;
    let max_bytes = non_negative_integer(args, "x-max-length-bytes", resource)?;
    let overflow = match string_arg(args, "x-overflow", resource)?.as_deref() {
        None => Overflow::DropHead,
        Some(name) => Overflow::parse(name)
            .ok_or_else(|| invalid_arg("x-overflow", resource, "invalid_overflow".into()))?,
    };
    if max_length.is_none() && max_bytes.is_none() {
        return Ok(None);
    }
    Ok(Some(LengthLimits {
        max_length,
        max_bytes,
        overflow,
    }))
}

/// Reads `x-dead-letter-exchange` and `x-dead-letter-routing-key` from a queue's declaration
/// arguments, refusing what RabbitMQ refuses (406, in its words).
fn dead_letter_target(args: &FieldTable, resource: &str) -> AmqpResult<Option<DeadLetterTarget>> {
    let args = args.inner();
    let exchange = match args.get("x-dead-letter-exchange") {
        None => None,
        Some(value) => Some(string_value(value).ok_or_else(|| {
            AmqpError::precondition_failed(format!(
                "invalid type '{}' for arg 'x-dead-letter-exchange' in {resource}",
                type_name(value)
            ))
        })?),
    };
    let routing_key = match args.get("x-dead-letter-routing-key") {
        None => None,
        Some(value) => {
            let invalid = |detail: String| {
                AmqpError::precondition_failed(format!(
                    "invalid arg 'x-dead-letter-routing-key' for {resource}: {detail}"
                ))
            };
            let key = string_value(value)
                .ok_or_else(|| invalid(format!("{{unacceptable_type,{}}}", type_name(value))))?;
            if exchange.is_none() {
                return Err(invalid("routing_key_but_no_dlx_defined".into()));
            }
            Some(key)
        }
    };
    Ok(exchange.map(|exchange| DeadLetterTarget {
        exchange,
        routing_key,
    }))
}

/// A string argument's value (short or long string), if it is one and is UTF-8.
pub(crate) fn string_value(value: &AMQPValue) -> Option<Arc<str>> {
    match value {
        AMQPValue::ShortString(s) => Some(s.as_str().into()),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(Into::into),
        _ => None,
    }
}

/// RabbitMQ's equivalence check of a redeclare (after the exclusivity check).
fn check_equivalence(queue: &Queue, declare: &queue::Declare, vhost: &str) -> AmqpResult {
    let resource = queue_resource(&queue.name, vhost);
    // Exclusive queues are never durable: RabbitMQ ignores `durable` for them.
    let exclusive = queue.options.exclusive.is_some();
    for (field, current, received) in [
        (
            "durable",
            queue.options.durable || exclusive,
            declare.durable || exclusive,
        ),
        (
            "auto_delete",
            queue.options.auto_delete,
            declare.auto_delete,
        ),
    ] {
        if current != received {
            return Err(AmqpError::precondition_failed(format!(
                "inequivalent arg '{field}' for {resource}: received '{received}' but current is '{current}'"
            )));
        }
    }
    for key in EQUIVALENCE_ARGS {
        let current = queue.options.arguments.inner().get(*key);
        let received = declare.arguments.inner().get(*key);
        // An explicit `x-queue-type: classic` is the same as none.
        let classic = |value: Option<&AMQPValue>| value.is_some_and(|v| value_text(v) == "classic");
        if *key == "x-queue-type"
            && ((classic(received) && current.is_none())
                || (received.is_none() && classic(current)))
        {
            continue;
        }
        check_arg_equivalence(key, received, current, &resource)?;
    }
    Ok(())
}

/// RabbitMQ's 406 when a redeclare's argument `key` differs from the current one:
/// `inequivalent arg 'key' for queue 'q' in vhost '/': received ... but current is ...`.
pub(crate) fn check_arg_equivalence(
    key: &str,
    received: Option<&AMQPValue>,
    current: Option<&AMQPValue>,
    resource: &str,
) -> AmqpResult {
    let detail = match (received, current) {
        (Some(r), Some(c)) if r == c => return Ok(()),
        (Some(r), Some(c)) if type_name(r) == type_name(c) => {
            format!(
                "received '{}' but current is '{}'",
                value_text(r),
                value_text(c)
            )
        }
        (None, None) => return Ok(()),
        (r, c) => format!("received {} but current is {}", describe(r), describe(c)),
    };
    Err(AmqpError::precondition_failed(format!(
        "inequivalent arg '{key}' for {resource}: {detail}"
    )))
}

/// A server-generated queue name, like RabbitMQ's `amq.gen-` names.
fn generated_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bits = uuid::Uuid::new_v4().as_u128();
    let mut name = String::with_capacity(prefix.len() + 22);
    name.push_str(prefix);
    for i in 0..22 {
        let index = ((bits >> (i * 6)) & 63) as usize;
        name.push(ALPHABET[index] as char);
    }
    name
}

/// A server-generated consumer tag.
pub(crate) fn generated_tag() -> String {
    generated_name("amq.ctag-")
}

impl Connection {
    pub(crate) fn queue_class(&mut self, ch: u16, method: queue::AMQPMethod) -> AmqpResult {
        match method {
            queue::AMQPMethod::Declare(m) => self.queue_declare(ch, m),
            queue::AMQPMethod::Delete(m) => self.queue_delete(ch, m),
            queue::AMQPMethod::Purge(m) => self.queue_purge(ch, m),
            queue::AMQPMethod::Bind(m) => {
                self.queue_binding(ch, m.queue, m.exchange, m.routing_key, m.arguments, true)?;
                if !m.nowait {
                    self.send(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                    );
                }
                Ok(())
            }
            queue::AMQPMethod::Unbind(m) => {
                self.queue_binding(ch, m.queue, m.exchange, m.routing_key, m.arguments, false)?;
                self.send(
                    ch,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
                Ok(())
            }
            _ => Err(AmqpError::server_method()),
        }
    }

    /// The queue a method names: the empty name means the channel's last declared queue.
    pub(crate) fn expand_queue_name(
        &mut self,
        ch: u16,
        name: ShortString,
    ) -> AmqpResult<ShortString> {
        if !name.as_str().is_empty() {
            return Ok(name);
        }
        self.channel_mut(ch)
            .last_queue
            .clone()
            .ok_or_else(|| AmqpError::not_found("no previously declared queue"))
    }

    fn queue_declare(&mut self, ch: u16, m: queue::Declare) -> AmqpResult {
        let vhost_name = self.vhost.name.clone();
        // A passive declare does not use the channel's last-queue shortcut (as in RabbitMQ).
        let name: ShortString = if m.passive {
            m.queue.clone()
        } else if m.queue.as_str().is_empty() {
            if m.arguments
                .inner()
                .get("x-queue-type")
                .map(value_text)
                .as_deref()
                == Some("quorum")
            {
                return Err(AmqpError::precondition_failed(
                    "Cannot declare a server-named queue for type rabbit_quorum_queue",
                ));
            }
            ShortString::try_new(generated_name("amq.gen-")).expect("short")
        } else if m.queue.as_str().starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "queue name '{}' contains reserved prefix 'amq.*'",
                m.queue
            )));
        } else {
            m.queue.clone()
        };
        // A new queue that dead-letters needs read on itself and write on its dead-letter
        // exchange (a long string: another type is refused as such later). Checked here and
        // answered only if the queue is created, under the same lock as its creation.
        let mut dead_letter_access = Ok(());
        if !m.passive {
            self.check_access(Access::Configure, Resource::Queue, name.as_str())?;
            if let Some(AMQPValue::LongString(exchange)) =
                m.arguments.inner().get("x-dead-letter-exchange")
            {
                let exchange = exchange.to_string();
                dead_letter_access = self
                    .check_access(Access::Read, Resource::Queue, name.as_str())
                    .and_then(|()| self.check_access(Access::Write, Resource::Exchange, &exchange));
            }
        }
        if m.passive && name.as_str() == crate::direct_reply::PSEUDO_QUEUE {
            if !m.nowait {
                self.send(
                    ch,
                    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: name,
                        message_count: 0,
                        consumer_count: 0,
                    })),
                );
            }
            return Ok(());
        }
        let now = Instant::now();
        let mut state = self.vhost.lock();
        let VhostState { queues, outbox, .. } = &mut *state;
        let (message_count, consumer_count) = match queues.get_mut(name.as_str()) {
            Some(queue) => {
                let owner = queue.options.exclusive;
                if owner.is_some_and(|o| o != self.id) {
                    return Err(locked(name.as_str(), &vhost_name));
                }
                if !m.passive {
                    if m.exclusive != owner.is_some() {
                        return Err(locked(name.as_str(), &vhost_name));
                    }
                    check_equivalence(queue, &m, &vhost_name)?;
                }
                queue.touch(now, outbox);
                (queue.message_count(now, outbox), queue.consumer_count())
            }
            None if m.passive => {
                return Err(AmqpError::not_found(format!(
                    "no {}",
                    queue_resource(name.as_str(), &vhost_name)
                )));
            }
            None => {
                if let Some(max) = state.limits.max_queues
                    && limits::reached(max, state.queues.len())
                {
                    return Err(AmqpError::precondition_failed(format!(
                        "cannot declare queue '{name}': queue limit in vhost '{vhost_name}' \
                         ({max}) is reached"
                    )));
                }
                dead_letter_access?;
                let options = QueueOptions {
                    durable: m.durable,
                    exclusive: m.exclusive.then_some(self.id),
                    auto_delete: m.auto_delete,
                    arguments: m.arguments.clone(),
                };
                create_queue(&mut state, &vhost_name, name.as_str(), options, now)?;
                (0, 0)
            }
        };
        drop(state);
        self.channel_mut(ch).last_queue = Some(name.clone());
        if !m.nowait {
            self.send(
                ch,
                AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                    queue: name,
                    message_count,
                    consumer_count,
                })),
            );
        }
        Ok(())
    }

    /// queue.bind (`bind`) or queue.unbind. An empty queue name means the channel's last
    /// declared queue, and so does an empty routing key with it, as in RabbitMQ.
    fn queue_binding(
        &mut self,
        ch: u16,
        queue_name: ShortString,
        exchange_name: ShortString,
        routing_key: ShortString,
        arguments: FieldTable,
        bind: bool,
    ) -> AmqpResult {
        let shortcut = queue_name.as_str().is_empty();
        let queue_name = self.expand_queue_name(ch, queue_name)?;
        let routing_key = if shortcut && routing_key.as_str().is_empty() {
            queue_name.to_string()
        } else {
            routing_key.to_string()
        };
        self.check_access(Access::Write, Resource::Queue, queue_name.as_str())?;
        if is_default(exchange_name.as_str()) {
            return Err(default_exchange_refused());
        }
        self.check_access(Access::Read, Resource::Exchange, exchange_name.as_str())?;
        self.check_topic_access(Access::Read, exchange_name.as_str(), &routing_key)?;
        let vhost = self.vhost.clone();
        let mut state = vhost.lock();
        // As RabbitMQ: unbinding from a queue or exchange that is not there succeeds.
        let queue = match usable_queue(&mut state.queues, queue_name.as_str(), self.id, &vhost.name)
        {
            Err(e) if !bind && e.code == 404 => return Ok(()),
            found => found?,
        };
        let binding = Binding {
            destination: Destination::Queue(queue.name.clone()),
            routing_key,
            arguments,
        };
        let Some(exchange) = state.exchanges.get_mut(exchange_name.as_str()) else {
            if !bind {
                return Ok(());
            }
            return Err(AmqpError::not_found(format!(
                "no {}",
                exchange_resource(exchange_name.as_str(), &vhost.name)
            )));
        };
        if bind {
            exchange.bind(binding);
        } else if exchange.unbind(&binding) && exchange.auto_delete && exchange.bindings.is_empty()
        {
            state.delete_exchange(exchange_name.as_str());
        }
        Ok(())
    }

    fn queue_delete(&mut self, ch: u16, m: queue::Delete) -> AmqpResult {
        let name = self.expand_queue_name(ch, m.queue)?;
        self.check_access(Access::Configure, Resource::Queue, name.as_str())?;
        let vhost_name = self.vhost.name.clone();
        let mut state = self.vhost.lock();
        let VhostState { queues, outbox, .. } = &mut *state;
        let message_count = match usable_queue(queues, name.as_str(), self.id, &vhost_name) {
            // Deleting a queue that does not exist succeeds, as in RabbitMQ.
            Err(e) if e.code == 404 => 0,
            Err(e) => return Err(e),
            Ok(queue) => {
                if queue.quorum().is_some() && (m.if_unused || m.if_empty) {
                    let flag = if m.if_unused { "if-unused" } else { "if-empty" };
                    return Err(AmqpError::not_implemented(format!(
                        "cannot delete {}. queue.delete operations with {flag} flag set are not supported by quorum queues",
                        queue_resource(name.as_str(), &vhost_name)
                    )));
                }
                if m.if_unused && queue.consumer_count() > 0 {
                    return Err(AmqpError::precondition_failed(format!(
                        "{} in use",
                        queue_resource(name.as_str(), &vhost_name)
                    )));
                }
                if m.if_empty && queue.message_count(Instant::now(), outbox) > 0 {
                    return Err(AmqpError::precondition_failed(format!(
                        "{} not empty",
                        queue_resource(name.as_str(), &vhost_name)
                    )));
                }
                state.delete_queue(name.as_str()).unwrap_or(0)
            }
        };
        drop(state);
        if !m.nowait {
            self.send(
                ch,
                AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                    message_count,
                })),
            );
        }
        Ok(())
    }

    fn queue_purge(&mut self, ch: u16, m: queue::Purge) -> AmqpResult {
        let name = self.expand_queue_name(ch, m.queue)?;
        self.check_access(Access::Read, Resource::Queue, name.as_str())?;
        let vhost_name = self.vhost.name.clone();
        let mut state = self.vhost.lock();
        let message_count =
            usable_queue(&mut state.queues, name.as_str(), self.id, &vhost_name)?.purge();
        drop(state);
        if !m.nowait {
            self.send(
                ch,
                AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk { message_count })),
            );
        }
        Ok(())
    }
}
