//! rpc-seq, rpc-64, rpc-256: the seed's fib RPC through warren-rpc's `RpcServer` (with
//! `FibHandler`) and `RpcClient` (reply queue, correlation id, confirms, mandatory), with 1, 64
//! or 256 calls in flight from one client. The server's prefetch equals the calls in flight,
//! so it never serialises them.

use crate::Result;
use crate::lean::Lean;
use crate::results::Metric;
use crate::runner::{Plan, Sample, Scenario};
use crate::target::Target;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::num::NonZeroU16;
use std::time::{Duration, Instant};
use warren_rpc::fib::FibHandler;
use warren_rpc::{ClientConfig, RpcClient, RpcServer, ServerConfig};

/// The request: fib(10).
pub(crate) const REQUEST: &[u8] = b"10";
/// Its answer.
pub(crate) const ANSWER: &[u8] = b"55";

/// Calls per second.
/// The client of these rows.
pub(crate) const CLIENT: &str = "lapin (warren-rpc)";
/// Calls per second.
pub(crate) const RATE: Metric = Metric::higher("calls/s", "calls/s");
/// Median latency.
pub(crate) const P50: Metric = Metric::lower("p50 latency", "us");
/// 99th percentile latency.
pub(crate) const P99: Metric = Metric::lower("p99 latency", "us");

/// An RPC scenario.
#[derive(Debug)]
pub(crate) struct Rpc<'a> {
    /// Row name.
    pub(crate) name: &'static str,
    /// Calls in flight.
    pub(crate) in_flight: usize,
    /// Whether to add the broker's CPU per call.
    pub(crate) cpu_per_call: bool,
    /// Run size.
    pub(crate) plan: &'a Plan,
}

/// Most calls in one repeat with warren-rpc.
const MAX_CALLS: u64 = 2_000_000;

/// Calls in the first (unrecorded) repeat, before a rate sizes the next.
pub(crate) fn first_calls(in_flight: usize) -> u64 {
    (in_flight as u64 * 4).max(50)
}

/// The figures of a repeat of `calls` calls that took `elapsed`; sets `next_calls` to the size
/// of the next repeat (at most `max_calls`).
pub(crate) fn finish(
    plan: &Plan,
    in_flight: usize,
    calls: u64,
    elapsed: Duration,
    mut latencies: Vec<f64>,
    next_calls: &mut u64,
    max_calls: u64,
) -> Sample {
    latencies.sort_by(f64::total_cmp);
    let rate = calls as f64 / elapsed.as_secs_f64();
    *next_calls = plan.size(rate, (in_flight as u64 * 4).max(100), max_calls);
    Sample {
        figures: vec![
            (RATE, rate),
            (P50, crate::results::percentile_sorted(&latencies, 0.5)),
            (P99, crate::results::percentile_sorted(&latencies, 0.99)),
        ],
        messages: calls,
    }
}

/// One target's server and client.
pub(crate) struct RpcState {
    url: String,
    queue: String,
    server: RpcServer,
    client: RpcClient,
    next_calls: u64,
}

impl Scenario for Rpc<'_> {
    type State = RpcState;

    fn name(&self) -> String {
        self.name.to_owned()
    }

    fn client(&self) -> &'static str {
        CLIENT
    }

    fn broker_cpu_unit(&self) -> Option<&'static str> {
        self.cpu_per_call.then_some("call")
    }

    async fn setup(&self, target: &Target) -> Result<RpcState> {
        let queue = self.plan.name("rpc");
        let prefetch =
            NonZeroU16::new(self.in_flight.clamp(1, 65_535) as u16).unwrap_or(NonZeroU16::MIN);
        let server_config = ServerConfig {
            queue: queue.clone(),
            prefetch,
        };
        let server = RpcServer::connect(&target.url, server_config, FibHandler).await?;
        let client_config = ClientConfig {
            queue: queue.clone(),
            timeout: Duration::from_secs(10),
        };
        let client = match RpcClient::connect(&target.url, client_config).await {
            Ok(client) => client,
            Err(e) => {
                let _ = server.shutdown().await;
                delete_queue(&target.url, &queue).await;
                return Err(e.into());
            }
        };
        Ok(RpcState {
            url: target.url.clone(),
            queue,
            server,
            client,
            next_calls: first_calls(self.in_flight),
        })
    }

    async fn measure(&self, state: &mut RpcState) -> Result<Sample> {
        let calls = state.next_calls;
        let client = &state.client;
        let mut latencies: Vec<f64> = Vec::with_capacity(calls as usize);
        let mut pending = FuturesUnordered::new();
        let call = || async move {
            let started = Instant::now();
            let reply = client.call(REQUEST).await;
            (started.elapsed(), reply)
        };
        let started = Instant::now();
        let mut issued = 0u64;
        while issued < calls && pending.len() < self.in_flight {
            pending.push(call());
            issued += 1;
        }
        while let Some((latency, reply)) = pending.next().await {
            match reply {
                Ok(body) if body == ANSWER => {}
                Ok(body) => {
                    return Err(format!("wrong reply {:?}", String::from_utf8_lossy(&body)).into());
                }
                Err(e) => return Err(format!("call failed: {e}").into()),
            }
            latencies.push(latency.as_secs_f64() * 1e6);
            if issued < calls {
                pending.push(call());
                issued += 1;
            }
        }
        Ok(finish(
            self.plan,
            self.in_flight,
            calls,
            started.elapsed(),
            latencies,
            &mut state.next_calls,
            MAX_CALLS,
        ))
    }

    async fn teardown(&self, state: RpcState) {
        state.client.close().await;
        if let Err(e) = state.server.shutdown().await {
            eprintln!("warren-bench: {}: server shutdown: {e}", self.name);
        }
        delete_queue(&state.url, &state.queue).await;
    }
}

/// Deletes a queue, best effort.
pub(crate) async fn delete_queue(url: &str, queue: &str) {
    let result: Result<()> = async {
        let mut conn = Lean::connect(url).await?;
        conn.open_channel(1).await?;
        conn.delete_many(1, &[queue.to_owned()]).await?;
        conn.close().await;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("warren-bench: deleting {queue}: {e}");
    }
}
