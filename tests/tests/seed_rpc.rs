//! The RPC flow of the seed (RabbitMQ's RPC tutorial), through lapin: a fib server consuming a
//! request queue with prefetch 1 and replying to `reply_to` with the request's
//! `correlation_id`; a client with an exclusive server-named reply queue.

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::{FieldTable, ShortString},
};
use std::collections::HashMap;
use tokio::task::JoinHandle;
use warren_harness::{TestBroker, wait_until};
use warren_tests::{
    TIMEOUT, channel, close_conn, declare_with, delete_quietly, publish_with, within,
};

fn fib(n: u64) -> u64 {
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..n {
        (a, b) = (b, a + b);
    }
    a
}

/// Starts a fib server on `rpc_queue` (declared by the caller): prefetch 1, one reply per
/// request, ack after replying. Returns when its consumer is ready; the task ends when its
/// connection closes. It counts the requests it served.
async fn start_server(conn: &Connection, rpc_queue: &str) -> JoinHandle<usize> {
    let ch = channel(conn).await;
    within("qos", ch.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("prefetch 1");
    let mut requests = within(
        "consume",
        ch.basic_consume(
            rpc_queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("server consume");
    tokio::spawn(async move {
        let mut served = 0;
        while let Some(Ok(req)) = requests.next().await {
            let n: u64 = std::str::from_utf8(&req.data)
                .expect("utf8 request")
                .parse()
                .expect("a number");
            let reply_to = req
                .properties
                .reply_to()
                .clone()
                .expect("requests carry reply_to");
            let mut props = BasicProperties::default();
            if let Some(corr) = req.properties.correlation_id() {
                props = props.with_correlation_id(corr.clone());
            }
            let published = ch
                .basic_publish(
                    "".into(),
                    reply_to,
                    Default::default(),
                    fib(n).to_string().as_bytes(),
                    props,
                )
                .await;
            if published.is_err() {
                break;
            }
            if req.acker.ack(BasicAckOptions::default()).await.is_err() {
                break;
            }
            served += 1;
        }
        served
    })
}

/// An RPC client: exclusive server-named reply queue and a consumer on it.
struct Client {
    ch: lapin::Channel,
    reply_queue: String,
    replies: lapin::Consumer,
}

impl Client {
    async fn new(conn: &Connection) -> Self {
        let ch = channel(conn).await;
        let q = declare_with(
            &ch,
            "",
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exclusive server-named reply queue");
        let reply_queue = q.name().as_str().to_owned();
        assert!(reply_queue.starts_with("amq.gen-"));
        let replies = within(
            "consume replies",
            ch.basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .expect("consume the reply queue");
        Self {
            ch,
            reply_queue,
            replies,
        }
    }

    async fn send(&self, rpc_queue: &str, n: u64) -> String {
        let corr = uuid::Uuid::new_v4().to_string();
        publish_with(
            &self.ch,
            rpc_queue,
            n.to_string().as_bytes(),
            BasicProperties::default()
                .with_reply_to(self.reply_queue.as_str().into())
                .with_correlation_id(ShortString::from(corr.clone())),
        )
        .await;
        corr
    }

    /// The next reply: (correlation_id, body).
    async fn reply(&mut self) -> (String, u64) {
        let d = within("an RPC reply", self.replies.next())
            .await
            .expect("reply consumer ended")
            .expect("reply consumer error");
        let corr = d
            .properties
            .correlation_id()
            .as_ref()
            .expect("replies carry correlation_id")
            .to_string();
        let value = std::str::from_utf8(&d.data)
            .expect("utf8")
            .parse()
            .expect("number");
        (corr, value)
    }

    async fn call(&mut self, rpc_queue: &str, n: u64) -> u64 {
        let corr = self.send(rpc_queue, n).await;
        let (got, value) = self.reply().await;
        assert_eq!(got, corr, "the reply answers this request");
        value
    }
}

#[tokio::test]
async fn fib_rpc_round_trips_with_correlation_ids() {
    let broker = TestBroker::start().await;
    let server_conn = broker.connect().await;
    let setup = channel(&server_conn).await;
    let rpc_queue = broker.unique_name("rpc_queue");
    declare_with(
        &setup,
        &rpc_queue,
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare rpc_queue");
    let server = start_server(&server_conn, &rpc_queue).await;

    let client_conn = broker.connect().await;
    let mut client = Client::new(&client_conn).await;
    for n in [0u64, 1, 2, 10, 30, 50, 90] {
        assert_eq!(client.call(&rpc_queue, n).await, fib(n), "fib({n})");
    }
    // The seed's request: fib(30) = 832040.
    assert_eq!(client.call(&rpc_queue, 30).await, 832_040);

    // The reply queue is exclusive to the client's connection and goes with it.
    let reply_queue = client.reply_queue.clone();
    close_conn(&client_conn).await;
    wait_until("the reply queue is deleted", TIMEOUT, async || {
        let ch = channel(&server_conn).await;
        if warren_tests::passive(&ch, &reply_queue).await.is_err() {
            return Ok(());
        }
        let _ = ch.close(200, "OK".into()).await;
        Err("it still exists".into())
    })
    .await;

    delete_quietly(&setup, &rpc_queue).await;
    close_conn(&server_conn).await;
    let served = within("server end", server).await.expect("server task");
    assert_eq!(served, 8);
}

#[tokio::test]
async fn pipelined_requests_from_two_clients_share_two_prefetch_1_servers() {
    let broker = TestBroker::start().await;
    let server_conn = broker.connect().await;
    let setup = channel(&server_conn).await;
    let rpc_queue = broker.unique_name("rpc_queue");
    declare_with(
        &setup,
        &rpc_queue,
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare rpc_queue");
    let s1 = start_server(&server_conn, &rpc_queue).await;
    let s2 = start_server(&server_conn, &rpc_queue).await;

    let client_conn = broker.connect().await;
    let mut clients = [
        Client::new(&client_conn).await,
        Client::new(&client_conn).await,
    ];
    // Each client sends 20 requests without waiting, then matches replies by correlation_id.
    let mut expected: [HashMap<String, u64>; 2] = [HashMap::new(), HashMap::new()];
    for n in 0..20u64 {
        for (i, client) in clients.iter().enumerate() {
            let n = n + 20 * i as u64;
            let corr = client.send(&rpc_queue, n).await;
            expected[i].insert(corr, fib(n));
        }
    }
    for (i, client) in clients.iter_mut().enumerate() {
        for _ in 0..20 {
            let (corr, value) = client.reply().await;
            let want = expected[i]
                .remove(&corr)
                .unwrap_or_else(|| panic!("client {i}: reply for an unknown or repeated id"));
            assert_eq!(value, want);
        }
        assert!(expected[i].is_empty());
    }
    close_conn(&client_conn).await;
    delete_quietly(&setup, &rpc_queue).await;
    close_conn(&server_conn).await;
    let served = within("server 1", s1).await.expect("server 1")
        + within("server 2", s2).await.expect("server 2");
    assert_eq!(served, 40, "every request served exactly once");
}
