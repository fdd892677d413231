//! floor: a plain TCP ping-pong (one byte each way, `TCP_NODELAY`) over loopback, inside one
//! `current_thread` runtime and across two threads: the physical floors of a round trip on
//! this machine, against which rpc-seq's p50 is reported (an RPC is at least two round
//! trips: client to broker to server, and back).

use crate::Result;
use crate::results::{Results, summarize};
use crate::runner::Plan;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The in-runtime floor's name.
pub(crate) const IN_RUNTIME: &str = "TCP ping-pong p50, one current_thread runtime";
/// The cross-thread floor's name.
pub(crate) const CROSS_THREAD: &str = "TCP ping-pong p50, across two threads";

/// Measures both floors.
pub(crate) async fn run(plan: &Plan, results: &mut Results) {
    let rounds = if plan.quick { 2_000 } else { 20_000 };
    for (name, outcome) in [
        (IN_RUNTIME, in_runtime(rounds).await),
        (CROSS_THREAD, cross_thread(rounds).await),
    ] {
        match outcome {
            Ok(rtts) => {
                if let Some(summary) = summarize(&rtts) {
                    results.floors.push((name.to_owned(), "us", summary));
                }
            }
            Err(e) => eprintln!("warren-bench: floor ({name}): {e}"),
        }
    }
    eprintln!("warren-bench: floor done");
}

/// Round trips in microseconds, with the echo server a task on this runtime.
async fn in_runtime(rounds: usize) -> Result<Vec<f64>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let _ = socket.set_nodelay(true);
        let mut byte = [0u8; 1];
        while socket.read_exact(&mut byte).await.is_ok() {
            if socket.write_all(&byte).await.is_err() {
                return;
            }
        }
    });
    let result = tokio::time::timeout(Duration::from_secs(30), ping(addr, rounds)).await;
    server.abort();
    result.map_err(|_| "ping-pong timed out")?
}

/// Round trips in microseconds, with the echo server a blocking thread of its own.
async fn cross_thread(rounds: usize) -> Result<Vec<f64>> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || {
        let Ok((mut socket, _)) = listener.accept() else {
            return;
        };
        let _ = socket.set_nodelay(true);
        let _ = socket.set_read_timeout(Some(Duration::from_secs(30)));
        let mut byte = [0u8; 1];
        while socket.read_exact(&mut byte).is_ok() {
            if socket.write_all(&byte).is_err() {
                return;
            }
        }
    });
    let result = tokio::time::timeout(Duration::from_secs(30), ping(addr, rounds)).await;
    // The client socket is closed by now: the thread ends.
    let _ = tokio::task::spawn_blocking(move || server.join()).await;
    result.map_err(|_| "ping-pong timed out")?
}

/// Connects and ping-pongs `rounds` times after a warm-up.
async fn ping(addr: std::net::SocketAddr, rounds: usize) -> Result<Vec<f64>> {
    let mut socket = TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let mut byte = [7u8; 1];
    let mut rtts = Vec::with_capacity(rounds);
    for i in 0..rounds + rounds / 10 {
        let started = Instant::now();
        socket.write_all(&byte).await?;
        socket.read_exact(&mut byte).await?;
        if i >= rounds / 10 {
            rtts.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(rtts)
}
