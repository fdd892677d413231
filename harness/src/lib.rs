//! What a test author touches: one test, two brokers. `cargo test` runs a test on an
//! embedded Warren broker; `AMQP_URL=amqp://...` runs the very same test against that broker
//! (a real RabbitMQ) instead.
//!
//! # Layout
//! - [`TestBroker`]: the target of a test (embedded or external), its URL, connections and
//!   unique names.

use warren_broker::{Broker, BrokerConfig, BrokerHandle};

/// The environment variable that points tests at an external broker.
pub const AMQP_URL_ENV: &str = "AMQP_URL";

/// The broker a test runs against: an embedded Warren broker, or the one named by `AMQP_URL`.
///
/// ```no_run
/// # async fn demo() {
/// let broker = warren_harness::TestBroker::start().await;
/// let conn = broker.connect().await;
/// let queue = broker.unique_name("jobs");
/// # let _ = (conn, queue);
/// # }
/// ```
#[derive(Debug)]
pub struct TestBroker {
    embedded: Option<BrokerHandle>,
    url: String,
}

impl TestBroker {
    /// Starts an embedded broker, or uses `AMQP_URL` when it is set (and not empty).
    ///
    /// # Panics
    /// When the embedded broker cannot start: a test cannot go on without its broker.
    pub async fn start() -> Self {
        match std::env::var(AMQP_URL_ENV) {
            Ok(url) if !url.is_empty() => Self {
                embedded: None,
                url,
            },
            _ => Self::start_embedded(BrokerConfig::default()).await,
        }
    }

    /// Starts an embedded broker with this configuration, whatever `AMQP_URL` says.
    ///
    /// # Panics
    /// When the broker cannot start.
    pub async fn start_embedded(config: BrokerConfig) -> Self {
        let handle = Broker::start(config)
            .await
            .expect("embedded Warren broker failed to start");
        let url = handle.url();
        Self {
            embedded: Some(handle),
            url,
        }
    }

    /// The AMQP URL of the target.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The embedded broker, or `None` when the target is external.
    pub fn embedded(&self) -> Option<&BrokerHandle> {
        self.embedded.as_ref()
    }

    /// Whether the target is an embedded Warren broker.
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// A new lapin connection to the target.
    ///
    /// # Panics
    /// When the connection fails within 10 seconds: the test cannot go on.
    pub async fn connect(&self) -> lapin::Connection {
        let connect = lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default());
        match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => panic!("cannot connect to {}: {e}", self.url),
            Err(_) => panic!("connecting to {} timed out after 10 s", self.url),
        }
    }

    /// A name with a random suffix, so tests sharing one external broker never collide.
    pub fn unique_name(&self, prefix: &str) -> String {
        format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
    }
}
