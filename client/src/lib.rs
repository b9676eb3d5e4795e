//! The helloworld client: discover Greeter instances in etcd, spread calls over them (round robin by
//! default, `--policy` for the others), print who served each call and, as they happen, every
//! instance joining or leaving.
//!
//! [`run`] waits (bounded by `--wait`) until an instance is connected, then calls `SayHello` either
//! `--requests` times or for `--duration` (or `--forever`), from `--concurrency` slots at once, each
//! calling once per `--interval`, and returns a [`Report`] with per-instance counts and latency
//! percentiles. `main.rs` prints the table and exits non-zero if a call failed.
//!
//! # Layout
//! - this file: flags ([`Config`]) and their checks, the call slots, the per-call lines and the
//!   report;
//! - [`out`]: stdout that a closed pipe stops quietly (`client | head`);
//! - `watch.rs`: `client watch`, the live view of instances and events.

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use cli::{
    EtcdArgs, GrpcTlsArgs, Layered, MetricsArgs, Sources, duration, pairs, parse_duration,
    parse_nonzero_duration, parse_pair, text,
};
use proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
use registry::{
    BalanceOptions, BalancedChannel, Change, Discovery, Format, HASH_KEY, INSTANCE, Policy,
    RetryPolicy, Selector, ServedBy, Subsetting,
};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

pub mod out;
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
    #[arg(global = true, long, default_value = "10s", value_parser = parse_nonzero_duration)]
    #[serde(with = "duration")]
    pub wait: Duration,

    /// Start calling only once this many instances are registered and connected.
    #[arg(
        global = true,
        long,
        default_value_t = 1,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub min_instances: usize,

    /// Number of calls to make, in total over all --concurrency slots [default: 10; watch runs
    /// until Ctrl-C unless given].
    #[arg(
        global = true,
        long,
        value_parser = clap::value_parser!(u64).range(1..),
        conflicts_with_all = ["duration", "forever"],
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,

    /// Pause between calls, from the start of one to the start of the next, in each --concurrency
    /// slot; 0s sends each call as soon as the previous one in its slot returned.
    #[arg(global = true, long, default_value = "200ms", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub interval: Duration,

    /// Calls in flight at once: that many slots, each calling once per --interval, together
    /// making --requests calls (or calling for --duration, or --forever).
    #[arg(
        global = true,
        long,
        default_value_t = 1,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_CONCURRENCY as u64)
    )]
    pub concurrency: usize,

    /// Keep calling for this long instead of a fixed number of calls.
    #[arg(global = true, long, value_parser = parse_nonzero_duration, conflicts_with = "forever")]
    #[serde(
        with = "duration::option",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub duration: Option<Duration>,

    /// Keep calling until interrupted (Ctrl-C).
    #[arg(global = true, long)]
    pub forever: bool,

    /// Deadline of each call, retries included.
    #[arg(global = true, long, default_value = "2s", value_parser = parse_nonzero_duration)]
    #[serde(with = "duration")]
    pub timeout: Duration,

    /// The name to greet.
    #[arg(global = true, long, default_value = "world")]
    pub name: String,

    /// Attempts per call, the first included; failed calls are retried on another instance when
    /// that is safe (SayHello is idempotent). 1 disables retries.
    #[arg(global = true, long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub max_attempts: u32,

    /// How calls are spread: round_robin, weighted_round_robin, random, least_request,
    /// consistent_hash or pick_first.
    #[arg(global = true, long, default_value = "round_robin")]
    #[serde(with = "text")]
    pub policy: Policy,

    /// Key sent with every call for consistent_hash (same key, same instance); only with
    /// --policy consistent_hash.
    #[arg(global = true, long, value_parser = parse_hash_key)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<String>,

    /// Only call instances whose metadata has KEY=VALUE (e.g. version=v2); repeatable.
    #[arg(global = true, long = "select", value_name = "KEY=VALUE", value_parser = parse_pair)]
    #[serde(with = "pairs")]
    pub select: Vec<(String, String)>,

    /// Prefer instances whose metadata has KEY=VALUE (e.g. zone=a), falling back to the others when
    /// none has; repeatable.
    #[arg(global = true, long = "prefer", value_name = "KEY=VALUE", value_parser = parse_pair)]
    #[serde(with = "pairs")]
    pub prefer: Vec<(String, String)>,

    /// Once the service has more than --subset-above instances, connect to and health-check only
    /// this many of them, chosen by rendezvous hashing on a random identity per run; 0 connects
    /// to all, however many there are.
    #[arg(global = true, long, default_value_t = Subsetting::default().size)]
    pub subset_size: usize,

    /// The instance count above which --subset-size applies; at or below it every instance is
    /// connected.
    #[arg(global = true, long, default_value_t = Subsetting::default().above)]
    pub subset_above: usize,

    /// How instances are recorded in etcd: go-naming (ours, Go's naming package), go-zero or
    /// kratos (to call services registered by those frameworks).
    #[arg(global = true, long, default_value = "go-naming")]
    #[serde(with = "text")]
    pub format: Format,

    /// Seed for the random choices of random and least_request, for repeatable runs.
    #[arg(global = true, long)]
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

    fn validate(&self, sources: &Sources) -> cli::Result<()> {
        self.check(sources)
    }
}

/// The most calls in flight `--concurrency` allows.
pub const MAX_CONCURRENCY: usize = 1000;

impl Config {
    /// Checks what clap cannot (values from a file skip its parsers; some settings only make
    /// sense together), naming flags. The binary runs the same checks while loading.
    ///
    /// # Errors
    /// A message naming the setting to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        Ok(self.check(&Sources::flags())?)
    }

    fn check(&self, sources: &Sources) -> cli::Result<()> {
        let more_than_zero = |key: &str, value: Duration| {
            if value.is_zero() {
                Err(sources.invalid(key, "must be more than zero"))
            } else {
                Ok(())
            }
        };
        more_than_zero("wait", self.wait)?;
        more_than_zero("timeout", self.timeout)?;
        if let Some(duration) = self.duration {
            more_than_zero("duration", duration)?;
        }
        if self.requests == Some(0) {
            return Err(sources.invalid("requests", "must be at least 1"));
        }
        let lengths = [
            ("requests", self.requests.is_some()),
            ("duration", self.duration.is_some()),
            ("forever", self.forever),
        ];
        let given: Vec<_> = lengths.iter().filter(|(_, set)| *set).collect();
        if let [(first, _), (second, _), ..] = given.as_slice() {
            return Err(sources.invalid(
                first,
                format!(
                    "cannot be combined with {}: give one of --requests, --duration, --forever",
                    sources.name(second)
                ),
            ));
        }
        if self.min_instances == 0 {
            return Err(sources.invalid("min-instances", "must be at least 1"));
        }
        if !(1..=10).contains(&self.max_attempts) {
            return Err(sources.invalid("max-attempts", "must be 1 to 10"));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(sources.invalid("concurrency", format!("must be 1 to {MAX_CONCURRENCY}")));
        }
        if let Some(key) = &self.hash_key {
            parse_hash_key(key).map_err(|e| sources.invalid("hash-key", e))?;
            if self.policy != Policy::ConsistentHash {
                return Err(sources.invalid(
                    "hash-key",
                    format!(
                        "only steers calls with --policy consistent_hash (the policy is {}): \
                         add --policy consistent_hash or drop the key",
                        self.policy
                    ),
                ));
            }
        }
        if self.tls.tls_ca.is_none() && (self.tls.tls_cert.is_some() || self.tls.tls_key.is_some())
        {
            return Err(sources.invalid(
                "tls-cert",
                "a client certificate without --tls-ca: set --tls-ca to the CA that signed the \
                 servers' certificates",
            ));
        }
        self.etcd.validate(sources)?;
        self.tls.validate()?;
        Ok(())
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
        /// How often the view is refreshed (more than zero).
        #[arg(long, default_value = "500ms", value_parser = parse_nonzero_duration)]
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
    /// The latencies of successful calls.
    pub latencies: Latencies,
    /// From the first call to the last reply.
    pub elapsed: Duration,
}

impl Report {
    /// Counts one call.
    pub fn count(&mut self, outcome: &CallOutcome) {
        match (&outcome.error, &outcome.addr, &outcome.instance_id) {
            (None, addr, id) => {
                let key = (
                    addr.clone().unwrap_or_else(|| "?".into()),
                    id.clone().unwrap_or_else(|| "?".into()),
                );
                *self.served.entry(key).or_default() += 1;
                self.latencies.record(outcome.latency);
            }
            (Some(_), _, _) => self.failed += 1,
        }
    }

    /// Total calls made.
    pub fn total(&self) -> u64 {
        self.served.values().sum::<u64>() + self.failed
    }

    /// The latency that fraction `q` (0.5 for the median, 0.99) of successful calls did not
    /// exceed (nearest rank), or `None` without successful calls.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        self.latencies.percentile(q)
    }

    /// The per-instance table printed at the end of a run, then the totals: calls, failures,
    /// rate and the p50/p99 latency of successful calls.
    pub fn table(&self) -> String {
        let mut out = format!("{:<28} {:<24} {:>7}\n", "instance", "address", "calls");
        for ((addr, id), calls) in &self.served {
            out += &format!("{id:<28} {addr:<24} {calls:>7}\n");
        }
        out += &format!("total {} calls, {} failed", self.total(), self.failed);
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            out += &format!(
                " in {seconds:.2} s ({:.1} calls/s)",
                self.total() as f64 / seconds
            );
        }
        if let (Some(p50), Some(p99)) = (self.percentile(0.5), self.percentile(0.99)) {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            out += &format!("; latency p50 {:.2} ms, p99 {:.2} ms", ms(p50), ms(p99));
        }
        out
    }
}

/// Latencies of successful calls, in bounded memory however long the run: every one until
/// [`Latencies::KEPT`] are held, then an evenly spaced sample (every 2nd, every 4th, ...) of at
/// most twice that, so the percentiles of a `--forever` run stay close while memory stays flat.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Latencies {
    kept: Vec<Duration>,
    /// Every how many-th latency is kept (0 before the first).
    every: u64,
    seen: u64,
}

impl Latencies {
    /// How many latencies are held before sampling starts.
    pub const KEPT: usize = 100_000;

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        self.every = self.every.max(1);
        self.seen += 1;
        if self.seen % self.every != 0 {
            return;
        }
        self.kept.push(latency);
        if self.kept.len() >= 2 * Self::KEPT {
            // Halve: keep every other sample, and from now on every other latency.
            self.kept = self.kept.iter().copied().step_by(2).collect();
            self.every *= 2;
        }
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.seen
    }

    /// The latency that fraction `q` of those recorded did not exceed (nearest rank over what is
    /// held), or `None` if none was.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        let mut sorted = self.kept.clone();
        sorted.sort_unstable();
        let rank = (q * sorted.len() as f64).ceil() as usize;
        sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
    }
}

/// How long a run lasts: a number of calls, a time, or until stopped.
#[derive(Debug, Clone, Copy)]
enum Length {
    Calls(u64),
    Until(Instant),
    Forever,
}

/// Discovers the service and makes the configured calls, printing one line per call and per
/// membership change to stdout, until done or `shutdown` fires. `--concurrency` slots call at
/// once, each once per `--interval`; `--requests` counts the calls of all slots together. When
/// stdout is closed (`client | head`), no new call is started and the run ends quietly.
///
/// # Errors
/// If the configuration is invalid, etcd is unusable or no instance shows up within `--wait`.
/// Failed calls are not errors: they are counted in the [`Report`].
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<Report> {
    config.validate()?;
    let registry_config = config
        .etcd
        .registry_config(registry::DEFAULT_TTL)
        .context("etcd settings")?;
    let tls = config.tls.load().context("TLS settings")?;
    let tls_on = tls.is_some();
    let balancer_tls = tls
        .as_ref()
        .map(|tls| tls.balancer_config(None))
        .transpose()
        .context("TLS settings")?;
    config.metrics.install()?;
    let endpoints = config.etcd.etcd_endpoints.join(",");
    let etcd = registry_config.connect().await.map_err(name_settings)?;
    let prefix = registry::key::service_prefix(&config.etcd.namespace, &config.etcd.service)?;
    cli::preflight::check(&etcd, &prefix, config.etcd.etcd_timeout).await?;
    let discovery = Discovery::builder(&config.etcd.service)
        .namespace(&config.etcd.namespace)
        .format(config.format)
        .start(&etcd)?;
    let selector = Selector {
        require: config.select.clone(),
        prefer: config.prefer.clone(),
    };
    let options = BalanceOptions {
        call_timeout: config.timeout,
        retry: RetryPolicy {
            max_attempts: config.max_attempts,
            ..RetryPolicy::default()
        }
        .idempotent(SAY_HELLO),
        policy: config.policy,
        selector: selector.clone(),
        seed: config.seed,
        tls: balancer_tls,
        subset: Subsetting {
            size: config.subset_size,
            above: config.subset_above,
            ..Subsetting::default()
        },
        ..BalanceOptions::default()
    };
    let channel = BalancedChannel::new(discovery.clone(), options);

    let ready = async {
        discovery
            .wait_synced(config.etcd.etcd_timeout)
            .await
            .with_context(|| format!("cannot list instances from etcd at {endpoints}"))?;
        let started = Instant::now();
        let waited = async {
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
        .await;
        match waited {
            Ok(()) => Ok(()),
            Err(e) => {
                let why = unready(&config, &discovery, &channel, &selector, tls_on).await;
                Err(e.context(why))
            }
        }
    };
    tokio::select! {
        ready = ready => ready?,
        _ = shutdown.cancelled() => return Ok(Report::default()),
    }

    let mut membership = discovery.subscribe();
    let mut known = membership.borrow_and_update().instances.clone();
    let (mut view, refresh, length) = match &config.command {
        None => {
            for instance in known.values() {
                out::line(&format!("  found {} at {}", instance.id, instance.addr));
            }
            (None, Duration::from_secs(3600), length_of(&config, false))
        }
        Some(Command::Watch { refresh, plain }) => {
            let interactive = !plain && std::io::stdout().is_terminal();
            let title = format!("{} ({})", config.etcd.service, config.policy);
            let mut view = watch::View::new(interactive, title);
            for instance in known.values() {
                view.membership(&Change::Added(instance.clone()));
            }
            (Some(view), *refresh, length_of(&config, true))
        }
    };
    let mut redraw = tokio::time::interval(refresh);
    redraw.set_missed_tick_behavior(MissedTickBehavior::Delay);

    // The slots: each makes calls until the run's length is reached or `stop` fires, and sends
    // every outcome here. A call in flight when `stop` fires is let finish (it has a deadline),
    // so its outcome is counted.
    let stop = shutdown.child_token();
    let (outcomes_tx, mut outcomes) = tokio::sync::mpsc::channel(config.concurrency * 2);
    let numbers = Arc::new(AtomicU64::new(0));
    let request = Arc::new(CallSpec {
        name: config.name.clone(),
        hash_key: config.hash_key.as_deref().and_then(|k| k.parse().ok()),
    });
    let mut slots = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..config.concurrency {
        slots.spawn(slot(
            GreeterClient::new(channel.clone()),
            request.clone(),
            config.interval,
            length,
            numbers.clone(),
            stop.clone(),
            outcomes_tx.clone(),
        ));
    }
    drop(outcomes_tx);

    let mut report = Report::default();
    let mut watching = true;
    let mut order = Order::default();
    let show_change = |view: &mut Option<watch::View>, change: &Change| match view {
        Some(view) => view.membership(change),
        None => print_change(change),
    };
    loop {
        tokio::select! {
            outcome = outcomes.recv() => {
                // None: every slot is done.
                let Some(outcome) = outcome else { break };
                report.count(&outcome);
                match &mut view {
                    Some(view) => view.call(&outcome),
                    None => print_call(&outcome),
                }
                for change in order.call_done(outcome.n) {
                    show_change(&mut view, &change);
                }
            }
            changed = membership.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    continue;
                }
                let now = membership.borrow_and_update().instances.clone();
                let started = numbers.load(Ordering::SeqCst);
                let started = match length {
                    Length::Calls(total) => started.min(total),
                    _ => started,
                };
                for change in known.diff(&now) {
                    if let Some(change) = order.seen(change, started) {
                        show_change(&mut view, &change);
                    }
                }
                known = now;
            }
            _ = redraw.tick(), if view.is_some() => {
                if let Some(view) = &mut view {
                    view.refresh(&channel.instances());
                }
            }
        }
        if out::is_closed() {
            // Nobody reads what we print: finish the calls in flight and stop, as Unix tools do.
            stop.cancel();
        }
    }
    report.elapsed = started.elapsed();
    for change in order.rest() {
        show_change(&mut view, &change);
    }
    while let Some(ended) = slots.join_next().await {
        ended.context("a call slot died")?;
    }
    if let Some(view) = &mut view {
        view.refresh(&channel.instances());
        out::line("");
    }
    Ok(report)
}

/// Keeps the printed lines in the order things happened: a membership change is shown only after
/// every call that had started when the change was seen, so a call printed after "left" was
/// sent after the client knew. (A call completes, and is printed, after its start.)
#[derive(Default)]
struct Order {
    /// Every call numbered up to this one has been printed.
    done_up_to: u64,
    /// Calls printed out of order, above `done_up_to`.
    done_above: std::collections::BTreeSet<u64>,
    /// Changes waiting for calls, each with the number of the last call started before it.
    held: std::collections::VecDeque<(u64, Change)>,
}

impl Order {
    /// A change seen when calls 1 to `started` had started: returned if it can be shown now.
    fn seen(&mut self, change: Change, started: u64) -> Option<Change> {
        if self.held.is_empty() && started <= self.done_up_to {
            return Some(change);
        }
        self.held.push_back((started, change));
        None
    }

    /// Call `n` was printed: returns the changes that no longer wait for any call.
    fn call_done(&mut self, n: u64) -> Vec<Change> {
        self.done_above.insert(n);
        while self.done_above.remove(&(self.done_up_to + 1)) {
            self.done_up_to += 1;
        }
        let mut ready = Vec::new();
        while self
            .held
            .front()
            .is_some_and(|(started, _)| *started <= self.done_up_to)
        {
            ready.extend(self.held.pop_front().map(|(_, change)| change));
        }
        ready
    }

    /// The changes still held once no call is left.
    fn rest(&mut self) -> Vec<Change> {
        self.held.drain(..).map(|(_, change)| change).collect()
    }
}

/// A registry error with the flags to check added, when the library's message names none.
fn name_settings(error: registry::Error) -> anyhow::Error {
    match cli::settings_to_check(&error) {
        Some(settings) => anyhow::Error::from(error).context(settings),
        None => error.into(),
    }
}

/// The run's length from `--requests`, `--duration` and `--forever` (which `validate` keeps
/// exclusive). Watching is open-ended unless a length was asked for.
fn length_of(config: &Config, watching: bool) -> Length {
    match (config.requests, config.duration) {
        _ if config.forever => Length::Forever,
        (Some(n), _) => Length::Calls(n),
        (None, Some(d)) => Length::Until(Instant::now() + d),
        (None, None) if watching => Length::Forever,
        (None, None) => Length::Calls(DEFAULT_REQUESTS),
    }
}

/// What every call sends.
#[derive(Debug)]
struct CallSpec {
    name: String,
    hash_key: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// One slot: calls once per `interval` (back to back when zero), taking call numbers from
/// `numbers`, until `length` is reached or `stop` fires.
async fn slot(
    mut client: GreeterClient<BalancedChannel>,
    request: Arc<CallSpec>,
    interval: Duration,
    length: Length,
    numbers: Arc<AtomicU64>,
    stop: CancellationToken,
    outcomes: tokio::sync::mpsc::Sender<CallOutcome>,
) {
    // `tokio::time::interval` refuses a zero period; zero means no pause at all.
    let mut tick = (!interval.is_zero()).then(|| {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick
    });
    loop {
        if let Some(tick) = &mut tick {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
        } else if stop.is_cancelled() {
            return;
        }
        let n = match length {
            Length::Until(deadline) if Instant::now() >= deadline => return,
            Length::Calls(total) => {
                let n = numbers.fetch_add(1, Ordering::Relaxed) + 1;
                if n > total {
                    return;
                }
                n
            }
            _ => numbers.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let outcome = call(&mut client, n, &request).await;
        if outcomes.send(outcome).await.is_err() {
            return;
        }
    }
}

/// Why no instance could be called, as precisely as what is known allows: none registered, none
/// matching `--select`, or registered but never connected (a TLS mismatch, most often).
async fn unready(
    config: &Config,
    discovery: &Discovery,
    channel: &BalancedChannel,
    selector: &Selector,
    tls_on: bool,
) -> String {
    let service = &config.etcd.service;
    let prefix = format!("{}/{service}/", config.etcd.namespace);
    let known = discovery.membership().instances;
    if known.is_empty() {
        return format!(
            "no instance of {service:?} is registered under {prefix} (etcd {}); start one with: \
             server --port 50051",
            config.etcd.etcd_endpoints.join(",")
        );
    }
    let admitted: Vec<_> = known
        .values()
        .filter(|i| selector.admits(&i.metadata))
        .collect();
    if admitted.is_empty() {
        let select: Vec<_> = config
            .select
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let seen: Vec<_> = known
            .values()
            .map(|i| format!("{} {}", i.id, i.metadata))
            .collect();
        return format!(
            "{} instance(s) of {service:?} registered, but none matches --select {}: {}",
            known.len(),
            select.join(" --select "),
            seen.join("; ")
        );
    }
    if admitted.len() < config.min_instances {
        return format!(
            "only {} instance(s) of {service:?} registered and selected, fewer than --min-instances {}",
            admitted.len(),
            config.min_instances
        );
    }
    let statuses = channel.instances();
    let connected = statuses.iter().filter(|s| s.connected).count();
    if connected == 0 {
        let addrs: Vec<_> = admitted.iter().map(|i| i.addr.as_str()).collect();
        let mut why = format!(
            "{} instance(s) of {service:?} registered ({}), but none could be connected",
            admitted.len(),
            addrs.join(", ")
        );
        if !tls_on {
            for addr in &addrs {
                if speaks_tls(addr).await {
                    why += &format!(
                        "; {addr} serves TLS and this client speaks plaintext: pass --tls-ca with \
                         the CA that signed its certificate"
                    );
                    return why;
                }
            }
        } else {
            why += "; if they serve plaintext, drop --tls-ca; if they require client \
                    certificates, pass --tls-cert and --tls-key";
        }
        return why;
    }
    let serving = statuses.iter().filter(|s| s.connected && s.serving).count();
    if serving == 0 {
        return format!(
            "{connected} instance(s) of {service:?} connected, but none reports SERVING (draining, \
             or switched off with SIGUSR1)"
        );
    }
    format!(
        "the instances of {service:?} did not become ready within --wait {:?}",
        config.wait
    )
}

/// Whether `addr` answers the HTTP/2 preface with a TLS record: a TLS server reads the preface
/// as a broken handshake and replies with an alert (content type 21), which a plaintext HTTP/2
/// client then misreads as an oversized frame (FRAME_SIZE_ERROR).
async fn speaks_tls(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .ok()?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await.ok()?;
        Some(matches!(first[0], 0x15 | 0x16))
    };
    tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn parse_hash_key(text: &str) -> Result<String, String> {
    text.parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
        .map(|_| text.to_owned())
        .map_err(|_| format!("{text:?} cannot be sent as gRPC metadata: use visible ASCII"))
}

/// Makes call number `n`.
async fn call(client: &mut GreeterClient<BalancedChannel>, n: u64, spec: &CallSpec) -> CallOutcome {
    let mut request = tonic::Request::new(HelloRequest {
        name: spec.name.clone(),
    });
    if let Some(value) = &spec.hash_key {
        request.metadata_mut().insert(HASH_KEY, value.clone());
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
    out::line(&match (&outcome.error, &outcome.instance_id) {
        (Some(error), _) => format!("call {n:>4}  FAILED {error}  {ms:>8.2} ms"),
        (None, id) => format!(
            "call {n:>4}  {:<21}  {:<24} {ms:>8.2} ms",
            outcome.addr.as_deref().unwrap_or("?"),
            id.as_deref().unwrap_or("?")
        ),
    });
}

fn print_change(change: &Change) {
    out::line(&format!("  {}", describe(change)));
}

/// One line about a membership change, the same in both output modes.
fn describe(change: &Change) -> String {
    match change {
        Change::Added(i) => format!("+ instance {} joined at {}", i.id, i.addr),
        Change::Removed(i) => format!("- instance {} left ({})", i.id, i.addr),
        Change::Updated { old, new } if old.addr != new.addr => {
            format!("~ instance {} now at {}", new.id, new.addr)
        }
        Change::Updated { new, .. } if registry::endpoint::is_draining(&new.metadata) => {
            format!("~ instance {} announced it is leaving (draining)", new.id)
        }
        Change::Updated { new, .. } => format!("~ instance {} updated its metadata", new.id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn left(id: &str) -> Change {
        Change::Removed(registry::Instance {
            id: id.into(),
            key: format!("services/s/{id}"),
            addr: "h:1".into(),
            metadata: Default::default(),
        })
    }

    #[test]
    fn an_update_says_what_changed() {
        let old = registry::Instance {
            id: "a".into(),
            key: "services/s/a".into(),
            addr: "h:1".into(),
            metadata: Default::default(),
        };
        let moved = registry::Instance {
            addr: "h:2".into(),
            ..old.clone()
        };
        let mut leaving = old.clone();
        leaving.metadata = serde_json::json!({ "draining": true });
        let update = |new: &registry::Instance| {
            describe(&Change::Updated {
                old: old.clone(),
                new: new.clone(),
            })
        };
        assert_eq!(update(&moved), "~ instance a now at h:2");
        assert_eq!(
            update(&leaving),
            "~ instance a announced it is leaving (draining)"
        );
        assert_eq!(update(&old), "~ instance a updated its metadata");
    }

    #[test]
    fn a_change_is_shown_after_the_calls_started_before_it() {
        let mut order = Order::default();
        // Calls 1 and 2 started; 2 completes first.
        assert_eq!(order.seen(left("a"), 2), None);
        assert!(order.call_done(2).is_empty());
        assert_eq!(order.call_done(1), vec![left("a")]);
        // Nothing in flight: shown at once.
        assert_eq!(order.seen(left("b"), 2), Some(left("b")));
        // Held changes keep their order, and the rest comes out at the end.
        assert_eq!(order.seen(left("c"), 3), None);
        assert_eq!(order.seen(left("d"), 2), None);
        assert_eq!(order.rest(), vec![left("c"), left("d")]);
    }

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
    fn subsetting_follows_its_flags() {
        let parse = |args: &[&str]| Config::try_parse_from([&["client"], args].concat()).unwrap();
        let defaults = parse(&[]);
        assert_eq!(
            (defaults.subset_size, defaults.subset_above),
            (Subsetting::default().size, Subsetting::default().above)
        );
        let off = parse(&["--subset-size", "0", "--subset-above", "10"]);
        assert_eq!((off.subset_size, off.subset_above), (0, 10));
        assert!(Config::try_parse_from(["client", "--subset-size", "-1"]).is_err());
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

    #[test]
    fn zero_and_contradictory_values_are_refused_by_name() {
        let check = |args: &[&str]| {
            Config::try_parse_from([&["client"], args].concat())
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()))
        };
        for (args, expected) in [
            (&["--timeout", "0s"][..], "more than zero"),
            (&["--etcd-timeout", "0s"], "more than zero"),
            (&["--wait", "0s"], "more than zero"),
            (&["--duration", "0s"], "more than zero"),
            (&["--requests", "0"], "requests"),
            (&["--requests", "5", "--forever"], "forever"),
            (&["--requests", "5", "--duration", "1s"], "duration"),
            (&["--min-instances", "0"], "min-instances"),
            (&["--concurrency", "0"], "concurrency"),
            (&["--hash-key", "user-1"], "consistent_hash"),
            (&["watch", "--refresh", "0s"], "more than zero"),
        ] {
            let error = check(args).expect_err(&format!("{args:?} was accepted"));
            assert!(error.contains(expected), "{args:?}: {error}");
        }
        // Zero pause means back to back; decimal seconds are seconds.
        assert!(check(&["--interval", "0s"]).is_ok());
        assert!(check(&["--hash-key", "u", "--policy", "consistent_hash"]).is_ok());
        let parsed = Config::try_parse_from(["client", "--interval", "0.5"]).unwrap();
        assert_eq!(parsed.interval, Duration::from_millis(500));
    }

    #[test]
    fn flags_are_accepted_after_the_subcommand() {
        let parsed = Config::try_parse_from([
            "client",
            "watch",
            "--etcd-endpoints",
            "127.0.0.1:1",
            "--requests",
            "3",
        ])
        .unwrap();
        assert_eq!(parsed.etcd.etcd_endpoints, ["127.0.0.1:1"]);
        assert_eq!(parsed.requests, Some(3));
        assert!(matches!(parsed.command, Some(Command::Watch { .. })));
    }

    #[test]
    fn a_long_run_keeps_a_bounded_even_sample_of_latencies() {
        let mut latencies = Latencies::default();
        for us in 1..=1_000_000u64 {
            latencies.record(Duration::from_micros(us));
        }
        assert_eq!(latencies.count(), 1_000_000);
        assert!(latencies.kept.len() < 2 * Latencies::KEPT);
        let p50 = latencies.percentile(0.5).unwrap().as_micros() as f64;
        let p99 = latencies.percentile(0.99).unwrap().as_micros() as f64;
        assert!((p50 / 500_000.0 - 1.0).abs() < 0.01, "p50 {p50}");
        assert!((p99 / 990_000.0 - 1.0).abs() < 0.01, "p99 {p99}");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut report = Report::default();
        assert_eq!(report.percentile(0.5), None);
        for ms in 1..=100 {
            report.latencies.record(Duration::from_millis(ms));
        }
        assert_eq!(report.percentile(0.5), Some(Duration::from_millis(50)));
        assert_eq!(report.percentile(0.99), Some(Duration::from_millis(99)));
        report.latencies = Latencies::default();
        report.latencies.record(Duration::from_millis(7));
        assert_eq!(report.percentile(0.99), Some(Duration::from_millis(7)));
        report.served.insert(("h:1".into(), "a".into()), 1);
        report.elapsed = Duration::from_secs(2);
        let table = report.table();
        assert!(table.contains("p50 7.00 ms, p99 7.00 ms"), "{table}");
        assert!(table.contains("(0.5 calls/s)"), "{table}");
    }
}
