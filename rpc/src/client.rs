//! [`RpcClient`]: publishes requests and matches replies to callers by `correlation_id`.
//!
//! One channel in confirm mode on one connection; one exclusive, server-named reply queue
//! consumed with `no_ack`; one router task that hands each reply to the caller waiting for its
//! correlation id. Each call registers a pending entry (removed again by a guard if the call
//! times out or is dropped), publishes its request `mandatory` with `expiration` = its timeout,
//! and waits for its entry to be completed: by the reply, by a `basic.return` (no route), by a
//! failed publish, or by the loss of the connection.
//!
//! Publishing and awaiting the publisher confirm run in the client's publisher task, not in
//! the call, so that a call dropped mid-publish never leaves a half-sent request or an
//! unawaited confirm behind. One task drives every publish in flight: lapin resolves the
//! publishes and confirms of a batch from its I/O thread, and waking one task for all of them
//! is much cheaper than waking a task per call.
//! Returned requests are matched by the correlation id they carry, not by which confirm they
//! arrive with: lapin attaches a `basic.return` to the next confirm it resolves, which with many
//! publishes in flight need not be the returned request's own.

use crate::error::{ERROR_HEADER, RpcError};
use futures_util::{StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, Consumer,
    message::{BasicReturnMessage, Delivery},
    options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::{
    sync::{mpsc, oneshot},
    task::AbortHandle,
};
use tracing::{debug, warn};

/// The `basic.return` reply code for an unroutable mandatory message.
const NO_ROUTE: u16 = 312;

/// How a client calls.
///
/// ```
/// use std::time::Duration;
/// use warren_rpc::ClientConfig;
/// let config = ClientConfig { timeout: Duration::from_secs(2), ..ClientConfig::default() };
/// assert_eq!(config.queue, "rpc_queue");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The request queue (the routing key on the default exchange). Default
    /// [`DEFAULT_QUEUE`](crate::DEFAULT_QUEUE).
    pub queue: String,
    /// The timeout of [`RpcClient::call`], also sent as each request's `expiration`. Default
    /// [`DEFAULT_TIMEOUT`].
    pub timeout: Duration,
}

/// The default call timeout: 10 seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            queue: crate::DEFAULT_QUEUE.to_owned(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Counters of a client, from [`RpcClient::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Calls waiting for their reply right now.
    pub pending: usize,
    /// Replies for calls of this client that had already ended (timed out, dropped, or answered
    /// before, e.g. a request served twice after a redelivery): dropped.
    pub late_replies: u64,
    /// Replies with a correlation id this client never issued, or none: dropped.
    pub unknown_replies: u64,
}

/// A reply body, or why the call failed.
type Outcome = Result<Vec<u8>, RpcError>;

/// A cheap, shareable handle (`Clone + Send + Sync`) on one RPC client. All clones share the
/// channel, the reply queue and the pending calls; the client stops when the last clone is
/// dropped or on [`close`](Self::close).
///
/// ```no_run
/// # async fn demo() -> Result<(), warren_rpc::RpcError> {
/// use warren_rpc::{ClientConfig, RpcClient, RpcError};
/// let client = RpcClient::connect("amqp://127.0.0.1:5672/%2F", ClientConfig::default()).await?;
/// assert_eq!(client.fib(30).await?, 832_040);
/// match client.call("-1").await {
///     Err(RpcError::Remote(message)) => eprintln!("refused: {message}"),
///     other => println!("{other:?}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RpcClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    channel: Channel,
    queue: ShortString,
    reply_queue: ShortString,
    timeout: Duration,
    shared: Arc<Shared>,
    router: AbortHandle,
    /// To the publisher task, which ends once this is dropped and its publishes are done.
    requests: mpsc::UnboundedSender<Request>,
    /// The connection, when the client opened it itself.
    owned: Option<Connection>,
}

/// A request for the publisher task.
struct Request {
    correlation_id: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

/// What the publisher task publishes with.
struct Publisher {
    channel: Channel,
    queue: ShortString,
    shared: Arc<Shared>,
}

impl Inner {
    /// Opens the client's channel: confirm mode, reply queue, reply consumer, router task,
    /// publisher task.
    async fn open(conn: &Connection, config: ClientConfig) -> Result<Self, RpcError> {
        let queue = crate::short_string("queue name", &config.queue)?;
        let lapin_err = |context: &'static str| move |e| RpcError::from_lapin(context, &e);
        let channel = conn
            .create_channel()
            .await
            .map_err(lapin_err("opening a channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(lapin_err("enabling publisher confirms"))?;
        let reply_queue = channel
            .queue_declare(
                ShortString::from(""),
                QueueDeclareOptions {
                    exclusive: true,
                    // Gone with the client even when the connection is shared and lives on.
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(lapin_err("declaring the reply queue"))?
            .name()
            .clone();
        let consumer = channel
            .basic_consume(
                reply_queue.clone(),
                ShortString::from(""),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(lapin_err("consuming the reply queue"))?;
        debug!(reply_queue = %reply_queue, queue = %queue, "client ready");

        let shared = Arc::new(Shared::new());
        let router = tokio::spawn(route_replies(consumer, shared.clone())).abort_handle();
        let (requests, incoming) = mpsc::unbounded_channel();
        let publisher = Publisher {
            channel: channel.clone(),
            queue: queue.clone(),
            shared: shared.clone(),
        };
        tokio::spawn(publish_requests(publisher, incoming));
        Ok(Self {
            channel,
            queue,
            reply_queue,
            timeout: config.timeout,
            shared,
            router,
            requests,
            owned: None,
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.router.abort();
    }
}

/// State shared by the callers, the publisher task and the router.
#[derive(Debug)]
struct Shared {
    /// Pending calls by correlation id, and why the client is closed (if it is). A std mutex:
    /// it is held only for a map operation, never across an `.await`.
    state: Mutex<State>,
    /// Every correlation id of this client is `{id_prefix}{sequence number}`.
    id_prefix: String,
    next_seq: AtomicU64,
    late_replies: AtomicU64,
    unknown_replies: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    pending: HashMap<String, oneshot::Sender<Outcome>>,
    closed: Option<RpcError>,
}

impl Shared {
    fn new() -> Self {
        Self {
            state: Mutex::default(),
            id_prefix: format!("{}.", uuid::Uuid::new_v4().simple()),
            next_seq: AtomicU64::new(0),
            late_replies: AtomicU64::new(0),
            unknown_replies: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; recover the state if one ever did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a call; fails at once if the client is closed.
    fn register(self: &Arc<Self>) -> Result<(PendingGuard, oneshot::Receiver<Outcome>), RpcError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let correlation_id = format!("{}{seq}", self.id_prefix);
        let (tx, rx) = oneshot::channel();
        let mut state = self.lock();
        if let Some(reason) = &state.closed {
            return Err(reason.clone());
        }
        state.pending.insert(correlation_id.clone(), tx);
        drop(state);
        let guard = PendingGuard {
            shared: self.clone(),
            correlation_id,
        };
        Ok((guard, rx))
    }

    /// Completes a pending call; `false` if it is no longer pending.
    fn complete(&self, correlation_id: &str, outcome: Outcome) -> bool {
        let sender = self.lock().pending.remove(correlation_id);
        // The receiver may have been dropped since: the call ended, so this is late too.
        sender.is_some_and(|tx| tx.send(outcome).is_ok())
    }

    /// Routes a reply to its caller, or counts it.
    fn deliver(&self, delivery: Delivery) {
        let Some(correlation_id) = delivery.properties.correlation_id().clone() else {
            self.unknown_replies.fetch_add(1, Ordering::Relaxed);
            debug!("reply without correlation_id dropped");
            return;
        };
        if self.complete(correlation_id.as_str(), decode_reply(delivery)) {
            return;
        }
        if self.is_ours(correlation_id.as_str()) {
            self.late_replies.fetch_add(1, Ordering::Relaxed);
            debug!(correlation_id = %correlation_id, "late reply dropped");
        } else {
            self.unknown_replies.fetch_add(1, Ordering::Relaxed);
            debug!(correlation_id = %correlation_id, "reply with unknown correlation_id dropped");
        }
    }

    /// Whether this client issued the correlation id (pending or not).
    fn is_ours(&self, correlation_id: &str) -> bool {
        correlation_id
            .strip_prefix(&self.id_prefix)
            .and_then(|seq| seq.parse::<u64>().ok())
            .is_some_and(|seq| seq < self.next_seq.load(Ordering::Relaxed))
    }

    /// Fails the call whose request the broker returned.
    fn returned(&self, message: &BasicReturnMessage) {
        let error = if message.reply_code == NO_ROUTE {
            RpcError::NoRoute {
                queue: message.delivery.routing_key.to_string(),
            }
        } else {
            RpcError::Protocol(format!(
                "request returned by the broker: {} {}",
                message.reply_code, message.reply_text
            ))
        };
        match message.delivery.properties.correlation_id() {
            Some(correlation_id) => {
                self.complete(correlation_id.as_str(), Err(error));
            }
            None => warn!(%error, "returned message without correlation_id"),
        }
    }

    /// Closes the client: fails every pending call with `reason`, and every later call.
    fn close(&self, reason: RpcError) {
        let pending = {
            let mut state = self.lock();
            if state.closed.is_none() {
                state.closed = Some(reason.clone());
            }
            std::mem::take(&mut state.pending)
        };
        if !pending.is_empty() {
            warn!(pending = pending.len(), %reason, "failing pending calls");
        }
        for tx in pending.into_values() {
            let _ = tx.send(Err(reason.clone()));
        }
    }
}

/// Removes a call's pending entry when the call ends, however it ends (reply, error, timeout,
/// or the caller dropping the call's future).
struct PendingGuard {
    shared: Arc<Shared>,
    correlation_id: String,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.correlation_id);
    }
}

/// A reply's outcome: an error if it carries [`ERROR_HEADER`], else its body.
fn decode_reply(delivery: Delivery) -> Outcome {
    let error = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(ERROR_HEADER));
    match error {
        None => Ok(delivery.data),
        Some(AMQPValue::LongString(message)) => Err(RpcError::Remote(
            String::from_utf8_lossy(message.as_bytes()).into_owned(),
        )),
        Some(AMQPValue::ShortString(message)) => Err(RpcError::Remote(message.to_string())),
        // Some other type: the body carries the message too.
        Some(_) => Err(RpcError::Remote(
            String::from_utf8_lossy(&delivery.data).into_owned(),
        )),
    }
}

impl RpcClient {
    /// Builds a client on an open connection: opens a channel in confirm mode, declares an
    /// exclusive server-named reply queue and consumes it. The channel keeps the connection
    /// open while the client lives.
    ///
    /// # Errors
    /// [`RpcError::ConnectionLost`] when the connection is gone, [`RpcError::Protocol`] when
    /// `config.queue` is not a valid queue name or the broker refuses a step.
    pub async fn new(conn: &Connection, config: ClientConfig) -> Result<Self, RpcError> {
        let inner = Inner::open(conn, config).await?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Like [`new`](Self::new), on a connection of its own to `url`, closed with the client.
    ///
    /// # Errors
    /// As [`crate::connect`] and [`new`](Self::new).
    pub async fn connect(url: &str, config: ClientConfig) -> Result<Self, RpcError> {
        let conn = crate::connect(url).await?;
        let mut inner = Inner::open(&conn, config).await?;
        inner.owned = Some(conn);
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Calls with the client's default timeout ([`ClientConfig::timeout`]); the reply body.
    ///
    /// # Errors
    /// See [`call_with_timeout`](Self::call_with_timeout).
    pub async fn call(&self, request: impl Into<Vec<u8>>) -> Result<Vec<u8>, RpcError> {
        self.call_with_timeout(request, self.inner.timeout).await
    }

    /// Calls: publishes `request` and waits at most `timeout` for its reply body.
    ///
    /// The request goes to the default exchange with routing key [`queue`](Self::queue),
    /// `reply_to` = [`reply_queue`](Self::reply_queue), a fresh `correlation_id`, `mandatory`,
    /// and `expiration` = `timeout` in milliseconds (at least 1, at most `u32::MAX`).
    ///
    /// Dropping the returned future cancels the call: its pending entry is removed and a reply
    /// arriving later is counted in [`ClientStats::late_replies`].
    ///
    /// # Errors
    /// - [`RpcError::Timeout`]: no reply within `timeout` (the queue exists but nobody
    ///   answered in time).
    /// - [`RpcError::NoRoute`]: no queue of that name; reported as soon as the broker returns
    ///   the request, without waiting for the timeout.
    /// - [`RpcError::Remote`]: the server replied with an error.
    /// - [`RpcError::ConnectionLost`]: the connection was lost (before or during the call) or
    ///   the client closed.
    /// - [`RpcError::Protocol`]: the broker nacked the request.
    pub async fn call_with_timeout(
        &self,
        request: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        let inner = &self.inner;
        let (guard, reply) = inner.shared.register()?;
        let expiration = timeout.as_millis().clamp(1, u128::from(u32::MAX));
        let properties = BasicProperties::default()
            .with_reply_to(inner.reply_queue.clone())
            .with_correlation_id(ShortString::from(guard.correlation_id.as_str()))
            .with_expiration(ShortString::from(expiration.to_string()));
        let request = Request {
            correlation_id: guard.correlation_id.clone(),
            body: request.into(),
            properties,
        };
        if inner.requests.send(request).is_err() {
            // The publisher task is gone only if the runtime is shutting down.
            return Err(RpcError::ConnectionLost(
                "the client's publisher task has stopped".into(),
            ));
        }
        let outcome = match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(outcome)) => outcome,
            // Every path that removes a pending entry sends on it first, and the map outlives
            // this call (the guard holds it): a defensive arm, not an expected outcome.
            Ok(Err(_)) => Err(RpcError::ConnectionLost(
                "the call was abandoned without an outcome".into(),
            )),
            Err(_) => Err(RpcError::Timeout(timeout)),
        };
        drop(guard);
        outcome
    }

    /// Calls the fib service: sends `n` in decimal and parses the decimal reply.
    ///
    /// # Errors
    /// As [`call`](Self::call); [`RpcError::Protocol`] when the reply is not a decimal `u128`.
    pub async fn fib(&self, n: u64) -> Result<u128, RpcError> {
        let reply = self.call(n.to_string()).await?;
        parse_u128_reply(&reply)
    }

    /// The request queue (routing key of every request).
    pub fn queue(&self) -> &str {
        self.inner.queue.as_str()
    }

    /// The client's exclusive, server-named reply queue (the `reply_to` of every request).
    pub fn reply_queue(&self) -> &str {
        self.inner.reply_queue.as_str()
    }

    /// The default call timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The counters so far.
    pub fn stats(&self) -> ClientStats {
        let shared = &self.inner.shared;
        ClientStats {
            pending: shared.lock().pending.len(),
            late_replies: shared.late_replies.load(Ordering::Relaxed),
            unknown_replies: shared.unknown_replies.load(Ordering::Relaxed),
        }
    }

    /// Why the client no longer calls ([`RpcError::ConnectionLost`]), or `None` while it is
    /// usable.
    pub fn closed(&self) -> Option<RpcError> {
        self.inner.shared.lock().closed.clone()
    }

    /// Closes the client (all clones): fails pending calls and later calls with
    /// [`RpcError::ConnectionLost`], closes the channel (the broker deletes the reply queue)
    /// and the connection if the client opened it.
    pub async fn close(&self) {
        let inner = &self.inner;
        inner
            .shared
            .close(RpcError::ConnectionLost("the client was closed".into()));
        let reply_text = ShortString::from("client closed");
        if let Err(e) = inner.channel.close(200, reply_text.clone()).await {
            debug!(error = %e, "closing the client channel");
        }
        if let Some(conn) = &inner.owned
            && let Err(e) = conn.close(200, reply_text).await
        {
            debug!(error = %e, "closing the client connection");
        }
    }
}

/// Parses a reply body as a decimal `u128` (the fib service's replies).
///
/// ```
/// assert_eq!(warren_rpc::client::parse_u128_reply(b"832040"), Ok(832_040));
/// assert!(warren_rpc::client::parse_u128_reply(b"oops").is_err());
/// ```
///
/// # Errors
/// [`RpcError::Protocol`] naming the body.
pub fn parse_u128_reply(reply: &[u8]) -> Result<u128, RpcError> {
    std::str::from_utf8(reply)
        .ok()
        .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            RpcError::Protocol(format!(
                "reply is not a decimal u128: {:?}",
                String::from_utf8_lossy(reply)
            ))
        })
}

/// The publisher task: publishes each request as it comes, with every publish in flight
/// driven by this one task, until the client is dropped and the last publish is done.
async fn publish_requests(publisher: Publisher, mut incoming: mpsc::UnboundedReceiver<Request>) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            request = incoming.recv() => match request {
                Some(request) => {
                    in_flight.push(publish_request(&publisher, request));
                    while let Ok(request) = incoming.try_recv() {
                        in_flight.push(publish_request(&publisher, request));
                    }
                }
                None => break,
            },
        }
    }
    while in_flight.next().await.is_some() {}
}

/// Publishes one request and awaits its confirm; reports failures through the pending map.
async fn publish_request(publisher: &Publisher, request: Request) {
    let Request {
        correlation_id,
        body,
        properties,
    } = request;
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let shared = &publisher.shared;
    let confirmation = match publisher
        .channel
        .basic_publish(
            ShortString::from(""),
            publisher.queue.clone(),
            options,
            &body,
            properties,
        )
        .await
    {
        Ok(confirm) => confirm.await,
        Err(e) => Err(e),
    };
    let error = match confirmation {
        Ok(Confirmation::Ack(returned)) => {
            // The returned message, if any, need not be this request's (see the module docs).
            if let Some(message) = returned {
                shared.returned(&message);
            }
            return;
        }
        Ok(Confirmation::Nack(returned)) => {
            if let Some(message) = returned {
                shared.returned(&message);
            }
            RpcError::Protocol("the broker refused the request (basic.nack)".into())
        }
        Ok(Confirmation::NotRequested) => {
            RpcError::Protocol("the channel is not in confirm mode".into())
        }
        Err(e) => RpcError::from_lapin("publishing the request", &e),
    };
    shared.complete(&correlation_id, Err(error));
}

/// The router: hands each reply to its caller until the consumer ends, then fails every
/// pending call and closes the client.
async fn route_replies(mut consumer: Consumer, shared: Arc<Shared>) {
    let reason = loop {
        match consumer.next().await {
            Some(Ok(delivery)) => shared.deliver(delivery),
            Some(Err(e)) => break RpcError::ConnectionLost(format!("reply consumer failed: {e}")),
            None => {
                break RpcError::ConnectionLost("the reply consumer was cancelled".into());
            }
        }
    };
    shared.close(reason);
}
