//! RPC over AMQP 0-9-1 on lapin: the RabbitMQ tutorial's fib RPC (a server consuming
//! `rpc_queue`, a client with an exclusive server-named reply queue, `reply_to` and
//! `correlation_id`) done properly, against Warren or any RabbitMQ, and wire-compatible with the
//! tutorial's pika scripts.
//!
//! # Layout
//! - [`fib`]: exact `u128` Fibonacci ([`fib::fib`]), parsing and validating a request body
//!   ([`fib::parse_request`]), and the fib service as a handler ([`fib::FibHandler`]).
//! - `server`: [`RpcServer`], generic over a [`Handler`] (bytes in, bytes or [`HandlerError`]
//!   out); prefetch, concurrent handling, reply-then-ack, graceful shutdown.
//! - `acks`: the server's ack task; acks answered requests in order, a run of them in one
//!   `multiple` ack, never one whose reply is not published.
//! - [`client`]: [`RpcClient`], one connection, one reply queue, one router task and one
//!   publisher task, many concurrent calls; timeouts, cancellation, no-route detection,
//!   connection loss.
//! - `error`: [`RpcError`], the one error type of a call, and [`ERROR_HEADER`].
//! - `src/bin/`: `fib-server`, `fib-client` and `fib-demo` (an embedded Warren broker, a
//!   server and a client in one process).
//!
//! # Wire contract
//! - **Request**: body = the request bytes (for fib, ASCII decimal `n`), published to the
//!   default exchange with routing key = the request queue (default `rpc_queue`), properties
//!   `reply_to` (the client's reply queue), `correlation_id` (unique per call) and
//!   `expiration` (the call's timeout in milliseconds: a request nobody took in time dies in
//!   the queue). Published `mandatory` on a confirm-mode channel, so a missing queue is reported
//!   at once as [`RpcError::NoRoute`].
//! - **Reply**: body = the reply bytes (for fib, ASCII decimal `fib(n)`), published to the
//!   default exchange with routing key = the request's `reply_to`, `correlation_id` copied.
//! - **Error reply**: header [`ERROR_HEADER`] (`x-rpc-error`, a long string) = the message,
//!   body = the same message in UTF-8, `content_type` = `text/plain`. The client reports it as
//!   [`RpcError::Remote`] with the header's message.
//! - The server acks a request only after its reply was published, logs and acks (without an
//!   answer) a request that has no `reply_to`, and answers every bad request with an error
//!   reply: no request can stop it.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), warren_rpc::RpcError> {
//! use warren_rpc::{fib::FibHandler, ClientConfig, RpcClient, RpcServer, ServerConfig};
//! let url = "amqp://guest:guest@127.0.0.1:5672/%2F";
//! let server = RpcServer::connect(url, ServerConfig::default(), FibHandler).await?;
//! let client = RpcClient::connect(url, ClientConfig::default()).await?;
//! assert_eq!(client.fib(30).await?, 832_040);
//! client.close().await;
//! server.shutdown().await
//! # }
//! ```

mod acks;
pub mod client;
mod error;
pub mod fib;
mod server;

pub use client::{ClientConfig, ClientStats, DEFAULT_TIMEOUT, RpcClient};
pub use error::{ERROR_HEADER, RpcError};
pub use server::{Handler, HandlerError, RpcServer, ServerConfig, ServerStats};

use lapin::{Connection, ConnectionProperties, types::ShortString};
use std::time::Duration;

/// The request queue of the seed, and the default of both sides.
pub const DEFAULT_QUEUE: &str = "rpc_queue";

/// The broker URL used when neither `--url` nor `AMQP_URL` says otherwise.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2F";

/// The environment variable naming the broker URL.
pub const AMQP_URL_ENV: &str = "AMQP_URL";

/// How long [`connect`] waits for the AMQP handshake to complete.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The broker URL from `AMQP_URL` when set and not empty, else [`DEFAULT_URL`].
pub fn url_from_env() -> String {
    std::env::var(AMQP_URL_ENV)
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_owned())
}

/// Opens a lapin connection to `url`, giving up after [`CONNECT_TIMEOUT`].
///
/// # Errors
/// [`RpcError::ConnectionLost`] when the connection cannot be established in time. The message
/// never includes the URL, which may carry a password.
pub async fn connect(url: &str) -> Result<Connection, RpcError> {
    let properties = ConnectionProperties::default().with_connection_name("warren-rpc".into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(RpcError::ConnectionLost(format!("cannot connect: {e}"))),
        Err(_) => Err(RpcError::ConnectionLost(format!(
            "cannot connect: no AMQP handshake within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// Logs through `tracing` to stderr, filtered by `RUST_LOG` (default [`DEFAULT_LOG_FILTER`]):
/// the binaries' setup.
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    // A second initialisation (e.g. from a test) is harmless: keep the first.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// The binaries' log filter when `RUST_LOG` is not set: `info`, except lapin's warning on
/// every returned message, which [`RpcClient`] reports itself as [`RpcError::NoRoute`].
pub const DEFAULT_LOG_FILTER: &str = "info,lapin::returned_messages=error";

/// A name as an AMQP short string, refused (instead of panicking) past 255 bytes.
fn short_string(what: &str, value: &str) -> Result<ShortString, RpcError> {
    ShortString::try_new(value)
        .map_err(|e| RpcError::Protocol(format!("invalid {what} {value:?}: {e}")))
}
