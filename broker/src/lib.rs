//! Warren's embedded AMQP 0-9-1 broker: starts in a millisecond inside a test process and
//! speaks the real wire protocol to real clients (lapin, pika, ...), behaving like RabbitMQ.
//!
//! # Layout
//! - [`config`]: [`BrokerConfig`] and [`User`], with RabbitMQ 3.10's defaults.
//! - `server`: the accept loop, connection limit and shutdown fan-out; [`Broker`] and
//!   [`BrokerHandle`].
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use warren_broker::{Broker, BrokerConfig};
//! let broker = Broker::start(BrokerConfig::default()).await?;
//! println!("connect to {}", broker.url());
//! broker.shutdown().await;
//! # Ok(()) }
//! ```

pub mod config;
mod server;

pub use config::{BrokerConfig, User};
pub use server::{Broker, BrokerHandle, StartError};
