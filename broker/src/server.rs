//! The accept loop, the connection limit and shutdown fan-out; [`Broker`] and
//! [`BrokerHandle`].

use crate::BrokerConfig;
use crate::alarm::{Alarms, ResourceAlarm};
use crate::connection;
use crate::credential::Credential;
use crate::definitions::{DefinitionsError, LoadedDefinitions};
use crate::error::AmqpError;
use crate::inspect::{ConnectionInfo, MessageInfo, QueueInfo};
use crate::limits::{UserLimits, VhostLimits};
use crate::mailbox::{Mailbox, Outbound};
use crate::permissions::{
    PermissionError, Permissions, TagGrants, TopicPermission, TopicPermissions, Users,
};
use crate::policy::{Policy, PolicyError};
use crate::queue::ConnId;
use crate::trace::{Trace, TraceEntry};
use crate::vhost::{Vhost, run_expiry};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be resolved or bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address as configured.
        addr: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The configuration names no user: nobody could log in.
    #[error("no users configured")]
    NoUsers,
}

/// A connection as the broker lists it.
#[derive(Debug)]
pub(crate) struct ConnectionEntry {
    pub(crate) peer: String,
    pub(crate) user: String,
    pub(crate) client: String,
    pub(crate) name: Option<String>,
    pub(crate) mailbox: Mailbox,
    /// Its vhost (this instance: a vhost deleted and added again is another).
    pub(crate) vhost: Arc<Vhost>,
    pub(crate) channels: Arc<AtomicUsize>,
    /// Whether a resource alarm holds its input (see [`crate::alarm`]).
    pub(crate) blocked: Arc<AtomicBool>,
}

/// State shared by the accept loop and every connection of one broker.
#[derive(Debug)]
pub(crate) struct BrokerShared {
    /// The configuration it started with.
    pub(crate) config: BrokerConfig,
    /// Its vhosts by name. A std mutex: held only to look one up, add or remove one.
    vhosts: Mutex<HashMap<String, VhostEntry>>,
    /// The runtime it runs on, for the tasks of vhosts added from outside it.
    runtime: tokio::runtime::Handle,
    /// Cancelled when the broker shuts down.
    pub(crate) shutdown: CancellationToken,
    /// The frame trace, when enabled.
    pub(crate) trace: Option<Trace>,
    next_conn_id: AtomicU64,
    /// Connection tasks alive (handshaking or open), for the connection limit.
    live: AtomicUsize,
    /// Open connections, for inspection and forced closes. A std mutex: held only to insert,
    /// remove or copy entries, never across an `.await`.
    connections: Mutex<HashMap<ConnId, ConnectionEntry>>,
    /// The resource alarms raised; changed only with `connections` locked, so that a
    /// connection registering meanwhile either is told of the change or reads it.
    alarms: Mutex<Alarms>,
    /// Users and their permissions. A std mutex: held only to look one up or change one.
    users: Mutex<Users>,
    /// Bumped at every change of permissions (or users, or vhosts), so that a connection
    /// rereads its own only then.
    permissions_version: AtomicU64,
}

/// A vhost, and what stops its expiry task.
#[derive(Debug)]
struct VhostEntry {
    vhost: Arc<Vhost>,
    stop: CancellationToken,
}

impl BrokerShared {
    /// The vhost named `name`, if it exists.
    pub(crate) fn vhost(&self, name: &str) -> Option<Arc<Vhost>> {
        self.vhosts_lock().get(name).map(|e| e.vhost.clone())
    }

    /// Whether `vhost` is still one of the broker's (not deleted since it was looked up).
    pub(crate) fn has_vhost(&self, vhost: &Arc<Vhost>) -> bool {
        self.vhosts_lock()
            .get(&vhost.name)
            .is_some_and(|e| Arc::ptr_eq(&e.vhost, vhost))
    }

    fn vhosts_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VhostEntry>> {
        self.vhosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every vhost, by name.
    fn all_vhosts(&self) -> Vec<Arc<Vhost>> {
        let mut all: Vec<Arc<Vhost>> = self
            .vhosts_lock()
            .values()
            .map(|e| e.vhost.clone())
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Adds a vhost and starts its expiry task on `tracker`; false if it exists. The
    /// configured users get full permissions on it.
    fn add_vhost(&self, name: &str, tracker: &TaskTracker) -> bool {
        let mut vhosts = self.vhosts_lock();
        if vhosts.contains_key(name) {
            return false;
        }
        let vhost = Arc::new(Vhost::new(name));
        let stop = self.shutdown.child_token();
        tracker.spawn_on(run_expiry(vhost.clone(), stop.clone()), &self.runtime);
        // Under the vhosts lock (always taken before the users lock): a configured user
        // never finds the vhost without its permissions.
        self.change_users(|users| users.vhost_added(name));
        vhosts.insert(name.to_owned(), VhostEntry { vhost, stop });
        true
    }

    fn users_lock(&self) -> std::sync::MutexGuard<'_, Users> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether there is a user of that name.
    pub(crate) fn has_user(&self, name: &str) -> bool {
        self.users_lock().exists(name)
    }

    /// Whether `name` logs in with `password`.
    pub(crate) fn authenticate(&self, name: &str, password: &str) -> Option<TagGrants> {
        self.users_lock().authenticate(name, password)
    }

    /// The version of the permissions (see [`BrokerShared::access`]): read it first,
    /// then the permissions, and read them again once it has changed.
    pub(crate) fn permissions_version(&self) -> u64 {
        self.permissions_version.load(Ordering::Acquire)
    }

    /// `user`'s permissions and topic permissions in `vhost`, under one hold of the users
    /// lock (`None`: no permissions, or no topic permissions).
    pub(crate) fn access(
        &self,
        user: &str,
        vhost: &str,
    ) -> (Option<Arc<Permissions>>, Option<Arc<TopicPermissions>>) {
        let users = self.users_lock();
        (
            users.permissions(user, vhost),
            users.topic_permissions(user, vhost),
        )
    }

    /// `user`'s limits.
    pub(crate) fn user_limits(&self, user: &str) -> UserLimits {
        self.users_lock().limits(user)
    }

    /// How many open connections are to `vhost` (this very vhost), and how many are `user`'s.
    pub(crate) fn connection_counts(&self, vhost: &Arc<Vhost>, user: &str) -> (usize, usize) {
        let connections = self.connections_lock();
        connections.values().fold((0, 0), |(to_vhost, of_user), c| {
            (
                to_vhost + usize::from(Arc::ptr_eq(&c.vhost, vhost)),
                of_user + usize::from(c.user == user),
            )
        })
    }

    /// How many channels `user`'s connections other than `except` have open (as of their
    /// last read).
    pub(crate) fn user_channels(&self, user: &str, except: ConnId) -> usize {
        self.connections_lock()
            .iter()
            .filter(|(id, c)| **id != except && c.user == user)
            .map(|(_, c)| c.channels.load(Ordering::Relaxed))
            .sum()
    }

    /// Changes the users, and tells connections to reread their permissions.
    fn change_users<T>(&self, change: impl FnOnce(&mut Users) -> T) -> T {
        let result = change(&mut self.users_lock());
        self.permissions_version.fetch_add(1, Ordering::AcqRel);
        result
    }

    /// Registers an open connection: its id, and the resource alarms raised now (it is told
    /// of later changes through its mailbox).
    pub(crate) fn register_connection(&self, entry: ConnectionEntry) -> (ConnId, Alarms) {
        let id = self.next_conn_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut connections = self.connections_lock();
        connections.insert(id, entry);
        (id, *self.alarms_lock())
    }

    fn alarms_lock(&self) -> std::sync::MutexGuard<'_, Alarms> {
        self.alarms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises or clears a resource alarm and tells every connection.
    fn set_alarm(&self, alarm: ResourceAlarm, raised: bool) {
        let connections = self.connections_lock();
        let mut alarms = self.alarms_lock();
        *alarms = alarms.with(alarm, raised);
        for entry in connections.values() {
            let _ = entry.mailbox.send(Outbound::Alarms(*alarms));
        }
    }

    pub(crate) fn unregister_connection(&self, id: ConnId) {
        self.connections_lock().remove(&id);
    }

    fn connections_lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, ConnectionEntry>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes every connection `which` picks with `error` (320 for an operator's deletion).
    fn close_connections(&self, error: AmqpError, which: impl Fn(&ConnectionEntry) -> bool) {
        for conn in self.connections_lock().values().filter(|c| which(c)) {
            let _ = conn.mailbox.send(Outbound::Close(error.clone()));
        }
    }
}

/// Counts a live connection task while it exists.
struct LiveGuard(Arc<BrokerShared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Entry point: [`Broker::start`] (on the caller's runtime) or [`Broker::start_on_thread`].
#[derive(Debug)]
pub struct Broker;

/// A running broker. Dropping it stops the broker (connections are closed with 320 in the
/// background); [`BrokerHandle::shutdown`] also waits for every task to end.
#[derive(Debug)]
pub struct BrokerHandle {
    local_addrs: Vec<SocketAddr>,
    shared: Arc<BrokerShared>,
    tracker: TaskTracker,
}

impl Broker {
    /// Binds the configured address and starts serving on the caller's tokio runtime: the
    /// broker has no threads of its own, so in a `current_thread` test a message between
    /// client and broker never crosses threads.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use warren_broker::{Broker, BrokerConfig};
    /// let broker = Broker::start(BrokerConfig::default()).await.unwrap();
    /// assert!(broker.url().starts_with("amqp://guest:guest@127.0.0.1:"));
    /// broker.shutdown().await;
    /// # }
    /// ```
    pub async fn start(config: BrokerConfig) -> Result<BrokerHandle, StartError> {
        if config.users.is_empty() {
            return Err(StartError::NoUsers);
        }
        let listeners = bind(&config.listen).await?;
        let local_addrs: Vec<SocketAddr> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let vhosts: Vec<String> = std::iter::once("/".to_owned())
            .chain(config.vhosts.iter().cloned())
            .collect();
        let users = Users::new(&config.users);
        let shared = Arc::new(BrokerShared {
            trace: config.trace.then(Trace::default),
            config,
            vhosts: Mutex::default(),
            runtime: tokio::runtime::Handle::current(),
            shutdown: CancellationToken::new(),
            next_conn_id: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            connections: Mutex::new(HashMap::new()),
            alarms: Mutex::default(),
            users: Mutex::new(users),
            permissions_version: AtomicU64::new(0),
        });
        let tracker = TaskTracker::new();
        for name in &vhosts {
            shared.add_vhost(name, &tracker);
        }
        for listener in listeners {
            tracker.spawn(accept_loop(listener, shared.clone(), tracker.clone()));
        }
        Ok(BrokerHandle {
            local_addrs,
            shared,
            tracker,
        })
    }

    /// Starts a broker on a thread of its own (with a `current_thread` runtime), for tests
    /// that block their own runtime or have none. Stop it with
    /// [`ThreadedBroker::shutdown`] or by dropping it.
    ///
    /// ```
    /// let broker = warren_broker::Broker::start_on_thread(Default::default()).unwrap();
    /// assert!(broker.url().starts_with("amqp://"));
    /// broker.shutdown();
    /// ```
    pub fn start_on_thread(config: BrokerConfig) -> Result<ThreadedBroker, StartError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("warren-broker".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(source) => {
                        let _ = ready_tx.send(Err(StartError::Bind {
                            addr: config.listen.clone(),
                            source,
                        }));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match Broker::start(config).await {
                        Ok(handle) => {
                            let _ = ready_tx.send(Ok((handle.local_addrs.clone(), handle.url())));
                            let _ = stop_rx.await;
                            handle.shutdown().await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|source| StartError::Bind {
                addr: "thread".into(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok((local_addrs, url))) => Ok(ThreadedBroker {
                local_addrs,
                url,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StartError::Bind {
                addr: "thread".into(),
                source: std::io::Error::other("broker thread ended before starting"),
            }),
        }
    }
}

/// Binds every address `listen` resolves to (`localhost` gives IPv4 and IPv6). With port 0,
/// all listeners share the port the first one got.
async fn bind(listen: &str) -> Result<Vec<TcpListener>, StartError> {
    let err = |source| StartError::Bind {
        addr: listen.to_owned(),
        source,
    };
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(listen)
        .await
        .map_err(err)?
        .collect();
    addrs.dedup();
    let mut listeners: Vec<TcpListener> = Vec::new();
    for mut addr in addrs {
        if let Some(first) = listeners.first() {
            addr.set_port(first.local_addr().map_err(err)?.port());
        }
        match TcpListener::bind(addr).await {
            Ok(l) => listeners.push(l),
            // An address family the machine lacks (no IPv6) is skipped if another bound.
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => continue,
            Err(e) => return Err(err(e)),
        }
    }
    if listeners.is_empty() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "the address resolves to nothing that can be bound",
        )));
    }
    Ok(listeners)
}

async fn accept_loop(listener: TcpListener, shared: Arc<BrokerShared>, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shared.shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: wait a moment rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        crate::tcp::tune(&stream);
        spawn_connection(&shared, &tracker, stream, peer.to_string());
    }
}

/// Serves one client connection in a task of the broker, unless the connection limit is
/// reached (then the stream is closed at once, with a log line).
fn spawn_connection<S>(shared: &Arc<BrokerShared>, tracker: &TaskTracker, stream: S, peer: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let live = shared.live.fetch_add(1, Ordering::Relaxed) + 1;
    let guard = LiveGuard(shared.clone());
    if let Some(max) = shared.config.max_connections
        && live > max
    {
        tracing::warn!(%peer, "refusing connection: connection limit of {max} reached");
        return;
    }
    let shared = shared.clone();
    tracker.spawn(async move {
        let _guard = guard;
        connection::serve(stream, shared, peer).await;
    });
}

/// The address a local client can reach for a listening address (unspecified addresses
/// become loopback).
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

impl BrokerHandle {
    /// The (first) address the broker listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs[0]
    }

    /// Every address the broker listens on.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// A URL a local client can connect with: `amqp://guest:guest@127.0.0.1:PORT/%2F`. When
    /// guest is not a configured user, the first user appears without a password.
    pub fn url(&self) -> String {
        self.url_for("/")
    }

    /// The URL of vhost `vhost` ([`BrokerHandle::url`] names `/`), percent-encoded.
    pub fn url_for(&self, vhost: &str) -> String {
        let addr = reachable(self.local_addr());
        let users = &self.shared.config.users;
        let credentials = match users
            .iter()
            .find(|u| u.name == "guest" && u.password == "guest")
        {
            Some(_) => "guest:guest".to_owned(),
            None => users.first().map(|u| u.name.clone()).unwrap_or_default(),
        };
        let vhost =
            percent_encoding::utf8_percent_encode(vhost, percent_encoding::NON_ALPHANUMERIC);
        format!("amqp://{credentials}@{addr}/{vhost}")
    }

    /// Snapshots of every queue, of every vhost (by vhost, then name).
    pub fn queues(&self) -> Vec<QueueInfo> {
        self.shared
            .all_vhosts()
            .iter()
            .flat_map(|vhost| crate::inspect::queues(vhost))
            .collect()
    }

    /// A snapshot of one queue of vhost `/`, if it exists.
    pub fn queue(&self, name: &str) -> Option<QueueInfo> {
        self.queue_in("/", name)
    }

    /// A snapshot of one queue of a vhost, if both exist.
    pub fn queue_in(&self, vhost: &str, name: &str) -> Option<QueueInfo> {
        crate::inspect::queues(&*self.shared.vhost(vhost)?)
            .into_iter()
            .find(|q| q.name == name)
    }

    /// The ready messages of queue `name` of vhost `/`, in the order they would be delivered,
    /// read without taking them (nothing changes: no redelivered flag, no delivery count);
    /// `None` if there is no such queue. What a dead-letter queue holds, say.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let broker = warren_broker::Broker::start(Default::default()).await.unwrap();
    /// assert_eq!(broker.messages("jobs"), None);
    /// // ... a client declares `jobs` and publishes "a", then "b" ...
    /// # }
    /// ```
    pub fn messages(&self, name: &str) -> Option<Vec<MessageInfo>> {
        self.messages_in("/", name)
    }

    /// [`BrokerHandle::messages`] of a queue of `vhost`.
    pub fn messages_in(&self, vhost: &str, name: &str) -> Option<Vec<MessageInfo>> {
        crate::inspect::messages(&*self.shared.vhost(vhost)?, name)
    }

    /// Adds a vhost, as `rabbitmqctl add_vhost` does; false if it exists. The configured
    /// users get full permissions on it (as the harness grants its user on RabbitMQ), other
    /// users none. May be called from any thread.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let broker = warren_broker::Broker::start(Default::default()).await.unwrap();
    /// assert!(broker.add_vhost("orders"));
    /// let url = broker.url_for("orders"); // amqp://guest:guest@127.0.0.1:PORT/orders
    /// assert!(url.ends_with("/orders"));
    /// # }
    /// ```
    pub fn add_vhost(&self, name: &str) -> bool {
        self.shared.add_vhost(name, &self.tracker)
    }

    /// Deletes a vhost with its queues and exchanges, as `rabbitmqctl delete_vhost` does: its
    /// connections are closed with 320 CONNECTION_FORCED ("vhost '...' is deleted"). False if
    /// there is no such vhost.
    pub fn delete_vhost(&self, name: &str) -> bool {
        let mut vhosts = self.shared.vhosts_lock();
        let Some(entry) = vhosts.remove(name) else {
            return false;
        };
        self.shared.change_users(|users| users.vhost_deleted(name));
        drop(vhosts);
        entry.stop.cancel();
        let error = AmqpError::connection_forced(format!("vhost '{name}' is deleted"));
        self.shared
            .close_connections(error, |c| Arc::ptr_eq(&c.vhost, &entry.vhost));
        true
    }

    /// Adds a user without permissions, as `rabbitmqctl add_user` does: it may log in, but
    /// open no vhost until [`BrokerHandle::set_permissions`]. False if the name is taken.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let broker = warren_broker::Broker::start(Default::default()).await.unwrap();
    /// assert!(broker.add_user("reporter", "secret"));
    /// // Reads `reports`, publishes nowhere, declares nothing.
    /// broker.set_permissions("/", "reporter", "", "", "^reports$").unwrap();
    /// # }
    /// ```
    pub fn add_user(&self, name: &str, password: &str) -> bool {
        self.shared.change_users(|users| users.add(name, password))
    }

    /// The users' names, sorted: the configured ones, those added, those of definitions.
    pub fn users(&self) -> Vec<String> {
        self.shared.users_lock().names()
    }

    /// Adds a user, or gives an existing one a new credential and tags (a definitions
    /// import).
    pub(crate) fn put_user(&self, name: &str, credential: Credential, tags: Vec<String>) {
        self.shared
            .change_users(|users| users.put(name, credential, tags));
    }

    /// Replaces a user's tags, as `rabbitmqctl set_user_tags USER TAG...` does (an empty
    /// list clears them). False if there is no such user.
    ///
    /// Of RabbitMQ's tags only `impersonator` changes what a client may do: its connections
    /// may publish with a `user_id` property other than their own user's name (any other
    /// user gets 406 PRECONDITION_FAILED). Tags are compared exactly (`Impersonator` is
    /// another tag), and, as in RabbitMQ, they are read at login: a connection keeps the
    /// tags its user had when it opened.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let broker = warren_broker::Broker::start(Default::default()).await.unwrap();
    /// assert!(broker.add_user("relay", "secret"));
    /// assert!(broker.set_user_tags("relay", &["impersonator", "monitoring"]));
    /// assert_eq!(broker.user_tags("relay").unwrap(), ["impersonator", "monitoring"]);
    /// assert!(!broker.set_user_tags("nobody", &[]));
    /// # }
    /// ```
    pub fn set_user_tags(&self, user: &str, tags: &[&str]) -> bool {
        let tags = tags.iter().map(|t| (*t).to_owned()).collect();
        self.shared.users_lock().set_tags(user, tags)
    }

    /// A user's tags, as given (`None` if there is no such user).
    pub fn user_tags(&self, user: &str) -> Option<Vec<String>> {
        self.shared.users_lock().tags(user).map(<[String]>::to_vec)
    }

    /// Deletes a user, as `rabbitmqctl delete_user` does: its connections are closed with
    /// 320 CONNECTION_FORCED ("user '...' is deleted"). False if there is no such user.
    pub fn delete_user(&self, name: &str) -> bool {
        if !self.shared.change_users(|users| users.delete(name)) {
            return false;
        }
        let error = AmqpError::connection_forced(format!("user '{name}' is deleted"));
        self.shared.close_connections(error, |c| c.user == name);
        true
    }

    /// Sets a user's permissions in a vhost, as `rabbitmqctl set_permissions -p VHOST USER
    /// CONFIGURE WRITE READ` does: each a regular expression that the names of the queues and
    /// exchanges it may configure (declare, delete), write (publish to, bind to) and read
    /// (consume, get, purge, bind from) must match; `""` matches none, and the default
    /// exchange is `amq.default`. A refused operation closes its channel with 403
    /// ACCESS_REFUSED. They apply at once, to its open connections too.
    pub fn set_permissions(
        &self,
        vhost: &str,
        user: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<(), PermissionError> {
        let permissions = Permissions::new(configure, write, read)?;
        self.change_permissions(vhost, user, Some(permissions))
    }

    /// Clears a user's permissions in a vhost, as `rabbitmqctl clear_permissions` does: it
    /// may no longer open the vhost, and its open connections there may do nothing more.
    pub fn clear_permissions(&self, vhost: &str, user: &str) -> Result<(), PermissionError> {
        self.change_permissions(vhost, user, None)
    }

    /// Sets a vhost's limits, as `rabbitmqctl set_vhost_limits` does (`VhostLimits::default()`
    /// clears them, as `clear_vhost_limits`): connections beyond `max_connections` are
    /// refused at connection.open (530 `access to vhost 'v' refused for user 'u': connection
    /// limit (N) is reached`), a queue beyond `max_queues` at its declare (406 `cannot
    /// declare queue 'q': queue limit in vhost 'v' (N) is reached`). What is open already
    /// stays. False if there is no such vhost.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use warren_broker::VhostLimits;
    /// let broker = warren_broker::Broker::start(Default::default()).await.unwrap();
    /// let limits = VhostLimits { max_queues: Some(0), ..Default::default() };
    /// assert!(broker.set_vhost_limits("/", limits));
    /// # }
    /// ```
    pub fn set_vhost_limits(&self, vhost: &str, limits: VhostLimits) -> bool {
        // Under the vhosts lock, so that a vhost deleted meanwhile is not reported set.
        let vhosts = self.shared.vhosts_lock();
        let Some(entry) = vhosts.get(vhost) else {
            return false;
        };
        entry.vhost.lock().limits = limits;
        true
    }

    /// Sets a user's limits, as `rabbitmqctl set_user_limits` does (`UserLimits::default()`
    /// clears them): connections beyond `max_connections` are refused at connection.open
    /// (530 `connection refused for user 'u': user connection limit (N) is reached`), and a
    /// channel.open beyond `max_channels` over all its connections closes that connection
    /// (530 `number of channels opened for user 'u' has reached the maximum allowed user
    /// limit of (N)`). False if there is no such user.
    pub fn set_user_limits(&self, user: &str, limits: UserLimits) -> bool {
        // Read at each connection.open and channel.open: no permissions to reread.
        self.shared.users_lock().set_limits(user, limits)
    }

    /// Sets a user's topic permissions on an exchange in a vhost, as `rabbitmqctl
    /// set_topic_permissions -p VHOST USER EXCHANGE WRITE READ` does: when that exchange is a
    /// topic exchange, the user may publish to it only with routing keys that `write`
    /// matches, and bind from it (queue.bind, queue.unbind, exchange.bind, exchange.unbind)
    /// only with keys that `read` matches (403 ACCESS_REFUSED `access to topic 'key' in
    /// exchange 'x' in vhost '/' refused for user 'u'`). `{username}` and `{vhost}` in the
    /// patterns stand for the user's and the vhost's names; `""` matches only the empty key.
    /// Without topic permissions on an exchange, every key is allowed.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let broker = warren_broker::Broker::start(Default::default()).await.unwrap();
    /// assert!(broker.add_user("sensor", "secret"));
    /// broker.set_permissions("/", "sensor", "", ".*", "").unwrap();
    /// // Publishes to amq.topic only under its own name.
    /// broker
    ///     .set_topic_permissions("/", "sensor", "amq.topic", "^{username}\\.", "")
    ///     .unwrap();
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`PermissionError`] for a missing user or vhost, or a pattern that is not a regular
    /// expression once expanded.
    pub fn set_topic_permissions(
        &self,
        vhost: &str,
        user: &str,
        exchange: &str,
        write: &str,
        read: &str,
    ) -> Result<(), PermissionError> {
        let permission = TopicPermission::new(user, vhost, write, read)?;
        self.change_topic_permissions(vhost, user, Some(exchange), Some(permission))
    }

    /// Clears a user's topic permissions in a vhost, on one exchange or (`None`) on all, as
    /// `rabbitmqctl clear_topic_permissions` does.
    ///
    /// # Errors
    /// [`PermissionError`] for a missing user or vhost.
    pub fn clear_topic_permissions(
        &self,
        vhost: &str,
        user: &str,
        exchange: Option<&str>,
    ) -> Result<(), PermissionError> {
        self.change_topic_permissions(vhost, user, exchange, None)
    }

    /// Sets or clears topic permissions (see [`BrokerHandle::change_permissions`]).
    pub(crate) fn change_topic_permissions(
        &self,
        vhost: &str,
        user: &str,
        exchange: Option<&str>,
        permission: Option<TopicPermission>,
    ) -> Result<(), PermissionError> {
        self.change_in_vhost(vhost, |users| {
            users.set_topic(user, vhost, exchange, permission)
        })
    }

    /// Sets (`Some`) or clears (`None`) a user's permissions in a vhost.
    pub(crate) fn change_permissions(
        &self,
        vhost: &str,
        user: &str,
        permissions: Option<Permissions>,
    ) -> Result<(), PermissionError> {
        self.change_in_vhost(vhost, |users| users.set(user, vhost, permissions))
    }

    /// Changes the users' entries for `vhost` under the vhosts lock, so that a vhost deleted
    /// meanwhile leaves none behind; `NoVhost` if there is no such vhost.
    fn change_in_vhost(
        &self,
        vhost: &str,
        change: impl FnOnce(&mut Users) -> Result<(), PermissionError>,
    ) -> Result<(), PermissionError> {
        let vhosts = self.shared.vhosts_lock();
        if !vhosts.contains_key(vhost) {
            return Err(PermissionError::NoVhost(vhost.to_owned()));
        }
        self.shared.change_users(change)
    }

    /// Loads RabbitMQ definitions (the JSON of `rabbitmqctl export_definitions`): users (who
    /// log in with their exported password hashes) with their tags and limits, vhosts,
    /// permissions, topic permissions, vhost limits, policies, queues, exchanges and bindings
    /// (see [`crate::definitions`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let broker = warren_broker::Broker::start(Default::default()).await.unwrap();
    /// let loaded = broker
    ///     .load_definitions(
    ///         r#"{"queues": [{"name": "jobs", "vhost": "/", "durable": true, "auto_delete": false,
    ///                          "arguments": {"x-max-length": 1000}}],
    ///             "exchanges": [{"name": "work", "vhost": "/", "type": "direct", "durable": true,
    ///                            "auto_delete": false, "internal": false, "arguments": {}}],
    ///             "bindings": [{"source": "work", "vhost": "/", "destination": "jobs",
    ///                           "destination_type": "queue", "routing_key": "job", "arguments": {}}]}"#,
    ///     )
    ///     .unwrap();
    /// assert_eq!((loaded.queues, loaded.exchanges, loaded.bindings), (1, 1, 1));
    /// assert!(broker.queue("jobs").is_some());
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`DefinitionsError`] for JSON that is not definitions, or the first object refused
    /// (what came before it stays loaded).
    pub fn load_definitions(&self, json: &str) -> Result<LoadedDefinitions, DefinitionsError> {
        crate::definitions::load(self, json)
    }

    /// The vhost `name`, if it exists.
    pub(crate) fn vhost_of(&self, name: &str) -> Option<Arc<Vhost>> {
        self.shared.vhost(name)
    }

    /// The vhosts, by name.
    pub fn vhosts(&self) -> Vec<String> {
        self.shared
            .all_vhosts()
            .iter()
            .map(|v| v.name.clone())
            .collect()
    }

    /// The open connections.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let map = self.shared.connections_lock();
        let mut list: Vec<ConnectionInfo> = map
            .iter()
            .map(|(id, e)| ConnectionInfo {
                id: *id,
                peer: e.peer.clone(),
                user: e.user.clone(),
                client: e.client.clone(),
                name: e.name.clone(),
                vhost: e.vhost.name.clone(),
                channels: e.channels.load(Ordering::Relaxed),
                blocked: e.blocked.load(Ordering::Relaxed),
            })
            .collect();
        list.sort_by_key(|c| c.id);
        list
    }

    /// Serves one client connection over any byte stream (a `tokio::io::duplex` pipe, a Unix
    /// socket, a test double), exactly as if it had arrived over TCP: the same handshake,
    /// limits and shutdown. `peer` names it in logs and [`BrokerHandle::connections`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// let broker = warren_broker::Broker::start(Default::default()).await.unwrap();
    /// let (mut client, server) = tokio::io::duplex(64 * 1024);
    /// broker.serve_stream(server, "in-memory");
    /// client.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    /// let mut frame_type = [0u8; 1];
    /// client.read_exact(&mut frame_type).await.unwrap();
    /// assert_eq!(frame_type[0], 1); // a method frame: connection.start
    /// # }
    /// ```
    pub fn serve_stream<S>(&self, stream: S, peer: &str)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        spawn_connection(&self.shared, &self.tracker, stream, peer.to_owned());
    }

    /// Every method each connection sent and received so far, in order, when the broker was
    /// started with [`BrokerConfig::trace`]; empty otherwise.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use warren_broker::{Broker, BrokerConfig};
    /// let broker = Broker::start(BrokerConfig { trace: true, ..Default::default() }).await.unwrap();
    /// // ... a failing test prints it:
    /// for entry in broker.trace() {
    ///     eprintln!("{entry}");
    /// }
    /// # }
    /// ```
    pub fn trace(&self) -> Vec<TraceEntry> {
        self.shared
            .trace
            .as_ref()
            .map(Trace::entries)
            .unwrap_or_default()
    }

    /// Closes a connection with connection.close, as an operator would with `rabbitmqctl
    /// close_connection`: `code` and its name go before `reason`, as in every reply text
    /// (320 and "maintenance" send `CONNECTION_FORCED - maintenance`, what RabbitMQ sends for
    /// `rabbitmqctl close_connection PID maintenance`). Returns false if there is no such
    /// connection. [`BrokerHandle::connections`] lists their ids.
    pub fn close_connection(&self, id: u64, code: u16, reason: &str) -> bool {
        let map = self.shared.connections_lock();
        let Some(entry) = map.get(&id) else {
            return false;
        };
        let error = AmqpError::new(crate::error::Scope::Connection, code, reason);
        entry.mailbox.send(Outbound::Close(error)).is_ok()
    }

    /// Raises a resource alarm, as RabbitMQ does when it runs low on memory or disk: each
    /// connection that publishes from now on is blocked (its input unread, nothing lost) and,
    /// if its client takes it, sent `connection.blocked` ("low on memory"), until every alarm
    /// is cleared ([`BrokerHandle::clear_alarm`]). [`ConnectionInfo::blocked`] shows which.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use warren_broker::{Broker, BrokerConfig, ResourceAlarm};
    /// let broker = Broker::start(BrokerConfig::default()).await?;
    /// broker.raise_alarm(ResourceAlarm::Memory);
    /// // ... a publisher's next publish blocks its connection ...
    /// broker.clear_alarm(ResourceAlarm::Memory);
    /// broker.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn raise_alarm(&self, alarm: ResourceAlarm) {
        self.shared.set_alarm(alarm, true);
    }

    /// Clears a resource alarm; with none left, blocked connections are read again (and sent
    /// `connection.unblocked` if they were sent `connection.blocked`).
    pub fn clear_alarm(&self, alarm: ResourceAlarm) {
        self.shared.set_alarm(alarm, false);
    }

    /// Sets a policy on the vhost `/`, as `rabbitmqctl set_policy` does: it applies at once to
    /// the queues and exchanges it matches, existing and future (see [`crate::policy`]). A
    /// policy of the same name is replaced.
    ///
    /// ```
    /// use warren_broker::{ApplyTo, Broker, BrokerConfig, Policy};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let broker = Broker::start(BrokerConfig::default()).await.unwrap();
    /// // As an operator's `rabbitmqctl set_policy DLX "^jobs$" '{"dead-letter-exchange":"dlx"}'`.
    /// broker
    ///     .set_policy(Policy::new("DLX", "^jobs$").apply_to(ApplyTo::Queues).dead_letter_exchange("dlx"))
    ///     .unwrap();
    /// // ... the service declares `jobs` without arguments; what it rejects goes to `dlx` ...
    /// assert!(broker.set_policy(Policy::new("empty", "^jobs$")).is_err()); // sets nothing
    /// broker.clear_policy("/", "DLX").unwrap();
    /// broker.shutdown().await;
    /// # }
    /// ```
    pub fn set_policy(&self, policy: Policy) -> Result<(), PolicyError> {
        self.policy_vhost(&policy.vhost)?.lock().set_policy(policy)
    }

    /// Clears the policy `name` of `vhost` ([`PolicyError::NotFound`] if it has none of that
    /// name).
    pub fn clear_policy(&self, vhost: &str, name: &str) -> Result<(), PolicyError> {
        self.policy_vhost(vhost)?.lock().clear_policy(name)
    }

    /// The policies of every vhost, by vhost, then descending priority.
    pub fn policies(&self) -> Vec<Policy> {
        self.shared
            .all_vhosts()
            .iter()
            .flat_map(|v| v.lock().policies.all())
            .collect()
    }

    fn policy_vhost(&self, name: &str) -> Result<Arc<Vhost>, PolicyError> {
        self.shared
            .vhost(name)
            .ok_or_else(|| PolicyError::NoVhost(name.to_owned()))
    }

    /// Closes every connection with 320 CONNECTION_FORCED, stops listening, and returns when
    /// every task of the broker has ended.
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.tracker.close();
    }
}

/// A broker running on a thread of its own; see [`Broker::start_on_thread`].
#[derive(Debug)]
pub struct ThreadedBroker {
    local_addrs: Vec<SocketAddr>,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ThreadedBroker {
    /// The (first) address the broker listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs[0]
    }

    /// A URL a local client can connect with.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Stops the broker and waits for its thread (blocking: call it outside async code).
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ThreadedBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
