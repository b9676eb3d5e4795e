//! The smoke scenario CI runs so the harness cannot rot: every moving part once, briefly (a
//! cluster, server processes, all three clients, a chart), failing if any client cannot call.

use std::time::Duration;

use anyhow::{Context, bail};
use registry::Policy;

use super::Ctx;
use crate::{
    chart::{self, Chart, Series},
    clients::{self, Kind},
    fixture::Fixture,
    load::{Load, closed_loop, failed},
    report::Section,
    scenario::calibration::put_latencies,
    stats::{Summary, cells},
};

/// Runs the scenario.
///
/// # Errors
/// When any part of the harness fails, or a client makes no successful call.
pub async fn run(_ctx: &Ctx) -> anyhow::Result<Section> {
    let fixture = Fixture::start(2, &[]).await?;
    let mut s = Section::new("Smoke");
    let puts = put_latencies(&fixture.etcd, 20).await?;
    s.line(format!(
        "etcd put ms (median | p99): {}",
        cells(Summary::of_ms(&puts))
    ));
    let addrs = fixture.addrs();
    let mut series = Vec::new();
    for kind in [Kind::Ours(Policy::RoundRobin), Kind::Tonic, Kind::Ideal] {
        let client = clients::start(kind, &fixture.etcd, &addrs).await?;
        client.warm_up(&addrs, Duration::from_secs(10)).await?;
        let t = closed_loop(&client, 4, Duration::from_millis(300)).await;
        if t.latencies_ms.is_empty() {
            bail!("{kind}: no successful call in 300 ms");
        }
        s.line(format!(
            "{kind}: {:.0} calls/s at concurrency 4, {} failed",
            t.qps, t.failed
        ));
        series.push(Series {
            name: kind.label(),
            points: vec![(4.0, t.qps)],
        });
        if let Kind::Ours(_) = kind {
            let load = Load::start(client, 100);
            super::wait_calls(
                &load,
                tokio::time::Instant::now(),
                30,
                Duration::from_secs(5),
            )
            .await?;
            let calls = load.finish().await;
            s.line(format!(
                "{kind}: open loop at 100 calls/s: {} calls, {} failed",
                calls.len(),
                failed(&calls)
            ));
        }
    }
    let dir = tempfile::tempdir().context("a directory for the smoke chart")?;
    let path = dir.path().join("smoke.svg");
    chart::lines(
        &path,
        &Chart {
            title: "smoke",
            x: "concurrency",
            y: "QPS",
            log_x: true,
        },
        &series,
    )?;
    let svg = std::fs::read_to_string(&path).context("reading the smoke chart")?;
    if !svg.contains("<svg") {
        bail!("the smoke chart is not an SVG");
    }
    s.verdict("smoke: every client called every server", "yes", Some(true));
    Ok(s)
}
