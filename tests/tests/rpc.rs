//! warren-rpc (issue 3) end to end: the fib RPC client and server against the test broker
//! (embedded Warren, or `AMQP_URL`): matching under load and out of order, prefetch,
//! timeouts, late and unknown replies, no route, expiration, remote errors, requests without
//! `reply_to`, a server killed mid-call, a connection dropped mid-call, graceful shutdown.
//!
//! Every test uses queues of its own (unique names) and deletes them; every network wait is
//! bounded by [`WAIT`]. "Killing" a server or dropping a client's connection goes through
//! [`Proxy`] (the harness's), a TCP relay the test can cut, so the broker sees a socket closing without any
//! AMQP close, as when a process dies.

use futures_util::future::join_all;
use lapin::{
    BasicProperties, Channel, Connection,
    options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use std::{
    collections::HashMap,
    num::NonZeroU16,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::{Barrier, mpsc, oneshot};
use warren_harness::{Proxy, TestBroker, connect_to, wait_until, within};
use warren_rpc::{
    ClientConfig, Handler, HandlerError, RpcClient, RpcError, RpcServer, ServerConfig,
    fib::{self, FibHandler},
};

// Every wait for the broker: the suite-wide bound.
use warren_tests::TIMEOUT as WAIT;

/// How long a test watches for something that must *not* happen (e.g. a second request
/// arriving past a prefetch of 1).
const QUIET_WINDOW: Duration = Duration::from_millis(300);

/// Waits until `condition` holds, failing the test after [`WAIT`]. For states with no event
/// to await (counters, queue depths).
async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    wait_until(what, WAIT, async || {
        if condition().await {
            Ok(())
        } else {
            Err("still false".into())
        }
    })
    .await;
}

/// One test's broker, request queue and an admin channel to inspect and clean up.
struct Fixture {
    broker: TestBroker,
    queue: String,
    admin: Channel,
    _admin_conn: Connection,
}

impl Fixture {
    async fn new(prefix: &str) -> Self {
        let broker = TestBroker::start().await;
        let queue = broker.unique_name(prefix);
        let admin_conn = broker.connect().await;
        let admin = within("admin channel", admin_conn.create_channel())
            .await
            .expect("admin channel");
        Self {
            broker,
            queue,
            admin,
            _admin_conn: admin_conn,
        }
    }

    fn server_config(&self, prefetch: u16) -> ServerConfig {
        ServerConfig {
            queue: self.queue.clone(),
            prefetch: NonZeroU16::new(prefetch).expect("prefetch >= 1"),
        }
    }

    fn client_config(&self) -> ClientConfig {
        ClientConfig {
            queue: self.queue.clone(),
            ..ClientConfig::default()
        }
    }

    /// A server on a connection of its own.
    async fn server(&self, prefetch: u16, handler: impl Handler) -> RpcServer {
        let conn = self.broker.connect().await;
        within(
            "server start",
            RpcServer::start(&conn, self.server_config(prefetch), handler),
        )
        .await
        .expect("server starts")
    }

    /// A client on a connection of its own.
    async fn client(&self) -> RpcClient {
        self.client_with(self.client_config()).await
    }

    async fn client_with(&self, config: ClientConfig) -> RpcClient {
        let conn = self.broker.connect().await;
        within("client start", RpcClient::new(&conn, config))
            .await
            .expect("client starts")
    }

    /// Declares the request queue as the server would (for tests without a server).
    async fn declare_queue(&self) {
        within(
            "queue.declare",
            self.admin.queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .expect("declare the request queue");
    }

    /// (ready messages, consumers) of the request queue.
    async fn queue_counts(&self) -> (u32, u32) {
        let queue = within(
            "passive queue.declare",
            self.admin.queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .expect("the request queue exists");
        (queue.message_count(), queue.consumer_count())
    }

    /// Publishes a raw message to `routing_key` on the default exchange.
    async fn publish_raw(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        within(
            "basic.publish",
            self.admin.basic_publish(
                ShortString::from(""),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            ),
        )
        .await
        .expect("publish");
    }

    /// Takes the next message of `queue` (no ack), waiting for one to arrive.
    async fn get(&self, queue: &str) -> lapin::message::BasicGetMessage {
        wait_until(&format!("a message in {queue}"), WAIT, async || {
            within(
                "basic.get",
                self.admin
                    .basic_get(queue.into(), BasicGetOptions { no_ack: true }),
            )
            .await
            .expect("basic.get")
            .ok_or_else(|| "the queue is empty".to_owned())
        })
        .await
    }

    /// Shuts the server down (it must stop cleanly), closes the client, deletes the queue.
    /// Like [`finish`](Self::finish), after checking that the server acked every request: a
    /// request left unacked would be back in the queue once the server's channel closed.
    async fn finish_all_acked(&self, server: RpcServer, client: RpcClient) {
        within("shutdown", server.shutdown())
            .await
            .expect("clean shutdown");
        assert_eq!(self.queue_counts().await, (0, 0), "all acked, no consumer");
        client.close().await;
        self.delete_queue().await;
    }

    async fn finish(&self, server: RpcServer, client: RpcClient) {
        within("shutdown", server.shutdown())
            .await
            .expect("clean shutdown");
        client.close().await;
        self.delete_queue().await;
    }

    async fn delete_queue(&self) {
        within(
            "queue.delete",
            self.admin
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default()),
        )
        .await
        .expect("delete the request queue");
    }
}

/// A test handler's switchboard: every request reports its body on arrival, is answered
/// `re:{body}`, and a request whose body starts with `hold` waits to be released first.
struct Switchboard {
    arrivals: mpsc::UnboundedSender<String>,
    gates: Mutex<HashMap<String, oneshot::Sender<()>>>,
}

struct Arrivals(mpsc::UnboundedReceiver<String>);

impl Arrivals {
    async fn next(&mut self) -> String {
        within("a request arriving at the handler", self.0.recv())
            .await
            .expect("handler alive")
    }

    /// Asserts that no request arrives for [`QUIET_WINDOW`].
    async fn assert_quiet(&mut self, why: &str) {
        if let Ok(body) = tokio::time::timeout(QUIET_WINDOW, self.0.recv()).await {
            panic!("{why}: request {body:?} arrived");
        }
    }
}

impl Switchboard {
    fn new() -> (Arc<Self>, Arrivals) {
        let (tx, rx) = mpsc::unbounded_channel();
        let board = Arc::new(Self {
            arrivals: tx,
            gates: Mutex::default(),
        });
        (board, Arrivals(rx))
    }

    fn release(&self, body: &str) {
        let gate = self.gates.lock().unwrap().remove(body);
        gate.unwrap_or_else(|| panic!("no request {body:?} is held"))
            .send(())
            .expect("the held request is still waiting");
    }

    fn handler(self: &Arc<Self>) -> impl Handler {
        let board = self.clone();
        move |request: Vec<u8>| {
            let board = board.clone();
            async move {
                let body = String::from_utf8(request).expect("test requests are UTF-8");
                let gate = body.starts_with("hold").then(|| {
                    let (tx, rx) = oneshot::channel();
                    board.gates.lock().unwrap().insert(body.clone(), tx);
                    rx
                });
                // The test may have stopped listening: that is fine.
                let _ = board.arrivals.send(body.clone());
                if let Some(gate) = gate {
                    let _ = gate.await;
                }
                Ok::<_, HandlerError>(format!("re:{body}").into_bytes())
            }
        }
    }
}

fn echo(body: &str) -> Vec<u8> {
    format!("re:{body}").into_bytes()
}

/// The client still works: a call with `body` gets the switchboard's answer.
async fn answers(client: &RpcClient, body: &str) {
    assert_eq!(within("call", client.call(body)).await, Ok(echo(body)));
}

/// Calls in one wave of [`answer_wave`].
const WAVE: usize = 10;

/// A wave of concurrent calls `{prefix}-0`, `{prefix}-1`, ...: each gets its answer.
async fn answer_wave(client: &RpcClient, prefix: &str) {
    let bodies: Vec<String> = (0..WAVE).map(|i| format!("{prefix}-{i}")).collect();
    join_all(bodies.iter().map(|body| answers(client, body))).await;
}

#[tokio::test]
async fn fib_over_rpc_is_exact_at_the_edges() {
    let f = Fixture::new("rpc-fib").await;
    let server = f.server(1, FibHandler).await;
    let client = f.client().await;
    for n in [0_u32, 1, 2, 30, 93, 94, 186] {
        let got = within("fib call", client.fib(u64::from(n))).await;
        assert_eq!(got, Ok(fib::fib(n).unwrap()), "fib({n})");
    }
    assert_eq!(
        within("fib call", client.fib(187)).await,
        Err(RpcError::Remote(
            fib::FibError::TooLarge("187".into()).to_string()
        ))
    );
    f.finish(server, client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_calls_from_eight_tasks_each_get_their_own_answer() {
    const TASKS: usize = 8;
    const CALLS_PER_TASK: usize = 125;
    let f = Fixture::new("rpc-load").await;
    let (board, _arrivals) = Switchboard::new();
    let server = f.server(64, board.handler()).await;
    let client = f.client().await;

    let tasks = (0..TASKS).map(|task| {
        let client = client.clone();
        tokio::spawn(async move {
            // All of this task's calls are in flight at once.
            let calls = (0..CALLS_PER_TASK).map(|i| {
                let client = client.clone();
                async move {
                    let body = format!("task{task}-call{i}");
                    (client.call(body.as_str()).await, body)
                }
            });
            join_all(calls).await
        })
    });
    let results = within("1000 calls", join_all(tasks)).await;
    let mut answered = 0;
    for task in results {
        for (reply, body) in task.expect("task ran") {
            assert_eq!(reply, Ok(echo(&body)), "reply to {body}");
            answered += 1;
        }
    }
    assert_eq!(answered, TASKS * CALLS_PER_TASK);
    let stats = client.stats();
    assert_eq!(
        (stats.pending, stats.late_replies, stats.unknown_replies),
        (0, 0, 0)
    );
    // The server counts a reply once its publish returns, which can be after the client has
    // it: wait for the count rather than race it.
    eventually("the server counted every reply", async || {
        server.stats().replies == (TASKS * CALLS_PER_TASK) as u64
    })
    .await;
    f.finish(server, client).await;
}

#[tokio::test]
async fn replies_in_reverse_order_are_matched_to_their_calls() {
    const CALLS: usize = 10;
    let f = Fixture::new("rpc-order").await;
    let (board, mut arrivals) = Switchboard::new();
    let server = f.server(CALLS as u16, board.handler()).await;
    let client = f.client().await;

    let mut calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let client = client.clone();
            Some(tokio::spawn(async move {
                client.call(format!("hold-{i}")).await
            }))
        })
        .collect();
    // All are held by the server at once (prefetch = CALLS)...
    let mut held = Vec::new();
    for _ in 0..CALLS {
        held.push(arrivals.next().await);
    }
    held.sort();
    let mut expected: Vec<_> = (0..CALLS).map(|i| format!("hold-{i}")).collect();
    expected.sort();
    assert_eq!(held, expected);
    // ...and answered last first: each reply reaches the client before the next is sent.
    for i in (0..CALLS).rev() {
        board.release(&format!("hold-{i}"));
        let call = calls[i].take().expect("each call awaited once");
        let reply = within("reply", call).await.expect("call task");
        assert_eq!(reply, Ok(echo(&format!("hold-{i}"))), "call {i}");
    }
    assert_eq!(client.stats().pending, 0);
    f.finish(server, client).await;
}

#[tokio::test]
async fn default_prefetch_of_one_serves_one_request_at_a_time() {
    let f = Fixture::new("rpc-prefetch1").await;
    let (board, mut arrivals) = Switchboard::new();
    assert_eq!(
        ServerConfig::default().prefetch.get(),
        1,
        "the seed's prefetch"
    );
    let conn = f.broker.connect().await;
    let config = ServerConfig {
        queue: f.queue.clone(),
        ..ServerConfig::default()
    };
    let server = within(
        "server start",
        RpcServer::start(&conn, config, board.handler()),
    )
    .await
    .expect("server starts");
    let client = f.client().await;

    let calls: Vec<_> = (0..3)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.call(format!("hold-{i}")).await })
        })
        .collect();
    for _ in 0..3 {
        let body = arrivals.next().await;
        arrivals
            .assert_quiet("a second request while one is unacked (prefetch 1)")
            .await;
        board.release(&body);
    }
    for call in calls {
        let reply = within("reply", call).await.expect("call task");
        assert!(reply.is_ok(), "{reply:?}");
    }
    f.finish(server, client).await;
}

#[tokio::test]
async fn a_prefetch_of_three_handles_exactly_three_requests_at_once() {
    const PREFETCH: usize = 3;
    let f = Fixture::new("rpc-prefetch3").await;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    // Nobody passes the barrier until PREFETCH requests are in the handler at once.
    let barrier = Arc::new(Barrier::new(PREFETCH));
    let handler = {
        let (in_flight, most, barrier) = (in_flight.clone(), most.clone(), barrier.clone());
        move |request: Vec<u8>| {
            let (in_flight, most, barrier) = (in_flight.clone(), most.clone(), barrier.clone());
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                barrier.wait().await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(request)
            }
        }
    };
    let server = f.server(PREFETCH as u16, handler).await;
    let client = f.client().await;
    let calls = (0..2 * PREFETCH).map(|i| client.call(format!("{i}")));
    let replies = within("calls", join_all(calls)).await;
    assert!(replies.iter().all(Result::is_ok), "{replies:?}");
    assert_eq!(
        most.load(Ordering::SeqCst),
        PREFETCH,
        "most requests at once"
    );
    f.finish(server, client).await;
}

#[tokio::test]
async fn a_timed_out_call_removes_its_entry_and_its_late_reply_is_counted() {
    let f = Fixture::new("rpc-timeout").await;
    let (board, mut arrivals) = Switchboard::new();
    let server = f.server(1, board.handler()).await;
    let client = f.client().await;
    let timeout = Duration::from_millis(300);

    let started = Instant::now();
    let outcome = within("call", client.call_with_timeout("hold-late", timeout)).await;
    assert_eq!(outcome, Err(RpcError::Timeout(timeout)));
    assert!(started.elapsed() >= timeout);
    assert_eq!(
        client.stats().pending,
        0,
        "the timed-out call left no entry"
    );
    assert_eq!(arrivals.next().await, "hold-late");

    board.release("hold-late");
    eventually("the late reply is counted", async || {
        client.stats().late_replies == 1
    })
    .await;
    assert_eq!(client.stats().unknown_replies, 0);
    answers(&client, "after").await;
    f.finish(server, client).await;
}

#[tokio::test]
async fn a_dropped_call_removes_its_entry_and_its_late_reply_is_counted() {
    let f = Fixture::new("rpc-cancel").await;
    let (board, mut arrivals) = Switchboard::new();
    let server = f.server(1, board.handler()).await;
    let client = f.client().await;

    {
        let call = client.call("hold-dropped");
        tokio::pin!(call);
        tokio::select! {
            outcome = &mut call => panic!("the held call ended: {outcome:?}"),
            body = arrivals.next() => assert_eq!(body, "hold-dropped"),
        }
        assert_eq!(client.stats().pending, 1);
        // The call future is dropped here: the caller gave up.
    }
    assert_eq!(client.stats().pending, 0, "the dropped call left no entry");

    board.release("hold-dropped");
    eventually("the late reply is counted", async || {
        client.stats().late_replies == 1
    })
    .await;
    answers(&client, "after").await;
    f.finish(server, client).await;
}

#[tokio::test]
async fn replies_with_unknown_correlation_ids_are_dropped_and_counted() {
    let f = Fixture::new("rpc-unknown").await;
    let (board, _arrivals) = Switchboard::new();
    let server = f.server(1, board.handler()).await;
    let client = f.client().await;

    let reply_queue = client.reply_queue().to_owned();
    let stranger = BasicProperties::default().with_correlation_id("not-one-of-ours".into());
    f.publish_raw(&reply_queue, b"1", stranger).await;
    f.publish_raw(&reply_queue, b"2", BasicProperties::default())
        .await;
    eventually("both stray replies are counted", async || {
        client.stats().unknown_replies == 2
    })
    .await;
    assert_eq!(client.stats().late_replies, 0);
    answers(&client, "after").await;
    f.finish(server, client).await;
}

#[tokio::test]
async fn a_missing_request_queue_fails_calls_at_once_with_no_route() {
    // No server and no queue of that name.
    let f = Fixture::new("rpc-noroute").await;
    let client = f
        .client_with(ClientConfig {
            timeout: Duration::from_secs(60),
            ..f.client_config()
        })
        .await;
    let started = Instant::now();
    let expected = Err(RpcError::NoRoute {
        queue: f.queue.clone(),
    });
    assert_eq!(within("call", client.call("1")).await, expected);
    // Many at once: each returned request fails its own call.
    let calls = (0..50).map(|i| client.call(format!("{i}")));
    for outcome in within("calls", join_all(calls)).await {
        assert_eq!(outcome, expected);
    }
    assert!(
        started.elapsed() < WAIT,
        "no route is reported at once, not after the 60 s timeout"
    );
    assert_eq!(client.stats().pending, 0);
    assert_eq!(client.closed(), None, "no route does not break the client");
    client.close().await;
}

#[tokio::test]
async fn a_queue_without_consumer_times_out_and_the_request_expires_unserved() {
    let f = Fixture::new("rpc-expire").await;
    f.declare_queue().await;
    let client = f.client().await;
    let timeout = Duration::from_millis(500);
    assert_eq!(
        within("call", client.call_with_timeout("hold-never", timeout)).await,
        Err(RpcError::Timeout(timeout)),
        "a queue that exists with no consumer is a timeout, not no route"
    );
    // The request carried expiration = 500 ms: it dies in the queue.
    eventually("the expired request leaves the queue", async || {
        f.queue_counts().await.0 == 0
    })
    .await;

    let (board, mut arrivals) = Switchboard::new();
    let server = f.server(1, board.handler()).await;
    assert_eq!(
        within("call", client.call("fresh")).await,
        Ok(echo("fresh"))
    );
    assert_eq!(
        arrivals.next().await,
        "fresh",
        "the expired request was never served"
    );
    f.finish(server, client).await;
}

#[tokio::test]
async fn bad_requests_get_remote_errors_and_the_server_keeps_serving() {
    let f = Fixture::new("rpc-errors").await;
    let server = f.server(1, FibHandler).await;
    let client = f.client().await;
    let bad: [(&[u8], fib::FibError); 7] = [
        (b"abc", fib::FibError::NotANumber("abc".into())),
        (b"-5", fib::FibError::Negative("-5".into())),
        (b"", fib::FibError::Empty),
        (&[0xff, 0xfe, 0x31], fib::FibError::NotUtf8),
        (b"187", fib::FibError::TooLarge("187".into())),
        (
            b"340282366920938463463374607431768211456",
            fib::FibError::TooLarge("340282366920938463463374607431768211456".into()),
        ),
        (b"1.5", fib::FibError::NotANumber("1.5".into())),
    ];
    for (body, error) in &bad {
        let outcome = within("call", client.call(*body)).await;
        assert_eq!(
            outcome,
            Err(RpcError::Remote(error.to_string())),
            "{body:?}"
        );
    }
    assert_eq!(within("call", client.fib(10)).await, Ok(55));
    eventually("the server counted every reply", async || {
        let stats = server.stats();
        (stats.error_replies, stats.replies) == (bad.len() as u64, 1)
    })
    .await;
    f.finish_all_acked(server, client).await;
}

#[tokio::test]
async fn a_panicking_handler_is_a_remote_error_not_a_crash() {
    let f = Fixture::new("rpc-panic").await;
    let handler = |request: Vec<u8>| async move {
        assert_ne!(request, b"boom", "the handler blows up");
        Ok::<_, HandlerError>(request)
    };
    let server = f.server(1, handler).await;
    let client = f.client().await;
    assert_eq!(
        within("call", client.call("boom")).await,
        Err(RpcError::Remote(
            "internal error: the handler panicked".into()
        ))
    );
    assert_eq!(
        within("call", client.call("fine")).await,
        Ok(b"fine".to_vec())
    );
    within("shutdown", server.shutdown())
        .await
        .expect("clean shutdown");
    assert_eq!(f.queue_counts().await, (0, 0), "both requests were acked");
    client.close().await;
    f.delete_queue().await;
}

#[tokio::test]
async fn a_request_without_reply_to_is_acked_and_dropped() {
    let f = Fixture::new("rpc-noreplyto").await;
    let (board, mut arrivals) = Switchboard::new();
    let server = f.server(1, board.handler()).await;
    let client = f.client().await;
    let no_reply_to = BasicProperties::default().with_correlation_id("orphan".into());
    f.publish_raw(&f.queue, b"orphan", no_reply_to).await;
    eventually("the orphan is dropped", async || {
        server.stats().dropped == 1
    })
    .await;
    answers(&client, "after").await;
    assert_eq!(
        arrivals.next().await,
        "after",
        "the handler never saw the orphan"
    );
    within("shutdown", server.shutdown())
        .await
        .expect("clean shutdown");
    assert_eq!(f.queue_counts().await, (0, 0), "the orphan was acked");
    client.close().await;
    f.delete_queue().await;
}

#[tokio::test]
async fn a_server_killed_mid_call_has_its_request_served_by_another() {
    let f = Fixture::new("rpc-kill").await;
    let proxy = Proxy::start(f.broker.url()).await;
    let (doomed_board, mut doomed_arrivals) = Switchboard::new();
    let doomed = within(
        "server start",
        RpcServer::start(
            &connect_to(proxy.url()).await,
            f.server_config(1),
            doomed_board.handler(),
        ),
    )
    .await
    .expect("server starts");
    let client = f
        .client_with(ClientConfig {
            timeout: 3 * WAIT,
            ..f.client_config()
        })
        .await;

    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call("hold-1").await }
    });
    assert_eq!(doomed_arrivals.next().await, "hold-1");
    // A second server, then the first dies holding the request: it is redelivered.
    let (board, mut arrivals) = Switchboard::new();
    let survivor = f.server(1, board.handler()).await;
    proxy.sever_all();
    assert_eq!(arrivals.next().await, "hold-1");
    board.release("hold-1");
    let reply = within("reply from the survivor", call)
        .await
        .expect("call task");
    assert_eq!(reply, Ok(echo("hold-1")));
    drop(doomed);
    within("shutdown", survivor.shutdown())
        .await
        .expect("clean shutdown");
    client.close().await;
    f.delete_queue().await;
}

#[tokio::test]
async fn a_server_killed_mid_call_with_no_other_server_means_a_timeout() {
    let f = Fixture::new("rpc-kill-alone").await;
    let proxy = Proxy::start(f.broker.url()).await;
    let (board, mut arrivals) = Switchboard::new();
    let doomed = within(
        "server start",
        RpcServer::start(
            &connect_to(proxy.url()).await,
            f.server_config(1),
            board.handler(),
        ),
    )
    .await
    .expect("server starts");
    let client = f.client().await;
    let timeout = Duration::from_secs(2);

    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call_with_timeout("hold-1", timeout).await }
    });
    assert_eq!(arrivals.next().await, "hold-1");
    proxy.sever_all();
    let outcome = within("the call ends", call).await.expect("call task");
    assert_eq!(outcome, Err(RpcError::Timeout(timeout)));
    drop(doomed);
    // The request went back to the queue and expires there unserved.
    eventually("the requeued request expires", async || {
        f.queue_counts().await == (0, 0)
    })
    .await;
    client.close().await;
    f.delete_queue().await;
}

#[tokio::test]
async fn a_dropped_connection_fails_every_pending_call_promptly() {
    const CALLS: usize = 5;
    let f = Fixture::new("rpc-connlost").await;
    let (board, mut arrivals) = Switchboard::new();
    let server = f.server(CALLS as u16, board.handler()).await;
    let proxy = Proxy::start(f.broker.url()).await;
    let long = Duration::from_secs(60);
    let client = within(
        "client start",
        RpcClient::new(
            &connect_to(proxy.url()).await,
            ClientConfig {
                timeout: long,
                ..f.client_config()
            },
        ),
    )
    .await
    .expect("client starts");

    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.call(format!("hold-{i}")).await })
        })
        .collect();
    for _ in 0..CALLS {
        arrivals.next().await;
    }
    assert_eq!(client.stats().pending, CALLS);
    let started = Instant::now();
    proxy.sever_all();
    for call in calls {
        let outcome = within("the call fails", call).await.expect("call task");
        assert!(
            matches!(outcome, Err(RpcError::ConnectionLost(_))),
            "{outcome:?}"
        );
    }
    assert!(
        started.elapsed() < WAIT,
        "failed promptly, not after {long:?}"
    );
    assert!(matches!(client.closed(), Some(RpcError::ConnectionLost(_))));
    assert_eq!(client.stats().pending, 0);
    let after = within("a call on the lost client", client.call("x")).await;
    assert!(
        matches!(after, Err(RpcError::ConnectionLost(_))),
        "new calls fail fast: {after:?}"
    );

    // The server answers the held requests into the void (their reply queue died with the
    // connection), which frees its prefetch; a client rebuilt on a new connection works.
    for i in 0..CALLS {
        board.release(&format!("hold-{i}"));
    }
    let rebuilt = f.client().await;
    assert_eq!(
        within("call", rebuilt.call("again")).await,
        Ok(echo("again")),
        "a call on the rebuilt client"
    );
    within("shutdown", server.shutdown())
        .await
        .expect("clean shutdown");
    rebuilt.close().await;
    f.delete_queue().await;
}

#[tokio::test]
async fn a_closed_client_fails_calls_at_once() {
    let f = Fixture::new("rpc-closed").await;
    let client = f.client().await;
    client.close().await;
    let outcome = within("call", client.call("1")).await;
    assert!(
        matches!(outcome, Err(RpcError::ConnectionLost(_))),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn graceful_shutdown_stops_consuming_and_finishes_requests_in_flight() {
    const CALLS: usize = 4;
    let f = Fixture::new("rpc-shutdown").await;
    let (board, mut arrivals) = Switchboard::new();
    let server = f.server(CALLS as u16, board.handler()).await;
    let client = f.client().await;
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.call(format!("hold-{i}")).await })
        })
        .collect();
    for _ in 0..CALLS {
        arrivals.next().await;
    }

    let shutdown = tokio::spawn(server.shutdown());
    eventually("the consumer is cancelled", async || {
        f.queue_counts().await.1 == 0
    })
    .await;
    assert!(!shutdown.is_finished(), "requests are still in flight");
    for i in 0..CALLS {
        board.release(&format!("hold-{i}"));
    }
    for (i, call) in calls.into_iter().enumerate() {
        let reply = within("reply", call).await.expect("call task");
        assert_eq!(reply, Ok(echo(&format!("hold-{i}"))));
    }
    within("shutdown", shutdown)
        .await
        .expect("shutdown task")
        .expect("clean shutdown");
    assert_eq!(f.queue_counts().await, (0, 0), "all acked, no consumer");
    client.close().await;
    f.delete_queue().await;
}

#[tokio::test]
async fn requests_answered_past_a_held_one_are_acked_at_once_and_all_acks_are_valid() {
    // The server folds a run of answered requests into one `multiple` ack. Requests answered
    // while an earlier one is still running must be acked anyway (else they would hold the
    // prefetch credit), and no `multiple` ack may cover the running one (RabbitMQ would also
    // close the channel with 406 for an ack of an already acked tag).
    const PREFETCH: u16 = 3;
    const FAST_CALLS: usize = 50;
    let f = Fixture::new("rpc-ack-fold").await;
    let (board, mut arrivals) = Switchboard::new();
    let server = f.server(PREFETCH, board.handler()).await;
    let client = f.client().await;
    let held = {
        let client = client.clone();
        tokio::spawn(async move { client.call("hold-first").await })
    };
    assert_eq!(arrivals.next().await, "hold-first");
    // Many more calls than the prefetch, in waves of concurrent calls: each is served only if
    // the broker got the acks of those before it, while `hold-first` holds one credit.
    for wave in 0..FAST_CALLS / WAVE {
        answer_wave(&client, &format!("fast-{wave}")).await;
    }
    assert!(!held.is_finished(), "the held request is still running");
    board.release("hold-first");
    let reply = within("reply", held).await.expect("call task");
    assert_eq!(reply, Ok(echo("hold-first")));
    // One more run after the gap closed.
    answer_wave(&client, "after").await;
    // The server counts a reply once its publish returns, which may be after the reply arrived.
    eventually("every reply counted", async || {
        server.stats().replies == (1 + FAST_CALLS + WAVE) as u64
    })
    .await;
    // A bad ack would have closed the server's channel: shutdown would fail, and the
    // requests left unacked would be back in the queue.
    f.finish_all_acked(server, client).await;
}

#[tokio::test]
async fn requests_carry_reply_to_correlation_id_and_expiration() {
    let f = Fixture::new("rpc-wire-request").await;
    f.declare_queue().await;
    let client = f.client().await;
    let timeout = Duration::from_millis(7_500);
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call_with_timeout("7", timeout).await }
    });
    // Play the server by hand.
    let request = f.get(&f.queue).await;
    assert_eq!(request.delivery.data, b"7");
    assert_eq!(
        request.delivery.exchange.as_str(),
        "",
        "the default exchange"
    );
    assert_eq!(request.delivery.routing_key.as_str(), f.queue);
    let properties = &request.delivery.properties;
    assert_eq!(
        properties.reply_to().as_ref().map(ShortString::as_str),
        Some(client.reply_queue())
    );
    assert_eq!(
        properties.expiration().as_ref().map(ShortString::as_str),
        Some("7500"),
        "expiration = the call's timeout in ms"
    );
    let correlation_id = properties
        .correlation_id()
        .clone()
        .expect("a correlation_id");
    let reply = BasicProperties::default().with_correlation_id(correlation_id);
    f.publish_raw(client.reply_queue(), b"13", reply).await;
    let outcome = within("the call", call).await.expect("call task");
    assert_eq!(outcome, Ok(b"13".to_vec()));
    client.close().await;
    f.delete_queue().await;
}

#[tokio::test]
async fn replies_copy_the_correlation_id_and_errors_carry_the_error_header() {
    let f = Fixture::new("rpc-wire-reply").await;
    let server = f.server(1, FibHandler).await;
    // Play the client by hand, with a reply queue of its own.
    let reply_queue = f.broker.unique_name("rpc-wire-replies");
    within(
        "queue.declare",
        f.admin.queue_declare(
            reply_queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare the reply queue");
    let request = |correlation_id: &str| {
        BasicProperties::default()
            .with_reply_to(reply_queue.as_str().into())
            .with_correlation_id(correlation_id.into())
    };

    f.publish_raw(&f.queue, b"10", request("c-1")).await;
    let reply = f.get(&reply_queue).await;
    assert_eq!(reply.delivery.data, b"55");
    assert_eq!(reply.delivery.exchange.as_str(), "", "the default exchange");
    let properties = &reply.delivery.properties;
    assert_eq!(
        properties
            .correlation_id()
            .as_ref()
            .map(ShortString::as_str),
        Some("c-1")
    );
    let has_error_header = properties
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(warren_rpc::ERROR_HEADER));
    assert!(!has_error_header, "a result carries no error header");

    f.publish_raw(&f.queue, b"abc", request("c-2")).await;
    let reply = f.get(&reply_queue).await;
    let message = fib::FibError::NotANumber("abc".into()).to_string();
    assert_eq!(
        reply.delivery.data,
        message.as_bytes(),
        "body = the message"
    );
    let properties = &reply.delivery.properties;
    assert_eq!(
        properties
            .correlation_id()
            .as_ref()
            .map(ShortString::as_str),
        Some("c-2")
    );
    let header = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(warren_rpc::ERROR_HEADER).cloned());
    assert_eq!(
        header,
        Some(AMQPValue::LongString(message.as_str().into())),
        "header {} = the message",
        warren_rpc::ERROR_HEADER
    );
    within("shutdown", server.shutdown())
        .await
        .expect("clean shutdown");
    f.delete_queue().await;
}

#[tokio::test]
async fn a_dropped_server_leaves_its_request_to_the_next_server() {
    let f = Fixture::new("rpc-drop-server").await;
    let (doomed_board, mut doomed_arrivals) = Switchboard::new();
    let doomed = f.server(1, doomed_board.handler()).await;
    let client = f.client().await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call("hold-1").await }
    });
    assert_eq!(doomed_arrivals.next().await, "hold-1");
    // Dropping aborts: the request is neither answered nor acked, so it is requeued.
    drop(doomed);
    let (board, mut arrivals) = Switchboard::new();
    let survivor = f.server(1, board.handler()).await;
    assert_eq!(arrivals.next().await, "hold-1");
    board.release("hold-1");
    let reply = within("reply from the survivor", call)
        .await
        .expect("call task");
    assert_eq!(reply, Ok(echo("hold-1")));
    within("shutdown", survivor.shutdown())
        .await
        .expect("clean shutdown");
    client.close().await;
    f.delete_queue().await;
}
