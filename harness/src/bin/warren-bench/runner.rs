//! Runs a scenario (or a group of scenarios measured together) against every target,
//! alternating: set up on every target, one unrecorded warm-up (which also sizes the run), then
//! each repeat on each target in turn (the order rotating), then tear down. Every step is
//! bounded by a timeout; a target that fails or times out is skipped for the rest of the
//! scenario, with a message.

use crate::Result;
use crate::results::{Metric, Results};
use crate::sys::{CpuSnapshot, CpuUse};
use crate::target::Target;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How big a run is.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// `--quick`.
    pub(crate) quick: bool,
    /// Recorded repeats per scenario and target.
    pub(crate) repeats: usize,
    /// Wall time one repeat should take, in seconds (counts are sized from the warm-up).
    pub(crate) rep_secs: f64,
    /// A prefix unique to this run, for queue names.
    pub(crate) run_id: String,
    /// Only scenarios whose "name (client)" contains this (`--match`).
    pub(crate) filter: Option<String>,
    /// Cancelled on Ctrl-C or SIGTERM: the run stops after the step under way (a setup, a
    /// repeat), tearing down what it set up (so no queue is left on RabbitMQ).
    pub(crate) interrupt: CancellationToken,
}

impl Plan {
    /// The plan for a full or quick run.
    pub(crate) fn new(
        quick: bool,
        repeats: Option<usize>,
        filter: Option<String>,
        interrupt: CancellationToken,
    ) -> Self {
        Self {
            quick,
            repeats: repeats.unwrap_or(if quick { 3 } else { 5 }).max(1),
            rep_secs: if quick { 0.12 } else { 1.5 },
            run_id: format!(
                "warren-bench-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            filter,
            interrupt,
        }
    }

    /// Whether the run was interrupted: nothing more is set up or measured.
    pub(crate) fn interrupted(&self) -> bool {
        self.interrupt.is_cancelled()
    }

    /// A count that makes one repeat last about `rep_secs` at `rate` per second, within
    /// `min..=max`.
    pub(crate) fn size(&self, rate: f64, min: u64, max: u64) -> u64 {
        let wanted = (rate * self.rep_secs).round();
        if wanted.is_finite() && wanted > 0.0 {
            (wanted as u64).clamp(min, max)
        } else {
            min
        }
    }

    /// A queue name unique to this run.
    pub(crate) fn name(&self, what: &str) -> String {
        format!(
            "{}-{what}-{}",
            self.run_id,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    }
}

/// What one repeat measured.
#[derive(Debug, Default)]
pub(crate) struct Sample {
    /// The figures.
    pub(crate) figures: Vec<(Metric, f64)>,
    /// Messages (or calls) the broker handled, for CPU per message.
    pub(crate) messages: u64,
}

/// A scenario: what to measure on one target.
pub(crate) trait Scenario {
    /// What it keeps between repeats on one target.
    type State;

    /// Its row name.
    fn name(&self) -> String;

    /// The client that produces the load.
    fn client(&self) -> &'static str;

    /// When set, a "broker CPU per `<unit>`" figure is added for targets whose broker is a
    /// local process.
    fn broker_cpu_unit(&self) -> Option<&'static str> {
        None
    }

    /// Prepares the scenario on a target (queues, connections, consumers).
    async fn setup(&self, target: &Target) -> Result<Self::State>;

    /// Measures once.
    async fn measure(&self, state: &mut Self::State) -> Result<Sample>;

    /// Releases everything `setup` made (deletes its queues).
    async fn teardown(&self, state: Self::State);
}

/// Bounds of each step.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
const MEASURE_TIMEOUT: Duration = Duration::from_secs(60);
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Broker CPU per RPC call.
pub(crate) const CPU_PER_CALL: Metric = Metric::lower("broker CPU per call", "us/call");
/// Broker CPU per message.
pub(crate) const CPU_PER_MSG: Metric = Metric::lower("broker CPU per msg", "us/msg");

/// The broker-CPU metric for a unit.
fn broker_cpu_metric(unit: &'static str) -> Metric {
    match unit {
        "call" => CPU_PER_CALL,
        _ => CPU_PER_MSG,
    }
}

/// Runs `scenario` on `targets` and records its figures.
pub(crate) async fn run<S: Scenario>(
    scenario: &S,
    targets: &[Target],
    plan: &Plan,
    results: &mut Results,
) {
    run_group(std::slice::from_ref(scenario), targets, plan, results).await;
}

/// One scenario set up on one target; `None` once it failed.
struct Live<'a, S: Scenario> {
    scenario: &'a S,
    target: &'a Target,
    state: Option<S::State>,
}

/// Runs `scenarios` together on `targets` and records their figures: all are set up first,
/// and each round of repeats measures every scenario in turn (each on every target, in
/// rotating order). Rows that are compared with each other (the scale rows) are so measured
/// in the same phases of a noisy machine rather than minutes apart.
pub(crate) async fn run_group<S: Scenario>(
    scenarios: &[S],
    targets: &[Target],
    plan: &Plan,
    results: &mut Results,
) {
    let chosen: Vec<&S> = scenarios
        .iter()
        .filter(|s| {
            plan.filter.as_ref().is_none_or(|filter| {
                format!("{} ({})", s.name(), s.client()).contains(filter.as_str())
            })
        })
        .collect();
    if chosen.is_empty() || plan.interrupted() {
        return;
    }
    let started = std::time::Instant::now();
    // Per scenario, its live targets.
    let mut groups: Vec<Vec<Live<'_, S>>> = Vec::new();
    for &scenario in &chosen {
        if plan.interrupted() {
            break;
        }
        let name = scenario.name();
        let mut live = Vec::new();
        for target in targets {
            if plan.interrupted() {
                break;
            }
            let kind = target.kind.name();
            match tokio::time::timeout(SETUP_TIMEOUT, scenario.setup(target)).await {
                Ok(Ok(state)) => live.push(Live {
                    scenario,
                    target,
                    state: Some(state),
                }),
                Ok(Err(e)) => {
                    eprintln!("warren-bench: {name} on {kind}: setup failed, skipped: {e}");
                }
                Err(_) => eprintln!("warren-bench: {name} on {kind}: setup timed out, skipped"),
            }
        }
        groups.push(live);
    }
    let set_up = started.elapsed();
    // Warm-up (unrecorded), which also sizes the recorded repeats.
    for live in groups.iter_mut().flatten() {
        if plan.interrupted() {
            break;
        }
        if let Some(s) = live.state.as_mut()
            && let Err(e) = measure_once(live.scenario, s).await
        {
            skip(live, &e).await;
        }
    }
    for rep in 0..plan.repeats {
        for group in &mut groups {
            let n = group.len();
            for i in 0..n {
                if plan.interrupted() {
                    break;
                }
                let live = &mut group[(i + rep) % n];
                let Some(s) = live.state.as_mut() else {
                    continue;
                };
                let before = CpuSnapshot::take(live.target.pid);
                let outcome = measure_once(live.scenario, s).await;
                let cpu = before.until(&CpuSnapshot::take(live.target.pid));
                match outcome {
                    Ok(sample) => record(results, live.scenario, live.target, &sample, &cpu),
                    Err(e) => skip(live, &e).await,
                }
            }
        }
    }
    let measured = started.elapsed();
    for live in groups.into_iter().flatten() {
        if let Some(s) = live.state {
            let _ = tokio::time::timeout(TEARDOWN_TIMEOUT, live.scenario.teardown(s)).await;
        }
    }
    let names: Vec<String> = chosen
        .iter()
        .map(|s| format!("{} ({})", s.name(), s.client()))
        .collect();
    eprintln!(
        "warren-bench: {} {} in {:.1} s (setup {:.1} s, teardown {:.1} s)",
        names.join(", "),
        if plan.interrupted() {
            "interrupted"
        } else {
            "done"
        },
        started.elapsed().as_secs_f64(),
        set_up.as_secs_f64(),
        (started.elapsed() - measured).as_secs_f64()
    );
}

/// Reports a failed step and tears the scenario down on that target for the rest of the run.
async fn skip<S: Scenario>(live: &mut Live<'_, S>, error: &crate::BoxError) {
    eprintln!(
        "warren-bench: {} on {}: {error}; skipped",
        live.scenario.name(),
        live.target.kind.name()
    );
    if let Some(s) = live.state.take() {
        let _ = tokio::time::timeout(TEARDOWN_TIMEOUT, live.scenario.teardown(s)).await;
    }
}

async fn measure_once<S: Scenario>(scenario: &S, state: &mut S::State) -> Result<Sample> {
    tokio::time::timeout(MEASURE_TIMEOUT, scenario.measure(state))
        .await
        .map_err(|_| format!("no result within {MEASURE_TIMEOUT:?}"))?
}

fn record<S: Scenario>(
    results: &mut Results,
    scenario: &S,
    target: &Target,
    sample: &Sample,
    cpu: &CpuUse,
) {
    let name = scenario.name();
    let client = scenario.client();
    if let Some(machine) = cpu.machine
        && cpu.wall > 0.0
    {
        let other = machine - cpu.own - cpu.broker.unwrap_or(0.0);
        results.noise.push((other / cpu.wall).max(0.0));
    }
    for (metric, value) in &sample.figures {
        results.record(&name, client, *metric, target.kind, *value, Some(cpu));
    }
    if let (Some(unit), Some(broker)) = (scenario.broker_cpu_unit(), cpu.broker)
        && sample.messages > 0
    {
        let per = broker / sample.messages as f64 * 1e6;
        results.record(
            &name,
            client,
            broker_cpu_metric(unit),
            target.kind,
            per,
            Some(cpu),
        );
    }
}
