//! [`RpcServer`]: consumes a request queue and answers each request through a [`Handler`].
//!
//! Per request: run the handler, publish the reply (result, or error with
//! [`ERROR_HEADER`]) to the default exchange with routing key = the request's `reply_to` and the
//! request's `correlation_id`, and only then hand the request to the server's ack task
//! ([`crate::acks`]), which acks answered requests in order, a run of them in one `multiple`
//! ack. Reply and ack go out on the channel the request came in on, in that order, so the broker
//! never sees the ack of a request whose reply it has not received: if the connection dies in
//! between, the request is redelivered, never lost.

use crate::{
    acks::{AckReceiver, AckSender, ack_channel, send_acks},
    error::{ERROR_HEADER, RpcError},
};
use futures_util::{FutureExt, StreamExt};
use lapin::{
    BasicProperties, Channel, Connection, Consumer,
    message::Delivery,
    options::{
        BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use std::{
    fmt,
    future::Future,
    num::NonZeroU16,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};
use tokio::{
    sync::oneshot,
    task::{JoinHandle, JoinSet},
};
use tracing::{debug, error, info, warn};

/// The error a [`Handler`] returns; its message goes back to the client, which reports it as
/// [`RpcError::Remote`].
///
/// ```
/// use warren_rpc::HandlerError;
/// let err = HandlerError::from("no such account");
/// assert_eq!(err.message(), "no such account");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    message: String,
}

impl HandlerError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message sent back to the client.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

impl From<String> for HandlerError {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for HandlerError {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

/// What a server does with a request: bytes in, bytes (the reply body) or an error out.
///
/// Implemented by any `Fn(Vec<u8>) -> impl Future<Output = Result<Vec<u8>, HandlerError>>`
/// closure that is `Send + Sync + 'static` and returns a `Send` future, and by
/// [`FibHandler`](crate::fib::FibHandler).
///
/// A handler that panics does not take the server down: the client gets a remote error and
/// the request is acked.
///
/// ```
/// use warren_rpc::{Handler, HandlerError};
/// struct Upper;
/// impl Handler for Upper {
///     async fn handle(&self, request: Vec<u8>) -> Result<Vec<u8>, HandlerError> {
///         Ok(request.to_ascii_uppercase())
///     }
/// }
/// // Or a closure:
/// let echo = |request: Vec<u8>| async move { Ok::<_, HandlerError>(request) };
/// # fn is_handler(_: impl Handler) {}
/// # is_handler(Upper);
/// # is_handler(echo);
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Answers one request body.
    fn handle(
        &self,
        request: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, HandlerError>> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, HandlerError>> + Send,
{
    fn handle(
        &self,
        request: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, HandlerError>> + Send {
        self(request)
    }
}

/// How a server consumes.
///
/// ```
/// use std::num::NonZeroU16;
/// use warren_rpc::ServerConfig;
/// let config = ServerConfig { prefetch: NonZeroU16::new(8).unwrap(), ..ServerConfig::default() };
/// assert_eq!(config.queue, "rpc_queue");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The request queue, declared (non-durable, like the seed's `queue_declare('rpc_queue')`)
    /// when the server starts. Default [`DEFAULT_QUEUE`](crate::DEFAULT_QUEUE).
    pub queue: String,
    /// How many requests the broker may hand this server before it acks one (`basic.qos`),
    /// which is also how many it handles at once. Default 1, as in the seed.
    pub prefetch: NonZeroU16,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            queue: crate::DEFAULT_QUEUE.to_owned(),
            prefetch: NonZeroU16::MIN,
        }
    }
}

/// Counters of a server since it started, from [`RpcServer::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Requests answered with a result, then acked.
    pub replies: u64,
    /// Requests answered with an error reply (bad request, handler error or panic), then acked.
    pub error_replies: u64,
    /// Requests without `reply_to`: acked and dropped, with a log line.
    pub dropped: u64,
    /// Replies that could not be published (channel or connection gone); their requests were
    /// left unacked, so the broker redelivers them.
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    replies: AtomicU64,
    error_replies: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ServerStats {
        ServerStats {
            replies: self.replies.load(Ordering::Relaxed),
            error_replies: self.error_replies.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// What every request task needs.
struct Shared<H> {
    channel: Channel,
    handler: H,
    counters: Arc<Counters>,
    acks: AckSender,
}

/// A running server. [`shutdown`](Self::shutdown) stops it gracefully; dropping it instead
/// aborts it at once, like a killed process: requests in flight are left unacked and the
/// broker redelivers them once the channel closes.
///
/// ```no_run
/// # async fn demo() -> Result<(), warren_rpc::RpcError> {
/// use warren_rpc::{fib::FibHandler, RpcServer, ServerConfig};
/// let server = RpcServer::connect("amqp://127.0.0.1:5672/%2F", ServerConfig::default(), FibHandler)
///     .await?;
/// server.run_until(async { tokio::signal::ctrl_c().await.ok(); }).await
/// # }
/// ```
#[derive(Debug)]
pub struct RpcServer {
    queue: String,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RpcError>>>,
}

impl RpcServer {
    /// Opens a channel on `conn`, declares the request queue, sets the prefetch and starts
    /// consuming. Returns once the broker confirmed the consumer: requests published from then
    /// on are served. The server keeps the connection open while it runs.
    ///
    /// # Errors
    /// [`RpcError::ConnectionLost`] when the connection is gone, [`RpcError::Protocol`] when
    /// the broker refuses a step (e.g. the queue exists with other properties).
    pub async fn start<H: Handler>(
        conn: &Connection,
        config: ServerConfig,
        handler: H,
    ) -> Result<Self, RpcError> {
        let (channel, consumer) = open(conn, &config).await?;
        Ok(Self::spawn(channel, consumer, None, config, handler))
    }

    /// Like [`start`](Self::start), on a connection of its own to `url`, closed when the server
    /// stops.
    ///
    /// # Errors
    /// As [`crate::connect`] and [`start`](Self::start).
    pub async fn connect<H: Handler>(
        url: &str,
        config: ServerConfig,
        handler: H,
    ) -> Result<Self, RpcError> {
        let conn = crate::connect(url).await?;
        let (channel, consumer) = open(&conn, &config).await?;
        Ok(Self::spawn(channel, consumer, Some(conn), config, handler))
    }

    fn spawn<H: Handler>(
        channel: Channel,
        consumer: Consumer,
        owned: Option<Connection>,
        config: ServerConfig,
        handler: H,
    ) -> Self {
        let counters = Arc::new(Counters::default());
        let (acks, answered) = ack_channel();
        let shared = Arc::new(Shared {
            channel,
            handler,
            counters: counters.clone(),
            acks,
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(shared, consumer, answered, stopped, owned));
        Self {
            queue: config.queue,
            counters,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The request queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The counters so far.
    pub fn stats(&self) -> ServerStats {
        self.counters.snapshot()
    }

    /// Stops gracefully: cancels the consumer (the broker sends no more requests), finishes the
    /// requests already received (replying and acking each), then closes the channel, and the
    /// connection if the server opened it.
    ///
    /// # Errors
    /// Why the server had already stopped on its own (e.g. [`RpcError::ConnectionLost`]), or
    /// why cancelling failed.
    pub async fn shutdown(mut self) -> Result<(), RpcError> {
        if let Some(stop) = self.stop.take() {
            // The task may have ended already: its result says why.
            let _ = stop.send(());
        }
        self.join().await
    }

    /// Serves until `signal` completes, then shuts down gracefully; or returns early if the
    /// server stops on its own (connection lost, consumer cancelled by the broker).
    ///
    /// # Errors
    /// As [`shutdown`](Self::shutdown).
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<(), RpcError> {
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        tokio::select! {
            joined = task => {
                self.task = None;
                flatten(joined)
            }
            () = signal => self.shutdown().await,
        }
    }

    async fn join(&mut self) -> Result<(), RpcError> {
        match self.task.take() {
            Some(task) => flatten(task.await),
            None => Ok(()),
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn flatten(joined: Result<Result<(), RpcError>, tokio::task::JoinError>) -> Result<(), RpcError> {
    joined.unwrap_or_else(|e| Err(RpcError::Protocol(format!("server task failed: {e}"))))
}

/// Opens the server's channel: declares the request queue, sets the prefetch, consumes.
async fn open(conn: &Connection, config: &ServerConfig) -> Result<(Channel, Consumer), RpcError> {
    let queue = crate::short_string("queue name", &config.queue)?;
    let lapin_err = |context: &'static str| move |e| RpcError::from_lapin(context, &e);
    let channel = conn
        .create_channel()
        .await
        .map_err(lapin_err("opening a channel"))?;
    channel
        .queue_declare(
            queue.clone(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(lapin_err("declaring the request queue"))?;
    channel
        .basic_qos(config.prefetch.get(), BasicQosOptions::default())
        .await
        .map_err(lapin_err("setting the prefetch"))?;
    let consumer = channel
        .basic_consume(
            queue,
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(lapin_err("consuming the request queue"))?;
    info!(queue = %config.queue, prefetch = config.prefetch, "serving");
    Ok((channel, consumer))
}

/// The consume loop: one task per request (at most `prefetch` at once, the broker's credit),
/// and the ack task, until shutdown or until the consumer ends.
async fn serve<H: Handler>(
    shared: Arc<Shared<H>>,
    mut consumer: Consumer,
    answered: AckReceiver,
    mut stop: oneshot::Receiver<()>,
    owned: Option<Connection>,
) -> Result<(), RpcError> {
    // In a set, so that aborting the server aborts it too.
    let mut ack_task = JoinSet::new();
    ack_task.spawn(send_acks(shared.channel.clone(), answered));
    let mut in_flight = JoinSet::new();
    let mut cancelling = false;
    let result = loop {
        tokio::select! {
            _ = &mut stop, if !cancelling => {
                cancelling = true;
                debug!(consumer = %consumer.tag(), "shutdown: cancelling the consumer");
                // Deliveries already received stay in the stream, which ends after them.
                if let Err(e) = shared
                    .channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await
                {
                    break Err(RpcError::from_lapin("cancelling the consumer", &e));
                }
            }
            Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Err(e) = joined {
                    error!(error = %e, "request task failed");
                }
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    // Boxed: the request's future (~2.5 KiB, lapin's publish inside) would
                    // otherwise be copied several times by spawning and completing its task.
                    in_flight.spawn(Box::pin(handle_request(shared.clone(), delivery)));
                }
                Some(Err(e)) => {
                    break Err(RpcError::ConnectionLost(format!("request consumer failed: {e}")));
                }
                None if cancelling => break Ok(()),
                None => {
                    break Err(RpcError::ConnectionLost(
                        "the broker cancelled the request consumer (queue deleted?)".into(),
                    ));
                }
            },
        }
    };
    match &result {
        Ok(()) => {
            while in_flight.join_next().await.is_some() {}
            // The last `AckSender` goes with `shared`: the ack task acks what is left and ends.
            let channel = shared.channel.clone();
            drop(shared);
            while ack_task.join_next().await.is_some() {}
            let reply_text = ShortString::from("server shutdown");
            if let Err(e) = channel.close(200, reply_text.clone()).await {
                warn!(error = %e, "closing the server channel");
            }
            if let Some(conn) = owned
                && let Err(e) = conn.close(200, reply_text).await
            {
                warn!(error = %e, "closing the server connection");
            }
            info!("server stopped");
        }
        Err(e) => {
            // Replies can no longer be published: the unacked requests go back to the queue.
            if !in_flight.is_empty() {
                warn!(in_flight = in_flight.len(), "abandoning requests in flight");
            }
            in_flight.abort_all();
            error!(error = %e, "server stopped");
        }
    }
    result
}

/// One request: handle, reply, then ack.
async fn handle_request<H: Handler>(shared: Arc<Shared<H>>, delivery: Delivery) {
    let Delivery {
        data,
        properties,
        delivery_tag,
        redelivered,
        ..
    } = delivery;
    let correlation_id = properties.correlation_id().clone();
    let corr = correlation_id.as_ref().map_or("", ShortString::as_str);
    let counters = &shared.counters;

    let reply_to = match properties.reply_to() {
        Some(reply_to) if !reply_to.as_str().is_empty() => reply_to.clone(),
        _ => {
            warn!(
                correlation_id = corr,
                delivery_tag, "request without reply_to: acked and dropped"
            );
            Counters::bump(&counters.dropped);
            shared.acks.answered(delivery_tag);
            return;
        }
    };

    let outcome = AssertUnwindSafe(shared.handler.handle(data))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(HandlerError::new("internal error: the handler panicked")));
    let mut reply_properties = BasicProperties::default();
    if let Some(correlation_id) = correlation_id.clone() {
        reply_properties = reply_properties.with_correlation_id(correlation_id);
    }
    let (body, counter) = match outcome {
        Ok(body) => (body, &counters.replies),
        Err(e) => {
            warn!(correlation_id = corr, redelivered, error = %e, "error reply");
            let mut headers = FieldTable::default();
            headers.insert(
                ERROR_HEADER.into(),
                AMQPValue::LongString(e.message().into()),
            );
            reply_properties = reply_properties
                .with_headers(headers)
                .with_content_type("text/plain".into());
            (e.message.into_bytes(), &counters.error_replies)
        }
    };

    let published = shared
        .channel
        .basic_publish(
            ShortString::from(""),
            reply_to,
            BasicPublishOptions::default(),
            &body,
            reply_properties,
        )
        .await;
    if let Err(e) = published {
        error!(correlation_id = corr, error = %e, "publishing the reply failed; request left unacked");
        Counters::bump(&counters.failed);
        return;
    }
    Counters::bump(counter);
    shared.acks.answered(delivery_tag);
}
