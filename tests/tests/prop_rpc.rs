//! Property test of the RPC client's correlation (issue 4), on the embedded broker or
//! `AMQP_URL`.
//!
//! For a generated workload (1 to 200 concurrent calls on one [`RpcClient`]) a hand-written
//! test server on lapin (not [`warren_rpc::RpcServer`]) collects every request, then answers in
//! a generated order with generated delays, mixing in generated extra replies: duplicates of
//! replies already sent, replies with a foreign correlation id, with none at all, and with an id
//! of the client's own form that it never issued. A generated subset of the calls gets a short
//! timeout and is answered only once the call has returned its timeout (a stale reply), and
//! some calls are answered with a remote error.
//!
//! Checked, for every generated workload:
//! - every call ends with exactly its own outcome: its own reply body (which names the call), its
//!   own remote error, or its own timeout; never another call's reply;
//! - nothing is pending once the calls have ended;
//! - `late_replies` equals the stale and duplicated replies sent, `unknown_replies` equals the
//!   foreign, id-less and never-issued ones, exactly: a final "sentinel" call, answered after
//!   everything else on the same channel, proves every earlier reply has been routed.
//!
//! Cases: 64 on the embedded broker, 16 against RabbitMQ (`PROPTEST_CASES` overrides);
//! `PROPTEST_RNG_SEED` replays a run.

use futures_util::{StreamExt, future::join_all};
use lapin::{
    BasicProperties, Channel, Consumer,
    options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::watch;
use warren_harness::TestBroker;
use warren_rpc::{ClientConfig, ERROR_HEADER, RpcClient, RpcError};
use warren_tests::prop::run_property;

/// The timeout of calls that must be answered: far above anything a healthy run needs.
const ANSWERED_TIMEOUT: Duration = Duration::from_secs(20);

// Every wait for the broker: the suite-wide bound.
use warren_tests::TIMEOUT as WAIT;

/// A whole case, calls and checks, must end within this.
const CASE_LIMIT: Duration = Duration::from_secs(60);

/// The timeout of the calls meant to time out. Their requests reach the test server at once
/// (it consumes without a prefetch limit), so the `expiration` they carry never bites.
fn short_timeout() -> Duration {
    if warren_harness::external_url().is_some() {
        Duration::from_millis(100)
    } else {
        Duration::from_millis(50)
    }
}

/// How the server treats one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Answered with a body naming the call.
    Reply,
    /// Answered with an error reply (the `x-rpc-error` header) naming the call.
    Remote,
    /// Called with a short timeout; answered only after the call has returned its timeout.
    TimeOut,
}

/// An extra reply the server sends.
#[derive(Clone, Copy, Debug)]
enum Inject {
    /// A correlation id the client never made (another client's form).
    Foreign,
    /// No correlation id at all.
    NoCorrelationId,
    /// The client's own id form with a sequence number it never reached.
    NeverIssued,
    /// The reply of call `k % n` again, after the original.
    Duplicate(usize),
}

#[derive(Clone, Debug)]
struct Workload {
    fates: Vec<Fate>,
    /// The order the server answers the calls in: a permutation of `0..n`.
    order: Vec<usize>,
    /// Milliseconds the server waits before each answer of `order` (mostly 0).
    delays: Vec<u8>,
    /// Extra replies, each before the answer at that position of `order` (`n`: at the end).
    injections: Vec<(usize, Inject)>,
}

fn workload() -> impl Strategy<Value = Workload> {
    prop_oneof![1..=12usize, 1..=200usize].prop_flat_map(|n| {
        let fate = prop_oneof![
            8 => Just(Fate::Reply),
            1 => Just(Fate::Remote),
            1 => Just(Fate::TimeOut),
        ];
        let delay = prop_oneof![12 => Just(0u8), 1 => 1u8..=6];
        let inject = prop_oneof![
            1 => Just(Inject::Foreign),
            1 => Just(Inject::NoCorrelationId),
            1 => Just(Inject::NeverIssued),
            2 => any::<usize>().prop_map(Inject::Duplicate),
        ];
        (
            prop::collection::vec(fate, n),
            Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
            prop::collection::vec(delay, n),
            prop::collection::vec((0..=n, inject), 0..=16),
        )
            .prop_map(|(fates, order, delays, injections)| Workload {
                fates,
                order,
                delays,
                injections,
            })
    })
}

/// One thing the server does, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Waits this long, then answers the call (after its timeout for a `TimeOut` call).
    Answer {
        call: usize,
        delay_ms: u8,
    },
    /// Sends the call's reply again.
    Duplicate(usize),
    Foreign(usize),
    NoCorrelationId,
    NeverIssued,
}

/// The server's script and the counters it must leave on the client.
fn script(w: &Workload) -> (Vec<Step>, u64, u64) {
    let n = w.fates.len();
    let mut injections: Vec<(usize, Inject)> = w.injections.clone();
    injections.sort_by_key(|(at, _)| *at); // stable: generated order within one position
    let mut answered = vec![false; n];
    let mut deferred: Vec<usize> = vec![0; n];
    let mut steps = Vec::new();
    let (mut late, mut unknown) = (0u64, 0u64);
    let mut next = injections.into_iter().peekable();
    for at in 0..=n {
        while let Some((_, inject)) = next.next_if(|(p, _)| *p == at) {
            match inject {
                Inject::Foreign => {
                    steps.push(Step::Foreign(steps.len()));
                    unknown += 1;
                }
                Inject::NoCorrelationId => {
                    steps.push(Step::NoCorrelationId);
                    unknown += 1;
                }
                Inject::NeverIssued => {
                    steps.push(Step::NeverIssued);
                    unknown += 1;
                }
                Inject::Duplicate(k) => {
                    let call = k % n;
                    if answered[call] {
                        steps.push(Step::Duplicate(call));
                    } else {
                        deferred[call] += 1;
                    }
                    late += 1;
                }
            }
        }
        if at < n {
            let call = w.order[at];
            steps.push(Step::Answer {
                call,
                delay_ms: w.delays[at],
            });
            answered[call] = true;
            if w.fates[call] == Fate::TimeOut {
                late += 1;
            }
            for _ in 0..deferred[call] {
                steps.push(Step::Duplicate(call));
            }
            deferred[call] = 0;
        }
    }
    (steps, late, unknown)
}

/// A request as the server saw it.
struct Request {
    reply_to: ShortString,
    correlation_id: ShortString,
}

/// The test server: collects the `n` requests, plays the script, then answers the sentinel.
struct TestServer {
    channel: Channel,
    consumer: Consumer,
    nonce: String,
    fates: Vec<Fate>,
}

impl TestServer {
    fn reply_body(&self, call: usize) -> String {
        format!("answer-{call}-{}", self.nonce)
    }

    fn error_message(&self, call: usize) -> String {
        format!("error-{call}-{}", self.nonce)
    }

    async fn next_request(&mut self) -> Result<(String, Request), String> {
        let delivery = tokio::time::timeout(WAIT, self.consumer.next())
            .await
            .map_err(|_| format!("no request within {WAIT:?}"))?
            .ok_or("the request consumer ended")?
            .map_err(|e| format!("request consumer: {e}"))?;
        let body = String::from_utf8(delivery.data).map_err(|e| e.to_string())?;
        let props = delivery.properties;
        let request = Request {
            reply_to: props.reply_to().clone().ok_or("request without reply_to")?,
            correlation_id: props
                .correlation_id()
                .clone()
                .ok_or("request without correlation_id")?,
        };
        Ok((body, request))
    }

    async fn send(
        &self,
        reply_to: &ShortString,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), String> {
        tokio::time::timeout(
            WAIT,
            self.channel.basic_publish(
                "".into(),
                reply_to.clone(),
                BasicPublishOptions::default(),
                body,
                props,
            ),
        )
        .await
        .map_err(|_| "publishing a reply timed out".to_owned())?
        .map_err(|e| format!("publishing a reply: {e}"))?;
        Ok(())
    }

    /// The reply of `call`, as the original answer and every duplicate send it.
    async fn answer(&self, call: usize, request: &Request) -> Result<(), String> {
        let props = BasicProperties::default().with_correlation_id(request.correlation_id.clone());
        match self.fates[call] {
            Fate::Remote => {
                let message = self.error_message(call);
                let mut headers = FieldTable::default();
                headers.insert(
                    ERROR_HEADER.into(),
                    AMQPValue::LongString(message.as_str().into()),
                );
                let props = props
                    .with_headers(headers)
                    .with_content_type("text/plain".into());
                self.send(&request.reply_to, message.as_bytes(), props)
                    .await
            }
            Fate::Reply | Fate::TimeOut => {
                let body = self.reply_body(call);
                self.send(&request.reply_to, body.as_bytes(), props).await
            }
        }
    }

    async fn run(
        mut self,
        steps: Vec<Step>,
        mut timed_out: watch::Receiver<HashSet<usize>>,
    ) -> Result<(), String> {
        let n = self.fates.len();
        let mut requests: HashMap<usize, Request> = HashMap::new();
        while requests.len() < n {
            let (body, request) = self.next_request().await?;
            let call: usize = body
                .strip_prefix("call-")
                .and_then(|i| i.parse().ok())
                .filter(|&i| i < n)
                .ok_or_else(|| format!("unexpected request {body:?}"))?;
            if requests.insert(call, request).is_some() {
                return Err(format!("request of call {call} received twice"));
            }
        }
        let any = requests.values().next().expect("n >= 1");
        let reply_to = any.reply_to.clone();
        // The client's ids are "<prefix><sequence number>": one it never reached is unknown.
        let prefix = any
            .correlation_id
            .as_str()
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .to_owned();
        for step in steps {
            match step {
                Step::Answer { call, delay_ms } => {
                    if delay_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(delay_ms.into())).await;
                    }
                    if self.fates[call] == Fate::TimeOut {
                        // Stale: only once the call has returned its timeout.
                        tokio::time::timeout(WAIT, timed_out.wait_for(|s| s.contains(&call)))
                            .await
                            .map_err(|_| format!("call {call} did not time out within {WAIT:?}"))?
                            .map_err(|_| "the driver is gone")?;
                    }
                    self.answer(call, &requests[&call]).await?;
                }
                Step::Duplicate(call) => self.answer(call, &requests[&call]).await?,
                Step::Foreign(k) => {
                    let props = BasicProperties::default()
                        .with_correlation_id(format!("0123456789abcdef.{k}").into());
                    self.send(&reply_to, b"foreign", props).await?;
                }
                Step::NoCorrelationId => {
                    self.send(&reply_to, b"no id", BasicProperties::default())
                        .await?;
                }
                Step::NeverIssued => {
                    let props = BasicProperties::default()
                        .with_correlation_id(format!("{prefix}4000000000").into());
                    self.send(&reply_to, b"never issued", props).await?;
                }
            }
        }
        // The sentinel: its reply is the last on the channel, so the client has routed every
        // reply above once it gets this one.
        let (body, request) = self.next_request().await?;
        if body != "sentinel" {
            return Err(format!("expected the sentinel request, got {body:?}"));
        }
        let answer = format!("sentinel-{}", self.nonce);
        let props = BasicProperties::default().with_correlation_id(request.correlation_id);
        self.send(&request.reply_to, answer.as_bytes(), props).await
    }
}

/// One generated workload against the broker; `Err` says what went wrong.
async fn run_case(broker: &TestBroker, w: Workload) -> Result<(), String> {
    let n = w.fates.len();
    let (steps, expected_late, expected_unknown) = script(&w);
    let nonce = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let queue = broker.unique_name("prop-rpc");

    let server_conn = broker.connect().await;
    let channel = server_conn
        .create_channel()
        .await
        .map_err(|e| format!("server channel: {e}"))?;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("declare {queue}: {e}"))?;
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("consume {queue}: {e}"))?;
    let server = TestServer {
        channel: channel.clone(),
        consumer,
        nonce: nonce.clone(),
        fates: w.fates.clone(),
    };
    let (timed_out_tx, timed_out_rx) = watch::channel(HashSet::new());
    let server = tokio::spawn(server.run(steps, timed_out_rx));

    let client_conn = broker.connect().await;
    let client = RpcClient::new(
        &client_conn,
        ClientConfig {
            queue: queue.clone(),
            timeout: ANSWERED_TIMEOUT,
        },
    )
    .await
    .map_err(|e| format!("client: {e}"))?;

    let short = short_timeout();
    let calls = (0..n).map(|i| {
        let client = client.clone();
        let fate = w.fates[i];
        let timed_out_tx = &timed_out_tx;
        async move {
            let timeout = if fate == Fate::TimeOut {
                short
            } else {
                ANSWERED_TIMEOUT
            };
            let outcome = client.call_with_timeout(format!("call-{i}"), timeout).await;
            if fate == Fate::TimeOut {
                timed_out_tx.send_modify(|s| {
                    s.insert(i);
                });
            }
            outcome
        }
    });
    let outcomes = join_all(calls).await;

    let mut wrong = Vec::new();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let expected = match w.fates[i] {
            Fate::Reply => Ok(format!("answer-{i}-{nonce}").into_bytes()),
            Fate::Remote => Err(RpcError::Remote(format!("error-{i}-{nonce}"))),
            Fate::TimeOut => Err(RpcError::Timeout(short)),
        };
        if outcome != expected {
            let shown = outcome
                .as_ref()
                .map(|body| String::from_utf8_lossy(body).into_owned());
            wrong.push(format!(
                "call {i} ({:?}): got {shown:?}, expected its own outcome",
                w.fates[i]
            ));
        }
    }
    if !wrong.is_empty() {
        return Err(format!(
            "{} of {n} calls ended wrongly:\n{}",
            wrong.len(),
            wrong.join("\n")
        ));
    }
    let pending = client.stats().pending;
    if pending != 0 {
        return Err(format!(
            "{pending} calls still pending after every call ended"
        ));
    }

    let sentinel = client.call("sentinel").await;
    if sentinel != Ok(format!("sentinel-{nonce}").into_bytes()) {
        return Err(format!("sentinel call: {sentinel:?}"));
    }
    match tokio::time::timeout(WAIT, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(format!("test server: {e}")),
        Ok(Err(e)) => return Err(format!("test server task: {e}")),
        Err(_) => return Err("the test server did not finish".into()),
    }
    let stats = client.stats();
    if (stats.pending, stats.late_replies, stats.unknown_replies)
        != (0, expected_late, expected_unknown)
    {
        return Err(format!(
            "client stats {stats:?}, expected pending 0, late_replies {expected_late}, \
             unknown_replies {expected_unknown}"
        ));
    }

    client.close().await;
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = server_conn.close(200, "OK".into()).await;
    let _ = client_conn.close(200, "OK".into()).await;
    Ok(())
}

#[test]
fn every_call_gets_exactly_its_own_reply_error_or_timeout_whatever_the_server_does() {
    run_property((64, 16), 64, CASE_LIMIT, workload(), run_case);
}

#[test]
fn the_script_counts_what_the_client_must_see() {
    // The expected counters are part of the oracle: pin the script builder on a small case.
    let w = Workload {
        fates: vec![Fate::Reply, Fate::TimeOut, Fate::Remote],
        order: vec![2, 0, 1],
        delays: vec![0, 3, 0],
        injections: vec![
            (0, Inject::Duplicate(1)),
            (1, Inject::Foreign),
            (3, Inject::NoCorrelationId),
            (3, Inject::Duplicate(5)),
            (2, Inject::NeverIssued),
        ],
    };
    let (steps, late, unknown) = script(&w);
    assert_eq!(
        steps,
        vec![
            Step::Answer {
                call: 2,
                delay_ms: 0
            },
            Step::Foreign(1),
            Step::Answer {
                call: 0,
                delay_ms: 3
            },
            Step::NeverIssued,
            Step::Answer {
                call: 1,
                delay_ms: 0
            },
            Step::Duplicate(1),
            Step::NoCorrelationId,
            Step::Duplicate(2),
        ]
    );
    // Late: call 1's stale answer and two duplicates; unknown: three injections.
    assert_eq!((late, unknown), (3, 3));
}
