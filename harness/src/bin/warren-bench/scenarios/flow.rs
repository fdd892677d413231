//! Throughput: publishers into queues, consumers (manual acks, prefetch) out of them, counted
//! end to end: pubsub, fan-in and scale. The same scenario runs with the lean client or with
//! lapin.
//!
//! Consumers run for the whole scenario and count deliveries into a shared counter; one
//! repeat publishes N messages (confirm-less, as fast as the connection takes them) and ends
//! when the consumers have received all N. Consumers ack with `multiple` every prefetch/4
//! deliveries, and whatever is left after 2 ms without input.

use crate::Result;
use crate::lean::{self, Lean};
use crate::results::Metric;
use crate::runner::{Plan, Sample, Scenario};
use crate::target::Target;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// Messages per second, end to end.
pub(crate) const RATE: Metric = Metric::higher("msg/s", "msg/s");

/// Deliveries a consumer acks at once (with `multiple`): a quarter of its prefetch.
fn ack_every(prefetch: u16) -> u64 {
    (u64::from(prefetch) / 4).max(1)
}

/// Ack whatever is unacked after this long without input.
const ACK_LINGER: Duration = Duration::from_millis(2);
/// Publishes lapin keeps in flight per publisher (each one waits for lapin's I/O thread).
const LAPIN_WINDOW: usize = 256;

/// Which client produces the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Client {
    /// [`crate::lean`].
    Lean,
    /// lapin.
    Lapin,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Lean => "lean",
            Client::Lapin => "lapin",
        }
    }
}

/// A throughput scenario.
#[derive(Debug)]
pub(crate) struct Flow<'a> {
    /// Row name.
    pub(crate) name: String,
    /// The client.
    pub(crate) client: Client,
    /// Queues.
    pub(crate) queues: usize,
    /// Consumers on each queue.
    pub(crate) consumers_per_queue: usize,
    /// Connections the consumers are spread over.
    pub(crate) consumer_connections: usize,
    /// Publisher connections (each publishes its share round-robin over the queues).
    pub(crate) publishers: usize,
    /// Body size in bytes (one body frame).
    pub(crate) body: usize,
    /// Per-consumer prefetch.
    pub(crate) prefetch: u16,
    /// Whether to add the broker's CPU per message.
    pub(crate) cpu_per_msg: bool,
    /// Run size.
    pub(crate) plan: &'a Plan,
}

/// Deliveries counted by every consumer of a target.
#[derive(Debug, Default)]
struct Progress {
    received: AtomicU64,
    goal: AtomicU64,
    reached: Notify,
    error: Mutex<Option<String>>,
}

impl Progress {
    fn add(&self, n: u64) {
        let now = self.received.fetch_add(n, Ordering::Relaxed) + n;
        if now >= self.goal.load(Ordering::Relaxed) {
            self.reached.notify_one();
        }
    }

    fn fail(&self, error: String) {
        self.error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(error);
        self.reached.notify_one();
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A publisher connection.
enum Publisher {
    Lean(Option<Lean>),
    Lapin(lapin::Channel),
}

/// One target's queues, consumers and publishers.
pub(crate) struct FlowState {
    admin: Lean,
    queues: Vec<String>,
    progress: Arc<Progress>,
    stop: watch::Sender<bool>,
    consumers: Vec<JoinHandle<()>>,
    publishers: Vec<Publisher>,
    lapin_connections: Vec<Connection>,
    prefixes: Arc<Vec<Vec<u8>>>,
    routing_keys: Arc<Vec<ShortString>>,
    body: Arc<Vec<u8>>,
    next_messages: u64,
}

impl Flow<'_> {
    /// Which queues the consumers of connection `c` consume (one entry per consumer).
    fn consumers_of(&self, c: usize, queues: &[String]) -> Vec<String> {
        let total = self.queues * self.consumers_per_queue;
        (0..total)
            .filter(|i| i % self.consumer_connections == c)
            .map(|i| queues[i % self.queues].clone())
            .collect()
    }
}

impl Scenario for Flow<'_> {
    type State = FlowState;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn client(&self) -> &'static str {
        self.client.name()
    }

    fn broker_cpu_unit(&self) -> Option<&'static str> {
        self.cpu_per_msg.then_some("msg")
    }

    async fn setup(&self, target: &Target) -> Result<FlowState> {
        let mut admin = Lean::connect(&target.url).await?;
        admin.open_channel(1).await?;
        let queues: Vec<String> = (0..self.queues).map(|_| self.plan.name("flow")).collect();
        // Auto-delete: each goes with its last consumer, even if the bench is killed.
        admin.declare_many(1, &queues, false, true).await?;
        let (stop, stopped) = watch::channel(false);
        let mut state = FlowState {
            admin,
            prefixes: Arc::new(
                queues
                    .iter()
                    .map(|q| lean::publish_prefix(1, q, BasicProperties::default(), self.body))
                    .collect(),
            ),
            routing_keys: Arc::new(
                queues
                    .iter()
                    .map(|q| ShortString::from(q.as_str()))
                    .collect(),
            ),
            queues,
            progress: Arc::new(Progress::default()),
            stop,
            consumers: Vec::new(),
            publishers: Vec::new(),
            lapin_connections: Vec::new(),
            body: Arc::new(vec![b'x'; self.body]),
            next_messages: 2_000,
        };
        // From here on, a failure must still delete the queues: build the rest, then tear down
        // on error.
        match self.connect_clients(target, &mut state, stopped).await {
            Ok(()) => Ok(state),
            Err(e) => {
                self.teardown(state).await;
                Err(e)
            }
        }
    }

    async fn measure(&self, state: &mut FlowState) -> Result<Sample> {
        let total = state.next_messages;
        let progress = state.progress.clone();
        let goal = progress.received.load(Ordering::Relaxed) + total;
        progress.goal.store(goal, Ordering::Relaxed);
        let started = Instant::now();
        let n = state.publishers.len() as u64;
        let mut tasks: Vec<JoinHandle<Result<Option<Lean>>>> = Vec::new();
        for (i, publisher) in state.publishers.iter_mut().enumerate() {
            let i = i as u64;
            let share = total / n + u64::from(i < total % n);
            let offset = i as usize;
            match publisher {
                Publisher::Lean(conn) => {
                    let conn = conn.take().ok_or("publisher lost")?;
                    let prefixes = state.prefixes.clone();
                    let body = state.body.clone();
                    tasks.push(tokio::spawn(async move {
                        lean_publish(conn, &prefixes, offset, share, &body)
                            .await
                            .map(Some)
                    }));
                }
                Publisher::Lapin(channel) => {
                    let channel = channel.clone();
                    let keys = state.routing_keys.clone();
                    let body = state.body.clone();
                    tasks.push(tokio::spawn(async move {
                        lapin_publish(&channel, &keys, offset, share, &body).await?;
                        Ok(None)
                    }));
                }
            }
        }
        // Wait for the consumers to have everything, or for a failure.
        let mut done: Vec<Option<Option<Lean>>> = (0..tasks.len()).map(|_| None).collect();
        let outcome: Result<f64> = async {
            loop {
                if progress.received.load(Ordering::Relaxed) >= goal {
                    return Ok(started.elapsed().as_secs_f64());
                }
                if let Some(e) = progress.error() {
                    return Err(e.into());
                }
                for (task, slot) in tasks.iter_mut().zip(done.iter_mut()) {
                    if slot.is_none() && task.is_finished() {
                        *slot = Some(join_publisher(task).await?);
                    }
                }
                let wait = progress.reached.notified();
                let _ = tokio::time::timeout(Duration::from_millis(20), wait).await;
            }
        }
        .await;
        let elapsed = match outcome {
            Ok(elapsed) => elapsed,
            Err(e) => {
                for task in &tasks {
                    task.abort();
                }
                return Err(e);
            }
        };
        for ((publisher, task), slot) in state.publishers.iter_mut().zip(&mut tasks).zip(done) {
            let conn = match slot {
                Some(conn) => conn,
                None => join_publisher(task).await?,
            };
            if let Some(conn) = conn {
                *publisher = Publisher::Lean(Some(conn));
            }
        }
        let rate = total as f64 / elapsed;
        state.next_messages = self.plan.size(rate, 2_000, 20_000_000);
        Ok(Sample {
            figures: vec![(RATE, rate)],
            messages: total,
        })
    }

    async fn teardown(&self, mut state: FlowState) {
        if let Err(e) = state.admin.delete_many(1, &state.queues).await {
            eprintln!("warren-bench: {}: deleting queues: {e}", self.name);
        }
        state.admin.close().await;
        let _ = state.stop.send(true);
        for publisher in state.publishers {
            match publisher {
                Publisher::Lean(Some(conn)) => conn.close().await,
                Publisher::Lean(None) => {}
                Publisher::Lapin(channel) => {
                    let _ = channel.close(200, "bye".into()).await;
                }
            }
        }
        for task in state.consumers {
            if tokio::time::timeout(Duration::from_secs(3), task)
                .await
                .is_err()
            {
                eprintln!(
                    "warren-bench: {}: a consumer did not stop in time",
                    self.name
                );
            }
        }
        for conn in state.lapin_connections {
            let _ =
                tokio::time::timeout(Duration::from_secs(3), conn.close(200, "bye".into())).await;
        }
    }
}

impl Flow<'_> {
    /// Opens the consumer and publisher connections.
    async fn connect_clients(
        &self,
        target: &Target,
        state: &mut FlowState,
        stopped: watch::Receiver<bool>,
    ) -> Result<()> {
        for c in 0..self.consumer_connections {
            let mine = self.consumers_of(c, &state.queues);
            if mine.is_empty() {
                continue;
            }
            match self.client {
                Client::Lean => {
                    let mut conn = Lean::connect(&target.url).await?;
                    conn.open_channel(1).await?;
                    conn.qos(1, self.prefetch).await?;
                    conn.consume_many(1, &mine, false).await?;
                    state.consumers.push(tokio::spawn(lean_consume(
                        conn,
                        self.prefetch,
                        state.progress.clone(),
                        stopped.clone(),
                    )));
                }
                Client::Lapin => {
                    let conn = lapin_connect(&target.url).await?;
                    let channel = conn.create_channel().await?;
                    channel
                        .basic_qos(self.prefetch, BasicQosOptions::default())
                        .await?;
                    for queue in mine {
                        let consumer = channel
                            .basic_consume(
                                queue.as_str().into(),
                                "".into(),
                                BasicConsumeOptions::default(),
                                FieldTable::default(),
                            )
                            .await?;
                        state.consumers.push(tokio::spawn(lapin_consume(
                            channel.clone(),
                            consumer,
                            self.prefetch,
                            state.progress.clone(),
                            stopped.clone(),
                        )));
                    }
                    state.lapin_connections.push(conn);
                }
            }
        }
        for _ in 0..self.publishers {
            match self.client {
                Client::Lean => {
                    let mut conn = Lean::connect(&target.url).await?;
                    conn.open_channel(1).await?;
                    state.publishers.push(Publisher::Lean(Some(conn)));
                }
                Client::Lapin => {
                    let conn = lapin_connect(&target.url).await?;
                    let channel = conn.create_channel().await?;
                    state.publishers.push(Publisher::Lapin(channel));
                    state.lapin_connections.push(conn);
                }
            }
        }
        Ok(())
    }
}

/// The outcome of a finished (or finishing) publisher task: its lean connection back, if it
/// had one.
async fn join_publisher(task: &mut JoinHandle<Result<Option<Lean>>>) -> Result<Option<Lean>> {
    match tokio::time::timeout(Duration::from_secs(30), task).await {
        Ok(Ok(Ok(conn))) => Ok(conn),
        Ok(Ok(Err(e))) => Err(format!("publisher: {e}").into()),
        Ok(Err(e)) => Err(format!("publisher task: {e}").into()),
        Err(_) => Err("a publisher did not finish in time".into()),
    }
}

/// A lapin connection, within 10 seconds.
pub(crate) async fn lapin_connect(url: &str) -> Result<Connection> {
    let connect = Connection::connect(url, ConnectionProperties::default());
    Ok(tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| "lapin: no handshake within 10 s")??)
}

/// Publishes `n` messages round-robin over the queues (from `offset`), batching writes.
async fn lean_publish(
    mut conn: Lean,
    prefixes: &[Vec<u8>],
    offset: usize,
    n: u64,
    body: &[u8],
) -> Result<Lean> {
    let mut at = offset % prefixes.len();
    for _ in 0..n {
        conn.push_publish(1, &prefixes[at], body);
        at += 1;
        if at == prefixes.len() {
            at = 0;
        }
        conn.flush_when_full().await?;
    }
    conn.flush().await?;
    Ok(conn)
}

/// Publishes `n` messages with lapin, [`LAPIN_WINDOW`] publishes in flight: as many workers,
/// each publishing every [`LAPIN_WINDOW`]th message, so each publish's future lives inside its
/// worker (a future per publish pushed into a `FuturesUnordered` was a ~1 KiB allocation each,
/// which made glibc consolidate its free lists: ~2% of an embedded lapin pubsub profile).
async fn lapin_publish(
    channel: &lapin::Channel,
    keys: &[ShortString],
    offset: usize,
    n: u64,
    body: &[u8],
) -> Result<()> {
    let n = n as usize;
    let workers = (0..LAPIN_WINDOW.min(n)).map(|first| async move {
        for i in (first..n).step_by(LAPIN_WINDOW) {
            channel
                .basic_publish(
                    "".into(),
                    keys[(offset + i) % keys.len()].clone(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default(),
                )
                .await?;
        }
        Ok::<_, lapin::Error>(())
    });
    futures_util::future::try_join_all(workers).await?;
    Ok(())
}

/// A lean consumer connection (channel 1, any number of consumers): counts deliveries and
/// acks them with `multiple`.
async fn lean_consume(
    mut conn: Lean,
    prefetch: u16,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) {
    let ack_every = ack_every(prefetch);
    let mut unacked = 0u64;
    // The tag of the delivery whose body is awaited, and of the last complete one.
    let mut arriving_tag = 0u64;
    let mut last_tag = 0u64;
    let result: Result<()> = async {
        loop {
            let mut delivered = 0u64;
            let mut closed = None;
            conn.scan(|kind, _channel, payload| {
                match kind {
                    lean::METHOD => {
                        if let Some(tag) = lean::deliver_tag(payload) {
                            arriving_tag = tag;
                        } else if let Some(reason) = lean::close_reason(payload) {
                            closed = Some(reason);
                            return false;
                        }
                    }
                    // Every body of this bench fits one frame: a body frame completes a
                    // message. Only complete messages are acked: acking the tag of one whose
                    // body is still to come would ack it twice once the body is counted.
                    lean::BODY => {
                        delivered += 1;
                        last_tag = arriving_tag;
                    }
                    _ => {}
                }
                true
            })?;
            if let Some(why) = closed {
                return Err(why.into());
            }
            if delivered > 0 {
                unacked += delivered;
                progress.add(delivered);
            }
            if unacked >= ack_every {
                conn.push_ack(1, last_tag, true);
                unacked = 0;
                conn.flush().await?;
            }
            tokio::select! {
                read = conn.read_more() => read?,
                () = tokio::time::sleep(ACK_LINGER), if unacked > 0 => {
                    conn.push_ack(1, last_tag, true);
                    unacked = 0;
                    conn.flush().await?;
                }
                _ = stop.changed() => {
                    conn.close().await;
                    return Ok(());
                }
            }
        }
    }
    .await;
    if let Err(e) = result
        && !*stop.borrow()
    {
        progress.fail(format!("lean consumer: {e}"));
    }
}

/// A lapin consumer: counts deliveries and acks them with `multiple`.
async fn lapin_consume(
    channel: lapin::Channel,
    mut consumer: lapin::Consumer,
    prefetch: u16,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) {
    let ack_every = ack_every(prefetch);
    let mut unacked = 0u64;
    let mut last_tag = 0u64;
    let ack = |tag| channel.basic_ack(tag, BasicAckOptions { multiple: true });
    let result: Result<()> = async {
        loop {
            // Take what lapin already has before arming the linger timer: one timer per
            // batch of deliveries rather than one per message.
            let next = match consumer.next().now_or_never() {
                Some(_) if *stop.borrow() => return Ok(()),
                Some(next) => next,
                None => tokio::select! {
                    next = consumer.next() => next,
                    () = tokio::time::sleep(ACK_LINGER), if unacked > 0 => {
                        unacked = 0;
                        ack(last_tag).await?;
                        continue;
                    }
                    _ = stop.changed() => return Ok(()),
                },
            };
            match next {
                Some(Ok(delivery)) => {
                    last_tag = delivery.delivery_tag;
                    unacked += 1;
                    progress.add(1);
                    if unacked >= ack_every {
                        unacked = 0;
                        ack(last_tag).await?;
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = result
        && !*stop.borrow()
    {
        progress.fail(format!("lapin consumer: {e}"));
    }
}
