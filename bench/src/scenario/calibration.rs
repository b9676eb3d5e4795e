//! Scenario 1, calibration: how long one etcd put takes for one client on this cluster, the
//! physical floor of every propagation figure (a raft round and an fsync on the leader and a
//! follower).

use std::time::Duration;

use anyhow::Context;
use registry::Etcd;
use tokio::time::Instant;

use super::Ctx;
use crate::{
    fixture::Fixture,
    report::Section,
    stats::{Summary, cells},
};

/// Sequential puts of one key by one client, after a few unmeasured ones; their latencies.
///
/// # Errors
/// When a put fails.
pub async fn put_latencies(etcd: &Etcd, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut client = etcd.client();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 5 {
        let started = Instant::now();
        client
            .put("bench/calibration", i.to_string(), None)
            .await
            .context("calibration put")?;
        if i >= 5 {
            samples.push(started.elapsed());
        }
    }
    Ok(samples)
}

/// Linearizable gets of one key, for comparison with the put.
async fn get_latencies(etcd: &Etcd, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut client = etcd.client();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        client
            .get("bench/calibration", None)
            .await
            .context("calibration get")?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// Runs the scenario.
///
/// # Errors
/// When the cluster cannot be started or a request fails.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    let fixture = Fixture::start(0, &[]).await?;
    let trials = ctx.trials(5, 2);
    let per_trial = 100;
    let mut puts = Vec::new();
    let mut gets = Vec::new();
    let mut trial_p99 = Vec::new();
    for _ in 0..trials {
        let p = put_latencies(&fixture.etcd, per_trial).await?;
        trial_p99.push(Summary::of_ms(&p).map_or(f64::NAN, |s| s.p99));
        puts.extend(p);
        gets.extend(get_latencies(&fixture.etcd, per_trial).await?);
    }
    let put = Summary::of_ms(&puts);
    let mut s = Section::new("1. Calibration: etcd put latency");
    s.line(format!(
        "One client, sequential requests to a three-member cluster on loopback; {trials} trials of \
         {per_trial} requests each.\n"
    ));
    s.line("| request | n | median ms | p99 ms |\n|---|---|---|---|");
    s.line(format!(
        "| put (one raft commit, fsync) | {} | {} |",
        puts.len(),
        cells(put)
    ));
    s.line(format!(
        "| get (linearizable: a read index round) | {} | {} |",
        gets.len(),
        cells(Summary::of_ms(&gets))
    ));
    s.line(format!(
        "\nPer-trial put p99 (ms): {}",
        trial_p99
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let p99 = put.map_or(f64::NAN, |p| p.p99);
    s.verdict(
        "put p50/p99 recorded (the floor)",
        format!(
            "p50 {:.2} ms, p99 {:.2} ms",
            put.map_or(f64::NAN, |p| p.median),
            p99
        ),
        Some(true),
    );
    Ok(s)
}
