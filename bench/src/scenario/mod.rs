//! The scenarios of the issue, one module each, sharing a [`Ctx`] and a few helpers.

pub mod calibration;
pub mod callgrind;
pub mod churn;
pub mod faults;
pub mod fleet;
pub mod footprint;
pub mod overhead;
pub mod propagation;
pub mod rolling;
pub mod scale;
pub mod smoke;

use std::{path::PathBuf, time::Duration};

use anyhow::bail;
use tokio::time::Instant;

use crate::load::Load;

/// What every scenario is given.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Fewer trials and shorter windows.
    pub quick: bool,
    /// Overrides every scenario's number of trials.
    pub trials: Option<usize>,
    /// Where charts go.
    pub out: PathBuf,
    /// Instance counts for the scale scenario; empty for its default.
    pub scale_sizes: Vec<usize>,
}

impl Ctx {
    /// The number of trials: `full`, or `quick` with `--quick`, unless `--trials` says otherwise.
    pub fn trials(&self, full: usize, quick: usize) -> usize {
        self.trials
            .unwrap_or(if self.quick { quick } else { full })
            .max(1)
    }

    /// A measurement window: `full`, or `quick` with `--quick`.
    pub fn window(&self, full: Duration, quick: Duration) -> Duration {
        if self.quick { quick } else { full }
    }

    /// The path of a chart, and its name as linked from the report (same directory).
    pub fn chart(&self, name: &str) -> (PathBuf, String) {
        (self.out.join(name), name.to_owned())
    }
}

/// Waits until `load` has completed `n` calls sent at or after `since`: the "steady load before the
/// fault" every fault scenario needs, measured in calls rather than slept.
///
/// # Errors
/// After `timeout`.
pub async fn wait_calls(
    load: &Load,
    since: Instant,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if load.calls().iter().filter(|c| c.sent >= since).count() >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{:?}: fewer than {n} calls within {timeout:?}",
                load.client()
            );
        }
        // Polling the record; the load runs on its own clock.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
