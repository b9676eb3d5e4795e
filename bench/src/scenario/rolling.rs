//! Scenario 5, rolling restart: each of three server processes stopped with SIGTERM (its graceful
//! shutdown: NOT_SERVING, lease revoked, grace, drain) and started again, in turn, cycle after
//! cycle, under a steady open-loop load through ours and through tonic's `balance_channel`.

use std::time::Duration;

use anyhow::{Context, bail};
use registry::Policy;
use tokio::time::Instant;

use super::Ctx;
use crate::{
    clients::Kind,
    fixture::{Fixture, REGISTER_TIMEOUT},
    load::{self, failed, failures_by_code},
    report::Section,
    stats::{Summary, cells, ms},
};

/// Calls a second per client.
const RATE: u32 = 200;

/// Runs the scenario.
///
/// # Errors
/// When a server does not stop or does not come back.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    let mut fixture = Fixture::start(3, &[]).await?;
    let kinds = [Kind::Ours(Policy::RoundRobin), Kind::Tonic];
    let loads = load::start_each(&kinds, &fixture, RATE).await?;
    let cycles = ctx.trials(10, 2);
    let started = Instant::now();
    let mut per_cycle: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut restart_ms = Vec::new();
    for _ in 0..cycles {
        let cycle_start = Instant::now();
        for i in 0..fixture.servers.len() {
            let t = Instant::now();
            let (addr, id) = (fixture.servers[i].addr.clone(), fixture.servers[i].id());
            fixture.servers[i].child.signal(libc::SIGTERM);
            if fixture.servers[i]
                .child
                .wait_timeout(Duration::from_secs(15))
                .is_none()
            {
                bail!("{addr} did not exit within 15 s of SIGTERM");
            }
            fixture.servers[i].restart()?;
            let back = Instant::now();
            fixture.wait_member(&id, true, REGISTER_TIMEOUT).await?;
            for load in &loads {
                load.wait_served_by(&addr, back, Duration::from_secs(10))
                    .await
                    .with_context(|| format!("{addr} back in rotation after its restart"))?;
            }
            restart_ms.push(ms(t.elapsed()));
        }
        let cycle_end = Instant::now();
        for (k, load) in loads.iter().enumerate() {
            let calls = load.calls();
            per_cycle[k].push(failed(
                calls
                    .iter()
                    .filter(|c| c.sent >= cycle_start && c.sent < cycle_end),
            ) as f64);
        }
    }
    let elapsed = started.elapsed();
    let mut s = Section::new("5. Rolling restart under load");
    s.line(format!(
        "{cycles} cycles; in each, the three server processes are stopped (SIGTERM) and started \
         again one after the other, the next only once both clients have called the restarted \
         one. {RATE} calls/s per client, both at once; {:.1} s in all.\n",
        elapsed.as_secs_f64()
    ));
    s.line("| client | calls | failed | failures by code | failed per cycle: median | p99 |\n|---|---|---|---|---|---|");
    let mut totals = Vec::new();
    for (k, load) in loads.into_iter().enumerate() {
        let calls: Vec<_> = load
            .finish()
            .await
            .into_iter()
            .filter(|c| c.sent >= started)
            .collect();
        let f = failed(&calls);
        totals.push(f);
        s.line(format!(
            "| {} | {} | {f} | {} | {} |",
            kinds[k],
            calls.len(),
            failures_by_code(&calls),
            cells(Summary::of(&per_cycle[k]))
        ));
    }
    s.line(format!(
        "\nOne restart (SIGTERM to called again by both clients): {} ms (median | p99).",
        cells(Summary::of(&restart_ms))
    ));
    s.verdict(
        "ours: zero failed calls over the cycles",
        format!("{} failed", totals[0]),
        Some(totals[0] == 0),
    );
    s.verdict(
        "rolling: ours vs tonic failed calls (same run)",
        format!("ours {}, tonic {}", totals[0], totals[1]),
        Some(totals[0] <= totals[1]),
    );
    Ok(s)
}
