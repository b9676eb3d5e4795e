//! Load generators: an open-loop rate that counts every call, and closed-loop workers that measure
//! throughput.
//!
//! Open loop means calls are sent on a clock, not when the previous one completes: a stalled
//! instance then shows up as failed or slow calls instead of silently lowering the rate
//! (coordinated omission). Every call is recorded with its send time, latency and outcome.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    task::JoinSet,
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

use crate::{
    clients::{self, Client, Kind, Outcome},
    fixture::Fixture,
};

/// One call of a load.
#[derive(Debug, Clone)]
pub struct Call {
    /// When it was sent.
    pub sent: Instant,
    /// How long it took to complete (or fail).
    pub latency: Duration,
    /// Who served it, or how it failed.
    pub outcome: Outcome,
}

impl Call {
    /// When it completed.
    pub fn done(&self) -> Instant {
        self.sent + self.latency
    }
}

/// A steady call rate through one client, each call in its own task.
#[derive(Debug)]
pub struct Load {
    client: Client,
    calls: Arc<Mutex<Vec<Call>>>,
    stop: CancellationToken,
    tasks: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Starts calling `per_second` times a second.
    pub fn start(client: Client, per_second: u32) -> Load {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let every = Duration::from_secs(1) / per_second.max(1);
        let tasks = tokio::spawn(schedule(client.clone(), every, calls.clone(), stop.clone()));
        Load {
            client,
            calls,
            stop,
            tasks,
        }
    }

    /// The client under load.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The calls completed so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until a call sent at or after `since` was served by `addr`; returns when it completed.
    ///
    /// # Errors
    /// When none did within `timeout`.
    pub async fn wait_served_by(
        &self,
        addr: &str,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let first = self
                .calls
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .filter(|c| c.sent >= since && c.outcome.as_deref() == Ok(addr))
                .map(Call::done)
                .min();
            if let Some(done) = first {
                return Ok(done);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{:?}: no call served by {addr} within {timeout:?}",
                    self.client
                );
            }
            // Polling the record of calls; the load itself runs on its own clock.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops sending, waits for the calls in flight (each bounded by the call deadline) and returns
    /// every call.
    pub async fn finish(self) -> Vec<Call> {
        self.stop.cancel();
        let Load { calls, tasks, .. } = self;
        if let Err(e) = tasks.await {
            tracing::warn!(error = %e, "the load task failed");
        }
        let calls = calls.lock().unwrap_or_else(PoisonError::into_inner);
        calls.clone()
    }
}

/// Starts one client of each kind against `fixture`'s servers, waits until each has called every
/// server, and puts each under an open-loop load of `per_second` calls.
///
/// # Errors
/// When a client cannot start or does not reach every server within 10 s.
pub async fn start_each(
    kinds: &[Kind],
    fixture: &Fixture,
    per_second: u32,
) -> anyhow::Result<Vec<Load>> {
    let addrs = fixture.addrs();
    let mut loads = Vec::new();
    for &kind in kinds {
        let client = clients::start(kind, &fixture.etcd, &addrs).await?;
        client.warm_up(&addrs, Duration::from_secs(10)).await?;
        loads.push(Load::start(client, per_second));
    }
    Ok(loads)
}

/// Stops every load whose calls are no longer needed.
pub async fn finish_all(loads: Vec<Load>) {
    for load in loads {
        load.finish().await;
    }
}

async fn schedule(
    client: Client,
    every: Duration,
    calls: Arc<Mutex<Vec<Call>>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    // Open loop: a late tick is sent at once, keeping the rate over time.
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut in_flight = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => continue,
        }
        let (client, calls) = (client.clone(), calls.clone());
        in_flight.spawn(async move {
            let sent = Instant::now();
            let outcome = client.call().await;
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
    // Every call ends by its own deadline.
    while in_flight.join_next().await.is_some() {}
}

/// Failed calls by status code, e.g. `Unavailable: 3, DeadlineExceeded: 1`, or `none`.
pub fn failures_by_code<'a>(calls: impl IntoIterator<Item = &'a Call>) -> String {
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    for call in calls {
        if let Err(code) = &call.outcome {
            *by_code.entry(format!("{code:?}")).or_default() += 1;
        }
    }
    if by_code.is_empty() {
        return "none".to_owned();
    }
    by_code
        .iter()
        .map(|(code, n)| format!("{code}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The number of failed calls.
pub fn failed<'a>(calls: impl IntoIterator<Item = &'a Call>) -> usize {
    calls.into_iter().filter(|c| c.outcome.is_err()).count()
}

/// What closed-loop workers measured.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// Successful calls per second.
    pub qps: f64,
    /// Latencies of successful calls, in milliseconds.
    pub latencies_ms: Vec<f64>,
    /// Failed calls.
    pub failed: usize,
}

/// Runs `concurrency` workers, each calling back to back, for `duration`.
pub async fn closed_loop(client: &Client, concurrency: usize, duration: Duration) -> Throughput {
    let started = Instant::now();
    let end = started + duration;
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let client = client.clone();
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0;
            while Instant::now() < end {
                let sent = Instant::now();
                match client.call().await {
                    Ok(_) => latencies.push(sent.elapsed().as_secs_f64() * 1e3),
                    Err(_) => failed += 1,
                }
            }
            (latencies, failed)
        });
    }
    let mut latencies_ms = Vec::new();
    let mut failed = 0;
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok((l, f)) => {
                latencies_ms.extend(l);
                failed += f;
            }
            Err(e) => tracing::warn!(error = %e, "a load worker failed"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    Throughput {
        qps: latencies_ms.len() as f64 / elapsed,
        latencies_ms,
        failed,
    }
}
