//! Scenario 8, churn: 200 instances flapping (each deleted, then put back, in turn, at a steady
//! rate) while a client keeps calling. The flapping instances are real and healthy: Greeter
//! servers on `127.0.0.2`.. `127.0.0.201` (the hidden `sink` subcommand), so every one a client
//! connects to answers. Three stable server processes serve throughout.
//!
//! Each client runs in its own process (as in the footprint scenario) at 200 calls a second,
//! once with no churn and once with it, so its CPU under churn is compared with its own quiet
//! figure in the same run. Update latency is measured on a discovery in the bench process (the
//! same code the clients run): from a raw watch delivering each event to the discovery's
//! subscribers seeing it.

use std::{net::TcpStream, process::Command, time::Duration};

use anyhow::Context;
use etcd_client::{DeleteOptions, GetOptions};
use registry::{Policy, key};

use super::{Ctx, footprint::measure_client};
use crate::{
    child::sink_addr,
    clients::{Kind, NAMESPACE, SERVICE},
    fixture::{Fixture, bench_exe},
    report::Section,
    scenario::scale::{delays, record_applied, record_raw_watch},
    stats::{Summary, cells, num},
};

/// Flapping instances.
const FLAPPING: usize = 200;

/// Changes a second (each flapping instance changes every `FLAPPING / FLAPS` seconds).
const FLAPS: u32 = 50;

/// Calls a second per client.
const RATE: u32 = 200;

/// Runs the scenario.
///
/// # Errors
/// When a child process fails or the registrations do not show.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    let fixture = Fixture::start(3, &[]).await?;
    let port = testkit::free_port();
    let _sink = testkit::spawn(
        Command::new(bench_exe()?)
            .args([
                "sink",
                "--port",
                &port.to_string(),
                "--count",
                &FLAPPING.to_string(),
            ])
            .env("RUST_LOG", "warn"),
    );
    let last = sink_addr(FLAPPING - 1, port);
    testkit::wait_until(
        Duration::from_secs(10),
        &format!("the sink to listen on {last}"),
        || TcpStream::connect(&last).is_ok(),
    );
    let window = ctx.window(Duration::from_secs(15), Duration::from_secs(4));
    let kinds = [Kind::Ours(Policy::RoundRobin), Kind::Tonic];
    let mut s = Section::new("8. Churn: 200 flapping instances");
    s.line(format!(
        "{FLAPPING} extra instances registered, then {FLAPS} changes a second (delete one, later \
         put it back), over {:.0} s windows; three stable servers. Each client in its own process \
         at {RATE} calls/s; CPU in % of one core. The churn window's figures include connecting \
         to the flapping instances that come and go (they are real, healthy servers).\n",
        window.as_secs_f64()
    ));
    s.line("| client | CPU quiet % | CPU under churn % | × quiet | calls (churn) | failed (churn) | failures by code |\n|---|---|---|---|---|---|---|");
    let mut all_delays = Vec::new();
    let (mut events, mut publishes) = (0, 0);
    let mut ours_failed = usize::MAX;
    for kind in kinds {
        let (quiet, _, _) = measure_client(&fixture, kind, RATE, window)?;
        // A connection of its own, as the observer's is shared with everything else here.
        let separate = etcd_client::Client::connect(fixture.etcd.config().endpoints(), None)
            .await
            .context("connecting the raw watch")?;
        let raw = record_raw_watch(separate, fixture.observer.prefix()).await?;
        let applied = record_applied(&fixture.observer);
        let flap = testkit::spawn(
            Command::new(bench_exe()?)
                .args([
                    "flap",
                    "--etcd-endpoints",
                    &fixture.cluster.endpoints().join(","),
                ])
                .args([
                    "--port",
                    &port.to_string(),
                    "--count",
                    &FLAPPING.to_string(),
                ])
                .args([
                    "--rate",
                    &FLAPS.to_string(),
                    "--seconds",
                    &(window.as_secs_f64() + 30.0).to_string(),
                ])
                .env("RUST_LOG", "warn"),
        );
        fixture
            .wait_count(3 + FLAPPING, Duration::from_secs(15))
            .await?;
        let (churned, _, _) = measure_client(&fixture, kind, RATE, window)?;
        drop(flap);
        let d = delays(&raw.1, &applied.1);
        events += raw.1.lock().map(|m| m.len()).unwrap_or(0);
        publishes += applied.1.lock().map(|m| m.len()).unwrap_or(0);
        all_delays.extend(d);
        drop((raw, applied));
        clear_flapping(&fixture).await?;
        if let Kind::Ours(_) = kind {
            ours_failed = churned.failed;
        }
        s.line(format!(
            "| {kind} | {} | {} | {:.2} | {} | {} | {} |",
            num(quiet.cpu_percent),
            num(churned.cpu_percent),
            churned.cpu_percent / quiet.cpu_percent,
            churned.calls,
            churned.failed,
            churned.failures
        ));
    }
    let update = Summary::of(&all_delays);
    s.line(format!(
        "\nUpdate latency (raw watch event → discovery subscribers), over both churn windows: {} ms \
         (median | p99, n = {}). The discovery published {publishes} snapshots for {events} \
         revisions: the library applies each watch response as it comes (a response carries \
         every event of one transaction), without coalescing bursts across responses.",
        cells(update),
        all_delays.len()
    ));
    s.verdict(
        "churn: zero failed calls meanwhile (ours)",
        format!("{ours_failed} failed"),
        Some(ours_failed == 0),
    );
    s.verdict(
        "churn: update latency (no target; reported)",
        format!(
            "median {} ms, p99 {} ms",
            update.map_or("n/a".into(), |u| num(u.median)),
            update.map_or("n/a".into(), |u| num(u.p99))
        ),
        None,
    );
    Ok(s)
}

/// Deletes whatever the flapper left, and waits until only the stable servers are listed.
async fn clear_flapping(fixture: &Fixture) -> anyhow::Result<()> {
    let prefix = format!("{}flap-", key::service_prefix(NAMESPACE, SERVICE)?);
    let mut client = fixture.etcd.client();
    client
        .delete(prefix.as_str(), Some(DeleteOptions::new().with_prefix()))
        .await
        .context("deleting the flapping instances")?;
    let left = client
        .get(
            prefix.as_str(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .context("counting flapping instances")?
        .count();
    anyhow::ensure!(left == 0, "{left} flapping instances left after the delete");
    fixture.wait_count(3, Duration::from_secs(10)).await
}
