//! Per-vhost and per-user limits, as `rabbitmqctl set_vhost_limits` and `set_user_limits` set
//! them: how many connections a vhost or a user may have, how many queues a vhost, how many
//! channels a user (over all its connections). `None` is no limit (RabbitMQ's `-1`); `0`
//! allows none.

/// The limits of one vhost ([`crate::BrokerHandle::set_vhost_limits`]).
///
/// ```
/// let limits = warren_broker::VhostLimits {
///     max_queues: Some(10),
///     ..Default::default()
/// };
/// assert_eq!(limits.max_connections, None);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VhostLimits {
    /// `max-connections`: a connection.open beyond it is refused (530 NOT_ALLOWED).
    pub max_connections: Option<u32>,
    /// `max-queues`: a queue.declare that would create one more is refused (406
    /// PRECONDITION_FAILED); redeclaring an existing queue is not.
    pub max_queues: Option<u32>,
}

/// The limits of one user ([`crate::BrokerHandle::set_user_limits`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserLimits {
    /// `max-connections`: a connection.open beyond it is refused (530 NOT_ALLOWED).
    pub max_connections: Option<u32>,
    /// `max-channels`, over all the user's connections: a channel.open beyond it closes its
    /// connection (530 NOT_ALLOWED).
    pub max_channels: Option<u32>,
}

/// Whether `count` things already reach `limit`, so that one more is refused.
pub(crate) fn reached(limit: u32, count: usize) -> bool {
    count >= limit as usize
}
