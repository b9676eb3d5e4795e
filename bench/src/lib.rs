//! Benchmarks of the registry against the alternatives a Rust user would pick instead, measured in
//! the same run on the same etcd cluster and server processes: tonic's own
//! `Channel::balance_channel` fed by the same discovery, and plain tonic channels rotated by hand.
//!
//! `cargo run --release -p bench -- all` starts a three-member etcd cluster and server processes
//! on loopback for each scenario, prints every figure as it is measured, and writes
//! `bench/results/report.md` with SVG charts next to it. `docs/BENCHMARKS.md` discusses a run.
//!
//! # Layout
//! - [`scenario`]: the nine scenarios of the issue, `fleet` (10,000 real instances and
//!   subsetting, issue #15), plus `smoke` for CI.
//! - [`fixture`]: the etcd cluster and server processes a scenario runs against.
//! - [`clients`]: ours, tonic's `balance_channel`, and the hand-rotated ideal, behind one `call`.
//! - [`load`]: open-loop and closed-loop load generators.
//! - [`child`]: the hidden subcommands run in child processes (server, sink, flapper, client).
//! - [`machine`]: core count, etcd version, and memory and CPU from `/proc`.
//! - [`stats`]: median and p99.
//! - [`report`] and [`chart`]: the Markdown report and its SVG charts.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let ctx = bench::scenario::Ctx {
//!     quick: true,
//!     trials: None,
//!     out: "bench/results".into(),
//!     scale_sizes: Vec::new(),
//! };
//! let section = bench::scenario::calibration::run(&ctx).await?;
//! println!("{}", section.body);
//! # Ok(())
//! # }
//! ```

pub mod chart;
pub mod child;
pub mod clients;
pub mod fixture;
pub mod load;
pub mod machine;
pub mod report;
pub mod scenario;
pub mod stats;

use std::fmt;

use scenario::Ctx;

/// A scenario of the issue, by the name given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    /// 1. etcd put latency: the physical floor.
    Calibration,
    /// 2. Registration and deregistration to routing.
    Propagation,
    /// 3. SIGKILL of one of three servers under load.
    Crash,
    /// 4. SIGSTOP of one of three servers under load.
    Freeze,
    /// 5. Rolling restart under load.
    Rolling,
    /// 6. Unary QPS and latency at concurrency 1, 16, 128.
    Overhead,
    /// 7. 1,000 and 10,000 instances.
    Scale,
    /// 8. 200 flapping instances.
    Churn,
    /// 9. Memory and CPU of servers and clients.
    Footprint,
    /// 10. 10,000 real instances, with and without subsetting.
    Fleet,
    /// Every scenario above, in order.
    All,
    /// A short check that the harness works (CI).
    Smoke,
    /// Instructions per call at concurrency 1 and 128, under valgrind (not part of `all`).
    Callgrind,
}

impl Scenario {
    /// Every real scenario, in the issue's order.
    pub const EVERY: [Scenario; 10] = [
        Scenario::Calibration,
        Scenario::Propagation,
        Scenario::Crash,
        Scenario::Freeze,
        Scenario::Rolling,
        Scenario::Overhead,
        Scenario::Scale,
        Scenario::Churn,
        Scenario::Footprint,
        Scenario::Fleet,
    ];

    /// Runs it.
    ///
    /// # Errors
    /// Whatever the scenario reports.
    pub async fn run(self, ctx: &Ctx) -> anyhow::Result<report::Section> {
        use scenario::faults::Fault;
        match self {
            Scenario::Calibration => scenario::calibration::run(ctx).await,
            Scenario::Propagation => scenario::propagation::run(ctx).await,
            Scenario::Crash => scenario::faults::run(ctx, Fault::Crash).await,
            Scenario::Freeze => scenario::faults::run(ctx, Fault::Freeze).await,
            Scenario::Rolling => scenario::rolling::run(ctx).await,
            Scenario::Overhead => scenario::overhead::run(ctx).await,
            Scenario::Scale => scenario::scale::run(ctx).await,
            Scenario::Churn => scenario::churn::run(ctx).await,
            Scenario::Footprint => scenario::footprint::run(ctx).await,
            Scenario::Fleet => scenario::fleet::run(ctx).await,
            Scenario::Smoke => scenario::smoke::run(ctx).await,
            Scenario::Callgrind => scenario::callgrind::run(ctx).await,
            Scenario::All => anyhow::bail!("`all` is expanded before running"),
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use clap::ValueEnum;
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}
