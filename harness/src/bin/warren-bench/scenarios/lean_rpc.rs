//! The same RPC as [`super::rpc`] (fib(10) over a request queue, an exclusive server-named
//! reply queue, `reply_to` and `correlation_id`, reply-then-ack) with the lean client on both
//! sides instead of lapin, to show what the broker does when the client is not the
//! bottleneck. No publisher confirms, no `mandatory`, no `expiration`: the lean client's
//! minimal form of the seed's RPC. The server acks with `multiple` after the replies of
//! everything it read in one go, in the same write.

use crate::Result;
use crate::lean::{self, Lean};
use crate::runner::{Plan, Sample, Scenario};
use crate::scenarios::rpc::{self, ANSWER, REQUEST};
use crate::target::Target;
use amq_protocol::frame::parsing::parse_content_header;
use lapin::BasicProperties;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Most calls in one repeat with the lean client.
const MAX_CALLS: u64 = 5_000_000;

/// A lean RPC scenario.
#[derive(Debug)]
pub(crate) struct LeanRpc<'a> {
    /// Row name (shared with the lapin rows).
    pub(crate) name: &'static str,
    /// Calls in flight.
    pub(crate) in_flight: usize,
    /// Whether to add the broker's CPU per call.
    pub(crate) cpu_per_call: bool,
    /// Run size.
    pub(crate) plan: &'a Plan,
}

/// One target's server task and client connection.
pub(crate) struct LeanRpcState {
    url: String,
    queue: String,
    client: Lean,
    reply_queue: String,
    server: JoinHandle<()>,
    server_error: Arc<Mutex<Option<String>>>,
    stop: watch::Sender<bool>,
    next_calls: u64,
    next_id: u64,
}

impl Scenario for LeanRpc<'_> {
    type State = LeanRpcState;

    fn name(&self) -> String {
        self.name.to_owned()
    }

    fn client(&self) -> &'static str {
        "lean"
    }

    fn broker_cpu_unit(&self) -> Option<&'static str> {
        self.cpu_per_call.then_some("call")
    }

    async fn setup(&self, target: &Target) -> Result<LeanRpcState> {
        let queue = self.plan.name("lean-rpc");
        let mut server = Lean::connect(&target.url).await?;
        server.open_channel(1).await?;
        // Auto-delete: gone with the server's consumer, even if the bench is killed.
        server
            .declare_many(1, std::slice::from_ref(&queue), false, true)
            .await?;
        let prefetch = self.in_flight.clamp(1, 65_535) as u16;
        server.qos(1, prefetch).await?;
        server
            .consume_many(1, std::slice::from_ref(&queue), false)
            .await?;
        let mut client = Lean::connect(&target.url).await?;
        client.open_channel(1).await?;
        let reply_queue = client
            .declare_many(1, &[String::new()], true, true)
            .await?
            .remove(0)
            .0;
        client
            .consume_many(1, std::slice::from_ref(&reply_queue), true)
            .await?;
        let (stop, stopped) = watch::channel(false);
        let server_error = Arc::new(Mutex::new(None));
        let task = tokio::spawn(serve(server, stopped, server_error.clone()));
        Ok(LeanRpcState {
            url: target.url.clone(),
            queue,
            client,
            reply_queue,
            server: task,
            server_error,
            stop,
            next_calls: rpc::first_calls(self.in_flight),
            next_id: 0,
        })
    }

    async fn measure(&self, state: &mut LeanRpcState) -> Result<Sample> {
        let calls = state.next_calls;
        let first_id = state.next_id;
        state.next_id += calls;
        let mut started_at: Vec<Option<Instant>> = vec![None; calls as usize];
        let mut latencies: Vec<f64> = Vec::with_capacity(calls as usize);
        let client = &mut state.client;
        let mut issued = 0u64;
        let publish = |client: &mut Lean, issued: &mut u64, started_at: &mut [Option<Instant>]| {
            let id = first_id + *issued;
            let properties = BasicProperties::default()
                .with_reply_to(state.reply_queue.as_str().into())
                .with_correlation_id(id.to_string().into());
            let prefix = lean::publish_prefix(1, &state.queue, properties, REQUEST.len());
            client.push_publish(1, &prefix, REQUEST);
            started_at[*issued as usize] = Some(Instant::now());
            *issued += 1;
        };
        let started = Instant::now();
        while issued < calls && (issued as usize) < self.in_flight {
            publish(client, &mut issued, &mut started_at);
        }
        client.flush().await?;
        let mut current: Option<u64> = None;
        let mut bad: Option<String> = None;
        // Correlation ids of the replies of one read, reused across reads.
        let mut completed: Vec<u64> = Vec::new();
        while (latencies.len() as u64) < calls {
            if let Some(e) = state
                .server_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return Err(format!("lean RPC server: {e}").into());
            }
            client.read_more().await?;
            client.scan(|kind, _channel, payload| {
                match kind {
                    lean::HEADER => {
                        current = parse_content_header(payload)
                            .ok()
                            .and_then(|(_, h)| h.properties.correlation_id().clone())
                            .and_then(|id| id.as_str().parse().ok());
                    }
                    lean::BODY => match current.take() {
                        Some(id) if payload == ANSWER => completed.push(id),
                        _ => bad = Some(format!("bad reply {payload:?}")),
                    },
                    _ => {}
                }
                true
            })?;
            if let Some(e) = bad.take() {
                return Err(e.into());
            }
            for id in completed.drain(..) {
                let index = id
                    .checked_sub(first_id)
                    .ok_or("a reply from an earlier repeat")?;
                let at = started_at
                    .get_mut(index as usize)
                    .and_then(Option::take)
                    .ok_or("an unknown or duplicate reply")?;
                latencies.push(at.elapsed().as_secs_f64() * 1e6);
                if issued < calls {
                    publish(client, &mut issued, &mut started_at);
                }
            }
            client.flush().await?;
        }
        Ok(rpc::finish(
            self.plan,
            self.in_flight,
            calls,
            started.elapsed(),
            latencies,
            &mut state.next_calls,
            MAX_CALLS,
        ))
    }

    async fn teardown(&self, state: LeanRpcState) {
        let _ = state.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(3), state.server)
            .await
            .is_err()
        {
            eprintln!(
                "warren-bench: {} (lean): the server did not stop",
                self.name
            );
        }
        state.client.close().await;
        super::rpc::delete_queue(&state.url, &state.queue).await;
    }
}

/// The lean fib server: answers every request it reads, then acks them all at once.
async fn serve(mut conn: Lean, mut stop: watch::Receiver<bool>, error: Arc<Mutex<Option<String>>>) {
    let result: Result<()> = async {
        // The request being assembled: delivery tag, reply_to, correlation_id.
        let mut tag = 0u64;
        let mut reply: Option<(String, BasicProperties)> = None;
        let mut failure: Option<String> = None;
        // The replies to the requests of one read, reused across reads.
        let mut answers: Vec<(String, BasicProperties, Vec<u8>)> = Vec::new();
        loop {
            let mut last_tag = None;
            conn.scan(|kind, _channel, payload| {
                match kind {
                    lean::METHOD => {
                        if let Some(t) = lean::deliver_tag(payload) {
                            tag = t;
                        } else if let Some(reason) = lean::close_reason(payload) {
                            failure = Some(reason);
                            return false;
                        }
                    }
                    lean::HEADER => {
                        reply = parse_content_header(payload).ok().and_then(|(_, h)| {
                            let to = h.properties.reply_to().clone()?;
                            let mut props = BasicProperties::default();
                            if let Some(id) = h.properties.correlation_id().clone() {
                                props = props.with_correlation_id(id);
                            }
                            Some((to.to_string(), props))
                        });
                    }
                    lean::BODY => {
                        if let Some((to, props)) = reply.take() {
                            let body = warren_rpc::fib::answer(payload)
                                .unwrap_or_else(|e| e.to_string().into_bytes());
                            answers.push((to, props, body));
                        }
                        last_tag = Some(tag);
                    }
                    _ => {}
                }
                true
            })?;
            if let Some(e) = failure.take() {
                return Err(e.into());
            }
            for (to, props, body) in answers.drain(..) {
                let prefix = lean::publish_prefix(1, &to, props, body.len());
                conn.push_publish(1, &prefix, &body);
            }
            if let Some(tag) = last_tag {
                conn.push_ack(1, tag, true);
            }
            conn.flush().await?;
            tokio::select! {
                read = conn.read_more() => read?,
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
        *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    }
}
