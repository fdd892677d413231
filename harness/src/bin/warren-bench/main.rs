//! `warren-bench`: measures Warren, embedded (broker, server and client on one tokio
//! `current_thread` runtime, as in a `#[tokio::test]`) and standalone (the `warren-broker`
//! process), and RabbitMQ when `AMQP_URL` is set or the local one answers, with the same
//! client code in the same run, alternating targets; prints medians over repeats and the
//! ratio Warren / RabbitMQ per row, and checks the targets of issue 6.
//!
//! ```text
//! cargo run --release -p warren-harness --bin warren-bench -- [--quick] [--json FILE]
//! ```
//!
//! # Layout
//! - `target`: the brokers measured: embedded, standalone (spawned), RabbitMQ (probed).
//! - `lean`: the lean load generator, a minimal AMQP client on amq-protocol.
//! - `runner`: runs a scenario on every target, alternating, with timeouts; the run's size.
//! - `scenarios`: floor, start, rpc, pubsub / fan-in / scale (`flow`), memory.
//! - `sys`: CPU time and RSS from `/proc`, the machine, the noise.
//! - `results`: the figures; `report`: the table, the verdicts, the JSON.

mod lean;
mod report;
mod results;
mod runner;
mod scenarios;
mod sys;
mod target;

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use target::{Kind, Targets};
use tokio_util::sync::CancellationToken;

/// Any error of the bench.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The bench's result type.
pub(crate) type Result<T> = std::result::Result<T, BoxError>;

/// Benchmarks Warren (embedded and standalone) against RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "warren-bench")]
struct Args {
    /// Smaller counts: the whole run in under a minute.
    #[arg(long)]
    quick: bool,
    /// Also write every figure (scenario, target, median, min, max, unit, ...) to FILE as
    /// JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Only these scenario groups (floor, start, rpc, pubsub, fan-in, scale, memory).
    #[arg(long, value_delimiter = ',', value_name = "GROUPS")]
    only: Vec<String>,
    /// Only the measured scenarios whose "name (client)" contains TEXT, e.g.
    /// "pubsub 16 B (lean)" (applies to the groups rpc, pubsub, fan-in and scale).
    #[arg(long = "match", value_name = "TEXT")]
    filter: Option<String>,
    /// Only these targets (embedded, standalone, rabbitmq).
    #[arg(long, value_delimiter = ',', value_name = "TARGETS")]
    targets: Vec<String>,
    /// Recorded repeats per scenario and target (default 5, 3 with --quick).
    #[arg(long)]
    repeats: Option<usize>,
    /// The warren-broker binary (default: next to this one, built first under `cargo run`).
    #[arg(long, value_name = "PATH")]
    broker_bin: Option<PathBuf>,
    /// Internal: the embedded memory probe (run in a child process).
    #[arg(long, hide = true, value_name = "MESSAGES")]
    probe_memory: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-bench: cannot build a tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match args.probe_memory {
        Some(n) => runtime.block_on(scenarios::memory::probe(n)),
        None => runtime.block_on(async {
            let interrupt = CancellationToken::new();
            // A first signal stops the run after the step under way, once what it set up is
            // torn down; a second drops the run at once, and with it the standalone
            // broker it spawned.
            let signals = async {
                warren_broker::wait_for_shutdown_signal().await;
                eprintln!(
                    "warren-bench: interrupted: stopping after the step under way and \
                     deleting the queues the run made (interrupt again to stop at once)"
                );
                interrupt.cancel();
                warren_broker::wait_for_shutdown_signal().await;
            };
            // Biased, so that the signals are watched from the start.
            tokio::select! {
                biased;
                () = signals => Err("interrupted twice: stopped without tearing down".into()),
                outcome = run(args, interrupt.clone()) => outcome,
            }
        }),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, interrupt: CancellationToken) -> Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warren-bench: WARNING: a debug build; figures are meaningless (use --release)");
    }
    for group in &args.only {
        if !scenarios::GROUPS.contains(&group.as_str()) {
            return Err(format!(
                "unknown scenario group {group:?} (one of {})",
                scenarios::GROUPS.join(", ")
            )
            .into());
        }
    }
    let groups: Vec<String> = if args.only.is_empty() {
        scenarios::GROUPS.iter().map(|g| g.to_string()).collect()
    } else {
        args.only.clone()
    };
    let mut kinds = Vec::new();
    for name in &args.targets {
        match Kind::ALL.iter().find(|k| k.name() == name) {
            Some(kind) => kinds.push(*kind),
            None => return Err(format!("unknown target {name:?}").into()),
        }
    }
    if kinds.is_empty() {
        kinds = Kind::ALL.to_vec();
    }
    let plan = runner::Plan::new(args.quick, args.repeats, args.filter.clone(), interrupt);
    let started = Instant::now();
    let load_start = sys::load_average();
    let broker_bin = if kinds.contains(&Kind::Standalone) {
        match target::broker_binary(args.broker_bin.clone()) {
            Ok(bin) => Some(bin),
            Err(e) => {
                eprintln!("warren-bench: skipping standalone: {e}");
                None
            }
        }
    } else {
        None
    };
    let rabbit_url = warren_rpc::url_from_env();
    let targets = Targets::start(&kinds, broker_bin.as_deref(), &rabbit_url).await;
    if targets.list.is_empty() {
        return Err("no target is up".into());
    }
    let mut results = results::Results::default();
    scenarios::run_all(
        &groups,
        &plan,
        &targets.list,
        broker_bin.as_deref(),
        &mut results,
    )
    .await;
    let measured: Vec<Kind> = targets.list.iter().map(|t| t.kind).collect();
    targets.stop().await;
    if plan.interrupted() {
        return Err("interrupted: what the run set up is torn down; no figures printed".into());
    }
    report::add_derived(&mut results);
    let info = report::RunInfo {
        quick: args.quick,
        machine: sys::machine_description(),
        load: (load_start, sys::load_average()),
        duration_secs: started.elapsed().as_secs_f64(),
        repeats: plan.repeats,
        targets: measured,
    };
    let verdicts = report::verdicts(&results);
    print!("{}", report::table(&results, &info));
    print!("{}", report::verdict_text(&verdicts));
    if let Some(path) = args.json {
        let json = report::json(&results, &info, &verdicts);
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("warren-bench: figures written to {}", path.display());
    }
    Ok(())
}
