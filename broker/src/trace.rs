//! The optional frame trace: every method each connection sent and received, for printing
//! when a test fails. Off by default ([`crate::BrokerConfig::trace`]).

use amq_protocol::protocol::AMQPClass;
use std::fmt;
use std::sync::Mutex;

/// Most entries kept; later ones are counted but not stored.
const TRACE_LIMIT: usize = 100_000;

/// Which way a method went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the broker.
    Received,
    /// From the broker to the client.
    Sent,
}

/// One traced method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEntry {
    /// The connection's id.
    pub connection: u64,
    /// Which way it went.
    pub direction: Direction,
    /// Its channel.
    pub channel: u16,
    /// The method with its arguments, e.g. `Basic(Publish(Publish { exchange: "", ... }))`.
    pub method: String,
}

impl fmt::Display for TraceEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let arrow = match self.direction {
            Direction::Received => "->",
            Direction::Sent => "<-",
        };
        write!(
            f,
            "conn {} ch {} {arrow} {}",
            self.connection, self.channel, self.method
        )
    }
}

/// The broker's trace log.
#[derive(Debug, Default)]
pub(crate) struct Trace {
    entries: Mutex<Vec<TraceEntry>>,
}

impl Trace {
    /// Records a method.
    pub(crate) fn record(
        &self,
        connection: u64,
        direction: Direction,
        channel: u16,
        method: &AMQPClass,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() < TRACE_LIMIT {
            entries.push(TraceEntry {
                connection,
                direction,
                channel,
                method: format!("{method:?}"),
            });
        }
    }

    /// A copy of every entry so far.
    pub(crate) fn entries(&self) -> Vec<TraceEntry> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
