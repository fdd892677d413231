//! `fib-client N...`: asks the fib server for each `N` (all in flight at once) and prints each
//! result as a bare decimal line on stdout, in the order given. On the first error (remote
//! error, timeout, no route, lost connection) it prints a clear message on stderr and exits 1.

use clap::Parser;
use futures_util::{StreamExt, stream};
use std::{process::ExitCode, time::Duration};
use warren_rpc::{ClientConfig, RpcClient, client::parse_u128_reply};

/// Most requests in flight at once.
const MAX_IN_FLIGHT: usize = 256;

/// The fib RPC client of the RabbitMQ tutorial, interoperable with its pika server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Broker URL (default: $AMQP_URL, else amqp://guest:guest@127.0.0.1:5672/%2F)
    #[arg(long)]
    url: Option<String>,
    /// The request queue.
    #[arg(long, default_value = warren_rpc::DEFAULT_QUEUE)]
    queue: String,
    /// Seconds to wait for each reply (also the requests' expiration).
    #[arg(long, default_value = "10", value_parser = parse_seconds)]
    timeout: Duration,
    /// The n of each fib(n) to ask for, sent as given (so bad requests can be tried too).
    #[arg(required = true, allow_hyphen_values = true, value_name = "N")]
    n: Vec<String>,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs.is_finite() => Ok(Duration::from_secs_f64(secs)),
        _ => Err(format!(
            "expected a positive number of seconds, got {text:?}"
        )),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    warren_rpc::init_logging();
    let args = Args::parse();
    let url = args.url.unwrap_or_else(warren_rpc::url_from_env);
    let config = ClientConfig {
        queue: args.queue,
        timeout: args.timeout,
    };
    let client = match RpcClient::connect(&url, config).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("fib-client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut results = stream::iter(args.n)
        .map(|n| {
            let client = client.clone();
            async move {
                let result = client.call(n.as_bytes()).await;
                (n, result.and_then(|reply| parse_u128_reply(&reply)))
            }
        })
        .buffered(MAX_IN_FLIGHT);
    let mut code = ExitCode::SUCCESS;
    while let Some((n, result)) = results.next().await {
        match result {
            Ok(value) => println!("{value}"),
            Err(e) => {
                eprintln!("fib-client: fib({n}) failed: {e}");
                code = ExitCode::FAILURE;
                break;
            }
        }
    }
    drop(results);
    client.close().await;
    code
}
