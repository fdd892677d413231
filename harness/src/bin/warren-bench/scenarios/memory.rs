//! memory: the resident memory of an idle broker, and bytes per message with N 16-byte
//! messages queued (N = 1,000,000; 100,000 with `--quick`).
//!
//! - embedded: measured in a fresh child process (this binary with `--probe-memory N`), so
//!   nothing the bench did before (freed but resident heap) hides the broker's growth: the RSS
//!   `Broker::start` adds, then (RSS with N queued - idle RSS) / N.
//! - standalone: a fresh `warren-broker` process's `VmRSS`, idle and with N queued.
//! - RabbitMQ: beam.smp's `VmRSS` (the whole node: not comparable as "idle"), and its growth
//!   with N queued / N.

use crate::Result;
use crate::lean::{self, Lean};
use crate::results::{Metric, Results};
use crate::runner::Plan;
use crate::sys;
use crate::target::{Kind, Standalone, Target};
use lapin::BasicProperties;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use warren_broker::{Broker, BrokerConfig};

/// Body size of the queued messages.
pub(crate) const BODY: usize = 16;
/// How long filling a queue may take.
const FILL_TIMEOUT: Duration = Duration::from_secs(180);

pub(crate) const IDLE: Metric = Metric::lower("idle RSS (embedded: added)", "KiB");
pub(crate) const PER_MSG: Metric = Metric::lower("RSS per queued msg", "B/msg");

/// Messages queued for the per-message figure.
pub(crate) fn messages(plan: &Plan) -> u64 {
    if plan.quick { 100_000 } else { 1_000_000 }
}

/// Runs the memory scenario.
pub(crate) async fn run(
    plan: &Plan,
    targets: &[Target],
    broker_bin: Option<&Path>,
    results: &mut Results,
) {
    let n = messages(plan);
    let name = format!("memory, {}k x 16 B queued", n / 1000);
    let name = name.as_str();
    for target in targets {
        let outcome = match target.kind {
            Kind::Embedded => embedded(n).await,
            Kind::Standalone => match broker_bin {
                Some(bin) => standalone(bin, plan, n).await,
                None => Err("no warren-broker binary".into()),
            },
            Kind::RabbitMq => rabbitmq(target, plan, n).await,
        };
        match outcome {
            Ok((idle_kib, per_msg)) => {
                if let Some(idle) = idle_kib {
                    results.record(name, "lean", IDLE, target.kind, idle, None);
                }
                results.record(name, "lean", PER_MSG, target.kind, per_msg, None);
            }
            Err(e) => eprintln!("warren-bench: memory on {}: {e}", target.kind.name()),
        }
    }
    eprintln!("warren-bench: memory done");
}

/// Embedded: runs the probe in a child process.
async fn embedded(n: u64) -> Result<(Option<f64>, f64)> {
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["--probe-memory", &n.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut text = String::new();
    tokio::time::timeout(FILL_TIMEOUT, stdout.read_to_string(&mut text))
        .await
        .map_err(|_| "the memory probe did not finish in time")??;
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let figures: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("bad probe output {text:?}: {e}"))?;
    let idle = figures["idle_added_kib"].as_f64().ok_or("no idle figure")?;
    let per_msg = figures["bytes_per_msg"]
        .as_f64()
        .ok_or("no per-message figure")?;
    Ok((Some(idle), per_msg))
}

/// The child side of the embedded figure: prints one JSON line.
pub(crate) async fn probe(n: u64) -> Result<()> {
    let base = sys::own_rss_kib();
    let broker = Broker::start(BrokerConfig::default()).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let idle = sys::own_rss_kib();
    let queue = format!("memory-probe-{}", std::process::id());
    let conn = fill(&broker.url(), &queue, n).await?;
    let full = sys::own_rss_kib();
    conn.close().await;
    println!(
        "{}",
        serde_json::json!({
            "base_kib": base,
            "idle_added_kib": idle.saturating_sub(base),
            "full_kib": full,
            "bytes_per_msg": (full.saturating_sub(idle) * 1024) as f64 / n as f64,
        })
    );
    broker.shutdown().await;
    Ok(())
}

/// Standalone: a fresh process, idle and with N queued.
async fn standalone(bin: &Path, plan: &Plan, n: u64) -> Result<(Option<f64>, f64)> {
    let broker = Standalone::spawn(bin).await?;
    let outcome: Result<(Option<f64>, f64)> = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let idle = sys::rss_kib(broker.pid).ok_or("cannot read the broker's RSS")?;
        let conn = fill(&broker.url, &plan.name("memory"), n).await?;
        let full = sys::rss_kib(broker.pid).ok_or("cannot read the broker's RSS")?;
        conn.close().await;
        Ok((
            Some(idle as f64),
            (full.saturating_sub(idle) * 1024) as f64 / n as f64,
        ))
    }
    .await;
    broker.stop().await;
    outcome
}

/// RabbitMQ: beam.smp's RSS before and with N queued; the queue is deleted afterwards.
async fn rabbitmq(target: &Target, plan: &Plan, n: u64) -> Result<(Option<f64>, f64)> {
    let pid = target.pid.ok_or("beam.smp not found")?;
    let before = sys::rss_kib(pid).ok_or("cannot read beam's RSS")?;
    let queue = plan.name("memory");
    let filled = fill(&target.url, &queue, n).await;
    let after = sys::rss_kib(pid).ok_or("cannot read beam's RSS");
    let mut conn = filled?;
    let deleted = conn.delete_many(1, std::slice::from_ref(&queue)).await;
    conn.close().await;
    deleted?;
    let after = after?;
    Ok((
        Some(before as f64),
        (after.saturating_sub(before) * 1024) as f64 / n as f64,
    ))
}

/// Declares `queue` and publishes N 16-byte messages to it; returns once the broker reports
/// all N ready (the connection, on channel 1, for the caller to clean up with). The queue is
/// exclusive, so it goes when the connection closes.
async fn fill(url: &str, queue: &str, n: u64) -> Result<Lean> {
    let mut conn = Lean::connect(url).await?;
    conn.open_channel(1).await?;
    conn.declare_many(1, &[queue.to_owned()], true, false)
        .await?;
    let prefix = lean::publish_prefix(1, queue, BasicProperties::default(), BODY);
    let body = [b'm'; BODY];
    let work = async {
        for _ in 0..n {
            conn.push_publish(1, &prefix, &body);
            conn.flush_when_full().await?;
        }
        conn.flush().await?;
        loop {
            let count = conn.message_count(1, queue).await?;
            if u64::from(count) >= n {
                return Ok::<(), crate::BoxError>(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(FILL_TIMEOUT, work)
        .await
        .map_err(|_| format!("{n} messages not queued within {FILL_TIMEOUT:?}"))??;
    Ok(conn)
}
