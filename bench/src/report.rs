//! The Markdown report: a header describing the machine, one section per scenario, and a table of
//! every target with what was measured against it.

use std::{fmt::Write as _, path::Path};

use anyhow::Context;

use crate::machine::Machine;

/// What one scenario found: Markdown for the report, and its verdicts against the targets.
#[derive(Debug, Clone, Default)]
pub struct Section {
    /// The section heading.
    pub title: String,
    /// Markdown: tables, notes, chart links.
    pub body: String,
    /// One per target the scenario measures.
    pub verdicts: Vec<Verdict>,
}

impl Section {
    /// An empty section titled `title`.
    pub fn new(title: impl Into<String>) -> Section {
        Section {
            title: title.into(),
            ..Section::default()
        }
    }

    /// Appends a line of Markdown (and prints it, so a run shows its figures as it goes).
    pub fn line(&mut self, text: impl AsRef<str>) {
        println!("{}", text.as_ref());
        self.body.push_str(text.as_ref());
        self.body.push('\n');
    }

    /// Records a target and what was measured; `met` is `None` for a figure without a target (or
    /// one that could not be measured, which `measured` then says).
    pub fn verdict(
        &mut self,
        target: impl Into<String>,
        measured: impl Into<String>,
        met: Option<bool>,
    ) {
        let verdict = Verdict {
            scenario: self.title.clone(),
            target: target.into(),
            measured: measured.into(),
            met,
        };
        println!(
            "TARGET {} | {} | {} | {}",
            verdict.scenario,
            verdict.target,
            verdict.measured,
            verdict.mark()
        );
        self.verdicts.push(verdict);
    }
}

/// A target and the measured figure.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The scenario.
    pub scenario: String,
    /// The target as the issue states it.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Whether the target was met.
    pub met: Option<bool>,
}

impl Verdict {
    fn mark(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "reported (no target)",
        }
    }
}

/// How the run was made, for the header.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// The machine.
    pub machine: Machine,
    /// The command line.
    pub command: String,
    /// `git rev-parse --short HEAD`, if available.
    pub commit: String,
    /// UTC start time.
    pub started: String,
    /// Load average at the end.
    pub load_after: String,
    /// Wall time of the whole run.
    pub elapsed_s: f64,
}

/// Renders the report.
pub fn render(info: &RunInfo, sections: &[Section]) -> String {
    let mut out = String::new();
    let m = &info.machine;
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# Benchmark report\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| command | `{}` |", info.command);
    let _ = writeln!(out, "| started (UTC) | {} |", info.started);
    let _ = writeln!(out, "| commit | {} |", info.commit);
    let _ = writeln!(out, "| cores (`available_parallelism`) | {} |", m.cores);
    let _ = writeln!(
        out,
        "| etcd | {} (three members on loopback, one machine) |",
        m.etcd_version
    );
    let _ = writeln!(
        out,
        "| load average before / after | {} / {} |",
        m.load_average, info.load_after
    );
    let _ = writeln!(out, "| wall time | {:.0} s |\n", info.elapsed_s);
    let _ = writeln!(
        out,
        "Figures are median and p99 (nearest rank) over the trials or calls stated. Comparisons are \
         ratios measured in the same run, against clients sharing the same etcd cluster and server \
         processes.\n"
    );
    let _ = writeln!(
        out,
        "## Targets\n\n| scenario | target | measured | verdict |\n|---|---|---|---|"
    );
    for v in sections.iter().flat_map(|s| &s.verdicts) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            v.scenario,
            v.target,
            v.measured,
            v.mark()
        );
    }
    for section in sections {
        let _ = writeln!(out, "\n## {}\n\n{}", section.title, section.body);
    }
    out
}

/// Writes `text` to `path`, creating its directory.
///
/// # Errors
/// Naming the path.
pub fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
