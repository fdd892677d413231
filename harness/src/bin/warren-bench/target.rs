//! The brokers a run measures: Warren embedded in the bench's own runtime, Warren as the
//! standalone `warren-broker` process, and RabbitMQ (when it answers).

use crate::Result;
use crate::lean::Lean;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use warren_broker::{Broker, BrokerConfig, BrokerHandle};

/// How long a standalone broker may take to print its address.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Which broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// `Broker::start` on the bench's own `current_thread` runtime.
    Embedded,
    /// The `warren-broker` binary, as another process.
    Standalone,
    /// The RabbitMQ at `AMQP_URL` (or the local one).
    RabbitMq,
}

impl Kind {
    /// Every kind, in table order.
    pub(crate) const ALL: [Kind; 3] = [Kind::Embedded, Kind::Standalone, Kind::RabbitMq];

    /// Its name in tables and JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Embedded => "embedded",
            Kind::Standalone => "standalone",
            Kind::RabbitMq => "rabbitmq",
        }
    }
}

/// A broker to measure.
#[derive(Debug)]
pub(crate) struct Target {
    /// Which one.
    pub(crate) kind: Kind,
    /// Its URL.
    pub(crate) url: String,
    /// Its process, when it is another process on this machine (for CPU and memory).
    pub(crate) pid: Option<u32>,
}

/// A running standalone broker; killed when dropped.
#[derive(Debug)]
pub(crate) struct Standalone {
    child: Child,
    /// Its URL.
    pub(crate) url: String,
    /// Its pid.
    pub(crate) pid: u32,
    /// How long it took from spawn to printing its address.
    pub(crate) ready_after: Duration,
}

impl Standalone {
    /// Spawns `warren-broker --listen 127.0.0.1:0` and waits for its address.
    pub(crate) async fn spawn(bin: &Path) -> Result<Self> {
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            // A process group of its own: a Ctrl-C in the terminal reaches the bench alone,
            // which tears down on the broker before it stops it.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let pid = child.id().ok_or("the broker exited at once")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(READY_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| "the standalone broker did not print its address in time")??
            .ok_or("the standalone broker exited before it was ready")?;
        let ready_after = started.elapsed();
        let url = line
            .strip_prefix("warren listening on ")
            .ok_or_else(|| format!("unexpected first line from the broker: {line:?}"))?
            .trim()
            .to_owned();
        // Keep reading (and discarding) its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            url,
            pid,
            ready_after,
        })
    }

    /// Stops it (SIGKILL) and reaps it.
    pub(crate) async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// Where the `warren-broker` binary is: `--broker-bin`, else next to this executable. When
/// run by `cargo run`, builds it first (a no-op when it is fresh) so the standalone rows never
/// measure a stale broker.
pub(crate) fn broker_binary(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or("the executable has no directory")?;
    let bin = dir.join("warren-broker");
    if let Ok(cargo) = std::env::var("CARGO") {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut build = std::process::Command::new(cargo);
        build.args([
            "build",
            "--quiet",
            "-p",
            "warren-broker",
            "--bin",
            "warren-broker",
        ]);
        build.arg("--manifest-path").arg(&manifest);
        if dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        if let Some(target_dir) = dir.parent() {
            build.arg("--target-dir").arg(target_dir);
        }
        eprintln!("warren-bench: building warren-broker (cargo build -p warren-broker)");
        let status = build.status()?;
        if !status.success() {
            return Err("building warren-broker failed".into());
        }
    }
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: build it (cargo build --release -p warren-broker) or pass --broker-bin",
            bin.display()
        )
        .into())
    }
}

/// The targets of a run, and what keeps them alive.
#[derive(Debug, Default)]
pub(crate) struct Targets {
    /// The targets that are up, in table order.
    pub(crate) list: Vec<Target>,
    /// The embedded broker.
    pub(crate) embedded: Option<BrokerHandle>,
    /// The standalone broker.
    pub(crate) standalone: Option<Standalone>,
}

impl Targets {
    /// Starts the Warren targets that were asked for and probes RabbitMQ; says on stderr why a
    /// target is skipped.
    pub(crate) async fn start(
        wanted: &[Kind],
        broker_bin: Option<&Path>,
        rabbit_url: &str,
    ) -> Self {
        let mut targets = Self::default();
        if wanted.contains(&Kind::Embedded) {
            match Broker::start(BrokerConfig::default()).await {
                Ok(handle) => {
                    targets.list.push(Target {
                        kind: Kind::Embedded,
                        url: handle.url(),
                        pid: None,
                    });
                    targets.embedded = Some(handle);
                }
                Err(e) => eprintln!("warren-bench: skipping embedded: {e}"),
            }
        }
        if wanted.contains(&Kind::Standalone) {
            match broker_bin {
                Some(bin) => match Standalone::spawn(bin).await {
                    Ok(standalone) => {
                        targets.list.push(Target {
                            kind: Kind::Standalone,
                            url: standalone.url.clone(),
                            pid: Some(standalone.pid),
                        });
                        targets.standalone = Some(standalone);
                    }
                    Err(e) => eprintln!("warren-bench: skipping standalone: {e}"),
                },
                None => eprintln!("warren-bench: skipping standalone: no warren-broker binary"),
            }
        }
        if wanted.contains(&Kind::RabbitMq) {
            match probe(rabbit_url).await {
                Ok(()) => {
                    // The broker's process, if it listens on this machine: its CPU and memory.
                    let pid = rabbit_url
                        .parse::<amq_protocol::uri::AMQPUri>()
                        .ok()
                        .filter(|uri| {
                            matches!(
                                uri.authority.host.as_str(),
                                "127.0.0.1" | "localhost" | "::1"
                            )
                        })
                        .and_then(|uri| crate::sys::find_listener(uri.authority.port));
                    match &pid {
                        Some((pid, comm)) => {
                            eprintln!(
                                "warren-bench: the AMQP_URL broker is local: {comm} (pid {pid})"
                            )
                        }
                        None => eprintln!(
                            "warren-bench: the AMQP_URL broker's process is not local: its CPU and memory are not measured"
                        ),
                    }
                    targets.list.push(Target {
                        kind: Kind::RabbitMq,
                        url: rabbit_url.to_owned(),
                        pid: pid.map(|(pid, _)| pid),
                    });
                }
                Err(e) => eprintln!("warren-bench: skipping RabbitMQ: {e}"),
            }
        }
        targets
    }

    /// Stops the Warren targets.
    pub(crate) async fn stop(self) {
        if let Some(standalone) = self.standalone {
            standalone.stop().await;
        }
        if let Some(embedded) = self.embedded {
            let _ = tokio::time::timeout(Duration::from_secs(5), embedded.shutdown()).await;
        }
    }
}

/// Whether a broker answers an AMQP handshake within 3 seconds.
async fn probe(url: &str) -> Result<()> {
    let conn = tokio::time::timeout(Duration::from_secs(3), Lean::connect(url))
        .await
        .map_err(|_| "no AMQP handshake within 3 s")??;
    conn.close().await;
    Ok(())
}
