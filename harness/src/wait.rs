//! Waiting for a condition, with a timeout and a clear failure message: never a sleep.

use std::future::Future;
use std::time::Duration;

/// How long the waiting helpers wait by default: generous, since CI shares 2 cores.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(5);

/// Awaits `fut` for at most [`DEFAULT_TIMEOUT`].
///
/// # Panics
/// On timeout, naming `what`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let answer = warren_harness::within("the answer", async { 42 }).await;
/// assert_eq!(answer, 42);
/// # }
/// ```
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(DEFAULT_TIMEOUT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {DEFAULT_TIMEOUT:?} waiting for {what}"),
    }
}

/// Polls `check` until it returns `Ok`, for at most `timeout`. `check` returns `Err(state)`
/// describing what it saw, which the failure message reports.
///
/// # Panics
/// On timeout, with `what` and the last state seen.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// let mut n = 0;
/// warren_harness::wait_until("n reaches 3", Duration::from_secs(5), || {
///     n += 1;
///     async move { if n >= 3 { Ok(()) } else { Err(format!("n = {n}")) } }
/// })
/// .await;
/// # }
/// ```
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    try_wait_until(what, timeout, check)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`wait_until`] that reports a timeout as an error instead of panicking: for property tests,
/// whose failing cases must return their error to be shrunk.
///
/// # Errors
/// On timeout: `what` and the last state seen.
pub async fn try_wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(state) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "timed out after {timeout:?} waiting until {what}; last seen: {state}"
                ));
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}
