//! Bounded polling: the replacement for `sleep` in tests.
//!
//! A fixed sleep is either too short (a flaky test on a loaded machine) or too long (a slow
//! suite). Polling a real condition with a deadline is as fast as the system allows and fails
//! with a message that says what never happened.

use std::thread;
use std::time::{Duration, Instant};

/// How often the condition is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` every 20 ms until it returns `true`.
///
/// `what` describes the awaited condition, e.g. `"member 2 to report healthy"`.
///
/// # Panics
///
/// Panics if `check` has not returned `true` within `timeout`, with `what` and the time waited.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    wait_for(timeout, what, || check().then_some(()));
}

/// Polls `check` every 20 ms until it returns `Some`, and returns that value.
///
/// # Panics
///
/// Panics if `check` has not returned `Some` within `timeout`, with `what` and the time waited.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        // Measured after the check, so a slow check cannot make the last poll look early.
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            panic!("testkit: timed out after {elapsed:.1?} (limit {timeout:?}) waiting for {what}");
        }
        thread::sleep(POLL_INTERVAL.min(timeout - elapsed));
    }
}

/// Polls the async `check` every 10 ms until it returns `Some`, and returns that value: the
/// [`wait_for`] of async code, which must not block its runtime's thread (feature `grpc`).
///
/// # Panics
///
/// Panics if `check` has not returned `Some` within `timeout`, with `what` and the time waited.
#[cfg(feature = "grpc")]
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            panic!("testkit: timed out after {elapsed:.1?} (limit {timeout:?}) waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10).min(timeout - elapsed)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value() {
        let mut calls = 0;
        let value = wait_for(Duration::from_secs(5), "the third call", || {
            calls += 1;
            (calls == 3).then_some(calls * 10)
        });
        assert_eq!(value, 30);
    }

    #[test]
    #[should_panic(expected = "waiting for the impossible")]
    fn panics_with_the_description() {
        wait_until(Duration::from_millis(50), "the impossible", || false);
    }

    #[test]
    fn gives_up_close_to_the_deadline() {
        let start = Instant::now();
        let result = std::panic::catch_unwind(|| {
            wait_until(Duration::from_millis(100), "nothing", || false);
        });
        assert!(result.is_err());
        let elapsed = start.elapsed();
        assert!(
            (Duration::from_millis(100)..Duration::from_secs(2)).contains(&elapsed),
            "gave up after {elapsed:?}"
        );
    }
}
