//! Exchanges and routing. The default exchange (`""`) routes to the queue
//! named by the routing key; the `amq.*` exchanges RabbitMQ predeclares exist too. Bindings
//! lead to queues or to other exchanges (RabbitMQ's exchange-to-exchange bindings), and an
//! exchange that routes a message nowhere hands it to its `alternate-exchange`.

use crate::error::{AmqpError, AmqpResult};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use rustc_hash::{FxHashMap, FxHashSet};
use std::sync::Arc;

/// An exchange type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExchangeKind {
    /// Routes on an exact routing key match.
    Direct,
    /// Routes to every bound queue.
    Fanout,
    /// Routes on dotted patterns with `*` and `#`.
    Topic,
    /// Routes on message headers.
    Headers,
}

impl ExchangeKind {
    /// The kind named in exchange.declare, or RabbitMQ's 503 for a type it does not have.
    pub(crate) fn parse(name: &str) -> AmqpResult<Self> {
        match name {
            "direct" => Ok(Self::Direct),
            "fanout" => Ok(Self::Fanout),
            "topic" => Ok(Self::Topic),
            "headers" => Ok(Self::Headers),
            _ => Err(AmqpError::command_invalid(format!(
                "unknown exchange type '{name}'"
            ))),
        }
    }

    /// The kind's name in exchange.declare.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

/// A declared exchange.
#[derive(Clone, Debug)]
pub(crate) struct Exchange {
    /// Its type.
    pub(crate) kind: ExchangeKind,
    /// Declared durable.
    pub(crate) durable: bool,
    /// Deleted when its last binding goes.
    pub(crate) auto_delete: bool,
    /// Clients may not publish to it.
    pub(crate) internal: bool,
    /// Declaration arguments.
    pub(crate) arguments: FieldTable,
    /// Bindings from it, to queues and exchanges.
    pub(crate) bindings: Vec<Binding>,
    /// The `alternate-exchange` of the policy that applies to it, if any (its argument wins).
    pub(crate) policy_alternate: Option<String>,
}

impl Exchange {
    /// One of the exchanges every vhost starts with.
    fn builtin(kind: ExchangeKind) -> Self {
        Self::declared(kind, true, false, false, FieldTable::default())
    }
}

/// The exchanges every vhost has from the start, as in RabbitMQ.
pub(crate) fn builtin_exchanges() -> Vec<(&'static str, Exchange)> {
    vec![
        ("", Exchange::builtin(ExchangeKind::Direct)),
        ("amq.direct", Exchange::builtin(ExchangeKind::Direct)),
        ("amq.fanout", Exchange::builtin(ExchangeKind::Fanout)),
        ("amq.topic", Exchange::builtin(ExchangeKind::Topic)),
        ("amq.headers", Exchange::builtin(ExchangeKind::Headers)),
        ("amq.match", Exchange::builtin(ExchangeKind::Headers)),
    ]
}

/// Whether this name is the default exchange (RabbitMQ 3.10 knows no `amq.default` alias:
/// publishing there is 404).
pub(crate) fn is_default(name: &str) -> bool {
    name.is_empty()
}

/// Where a binding leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Destination {
    /// A queue.
    Queue(Arc<str>),
    /// An exchange, which routes the message on (exchange.bind).
    Exchange(Arc<str>),
}

/// A binding from an exchange to a queue or another exchange.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Binding {
    /// Where it leads.
    pub(crate) destination: Destination,
    /// The binding key.
    pub(crate) routing_key: String,
    /// Binding arguments (headers exchanges match on them).
    pub(crate) arguments: FieldTable,
}

impl Exchange {
    /// A new exchange as declared.
    pub(crate) fn declared(
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Self {
        Self {
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            bindings: Vec::new(),
            policy_alternate: None,
        }
    }

    /// Adds a binding unless the same one exists.
    pub(crate) fn bind(&mut self, binding: Binding) {
        if !self.bindings.contains(&binding) {
            self.bindings.push(binding);
        }
    }

    /// Removes a binding; true if it existed.
    pub(crate) fn unbind(&mut self, binding: &Binding) -> bool {
        let before = self.bindings.len();
        self.bindings.retain(|b| b != binding);
        before != self.bindings.len()
    }

    /// Where this exchange alone sends a message with these routing keys and headers (with
    /// repeats).
    fn destinations<'a, 'k>(
        &'a self,
        keys: RoutingKeys<'k>,
        headers: Option<&'k FieldTable>,
    ) -> impl Iterator<Item = &'a Destination> {
        self.bindings
            .iter()
            .filter(move |b| match self.kind {
                ExchangeKind::Direct => keys.any(|key| b.routing_key == key),
                ExchangeKind::Fanout => true,
                ExchangeKind::Topic => keys.any(|key| topic_matches(&b.routing_key, key)),
                ExchangeKind::Headers => headers_match(&b.arguments, headers),
            })
            .map(|b| &b.destination)
    }

    /// Its `alternate-exchange` argument, if it names one, else its policy's.
    fn alternate(&self) -> Option<&str> {
        match self.arguments.inner().get("alternate-exchange") {
            Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
            Some(_) => None,
            None => self.policy_alternate.as_deref(),
        }
    }
}

/// A message's routing keys: its own, and those its `CC` and `BCC` headers add
/// ([`crate::sender_selected`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RoutingKeys<'a> {
    /// The routing key it was published with.
    pub(crate) own: &'a str,
    /// The keys its headers add (usually none).
    pub(crate) extra: &'a [String],
}

impl<'a> RoutingKeys<'a> {
    /// Whether any of the keys passes `test`.
    fn any(self, test: impl Fn(&str) -> bool) -> bool {
        test(self.own) || self.extra.iter().any(|key| test(key))
    }

    /// Every key, its own first.
    pub(crate) fn all(self) -> impl Iterator<Item = &'a str> {
        std::iter::once(self.own).chain(self.extra.iter().map(String::as_str))
    }
}

/// The queues a message published to exchange `start` goes to (with repeats), as RabbitMQ
/// routes it: through the exchanges bound to the ones it reaches, each exchange once
/// (bindings may form cycles), and through an exchange's `alternate-exchange` when that
/// exchange alone routes it nowhere. Missing exchanges route nowhere.
pub(crate) fn route<'x>(
    exchanges: &'x FxHashMap<String, Exchange>,
    start: &str,
    keys: RoutingKeys,
    headers: Option<&FieldTable>,
) -> Vec<&'x Arc<str>> {
    let mut queues = Vec::new();
    // Nothing is allocated for these unless an exchange routes to another.
    let mut seen: FxHashSet<&str> = FxHashSet::default();
    let mut work: Vec<&Exchange> = Vec::new();
    let mut current = exchanges.get(start);
    while let Some(exchange) = current {
        let mut routed = false;
        for destination in exchange.destinations(keys, headers) {
            routed = true;
            match destination {
                Destination::Queue(queue) => queues.push(queue),
                Destination::Exchange(name) => {
                    visit(exchanges, start, &mut seen, &mut work, name);
                }
            }
        }
        if !routed && let Some(alternate) = exchange.alternate() {
            visit(exchanges, start, &mut seen, &mut work, alternate);
        }
        current = work.pop();
    }
    queues
}

/// Queues exchange `name` for routing unless it is the first one or was routed through
/// already.
fn visit<'x>(
    exchanges: &'x FxHashMap<String, Exchange>,
    start: &str,
    seen: &mut FxHashSet<&'x str>,
    work: &mut Vec<&'x Exchange>,
    name: &str,
) {
    if name == start || seen.contains(name) {
        return;
    }
    if let Some((key, exchange)) = exchanges.get_key_value(name) {
        seen.insert(key);
        work.push(exchange);
    }
}

/// Topic matching: words split on `.`, `*` matches one word, `#` zero or more.
pub(crate) fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..]),
            Some((word, rest)) => k.first() == Some(word) && go(rest, &k[1..]),
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&p, &k)
}

/// Headers matching: `x-match` `all` (default) or `any` over the binding's other arguments;
/// `all-with-x` and `any-with-x` include `x-` keys too. A void value matches on presence.
pub(crate) fn headers_match(binding: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let mode = match binding.inner().get("x-match") {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(AMQPValue::ShortString(s)) => s.to_string(),
        _ => "all".to_owned(),
    };
    let with_x = mode.ends_with("-with-x");
    let any = mode.starts_with("any");
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty);
    let mut pairs = binding
        .inner()
        .iter()
        .filter(|(k, _)| with_x || !k.as_str().starts_with("x-"))
        .peekable();
    if pairs.peek().is_none() {
        return !any;
    }
    let matches = |(k, v): (&ShortString, &AMQPValue)| match (v, headers.inner().get(k.as_str())) {
        (_, None) => false,
        (AMQPValue::Void, Some(_)) => true,
        (expected, Some(actual)) => same_value(expected, actual),
    };
    if any {
        pairs.any(matches)
    } else {
        pairs.all(matches)
    }
}

/// Values equal across short and long strings, as RabbitMQ compares them.
fn same_value(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (a, b) {
        (AMQPValue::ShortString(x), AMQPValue::LongString(y))
        | (AMQPValue::LongString(y), AMQPValue::ShortString(x)) => {
            x.as_str().as_bytes() == y.as_bytes()
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("a.b.c", "a.b.c"));
        assert!(topic_matches("a.*.c", "a.b.c"));
        assert!(!topic_matches("a.*.c", "a.c"));
        assert!(topic_matches("a.#", "a"));
        assert!(topic_matches("a.#", "a.b.c"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#.c", "a.b.c"));
        assert!(!topic_matches("a.*", "a.b.c"));
        assert!(topic_matches("*.b.#", "a.b"));
    }

    #[test]
    fn headers_all_and_any() {
        let mut binding = FieldTable::default();
        binding.insert("format".into(), AMQPValue::LongString("pdf".into()));
        binding.insert("type".into(), AMQPValue::LongString("report".into()));
        let mut headers = FieldTable::default();
        headers.insert("format".into(), AMQPValue::LongString("pdf".into()));
        assert!(!headers_match(&binding, Some(&headers)));
        binding.insert("x-match".into(), AMQPValue::LongString("any".into()));
        assert!(headers_match(&binding, Some(&headers)));
        assert!(!headers_match(&binding, None));
    }
}
