//! The table, the verdict on each target of issue 6, and the JSON file.

use crate::results::{Better, Metric, Results, Row, summarize};
use crate::runner::{CPU_PER_CALL, CPU_PER_MSG};
use crate::scenarios::floor::{CROSS_THREAD, IN_RUNTIME};
use crate::scenarios::{FAN_IN, PUBSUB_4KIB, PUBSUB_16B, flow, memory, rpc, scale_name, start};
use crate::target::Kind;
use std::fmt::Write as _;

/// What a run was, for the header and the JSON.
#[derive(Debug)]
pub(crate) struct RunInfo {
    /// `--quick`.
    pub(crate) quick: bool,
    /// The machine.
    pub(crate) machine: String,
    /// 1-minute load average at the start and the end.
    pub(crate) load: (Option<f64>, Option<f64>),
    /// Wall seconds of the whole run.
    pub(crate) duration_secs: f64,
    /// Repeats per scenario.
    pub(crate) repeats: usize,
    /// Targets measured.
    pub(crate) targets: Vec<Kind>,
}

const FLOOR_MULTIPLE: Metric = Metric::lower("p50 / 2 ping-pongs", "x");

/// Adds the derived rows: rpc-seq's p50 as a multiple of two ping-pongs of the matching kind
/// (embedded: in one runtime; standalone and RabbitMQ: across threads).
pub(crate) fn add_derived(results: &mut Results) {
    let floor = |name: &str| {
        results
            .floors
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, s)| s.median)
    };
    let (in_runtime, cross) = (floor(IN_RUNTIME), floor(CROSS_THREAD));
    let mut derived = Vec::new();
    for client in [rpc::CLIENT, "lean"] {
        for kind in Kind::ALL {
            let floor = match kind {
                Kind::Embedded => in_runtime,
                _ => cross,
            };
            if let (Some(p50), Some(floor)) = (
                results.median("rpc-seq", client, rpc::P50.name, kind),
                floor,
            ) {
                derived.push((client, kind, p50 / (2.0 * floor)));
            }
        }
    }
    for (client, kind, value) in derived {
        results.record("rpc-seq", client, FLOOR_MULTIPLE, kind, value, None);
    }
}

/// A number in a few significant digits.
fn num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "-".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn median_of(values: &[f64]) -> Option<f64> {
    summarize(values).map(|s| s.median)
}

/// The table as text.
pub(crate) fn table(results: &Results, info: &RunInfo) -> String {
    let mut out = String::new();
    let load = |l: Option<f64>| l.map_or("?".into(), |v| format!("{v:.2}"));
    let noise = summarize(&results.noise);
    let _ = writeln!(
        out,
        "warren-bench{}: {} | {} repeats, medians | {:.0} s | load avg {} -> {} | other processes during measurements: median {} max {} cores",
        if info.quick { " --quick" } else { "" },
        info.machine,
        info.repeats,
        info.duration_secs,
        load(info.load.0),
        load(info.load.1),
        noise.map_or("?".into(), |s| format!("{:.2}", s.median)),
        noise.map_or("?".into(), |s| format!("{:.2}", s.max)),
    );
    if let Some(noise) = noise
        && noise.median > 0.2
    {
        let _ = writeln!(
            out,
            "NOTE: other processes kept {:.1} of the 2 cores busy (median): throughputs read low, and \
             cross-thread latencies read *better* than on an idle machine (busy CPUs wake faster).",
            noise.median
        );
    }
    let headers = [
        "scenario",
        "client",
        "metric",
        "unit",
        "embedded",
        "standalone",
        "rabbitmq",
        "emb/rmq",
        "sa/rmq",
        "client CPU e/s/r",
        "spread",
    ];
    let mut lines: Vec<Vec<String>> = vec![headers.iter().map(|h| h.to_string()).collect()];
    for row in &results.rows {
        lines.push(row_cells(row));
    }
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (n, line) in lines.iter().enumerate() {
        let mut text = String::new();
        for (i, cell) in line.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            // Text columns left-aligned, figures right-aligned.
            if i < 4 {
                text.push_str(cell);
                text.push_str(&" ".repeat(pad));
            } else {
                text.push_str(&" ".repeat(pad));
                text.push_str(cell);
            }
            text.push_str("  ");
        }
        let _ = writeln!(out, "{}", text.trim_end());
        if n == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
    }
    if !results.floors.is_empty() {
        let _ = writeln!(out);
        for (name, unit, s) in &results.floors {
            let _ = writeln!(
                out,
                "floor: {name}: {} {unit} (min {}, max {})",
                num(s.median),
                num(s.min),
                num(s.max)
            );
        }
    }
    let _ = writeln!(
        out,
        "\n(arrows: ^ higher is better, v lower is better; ratios are Warren / RabbitMQ, the median of the per-round ratios (each round measures the targets back to back); client CPU = cores used by the bench process \
         (embedded: client + broker), * = one of its threads was >= 90% busy; spread = largest (max-min)/median over the targets)"
    );
    out
}

fn row_cells(row: &Row) -> Vec<String> {
    let arrow = match row.metric.better {
        Better::Higher => "^",
        Better::Lower => "v",
    };
    let value = |kind: Kind| match row.by_target.get(&kind) {
        Some(series) => match series.summary() {
            Some(s) if series.reference => format!("{} (ref)", num(s.median)),
            Some(s) => num(s.median),
            None => "-".into(),
        },
        None => "-".into(),
    };
    // Multiples of different floors are not comparable across targets: no ratio.
    let comparable = row.metric.unit != FLOOR_MULTIPLE.unit;
    let ratio = |kind: Kind| match (row.by_target.get(&kind), row.by_target.get(&Kind::RabbitMq)) {
        (Some(w), Some(r)) if comparable && let Some(q) = w.ratio_to(r) => {
            if q.abs() < 0.01 {
                format!("{q:.1e}")
            } else {
                format!("{q:.2}")
            }
        }
        _ => "-".into(),
    };
    let cpu = Kind::ALL
        .iter()
        .map(|kind| {
            row.by_target
                .get(kind)
                .and_then(|s| {
                    let cores = median_of(&s.client_cores)?;
                    let busy = median_of(&s.busiest_thread).unwrap_or(0.0) >= 0.9;
                    Some(format!("{cores:.2}{}", if busy { "*" } else { "" }))
                })
                .unwrap_or_else(|| "-".into())
        })
        .collect::<Vec<_>>()
        .join("/");
    let spread = row
        .by_target
        .values()
        .filter_map(|s| s.summary())
        .filter(|s| s.median != 0.0 && s.max > s.min)
        .map(|s| (s.max - s.min) / s.median.abs() * 100.0)
        .fold(None, |acc: Option<f64>, v| {
            Some(acc.map_or(v, |a| a.max(v)))
        });
    vec![
        row.scenario.clone(),
        row.client.to_owned(),
        row.metric.name.to_owned(),
        format!("{} {arrow}", row.metric.unit),
        value(Kind::Embedded),
        value(Kind::Standalone),
        value(Kind::RabbitMq),
        ratio(Kind::Embedded),
        ratio(Kind::Standalone),
        cpu,
        spread.map_or("-".into(), |s| format!("{s:.0}%")),
    ]
}

/// One target of issue 6 and what this run says about it.
#[derive(Debug)]
pub(crate) struct Verdict {
    /// The target, in words.
    pub(crate) target: String,
    /// Met, not met, not measured, or info (a figure for reference, not a target).
    pub(crate) status: &'static str,
    /// The figures behind it.
    pub(crate) detail: String,
}

/// Checks each target of issue 6 against this run's medians.
pub(crate) fn verdicts(results: &Results) -> Vec<Verdict> {
    let mut out = Vec::new();
    let m = |scenario: &str, client: &str, metric: &str, kind: Kind| {
        results.median(scenario, client, metric, kind)
    };
    let mut check = |target: &str, parts: Vec<(String, Option<f64>, f64, bool)>| {
        // (label, value, bound, value must be >= bound (true) or <= bound (false))
        let mut all = true;
        let mut any_missing = false;
        let mut detail = Vec::new();
        for (label, value, bound, at_least) in parts {
            match value {
                Some(v) => {
                    let ok = if at_least { v >= bound } else { v <= bound };
                    all &= ok;
                    detail.push(format!(
                        "{label} {} ({} {})",
                        // A value that would print as the bound shows its next digits, so
                        // that "0.10 (<= 0.10)" never stands beside NOT MET.
                        if num(v) == num(bound) && v != bound {
                            format!("{v:.4}")
                        } else {
                            num(v)
                        },
                        if at_least { ">=" } else { "<=" },
                        num(bound)
                    ));
                }
                None => {
                    any_missing = true;
                    detail.push(format!("{label} not measured"));
                }
            }
        }
        let status = if any_missing && detail.iter().all(|d| d.ends_with("not measured")) {
            "NOT MEASURED"
        } else if any_missing {
            if all {
                "PARTLY MEASURED, met so far"
            } else {
                "NOT MET"
            }
        } else if all {
            "MET"
        } else {
            "NOT MET"
        };
        out.push(Verdict {
            target: target.to_owned(),
            status,
            detail: detail.join("; "),
        });
    };
    // Per-round ratios where the values pair up (see `Series::ratio_to`).
    let ratio = |scenario: &str, client: &str, metric: &str, kind: Kind, base: Kind| {
        results
            .series(scenario, client, metric, kind)?
            .ratio_to(results.series(scenario, client, metric, base)?)
    };
    let memory_row = results
        .rows
        .iter()
        .find(|r| r.scenario.starts_with("memory"))
        .map(|r| r.scenario.clone())
        .unwrap_or_default();
    check(
        "start under 1 ms (embedded Broker::start to ready)",
        vec![(
            "embedded, us:".into(),
            m("start", "lapin", start::READY.name, Kind::Embedded),
            1000.0,
            false,
        )],
    );
    check(
        "idle embedded broker adds < 2 MB RSS; idle standalone < 10 MB",
        vec![
            (
                "embedded KiB added:".into(),
                m(&memory_row, "lean", memory::IDLE.name, Kind::Embedded),
                2048.0,
                false,
            ),
            (
                "standalone KiB:".into(),
                m(&memory_row, "lean", memory::IDLE.name, Kind::Standalone),
                10240.0,
                false,
            ),
        ],
    );
    let overhead =
        |kind| m(&memory_row, "lean", memory::PER_MSG.name, kind).map(|b| b - memory::BODY as f64);
    check(
        "< 200 bytes of overhead per queued message (RSS per message - 16 B body)",
        vec![
            ("embedded B:".into(), overhead(Kind::Embedded), 200.0, false),
            (
                "standalone B:".into(),
                overhead(Kind::Standalone),
                200.0,
                false,
            ),
        ],
    );
    let per_msg = CPU_PER_MSG.name;
    let per_call = CPU_PER_CALL.name;
    check(
        "broker CPU per message (standalone) <= 1/10 of RabbitMQ's",
        [
            (PUBSUB_16B, "lean", per_msg),
            (PUBSUB_16B, "lapin", per_msg),
            (PUBSUB_4KIB, "lean", per_msg),
            (PUBSUB_4KIB, "lapin", per_msg),
            ("rpc-64", rpc::CLIENT, per_call),
            ("rpc-64", "lean", per_call),
        ]
        .into_iter()
        .map(|(scenario, client, metric)| {
            let cpu = ratio(scenario, client, metric, Kind::Standalone, Kind::RabbitMq);
            (format!("{scenario} {client}, sa/rmq:"), cpu, 0.1, false)
        })
        .collect(),
    );
    let vs = |scenario: &str, client: &str, metric: &str, kind: Kind| {
        ratio(scenario, client, metric, kind, Kind::RabbitMq)
    };
    let both = |scenario: &str, client: &str, metric: &str, bound: f64| {
        vec![
            (
                format!("{scenario} {client} emb/rmq:"),
                vs(scenario, client, metric, Kind::Embedded),
                bound,
                true,
            ),
            (
                format!("{scenario} {client} sa/rmq:"),
                vs(scenario, client, metric, Kind::Standalone),
                bound,
                true,
            ),
        ]
    };
    check(
        "rpc-64 and rpc-256 at least 3x RabbitMQ with warren-rpc on lapin (calls/s)",
        [
            both("rpc-64", rpc::CLIENT, rpc::RATE.name, 3.0),
            both("rpc-256", rpc::CLIENT, rpc::RATE.name, 3.0),
        ]
        .concat(),
    );
    check(
        "rpc-64 and rpc-256 at least 3x RabbitMQ with a client that is not the bottleneck (lean)",
        [
            both("rpc-64", "lean", rpc::RATE.name, 3.0),
            both("rpc-256", "lean", rpc::RATE.name, 3.0),
        ]
        .concat(),
    );
    let flow_rows = |client: &str, bound: f64| {
        [PUBSUB_16B, PUBSUB_4KIB, FAN_IN]
            .into_iter()
            .flat_map(|scenario| both(scenario, client, flow::RATE.name, bound))
            .collect()
    };
    check(
        "pubsub and fan-in at least 3x RabbitMQ with lapin",
        flow_rows("lapin", 3.0),
    );
    check(
        "pubsub and fan-in at least 5x RabbitMQ with a client that is not the bottleneck (lean)",
        flow_rows("lean", 5.0),
    );
    check(
        "rpc-seq: embedded >= 1.2x RabbitMQ's calls/s, standalone never slower",
        vec![
            (
                "emb/rmq:".into(),
                vs("rpc-seq", rpc::CLIENT, rpc::RATE.name, Kind::Embedded),
                1.2,
                true,
            ),
            (
                "sa/rmq:".into(),
                vs("rpc-seq", rpc::CLIENT, rpc::RATE.name, Kind::Standalone),
                1.0,
                true,
            ),
        ],
    );
    let one_queue = scale_name(1, 1);
    check(
        "scale flat: 1,000 queues deliver >= 80% of the single-queue rate",
        [(1000, 1), (1000, 100)]
            .into_iter()
            .flat_map(|(queues, conns)| {
                let many = scale_name(queues, conns);
                [
                    (Kind::Embedded, "embedded"),
                    (Kind::Standalone, "standalone"),
                ]
                .map(|(kind, label)| {
                    let rate =
                        |scenario: &str| results.series(scenario, "lean", flow::RATE.name, kind);
                    // The scale rows are measured round by round together: paired too.
                    let flat = rate(&many)
                        .zip(rate(&one_queue))
                        .and_then(|(a, b)| a.ratio_to(b));
                    (
                        format!("{label} {queues}q/{conns}c vs 1q:"),
                        flat,
                        0.8,
                        true,
                    )
                })
            })
            .collect(),
    );
    // For reference: the 1,000 queues' cost alone, against one queue over as many
    // connections (the target above also counts what 100 connections cost).
    let same_connections: Vec<String> = [
        (Kind::Embedded, "embedded"),
        (Kind::Standalone, "standalone"),
    ]
    .into_iter()
    .filter_map(|(kind, label)| {
        let rate = |scenario: &str| results.series(scenario, "lean", flow::RATE.name, kind);
        let flat = rate(&scale_name(1000, 100))
            .zip(rate(&scale_name(1, 100)))
            .and_then(|(a, b)| a.ratio_to(b))?;
        Some(format!("{label} 1000q/100c vs 1q/100c: {}", num(flat)))
    })
    .collect();
    if !same_connections.is_empty() {
        out.push(Verdict {
            target: "for reference, not a target: 1,000 queues against 1 at 100 connections"
                .to_owned(),
            status: "INFO",
            detail: same_connections.join("; "),
        });
    }
    out
}

/// The verdicts as text.
pub(crate) fn verdict_text(verdicts: &[Verdict]) -> String {
    let mut out = String::from("\nTargets of issue 6 (this run's medians):\n");
    for v in verdicts.iter().filter(|v| v.status != "NOT MEASURED") {
        let _ = writeln!(out, "- [{}] {}: {}", v.status, v.target, v.detail);
    }
    out
}

/// Everything as JSON.
pub(crate) fn json(results: &Results, info: &RunInfo, verdicts: &[Verdict]) -> serde_json::Value {
    let mut figures = Vec::new();
    for row in &results.rows {
        for (kind, series) in &row.by_target {
            let Some(s) = series.summary() else { continue };
            figures.push(serde_json::json!({
                "scenario": row.scenario,
                "client": row.client,
                "metric": row.metric.name,
                "target": kind.name(),
                "median": s.median,
                "min": s.min,
                "max": s.max,
                "unit": row.metric.unit,
                "higher_is_better": row.metric.better == Better::Higher,
                "repeats": series.values.len(),
                "values": series.values,
                "measured": !series.reference,
                "client_cpu_cores": median_of(&series.client_cores),
                "client_busiest_thread": median_of(&series.busiest_thread),
                "broker_cpu_cores": median_of(&series.broker_cores),
            }));
        }
    }
    let floors: Vec<_> = results
        .floors
        .iter()
        .map(|(name, unit, s)| {
            serde_json::json!({
                "scenario": "floor",
                "metric": name,
                "target": "machine",
                "median": s.median,
                "min": s.min,
                "max": s.max,
                "unit": unit,
            })
        })
        .collect();
    let noise = summarize(&results.noise);
    serde_json::json!({
        "tool": "warren-bench",
        "quick": info.quick,
        "machine": info.machine,
        "duration_secs": info.duration_secs,
        "repeats": info.repeats,
        "targets": info.targets.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "load_avg_1m": { "start": info.load.0, "end": info.load.1 },
        "other_processes_cores": noise.map(|s| serde_json::json!({
            "median": s.median, "min": s.min, "max": s.max,
        })),
        "figures": figures,
        "floors": floors,
        "verdicts": verdicts.iter().map(|v| serde_json::json!({
            "target": v.target, "status": v.status, "detail": v.detail,
        })).collect::<Vec<_>>(),
    })
}
