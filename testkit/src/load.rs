//! An open-loop load generator that records every call (feature `grpc`).
//!
//! Open loop means calls are sent on a clock, not when the previous one completes: a stalled
//! instance then shows up as failed or slow calls instead of silently lowering the rate
//! (coordinated omission). Each call runs in its own task and is recorded with its send time,
//! latency and outcome: the address that served it, or the caller's description of the failure.
//!
//! The generator knows nothing about the client it drives: it takes a function that makes one
//! call. The tests drive a `BalancedChannel` with it and the benchmark drives every client it
//! compares, so both count calls the same way.

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    task::{JoinHandle, JoinSet},
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

/// One call of a load.
#[derive(Debug, Clone)]
pub struct Call<E> {
    /// When it was sent.
    pub sent: Instant,
    /// How long it took to complete (or fail).
    pub latency: Duration,
    /// The address that served it, or how it failed.
    pub outcome: Result<String, E>,
}

impl<E> Call<E> {
    /// When it completed.
    pub fn done(&self) -> Instant {
        self.sent + self.latency
    }

    /// Whether `addr` served it.
    pub fn served_by(&self, addr: &str) -> bool {
        matches!(&self.outcome, Ok(served) if served == addr)
    }
}

/// What a wait on a [`Load`] gave up on.
#[derive(Debug, Clone)]
pub struct TimedOut(String);

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TimedOut {}

/// How often the waits look at the record of calls (the load itself runs on its own clock).
const POLL: Duration = Duration::from_millis(5);

/// A steady call rate, one call every `every`, each in its own task, until [`Load::finish`].
pub struct Load<E> {
    calls: Arc<Mutex<Vec<Call<E>>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl<E> fmt::Debug for Load<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Load")
            .field(
                "calls",
                &self
                    .calls
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .len(),
            )
            .finish()
    }
}

impl<E: Clone + Send + 'static> Load<E> {
    /// Starts calling `call` once every `every`, at once and then on that clock. A call that falls
    /// behind never holds back the next one; a late tick is sent at once, keeping the rate.
    pub fn start<F, Fut>(every: Duration, call: F) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
    {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(schedule(
            every.max(Duration::from_micros(1)),
            call,
            calls.clone(),
            stop.clone(),
        ));
        Self { calls, stop, task }
    }

    /// Starts calling `call` `per_second` times a second.
    pub fn per_second<F, Fut>(per_second: u32, call: F) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
    {
        Self::start(Duration::from_secs(1) / per_second.max(1), call)
    }

    /// The calls completed so far.
    pub fn calls(&self) -> Vec<Call<E>> {
        self.record().clone()
    }

    fn record(&self) -> std::sync::MutexGuard<'_, Vec<Call<E>>> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until each of `addrs` served a call sent at or after `since`; returns when the last
    /// of them first did (the completion time of its earliest such call).
    ///
    /// # Errors
    ///
    /// When they did not all within `timeout`, naming those that did not.
    pub async fn wait_served_since(
        &self,
        addrs: &[&str],
        since: Instant,
        timeout: Duration,
    ) -> Result<Instant, TimedOut> {
        let deadline = Instant::now() + timeout;
        loop {
            let firsts: Vec<Option<Instant>> = {
                let calls = self.record();
                addrs
                    .iter()
                    .map(|addr| {
                        calls
                            .iter()
                            .filter(|c| c.sent >= since && c.served_by(addr))
                            .map(Call::done)
                            .min()
                    })
                    .collect()
            };
            if firsts.iter().all(Option::is_some) {
                return Ok(firsts.into_iter().flatten().max().unwrap_or(since));
            }
            if Instant::now() >= deadline {
                let missing: Vec<&str> = addrs
                    .iter()
                    .zip(&firsts)
                    .filter(|(_, first)| first.is_none())
                    .map(|(addr, _)| *addr)
                    .collect();
                return Err(TimedOut(format!(
                    "no call sent since the mark was served by {missing:?} within {timeout:?}"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `n` calls sent at or after `since` have completed.
    ///
    /// # Errors
    ///
    /// When fewer did within `timeout`, saying how many.
    pub async fn wait_calls_since(
        &self,
        since: Instant,
        n: usize,
        timeout: Duration,
    ) -> Result<(), TimedOut> {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.record().iter().filter(|c| c.sent >= since).count();
            if done >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TimedOut(format!(
                    "{done} of {n} calls completed within {timeout:?}"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops sending, waits for the calls in flight (each is bounded by the caller's deadline)
    /// and returns every call made.
    pub async fn finish(mut self) -> Vec<Call<E>> {
        self.stop.cancel();
        if let Err(e) = (&mut self.task).await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        self.calls()
    }
}

impl<E> Drop for Load<E> {
    fn drop(&mut self) {
        // A load dropped without `finish` (a failed assertion) sends no more calls.
        self.task.abort();
    }
}

async fn schedule<E, F, Fut>(
    every: Duration,
    call: F,
    calls: Arc<Mutex<Vec<Call<E>>>>,
    stop: CancellationToken,
) where
    E: Send + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<String, E>> + Send + 'static,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut in_flight = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => continue,
        }
        let (attempt, calls) = (call(), calls.clone());
        in_flight.spawn(async move {
            let sent = Instant::now();
            let outcome = attempt.await;
            let call = Call {
                sent,
                latency: sent.elapsed(),
                outcome,
            };
            calls
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(call);
        });
    }
    while in_flight.join_next().await.is_some() {}
}

/// The number of failed calls.
pub fn failed<'a, E: 'a>(calls: impl IntoIterator<Item = &'a Call<E>>) -> usize {
    calls.into_iter().filter(|c| c.outcome.is_err()).count()
}

/// Failed calls by failure, most frequent first, e.g. `Unavailable: 3, DeadlineExceeded: 1`, or
/// `none`.
pub fn failures_by_cause<'a, E: fmt::Debug + 'a>(
    calls: impl IntoIterator<Item = &'a Call<E>>,
) -> String {
    let mut by_cause: BTreeMap<String, usize> = BTreeMap::new();
    for call in calls {
        if let Err(cause) = &call.outcome {
            *by_cause.entry(format!("{cause:?}")).or_default() += 1;
        }
    }
    if by_cause.is_empty() {
        return "none".to_owned();
    }
    let mut by_count: Vec<_> = by_cause.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    by_count
        .iter()
        .map(|(cause, n)| format!("{cause}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The p-th percentile (0-100) of the latencies of the successful calls that match `filter`, or
/// zero when none do.
pub fn percentile<E>(calls: &[Call<E>], p: f64, filter: impl Fn(&Call<E>) -> bool) -> Duration {
    let mut latencies: Vec<_> = calls
        .iter()
        .filter(|c| c.outcome.is_ok() && filter(c))
        .map(|c| c.latency)
        .collect();
    latencies.sort();
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (latencies.len() - 1) as f64).round() as usize;
    latencies[rank.min(latencies.len() - 1)]
}

/// Asserts that no call failed, naming `what` and the first failure.
///
/// # Panics
///
/// When a call failed.
pub fn assert_no_failures<E: fmt::Debug>(what: &str, calls: &[Call<E>]) {
    let failed: Vec<_> = calls.iter().filter(|c| c.outcome.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} calls failed ({}), first: {:?}",
        failed.len(),
        calls.len(),
        failures_by_cause(calls.iter()),
        failed.first()
    );
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A call that alternates: "a" serves the even ones, the odd ones fail.
    fn alternating() -> impl Fn() -> std::future::Ready<Result<String, &'static str>> {
        let n = Arc::new(AtomicUsize::new(0));
        move || {
            let i = n.fetch_add(1, Ordering::SeqCst);
            std::future::ready(if i % 2 == 0 {
                Ok("a".to_owned())
            } else {
                Err("refused")
            })
        }
    }

    #[tokio::test]
    async fn records_every_call_and_finish_returns_them_all() {
        let since = Instant::now();
        let load = Load::start(Duration::from_millis(1), alternating());
        load.wait_calls_since(since, 20, Duration::from_secs(10))
            .await
            .unwrap();
        let served = load
            .wait_served_since(&["a"], since, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(served >= since);
        let calls = load.finish().await;
        assert!(calls.len() >= 20, "{} calls", calls.len());
        let failed = failed(&calls);
        // Calls complete in any order, but they alternate when sent.
        assert!(
            failed.abs_diff(calls.len() - failed) <= 1,
            "{failed} of {}",
            calls.len()
        );
        assert!(calls.iter().all(|c| c.sent >= since && c.done() >= c.sent));
    }

    #[tokio::test]
    async fn a_wait_that_gives_up_names_the_addresses_that_never_served() {
        let load = Load::start(Duration::from_millis(1), alternating());
        let error = load
            .wait_served_since(&["a", "b"], Instant::now(), Duration::from_millis(100))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains(r#"["b"]"#), "{error}");
        let error = load
            .wait_calls_since(Instant::now(), 1_000_000, Duration::from_millis(50))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("of 1000000 calls"), "{error}");
    }

    fn call(latency_ms: u64, outcome: Result<&str, &'static str>) -> Call<&'static str> {
        Call {
            sent: Instant::now(),
            latency: Duration::from_millis(latency_ms),
            outcome: outcome.map(str::to_owned),
        }
    }

    #[test]
    fn failures_are_counted_by_cause_most_frequent_first() {
        let calls = [
            call(1, Err("Unavailable")),
            call(1, Ok("a")),
            call(1, Err("DeadlineExceeded")),
            call(1, Err("Unavailable")),
        ];
        assert_eq!(
            failures_by_cause(&calls),
            r#""Unavailable": 2, "DeadlineExceeded": 1"#
        );
        assert_eq!(failures_by_cause(&calls[1..2]), "none");
        assert_eq!(failed(&calls), 3);
    }

    #[test]
    fn percentiles_take_only_successful_matching_calls() {
        let calls: Vec<_> = (1..=100)
            .map(|ms| call(ms, Ok("a")))
            .chain([call(10_000, Err("Unavailable"))])
            .collect();
        assert_eq!(
            percentile(&calls, 50.0, |_| true),
            Duration::from_millis(51)
        );
        assert_eq!(
            percentile(&calls, 100.0, |_| true),
            Duration::from_millis(100)
        );
        assert_eq!(
            percentile(&calls, 99.0, |c| c.latency < Duration::from_millis(10)),
            Duration::from_millis(9)
        );
        assert_eq!(percentile(&calls, 99.0, |_| false), Duration::ZERO);
    }

    #[test]
    #[should_panic(expected = "the test: 1 of 2 calls failed")]
    fn assert_no_failures_names_the_first_failure() {
        assert_no_failures("the test", &[call(1, Ok("a")), call(1, Err("Unavailable"))]);
    }
}
