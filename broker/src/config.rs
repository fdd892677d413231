//! Broker configuration, with RabbitMQ 3.10's defaults.

use std::time::Duration;

/// A user allowed to log in (PLAIN or AMQPLAIN).
///
/// ```
/// let user = warren_broker::User::new("relay", "secret").with_tags(&["impersonator"]);
/// assert_eq!(user.name, "relay");
/// assert_eq!(warren_broker::User::guest().tags, ["administrator"]);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Password, compared as given. Never logged.
    pub password: String,
    /// Its tags, as `rabbitmqctl set_user_tags` gives them: of RabbitMQ's tags only
    /// `impersonator` changes what a client may do (see
    /// [`crate::BrokerHandle::set_user_tags`]).
    pub tags: Vec<String>,
}

impl User {
    /// A user with this name and password, and no tags.
    pub fn new(name: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            password: password.into(),
            tags: Vec::new(),
        }
    }

    /// RabbitMQ's default user: `guest`, password `guest`, tagged `administrator`.
    pub fn guest() -> Self {
        Self::new("guest", "guest").with_tags(&["administrator"])
    }

    /// The same user with these tags instead of its own.
    pub fn with_tags(mut self, tags: &[&str]) -> Self {
        self.tags = tags.iter().map(|t| (*t).to_owned()).collect();
        self
    }
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .field("tags", &self.tags)
            .finish()
    }
}

/// How a broker listens and what it allows. `Default` is RabbitMQ 3.10's defaults, except the
/// listen address, which is 127.0.0.1 on a free port so that tests can run side by side.
///
/// ```
/// use warren_broker::BrokerConfig;
/// let config = BrokerConfig { frame_max: 8192, ..BrokerConfig::default() };
/// assert_eq!(config.channel_max, 2047);
/// ```
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Host and port to listen on, e.g. `127.0.0.1:0` (a free port) or `localhost:5672`
    /// (every address the name resolves to).
    pub listen: String,
    /// Users allowed to connect, with full permissions on every vhost, also those added later
    /// (more users, and narrower permissions: [`crate::BrokerHandle::add_user`],
    /// [`crate::BrokerHandle::set_permissions`]).
    pub users: Vec<User>,
    /// Vhosts besides `/`, which always exists at start (more can be added and deleted while
    /// it runs: [`crate::BrokerHandle::add_vhost`]).
    pub vhosts: Vec<String>,
    /// Largest frame the broker accepts or sends, in bytes (offered in connection.tune).
    pub frame_max: u32,
    /// Most channels a connection may have open at once (offered in connection.tune;
    /// RabbitMQ counts open channels, it does not check channel numbers).
    pub channel_max: u16,
    /// Heartbeat interval offered in connection.tune; zero disables heartbeats.
    pub heartbeat: Duration,
    /// Time a client has to complete the handshake (header to connection.open).
    pub handshake_timeout: Duration,
    /// Largest message body accepted, in bytes.
    pub max_message_size: u64,
    /// Most client connections open at once; `None` is unlimited (RabbitMQ's default).
    pub max_connections: Option<usize>,
    /// Record every method each connection sends and receives ([`crate::BrokerHandle::trace`]).
    pub trace: bool,
    /// How long a delivery may wait for its acknowledgement before its channel is closed
    /// with 406 PRECONDITION_FAILED and its unacknowledged messages requeued (RabbitMQ's
    /// `consumer_timeout`, 30 minutes by default); `None` never. Checked in steps of a quarter
    /// of it (at most a minute), so a channel closes between one and 1.25 times it late.
    ///
    /// ```
    /// use std::time::Duration;
    /// use warren_broker::BrokerConfig;
    /// // A test of a worker that must ack within half a second:
    /// let config = BrokerConfig { consumer_timeout: Some(Duration::from_millis(500)), ..BrokerConfig::default() };
    /// # let _ = config;
    /// ```
    pub consumer_timeout: Option<Duration>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".to_owned(),
            users: vec![User::guest()],
            vhosts: Vec::new(),
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_message_size: 128 * 1024 * 1024,
            max_connections: None,
            trace: false,
            consumer_timeout: Some(Duration::from_secs(30 * 60)),
        }
    }
}
