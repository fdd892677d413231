//! Waiting for the signal a program that runs a broker stops on.

/// Resolves when the process gets Ctrl-C (SIGINT) or, on Unix, SIGTERM: what the standalone
/// `warren-broker` and `fib-server` stop on, and what a program that embeds a broker (or
/// drives one, as `warren-bench` does) can wait for to shut down cleanly rather than die with
/// its children still running. Where a signal cannot be watched, it logs a warning and waits
/// for the other; where neither can, it never resolves (rather than at once).
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = warren_broker::Broker::start(Default::default()).await?;
/// warren_broker::wait_for_shutdown_signal().await;
/// broker.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub async fn wait_for_shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    watched = tokio::signal::ctrl_c() => {
                        if let Err(e) = watched {
                            tracing::warn!(error = %e, "cannot watch Ctrl-C; stopping on SIGTERM only");
                            terminate.recv().await;
                        }
                    }
                    _ = terminate.recv() => {}
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only"),
        }
    }
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::warn!(error = %e, "cannot watch Ctrl-C; this wait never ends");
        std::future::pending::<()>().await;
    }
}
