//! The standalone Warren broker, for clients in any language.
//!
//! ```text
//! warren-broker --listen 127.0.0.1:5673
//! ```
//! prints `warren listening on amqp://guest:guest@127.0.0.1:5673/%2F` once ready; logs go to
//! stderr (`RUST_LOG`); SIGINT or SIGTERM shut it down cleanly.

use clap::Parser;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;
use warren_broker::{Broker, BrokerConfig, BrokerHandle, Policy, User};

/// An AMQP 0-9-1 broker that behaves like RabbitMQ, for tests.
#[derive(Debug, Parser)]
#[command(name = "warren-broker", version)]
struct Args {
    /// Address to listen on. `localhost` binds every address it resolves to (IPv4 and IPv6);
    /// port 0 picks a free port. Defaults to loopback only.
    #[arg(long, default_value = "127.0.0.1:5672", value_name = "ADDR")]
    listen: String,
    /// A user allowed to log in, as NAME:PASSWORD (no tags; --definitions gives users tags).
    /// Repeatable. Default: guest:guest, tagged administrator.
    #[arg(long = "user", value_name = "NAME:PASSWORD", value_parser = parse_user)]
    users: Vec<User>,
    /// A vhost besides `/` (which always exists). Repeatable.
    #[arg(long = "vhost", value_name = "NAME")]
    vhosts: Vec<String>,
    /// Largest frame in bytes, offered in connection.tune (RabbitMQ's default).
    #[arg(long, default_value_t = 131_072)]
    frame_max: u32,
    /// Most channels open at once on one connection, offered in connection.tune.
    #[arg(long, default_value_t = 2047)]
    channel_max: u16,
    /// Heartbeat interval in seconds offered in connection.tune (0 disables).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    heartbeat: u64,
    /// Most client connections at once; further ones are closed at once. Default: unlimited.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Largest message body accepted, in bytes.
    #[arg(long, default_value_t = 128 * 1024 * 1024, value_name = "BYTES")]
    max_message_size: u64,
    /// Seconds a client has to complete the AMQP handshake.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    handshake_timeout: u64,
    /// Milliseconds a delivery may wait for its ack before its channel is closed with 406
    /// (RabbitMQ's consumer_timeout; 0 never).
    #[arg(long, default_value_t = 1_800_000, value_name = "MS")]
    consumer_timeout: u64,
    /// A policy, as JSON in the shape of RabbitMQ's definitions export (its vhost must exist), e.g.
    /// '{"name":"DLX","pattern":"^jobs$","apply-to":"queues","definition":{"dead-letter-exchange":"dlx"}}'.
    /// Repeatable.
    #[arg(long = "policy", value_name = "JSON")]
    policies: Vec<String>,
    /// RabbitMQ definitions to load at start (the JSON of `rabbitmqctl export_definitions`):
    /// users (with their tags and limits), vhosts, permissions, topic permissions, vhost
    /// limits, policies, queues, exchanges and bindings.
    #[arg(long, value_name = "FILE")]
    definitions: Option<std::path::PathBuf>,
}

fn parse_user(text: &str) -> Result<User, String> {
    match text.split_once(':') {
        Some((name, password)) if !name.is_empty() => Ok(User::new(name, password)),
        _ => Err("expected NAME:PASSWORD".to_owned()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let users = if args.users.is_empty() {
        vec![User::guest()]
    } else {
        args.users
    };
    let config = BrokerConfig {
        listen: args.listen,
        users,
        vhosts: args.vhosts,
        frame_max: args.frame_max,
        channel_max: args.channel_max,
        heartbeat: Duration::from_secs(args.heartbeat),
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        max_message_size: args.max_message_size,
        max_connections: args.max_connections,
        trace: false,
        consumer_timeout: (args.consumer_timeout > 0)
            .then(|| Duration::from_millis(args.consumer_timeout)),
    };
    let broker = match Broker::start(config).await {
        Ok(broker) => broker,
        Err(e) => {
            eprintln!("warren-broker: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = load_setup(&broker, args.definitions.as_deref(), &args.policies) {
        eprintln!("warren-broker: {e}");
        broker.shutdown().await;
        return ExitCode::FAILURE;
    }
    for addr in broker.local_addrs() {
        if addr.ip().is_loopback() {
            tracing::info!("listening on {addr} (loopback only)");
        } else {
            tracing::warn!("listening on {addr}: reachable from other machines");
        }
    }
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "warren listening on {}", broker.url());
    let _ = stdout.flush();
    warren_broker::wait_for_shutdown_signal().await;
    tracing::info!("shutting down");
    broker.shutdown().await;
    ExitCode::SUCCESS
}

/// Loads the definitions file, then sets the `--policy` policies; says what was refused.
fn load_setup(
    broker: &BrokerHandle,
    definitions: Option<&std::path::Path>,
    policies: &[String],
) -> Result<(), String> {
    if let Some(path) = definitions {
        let json = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let loaded = broker
            .load_definitions(&json)
            .map_err(|e| format!("definitions {}: {e}", path.display()))?;
        tracing::info!(?loaded, "loaded definitions from {}", path.display());
    }
    for text in policies {
        let policy = Policy::from_json(text).map_err(|e| format!("policy {text}: {e}"))?;
        let name = policy.name.clone();
        broker
            .set_policy(policy)
            .map_err(|e| format!("policy {name}: {e}"))?;
    }
    Ok(())
}
