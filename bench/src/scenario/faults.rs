//! Scenarios 3 and 4: one of three server processes SIGKILLed, or SIGSTOPped, under a steady
//! open-loop load; how many calls fail and how long until the instance gets no more calls.
//!
//! Both clients run at the same time over the same three processes, each with its own load of
//! [`RATE`] calls a second: ours (round robin) and tonic's `balance_channel` fed by the same
//! discovery. "Ejected" means, for ours, gone from the channel's rotation (`ready_addrs`, polled
//! every millisecond); for tonic, removed from its endpoint set (discovery saw the key go, which
//! for a dead process takes the lease TTL: 10 s, the servers' default).

use std::time::Duration;

use anyhow::Context;
use registry::Policy;
use tokio::time::Instant;

use super::{Ctx, wait_calls};
use crate::{
    chart::{self, Chart, Series},
    clients::{Client, Kind},
    fixture::Fixture,
    load::{self, Call, failed, failures_by_code},
    report::Section,
    stats::{Summary, cells, ms, num},
};

/// Calls a second per client.
pub const RATE: u32 = 200;

/// The fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL.
    Crash,
    /// SIGSTOP, then SIGCONT once both clients ejected it.
    Freeze,
}

/// How long to wait for an ejection before calling it "never".
const EJECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs the scenario for `fault`.
///
/// # Errors
/// When the fixture or the clients cannot be started, or a server does not come back.
pub async fn run(ctx: &Ctx, fault: Fault) -> anyhow::Result<Section> {
    let mut fixture = Fixture::start(3, &[]).await?;
    let kinds = [Kind::Ours(Policy::RoundRobin), Kind::Tonic];
    let loads = load::start_each(&kinds, &fixture, RATE).await?;
    let trials = ctx.trials(3, 1);
    let mut ejections: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut fails: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut codes: Vec<Vec<Call>> = vec![Vec::new(); kinds.len()];
    let mut calls_total = vec![0usize; kinds.len()];
    let mut slow: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut chart_series = Vec::new();
    for trial in 0..trials {
        let victim = trial % fixture.servers.len();
        let addr = fixture.servers[victim].addr.clone();
        let id = fixture.servers[victim].id();
        let start = Instant::now();
        for load in &loads {
            // One second of steady load before the fault, counted in calls.
            wait_calls(load, start, RATE as usize, Duration::from_secs(10)).await?;
        }
        let at = Instant::now();
        match fault {
            Fault::Crash => {
                fixture.servers[victim].child.kill();
            }
            Fault::Freeze => fixture.servers[victim].child.signal(libc::SIGSTOP),
        }
        // Both clients watched at once: each figure is its own client's.
        let (a, b) = tokio::join!(
            ejection(loads[0].client(), &addr, &id),
            ejection(loads[1].client(), &addr, &id)
        );
        let ejected = [a, b];
        for (i, e) in ejected.iter().enumerate() {
            ejections[i].push(e.map_or(f64::INFINITY, |t| ms(t - at)));
        }
        // Bring the instance back and wait until both clients call it again.
        match fault {
            Fault::Crash => fixture.servers[victim].restart()?,
            Fault::Freeze => fixture.servers[victim].child.signal(libc::SIGCONT),
        }
        let back = Instant::now();
        fixture
            .wait_member(&id, true, Duration::from_secs(20))
            .await?;
        for load in &loads {
            load.wait_served_by(&addr, back, Duration::from_secs(20))
                .await
                .with_context(|| format!("{addr} back in rotation after the {fault:?}"))?;
        }
        let end = Instant::now();
        for (i, load) in loads.iter().enumerate() {
            let window: Vec<Call> = load
                .calls()
                .into_iter()
                .filter(|c| c.sent >= start && c.sent < end)
                .collect();
            fails[i].push(failed(&window) as f64);
            calls_total[i] += window.len();
            slow[i].push(window.iter().map(|c| ms(c.latency)).fold(0.0, f64::max));
            if trial == 0 {
                chart_series.push(cumulative_failures(&kinds[i].label(), &window, at));
            }
            codes[i].extend(window.into_iter().filter(|c| c.outcome.is_err()));
        }
    }
    let (number, name, what) = match fault {
        Fault::Crash => ("3", "Crash (SIGKILL) under load", "crash"),
        Fault::Freeze => ("4", "Freeze (SIGSTOP) under load", "freeze"),
    };
    let mut s = Section::new(format!("{number}. {name}"));
    s.line(format!(
        "{trials} trials, each on the next of three server processes; {RATE} calls/s per client, \
         both clients at once; per-call deadline 2 s. A trial's window runs from one second \
         before the fault until both clients have called the instance again after its {}. Ours \
         retries `SayHello` (declared idempotent) on another instance; tonic's channel does not \
         retry.\n",
        match fault {
            Fault::Crash => "restart",
            Fault::Freeze => "SIGCONT (sent once both clients had ejected it)",
        }
    ));
    s.line("| client | ejection median ms | p99 ms | failed calls per trial: median | p99 | calls in all windows | failures by code | slowest call per trial: median ms | p99 ms |\n|---|---|---|---|---|---|---|---|---|");
    for (i, kind) in kinds.iter().enumerate() {
        s.line(format!(
            "| {kind} | {} | {} | {} | {} | {} |",
            cells(Summary::of(&ejections[i])),
            cells(Summary::of(&fails[i])),
            calls_total[i],
            failures_by_code(&codes[i]),
            cells(Summary::of(&slow[i])),
        ));
    }
    let never: Vec<String> = kinds
        .iter()
        .enumerate()
        .filter(|(i, _)| ejections[*i].iter().any(|e| e.is_infinite()))
        .map(|(_, k)| k.label())
        .collect();
    if !never.is_empty() {
        s.line(format!(
            "\nNot ejected within {EJECT_TIMEOUT:?} in some trial (counted as infinite): {}.",
            never.join(", ")
        ));
    }
    let ours_fail = fails[0].iter().sum::<f64>();
    let ours_eject = Summary::of(&ejections[0]);
    match fault {
        Fault::Crash => {
            s.verdict(
                "ours: zero failed calls",
                format!("{ours_fail} failed of {}", calls_total[0]),
                Some(ours_fail == 0.0),
            );
            let p99 = ours_eject.map_or(f64::NAN, |e| e.p99);
            s.verdict(
                "ours: ejection < 100 ms",
                format!("p99 {} ms", num(p99)),
                ours_eject.map(|_| p99 < 100.0),
            );
        }
        Fault::Freeze => {
            let p99 = ours_eject.map_or(f64::NAN, |e| e.p99);
            s.verdict(
                "ours: ejection ≤ 2 s",
                format!("p99 {} ms", num(p99)),
                ours_eject.map(|_| p99 <= 2000.0),
            );
            s.verdict(
                "ours: failed calls (no target; reported)",
                format!("{ours_fail} failed of {}", calls_total[0]),
                None,
            );
        }
    }
    s.verdict(
        format!("{what}: ours vs tonic balance_channel failed calls (same run)"),
        format!("ours {ours_fail}, tonic {}", fails[1].iter().sum::<f64>()),
        Some(ours_fail <= fails[1].iter().sum::<f64>()),
    );
    let (path, chart_name) = ctx.chart(&format!("{what}.svg"));
    chart::lines(
        &path,
        &Chart {
            title: &format!("{name}: failed calls since the fault (trial 1)"),
            x: "seconds since the fault",
            y: "failed calls (cumulative)",
            log_x: false,
        },
        &chart_series,
    )?;
    s.line(format!("\n![{what}]({chart_name})"));
    load::finish_all(loads).await;
    Ok(s)
}

/// Waits until `client` stops routing to `addr` (instance `id`); `None` if it never does within
/// [`EJECT_TIMEOUT`].
async fn ejection(client: &Client, addr: &str, id: &str) -> Option<Instant> {
    let deadline = Instant::now() + EJECT_TIMEOUT;
    match client {
        Client::Ours(channel) => {
            while Instant::now() < deadline {
                if !channel.ready_addrs().iter().any(|a| &**a == addr) {
                    return Some(Instant::now());
                }
                // The channel offers no change notification for its rotation; 1 ms polling is
                // the resolution of this figure.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            None
        }
        Client::Tonic { discovery, .. } => {
            let mut rx = discovery.subscribe();
            tokio::time::timeout_at(deadline, rx.wait_for(|m| !m.instances.contains_key(id)))
                .await
                .ok()?
                .ok()?;
            Some(Instant::now())
        }
        Client::Ideal { .. } => None,
    }
}

/// Failed calls sent since `at`, cumulated, against seconds since `at`.
fn cumulative_failures(name: &str, calls: &[Call], at: Instant) -> Series {
    let mut sent: Vec<&Call> = calls.iter().filter(|c| c.sent >= at).collect();
    sent.sort_by_key(|c| c.sent);
    let mut n = 0.0;
    let mut points = vec![(0.0, 0.0)];
    for c in sent {
        if c.outcome.is_err() {
            n += 1.0;
            points.push(((c.sent - at).as_secs_f64(), n));
        }
    }
    if let Some(last) = calls.iter().map(|c| c.sent).max().filter(|l| *l > at) {
        points.push(((last - at).as_secs_f64(), n));
    }
    Series {
        name: name.to_owned(),
        points,
    }
}
