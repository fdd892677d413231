//! Warren's embedded AMQP 0-9-1 broker: starts in a millisecond inside a test process and
//! speaks the real wire protocol to real clients (lapin, pika, ...), behaving like RabbitMQ
//! down to its error codes.
//!
//! # Layout
//! - [`config`]: [`BrokerConfig`] and [`User`], with RabbitMQ 3.10's defaults.
//! - `server`: the accept loop, connection limit, vhosts and shutdown; [`Broker`],
//!   [`BrokerHandle`].
//! - `codec`: frames in and out through amq-protocol, sizes checked before buffering; the
//!   per-message methods (basic.publish and basic.ack in, basic.deliver and confirms out) take
//!   a direct path that property tests hold byte-equal to amq-protocol's.
//! - `connection`: handshake, the connection task (owns its channels), its output (large
//!   bodies written by reference), the consumer timeout, teardown.
//! - `channel`: per-channel state: content assembly, unacked deliveries, consumers, qos.
//! - `unacked`: a channel's unacknowledged deliveries in tag order.
//! - `methods`: one file of handlers per AMQP class.
//! - `vhost`: queues and exchanges under one briefly held std mutex, and the task that
//!   dead-letters expired messages and deletes unused `x-expires` queues on time.
//! - `queue`: ready messages, consumers and dispatch; TTL, length limits, expiry.
//! - `ready`: a queue's ready messages in delivery order (by priority in a priority queue).
//! - `exchange`: exchanges and routing.
//! - `direct_reply`: direct reply-to (`amq.rabbitmq.reply-to`).
//! - `sender_selected`: the `CC` and `BCC` headers' extra routing keys.
//! - [`definitions`]: RabbitMQ's definitions export (users, vhosts, permissions, policies,
//!   queues, exchanges, bindings) loaded into a running broker.
//! - [`policy`]: policies ([`Policy`], `rabbitmqctl set_policy`'s) and how they combine with
//!   declaration arguments.
//! - `dead_letter`: dead-lettering (`x-dead-letter-exchange`): the `x-death` header, cycles.
//! - `permissions`: users and their per-vhost permissions ([`PermissionError`]).
//! - `limits`: per-vhost and per-user limits ([`VhostLimits`], [`UserLimits`]).
//! - `credential`: a user's password, in the clear or as RabbitMQ's salted hash.
//! - `alarm`: resource alarms a test raises ([`ResourceAlarm`]) and the publisher throttling
//!   they cause.
//! - `mailbox`: what other tasks hand a connection (deliveries, cancels, forced close), and
//!   the outbox that gathers them while the vhost lock is held.
//! - `message`: a published message as kept: raw property bytes and body.
//! - [`error`]: the protocol error type (scope, code, text, class/method).
//! - [`inspect`]: read-only snapshots for tests.
//! - [`trace`]: the optional per-connection method trace.
//! - [`tcp`]: socket options for Warren's TCP connections (both ends).
//! - `signal`: [`wait_for_shutdown_signal`], what a program running a broker stops on.
//!
//! # Example
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use warren_broker::{Broker, BrokerConfig};
//! let broker = Broker::start(BrokerConfig::default()).await?;
//! let url = broker.url(); // amqp://guest:guest@127.0.0.1:PORT/%2F, for any AMQP client
//! # let _ = url;
//! broker.shutdown().await;
//! # Ok(()) }
//! ```

mod alarm;
mod channel;
mod codec;
pub mod config;
mod connection;
mod credential;
mod dead_letter;
pub mod definitions;
mod direct_reply;
pub mod error;
mod exchange;
#[doc(hidden)]
pub mod fuzz;
pub mod inspect;
mod limits;
mod mailbox;
mod message;
mod methods;
mod permissions;
pub mod policy;
mod queue;
mod ready;
mod sender_selected;
mod server;
mod signal;
pub mod tcp;
pub mod trace;
mod unacked;
mod vhost;

pub use alarm::ResourceAlarm;
pub use config::{BrokerConfig, User};
pub use definitions::{DefinitionsError, LoadedDefinitions};
pub use inspect::{ConnectionInfo, ConsumerInfo, MessageInfo, QueueInfo};
pub use limits::{UserLimits, VhostLimits};
pub use permissions::PermissionError;
pub use policy::{ApplyTo, Policy, PolicyDefinition, PolicyError};
pub use queue::Overflow;
pub use server::{Broker, BrokerHandle, StartError, ThreadedBroker};
pub use signal::wait_for_shutdown_signal;
pub use trace::{Direction, TraceEntry};
