//! The scenarios of issue 6, and the order a run goes through them.

pub(crate) mod floor;
pub(crate) mod flow;
pub(crate) mod lean_rpc;
pub(crate) mod memory;
pub(crate) mod rpc;
pub(crate) mod start;

use crate::results::Results;
use crate::runner::{self, Plan};
use crate::target::{Kind, Target};
use flow::{Client, Flow};
use lean_rpc::LeanRpc;
use rpc::Rpc;
use std::path::Path;

/// Scenario groups, as `--only` names them, in run order.
pub(crate) const GROUPS: [&str; 7] = [
    "floor", "start", "rpc", "pubsub", "fan-in", "scale", "memory",
];

/// The throughput scenarios' names, which the verdicts (report.rs) look rows up by.
pub(crate) const PUBSUB_16B: &str = "pubsub 16 B";
/// See [`PUBSUB_16B`].
pub(crate) const PUBSUB_4KIB: &str = "pubsub 4 KiB";
/// See [`PUBSUB_16B`].
pub(crate) const FAN_IN: &str = "fan-in 8 pub -> 1 q -> 2 cons";

/// The name of the scale scenario with `queues` queues on `connections` consumer connections
/// (one consumer per queue, or per connection when there are fewer queues than connections).
pub(crate) fn scale_name(queues: usize, connections: usize) -> String {
    format!("scale {queues} q / {connections} conn")
}

/// Prefetch of every throughput consumer.
const PREFETCH: u16 = 1000;

/// Runs the selected groups.
pub(crate) async fn run_all(
    groups: &[String],
    plan: &Plan,
    targets: &[Target],
    broker_bin: Option<&Path>,
    results: &mut Results,
) {
    let wants = |g: &str| groups.iter().any(|x| x == g);
    let kinds: Vec<Kind> = targets.iter().map(|t| t.kind).collect();
    // Groups that set nothing up on a broker that outlives them (the memory group's queue on
    // RabbitMQ is exclusive) are dropped at once when the run is interrupted, and not started
    // once it was (`run_until_cancelled` on a cancelled token returns at once); the others
    // stop after the step under way and tear down (`runner`).
    if wants("floor") {
        plan.interrupt
            .run_until_cancelled(floor::run(plan, results))
            .await;
    }
    if wants("start") {
        plan.interrupt
            .run_until_cancelled(start::run(plan, &kinds, broker_bin, results))
            .await;
    }
    if wants("rpc") {
        for (name, in_flight) in [("rpc-seq", 1), ("rpc-64", 64), ("rpc-256", 256)] {
            let scenario = Rpc {
                name,
                in_flight,
                cpu_per_call: in_flight == 64,
                plan,
            };
            runner::run(&scenario, targets, plan, results).await;
            let scenario = LeanRpc {
                name,
                in_flight,
                cpu_per_call: in_flight == 64,
                plan,
            };
            runner::run(&scenario, targets, plan, results).await;
        }
    }
    let flow =
        |name: &str, client, body, queues, consumers_per_queue, connections, publishers| Flow {
            name: name.to_owned(),
            client,
            queues,
            consumers_per_queue,
            consumer_connections: connections,
            publishers,
            body,
            prefetch: PREFETCH,
            cpu_per_msg: false,
            plan,
        };
    if wants("pubsub") {
        for client in [Client::Lean, Client::Lapin] {
            for (name, body) in [(PUBSUB_16B, 16), (PUBSUB_4KIB, 4096)] {
                let scenario = Flow {
                    cpu_per_msg: true,
                    ..flow(name, client, body, 1, 1, 1, 1)
                };
                runner::run(&scenario, targets, plan, results).await;
            }
        }
    }
    if wants("fan-in") {
        for client in [Client::Lean, Client::Lapin] {
            let scenario = flow(FAN_IN, client, 16, 1, 2, 2, 8);
            runner::run(&scenario, targets, plan, results).await;
        }
    }
    if wants("scale") {
        // 1 q / 100 conn has 100 consumers on its queue, one per connection: beside
        // 1000 q / 100 conn it tells the cost of many queues from that of many connections.
        // The rows are measured together (round by round), since the target compares them.
        let scale: Vec<Flow> = [
            (1, 1),
            (100, 1),
            (1000, 1),
            (1, 100),
            (100, 100),
            (1000, 100),
        ]
        .into_iter()
        .map(|(queues, connections)| {
            flow(
                &scale_name(queues, connections),
                Client::Lean,
                16,
                queues,
                (connections / queues).max(1),
                connections,
                1,
            )
        })
        .collect();
        runner::run_group(&scale, targets, plan, results).await;
    }
    if wants("memory") {
        plan.interrupt
            .run_until_cancelled(memory::run(plan, targets, broker_bin, results))
            .await;
    }
}
