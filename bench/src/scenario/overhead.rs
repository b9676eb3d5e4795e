//! Scenario 6, balancing overhead: unary throughput and latency at concurrency 1, 16 and 128,
//! closed loop, ours with each policy against three plain tonic `Channel`s rotated by hand (the
//! ideal) and tonic's `balance_channel`, all over the same three server processes.
//!
//! The clients take turns within each round (in an order that rotates between rounds), so a
//! burst of other work on this shared machine hits one round of every client rather than all
//! rounds of one; ratios are taken within a round, then summarised.

use std::{collections::BTreeMap, time::Duration};

use registry::Policy;

use super::Ctx;
use crate::{
    chart::{self, Chart, Series},
    clients::{self, Client, Kind},
    fixture::Fixture,
    load::closed_loop,
    report::Section,
    stats::{Summary, num, percentile},
};

/// The concurrencies measured.
pub const CONCURRENCY: [usize; 3] = [1, 16, 128];

/// The clients compared: the ideal first, tonic, then ours with every policy, and ours without
/// retries (to show what they cost).
pub fn kinds() -> Vec<Kind> {
    let mut kinds = vec![Kind::Ideal, Kind::Tonic];
    kinds.extend(Policy::ALL.into_iter().map(Kind::Ours));
    kinds.push(Kind::OursNoRetry);
    kinds
}

/// Per client and concurrency: QPS of each round, and every latency.
#[derive(Debug, Default, Clone)]
struct Cell {
    qps: Vec<f64>,
    latencies: Vec<f64>,
    failed: usize,
}

/// Runs the scenario.
///
/// # Errors
/// When the fixture or a client cannot start.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    let fixture = Fixture::start(3, &[]).await?;
    let addrs = fixture.addrs();
    let kinds = kinds();
    let mut clients: Vec<Client> = Vec::new();
    for kind in &kinds {
        let client = clients::start(*kind, &fixture.etcd, &addrs).await?;
        client.warm_up(&addrs, Duration::from_secs(10)).await?;
        clients.push(client);
    }
    // Many short turns rather than a few long ones: on a shared 2-core machine the speed drifts
    // over seconds, and a ratio of two windows seconds apart carries that drift. 20 turns of
    // 300 ms measure as long per client as 4 of 1.5 s did, with the clients 3 s apart at most.
    let rounds = ctx.trials(20, 1);
    let window = ctx.window(Duration::from_millis(300), Duration::from_millis(500));
    let warm = Duration::from_millis(100);
    let mut cells: BTreeMap<(usize, usize), Cell> = BTreeMap::new();
    for round in 0..rounds {
        for &c in &CONCURRENCY {
            for turn in 0..kinds.len() {
                let k = (turn + round) % kinds.len();
                closed_loop(&clients[k], c, warm).await;
                let t = closed_loop(&clients[k], c, window).await;
                let cell = cells.entry((k, c)).or_default();
                cell.qps.push(t.qps);
                cell.latencies.extend(t.latencies_ms);
                cell.failed += t.failed;
            }
        }
        println!("overhead: round {}/{rounds} done", round + 1);
    }
    let mut s = Section::new("6. Balancing overhead");
    s.line(format!(
        "Closed loop: N workers each calling `SayHello` back to back for {:.1} s (after {} ms \
         unmeasured), {rounds} rounds, clients taking turns within a round. QPS counts successful \
         calls. Ratios are QPS against the ideal (and against tonic's `balance_channel`) *in the \
         same round*, median over rounds. Ours runs with retries on, as the `client` binary does \
         (it keeps each request body so a failed call can be replayed).\n",
        window.as_secs_f64(),
        warm.as_millis()
    ));
    s.line("| client | concurrency | QPS (median of rounds) | p50 ms | p99 ms | × ideal | × tonic | failed |\n|---|---|---|---|---|---|---|---|");
    let ratio = |k: usize, base: usize, c: usize| -> Option<f64> {
        let (a, b) = (cells.get(&(k, c))?, cells.get(&(base, c))?);
        let r: Vec<f64> = a.qps.iter().zip(&b.qps).map(|(x, y)| x / y).collect();
        Summary::of(&r).map(|s| s.median)
    };
    let mut series = Vec::new();
    for (k, kind) in kinds.iter().enumerate() {
        let mut points = Vec::new();
        for &c in &CONCURRENCY {
            let Some(cell) = cells.get(&(k, c)) else {
                continue;
            };
            let qps = Summary::of(&cell.qps).map_or(f64::NAN, |s| s.median);
            points.push((c as f64, qps));
            let fmt = |x: Option<f64>| x.map_or("n/a".to_owned(), |x| format!("{x:.3}"));
            s.line(format!(
                "| {kind} | {c} | {} | {} | {} | {} | {} | {} |",
                num(qps),
                percentile(&cell.latencies, 50.0).map_or("n/a".into(), num),
                percentile(&cell.latencies, 99.0).map_or("n/a".into(), num),
                fmt(ratio(k, 0, c)),
                fmt(ratio(k, 1, c)),
                cell.failed
            ));
        }
        series.push(Series {
            name: kind.label(),
            points,
        });
    }
    // Issue #13's targets, for every policy: ≥ 0.97 × ideal and ≥ tonic, at every concurrency.
    for (k, kind) in kinds.iter().enumerate() {
        if !matches!(kind, Kind::Ours(_)) {
            continue;
        }
        let vs_ideal: Vec<f64> = CONCURRENCY.iter().filter_map(|&c| ratio(k, 0, c)).collect();
        let vs_tonic: Vec<f64> = CONCURRENCY.iter().filter_map(|&c| ratio(k, 1, c)).collect();
        let worst = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        s.verdict(
            format!("{kind}: QPS ≥ 0.97 × ideal at c=1/16/128"),
            list(&vs_ideal),
            (!vs_ideal.is_empty()).then(|| worst(&vs_ideal) >= 0.97),
        );
        s.verdict(
            format!("{kind}: QPS ≥ tonic at c=1/16/128"),
            list(&vs_tonic),
            (!vs_tonic.is_empty()).then(|| worst(&vs_tonic) >= 1.0),
        );
    }
    let (path, name) = ctx.chart("overhead.svg");
    chart::lines(
        &path,
        &Chart {
            title: "Unary QPS by concurrency (median of rounds)",
            x: "concurrency (log)",
            y: "successful calls per second",
            log_x: true,
        },
        &series,
    )?;
    s.line(format!("\n![overhead]({name})"));
    Ok(s)
}
