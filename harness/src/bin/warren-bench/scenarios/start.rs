//! start: `Broker::start` to ready, and to the first completed handshake (lapin, and the lean
//! client), embedded; the standalone binary from spawn to its "listening" line and to the
//! first lapin handshake. RabbitMQ's cold start is a fixed reference, not measured.

use crate::Result;
use crate::lean::Lean;
use crate::results::{Metric, Results};
use crate::runner::Plan;
use crate::scenarios::flow::lapin_connect;
use crate::target::{Kind, Standalone};
use std::path::Path;
use std::time::{Duration, Instant};
use warren_broker::{Broker, BrokerConfig};

/// RabbitMQ 3.10's cold start on these machines (measured once, by hand), in microseconds.
const RABBITMQ_COLD_START_US: f64 = 8.6e6;

pub(crate) const READY: Metric = Metric::lower("to ready", "us");
const LAPIN: Metric = Metric::lower("to first lapin handshake", "us");
const LEAN: Metric = Metric::lower("to first lean handshake", "us");

/// Runs the start scenario.
pub(crate) async fn run(
    plan: &Plan,
    kinds: &[Kind],
    broker_bin: Option<&Path>,
    results: &mut Results,
) {
    let name = "start";
    if kinds.contains(&Kind::Embedded) {
        let reps = if plan.quick { 20 } else { 100 };
        for i in 0..reps + 1 {
            match embedded_once().await {
                // The first start pays for lazy statics and page faults: a warm-up.
                Ok(_) if i == 0 => {}
                Ok((ready, lapin, lean)) => {
                    results.record(name, "lapin", READY, Kind::Embedded, ready, None);
                    results.record(name, "lapin", LAPIN, Kind::Embedded, lapin, None);
                    results.record(name, "lean", LEAN, Kind::Embedded, lean, None);
                }
                Err(e) => {
                    eprintln!("warren-bench: start (embedded): {e}");
                    break;
                }
            }
        }
    }
    if kinds.contains(&Kind::Standalone)
        && let Some(bin) = broker_bin
    {
        let reps = if plan.quick { 3 } else { 10 };
        for _ in 0..reps {
            match standalone_once(bin).await {
                Ok((ready, lapin)) => {
                    results.record(name, "lapin", READY, Kind::Standalone, ready, None);
                    results.record(name, "lapin", LAPIN, Kind::Standalone, lapin, None);
                }
                Err(e) => {
                    eprintln!("warren-bench: start (standalone): {e}");
                    break;
                }
            }
        }
    }
    if kinds.contains(&Kind::RabbitMq) {
        results.reference(name, "lapin", READY, Kind::RabbitMq, RABBITMQ_COLD_START_US);
    }
    eprintln!("warren-bench: start done");
}

/// One embedded start: microseconds to ready, to the first lapin handshake, and (on a second
/// broker) to the first lean handshake.
async fn embedded_once() -> Result<(f64, f64, f64)> {
    let started = Instant::now();
    let broker = Broker::start(BrokerConfig::default()).await?;
    let ready = started.elapsed();
    let conn = lapin_connect(&broker.url()).await?;
    let lapin = started.elapsed();
    let _ = tokio::time::timeout(Duration::from_secs(3), conn.close(200, "bye".into())).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), broker.shutdown()).await;

    let started = Instant::now();
    let broker = Broker::start(BrokerConfig::default()).await?;
    let conn = Lean::connect(&broker.url()).await?;
    let lean = started.elapsed();
    conn.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(3), broker.shutdown()).await;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Ok((us(ready), us(lapin), us(lean)))
}

/// One standalone start: microseconds from spawn to ready and to the first lapin handshake.
async fn standalone_once(bin: &Path) -> Result<(f64, f64)> {
    let started = Instant::now();
    let broker = Standalone::spawn(bin).await?;
    let ready = broker.ready_after;
    let conn = lapin_connect(&broker.url).await;
    let lapin = started.elapsed();
    if let Ok(conn) = &conn {
        let _ = tokio::time::timeout(Duration::from_secs(3), conn.close(200, "bye".into())).await;
    }
    broker.stop().await;
    conn?;
    Ok((ready.as_secs_f64() * 1e6, lapin.as_secs_f64() * 1e6))
}
