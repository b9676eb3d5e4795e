//! What the figures were measured on, and what a process costs: core count, etcd version, load
//! average, and a process's resident memory and CPU time from `/proc`.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, bail};

/// The machine a run measured.
#[derive(Debug, Clone)]
pub struct Machine {
    /// `std::thread::available_parallelism`.
    pub cores: usize,
    /// First line of `etcd --version`.
    pub etcd_version: String,
    /// `/proc/loadavg` when the run started: other work on the machine shows here.
    pub load_average: String,
}

impl Machine {
    /// Reads the machine's description.
    ///
    /// # Errors
    /// When `etcd --version` cannot be run.
    pub fn describe() -> anyhow::Result<Machine> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let etcd = etcd_binary();
        let out = Command::new(&etcd)
            .arg("--version")
            .output()
            .with_context(|| format!("running `{} --version`", etcd.display()))?;
        let etcd_version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("unknown")
            .to_owned();
        Ok(Machine {
            cores,
            etcd_version,
            load_average: load_average(),
        })
    }
}

/// The etcd binary testkit starts: `$ETCD_BIN` or `etcd` from `PATH`.
fn etcd_binary() -> PathBuf {
    std::env::var_os("ETCD_BIN").map_or_else(|| PathBuf::from("etcd"), PathBuf::from)
}

/// The first three fields of `/proc/loadavg` (1, 5 and 15 minutes), or `unknown`.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// A process's resident memory and the CPU time it has used so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// `VmRSS` from `/proc/<pid>/status`, in KiB.
    pub rss_kib: u64,
    /// `utime + stime` from `/proc/<pid>/stat`.
    pub cpu: Duration,
}

/// Samples `/proc/<pid>`; `None` for `/proc/self`.
///
/// # Errors
/// When the process is gone or its `/proc` files cannot be parsed.
pub fn sample(pid: Option<u32>) -> anyhow::Result<ProcSample> {
    let dir = pid.map_or_else(|| "/proc/self".to_owned(), |p| format!("/proc/{p}"));
    let status = std::fs::read_to_string(format!("{dir}/status"))
        .with_context(|| format!("reading {dir}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in {dir}/status"))?;
    let stat = std::fs::read_to_string(format!("{dir}/stat"))
        .with_context(|| format!("reading {dir}/stat"))?;
    Ok(ProcSample {
        rss_kib,
        cpu: cpu_time(&stat).with_context(|| format!("parsing {dir}/stat"))?,
    })
}

/// `utime + stime` of a `/proc/<pid>/stat` line.
fn cpu_time(stat: &str) -> anyhow::Result<Duration> {
    // The command name (field 2) is in parentheses and may contain spaces: count fields after
    // the last ')'. utime and stime are fields 14 and 15, i.e. 12 and 13 after the name.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        bail!("no ')' after the command name");
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("field {} missing", i + 3))?
            .parse()
            .with_context(|| format!("field {} is not a number", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Ok(Duration::from_secs_f64(total as f64 / hz as f64))
}

/// CPU used between two samples, as a percentage of one core over `wall`.
pub fn cpu_percent(before: &ProcSample, after: &ProcSample, wall: Duration) -> f64 {
    let used = after.cpu.saturating_sub(before.cpu);
    100.0 * used.as_secs_f64() / wall.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_time_past_a_name_with_spaces() {
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let stat = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 1 0";
        let cpu = cpu_time(stat).unwrap();
        assert!((cpu.as_secs_f64() - 200.0 / hz).abs() < 1e-9);
        assert!(cpu_time("garbage").is_err());
    }

    #[test]
    fn samples_this_process() {
        let s = sample(None).unwrap();
        assert!(s.rss_kib > 0);
    }
}
