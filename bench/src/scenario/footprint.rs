//! Scenario 9, footprint: resident memory and CPU of an idle server and client, and of each under
//! load. Each client runs in a process of its own (the bench binary's hidden `client`
//! subcommand), so its figures are its own and not the bench's; servers are measured from
//! `/proc/<pid>` over the same window.

use std::{
    io::Read,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use registry::Policy;
use tokio::time::Instant;

use super::Ctx;
use crate::{
    child::Footprint,
    clients::Kind,
    fixture::{Fixture, bench_exe},
    machine,
    report::Section,
    stats::{Summary, cells, num},
};

/// Calls a second in the "under load" windows.
const RATE: u32 = 500;

/// Runs a `client` child of `kind` for `window` at `rate` (0: idle) and returns what it measured,
/// with the servers' CPU (sum, % of one core) and RSS (sum, KiB) over the same time.
///
/// # Errors
/// When the child fails or prints no footprint.
pub fn measure_client(
    fixture: &Fixture,
    kind: Kind,
    rate: u32,
    window: Duration,
) -> anyhow::Result<(Footprint, f64, u64)> {
    let mut child = testkit::spawn(
        Command::new(bench_exe()?)
            .args([
                "client",
                "--etcd-endpoints",
                &fixture.cluster.endpoints().join(","),
            ])
            .args(["--kind", &kind.arg(), "--addrs", &fixture.addrs().join(",")])
            .args([
                "--rate",
                &rate.to_string(),
                "--seconds",
                &window.as_secs_f64().to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped()),
    );
    let pids: Vec<u32> = fixture.servers.iter().map(|s| s.pid()).collect();
    let before: Vec<_> = pids
        .iter()
        .map(|p| machine::sample(Some(*p)))
        .collect::<Result<_, _>>()?;
    let started = std::time::Instant::now();
    let mut out = String::new();
    child
        .child_mut()
        .stdout
        .take()
        .context("the client's stdout")?
        // Ends when the child exits, which its own window bounds.
        .read_to_string(&mut out)
        .context("reading the client's report")?;
    let elapsed = started.elapsed();
    let after: Vec<_> = pids
        .iter()
        .map(|p| machine::sample(Some(*p)))
        .collect::<Result<_, _>>()?;
    let status = child.wait_timeout(Duration::from_secs(10));
    if !status.is_some_and(|s| s.success()) {
        bail!("the {kind} client child failed ({status:?}); its output: {out}");
    }
    let footprint: Footprint = serde_json::from_str(out.lines().last().unwrap_or_default())
        .with_context(|| format!("parsing the {kind} client's report {out:?}"))?;
    // The servers' window includes the child's start and warm-up: an upper bound for their load.
    let cpu: f64 = before
        .iter()
        .zip(&after)
        .map(|(b, a)| machine::cpu_percent(b, a, elapsed))
        .sum();
    let rss = after.iter().map(|a| a.rss_kib).sum();
    Ok((footprint, cpu, rss))
}

/// Runs the scenario.
///
/// # Errors
/// When the fixture or a client child fails.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    let fixture = Fixture::start(3, &[]).await?;
    let trials = ctx.trials(3, 1);
    let window = ctx.window(Duration::from_secs(5), Duration::from_secs(2));
    let kinds = [Kind::Ours(Policy::RoundRobin), Kind::Tonic, Kind::Ideal];
    let mut s = Section::new("9. Footprint: memory and CPU");
    s.line(format!(
        "Each client in its own process: idle (connected, no calls) and at {RATE} calls/s, for \
         {:.0} s windows, {trials} trials. CPU is % of one core over the window (from clock ticks: \
         a resolution of 10 ms of CPU, i.e. {:.1} % over one window); RSS is VmRSS at its end. Server figures are the sum of the three server processes over the same windows \
         (which include the client process's start).\n",
        window.as_secs_f64(),
        1.0 / window.as_secs_f64()
    ));
    // An idle server, before any client: three processes, no calls.
    let pids: Vec<u32> = fixture.servers.iter().map(|p| p.pid()).collect();
    let before: Vec<_> = pids
        .iter()
        .map(|p| machine::sample(Some(*p)))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    // A measurement window over which the idle servers' keep-alives and health answers run.
    tokio::time::sleep(window).await;
    let after: Vec<_> = pids
        .iter()
        .map(|p| machine::sample(Some(*p)))
        .collect::<Result<_, _>>()?;
    let idle_cpu: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| machine::cpu_percent(b, a, t.elapsed()))
        .collect();
    let idle_rss: Vec<f64> = after.iter().map(|a| a.rss_kib as f64 / 1024.0).collect();
    s.line(format!(
        "Idle server (no client at all), per process: RSS {} MiB, CPU {} % (median | p99 over the three).\n",
        cells(Summary::of(&idle_rss)),
        cells(Summary::of(&idle_cpu))
    ));
    s.line("| client | state | client RSS MiB: median | p99 | client CPU %: median | p99 | servers' CPU % (sum): median | p99 | servers' RSS MiB (sum): median | calls | failed |\n|---|---|---|---|---|---|---|---|---|---|---|");
    let mut ours_loaded_cpu = f64::NAN;
    let mut tonic_loaded_cpu = f64::NAN;
    for kind in kinds {
        for rate in [0, RATE] {
            let mut rss = Vec::new();
            let mut cpu = Vec::new();
            let mut server_cpu = Vec::new();
            let mut server_rss = Vec::new();
            let (mut calls, mut failed) = (0, 0);
            for _ in 0..trials {
                let (f, scpu, srss) = measure_client(&fixture, kind, rate, window)?;
                rss.push(f.rss_kib as f64 / 1024.0);
                cpu.push(f.cpu_percent);
                server_cpu.push(scpu);
                server_rss.push(srss as f64 / 1024.0);
                calls += f.calls;
                failed += f.failed;
            }
            let cpu_s = Summary::of(&cpu);
            if rate > 0 {
                match kind {
                    Kind::Ours(_) => ours_loaded_cpu = cpu_s.map_or(f64::NAN, |c| c.median),
                    Kind::Tonic => tonic_loaded_cpu = cpu_s.map_or(f64::NAN, |c| c.median),
                    Kind::Ideal | Kind::OursNoRetry => {}
                }
            }
            s.line(format!(
                "| {kind} | {} | {} | {} | {} | {} | {calls} | {failed} |",
                if rate == 0 {
                    "idle".to_owned()
                } else {
                    format!("{rate} calls/s")
                },
                cells(Summary::of(&rss)),
                cells(cpu_s),
                cells(Summary::of(&server_cpu)),
                Summary::of(&server_rss).map_or("n/a".into(), |x| num(x.median)),
            ));
        }
    }
    s.verdict(
        format!("footprint: client CPU at {RATE} calls/s, ours vs tonic (no target; reported)"),
        format!(
            "ours {} %, tonic {} % (ratio {:.2})",
            num(ours_loaded_cpu),
            num(tonic_loaded_cpu),
            ours_loaded_cpu / tonic_loaded_cpu
        ),
        None,
    );
    Ok(s)
}
