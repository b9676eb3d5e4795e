//! `bench`: parse flags, install logging, run the chosen scenarios (or a hidden child role), write
//! the report. See the library for the scenarios.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::Context;
use bench::{
    Scenario, child,
    machine::{self, Machine},
    report::{self, RunInfo},
    scenario::Ctx,
};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Benchmarks of etcd-based discovery and balancing against tonic's balance_channel and
/// hand-rotated channels, each scenario on its own three-member etcd cluster on loopback.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Scenarios to run (`all` for every one; `smoke` is the short check CI runs).
    #[arg(value_enum, required = true)]
    scenarios: Vec<Scenario>,

    /// Fewer trials and shorter windows (about a quarter of the full run's time).
    #[arg(long)]
    quick: bool,

    /// Trials (rounds, cycles) per scenario, overriding each scenario's default.
    #[arg(long)]
    trials: Option<usize>,

    /// Instance counts for the scale scenario, comma-separated (default 1000,10000; issue #13's
    /// targets are for 10000 and 100000).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(usize))]
    scale_sizes: Vec<usize>,

    /// Where the report and charts go; the committed figures in bench/results/ change only when
    /// named here on purpose (--out bench/results).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench-results"))]
    out: PathBuf,

    #[command(subcommand)]
    role: Option<Role>,
}

/// Roles the bench runs itself in, as child processes.
#[derive(Debug, Subcommand)]
enum Role {
    /// A Greeter server: the `server` binary's flags after `--`.
    #[command(hide = true)]
    Serve {
        /// Flags for `server::Config`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Greeter servers on 127.0.0.2.. on one port.
    #[command(hide = true)]
    Sink {
        /// The port.
        #[arg(long)]
        port: u16,
        /// How many addresses.
        #[arg(long)]
        count: usize,
    },
    /// Greeter and health on 0.0.0.0:<port> for the fleet scenario, driven over stdin.
    #[command(hide = true)]
    FleetSink {
        /// The port.
        #[arg(long)]
        port: u16,
    },
    /// Registers flapping instances and toggles them.
    #[command(hide = true)]
    Flap {
        /// etcd endpoints.
        #[arg(long, value_delimiter = ',')]
        etcd_endpoints: Vec<String>,
        /// The sink's port.
        #[arg(long)]
        port: u16,
        /// How many instances.
        #[arg(long)]
        count: usize,
        /// Changes a second.
        #[arg(long)]
        rate: u32,
        /// For how long.
        #[arg(long)]
        seconds: f64,
    },
    /// One client, idle or loaded, reporting its own footprint.
    #[command(hide = true)]
    Client {
        /// etcd endpoints.
        #[arg(long, value_delimiter = ',')]
        etcd_endpoints: Vec<String>,
        /// A policy name for ours, `tonic` or `ideal`.
        #[arg(long)]
        kind: String,
        /// The servers to warm up on (and the ideal client's channels).
        #[arg(long, value_delimiter = ',')]
        addrs: Vec<String>,
        /// Calls a second (0: idle).
        #[arg(long)]
        rate: u32,
        /// The measurement window.
        #[arg(long)]
        seconds: f64,
    },
    /// One client making a number of calls, some at a time (what `callgrind` profiles).
    #[command(hide = true)]
    Calls {
        /// etcd endpoints.
        #[arg(long, value_delimiter = ',')]
        etcd_endpoints: Vec<String>,
        /// A policy name for ours, `round_robin-no-retry`, `tonic` or `ideal`.
        #[arg(long)]
        kind: String,
        /// The servers to warm up on (and the ideal client's channels).
        #[arg(long, value_delimiter = ',')]
        addrs: Vec<String>,
        /// How many calls.
        #[arg(long)]
        count: usize,
        /// How many at a time.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.role {
        Some(Role::Serve { args }) => child::serve(args).await,
        Some(Role::Sink { port, count }) => child::sink(port, count).await,
        Some(Role::FleetSink { port }) => bench::scenario::fleet::sink(port).await,
        Some(Role::Flap {
            etcd_endpoints,
            port,
            count,
            rate,
            seconds,
        }) => child::flap(etcd_endpoints, port, count, rate, seconds).await,
        Some(Role::Client {
            etcd_endpoints,
            kind,
            addrs,
            rate,
            seconds,
        }) => child::client(etcd_endpoints, &kind, addrs, rate, seconds).await,
        Some(Role::Calls {
            etcd_endpoints,
            kind,
            addrs,
            count,
            concurrency,
        }) => child::calls(etcd_endpoints, &kind, addrs, count, concurrency).await,
        None => {
            let ctx = Ctx {
                quick: cli.quick,
                trials: cli.trials,
                out: cli.out,
                scale_sizes: cli.scale_sizes,
            };
            // Dropping the run on Ctrl-C drops every cluster and process guard: nothing is left.
            tokio::select! {
                result = run(cli.scenarios, ctx) => result,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("bench: interrupted; stopping every process it started");
                    return ExitCode::from(130);
                }
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mut scenarios: Vec<Scenario>, ctx: Ctx) -> anyhow::Result<()> {
    if scenarios.contains(&Scenario::All) {
        scenarios.retain(|s| *s != Scenario::All);
        scenarios.extend(Scenario::EVERY);
    }
    scenarios.sort();
    scenarios.dedup();
    let machine = Machine::describe()?;
    let command = std::iter::once("cargo run --release -p bench --".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "bench: {} cores, {}, load average {}",
        machine.cores, machine.etcd_version, machine.load_average
    );
    let out = ctx.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    let start_utc = shell(&["date", "-u", "+%Y-%m-%d %H:%M:%S"]);
    let mut sections = Vec::new();
    for scenario in &scenarios {
        println!("\n==== {scenario}");
        let t = Instant::now();
        let section = scenario
            .run(&ctx)
            .await
            .with_context(|| format!("scenario {scenario}"))?;
        println!("==== {scenario}: {:.1} s", t.elapsed().as_secs_f64());
        sections.push(section);
    }
    if scenarios == [Scenario::Smoke] {
        // The smoke check proves the harness runs; it leaves the committed results alone.
        return Ok(());
    }
    let info = RunInfo {
        machine,
        command,
        commit: shell(&["git", "rev-parse", "--short", "HEAD"]),
        started: start_utc,
        load_after: machine::load_average(),
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let name = if scenarios.len() == Scenario::EVERY.len() {
        "report.md".to_owned()
    } else {
        format!(
            "report-{}.md",
            scenarios
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("-")
        )
    };
    let path = out.join(name);
    report::write(&path, &report::render(&info, &sections))?;
    println!("\nbench: report written to {}", path.display());
    Ok(())
}

/// The trimmed output of a command, or `unknown`.
fn shell(argv: &[&str]) -> String {
    std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}
