//! `fib-demo N`: the whole RPC in one process, no external service: starts an embedded Warren
//! broker, a fib server and a client, prints `fib(N) = RESULT` and exits 0 (1 on any error).

use clap::Parser;
use std::process::ExitCode;
use warren_broker::{Broker, BrokerConfig};
use warren_rpc::{ClientConfig, RpcClient, RpcError, RpcServer, ServerConfig, fib::FibHandler};

/// Computes fib(N) through an RPC server and client on an embedded Warren broker.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The n of fib(n), 0 to 186.
    n: u64,
    /// Use this broker instead of an embedded one (for development); the demo then uses a
    /// queue of its own, deleted at the end.
    #[arg(long, hide = true)]
    url: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    warren_rpc::init_logging();
    let args = Args::parse();
    let (url, broker, queue) = match args.url {
        Some(url) => {
            let queue = format!("fib-demo-{}", uuid::Uuid::new_v4().simple());
            (url, None, queue)
        }
        None => match Broker::start(BrokerConfig::default()).await {
            Ok(broker) => (
                broker.url(),
                Some(broker),
                warren_rpc::DEFAULT_QUEUE.to_owned(),
            ),
            Err(e) => {
                eprintln!("fib-demo: cannot start the embedded broker: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let result = demo(&url, &queue, broker.is_none(), args.n).await;
    if let Some(broker) = broker {
        broker.shutdown().await;
    }
    match result {
        Ok(value) => {
            println!("fib({}) = {value}", args.n);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fib-demo: fib({}) failed: {e}", args.n);
            ExitCode::FAILURE
        }
    }
}

/// Serves and calls fib(n) once; deletes the queue afterwards when asked to.
async fn demo(url: &str, queue: &str, delete_queue: bool, n: u64) -> Result<u128, RpcError> {
    let server_config = ServerConfig {
        queue: queue.to_owned(),
        ..ServerConfig::default()
    };
    let server = RpcServer::connect(url, server_config, FibHandler).await?;
    let client_config = ClientConfig {
        queue: queue.to_owned(),
        ..ClientConfig::default()
    };
    let result = match RpcClient::connect(url, client_config).await {
        Ok(client) => {
            let result = client.fib(n).await;
            client.close().await;
            result
        }
        Err(e) => Err(e),
    };
    let stopped = server.shutdown().await;
    if delete_queue {
        delete(url, queue).await?;
    }
    let value = result?;
    stopped?;
    Ok(value)
}

/// Deletes the demo's queue on an external broker.
async fn delete(url: &str, queue: &str) -> Result<(), RpcError> {
    let conn = warren_rpc::connect(url).await?;
    let lapin_err = |e: lapin::Error| RpcError::Protocol(format!("deleting {queue}: {e}"));
    let channel = conn.create_channel().await.map_err(lapin_err)?;
    channel
        .queue_delete(queue.into(), Default::default())
        .await
        .map_err(lapin_err)?;
    conn.close(200, "OK".into()).await.map_err(lapin_err)
}
