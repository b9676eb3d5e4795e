//! The call path by instruction count: what one call costs each client, counted by
//! `valgrind --tool=callgrind`, which a noisy shared machine cannot blur the way it blurs the
//! wall-clock ratios of the overhead scenario.
//!
//! Each client runs in a `calls` child under callgrind, twice: with a few calls and with many more.
//! Start-up, warm-up and exit are the same in both runs, so the difference divided by the
//! difference in calls is the cost of one call, over every thread of the client (its connection
//! tasks included). The servers and etcd run outside valgrind.

use std::{path::Path, process::Command};

use anyhow::{Context, bail};
use registry::Policy;

use super::Ctx;
use crate::{
    clients::Kind,
    fixture::{Fixture, bench_exe},
    report::{Section, Verdict},
    stats::thousands,
};

/// The concurrencies counted: the overhead scenario's three.
const CONCURRENCY: [usize; 3] = [1, 16, 128];

/// The clients counted: the ideal, tonic, and ours with each policy and without retries.
fn kinds() -> Vec<Kind> {
    let mut kinds = vec![Kind::Ideal, Kind::Tonic];
    kinds.extend(Policy::ALL.into_iter().map(Kind::Ours));
    kinds.push(Kind::OursNoRetry);
    kinds
}

/// Runs the scenario.
///
/// # Errors
/// When valgrind is missing, or the fixture or a client child fails.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    let valgrind = Command::new("valgrind").arg("--version").output();
    if !valgrind.is_ok_and(|o| o.status.success()) {
        bail!("the callgrind scenario needs valgrind: install it (apt-get install valgrind)");
    }
    let (few, many) = if ctx.quick {
        (200, 1_200)
    } else {
        (1_000, 6_000)
    };
    let fixture = Fixture::start(3, &[]).await?;
    // Kept for `callgrind_annotate`: where a call's instructions went, function by function.
    let out = ctx.out.join("callgrind");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut s = Section::new("Call path: instructions per call (callgrind)");
    s.line(format!(
        "Each client in its own process under `valgrind --tool=callgrind`, making {few} and then \
         {many} calls, {} at a time, to the same three servers, which run outside \
         valgrind; a call's cost is the difference in instructions over all of the client's \
         threads, divided by {}. The profiles are in `{}`, one per client and count, for \
         `callgrind_annotate`.\n",
        CONCURRENCY.map(|c| c.to_string()).join(", then "),
        many - few,
        out.display()
    ));
    s.line("| client | concurrency | instructions per call | ideal ÷ client | tonic ÷ client |");
    s.line("|---|---|---|---|---|");
    for concurrency in CONCURRENCY {
        let mut costs: Vec<(Kind, f64)> = Vec::new();
        for kind in kinds() {
            let counted = |calls: usize| count(&fixture, kind, calls, concurrency, &out);
            let (low, high) = (counted(few)?, counted(many)?);
            costs.push((kind, high.saturating_sub(low) as f64 / (many - few) as f64));
        }
        let cost = |kind| costs.iter().find(|(k, _)| *k == kind).map(|(_, c)| *c);
        let (Some(ideal), Some(tonic)) = (cost(Kind::Ideal), cost(Kind::Tonic)) else {
            bail!("the ideal and tonic clients are always counted");
        };
        for (kind, per_call) in &costs {
            s.line(format!(
                "| {kind} | {concurrency} | {} | {:.3} | {:.3} |",
                thousands(per_call.round() as usize),
                ideal / per_call,
                tonic / per_call
            ));
        }
        if let Some(ours) = cost(Kind::Ours(Policy::RoundRobin)) {
            let scenario = "callgrind".to_owned();
            s.verdicts.push(Verdict {
                scenario: scenario.clone(),
                target: format!(
                    "round_robin ≥ 0.97 × the ideal, in instructions per call, at c={concurrency}"
                ),
                measured: format!("{:.3}", ideal / ours),
                met: Some(ideal / ours >= 0.97),
            });
            s.verdicts.push(Verdict {
                scenario,
                target: format!(
                    "round_robin ≥ 1.0 × tonic's balance_channel, in instructions per call, at \
                     c={concurrency}"
                ),
                measured: format!("{:.3}", tonic / ours),
                met: Some(tonic >= ours),
            });
        }
    }
    Ok(s)
}

/// Instructions callgrind counted for a `calls` child of `kind` making `calls` calls,
/// `concurrency` at a time.
fn count(
    fixture: &Fixture,
    kind: Kind,
    calls: usize,
    concurrency: usize,
    dir: &Path,
) -> anyhow::Result<u64> {
    let file = dir.join(format!("{}-c{concurrency}-{calls}.out", kind.arg()));
    let output = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", file.display()))
        .arg(bench_exe()?)
        .args([
            "calls",
            "--etcd-endpoints",
            &fixture.cluster.endpoints().join(","),
        ])
        .args(["--kind", &kind.arg(), "--addrs", &fixture.addrs().join(",")])
        .args(["--count", &calls.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .env("RUST_LOG", "warn")
        .output()
        .context("running valgrind")?;
    if !output.status.success() {
        bail!(
            "the {kind} client under callgrind failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("reading callgrind's output {}", file.display()))?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("summary: ")
                .or(line.strip_prefix("totals: "))
        })
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no instruction total in {}", file.display()))
}
