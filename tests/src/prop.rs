//! What the property tests share: a bounded step that reports instead of panicking (a failing
//! case must return its error to proptest, which then shrinks it), the case counts, and a
//! runner that gives every case one broker and a time limit.

use crate::TIMEOUT;
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::future::Future;
use std::time::Duration;
use warren_harness::TestBroker;

/// Awaits `fut` for at most [`TIMEOUT`], naming `what` on timeout or error.
///
/// # Errors
/// `what` and the error, or `what` and the timeout.
pub async fn step<T, E: std::fmt::Display>(
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: nothing within {TIMEOUT:?}")),
    }
}

/// Case counts: more on the embedded broker, fewer against RabbitMQ; `PROPTEST_CASES` wins.
pub fn config(embedded_cases: u32, external_cases: u32, max_shrink_iters: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if crate::external() {
            external_cases
        } else {
            embedded_cases
        });
    Config {
        cases,
        max_shrink_iters,
        max_shrink_time: 30_000,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Runs a property on one current-thread runtime and one broker shared by every case; each
/// case must end within `case_limit`. `cases` is (embedded, external), see [`config`].
///
/// # Panics
/// With proptest's report (the shrunk failing case) when the property fails.
pub fn run_property<S, F>(
    cases: (u32, u32),
    max_shrink_iters: u32,
    case_limit: Duration,
    strategy: S,
    case: F,
) where
    S: Strategy,
    S::Value: Clone + std::fmt::Debug,
    F: AsyncFn(&TestBroker, S::Value) -> Result<(), String>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let broker = runtime.block_on(TestBroker::start());
    let mut runner = TestRunner::new(config(cases.0, cases.1, max_shrink_iters));
    let result = runner.run(&strategy, |value| {
        let outcome = runtime
            .block_on(async { tokio::time::timeout(case_limit, case(&broker, value)).await });
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TestCaseError::fail(e)),
            Err(_) => Err(TestCaseError::fail(format!(
                "the case did not end within {case_limit:?}"
            ))),
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
