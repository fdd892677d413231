//! [`RpcError`]: the one error type of a call, and the wire form of a remote error.

use std::time::Duration;

/// The header a server sets on an error reply; its value (an AMQP long string) is the error
/// message. The body of an error reply carries the same message as UTF-8 text, so that a client
/// that ignores headers still sees something readable, but the header is what marks the reply
/// as an error: a reply without it is a result.
pub const ERROR_HEADER: &str = "x-rpc-error";

/// Why a call failed. `Clone`, so that one failure (a lost connection) fans out to every
/// pending call.
///
/// ```
/// use warren_rpc::RpcError;
/// let err = RpcError::Remote("n = 187 is too large".into());
/// assert_eq!(err.to_string(), "remote error: n = 187 is too large");
/// assert!(!err.is_retryable());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// No reply came within the call's timeout. The request may still be served later; its
    /// reply is then dropped and counted as late (see
    /// [`ClientStats::late_replies`](crate::ClientStats::late_replies)). The request carried
    /// this timeout as its `expiration`, so a request still queued after it is discarded by
    /// the broker rather than served.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The broker could not route the request: no queue of that name exists (the request was
    /// published `mandatory` and came back with `basic.return`).
    #[error("no route to request queue '{queue}': no such queue")]
    NoRoute {
        /// The routing key the request was published with.
        queue: String,
    },
    /// The server answered with an error (a reply carrying [`ERROR_HEADER`]); the string is
    /// its message.
    #[error("remote error: {0}")]
    Remote(String),
    /// The connection (or the client's channel) could not be established, was lost, or the
    /// client was closed. Every pending call fails with this error as soon as the loss is seen,
    /// and every later call on the same client fails at once; build a new client on a new
    /// connection to go on.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// Anything else the broker or the peer did wrong: a refused declare, a `basic.nack` of the
    /// request, a reply that is not what the call expects, an invalid name.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl RpcError {
    /// Whether trying the same call again may succeed: true for [`RpcError::Timeout`] (on the
    /// same client) and [`RpcError::ConnectionLost`] (on a rebuilt client).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Timeout(_) | Self::ConnectionLost(_))
    }

    /// Classifies a lapin error: whatever means the connection or channel is gone becomes
    /// [`RpcError::ConnectionLost`], the rest [`RpcError::Protocol`].
    pub(crate) fn from_lapin(context: &str, error: &lapin::Error) -> Self {
        use lapin::ErrorKind as K;
        let message = format!("{context}: {error}");
        match error.kind() {
            K::IOError(_)
            | K::RuntimeShutdownError(_)
            | K::InvalidConnectionState(_)
            | K::InvalidChannelState(..)
            | K::InvalidChannel(_)
            | K::MissingHeartbeatError => Self::ConnectionLost(message),
            _ if error.is_amqp_hard_error() => Self::ConnectionLost(message),
            _ => Self::Protocol(message),
        }
    }
}
