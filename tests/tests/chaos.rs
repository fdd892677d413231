//! "Faults lose nothing" (issue 5): chaos over generated schedules, on the embedded broker or
//! `AMQP_URL`, and broker shutdown with messages in flight (embedded only).
//!
//! [`faults_lose_no_confirmed_message_across_generated_kill_stall_and_delay_schedules`] is a
//! property test whose input is a schedule: 1 to 3 queues; 1 to 3 publishers, each behind its
//! own fault-injection [`Proxy`] (some delayed), publishing in batches with publisher confirms
//! and sometimes severed mid-batch (their unconfirmed messages may or may not arrive); 2 to 5
//! consumers with manual ack (generated prefetch, `multiple` acks every generated number of
//! deliveries), each behind its own proxy, each with a list of events fired after a generated
//! number of deliveries: killed by an abrupt TCP close (sever), by a stall then a sever (its
//! last acks die in the proxy), by channel close, by connection close, by `basic.cancel` (then
//! the deliveries held are acked or nacked back), or disturbed by a stall, a delay, or a
//! `basic.nack` with requeue. A killed consumer comes back on a new connection (or channel, or
//! consumer) and goes on.
//!
//! Checked for every schedule:
//! - every confirmed message was delivered and acked at least once;
//! - every delivery of a message after its first carried `redelivered=true`;
//! - no delivery of a message that was never published;
//! - the queues drain while the consumers run, and after they stop the queues are empty
//!   except for messages whose only acks were sent on a connection that was then severed (their
//!   ack may have died with it), which must come back flagged redelivered (a message acked on a
//!   connection that ended cleanly must never come back); then the queues are empty (and, on
//!   the embedded broker, hold no unacked message).
//!
//! Volume: 8 schedules of 12,500 confirmed messages on the embedded broker (at least 100,000
//! per run; the test prints the count), 5 of 4,000 against RabbitMQ. `PROPTEST_CASES` overrides
//! the number of schedules, `PROPTEST_RNG_SEED` replays a run.
//!
//! [`embedded_only_shutdown_with_messages_in_flight_sends_320_and_returns_promptly`]: a broker
//! with publishers, consumers, a consumer behind a stalled proxy and a raw client that reads
//! nothing is shut down mid-traffic: every lapin connection gets 320 CONNECTION_FORCED (the
//! stalled one once its proxy resumes), the silent raw client's socket is closed, `shutdown`
//! returns within a bound, and nothing panics.

use futures_util::{FutureExt, StreamExt};
use lapin::{
    BasicProperties, Channel, Connection, Consumer, Event,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions,
        BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use warren_harness::{Proxy, TestBroker, try_wait_until};
use warren_tests::external;
use warren_tests::prop::step;

// Every wait for the broker: the suite-wide bound.
use warren_tests::TIMEOUT as WAIT;

/// How long the consumers may take to ack every confirmed message once publishing is done.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

async fn connect(url: &str) -> Result<Connection, String> {
    step(
        "connect",
        Connection::connect(url, lapin::ConnectionProperties::default()),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Schedules
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Kill {
    /// The consumer's TCP connection is cut through its proxy: no AMQP close at all.
    Sever,
    /// The proxy stalls, the consumer flushes its acks into it, then the connection is cut.
    StallThenSever,
    /// channel.close; a new channel on the same connection.
    CloseChannel,
    /// connection.close; a new connection.
    CloseConnection,
    /// basic.cancel; the deliveries held are then acked (`true`) or nacked back (`false`),
    /// and a new consumer starts on the same channel.
    Cancel { ack_held: bool },
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill(Kill),
    /// The proxy forwards nothing for this long.
    Stall {
        ms: u16,
    },
    /// The proxy holds each chunk this long, for this many deliveries.
    Delay {
        ms: u8,
        deliveries: u16,
    },
    /// This delivery is nacked with requeue instead of acked.
    NackRequeue,
}

#[derive(Clone, Debug)]
struct ConsumerPlan {
    prefetch: u16,
    ack_every: u16,
    /// Each fault fires after this many deliveries since the previous one.
    faults: Vec<(u32, Fault)>,
}

#[derive(Clone, Debug)]
struct PublisherPlan {
    batch: u16,
    /// Milliseconds the publisher's proxy holds each chunk.
    delay_ms: u8,
    /// Batches (by number) in the middle of which the publisher's connection is severed.
    kills: Vec<u16>,
}

#[derive(Clone, Debug)]
struct Schedule {
    queues: usize,
    /// Padding added to each 8-byte body.
    pad: usize,
    publishers: Vec<PublisherPlan>,
    /// Consumer `i` consumes queue `i % queues`.
    consumers: Vec<ConsumerPlan>,
}

fn fault(max_after: u32) -> impl Strategy<Value = (u32, Fault)> {
    let what = prop_oneof![
        3 => Just(Fault::Kill(Kill::Sever)),
        1 => Just(Fault::Kill(Kill::StallThenSever)),
        2 => Just(Fault::Kill(Kill::CloseChannel)),
        1 => Just(Fault::Kill(Kill::CloseConnection)),
        2 => any::<bool>().prop_map(|ack_held| Fault::Kill(Kill::Cancel { ack_held })),
        2 => (10u16..=120).prop_map(|ms| Fault::Stall { ms }),
        1 => (1u8..=4, 20u16..=200).prop_map(|(ms, deliveries)| Fault::Delay { ms, deliveries }),
        2 => Just(Fault::NackRequeue),
    ];
    (1..=max_after, what)
}

fn consumer_plan(max_after: u32) -> impl Strategy<Value = ConsumerPlan> {
    (
        prop_oneof![1 => 1u16..=10, 4 => 10u16..=300],
        1u16..=100,
        prop::collection::vec(fault(max_after), 0..=10),
    )
        .prop_map(|(prefetch, ack_every, faults)| ConsumerPlan {
            prefetch,
            ack_every,
            faults,
        })
}

fn publisher_plan() -> impl Strategy<Value = PublisherPlan> {
    (
        20u16..=400,
        prop_oneof![3 => Just(0u8), 1 => 1u8..=2],
        prop::collection::vec(0u16..=40, 0..=2),
    )
        .prop_map(|(batch, delay_ms, kills)| PublisherPlan {
            batch,
            delay_ms,
            kills,
        })
}

fn schedule(per_case: usize) -> impl Strategy<Value = Schedule> {
    // Faults spread over about the deliveries one consumer sees.
    let max_after = (per_case / 16).max(10) as u32;
    (1usize..=3).prop_flat_map(move |queues| {
        (
            Just(queues),
            prop_oneof![3 => Just(0usize), 1 => 1usize..=256],
            prop::collection::vec(publisher_plan(), 1..=3),
            prop::collection::vec(consumer_plan(max_after), queues.max(2)..=5),
        )
            .prop_map(|(queues, pad, publishers, consumers)| Schedule {
                queues,
                pad,
                publishers,
                consumers,
            })
    })
}

// ---------------------------------------------------------------------------------------------
// The book: what was published, confirmed, delivered and acked
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    confirmed: u64,
    deliveries: u64,
    redelivered: u64,
    /// First deliveries (as this client saw them) already flagged: allowed, the broker may
    /// have sent them to a consumer that died before reading them.
    first_flagged: u64,
    severs: u64,
    channel_closes: u64,
    connection_closes: u64,
    cancels: u64,
    stalls: u64,
    delays: u64,
    nacks: u64,
    publisher_kills: u64,
    /// Messages found in a queue after the consumers stopped (acks lost with a severed
    /// connection).
    leftovers: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.confirmed += o.confirmed;
        self.deliveries += o.deliveries;
        self.redelivered += o.redelivered;
        self.first_flagged += o.first_flagged;
        self.severs += o.severs;
        self.channel_closes += o.channel_closes;
        self.connection_closes += o.connection_closes;
        self.cancels += o.cancels;
        self.stalls += o.stalls;
        self.delays += o.delays;
        self.nacks += o.nacks;
        self.publisher_kills += o.publisher_kills;
        self.leftovers += o.leftovers;
    }
}

#[derive(Default)]
struct Book {
    published: HashSet<u64>,
    confirmed: HashSet<u64>,
    /// Deliveries seen per message.
    delivered: HashMap<u64, u32>,
    /// Messages an ack was sent for.
    acked: HashSet<u64>,
    /// Messages acked on a connection that was then severed.
    uncertain: HashSet<u64>,
    violations: Vec<String>,
    stats: Stats,
}

impl Book {
    fn violation(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(what);
        }
    }

    fn record(&mut self, id: u64, redelivered: bool, who: &str) {
        self.stats.deliveries += 1;
        if redelivered {
            self.stats.redelivered += 1;
        }
        if !self.published.contains(&id) {
            self.violation(format!("{who} got message {id}, never published"));
        }
        let seen = self.delivered.entry(id).or_insert(0);
        match (*seen, redelivered) {
            (0, true) => self.stats.first_flagged += 1,
            (n, false) if n > 0 => {
                let n = *seen;
                self.violation(format!(
                    "{who} got message {id} for the {}th time without redelivered=true",
                    n + 1
                ));
            }
            _ => {}
        }
        *self.delivered.entry(id).or_insert(0) += 1;
    }
}

struct Ctx {
    url: String,
    queues: Vec<String>,
    pad: usize,
    book: Mutex<Book>,
    next_id: AtomicU64,
    stop: watch::Receiver<bool>,
}

impl Ctx {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn body(&self, id: u64) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        body.resize(8 + self.pad, b'.');
        body
    }
}

fn id_of(data: &[u8]) -> Result<u64, String> {
    data.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| format!("a body of {} bytes: not a test message", data.len()))
}

// ---------------------------------------------------------------------------------------------
// Publishers
// ---------------------------------------------------------------------------------------------

async fn publisher(ctx: Arc<Ctx>, plan: PublisherPlan, target: usize) -> Result<(), String> {
    let proxy = Proxy::start(&ctx.url).await;
    let nq = ctx.queues.len() as u64;
    let mut confirmed = 0usize;
    let mut batch_no = 0u16;
    while confirmed < target {
        proxy.restore();
        if plan.delay_ms > 0 {
            proxy.set_delay(Duration::from_millis(plan.delay_ms.into()));
        }
        let conn = connect(proxy.url()).await?;
        let ch = step("channel.open", conn.create_channel()).await?;
        step(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        let mut severed = false;
        while confirmed < target && !severed {
            let n = usize::from(plan.batch).min(target - confirmed);
            let sever_at = plan.kills.contains(&batch_no).then_some(n / 2);
            batch_no += 1;
            let ids: Vec<u64> = (0..n)
                .map(|_| ctx.next_id.fetch_add(1, Ordering::Relaxed))
                .collect();
            ctx.book().published.extend(ids.iter().copied());
            let mut confirms = Vec::with_capacity(n);
            for (k, &id) in ids.iter().enumerate() {
                if Some(k) == sever_at {
                    proxy.sever_all();
                    severed = true;
                    ctx.book().stats.publisher_kills += 1;
                    break;
                }
                let queue = ctx.queues[(id % nq) as usize].as_str();
                let confirm = step(
                    "basic.publish",
                    ch.basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &ctx.body(id),
                        BasicProperties::default(),
                    ),
                )
                .await?;
                confirms.push((id, confirm));
            }
            let mut ok = Vec::with_capacity(confirms.len());
            for (id, confirm) in confirms {
                match tokio::time::timeout(WAIT, confirm).await {
                    Ok(Ok(c)) if c.is_ack() => ok.push(id),
                    Ok(Ok(c)) => return Err(format!("message {id} nacked by the broker: {c:?}")),
                    // Its connection was cut on purpose: this one is simply unconfirmed.
                    Ok(Err(_)) | Err(_) if severed => {}
                    Ok(Err(e)) => return Err(format!("confirm of message {id}: {e}")),
                    Err(_) => return Err(format!("no confirm of message {id} within {WAIT:?}")),
                }
            }
            confirmed += ok.len();
            let mut book = ctx.book();
            book.stats.confirmed += ok.len() as u64;
            book.confirmed.extend(ok);
        }
        if !severed {
            let _ = step("connection.close", conn.close(200, "OK".into())).await;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Consumers
// ---------------------------------------------------------------------------------------------

/// One incarnation of a consumer: its connection, channel and consumer.
struct Live {
    conn: Connection,
    channel: Channel,
    consumer: Consumer,
    /// Messages received and not yet acked, and the last delivery tag among them.
    pending: Vec<u64>,
    last_tag: u64,
    /// Messages acked on this connection.
    acked: Vec<u64>,
}

impl Live {
    async fn open_channel(
        conn: &Connection,
        queue: &str,
        prefetch: u16,
    ) -> Result<(Channel, Consumer), String> {
        let channel = step("channel.open", conn.create_channel()).await?;
        step(
            "basic.qos",
            channel.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
        let consumer = step(
            "basic.consume",
            channel.basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok((channel, consumer))
    }

    async fn start(url: &str, queue: &str, prefetch: u16) -> Result<Self, String> {
        let conn = connect(url).await?;
        let (channel, consumer) = Self::open_channel(&conn, queue, prefetch).await?;
        Ok(Self {
            conn,
            channel,
            consumer,
            pending: Vec::new(),
            last_tag: 0,
            acked: Vec::new(),
        })
    }

    fn hold(&mut self, id: u64, tag: u64) {
        self.pending.push(id);
        self.last_tag = tag;
    }

    /// Acks every pending delivery at once (`multiple`).
    async fn flush(&mut self, ctx: &Ctx) -> Result<(), String> {
        if self.pending.is_empty() {
            return Ok(());
        }
        step(
            "basic.ack",
            self.channel
                .basic_ack(self.last_tag, BasicAckOptions { multiple: true }),
        )
        .await?;
        ctx.book().acked.extend(self.pending.iter().copied());
        self.acked.append(&mut self.pending);
        Ok(())
    }

    /// Cancels the consumer, taking what was sent before cancel-ok.
    async fn cancel(&mut self, ctx: &Ctx, who: &str) -> Result<(), String> {
        step(
            "basic.cancel",
            self.channel
                .basic_cancel(self.consumer.tag(), BasicCancelOptions::default()),
        )
        .await?;
        loop {
            match tokio::time::timeout(WAIT, self.consumer.next()).await {
                Err(_) => return Err(format!("{who}: the consumer did not end after cancel-ok")),
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => return Err(format!("{who}: consumer failed: {e}")),
                Ok(Some(Ok(d))) => {
                    let id = id_of(&d.data)?;
                    ctx.book().record(id, d.redelivered, who);
                    self.hold(id, d.delivery_tag);
                }
            }
        }
    }

    /// The end of the run: ack everything, cancel, ack what came before cancel-ok, close.
    async fn finish(mut self, ctx: &Ctx, who: &str) -> Result<(), String> {
        self.flush(ctx).await?;
        self.cancel(ctx, who).await?;
        self.flush(ctx).await?;
        step("channel.close", self.channel.close(200, "OK".into())).await?;
        step("connection.close", self.conn.close(200, "OK".into())).await?;
        Ok(())
    }
}

async fn consumer(ctx: Arc<Ctx>, plan: ConsumerPlan, index: usize) -> Result<(), String> {
    let queue = ctx.queues[index % ctx.queues.len()].clone();
    let proxy = Proxy::start(&ctx.url).await;
    let mut stop = ctx.stop.clone();
    let mut next_fault = 0;
    let mut since = 0u32;
    let mut delay_left: u16;
    let mut incarnation = 0;
    loop {
        incarnation += 1;
        let who = format!("consumer {index}.{incarnation}");
        proxy.restore();
        delay_left = 0;
        let mut live = Live::start(proxy.url(), &queue, plan.prefetch).await?;
        loop {
            let item = match live.consumer.next().now_or_never() {
                Some(item) => item,
                None => {
                    // Nothing waiting: a good moment for the acks of a partial batch.
                    live.flush(&ctx).await?;
                    tokio::select! {
                        item = live.consumer.next() => item,
                        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                            return live.finish(&ctx, &who).await;
                        }
                    }
                }
            };
            let d = match item {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(format!("{who}: consumer failed: {e}")),
                None => return Err(format!("{who}: consumer ended (cancelled by the broker?)")),
            };
            let id = id_of(&d.data)?;
            ctx.book().record(id, d.redelivered, &who);
            if *stop.borrow() {
                live.hold(id, d.delivery_tag);
                return live.finish(&ctx, &who).await;
            }
            since += 1;
            if delay_left > 0 {
                delay_left -= 1;
                if delay_left == 0 {
                    proxy.set_delay(Duration::ZERO);
                }
            }
            let fault = match plan.faults.get(next_fault) {
                Some(&(after, fault)) if since >= after => {
                    next_fault += 1;
                    since = 0;
                    Some(fault)
                }
                _ => None,
            };
            match fault {
                None => {
                    live.hold(id, d.delivery_tag);
                    if live.pending.len() >= usize::from(plan.ack_every) {
                        live.flush(&ctx).await?;
                    }
                }
                Some(Fault::NackRequeue) => {
                    ctx.book().stats.nacks += 1;
                    step(
                        "basic.nack",
                        live.channel.basic_nack(
                            d.delivery_tag,
                            BasicNackOptions {
                                multiple: false,
                                requeue: true,
                            },
                        ),
                    )
                    .await?;
                }
                Some(Fault::Stall { ms }) => {
                    ctx.book().stats.stalls += 1;
                    live.hold(id, d.delivery_tag);
                    proxy.stall();
                    tokio::time::sleep(Duration::from_millis(ms.into())).await;
                    proxy.resume();
                }
                Some(Fault::Delay { ms, deliveries }) => {
                    ctx.book().stats.delays += 1;
                    live.hold(id, d.delivery_tag);
                    proxy.set_delay(Duration::from_millis(ms.into()));
                    delay_left = deliveries;
                }
                Some(Fault::Kill(kill)) => {
                    live.hold(id, d.delivery_tag);
                    match kill {
                        Kill::Sever | Kill::StallThenSever => {
                            if matches!(kill, Kill::StallThenSever) {
                                proxy.stall();
                                // The acks reach the proxy, never the broker.
                                live.flush(&ctx).await?;
                            }
                            proxy.sever_all();
                            let mut book = ctx.book();
                            book.stats.severs += 1;
                            book.uncertain.extend(live.acked.iter().copied());
                            drop(book);
                            drop(live);
                            break;
                        }
                        Kill::CloseConnection => {
                            ctx.book().stats.connection_closes += 1;
                            step("connection.close", live.conn.close(200, "OK".into())).await?;
                            break;
                        }
                        Kill::CloseChannel => {
                            ctx.book().stats.channel_closes += 1;
                            step("channel.close", live.channel.close(200, "OK".into())).await?;
                            live.pending.clear();
                            let (channel, consumer) =
                                Live::open_channel(&live.conn, &queue, plan.prefetch).await?;
                            live.channel = channel;
                            live.consumer = consumer;
                        }
                        Kill::Cancel { ack_held } => {
                            ctx.book().stats.cancels += 1;
                            live.cancel(&ctx, &who).await?;
                            if ack_held {
                                live.flush(&ctx).await?;
                            } else if !live.pending.is_empty() {
                                step(
                                    "basic.nack",
                                    live.channel.basic_nack(
                                        live.last_tag,
                                        BasicNackOptions {
                                            multiple: true,
                                            requeue: true,
                                        },
                                    ),
                                )
                                .await?;
                                live.pending.clear();
                            }
                            live.consumer = step(
                                "basic.consume",
                                live.channel.basic_consume(
                                    queue.as_str().into(),
                                    "".into(),
                                    BasicConsumeOptions::default(),
                                    FieldTable::default(),
                                ),
                            )
                            .await?;
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One schedule
// ---------------------------------------------------------------------------------------------

async fn chaos(broker: &TestBroker, s: Schedule, per_case: usize) -> Result<Stats, String> {
    let queues: Vec<String> = (0..s.queues).map(|_| broker.unique_name("chaos")).collect();
    let admin = connect(broker.url()).await?;
    let admin_ch = step("channel.open", admin.create_channel()).await?;
    for q in &queues {
        step(
            "queue.declare",
            admin_ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        url: broker.url().to_owned(),
        queues: queues.clone(),
        pad: s.pad,
        book: Mutex::new(Book::default()),
        next_id: AtomicU64::new(0),
        stop: stop_rx,
    });
    let consumers: Vec<_> = s
        .consumers
        .iter()
        .enumerate()
        .map(|(i, plan)| tokio::spawn(consumer(ctx.clone(), plan.clone(), i)))
        .collect();
    let np = s.publishers.len();
    let publishers: Vec<_> = s
        .publishers
        .iter()
        .enumerate()
        .map(|(i, plan)| {
            let target = per_case / np + usize::from(i < per_case % np);
            tokio::spawn(publisher(ctx.clone(), plan.clone(), target))
        })
        .collect();

    let result = async {
        for p in publishers {
            match tokio::time::timeout(Duration::from_secs(120), p).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(format!("publisher: {e}")),
                Ok(Err(e)) => return Err(format!("publisher task: {e}")),
                Err(_) => return Err("a publisher did not finish within 120 s".into()),
            }
        }
        // Every confirmed message acked at least once.
        try_wait_until("every confirmed message acked", DRAIN_LIMIT, async || {
            // A violation, or a consumer that stopped on an error: report it now.
            if consumers.iter().any(|c| c.is_finished()) {
                return Ok(());
            }
            let book = ctx.book();
            if !book.violations.is_empty() {
                return Ok(());
            }
            let missing: Vec<u64> = book
                .confirmed
                .iter()
                .filter(|id| !book.acked.contains(id))
                .copied()
                .take(10)
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                let shown: Vec<String> = missing
                    .iter()
                    .map(|id| format!("{id} (delivered {}x)", book.delivered.get(id).unwrap_or(&0)))
                    .collect();
                Err(format!("not acked yet: {}", shown.join(", ")))
            }
        })
        .await?;
        if !ctx.book().violations.is_empty() || consumers.iter().any(|c| c.is_finished()) {
            return Ok(());
        }
        // What is left (unconfirmed messages, redeliveries) is consumed too.
        for q in &queues {
            try_wait_until(&format!("{q} drained"), WAIT * 3, async || {
                match broker.queue_counts(q).await {
                    Some((0, _)) => Ok(()),
                    other => Err(format!("(ready, consumers) = {other:?}")),
                }
            })
            .await?;
        }
        Ok(())
    }
    .await;

    let _ = stop_tx.send(true);
    let mut consumer_errors = Vec::new();
    for c in consumers {
        match tokio::time::timeout(Duration::from_secs(30), c).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => consumer_errors.push(e),
            Ok(Err(e)) => consumer_errors.push(format!("consumer task: {e}")),
            Err(_) => consumer_errors.push("a consumer did not stop within 30 s".into()),
        }
    }
    result?;
    {
        let book = ctx.book();
        if !book.violations.is_empty() {
            return Err(format!("violations:\n{}", book.violations.join("\n")));
        }
    }
    if let Some(e) = consumer_errors.first() {
        return Err(e.clone());
    }

    // Every consumer connection has ended in the broker (severed ones included), so every
    // message it held is back in its queue.
    for q in &queues {
        try_wait_until(&format!("{q} has no consumer"), WAIT, async || match broker
            .queue_counts(q)
            .await
        {
            Some((_, 0)) => Ok(()),
            other => Err(format!("(ready, consumers) = {other:?}")),
        })
        .await?;
    }
    if let Some(handle) = broker.embedded() {
        // Left: the harness's admin connection and ours.
        try_wait_until("consumer connections gone", WAIT, async || {
            match handle.connections().len() {
                n if n <= 2 => Ok(()),
                n => Err(format!("{n} connections")),
            }
        })
        .await?;
    }
    // Leftovers: only messages whose acks may have died with a severed connection.
    let mut leftovers = 0;
    for q in &queues {
        loop {
            let got = step(
                "basic.get",
                admin_ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
            )
            .await?;
            let Some(m) = got else { break };
            leftovers += 1;
            let id = id_of(&m.delivery.data)?;
            let book = ctx.book();
            if !m.delivery.redelivered {
                return Err(format!(
                    "message {id} left in {q} after the consumers stopped, not flagged \
                     redelivered (delivered {}x before)",
                    book.delivered.get(&id).unwrap_or(&0)
                ));
            }
            if book.confirmed.contains(&id) && !book.uncertain.contains(&id) {
                return Err(format!(
                    "message {id} came back in {q} after its ack on a connection that ended \
                     cleanly"
                ));
            }
            if !book.published.contains(&id) {
                return Err(format!("message {id} in {q} was never published"));
            }
        }
    }
    for q in &queues {
        let counts = broker.queue_counts(q).await;
        if counts != Some((0, 0)) {
            return Err(format!("{q}: (ready, consumers) = {counts:?} at the end"));
        }
        if let Some(info) = broker.embedded().and_then(|h| h.queue(q))
            && info.unacked != 0
        {
            return Err(format!("{q}: {} unacked at the end", info.unacked));
        }
        let _ = step(
            "queue.delete",
            admin_ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
        )
        .await;
    }
    let _ = step("connection.close", admin.close(200, "OK".into())).await;
    let mut stats = ctx.book().stats;
    stats.leftovers = leftovers;
    Ok(stats)
}

#[test]
fn faults_lose_no_confirmed_message_across_generated_kill_stall_and_delay_schedules() {
    let (cases, per_case) = if external() { (5, 4_000) } else { (8, 12_500) };
    let cases_env = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    let config = Config {
        cases: cases_env.unwrap_or(cases),
        max_shrink_iters: 8,
        max_shrink_time: 120_000,
        failure_persistence: None,
        ..Config::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let broker = runtime.block_on(TestBroker::start());
    let total = Mutex::new(Stats::default());
    let started = Instant::now();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&schedule(per_case), |s| {
        match runtime.block_on(chaos(&broker, s, per_case)) {
            Ok(stats) => {
                total.lock().unwrap().add(&stats);
                Ok(())
            }
            Err(e) => Err(TestCaseError::fail(e)),
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let t = *total.lock().unwrap();
    println!(
        "chaos: {} confirmed messages, zero lost, in {:.1?} on {}: {} deliveries ({} redelivered, \
         {} of them first deliveries), kills: {} severs, {} channel closes, {} connection \
         closes, {} cancels; {} stalls, {} delays, {} nacks, {} publisher kills, {} leftovers",
        t.confirmed,
        started.elapsed(),
        if external() {
            "RabbitMQ"
        } else {
            "the embedded broker"
        },
        t.deliveries,
        t.redelivered,
        t.first_flagged,
        t.severs,
        t.channel_closes,
        t.connection_closes,
        t.cancels,
        t.stalls,
        t.delays,
        t.nacks,
        t.publisher_kills,
        t.leftovers
    );
    if cases_env.is_none() && !external() {
        assert!(
            t.confirmed >= 100_000,
            "a CI run must push at least 100,000 confirmed messages, got {}",
            t.confirmed
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Broker shutdown with messages in flight
// ---------------------------------------------------------------------------------------------

/// The name of the runtime threads of the shutdown test: panics on them are counted.
const SHUTDOWN_THREADS: &str = "warren-shutdown-test";

/// Names of the threads that panicked (recorded by a hook that then calls the default one).
static PANICKED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn count_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current()
                .name()
                .unwrap_or("<unnamed>")
                .to_owned();
            PANICKED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(name);
            previous(info);
        }));
    });
}

/// The reply text RabbitMQ documents for a broker shutdown.
const SHUTDOWN_TEXT: &str =
    "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'";

/// The first error event of a connection (its connection.close from the server).
async fn first_error(
    events: &mut (impl futures_util::Stream<Item = Event> + Unpin),
) -> Result<lapin::Error, String> {
    step("an error event", async {
        while let Some(event) = events.next().await {
            if let Event::Error(e) = event {
                return Ok(e);
            }
        }
        Err("the event stream ended without an error")
    })
    .await
}

#[test]
#[cfg_attr(warren_external, ignore = "embedded only")]
fn embedded_only_shutdown_with_messages_in_flight_sends_320_and_returns_promptly() {
    use amq_protocol::frame::AMQPFrame;
    use amq_protocol::protocol::{AMQPClass, basic, connection};
    use warren_broker::{Broker, BrokerConfig};
    use warren_tests::raw::{PROTOCOL_HEADER, RawClient, consume};

    count_panics();
    let test_thread = std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_owned();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SHUTDOWN_THREADS)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let handle = Broker::start(BrokerConfig::default()).await.expect("start");
        let url = handle.url();
        let queues = ["shutdown-a", "shutdown-b"];
        let admin = connect(&url).await.unwrap();
        let admin_ch = step("channel.open", admin.create_channel()).await.unwrap();
        for q in queues {
            step(
                "queue.declare",
                admin_ch.queue_declare(
                    q.into(),
                    QueueDeclareOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await
            .unwrap();
        }
        let confirmed = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let mut events = vec![Box::pin(admin.events_listener())];
        let mut tasks = Vec::new();
        let mut conns = vec![admin];

        // Publishers: batches with confirms, until the connection goes.
        for i in 0..3 {
            let conn = connect(&url).await.unwrap();
            events.push(Box::pin(conn.events_listener()));
            let ch = step("channel.open", conn.create_channel()).await.unwrap();
            step(
                "confirm.select",
                ch.confirm_select(ConfirmSelectOptions::default()),
            )
            .await
            .unwrap();
            let confirmed = confirmed.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let mut confirms = Vec::new();
                    for _ in 0..50 {
                        let publish = ch.basic_publish(
                            "".into(),
                            queues[i % 2].into(),
                            BasicPublishOptions::default(),
                            &[7u8; 512],
                            BasicProperties::default(),
                        );
                        match tokio::time::timeout(WAIT, publish).await {
                            Ok(Ok(c)) => confirms.push(c),
                            Ok(Err(e)) => return format!("publisher {i}: {e}"),
                            Err(_) => return format!("publisher {i}: a publish hung"),
                        }
                    }
                    for c in confirms {
                        match tokio::time::timeout(WAIT, c).await {
                            Ok(Ok(_)) => {
                                confirmed.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Err(e)) => return format!("publisher {i}: {e}"),
                            Err(_) => return format!("publisher {i}: a confirm hung"),
                        }
                    }
                }
            }));
            conns.push(conn);
        }
        // Consumers with manual ack, until the consumer ends.
        for i in 0..3 {
            let conn = connect(&url).await.unwrap();
            events.push(Box::pin(conn.events_listener()));
            let (ch, mut consumer) = Live::open_channel(&conn, queues[i % 2], 20).await.unwrap();
            let received = received.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match tokio::time::timeout(WAIT, consumer.next()).await {
                        Ok(Some(Ok(d))) => {
                            received.fetch_add(1, Ordering::Relaxed);
                            if let Err(e) = ch
                                .basic_ack(d.delivery_tag, BasicAckOptions::default())
                                .await
                            {
                                return format!("consumer {i}: {e}");
                            }
                        }
                        Ok(Some(Err(e))) => return format!("consumer {i}: {e}"),
                        Ok(None) => return format!("consumer {i}: ended"),
                        Err(_) => return format!("consumer {i}: no delivery within {WAIT:?}"),
                    }
                }
            }));
            conns.push(conn);
        }
        // A consumer behind a proxy that stalls: it cannot answer the close in time. A raw
        // client: lapin reports a close that arrives together with the end of the socket as
        // ConnectionAborted, not as the 320 it read.
        let proxy = Proxy::start(&url).await;
        let mut stalled = RawClient::open_on_channel(proxy.url(), 1).await;
        let reply = stalled
            .rpc(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                    prefetch_count: 5,
                    global: false,
                })),
            )
            .await;
        assert!(
            matches!(
                reply,
                AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::QosOk(_)))
            ),
            "{reply:?}"
        );
        let reply = stalled.rpc(1, consume(queues[0], "stalled", false)).await;
        assert!(
            matches!(
                reply,
                AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)))
            ),
            "{reply:?}"
        );
        proxy.stall();
        // A raw client consuming without ack that reads nothing: the broker's writes to it block.
        let mut silent = RawClient::open_on_channel(&url, 1).await;
        silent
            .send_method(1, consume(queues[0], "silent", true))
            .await;
        // A client that never finishes the handshake.
        let mut half_open = RawClient::connect(&url).await;
        half_open.send_bytes(&PROTOCOL_HEADER[..5]).await;

        try_wait_until("traffic in flight", WAIT, async || {
            let (c, r) = (
                confirmed.load(Ordering::Relaxed),
                received.load(Ordering::Relaxed),
            );
            if c >= 2_000 && r >= 1_000 {
                Ok(())
            } else {
                Err(format!("{c} confirmed, {r} received"))
            }
        })
        .await
        .unwrap();

        let started = Instant::now();
        let addr = handle.local_addr();
        tokio::time::timeout(Duration::from_secs(30), handle.shutdown())
            .await
            .expect("shutdown did not return within 30 s");
        let took = started.elapsed();
        println!(
            "shutdown took {took:?} with {} confirmed and {} delivered so far",
            confirmed.load(Ordering::Relaxed),
            received.load(Ordering::Relaxed)
        );
        // The stalled client holds up shutdown for the close-ok wait (3 s), not more.
        assert!(took < Duration::from_secs(8), "shutdown took {took:?}");

        for (i, events) in events.iter_mut().enumerate() {
            let err = first_error(events)
                .await
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            warren_tests::assert_amqp_error(&err, 320, Some(SHUTDOWN_TEXT));
        }
        // The stalled client gets its 320 once its proxy forwards again.
        proxy.resume();
        match stalled
            .recv_until(|f| matches!(f, AMQPFrame::Method(0, _)))
            .await
        {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(close))) => {
                assert_eq!(close.reply_code, 320);
                assert_eq!(close.reply_text.as_str(), SHUTDOWN_TEXT);
            }
            other => panic!("the stalled client got {other:?}, expected connection.close 320"),
        }
        stalled.read_until_closed().await;
        for task in tasks {
            let ended = tokio::time::timeout(WAIT, task)
                .await
                .expect("a client task did not end after shutdown");
            match ended {
                Ok(why) => assert!(!why.contains("hung"), "{why}"),
                Err(e) => panic!("a client task failed: {e}"),
            }
        }
        // The silent client's socket is closed (its close frame may be stuck behind
        // deliveries it never read), and so is the half-open one.
        silent.read_until_closed().await;
        assert_eq!(half_open.recv().await, warren_tests::raw::Incoming::Closed);
        assert!(
            warren_tests::within(
                "a connect after shutdown",
                tokio::net::TcpStream::connect(addr)
            )
            .await
            .is_err(),
            "the listener is closed after shutdown"
        );
        drop(conns);
    });
    drop(runtime);
    let panicked: Vec<String> = PANICKED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|name| name.starts_with(SHUTDOWN_THREADS) || **name == test_thread)
        .cloned()
        .collect();
    assert!(panicked.is_empty(), "panics on {panicked:?}");
}
