//! Exchanges and routing. The default exchange (`""`, alias `amq.default`) routes to the queue
//! named by the routing key; the `amq.*` exchanges RabbitMQ predeclares exist too.

use amq_protocol::types::FieldTable;

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
    /// The kind named in exchange.declare.
    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name {
            "direct" => Some(Self::Direct),
            "fanout" => Some(Self::Fanout),
            "topic" => Some(Self::Topic),
            "headers" => Some(Self::Headers),
            _ => None,
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
}

impl Exchange {
    /// One of the exchanges every vhost starts with.
    fn builtin(kind: ExchangeKind) -> Self {
        Self {
            kind,
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
        }
    }
}

/// The exchanges every vhost has from the start, as in RabbitMQ.
pub(crate) fn builtin_exchanges() -> Vec<(&'static str, Exchange)> {
    vec![
        ("", Exchange::builtin(ExchangeKind::Direct)),
        ("amq.default", Exchange::builtin(ExchangeKind::Direct)),
        ("amq.direct", Exchange::builtin(ExchangeKind::Direct)),
        ("amq.fanout", Exchange::builtin(ExchangeKind::Fanout)),
        ("amq.topic", Exchange::builtin(ExchangeKind::Topic)),
        ("amq.headers", Exchange::builtin(ExchangeKind::Headers)),
        ("amq.match", Exchange::builtin(ExchangeKind::Headers)),
    ]
}

/// Whether this name is the default exchange.
pub(crate) fn is_default(name: &str) -> bool {
    name.is_empty() || name == "amq.default"
}
