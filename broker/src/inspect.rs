//! Read-only snapshots of a running broker, for tests.

use crate::message::Message;
use crate::vhost::Vhost;
use amq_protocol::protocol::BasicProperties;
use amq_protocol::protocol::basic::parse_properties;

/// A queue's state at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueInfo {
    /// Its name.
    pub name: String,
    /// Its vhost.
    pub vhost: String,
    /// Messages ready for delivery (expired ones not yet dropped may be counted).
    pub ready: usize,
    /// Messages delivered and not yet acknowledged.
    pub unacked: usize,
    /// Consumers attached.
    pub consumers: Vec<ConsumerInfo>,
    /// Declared durable.
    pub durable: bool,
    /// Exclusive to a connection.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// The name of the policy that applies to it, if any ([`crate::BrokerHandle::set_policy`]).
    pub policy: Option<String>,
}

/// A ready message as its queue holds it, read without taking it
/// ([`crate::BrokerHandle::messages`]).
#[derive(Clone, Debug, PartialEq)]
pub struct MessageInfo {
    /// The exchange it was published to (`""`: the default exchange).
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Its properties (lapin's `BasicProperties` is the same type).
    pub properties: BasicProperties,
    /// Its body.
    pub body: Vec<u8>,
    /// Whether it was delivered before (and put back).
    pub redelivered: bool,
}

/// A consumer's state at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerInfo {
    /// Its tag.
    pub tag: String,
    /// Its connection's id.
    pub connection: u64,
    /// Its channel.
    pub channel: u16,
    /// Whether it acknowledges.
    pub no_ack: bool,
    /// Its prefetch limit (0: none).
    pub prefetch: u32,
    /// Deliveries not yet acknowledged.
    pub in_flight: u32,
    /// Its priority (`x-priority` on basic.consume; 0 without).
    pub priority: i64,
    /// Whether it gets messages: false for every consumer of a single-active-consumer queue
    /// (`x-single-active-consumer`) but the longest-standing one.
    pub active: bool,
}

/// An open connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Its id (for [`crate::BrokerHandle::close_connection`]).
    pub id: u64,
    /// The client's address.
    pub peer: String,
    /// The user it logged in as.
    pub user: String,
    /// The client's product name.
    pub client: String,
    /// The name the client gave the connection (client property `connection_name`, as
    /// RabbitMQ's "user-provided name"; lapin: `ConnectionProperties::with_connection_name`).
    pub name: Option<String>,
    /// The vhost it opened.
    pub vhost: String,
    /// Open channels.
    pub channels: usize,
    /// Whether a resource alarm holds its input: it published while one was raised
    /// ([`crate::BrokerHandle::raise_alarm`]).
    pub blocked: bool,
}

pub(crate) fn queues(vhost: &Vhost) -> Vec<QueueInfo> {
    let state = vhost.lock();
    let mut list: Vec<QueueInfo> = state
        .queues
        .values()
        .map(|q| QueueInfo {
            name: q.name.to_string(),
            vhost: vhost.name.clone(),
            ready: q.ready_len(),
            unacked: q.unacked,
            consumers: q
                .consumers()
                .iter()
                .enumerate()
                .map(|(i, c)| ConsumerInfo {
                    tag: c.tag().to_owned(),
                    connection: c.conn,
                    channel: c.channel,
                    no_ack: c.no_ack,
                    prefetch: c.prefetch,
                    in_flight: c.in_flight,
                    priority: c.priority,
                    active: i < q.active_consumers(),
                })
                .collect(),
            durable: q.options.durable,
            exclusive: q.options.exclusive.is_some(),
            auto_delete: q.options.auto_delete,
            policy: q.policy.as_ref().map(|p| p.name.clone()),
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    list
}

/// The ready messages of a queue of `vhost`, in delivery order; `None` if there is no such
/// queue. Under the lock it only takes a handle on each message; it parses and copies them
/// after, so a long queue never holds up the vhost's connections.
pub(crate) fn messages(vhost: &Vhost, queue: &str) -> Option<Vec<MessageInfo>> {
    let ready: Vec<(Message, bool)> = {
        let state = vhost.lock();
        let queue = state.queues.get(queue)?;
        queue
            .ready_messages()
            .map(|m| (m.message.clone(), m.redelivered))
            .collect()
    };
    Some(
        ready
            .into_iter()
            .map(|(message, redelivered)| MessageInfo {
                exchange: message.exchange().to_owned(),
                routing_key: message.routing_key().to_owned(),
                // Checked when it was published.
                properties: parse_properties(message.properties())
                    .map(|(_, p)| p)
                    .unwrap_or_default(),
                body: message.body().to_vec(),
                redelivered,
            })
            .collect(),
    )
}
