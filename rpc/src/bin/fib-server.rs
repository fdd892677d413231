//! `fib-server`: the seed's fib RPC server. Consumes the request queue and answers each
//! request with `fib(n)` (or an error reply), printing ` [x] Awaiting RPC requests` once it
//! consumes and ` [.] fib(n)` per request, like the seed. Stops gracefully on Ctrl-C or
//! SIGTERM. Logs go to stderr (`RUST_LOG`, default `info`).

use clap::Parser;
use std::{num::NonZeroU16, process::ExitCode};
use warren_rpc::{HandlerError, RpcServer, ServerConfig, fib};

/// The fib RPC server of the RabbitMQ tutorial, interoperable with its pika client.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Broker URL (default: $AMQP_URL, else amqp://guest:guest@127.0.0.1:5672/%2F)
    #[arg(long)]
    url: Option<String>,
    /// The request queue to declare and consume.
    #[arg(long, default_value = warren_rpc::DEFAULT_QUEUE)]
    queue: String,
    /// How many requests to take (and handle concurrently) before acking one.
    #[arg(long, default_value_t = NonZeroU16::MIN)]
    prefetch: NonZeroU16,
}

#[tokio::main]
async fn main() -> ExitCode {
    warren_rpc::init_logging();
    let args = Args::parse();
    let url = args.url.unwrap_or_else(warren_rpc::url_from_env);
    let config = ServerConfig {
        queue: args.queue,
        prefetch: args.prefetch,
    };
    let handler = |request: Vec<u8>| async move {
        let n = fib::parse_request(&request)?;
        println!(" [.] fib({n})");
        Ok::<_, HandlerError>(fib::fib(n)?.to_string().into_bytes())
    };
    let server = match RpcServer::connect(&url, config, handler).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("fib-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(" [x] Awaiting RPC requests");
    match server
        .run_until(warren_broker::wait_for_shutdown_signal())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fib-server: {e}");
            ExitCode::FAILURE
        }
    }
}
