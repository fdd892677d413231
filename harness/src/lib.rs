//! What a test author touches: one test, two brokers. `cargo test` runs a test on an
//! embedded Warren broker; `AMQP_URL=amqp://...` runs the very same test against that broker
//! (a real RabbitMQ) instead.
//!
//! # Layout
//! - [`TestBroker`]: the target of a test (embedded or external), its URL, connections (named
//!   ones too, found again by name on an embedded broker), unique names (deleted again at the
//!   end on an external broker), queue counts and waits, the messages a queue holds
//!   ([`TestBroker::peek`]). Faults: forced closes ([`TestBroker::close_connection`]) and
//!   resource alarms ([`TestBroker::raise_alarm`]). Policies, vhosts, users and permissions
//!   ([`TestBroker::set_policy`], [`TestBroker::add_vhost`], [`TestBroker::add_user`]). All
//!   of these on both targets (`rabbitmqctl` on an external broker, in `rabbitmqctl`'s
//!   module). Embedded only, through [`TestBroker::embedded`]: snapshots, and a
//!   [`BrokerConfig`] of the test's own (e.g. a short `consumer_timeout`).
//! - [`proxy`]: [`Proxy`], a TCP proxy for fault injection on either target.
//! - [`wait`]: [`within`] and [`wait_until`], timeouts with clear failure messages.
//!
//! # Example
//! ```no_run
//! # async fn demo() {
//! use warren_harness::TestBroker;
//! let broker = TestBroker::start().await; // embedded, or AMQP_URL
//! let queue = broker.unique_name("jobs");
//! let conn = broker.connect().await;
//! // ... declare `queue`, publish 3 messages ...
//! broker.wait_for_messages(&queue, 3).await;
//! # let _ = conn;
//! # }
//! ```

pub mod proxy;
mod rabbitmqctl;
pub mod wait;

use lapin::options::{
    BasicGetOptions, BasicNackOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
pub use proxy::{Flow, Proxy};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
pub use wait::{DEFAULT_TIMEOUT, try_wait_until, wait_until, within};
use warren_broker::{
    Broker, BrokerConfig, BrokerHandle, MessageInfo, Policy, PolicyError, ResourceAlarm,
    UserLimits, VhostLimits,
};

/// The environment variable that points tests at an external broker.
pub const AMQP_URL_ENV: &str = "AMQP_URL";
/// Set to `1` to record every AMQP method on embedded brokers and print them when a test fails.
pub const TRACE_ENV: &str = "WARREN_TRACE";

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
    /// Names handed out by [`TestBroker::unique_name`], deleted at the end on an external
    /// broker (as queues and as exchanges), also when the test fails.
    names: Mutex<Vec<String>>,
    /// A connection for counts and waits, made on first use.
    admin: tokio::sync::OnceCell<lapin::Connection>,
    /// Policies set by [`TestBroker::set_policy`] (vhost, name), cleared at the end on an
    /// external broker.
    policies: Mutex<Vec<(String, String)>>,
    /// Vhosts added by [`TestBroker::add_vhost`], deleted at the end on an external broker.
    vhosts: Mutex<Vec<String>>,
    /// Users added by [`TestBroker::add_user`], deleted at the end on an external broker.
    users: Mutex<Vec<String>>,
    /// Alarms raised by [`TestBroker::raise_alarm`] on an external broker, with the
    /// `rabbitmqctl` arguments that put their thresholds back (at the latest at the end).
    alarms: Mutex<Vec<(ResourceAlarm, Vec<String>)>>,
    /// Erlang expressions that put back the node settings this `TestBroker` changed on an
    /// external broker, run at the end.
    settings_to_restore: Mutex<Vec<String>>,
}

/// Locks a mutex of the harness's bookkeeping, whatever a test that panicked left in it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes what a mutex of the harness's bookkeeping holds, at the end of a test.
fn take<T: Default>(mutex: &mut Mutex<T>) -> T {
    std::mem::take(mutex.get_mut().unwrap_or_else(|e| e.into_inner()))
}

/// The reply code of a connection closed by an operator (`rabbitmqctl close_connection`).
const CONNECTION_FORCED: u16 = 320;
/// RabbitMQ's channel ticks per consumer timeout, in [`TestBroker::start_with_consumer_timeout`]:
/// a timeout is seen at most a quarter of it late.
const CONSUMER_TIMEOUT_TICKS: u128 = 4;

/// `rabbitmqctl`'s JSON for limits: each one, `-1` for none.
fn limits_json(limits: &[(&str, Option<u32>)]) -> String {
    let fields: Vec<String> = limits
        .iter()
        .map(|(key, limit)| format!("\"{key}\": {}", limit.map_or(-1, i64::from)))
        .collect();
    format!("{{{}}}", fields.join(", "))
}

/// Whether `AMQP_URL` names an external broker.
pub fn external_url() -> Option<String> {
    std::env::var(AMQP_URL_ENV).ok().filter(|u| !u.is_empty())
}

impl TestBroker {
    /// Starts an embedded broker, or uses `AMQP_URL` when it is set (and not empty).
    ///
    /// # Panics
    /// When the embedded broker cannot start: a test cannot go on without its broker.
    pub async fn start() -> Self {
        match external_url() {
            Some(url) => Self::with_url(None, url),
            None => Self::start_embedded(BrokerConfig::default()).await,
        }
    }

    /// Starts an embedded broker with this configuration, whatever `AMQP_URL` says. Tests
    /// that need it say so in their name (`embedded_only`).
    ///
    /// # Panics
    /// When the broker cannot start.
    pub async fn start_embedded(mut config: BrokerConfig) -> Self {
        config.trace |= std::env::var(TRACE_ENV).is_ok_and(|v| v == "1");
        let handle = Broker::start(config)
            .await
            .expect("embedded Warren broker failed to start");
        let url = handle.url();
        Self::with_url(Some(handle), url)
    }

    /// Starts a target whose consumer timeout (RabbitMQ's `consumer_timeout`) is `timeout`:
    /// a channel whose delivery waits longer than that for its ack is closed with 406, its
    /// messages requeued. For what a service does when its handler is too slow.
    ///
    /// Embedded: a broker started with [`BrokerConfig::consumer_timeout`]. On RabbitMQ the
    /// node's `consumer_timeout` is set (`rabbitmqctl eval 'application:set_env(...)'`),
    /// with its `channel_tick_interval` at a quarter of it so that a timeout is seen within
    /// a quarter more, and both are put back when the `TestBroker` drops. They apply to the
    /// node's channels opened meanwhile, those of other tests running at the same time too:
    /// give such a test a test file of its own, whose tests take turns.
    ///
    /// # Panics
    /// When the embedded broker cannot start (or, externally, `rabbitmqctl` cannot be run).
    pub async fn start_with_consumer_timeout(timeout: Duration) -> Self {
        if external_url().is_none() {
            return Self::start_embedded(BrokerConfig {
                consumer_timeout: Some(timeout),
                ..BrokerConfig::default()
            })
            .await;
        }
        let broker = Self::start().await;
        let ms = timeout.as_millis().max(1);
        let tick = (ms / CONSUMER_TIMEOUT_TICKS).max(1);
        for (key, value) in [("consumer_timeout", ms), ("channel_tick_interval", tick)] {
            let restore = rabbitmqctl::set_rabbit_env(key, &value.to_string()).await;
            lock(&broker.settings_to_restore).push(restore);
        }
        broker
    }

    fn with_url(embedded: Option<BrokerHandle>, url: String) -> Self {
        Self {
            embedded,
            url,
            names: Mutex::new(Vec::new()),
            admin: tokio::sync::OnceCell::new(),
            policies: Mutex::new(Vec::new()),
            vhosts: Mutex::new(Vec::new()),
            users: Mutex::new(Vec::new()),
            alarms: Mutex::new(Vec::new()),
            settings_to_restore: Mutex::new(Vec::new()),
        }
    }

    /// The AMQP URL of the target.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The embedded broker (for inspection, forced closes, traces), or `None` when the target
    /// is external.
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
        connect_to(&self.url).await
    }

    /// A new lapin connection named `name` (client property `connection_name`), to find it
    /// among [`BrokerHandle::connections`] (e.g. to close it, or see it blocked) or in
    /// RabbitMQ's management UI.
    ///
    /// # Panics
    /// As [`TestBroker::connect`].
    pub async fn connect_named(&self, name: &str) -> lapin::Connection {
        let properties = lapin::ConnectionProperties::default().with_connection_name(name.into());
        connect_with(&self.url, properties).await
    }

    /// The embedded broker's id for the connection named `name` (see
    /// [`TestBroker::connect_named`]), waiting up to [`DEFAULT_TIMEOUT`] for it to be listed;
    /// `None` on an external broker or when no such connection shows up.
    pub async fn connection_id(&self, name: &str) -> Option<u64> {
        let handle = self.embedded()?;
        try_wait_until(
            &format!("connection '{name}' is listed"),
            DEFAULT_TIMEOUT,
            || async {
                handle
                    .connections()
                    .into_iter()
                    .find(|c| c.name.as_deref() == Some(name))
                    .map(|c| c.id)
                    .ok_or_else(|| "not listed".to_owned())
            },
        )
        .await
        .ok()
    }

    /// Whether a connection named `name` (client property `connection_name`, see
    /// [`TestBroker::connect_named`]) is open, on both targets (on RabbitMQ by `rabbitmqctl
    /// list_connections`, which lists a connection a moment after it opens and until a
    /// moment after it closes: wait with [`TestBroker::wait_for_connection`] and
    /// [`TestBroker::wait_for_connection_closed`]).
    pub async fn has_connection(&self, name: &str) -> bool {
        match &self.embedded {
            Some(handle) => handle
                .connections()
                .iter()
                .any(|c| c.name.as_deref() == Some(name)),
            None => rabbitmqctl::connection_pid(name).await.is_some(),
        }
    }

    /// Waits until a connection named `name` is open: a service under test has connected.
    ///
    /// # Panics
    /// After [`DEFAULT_TIMEOUT`].
    pub async fn wait_for_connection(&self, name: &str) {
        self.wait_for_connection_state(name, true).await;
    }

    /// Waits until no connection named `name` is open: a service under test has closed its
    /// connection (a clean shutdown), or its old connection is gone after a reconnect.
    ///
    /// # Panics
    /// After [`DEFAULT_TIMEOUT`].
    pub async fn wait_for_connection_closed(&self, name: &str) {
        self.wait_for_connection_state(name, false).await;
    }

    async fn wait_for_connection_state(&self, name: &str, open: bool) {
        let goal = format!(
            "connection '{name}' is {}",
            if open { "open" } else { "closed" }
        );
        wait_until(&goal, DEFAULT_TIMEOUT, || async {
            if self.has_connection(name).await == open {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        })
        .await;
    }

    /// Closes the connection named `name` (see [`TestBroker::connect_named`]) as an operator's
    /// `rabbitmqctl close_connection` does, on both targets: its client gets connection.close
    /// 320 `CONNECTION_FORCED - {reason}`, and its unacknowledged messages go back to their
    /// queues. For what a service does when RabbitMQ drops it; for a fault below AMQP (a cut
    /// or stalled socket) see [`TestBroker::proxy`].
    ///
    /// ```no_run
    /// # async fn f() {
    /// let broker = warren_harness::TestBroker::start().await;
    /// // A unique name: on a shared RabbitMQ, another test's connection may be named alike.
    /// let name = broker.unique_name("billing");
    /// let service = broker.connect_named(&name).await;
    /// broker.close_connection(&name, "maintenance").await;
    /// // The service's next operation fails with 320 CONNECTION_FORCED - maintenance.
    /// # }
    /// ```
    ///
    /// On RabbitMQ the connection is found in `rabbitmqctl list_connections`'s listing of
    /// client properties, where a name with characters Erlang prints escaped (control
    /// characters, some non-ASCII) would not be found: keep names plain.
    ///
    /// # Panics
    /// When no connection of that name is listed within [`DEFAULT_TIMEOUT`] (or, externally,
    /// `rabbitmqctl` cannot be run).
    pub async fn close_connection(&self, name: &str, reason: &str) {
        match &self.embedded {
            Some(handle) => {
                let id = self
                    .connection_id(name)
                    .await
                    .unwrap_or_else(|| panic!("no connection named '{name}'"));
                // false: it closed on its own since it was listed, which is what was asked.
                handle.close_connection(id, CONNECTION_FORCED, reason);
            }
            None => {
                let pid = wait_until(
                    &format!("connection '{name}' is listed"),
                    DEFAULT_TIMEOUT,
                    || async {
                        rabbitmqctl::connection_pid(name)
                            .await
                            .ok_or_else(|| "not listed".to_owned())
                    },
                )
                .await;
                run_or_panic(&["close_connection", &pid, reason]).await;
            }
        }
    }

    /// Raises a resource alarm, as RabbitMQ does when it runs low on memory or disk, on both
    /// targets: each connection that publishes from then on is blocked (sent
    /// `connection.blocked` if its client takes it, its input left unread, nothing lost)
    /// until [`TestBroker::clear_alarm`]; connections that only consume go on. For what a
    /// service does when RabbitMQ throttles it. Returns once the alarm is in force.
    ///
    /// On RabbitMQ the alarm is raised by setting its threshold out of reach (`rabbitmqctl
    /// set_vm_memory_high_watermark absolute 1`, `set_disk_free_limit` of 1 EB), and the
    /// threshold is put back by `clear_alarm` or, failing that, when the `TestBroker` is
    /// dropped (a test killed outright leaves it: `rabbitmqctl set_vm_memory_high_watermark
    /// 0.4` / `set_disk_free_limit 50MB` repair RabbitMQ's defaults). It blocks every
    /// publisher of that node, those of other tests running at the same time too: give such
    /// a test a test file (a test binary) of its own whose tests take turns; `cargo test`
    /// runs test binaries one at a time (`cargo nextest` does not).
    ///
    /// ```no_run
    /// # async fn f() {
    /// use warren_broker::ResourceAlarm;
    /// let broker = warren_harness::TestBroker::start().await;
    /// broker.raise_alarm(ResourceAlarm::Memory).await;
    /// // ... the service's next publish blocks its connection ...
    /// broker.clear_alarm(ResourceAlarm::Memory).await;
    /// # }
    /// ```
    ///
    /// # Panics
    /// Externally, when `rabbitmqctl` cannot be run, when the alarm is raised already (by
    /// another test, or left by one that was killed: the message says how to repair it), or
    /// when it does not show within [`DEFAULT_TIMEOUT`].
    pub async fn raise_alarm(&self, alarm: ResourceAlarm) {
        match &self.embedded {
            Some(handle) => handle.raise_alarm(alarm),
            None => {
                if self.raised(alarm).is_some() {
                    return;
                }
                // Kept before the threshold changes, so that the end of the test puts it back
                // even if raising fails half-way.
                let restore = rabbitmqctl::alarm_restore_args(alarm).await;
                lock(&self.alarms).push((alarm, restore));
                rabbitmqctl::raise_alarm(alarm, DEFAULT_TIMEOUT).await;
            }
        }
    }

    /// Clears a resource alarm raised by [`TestBroker::raise_alarm`]; with none left, blocked
    /// connections are read again (and sent `connection.unblocked`). Returns once the alarm
    /// is gone.
    ///
    /// # Panics
    /// As [`TestBroker::raise_alarm`]; on RabbitMQ also when this `TestBroker` did not raise
    /// that alarm (it would not know the threshold to put back).
    pub async fn clear_alarm(&self, alarm: ResourceAlarm) {
        match &self.embedded {
            Some(handle) => handle.clear_alarm(alarm),
            None => {
                let restore = self.raised(alarm).unwrap_or_else(|| {
                    panic!("clear_alarm({alarm:?}): this TestBroker did not raise it on RabbitMQ")
                });
                rabbitmqctl::clear_alarm(alarm, &restore, DEFAULT_TIMEOUT).await;
                lock(&self.alarms).retain(|(a, _)| *a != alarm);
            }
        }
    }

    /// How to put back the threshold of `alarm`, if this `TestBroker` raised it on RabbitMQ.
    fn raised(&self, alarm: ResourceAlarm) -> Option<Vec<String>> {
        lock(&self.alarms)
            .iter()
            .find(|(a, _)| *a == alarm)
            .map(|(_, restore)| restore.clone())
    }

    /// A name with a random suffix, so tests sharing one external broker never collide. On an
    /// external broker, a queue or exchange of that name is deleted when the `TestBroker` is
    /// dropped, even if the test failed.
    pub fn unique_name(&self, prefix: &str) -> String {
        let name = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
        lock(&self.names).push(name.clone());
        name
    }

    /// A TCP proxy in front of the target, for fault injection.
    pub async fn proxy(&self) -> Proxy {
        Proxy::start(&self.url).await
    }

    /// Ready messages and consumers of a queue, by passive declare (both targets); `None` if
    /// the queue does not exist.
    pub async fn queue_counts(&self, queue: &str) -> Option<(u32, u32)> {
        let admin = self.admin.get_or_init(|| connect_to(&self.url)).await;
        let channel = within("an admin channel", admin.create_channel())
            .await
            .ok()?;
        let declared = within(
            "a passive queue.declare",
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .ok()?;
        let _ = channel.close(200, "OK".into()).await;
        Some((declared.message_count(), declared.consumer_count()))
    }

    /// The ready messages of `queue`, in delivery order; `None` if the queue does not exist.
    /// On an embedded broker they are read in place ([`BrokerHandle::messages`]): nothing
    /// changes. On an external one they are taken with basic.get and put back at once with
    /// one basic.nack (RabbitMQ puts them back in place): afterwards they are flagged
    /// redelivered, a quorum queue counts a delivery, and a consumer of the queue may get
    /// one meanwhile, so look at queues without consumers (a dead-letter queue, say).
    ///
    /// ```no_run
    /// # async fn demo() {
    /// let broker = warren_harness::TestBroker::start().await;
    /// // ... the service under test rejects a message into `dead` ...
    /// let dead = broker.peek("dead").await.expect("the queue exists");
    /// assert_eq!(dead[0].body, b"poison");
    /// # }
    /// ```
    ///
    /// # Panics
    /// On an external broker, when a basic.get or the nack fails for another reason than a
    /// missing queue, or takes over [`DEFAULT_TIMEOUT`].
    pub async fn peek(&self, queue: &str) -> Option<Vec<MessageInfo>> {
        if let Some(handle) = &self.embedded {
            return handle.messages(queue);
        }
        let admin = self.admin.get_or_init(|| connect_to(&self.url)).await;
        let channel = within("an admin channel", admin.create_channel())
            .await
            .expect("an admin channel");
        let mut messages = Vec::new();
        let mut last_tag = None;
        loop {
            let got = within(
                "basic.get",
                channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }),
            )
            .await;
            let Some(message) = (match got {
                Ok(message) => message,
                Err(_) if messages.is_empty() => return None,
                Err(e) => panic!("basic.get from {queue}: {e}"),
            }) else {
                break;
            };
            let delivery = message.delivery;
            last_tag = Some(delivery.delivery_tag);
            messages.push(MessageInfo {
                exchange: delivery.exchange.to_string(),
                routing_key: delivery.routing_key.to_string(),
                properties: delivery.properties,
                body: delivery.data,
                redelivered: delivery.redelivered,
            });
        }
        if let Some(tag) = last_tag {
            let requeue = BasicNackOptions {
                multiple: true,
                requeue: true,
            };
            within("basic.nack", channel.basic_nack(tag, requeue))
                .await
                .unwrap_or_else(|e| panic!("basic.nack of what was taken from {queue}: {e}"));
        }
        let _ = within("channel.close", channel.close(200, "OK".into())).await;
        Some(messages)
    }

    /// Waits until `queue` holds exactly `n` ready messages.
    ///
    /// # Panics
    /// After [`DEFAULT_TIMEOUT`], saying what was seen.
    pub async fn wait_for_messages(&self, queue: &str, n: u32) {
        self.wait_for_count(queue, "ready messages", n, |(ready, _)| ready)
            .await;
    }

    /// Waits until `queue` has exactly `n` consumers.
    ///
    /// # Panics
    /// After [`DEFAULT_TIMEOUT`], saying what was seen.
    pub async fn wait_for_consumers(&self, queue: &str, n: u32) {
        self.wait_for_count(queue, "consumers", n, |(_, consumers)| consumers)
            .await;
    }

    async fn wait_for_count(&self, queue: &str, what: &str, n: u32, pick: fn((u32, u32)) -> u32) {
        let goal = format!("queue '{queue}' has {n} {what}");
        wait_until(&goal, DEFAULT_TIMEOUT, || async {
            match self.queue_counts(queue).await {
                Some(counts) if pick(counts) == n => Ok(()),
                Some(counts) => Err(format!("{} {what}", pick(counts))),
                None => Err("no such queue".to_owned()),
            }
        })
        .await
    }

    /// Sets a policy, as an operator's `rabbitmqctl set_policy` would: on an embedded broker
    /// through [`BrokerHandle::set_policy`], on an external one by running `rabbitmqctl`
    /// (or the command in `WARREN_RABBITMQCTL`, e.g. `docker exec rabbit rabbitmqctl`), in
    /// the policy's vhost ([`Policy::vhost`]: `/` unless set; [`TestBroker::vhost`] is the
    /// URL's). Policies a test sets are cleared when the `TestBroker` is dropped.
    /// RabbitMQ applies a policy to existing queues a moment after `rabbitmqctl` returns
    /// (queues declared afterwards have it at once): wait for what it changes, e.g. with
    /// [`TestBroker::wait_for_messages`]. Patterns should name the test's own queues
    /// (`format!("^{queue}$")`), since tests share an external broker.
    ///
    /// ```no_run
    /// # async fn demo() {
    /// use warren_broker::{ApplyTo, Policy};
    /// let broker = warren_harness::TestBroker::start().await;
    /// let queue = broker.unique_name("jobs");
    /// let policy = Policy::new(&queue, format!("^{queue}$"))
    ///     .vhost(broker.vhost())
    ///     .apply_to(ApplyTo::Queues)
    ///     .max_length(2);
    /// broker.set_policy(&policy).await.unwrap();
    /// # }
    /// ```
    ///
    /// # Panics
    /// On an external broker, when `rabbitmqctl` cannot be run or takes over 30 seconds.
    pub async fn set_policy(&self, policy: &Policy) -> Result<(), PolicyError> {
        lock(&self.policies).push((policy.vhost.clone(), policy.name.clone()));
        match &self.embedded {
            Some(handle) => handle.set_policy(policy.clone()),
            None => {
                let definition = rabbitmqctl::definition_json(&policy.definition);
                let priority = policy.priority.to_string();
                let args = [
                    "set_policy",
                    "--vhost",
                    &policy.vhost,
                    "--apply-to",
                    policy.apply_to.as_str(),
                    "--priority",
                    &priority,
                    &policy.name,
                    &policy.pattern,
                    &definition,
                ];
                rabbitmqctl::run(&args).await
            }
        }
    }

    /// Clears the policy `name` of `vhost` ([`PolicyError::NotFound`] if there is none).
    ///
    /// # Panics
    /// As [`TestBroker::set_policy`].
    pub async fn clear_policy(&self, vhost: &str, name: &str) -> Result<(), PolicyError> {
        match &self.embedded {
            Some(handle) => handle.clear_policy(vhost, name),
            None => rabbitmqctl::run(&["clear_policy", "--vhost", vhost, name]).await,
        }
    }

    /// Adds a vhost the target's user may use (`rabbitmqctl add_vhost` and `set_permissions`
    /// on an external broker, where it is deleted again when the `TestBroker` is dropped).
    /// Connect to it with [`TestBroker::url_for`]; name it with [`TestBroker::unique_name`]
    /// when tests share an external broker.
    ///
    /// ```no_run
    /// # async fn demo() {
    /// let broker = warren_harness::TestBroker::start().await;
    /// let vhost = broker.unique_name("orders");
    /// broker.add_vhost(&vhost).await;
    /// let conn = warren_harness::connect_to(&broker.url_for(&vhost)).await;
    /// # let _ = conn;
    /// # }
    /// ```
    ///
    /// # Panics
    /// When the vhost cannot be added (or, externally, `rabbitmqctl` cannot be run).
    pub async fn add_vhost(&self, name: &str) {
        lock(&self.vhosts).push(name.to_owned());
        match &self.embedded {
            Some(handle) => assert!(handle.add_vhost(name), "vhost {name} exists already"),
            None => {
                let user = self.user();
                for args in [
                    vec!["add_vhost", name],
                    vec!["set_permissions", "--vhost", name, &user, ".*", ".*", ".*"],
                ] {
                    run_or_panic(&args).await;
                }
            }
        }
    }

    /// Deletes a vhost: its connections are closed with 320 CONNECTION_FORCED.
    ///
    /// # Panics
    /// When there is no such vhost (or, externally, `rabbitmqctl` cannot be run).
    pub async fn delete_vhost(&self, name: &str) {
        match &self.embedded {
            Some(handle) => assert!(handle.delete_vhost(name), "no vhost {name}"),
            None => run_or_panic(&["delete_vhost", name]).await,
        }
    }

    /// Loads RabbitMQ definitions (the JSON of `rabbitmqctl export_definitions`): on an
    /// embedded broker with [`BrokerHandle::load_definitions`], on an external one with
    /// `rabbitmqctl import_definitions`. The vhosts, policies and users it names (but the
    /// URL's own user) are deleted and cleared at the end on an external broker; name its
    /// queues and exchanges with [`TestBroker::unique_name`] to have them deleted too.
    /// Definitions that change the URL's own user (a full export lists `guest`) change it on
    /// RabbitMQ for good: leave that user out of them.
    ///
    /// # Panics
    /// When the definitions are refused, or (externally) `rabbitmqctl` cannot be run.
    pub async fn load_definitions(&self, json: &str) {
        if let Some(handle) = &self.embedded {
            handle
                .load_definitions(json)
                .unwrap_or_else(|e| panic!("definitions refused: {e}"));
            return;
        }
        if let Ok(serde_json::Value::Object(root)) = serde_json::from_str(json) {
            let field = |object: &serde_json::Value, key: &str| {
                object.get(key).and_then(|v| v.as_str()).map(str::to_owned)
            };
            let list = |key: &str| {
                root.get(key)
                    .and_then(|v| v.as_array())
                    .cloned()
                    .unwrap_or_default()
            };
            for policy in list("policies") {
                if let Some(name) = field(&policy, "name") {
                    let vhost = field(&policy, "vhost").unwrap_or_else(|| "/".to_owned());
                    lock(&self.policies).push((vhost, name));
                }
            }
            for vhost in list("vhosts") {
                if let Some(name) = field(&vhost, "name").filter(|n| n != "/") {
                    lock(&self.vhosts).push(name);
                }
            }
            let own = self.user();
            for user in list("users") {
                if let Some(name) = field(&user, "name").filter(|n| *n != own) {
                    lock(&self.users).push(name);
                }
            }
        }
        let file = std::env::temp_dir().join(format!(
            "warren-definitions-{}.json",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&file, json).expect("write the definitions to a temporary file");
        let path = file.to_string_lossy().into_owned();
        let imported = rabbitmqctl::run(&["import_definitions", &path]).await;
        let _ = std::fs::remove_file(&file);
        imported.unwrap_or_else(|e| panic!("rabbitmqctl import_definitions refused them: {e}"));
    }

    /// Adds a user with no permissions (`rabbitmqctl add_user` on an external broker, where
    /// it is deleted again when the `TestBroker` is dropped): it may log in but open no vhost
    /// until [`TestBroker::set_permissions`]. Connect as it with [`TestBroker::url_as`]; name
    /// it with [`TestBroker::unique_name`] when tests share an external broker.
    ///
    /// ```no_run
    /// # async fn demo() {
    /// let broker = warren_harness::TestBroker::start().await;
    /// let user = broker.unique_name("reporter");
    /// broker.add_user(&user, "secret").await;
    /// // Reads the `reports` queues, publishes nowhere, declares nothing.
    /// broker.set_permissions(&broker.vhost(), &user, "", "", "^reports").await;
    /// let conn = warren_harness::connect_to(&broker.url_as(&user, "secret", &broker.vhost())).await;
    /// # let _ = conn;
    /// # }
    /// ```
    ///
    /// # Panics
    /// When the user exists (or, externally, `rabbitmqctl` cannot be run).
    pub async fn add_user(&self, name: &str, password: &str) {
        lock(&self.users).push(name.to_owned());
        match &self.embedded {
            Some(handle) => assert!(handle.add_user(name, password), "user {name} exists"),
            None => run_or_panic(&["add_user", name, password]).await,
        }
    }

    /// Deletes a user: its connections are closed with 320 CONNECTION_FORCED.
    ///
    /// # Panics
    /// When there is no such user (or, externally, `rabbitmqctl` cannot be run).
    pub async fn delete_user(&self, name: &str) {
        match &self.embedded {
            Some(handle) => assert!(handle.delete_user(name), "no user {name}"),
            None => run_or_panic(&["delete_user", name]).await,
        }
    }

    /// Sets a user's permissions in a vhost, as `rabbitmqctl set_permissions` does: regular
    /// expressions for the queues and exchanges it may configure, write and read (see
    /// [`BrokerHandle::set_permissions`]).
    ///
    /// # Panics
    /// When the user or vhost does not exist or a pattern is not a regular expression (or,
    /// externally, `rabbitmqctl` cannot be run).
    pub async fn set_permissions(
        &self,
        vhost: &str,
        user: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) {
        match &self.embedded {
            Some(handle) => handle
                .set_permissions(vhost, user, configure, write, read)
                .unwrap_or_else(|e| panic!("set_permissions: {e}")),
            None => {
                let args = [
                    "set_permissions",
                    "--vhost",
                    vhost,
                    user,
                    configure,
                    write,
                    read,
                ];
                run_or_panic(&args).await;
            }
        }
    }

    /// Clears a user's permissions in a vhost: it may no longer open it.
    ///
    /// # Panics
    /// As [`TestBroker::set_permissions`].
    pub async fn clear_permissions(&self, vhost: &str, user: &str) {
        match &self.embedded {
            Some(handle) => handle
                .clear_permissions(vhost, user)
                .unwrap_or_else(|e| panic!("clear_permissions: {e}")),
            None => run_or_panic(&["clear_permissions", "--vhost", vhost, user]).await,
        }
    }

    /// Sets a vhost's limits (connections, queues), as `rabbitmqctl set_vhost_limits` does:
    /// see [`BrokerHandle::set_vhost_limits`]. Give the test a vhost of its own
    /// ([`TestBroker::add_vhost`]) when it may run against a shared RabbitMQ.
    ///
    /// # Panics
    /// When there is no such vhost (or, externally, `rabbitmqctl` cannot be run).
    pub async fn set_vhost_limits(&self, vhost: &str, limits: VhostLimits) {
        match &self.embedded {
            Some(handle) => assert!(handle.set_vhost_limits(vhost, limits), "no vhost {vhost}"),
            None => {
                let json = limits_json(&[
                    ("max-connections", limits.max_connections),
                    ("max-queues", limits.max_queues),
                ]);
                run_or_panic(&["set_vhost_limits", "--vhost", vhost, &json]).await;
            }
        }
    }

    /// Sets a user's limits (connections, channels), as `rabbitmqctl set_user_limits` does:
    /// see [`BrokerHandle::set_user_limits`].
    ///
    /// # Panics
    /// When there is no such user (or, externally, `rabbitmqctl` cannot be run).
    pub async fn set_user_limits(&self, user: &str, limits: UserLimits) {
        match &self.embedded {
            Some(handle) => assert!(handle.set_user_limits(user, limits), "no user {user}"),
            None => {
                let json = limits_json(&[
                    ("max-connections", limits.max_connections),
                    ("max-channels", limits.max_channels),
                ]);
                run_or_panic(&["set_user_limits", user, &json]).await;
            }
        }
    }

    /// Replaces a user's tags, as `rabbitmqctl set_user_tags USER TAG...` does (none clears
    /// them). Of the tags only `impersonator` changes what a client may do (publish with
    /// another user's name as `user_id`), and a connection keeps the tags its user had when
    /// it opened. See [`BrokerHandle::set_user_tags`].
    ///
    /// # Panics
    /// When there is no such user (or, externally, `rabbitmqctl` cannot be run).
    pub async fn set_user_tags(&self, user: &str, tags: &[&str]) {
        match &self.embedded {
            Some(handle) => assert!(handle.set_user_tags(user, tags), "no user {user}"),
            None => {
                let args: Vec<&str> = ["set_user_tags", user]
                    .into_iter()
                    .chain(tags.iter().copied())
                    .collect();
                run_or_panic(&args).await;
            }
        }
    }

    /// Sets a user's topic permissions on an exchange in a vhost, as `rabbitmqctl
    /// set_topic_permissions` does (on a topic exchange, the routing keys it may publish
    /// with and bind with; `{username}` and `{vhost}` are expanded). See
    /// [`BrokerHandle::set_topic_permissions`].
    ///
    /// # Panics
    /// When they are refused (or, externally, `rabbitmqctl` cannot be run).
    pub async fn set_topic_permissions(
        &self,
        vhost: &str,
        user: &str,
        exchange: &str,
        write: &str,
        read: &str,
    ) {
        match &self.embedded {
            Some(handle) => handle
                .set_topic_permissions(vhost, user, exchange, write, read)
                .unwrap_or_else(|e| panic!("set_topic_permissions: {e}")),
            None => {
                let args = [
                    "set_topic_permissions",
                    "--vhost",
                    vhost,
                    user,
                    exchange,
                    write,
                    read,
                ];
                run_or_panic(&args).await;
            }
        }
    }

    /// Clears a user's topic permissions on `exchange` in a vhost, as `rabbitmqctl
    /// clear_topic_permissions` does.
    ///
    /// # Panics
    /// When they are refused (or, externally, `rabbitmqctl` cannot be run).
    pub async fn clear_topic_permissions(&self, vhost: &str, user: &str, exchange: &str) {
        match &self.embedded {
            Some(handle) => handle
                .clear_topic_permissions(vhost, user, Some(exchange))
                .unwrap_or_else(|e| panic!("clear_topic_permissions: {e}")),
            None => {
                let args = ["clear_topic_permissions", "--vhost", vhost, user, exchange];
                run_or_panic(&args).await;
            }
        }
    }

    /// The target's URL for vhost `vhost`, logging in as `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str, vhost: &str) -> String {
        let url = self.url_for(vhost);
        let encode = |text: &str| {
            percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        };
        let start = url.find("://").map_or(0, |i| i + 3);
        let host = match url[start..].find('@') {
            Some(at) => &url[start + at + 1..],
            None => &url[start..],
        };
        format!(
            "{}{}:{}@{host}",
            &url[..start],
            encode(user),
            encode(password)
        )
    }

    /// The target's URL with vhost `vhost` instead of its own.
    pub fn url_for(&self, vhost: &str) -> String {
        let encoded =
            percent_encoding::utf8_percent_encode(vhost, percent_encoding::NON_ALPHANUMERIC);
        let (url, query) = self
            .url
            .split_once('?')
            .map_or((self.url.as_str(), None), |(u, q)| (u, Some(q)));
        let authority_end = url.find("://").map_or(0, |i| i + 3);
        let base = match url[authority_end..].find('/') {
            Some(slash) => &url[..authority_end + slash],
            None => url,
        };
        match query {
            Some(query) => format!("{base}/{encoded}?{query}"),
            None => format!("{base}/{encoded}"),
        }
    }

    /// The vhost the URL names (`/` when it names none): give it to the policies of a test
    /// that may run against an `AMQP_URL` naming another.
    pub fn vhost(&self) -> String {
        self.url
            .parse::<lapin::uri::AMQPUri>()
            .map(|uri| uri.vhost)
            .unwrap_or_else(|_| "/".to_owned())
    }

    /// The user the URL logs in as.
    fn user(&self) -> String {
        self.url
            .parse::<lapin::uri::AMQPUri>()
            .map(|uri| uri.authority.userinfo.username)
            .unwrap_or_else(|_| "guest".to_owned())
    }

    /// The embedded broker's method trace, one line per method (empty unless `WARREN_TRACE=1`
    /// or the broker was started with [`BrokerConfig::trace`]).
    pub fn trace_text(&self) -> String {
        let Some(handle) = &self.embedded else {
            return String::new();
        };
        handle.trace().iter().map(|e| format!("{e}\n")).collect()
    }
}

/// Runs `rabbitmqctl` with `args`.
///
/// # Panics
/// When it fails or cannot be run.
async fn run_or_panic(args: &[&str]) {
    rabbitmqctl::run(args)
        .await
        .unwrap_or_else(|e| panic!("rabbitmqctl {args:?}: {e}"));
}

/// Connects lapin to `url` within 10 seconds.
///
/// # Panics
/// When the connection fails or times out.
pub async fn connect_to(url: &str) -> lapin::Connection {
    connect_with(url, lapin::ConnectionProperties::default()).await
}

async fn connect_with(url: &str, properties: lapin::ConnectionProperties) -> lapin::Connection {
    let connect = lapin::Connection::connect(url, properties);
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!("cannot connect to {url}: {e}"),
        Err(_) => panic!("connecting to {url} timed out after 10 s"),
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let trace = self.trace_text();
            if !trace.is_empty() {
                eprintln!("--- AMQP methods seen by the embedded broker ---\n{trace}---");
            }
        }
        let names = take(&mut self.names);
        let policies = take(&mut self.policies);
        if self.embedded.is_some() {
            return;
        }
        // First what blocks every publisher of the node.
        for (alarm, restore) in take(&mut self.alarms) {
            rabbitmqctl::restore_quietly(alarm, &restore);
        }
        for (vhost, name) in policies {
            rabbitmqctl::clear_quietly(&vhost, &name);
        }
        for vhost in take(&mut self.vhosts) {
            rabbitmqctl::delete_vhost_quietly(&vhost);
        }
        for user in take(&mut self.users) {
            rabbitmqctl::delete_user_quietly(&user);
        }
        for expression in take(&mut self.settings_to_restore) {
            rabbitmqctl::eval_quietly(&expression);
        }
        if names.is_empty() {
            return;
        }
        // On an external broker, delete what the test named, from a thread of its own (a
        // test's runtime may be gone or blocked by now).
        let url = self.url.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let connect = lapin::Connection::connect(&url, Default::default());
                let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(5), connect).await
                else {
                    return;
                };
                for name in names {
                    let deletes = async {
                        if let Ok(ch) = conn.create_channel().await {
                            let _ = ch
                                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                                .await;
                        }
                        if let Ok(ch) = conn.create_channel().await {
                            let _ = ch
                                .exchange_delete(
                                    name.as_str().into(),
                                    ExchangeDeleteOptions::default(),
                                )
                                .await;
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(5), deletes).await;
                }
                let _ = conn.close(200, "OK".into()).await;
            });
        });
        let _ = cleanup.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_for_swaps_the_vhost_and_keeps_the_rest() {
        let broker = TestBroker::with_url(None, "amqp://u:p@host:5672/%2F?heartbeat=5".into());
        assert_eq!(
            broker.url_for("orders/eu"),
            "amqp://u:p@host:5672/orders%2Feu?heartbeat=5"
        );
        let bare = TestBroker::with_url(None, "amqp://host".into());
        assert_eq!(bare.url_for("/"), "amqp://host/%2F");
        assert_eq!(bare.user(), "guest");
    }
}
