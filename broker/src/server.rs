//! Accept loop and broker lifecycle (stub: filled in by the broker-core work).

use crate::BrokerConfig;
use std::net::SocketAddr;

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address as configured.
        addr: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

/// Entry point: [`Broker::start`].
#[derive(Debug)]
pub struct Broker;

/// A running broker. Dropping it stops the broker.
#[derive(Debug)]
pub struct BrokerHandle {
    local_addr: SocketAddr,
}

impl Broker {
    /// Binds the configured address and starts serving on the caller's tokio runtime.
    pub async fn start(config: BrokerConfig) -> Result<BrokerHandle, StartError> {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        Ok(BrokerHandle {
            local_addr: listener.local_addr().expect("bound"),
        })
    }
}

impl BrokerHandle {
    /// The address the broker listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2F`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2F", self.local_addr)
    }

    /// Closes every connection with 320 CONNECTION_FORCED and waits for all tasks to end.
    pub async fn shutdown(self) {}
}
