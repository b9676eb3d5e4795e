//! The helloworld client: discover Greeter instances in etcd, spread calls over them (round robin by
//! default, `--policy` for the others), print who served each call and, as they happen, every
//! instance joining or leaving.
//!
//! [`run`] waits (bounded by `--wait`) until an instance is connected, then calls `SayHello` either
//! `--requests` times or for `--duration` (or `--forever`), one call per `--interval`, and returns a
//! [`Report`] with per-instance counts. `main.rs` prints the table and exits non-zero if a call failed.
//!
//! # Layout
//! - this file: flags ([`Config`]), the call loop, the per-call lines and the report;
//! - `watch.rs`: `client watch`, the live view of instances and events.

use std::{collections::BTreeMap, io::IsTerminal, time::Duration};

use anyhow::Context;
use clap::Parser;
use cli::{EtcdArgs, GrpcTlsArgs, Layered, MetricsArgs, duration, pairs, parse_duration, text};
use proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
use registry::{
    BalanceOptions, BalancedChannel, Change, Discovery, Format, Policy, RetryPolicy, Selector,
    ServedBy,
    balance::{HASH_KEY, INSTANCE},
    discover::diff,
    select::parse_pair,
};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

mod watch;

/// Settings of the `client` binary: flags, environment variables, or the same names in
/// `client.toml` (see the `cli` crate for the layering). The `watch` subcommand's flags are
/// command-line only.
#[derive(Debug, Clone, Parser, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[command(
    version,
    about = "Calls helloworld.Greeter instances found in etcd, round robin."
)]
pub struct Config {
    #[command(flatten)]
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub etcd: EtcdArgs,

    /// How long to wait for the first instances (once etcd answered) before giving up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub wait: Duration,

    /// Start calling only once this many instances are registered and connected.
    #[arg(
        long,
        default_value_t = 1,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub min_instances: usize,

    /// Number of calls to make [default: 10; ignored with --duration or --forever; watch runs
    /// until Ctrl-C unless given].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,

    /// Pause between calls.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub interval: Duration,

    /// Keep calling for this long instead of a fixed number of calls.
    #[arg(long, value_parser = parse_duration, conflicts_with = "forever")]
    #[serde(
        with = "duration::option",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub duration: Option<Duration>,

    /// Keep calling until interrupted (Ctrl-C).
    #[arg(long)]
    pub forever: bool,

    /// Deadline of each call.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub timeout: Duration,

    /// The name to greet.
    #[arg(long, default_value = "world")]
    pub name: String,

    /// Attempts per call, the first included; failed calls are retried on another instance when
    /// that is safe (SayHello is idempotent). 1 disables retries.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub max_attempts: u32,

    /// How calls are spread: round_robin, weighted_round_robin, random, least_request,
    /// consistent_hash or pick_first.
    #[arg(long, default_value = "round_robin")]
    #[serde(with = "text")]
    pub policy: Policy,

    /// Key sent with every call for consistent_hash (same key, same instance).
    #[arg(long, value_parser = parse_hash_key)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<String>,

    /// Only call instances whose metadata has KEY=VALUE (e.g. version=v2); repeatable.
    #[arg(long = "select", value_name = "KEY=VALUE", value_parser = parse_pair)]
    #[serde(with = "pairs")]
    pub select: Vec<(String, String)>,

    /// Prefer instances whose metadata has KEY=VALUE (e.g. zone=a), falling back to the others when
    /// none has; repeatable.
    #[arg(long = "prefer", value_name = "KEY=VALUE", value_parser = parse_pair)]
    #[serde(with = "pairs")]
    pub prefer: Vec<(String, String)>,

    /// How instances are recorded in etcd: go-naming (ours, Go's naming package), go-zero or
    /// kratos (to call services registered by those frameworks).
    #[arg(long, default_value = "go-naming")]
    #[serde(with = "text")]
    pub format: Format,

    /// Seed for the random choices of random and least_request, for repeatable runs.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,

    /// TLS to the servers: --tls-ca (the CA that signed their certificates) turns it on;
    /// --tls-cert and --tls-key present a client certificate (mutual TLS).
    #[command(flatten)]
    #[serde(flatten)]
    pub tls: GrpcTlsArgs,

    #[command(flatten)]
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub metrics: MetricsArgs,

    #[command(subcommand)]
    #[serde(skip)]
    #[allow(missing_docs)]
    pub command: Option<Command>,
}

impl Layered for Config {
    fn keep_command_line_only(&mut self, parsed: Self) {
        self.command = parsed.command;
    }
}

/// Calls made when neither `--requests`, `--duration` nor `--forever` says otherwise.
pub const DEFAULT_REQUESTS: u64 = 10;

/// What to show while calling.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// A live view: every instance with its state, calls and errors, and the events of discovery
    /// and rotation as they happen, while calls flow (redrawn in place on a terminal, plain lines
    /// otherwise). Runs until Ctrl-C unless --duration or --requests is given.
    Watch {
        /// How often the view is refreshed.
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        refresh: Duration,

        /// Plain lines even on a terminal.
        #[arg(long)]
        plain: bool,
    },
}

/// What happened to one call.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    /// The call's number.
    pub n: u64,
    /// The address it was sent to, when known.
    pub addr: Option<String>,
    /// The instance id in the reply.
    pub instance_id: Option<String>,
    /// How long it took.
    pub latency: Duration,
    /// The failure, as `CODE: message`.
    pub error: Option<String>,
}

/// The gRPC path of SayHello, declared idempotent: greeting twice does no harm, so a call that
/// failed with UNAVAILABLE may be sent again to another instance.
pub const SAY_HELLO: &str = "/helloworld.Greeter/SayHello";

/// What happened over a run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Successful calls by (address, instance id).
    pub served: BTreeMap<(String, String), u64>,
    /// Calls that failed.
    pub failed: u64,
}

impl Report {
    /// Counts one call.
    pub fn count(&mut self, outcome: &CallOutcome) {
        match (&outcome.error, &outcome.addr, &outcome.instance_id) {
            (None, Some(addr), Some(id)) => {
                *self.served.entry((addr.clone(), id.clone())).or_default() += 1;
            }
            (None, addr, id) => {
                let key = (
                    addr.clone().unwrap_or_else(|| "?".into()),
                    id.clone().unwrap_or_else(|| "?".into()),
                );
                *self.served.entry(key).or_default() += 1;
            }
            (Some(_), _, _) => self.failed += 1,
        }
    }

    /// Total calls made.
    pub fn total(&self) -> u64 {
        self.served.values().sum::<u64>() + self.failed
    }

    /// The per-instance table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = format!("{:<28} {:<24} {:>7}\n", "instance", "address", "calls");
        for ((addr, id), calls) in &self.served {
            out += &format!("{id:<28} {addr:<24} {calls:>7}\n");
        }
        out += &format!("total {} calls, {} failed", self.total(), self.failed);
        out
    }
}

/// Discovers the service and makes the configured calls, printing one line per call and per
/// membership change to stdout, until done or `shutdown` fires.
///
/// # Errors
/// If etcd is unusable or no instance shows up within `--wait`. Failed calls are not errors: they
/// are counted in the [`Report`].
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<Report> {
    let registry_config = config
        .etcd
        .registry_config(registry::register::DEFAULT_TTL)
        .context("etcd settings")?;
    let tls = config.tls.load().context("TLS settings")?;
    if tls.as_ref().is_some_and(|tls| tls.files().ca.is_none()) {
        anyhow::bail!(
            "--tls-cert/--tls-key without --tls-ca: set --tls-ca to the CA that signed the servers' certificates"
        );
    }
    config.metrics.install()?;
    let endpoints = config.etcd.etcd_endpoints.join(",");
    let etcd = registry_config.connect().await?;
    let discovery = Discovery::start_with_format(
        &etcd,
        &config.etcd.namespace,
        &config.etcd.service,
        config.format,
    )?;
    let options = BalanceOptions {
        call_timeout: config.timeout,
        retry: RetryPolicy {
            max_attempts: config.max_attempts,
            ..RetryPolicy::default()
        }
        .idempotent(SAY_HELLO),
        policy: config.policy,
        selector: Selector {
            require: config.select.clone(),
            prefer: config.prefer.clone(),
        },
        seed: config.seed,
        tls: tls.map(|tls| tls.client_config(None)),
        ..BalanceOptions::default()
    };
    let channel = BalancedChannel::new(discovery.clone(), options);

    let ready = async {
        discovery
            .wait_synced(config.etcd.etcd_timeout)
            .await
            .with_context(|| format!("cannot list instances from etcd at {endpoints}"))?;
        let started = Instant::now();
        async {
            let min = config.min_instances;
            let known = discovery.wait_for_instances(min, config.wait).await?;
            let left = || config.wait.saturating_sub(started.elapsed());
            channel.wait_connected(min, left()).await?;
            channel.wait_ready(1, left()).await?;
            // Give the other instances found in the same list a moment to connect too, so the
            // first calls already spread over all of them; proceed without the stragglers.
            let all = known.instances.len();
            let _ = channel
                .wait_connected(all, left().min(Duration::from_secs(1)))
                .await;
            anyhow::Ok(())
        }
        .await
        .with_context(|| {
                format!(
                    "no instance of {:?} to call (etcd {endpoints}); start one with: server --port 50051",
                    config.etcd.service
                )
            })
    };
    tokio::select! {
        ready = ready => ready?,
        _ = shutdown.cancelled() => return Ok(Report::default()),
    }

    let mut membership = discovery.subscribe();
    let mut known = membership.borrow_and_update().instances.clone();
    let (mut view, refresh, forever) = match &config.command {
        None => {
            for instance in known.values() {
                println!("  found {} at {}", instance.id, instance.addr);
            }
            (None, Duration::from_secs(3600), config.forever)
        }
        Some(Command::Watch { refresh, plain }) => {
            let interactive = !plain && std::io::stdout().is_terminal();
            let title = format!("{} ({})", config.etcd.service, config.policy);
            let mut view = watch::View::new(interactive, title);
            for instance in known.values() {
                view.membership(&Change::Added(instance.clone()));
            }
            // Watching runs until stopped unless a length was asked for explicitly.
            let open_ended = config.duration.is_none() && config.requests.is_none();
            (Some(view), *refresh, config.forever || open_ended)
        }
    };
    let mut redraw = tokio::time::interval(refresh);
    redraw.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let mut client = GreeterClient::new(channel.clone());
    let mut report = Report::default();
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let deadline = config.duration.map(|d| Instant::now() + d);
    let mut n: u64 = 0;
    loop {
        let more = if forever {
            true
        } else if let Some(deadline) = deadline {
            Instant::now() < deadline
        } else {
            n < config.requests.unwrap_or(DEFAULT_REQUESTS)
        };
        if !more {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = membership.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = membership.borrow_and_update().instances.clone();
                for change in diff(&known, &now) {
                    match &mut view {
                        Some(view) => view.membership(&change),
                        None => print_change(&change),
                    }
                }
                known = now;
            }
            _ = tick.tick() => {
                n += 1;
                let outcome = call(&mut client, n, &config).await;
                report.count(&outcome);
                match &mut view {
                    Some(view) => view.call(&outcome),
                    None => print_call(&outcome),
                }
            }
            _ = redraw.tick(), if view.is_some() => {
                if let Some(view) = &mut view {
                    view.refresh(&channel.instances());
                }
            }
        }
    }
    if let Some(view) = &mut view {
        view.refresh(&channel.instances());
        println!();
    }
    Ok(report)
}

fn parse_hash_key(text: &str) -> Result<String, String> {
    text.parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
        .map(|_| text.to_owned())
        .map_err(|_| format!("{text:?} cannot be sent as gRPC metadata: use visible ASCII"))
}

/// Makes call number `n`.
async fn call(client: &mut GreeterClient<BalancedChannel>, n: u64, config: &Config) -> CallOutcome {
    let mut request = tonic::Request::new(HelloRequest {
        name: config.name.clone(),
    });
    // The flag's parser admits only valid metadata values.
    if let Some(value) = config.hash_key.as_deref().and_then(|k| k.parse().ok()) {
        request.metadata_mut().insert(HASH_KEY, value);
    }
    let started = Instant::now();
    let result = client.say_hello(request).await;
    let latency = started.elapsed();
    match result {
        Ok(response) => {
            let addr = response
                .extensions()
                .get::<ServedBy>()
                .map(|s| s.addr.to_string());
            CallOutcome {
                n,
                addr,
                instance_id: Some(response.into_inner().instance_id),
                latency,
                error: None,
            }
        }
        Err(status) => CallOutcome {
            n,
            addr: status
                .metadata()
                .get(INSTANCE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            instance_id: None,
            latency,
            error: Some(format!("{:?}: {}", status.code(), status.message())),
        },
    }
}

fn print_call(outcome: &CallOutcome) {
    let ms = outcome.latency.as_secs_f64() * 1e3;
    let n = outcome.n;
    match (&outcome.error, &outcome.instance_id) {
        (Some(error), _) => println!("call {n:>4}  FAILED {error}  {ms:>8.2} ms"),
        (None, id) => println!(
            "call {n:>4}  {:<21}  {:<24} {ms:>8.2} ms",
            outcome.addr.as_deref().unwrap_or("?"),
            id.as_deref().unwrap_or("?")
        ),
    }
}

fn print_change(change: &Change) {
    println!("  {}", describe(change));
}

/// One line about a membership change, the same in both output modes.
fn describe(change: &Change) -> String {
    match change {
        Change::Added(i) => format!("+ instance {} joined at {}", i.id, i.addr),
        Change::Removed(i) => format!("- instance {} left ({})", i.id, i.addr),
        Change::Updated { new, .. } => format!("~ instance {} now at {}", new.id, new.addr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn report_table_counts_per_instance() {
        let mut report = Report::default();
        report.served.insert(("h:1".into(), "a".into()), 2);
        report.served.insert(("h:2".into(), "b".into()), 3);
        report.failed = 1;
        assert_eq!(report.total(), 6);
        let table = report.table();
        assert!(table.contains("total 6 calls, 1 failed"), "{table}");
        assert!(
            table
                .lines()
                .any(|l| l.starts_with('b') && l.ends_with(" 3")),
            "{table}"
        );
    }

    #[test]
    fn bad_values_are_refused() {
        let parse = |args: &[&str]| Config::try_parse_from([&["client"], args].concat());
        assert!(parse(&["--interval", "soon"]).is_err());
        assert!(parse(&["--duration", "1s", "--forever"]).is_err());
        assert!(parse(&["--etcd-endpoints", "h:0"]).is_err());
        assert!(parse(&["--max-attempts", "0"]).is_err());
        assert!(parse(&["--policy", "fastest"]).is_err());
        assert!(parse(&["--select", "novalue"]).is_err());
        let ok = parse(&["--policy", "least-request", "--select", "version=v2"]).unwrap();
        assert_eq!(ok.policy, Policy::LeastRequest);
        assert_eq!(ok.select, [("version".to_owned(), "v2".to_owned())]);
        assert!(parse(&[]).is_ok());
    }
}
