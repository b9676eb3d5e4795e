//! `client watch`: a live view of discovery at work while calls flow.
//!
//! On a terminal the view is redrawn in place every `--refresh`: one row per instance (address, id,
//! whether it is in rotation and if not why, or kept in removal grace, health, calls served, errors,
//! last latency, metadata) and the latest membership and rotation events. When output is not a terminal (a pipe, a file, a
//! test) it degrades to plain lines: one per event, as it happens.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    time::Duration,
};

use registry::{Change, InstanceStatus};
use tokio::time::Instant;

use crate::CallOutcome;

/// Events kept on screen.
const EVENTS_SHOWN: usize = 12;

/// Per-instance counters kept by the view.
#[derive(Debug, Default, Clone)]
struct Stats {
    calls: u64,
    errors: u64,
    last_latency: Option<Duration>,
}

/// The rotation state of an instance, as shown.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    InRotation,
    /// Its key is gone from etcd but it is connected and SERVING: still called, for the
    /// channel's removal grace.
    InGrace,
    Out(&'static str),
}

impl State {
    fn of(instance: &InstanceStatus) -> Self {
        if instance.in_rotation && instance.removal_grace.is_some() {
            State::InGrace
        } else if instance.in_rotation {
            State::InRotation
        } else if instance.draining {
            State::Out("draining")
        } else if !instance.connected {
            State::Out("not connected")
        } else if !instance.serving {
            State::Out("NOT_SERVING")
        } else if instance.ejected {
            State::Out("ejected after failures")
        } else {
            State::Out("not selected")
        }
    }

    fn label(&self) -> &'static str {
        match self {
            State::InRotation => "in rotation",
            State::InGrace => "in grace (key gone)",
            State::Out(why) => why,
        }
    }
}

/// The live view's state.
#[derive(Debug)]
pub(crate) struct View {
    interactive: bool,
    title: String,
    started: Instant,
    stats: BTreeMap<String, Stats>,
    states: BTreeMap<String, State>,
    events: VecDeque<String>,
    calls: u64,
    failed: u64,
}

impl View {
    pub(crate) fn new(interactive: bool, title: String) -> Self {
        Self {
            interactive,
            title,
            started: Instant::now(),
            stats: BTreeMap::new(),
            states: BTreeMap::new(),
            events: VecDeque::new(),
            calls: 0,
            failed: 0,
        }
    }

    /// Notes an event: printed at once in plain mode, listed on screen otherwise.
    fn event(&mut self, text: String) {
        let line = format!("{:>7.2}s  {text}", self.started.elapsed().as_secs_f64());
        if self.interactive {
            self.events.push_back(line);
            while self.events.len() > EVENTS_SHOWN {
                self.events.pop_front();
            }
        } else {
            crate::out::line(&line);
        }
    }

    pub(crate) fn membership(&mut self, change: &Change) {
        self.event(crate::describe(change));
    }

    pub(crate) fn call(&mut self, outcome: &CallOutcome) {
        self.calls += 1;
        if outcome.error.is_some() {
            self.failed += 1;
        }
        let Some(addr) = &outcome.addr else { return };
        let stats = self.stats.entry(addr.clone()).or_default();
        stats.calls += 1;
        stats.last_latency = Some(outcome.latency);
        if let Some(error) = &outcome.error {
            stats.errors += 1;
            self.event(format!("! call to {addr} failed: {error}"));
        }
    }

    /// Compares the channel's view of each instance with the last one, noting every change of
    /// rotation state, then redraws (on a terminal).
    pub(crate) fn refresh(&mut self, instances: &[InstanceStatus]) {
        for instance in instances {
            let state = State::of(instance);
            let addr = instance.addr.to_string();
            if self.states.get(&addr) != Some(&state) {
                self.event(format!(
                    "  {addr} ({}) is {}",
                    instance.instance_id,
                    state.label()
                ));
                self.states.insert(addr, state);
            }
        }
        // Forget instances the channel no longer has, or a watch left running under churn
        // would keep every address it ever saw.
        let present: std::collections::BTreeSet<&str> =
            instances.iter().map(|i| &*i.addr).collect();
        self.states
            .retain(|addr, _| present.contains(addr.as_str()));
        self.stats.retain(|addr, _| present.contains(addr.as_str()));
        if self.interactive {
            // Clear the screen and draw from the top: a refresh in place, no terminal library.
            crate::out::print(&format!("\x1b[2J\x1b[H{}", self.screen(instances)));
        }
    }

    fn screen(&self, instances: &[InstanceStatus]) -> String {
        let mut out = format!(
            "{}   {:.0}s   calls {}   failed {}   (Ctrl-C to stop)\n\n",
            self.title,
            self.started.elapsed().as_secs_f64(),
            self.calls,
            self.failed
        );
        let _ = writeln!(
            out,
            "{:<22} {:<24} {:<24} {:>7} {:>6} {:>9}  metadata",
            "address", "instance", "state", "calls", "errors", "last"
        );
        for instance in instances {
            let stats = self.stats.get(&*instance.addr).cloned().unwrap_or_default();
            let last = stats.last_latency.map_or_else(
                || "-".to_owned(),
                |l| format!("{:.2}ms", l.as_secs_f64() * 1e3),
            );
            let _ = writeln!(
                out,
                "{:<22} {:<24} {:<24} {:>7} {:>6} {:>9}  {}",
                instance.addr,
                instance.instance_id,
                State::of(instance).label(),
                stats.calls,
                stats.errors,
                last,
                instance.metadata
            );
        }
        out.push_str("\nrecent events\n");
        for event in &self.events {
            out.push_str(event);
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_to(addr: &str) -> CallOutcome {
        CallOutcome {
            n: 1,
            addr: Some(addr.to_owned()),
            instance_id: None,
            latency: Duration::from_millis(1),
            error: None,
        }
    }

    #[test]
    fn instances_the_channel_dropped_are_forgotten() {
        let mut view = View::new(false, "test".into());
        view.call(&call_to("127.0.0.1:1"));
        view.call(&call_to("127.0.0.1:2"));
        assert_eq!(view.stats.len(), 2);
        view.refresh(&[]);
        assert!(view.stats.is_empty(), "{:?}", view.stats);
        assert!(view.states.is_empty());
    }
}
