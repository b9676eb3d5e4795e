//! Load generators: testkit's open-loop rate, which counts every call, driven through each
//! client; and closed-loop workers that measure throughput.
//!
//! Open loop means calls are sent on a clock, not when the previous one completes: a stalled
//! instance then shows up as failed or slow calls instead of silently lowering the rate
//! (coordinated omission). Every call is recorded with its send time, latency and outcome.

use std::time::Duration;

use tokio::{task::JoinSet, time::Instant};
use tonic::Code;

pub use testkit::load::failed;

use crate::{
    clients::{self, Client, Kind},
    fixture::Fixture,
};

/// One call of a load: who served it, or its status code.
pub type Call = testkit::load::Call<Code>;

/// A steady call rate through one client, each call in its own task.
#[derive(Debug)]
pub struct Load {
    client: Client,
    load: testkit::load::Load<Code>,
}

impl Load {
    /// Starts calling `per_second` times a second.
    pub fn start(client: Client, per_second: u32) -> Load {
        let load = testkit::load::Load::per_second(per_second, {
            let client = client.clone();
            move || {
                let client = client.clone();
                async move { client.call().await }
            }
        });
        Load { client, load }
    }

    /// The client under load.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The calls completed so far.
    pub fn calls(&self) -> Vec<Call> {
        self.load.calls()
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
        self.load
            .wait_served_since(&[addr], since, timeout)
            .await
            .map_err(|e| anyhow::anyhow!("{:?}: {e}", self.client))
    }

    /// Stops sending, waits for the calls in flight (each bounded by the call deadline) and returns
    /// every call.
    pub async fn finish(self) -> Vec<Call> {
        self.load.finish().await
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

/// Failed calls by status code, e.g. `Unavailable: 3, DeadlineExceeded: 1`, or `none`.
pub fn failures_by_code<'a>(calls: impl IntoIterator<Item = &'a Call>) -> String {
    testkit::load::failures_by_cause(calls)
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
