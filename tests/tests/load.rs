//! Load (issue 5): many connections doing RPC at once while slow-loris clients hold half-open
//! connections, on the embedded broker or `AMQP_URL`.
//!
//! - [`two_hundred_connections_by_five_channels_of_rpc_complete_while_slow_loris_sockets_hang`]:
//!   200 connections, each with 5 [`RpcClient`]s (5 channels, 5 reply queues), make 4 calls
//!   each at once (4,000 calls) against 4 [`RpcServer`]s, while raw sockets sit in every stage
//!   of an unfinished handshake (nothing sent, part of the protocol header, the header then
//!   silence after connection.start, start-ok then silence after connection.tune): 12 opened
//!   before the clients connect, 24 right before the calls. Every call gets its own answer,
//!   none errs or times out (30 s per call), no client keeps anything pending or sees a late
//!   or unknown reply, and the servers answered exactly 4,000 requests.
//!   The same numbers run against RabbitMQ 3.10 (its default limits allow them: no connection
//!   or channel-count limit below these, 2047 channels per connection).
//! - [`embedded_only_slow_loris_sockets_are_closed_by_the_handshake_timeout_under_load`]: with a
//!   1 s handshake timeout, each half-open socket is closed by the broker 1 to 8 s after it
//!   connected (never before the timeout; the upper bound leaves room for 2 busy cores), while
//!   a smaller RPC load completes, and none of them is ever listed as a connection.

use futures_util::{StreamExt, future::join_all, stream};
use lapin::Connection;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Barrier;
use warren_harness::TestBroker;
use warren_rpc::{ClientConfig, HandlerError, RpcClient, RpcServer, ServerConfig};
use warren_tests::raw::{Handshake, Incoming, PROTOCOL_HEADER, RawClient};

// Every wait for the broker: the suite-wide bound.
use warren_tests::TIMEOUT as WAIT;

/// The timeout of each call: generous, 2 cores are shared by everything here.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How a slow-loris socket stops.
#[derive(Clone, Copy, Debug)]
enum Loris {
    /// Connects and sends nothing.
    Silent,
    /// Sends the first 5 bytes of the protocol header.
    PartialHeader,
    /// Sends the header, reads connection.start, then nothing.
    AfterStart,
    /// Answers start-ok, reads connection.tune, then nothing.
    AfterTune,
}

const LORIS: [Loris; 4] = [
    Loris::Silent,
    Loris::PartialHeader,
    Loris::AfterStart,
    Loris::AfterTune,
];

/// A half-open connection and how far it went.
struct SlowLoris {
    how: Loris,
    raw: RawClient,
    /// Just before the TCP connect.
    opened: Instant,
}

/// Opens a socket to the broker of `url` and leaves it half-way through the handshake.
async fn slow_loris(url: &str, how: Loris) -> SlowLoris {
    let opened = Instant::now();
    let raw = match how {
        Loris::Silent => RawClient::connect(url).await,
        Loris::PartialHeader => {
            let mut raw = RawClient::connect(url).await;
            raw.send_bytes(&PROTOCOL_HEADER[..5]).await;
            raw
        }
        Loris::AfterStart => {
            let mut raw = RawClient::connect(url).await;
            raw.send_bytes(PROTOCOL_HEADER).await;
            raw.recv_frame().await; // connection.start
            raw
        }
        Loris::AfterTune => {
            let mut raw = RawClient::connect(url).await;
            raw.start_and_tune(&Handshake::from_url(url)).await;
            raw
        }
    };
    SlowLoris { how, raw, opened }
}

/// Reads until the broker closes the socket; how long after it was opened, or `None` if it
/// is still open `limit` after that.
async fn closed_within(loris: &mut SlowLoris, limit: Duration) -> Option<Duration> {
    loop {
        let left = limit.checked_sub(loris.opened.elapsed())?;
        match loris.raw.recv_timeout(left).await? {
            Incoming::Closed => return Some(loris.opened.elapsed()),
            Incoming::Frame(_) => {}
        }
    }
}

/// The echo service: `re:` and the request.
async fn echo(request: Vec<u8>) -> Result<Vec<u8>, HandlerError> {
    let mut reply = b"re:".to_vec();
    reply.extend(request);
    Ok(reply)
}

/// RPC servers, connections and their clients, and the numbers of a run.
struct Load {
    servers: Vec<RpcServer>,
    conns: Vec<Connection>,
    clients: Vec<RpcClient>,
}

impl Load {
    async fn start(url: &str, queue: &str, servers: usize, conns: usize, channels: usize) -> Self {
        let mut started = Vec::new();
        for _ in 0..servers {
            let config = ServerConfig {
                queue: queue.to_owned(),
                prefetch: NonZeroU16::new(100).expect("non-zero"),
            };
            let server = tokio::time::timeout(WAIT, RpcServer::connect(url, config, echo))
                .await
                .expect("a server starts in time")
                .expect("a server starts");
            started.push(server);
        }
        // Connections and clients, 16 at a time.
        let opened: Vec<(Connection, Vec<RpcClient>)> = stream::iter(0..conns)
            .map(|i| async move {
                let conn = tokio::time::timeout(
                    WAIT,
                    Connection::connect(url, lapin::ConnectionProperties::default()),
                )
                .await
                .unwrap_or_else(|_| panic!("connection {i}: no handshake within {WAIT:?}"))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                let mut clients = Vec::new();
                for c in 0..channels {
                    let config = ClientConfig {
                        queue: queue.to_owned(),
                        timeout: CALL_TIMEOUT,
                    };
                    let client = tokio::time::timeout(WAIT, RpcClient::new(&conn, config))
                        .await
                        .unwrap_or_else(|_| panic!("client {i}.{c}: not ready within {WAIT:?}"))
                        .unwrap_or_else(|e| panic!("client {i}.{c}: {e}"));
                    clients.push(client);
                }
                (conn, clients)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut load = Self {
            servers: started,
            conns: Vec::new(),
            clients: Vec::new(),
        };
        for (conn, clients) in opened {
            load.conns.push(conn);
            load.clients.extend(clients);
        }
        load
    }

    /// Every client makes `calls` calls at once, all clients together; returns the number
    /// of calls answered, panicking on any wrong answer or error.
    async fn run(&self, calls: usize) -> usize {
        let barrier = Arc::new(Barrier::new(self.clients.len()));
        let tasks = self.clients.iter().enumerate().map(|(c, client)| {
            let client = client.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let calls = (0..calls).map(|k| {
                    let client = client.clone();
                    async move {
                        let body = format!("client{c}-call{k}");
                        (client.call(body.as_str()).await, body)
                    }
                });
                join_all(calls).await
            })
        });
        let mut answered = 0;
        for task in join_all(tasks).await {
            for (reply, body) in task.expect("a client task") {
                match reply {
                    Ok(reply) => assert_eq!(
                        reply,
                        format!("re:{body}").into_bytes(),
                        "the reply to {body}"
                    ),
                    Err(e) => panic!("call {body} failed: {e}"),
                }
                answered += 1;
            }
        }
        for (c, client) in self.clients.iter().enumerate() {
            let stats = client.stats();
            assert_eq!(
                (stats.pending, stats.late_replies, stats.unknown_replies),
                (0, 0, 0),
                "client {c}: {stats:?}"
            );
        }
        answered
    }

    /// Closes the clients, checks that the servers answered exactly `expected` requests, and
    /// shuts the servers down.
    async fn stop(self, expected: u64) {
        for client in &self.clients {
            client.close().await;
        }
        for conn in &self.conns {
            let _ = tokio::time::timeout(WAIT, conn.close(200, "OK".into())).await;
        }
        // A server counts a reply once its publish returned, which can be after the client
        // got it: wait for the count to settle, then it must be exact.
        let replies = || self.servers.iter().map(|s| s.stats().replies).sum::<u64>();
        let _ = warren_harness::try_wait_until("the servers count every reply", WAIT, async || {
            match replies() {
                n if n >= expected => Ok(()),
                n => Err(format!("{n} of {expected}")),
            }
        })
        .await;
        assert_eq!(replies(), expected, "requests answered by the servers");
        for server in self.servers {
            tokio::time::timeout(WAIT, server.shutdown())
                .await
                .expect("a server shuts down in time")
                .expect("a clean server shutdown");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connections_by_five_channels_of_rpc_complete_while_slow_loris_sockets_hang() {
    const CONNECTIONS: usize = 200;
    const CHANNELS: usize = 5;
    const CALLS: usize = 4;
    let broker = TestBroker::start().await;
    let queue = broker.unique_name("load-rpc");
    // Half-open sockets from the start; the broker may close them (handshake timeout) while
    // the clients connect, so a second wave opens right before the calls.
    let mut early = Vec::new();
    for i in 0..12 {
        early.push(slow_loris(broker.url(), LORIS[i % LORIS.len()]).await);
    }
    let started = Instant::now();
    let load = Load::start(broker.url(), &queue, 4, CONNECTIONS, CHANNELS).await;
    let ready = started.elapsed();
    let mut during = Vec::new();
    for i in 0..24 {
        during.push(slow_loris(broker.url(), LORIS[i % LORIS.len()]).await);
    }
    let calls_started = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(120), load.run(CALLS))
        .await
        .expect("4,000 calls within 120 s");
    let calls_took = calls_started.elapsed();
    assert_eq!(answered, CONNECTIONS * CHANNELS * CALLS);
    let mut still_open = 0;
    for l in &mut during {
        if l.raw.recv_timeout(Duration::ZERO).await.is_none() {
            still_open += 1;
        }
    }
    load.stop((CONNECTIONS * CHANNELS * CALLS) as u64).await;
    println!(
        "load: {answered} calls on {CONNECTIONS} connections x {CHANNELS} channels: clients ready \
         after {ready:.1?}, calls answered in {calls_took:.1?}; {} slow-loris sockets opened \
         before the calls, {still_open} still half-open after them",
        during.len()
    );
    drop((early, during));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(warren_external, ignore = "embedded only")]
async fn embedded_only_slow_loris_sockets_are_closed_by_the_handshake_timeout_under_load() {
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
    const LORIS_LIMIT: Duration = Duration::from_secs(8);
    let broker = TestBroker::start_embedded(warren_broker::BrokerConfig {
        handshake_timeout: HANDSHAKE_TIMEOUT,
        ..Default::default()
    })
    .await;
    let handle = broker.embedded().expect("embedded");
    let queue = broker.unique_name("load-loris");
    let load = Load::start(broker.url(), &queue, 2, 40, 5).await;
    let mut loris = Vec::new();
    for i in 0..40 {
        loris.push(slow_loris(broker.url(), LORIS[i % LORIS.len()]).await);
    }
    let (answered, lifetimes) = tokio::join!(
        load.run(4),
        join_all(
            loris
                .iter_mut()
                .map(|l| async { (l.how, closed_within(l, LORIS_LIMIT).await) })
        )
    );
    assert_eq!(answered, 40 * 5 * 4);
    // Each lives from its connect to the broker's timeout: at least the timeout, and not much
    // more (the bound leaves room for 2 shared cores).
    let wrong: Vec<String> = lifetimes
        .iter()
        .enumerate()
        .filter(|(_, (_, life))| !life.is_some_and(|l| l >= HANDSHAKE_TIMEOUT))
        .map(|(i, (how, life))| format!("socket {i} ({how:?}): closed after {life:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "half-open sockets must be closed between {HANDSHAKE_TIMEOUT:?} and {LORIS_LIMIT:?} \
         after they opened (None: still open):\n{}",
        wrong.join("\n")
    );
    assert_eq!(
        handle.connections().len(),
        2 + 40,
        "listed: the servers' and the clients' connections, never a half-open socket"
    );
    load.stop(40 * 5 * 4).await;
    // A prompt client is still welcome.
    let late = RawClient::open_on_channel(broker.url(), 1).await;
    late.close().await;
    let mut loris = slow_loris(broker.url(), Loris::AfterTune).await;
    let life = closed_within(&mut loris, LORIS_LIMIT).await;
    assert!(
        life.is_some_and(|l| l >= HANDSHAKE_TIMEOUT),
        "a later slow-loris socket is closed too (after {life:?})"
    );
}
