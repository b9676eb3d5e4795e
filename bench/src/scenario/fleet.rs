//! Scenario 10, fleet: one service of 10,000 instances that really answer, and a client with and
//! without subsetting ([`registry::Subsetting`]).
//!
//! On Linux every `127.x.y.z` address reaches a socket listening on `0.0.0.0`, so a few server
//! processes (the hidden `fleet-sink` subcommand: Greeter and `grpc.health.v1` on `0.0.0.0:<port>`)
//! answer 10,000 distinct `127.x.y.z:port` records: four sinks serve 9,900 instances, a fifth the
//! 100 (1 %) that restart. Each sink counts, for the bench, the health checks and Greeter calls it
//! answers and the connections it accepts and closes, so health-check traffic and churn are the
//! servers' own counts. The clients run in the bench process (their RSS and CPU are the process's
//! growth over its own baseline); connections held are counted twice, by the channel and in
//! `/proc/net/tcp`.
//!
//! Measured, for one client connecting to all and one with subsets of 20: time until the first
//! call and until every connection is in rotation, connections held, RSS growth, idle CPU, health
//! checks a second, one change applied, and a restart of the 1 % under load. Then 100 clients at
//! K = 20 in one process: how calls and connections spread over the 10,000 instances. And the
//! memory per known instance for a discovery and a subsetting channel, from 1,000 to 100,000.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    process::{ChildStdin, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use etcd_client::{PutOptions, Txn, TxnOp};
use proto::helloworld::{
    HelloRequest, greeter_client::GreeterClient, greeter_server::GreeterServer,
};
use registry::{
    BalanceOptions, BalancedChannel, Discovery, Endpoint, Etcd, RetryPolicy, ServedBy, Subsetting,
    key,
};
use serde::{Deserialize, Serialize};
use testkit::ChildGuard;
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::StreamExt;

use super::Ctx;
use crate::{
    clients::{CALL_TIMEOUT, Client, NAMESPACE},
    fixture::{Fixture, bench_exe},
    load::{self, Load},
    machine,
    report::Section,
    stats::{Summary, cells, ms, num},
};

/// Instances of the fleet.
const INSTANCES: usize = 10_000;

/// Sinks serving the instances that stay up.
const SINKS: usize = 4;

/// Instances restarted together (1 %), all on one sink of their own.
const RESTARTED: usize = 100;

/// The subset size measured: the 20, also the default.
const K: usize = 20;

/// Clients in one process for the spread figures.
const CLIENTS: usize = 100;

/// The fleet's service (not the fixture's, so its observer stays small).
const FLEET: &str = "fleet";

/// The service of the memory measurement, topped up from 1,000 to 100,000 records.
const MEMORY: &str = "fleet-memory";

/// Runs the scenario.
///
/// # Errors
/// When a sink, etcd or a client fails, or a wait runs out.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    let mut s = Section::new("10. Fleet: 10,000 real instances, with and without subsetting");
    let (soft, hard) = raise_nofile()?;
    let fixture = Fixture::start(0, &[]).await?;
    let ports: Vec<u16> = (0..=SINKS).map(|_| testkit::free_port()).collect();
    let mut sinks = Vec::new();
    for &port in &ports {
        sinks.push(Sink::start(port).await?);
    }
    let fleet = Fleet { ports };
    s.line(format!(
        "{INSTANCES} instance records `127.x.y.z:port` answered by {} sink processes on \
         `0.0.0.0` ({RESTARTED} of them, 1 %, on a sink of their own that restarts). Clients in \
         the bench process; RSS and CPU are the process's growth over its own baseline; \
         connections counted by the channel and by the kernel (`/proc/net/tcp`); health checks \
         and connections opened and closed counted by the sinks. RLIMIT_NOFILE raised from {soft} \
         to the hard limit {hard}.\n",
        SINKS + 1
    ));

    // Memory first: later measurements leave freed memory that a new discovery would reuse.
    let sizes: &[usize] = if ctx.quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 30_000, 100_000]
    };
    memory_per_instance(&mut s, &fixture.etcd, &fleet, sizes).await?;

    let written = Instant::now();
    put_fleet(&fixture.etcd, FLEET, &fleet, 0..INSTANCES, 0).await?;
    s.line(format!(
        "\nThe fleet's {INSTANCES} records written in {:.1} s.\n",
        written.elapsed().as_secs_f64()
    ));
    let window = ctx.window(Duration::from_secs(10), Duration::from_secs(3));
    s.line(format!(
        "One client, {}: idle CPU and health checks over a {:.0} s window with no calls; one \
         change = a put (then a delete) of a 10,001st instance, from sending the request to \
         the channel knowing it, {CHANGES} of each; member replaced = a subset member's record deleted, until another \
         instance is in rotation; restart = the {RESTARTED} instances go NOT_SERVING, their \
         records are deleted, their sink is killed and started again and the records put back \
         under new ids, under a load of 200 calls/s (SayHello retried on another instance when \
         safe).\n",
        "round robin",
        window.as_secs_f64()
    ));
    s.line(
        "| client | first call ms | all in rotation ms | connections (channel / kernel) | RSS growth MiB | idle CPU % | health checks/s | instances called | put sent → applied median ms | p99 | delete sent → applied median ms | p99 | member replaced ms | restart: calls / failed | restart: connections opened / closed |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    );
    // Restarts put the restarted instances back under new ids: generation 1, 2, ...
    let mut generation = 0;
    let mut verdicts = Vec::new();
    let mut spread = None;
    for (label, subset, expected) in [
        (format!("subsets of {K}"), Subsetting::always(K), K),
        (
            "all (subsetting off)".to_owned(),
            Subsetting::off(),
            INSTANCES,
        ),
    ] {
        let one = one_client(
            &fixture.etcd,
            &fleet,
            &mut sinks,
            subset,
            expected,
            window,
            &mut generation,
        )
        .await?;
        let churn = one.churn.as_ref();
        s.line(format!(
            "| {label} | {} | {} | {} / {} | {} | {} | {} | {} of {} | {} | {} | {} | {} / {} | {} / {} |",
            one.first_call_ms.map_or(format!("none in {START_LIMIT:?}"), num),
            one.all_ready_ms.map_or(
                format!("{} of {expected} after {START_LIMIT:?}", one.in_rotation),
                num
            ),
            one.held,
            one.kernel,
            num(one.rss_mib),
            num(one.idle_cpu),
            num(one.health_per_s),
            one.called,
            expected,
            cells(one.change.map(|c| c.0)),
            cells(one.change.map(|c| c.1)),
            one.replaced_ms.map_or("n/a".to_owned(), num),
            churn.map_or("n/a".to_owned(), |c| c.calls.to_string()),
            churn.map_or("n/a".to_owned(), |c| c.failed.to_string()),
            churn.map_or("n/a".to_owned(), |c| c.opened.to_string()),
            churn.map_or("n/a".to_owned(), |c| c.closed.to_string()),
        ));
        if expected == K {
            // The 100 clients before the client that connects to all: that one leaves the
            // machine busy closing 10,000 connections for a while.
            spread = Some(
                many_clients(&fixture.etcd, &fleet, &mut sinks, window, &mut generation).await?,
            );
            verdicts.push((
                format!("a client knowing {INSTANCES} holds at most K = {K} connections"),
                format!("{} (channel), {} (kernel)", one.held, one.kernel),
                Some(one.held <= K && one.kernel <= K),
            ));
            verdicts.push((
                "it sends calls to all of its subset".to_owned(),
                format!("{} of {K}", one.called),
                Some(one.called == K),
            ));
            verdicts.push((
                format!("no failed call while {RESTARTED} instances (1 %) restart"),
                churn.map_or("not reached".to_owned(), |c| {
                    format!("{} of {}", c.failed, c.calls)
                }),
                churn.map(|c| c.failed == 0),
            ));
        }
    }

    let spread = spread.context("the 100 clients ran with the subsetting client")?;
    s.line(format!(
        "\n{CLIENTS} clients at K = {K} in one process: ready (all {} connections in rotation) \
         after {} ms; {} connections (kernel), RSS growth {} MiB, {} health checks/s. Each \
         client then made {CALLS_PER_CLIENT} calls (round robin over its subset): per-instance \
         calls over all {INSTANCES} instances have a coefficient of variation of {} (a binomial \
         choice, Bin({CLIENTS}, {K}/{INSTANCES}) clients per instance times \
         {CALLS_PER_CLIENT}/{K} calls each, predicts {}); {} instances ({} %) received calls \
         (independent choices predict {:.1} %). Connections per instance, min / median / max: \
         {} / {} / {} over all {INSTANCES}, {} / {} / {} over the {} instances connected. The \
         restart of the 1 % under load (5 calls/s per client): {} calls, {} failed ({}), \
         connections opened / closed {} / {}.\n",
        CLIENTS * K,
        num(spread.ready_ms),
        spread.kernel,
        num(spread.rss_mib),
        num(spread.health_per_s),
        num(spread.calls_cv),
        num(spread.expected_cv),
        spread.called,
        num(100.0 * spread.called as f64 / INSTANCES as f64),
        100.0 * spread.expected_covered,
        spread.all.0,
        spread.all.1,
        spread.all.2,
        spread.connected.0,
        spread.connected.1,
        spread.connected.2,
        spread.connected_instances,
        spread.churn.calls,
        spread.churn.failed,
        spread.churn.failures,
        spread.churn.opened,
        spread.churn.closed
    ));
    s.line(format!(
        "{CLIENTS} x {K} = {} connections cannot cover {INSTANCES} instances: the calls reach the \
         instances some subset holds, and an instance's share is binomial in the clients that \
         chose it. Evenness over the whole fleet needs clients x K well above the instance count \
         (the CV is about sqrt(N / (clients x K))).",
        CLIENTS * K
    ));
    verdicts.push((
        format!("{CLIENTS} clients at K = {K}: CV of calls over {INSTANCES} instances"),
        format!(
            "{} (binomial expectation {})",
            num(spread.calls_cv),
            num(spread.expected_cv)
        ),
        None,
    ));
    verdicts.push((
        format!("{CLIENTS} clients at K = {K}: no failed call while 1 % restart"),
        format!("{} of {}", spread.churn.failed, spread.churn.calls),
        Some(spread.churn.failed == 0),
    ));
    for (target, measured, met) in verdicts {
        s.verdict(target, measured, met);
    }
    Ok(s)
}

/// Where the fleet's instances listen.
struct Fleet {
    /// The sinks' ports: [`SINKS`] for the stable instances, then the restarting one's.
    ports: Vec<u16>,
}

impl Fleet {
    /// Instance `i`'s address: a distinct loopback IP, on the port of the sink serving it.
    fn addr(&self, i: usize) -> String {
        let port = if i < RESTARTED {
            self.ports[SINKS]
        } else {
            self.ports[i % SINKS]
        };
        format!("{}:{port}", ip(i))
    }

    /// Instance `i`'s id in a generation of restarts (the restarted ones come back as new ids).
    fn id(i: usize, generation: usize) -> String {
        if i < RESTARTED && generation > 0 {
            format!("f-{i:06}-r{generation}")
        } else {
            format!("f-{i:06}")
        }
    }
}

/// `127.a.b.c` with `b` and `c` in 1..=250, distinct for up to 3.9 million instances.
fn ip(i: usize) -> Ipv4Addr {
    let octet = |x: usize| (x % 250 + 1) as u8;
    Ipv4Addr::new(127, octet(i / 62_500), octet(i / 250), octet(i))
}

/// Puts the records of instances `range` of `service` (ids of `generation`), 100 per transaction
/// (etcd's default --max-txn-ops is 128), under one lease that outlives the run.
async fn put_fleet(
    etcd: &Etcd,
    service: &str,
    fleet: &Fleet,
    range: std::ops::Range<usize>,
    generation: usize,
) -> anyhow::Result<()> {
    let mut client = etcd.client();
    let lease = client
        .lease_grant(3600, None)
        .await
        .context("granting the fleet's lease")?
        .id();
    let mut ops = Vec::with_capacity(range.len());
    for i in range {
        let id = Fleet::id(i, generation);
        ops.push(TxnOp::put(
            key::instance_key(NAMESPACE, service, &id)?,
            Endpoint::new(fleet.addr(i), &id)?.encode(),
            Some(PutOptions::new().with_lease(lease)),
        ));
    }
    for chunk in ops.chunks(100) {
        client
            .txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .with_context(|| format!("writing {service}'s instance records"))?;
    }
    Ok(())
}

/// Deletes the records of instances `range` (ids of `generation`).
async fn delete_fleet(
    etcd: &Etcd,
    fleet_service: &str,
    range: std::ops::Range<usize>,
    generation: usize,
) -> anyhow::Result<()> {
    let ops = range
        .map(|i| {
            Ok(TxnOp::delete(
                key::instance_key(NAMESPACE, fleet_service, &Fleet::id(i, generation))?,
                None,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for chunk in ops.chunks(100) {
        etcd.client()
            .txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .context("deleting instance records")?;
    }
    Ok(())
}

/// The options of every measured client: the bench's call deadline, `SayHello` retried on another
/// instance when safe (as the `client` binary does), and `subset`.
fn options(subset: Subsetting) -> BalanceOptions {
    BalanceOptions {
        call_timeout: CALL_TIMEOUT,
        retry: RetryPolicy::default().idempotent("/helloworld.Greeter/SayHello"),
        subset,
        ..BalanceOptions::default()
    }
}

fn channel(etcd: &Etcd, service: &str, subset: Subsetting) -> anyhow::Result<BalancedChannel> {
    let discovery = Discovery::builder(service)
        .namespace(NAMESPACE)
        .start(etcd)
        .context("starting discovery")?;
    Ok(BalancedChannel::new(discovery, options(subset)))
}

/// RSS growth per known instance, for a discovery and a channel with subsets of [`K`].
async fn memory_per_instance(
    s: &mut Section,
    etcd: &Etcd,
    fleet: &Fleet,
    sizes: &[usize],
) -> anyhow::Result<()> {
    s.line(format!(
        "Memory per known instance: records of real instances topped up to each size; a new \
         `Discovery` and a channel with subsets of {K} until it knows every instance and its {K} \
         connections are in rotation; the growth of this process's VmRSS, divided by the \
         instance count (it includes the {K} connections, which weigh most at 1,000).\n"
    ));
    s.line("| instances | write ms | known and ready ms | RSS growth MiB | bytes per instance |\n|---|---|---|---|---|");
    let mut have = 0;
    for &n in sizes {
        let written = Instant::now();
        put_fleet(etcd, MEMORY, fleet, have..n, 0).await?;
        have = n;
        let written = written.elapsed();
        let before = baseline()?;
        let started = Instant::now();
        let channel = channel(etcd, MEMORY, Subsetting::always(K))?;
        let synced = wait_until(Duration::from_secs(60), "every record known", || {
            channel.subset().known == n
        })
        .await;
        if synced.is_err() {
            // Reported, not fatal: the larger sizes would fail the same way.
            let membership = channel.discovery().membership();
            s.line(format!(
                "| {n} | {:.0} | not synced after 60 s: {} of {n} known, discovery reports {:?} | | |",
                ms(written),
                membership.instances.len(),
                membership.problem.as_deref().unwrap_or("no problem")
            ));
            break;
        }
        channel
            .wait_ready(K, Duration::from_secs(60))
            .await
            .context("the memory channel's subset")?;
        let ready = started.elapsed();
        let after = machine::sample(None)?;
        let growth = after.rss_kib.saturating_sub(before.rss_kib) as f64 * 1024.0;
        s.line(format!(
            "| {n} | {:.0} | {:.0} | {} | {:.0} |",
            ms(written),
            ms(ready),
            num(growth / 1024.0 / 1024.0),
            growth / n as f64
        ));
    }
    Ok(())
}

/// What one client measured; `None` where it did not get that far within [`START_LIMIT`].
struct OneClient {
    first_call_ms: Option<f64>,
    all_ready_ms: Option<f64>,
    in_rotation: usize,
    held: usize,
    kernel: usize,
    rss_mib: f64,
    idle_cpu: f64,
    health_per_s: f64,
    called: usize,
    /// Put and delete, sent → applied, ms.
    change: Option<(Summary, Summary)>,
    replaced_ms: Option<f64>,
    churn: Option<Churn>,
}

/// How long a client may take to make its first call and to have every instance it wants in
/// rotation; beyond it, what it reached is reported.
const START_LIMIT: Duration = Duration::from_secs(90);

/// Puts and deletes of one instance timed per client.
const CHANGES: usize = 10;

async fn one_client(
    etcd: &Etcd,
    fleet: &Fleet,
    sinks: &mut [Sink],
    subset: Subsetting,
    expected: usize,
    window: Duration,
    generation: &mut usize,
) -> anyhow::Result<OneClient> {
    let before = baseline()?;
    let started = Instant::now();
    let channel = channel(etcd, FLEET, subset)?;
    let mut client = GreeterClient::new(channel.clone());
    let deadline = started + START_LIMIT;
    let first_call_ms = loop {
        if call(&mut client).await.is_ok() {
            break Some(ms(started.elapsed()));
        }
        if Instant::now() > deadline {
            break None;
        }
        // A failed call returned: poll again shortly.
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let all_ready_ms = match first_call_ms {
        Some(_) => channel
            .wait_ready(expected, deadline.saturating_duration_since(Instant::now()))
            .await
            .ok()
            .map(|()| ms(started.elapsed())),
        None => None,
    };
    let in_rotation = channel.ready_addrs().len();
    let held = channel.connected_addrs().len();
    let kernel = client_connections(fleet);
    let rss_mib = machine::sample(None)?
        .rss_kib
        .saturating_sub(before.rss_kib) as f64
        / 1024.0;
    let called = if all_ready_ms.is_some() {
        call_each(&channel, 2 * expected, 32).await?.len()
    } else {
        0
    };

    // Idle: only the background work (discovery's watch, the health checks) runs.
    let (cpu, health_per_s) = idle(sinks, window).await?;

    let (change, replaced_ms, churn) = if all_ready_ms.is_some() {
        // One change: a 10,001st instance on a stable sink.
        let change = one_change(etcd, fleet, &channel, INSTANCES + 1).await?;
        // A member replaced (only with subsets: without, nobody is left to replace it with).
        let replaced = if expected < INSTANCES {
            Some(replace_member(etcd, &channel).await?)
        } else {
            None
        };
        let churn = restart_one_percent(
            etcd,
            fleet,
            sinks,
            std::slice::from_ref(&channel),
            expected,
            200,
            generation,
        )
        .await?;
        (Some(change), replaced, Some(churn))
    } else {
        (None, None, None)
    };
    drop(client);
    drop(channel);
    wait_until(
        Duration::from_secs(60),
        "the client's connections to close",
        || client_connections(fleet) == 0,
    )
    .await?;
    Ok(OneClient {
        first_call_ms,
        all_ready_ms,
        in_rotation,
        held,
        kernel,
        rss_mib,
        idle_cpu: cpu,
        health_per_s,
        called,
        change,
        replaced_ms,
        churn,
    })
}

/// CPU of this process (% of one core) and health checks a second the sinks answered, over
/// `window` with no calls.
async fn idle(sinks: &mut [Sink], window: Duration) -> anyhow::Result<(f64, f64)> {
    let health_before = total(sinks).await?.health;
    let cpu_before = machine::sample(None)?;
    let t = Instant::now();
    // The measurement window itself, not a wait for something to happen.
    tokio::time::sleep(window).await;
    let cpu_after = machine::sample(None)?;
    let elapsed = t.elapsed();
    let health_after = total(sinks).await?.health;
    Ok((
        machine::cpu_percent(&cpu_before, &cpu_after, elapsed),
        (health_after - health_before) as f64 / elapsed.as_secs_f64(),
    ))
}

/// Puts instance `i` and deletes it again, [`CHANGES`] times; for each, the time from sending
/// the request to the channel knowing the change (ms).
async fn one_change(
    etcd: &Etcd,
    fleet: &Fleet,
    channel: &BalancedChannel,
    i: usize,
) -> anyhow::Result<(Summary, Summary)> {
    let known = channel.subset().known;
    let mut client = etcd.client();
    let id = Fleet::id(i, 0);
    let key = key::instance_key(NAMESPACE, FLEET, &id)?;
    let value = Endpoint::new(fleet.addr(i), &id)?.encode();
    let (mut puts, mut deletes) = (Vec::new(), Vec::new());
    for _ in 0..CHANGES {
        let t = Instant::now();
        client
            .put(key.as_str(), value.as_str(), None)
            .await
            .context("putting one instance")?;
        wait_until(Duration::from_secs(10), "the put applied", || {
            channel.subset().known == known + 1
        })
        .await?;
        puts.push(ms(t.elapsed()));
        let t = Instant::now();
        client
            .delete(key.as_str(), None)
            .await
            .context("deleting one instance")?;
        wait_until(Duration::from_secs(10), "the delete applied", || {
            channel.subset().known == known
        })
        .await?;
        deletes.push(ms(t.elapsed()));
    }
    let summary = |v: &[f64]| Summary::of(v).context("no samples");
    Ok((summary(&puts)?, summary(&deletes)?))
}

/// Deletes the record of one subset member, times until another instance is in rotation, and
/// puts the record back.
async fn replace_member(etcd: &Etcd, channel: &BalancedChannel) -> anyhow::Result<f64> {
    let before: BTreeSet<Arc<str>> = channel.ready_addrs().into_iter().collect();
    let member = channel
        .instances()
        .into_iter()
        .find(|i| i.in_rotation)
        .context("no member in rotation")?;
    let key = key::instance_key(NAMESPACE, FLEET, &member.instance_id)?;
    let mut client = etcd.client();
    client
        .delete(key.as_str(), None)
        .await
        .context("deleting a member")?;
    let t = Instant::now();
    wait_until(Duration::from_secs(10), "a replacement in rotation", || {
        channel.ready_addrs().iter().any(|a| !before.contains(a))
    })
    .await?;
    let replaced = ms(t.elapsed());
    client
        .put(
            key.as_str(),
            Endpoint::new(member.addr.to_string(), &member.instance_id)?.encode(),
            None,
        )
        .await
        .context("putting the member back")?;
    wait_until(Duration::from_secs(10), "the member back", || {
        channel.ready_addrs().contains(&member.addr)
    })
    .await?;
    Ok(replaced)
}

/// What a restart of the 1 % cost.
#[derive(Debug, Default)]
struct Churn {
    calls: usize,
    failed: usize,
    /// The failures by status code.
    failures: String,
    opened: u64,
    closed: u64,
}

/// Restarts the [`RESTARTED`] instances as a deployment would, gracefully, while every channel is
/// under `rate` calls a second: NOT_SERVING, records deleted, process killed and started again,
/// records put back under new ids; until every channel has `expected` instances in rotation again.
async fn restart_one_percent(
    etcd: &Etcd,
    fleet: &Fleet,
    sinks: &mut [Sink],
    channels: &[BalancedChannel],
    expected: usize,
    rate: u32,
    generation: &mut usize,
) -> anyhow::Result<Churn> {
    let restarted: BTreeSet<String> = (0..RESTARTED).map(|i| fleet.addr(i)).collect();
    let loads: Vec<Load> = channels
        .iter()
        .map(|c| Load::start(Client::Ours(c.clone()), rate))
        .collect();
    // Load before the restart begins, and again after it ended (below): calls on both sides.
    let since = Instant::now();
    for l in &loads {
        super::wait_calls(l, since, rate as usize / 2, Duration::from_secs(10)).await?;
    }
    let stable_before = stable_total(sinks).await?;
    let old = sinks[SINKS].stats().await?;
    sinks[SINKS].drain().await?;
    let serves_restarted =
        |c: &BalancedChannel| c.ready_addrs().iter().any(|a| restarted.contains(&**a));
    wait_until(Duration::from_secs(10), "NOT_SERVING seen", || {
        !channels.iter().any(serves_restarted)
    })
    .await?;
    delete_fleet(etcd, FLEET, 0..RESTARTED, *generation).await?;
    *generation += 1;
    wait_until(
        Duration::from_secs(15),
        "the restarted instances dropped",
        || {
            channels
                .iter()
                .all(|c| c.instances().iter().all(|i| !restarted.contains(&*i.addr)))
        },
    )
    .await?;
    let old_final = sinks[SINKS].stats().await?;
    let port = sinks[SINKS].port;
    // Killed and reaped before its successor binds the same port.
    sinks[SINKS].child.kill();
    sinks[SINKS] = Sink::start(port).await?;
    put_fleet(etcd, FLEET, fleet, 0..RESTARTED, *generation).await?;
    wait_until(Duration::from_secs(60), "every channel ready again", || {
        channels.iter().all(|c| {
            c.subset().known == INSTANCES && c.ready_addrs().len() == expected.min(INSTANCES)
        })
    })
    .await?;
    let since = Instant::now();
    for l in &loads {
        super::wait_calls(l, since, rate as usize / 2, Duration::from_secs(10)).await?;
    }
    let mut calls = Vec::new();
    for l in loads {
        calls.extend(l.finish().await);
    }
    let stable_after = stable_total(sinks).await?;
    let new = sinks[SINKS].stats().await?;
    Ok(Churn {
        calls: calls.len(),
        failed: load::failed(&calls),
        failures: load::failures_by_code(&calls),
        opened: stable_after.accepted - stable_before.accepted + new.accepted,
        closed: stable_after.closed - stable_before.closed + (old_final.closed - old.closed),
    })
}

/// What the 100 clients measured.
struct Spread {
    ready_ms: f64,
    kernel: usize,
    rss_mib: f64,
    health_per_s: f64,
    calls_cv: f64,
    expected_cv: f64,
    called: usize,
    expected_covered: f64,
    /// Connections per instance (min, median, max) over every instance.
    all: (usize, usize, usize),
    /// The same over the instances with at least one.
    connected: (usize, usize, usize),
    connected_instances: usize,
    churn: Churn,
}

/// Calls each of the 100 clients makes for the spread figures.
const CALLS_PER_CLIENT: usize = 200;

async fn many_clients(
    etcd: &Etcd,
    fleet: &Fleet,
    sinks: &mut [Sink],
    window: Duration,
    generation: &mut usize,
) -> anyhow::Result<Spread> {
    let before = baseline()?;
    let started = Instant::now();
    // Started ten at a time: a hundred discoveries listing 10,000 records at the same instant
    // measure etcd under a thundering herd, not the clients.
    let mut channels = Vec::new();
    for batch in 0..CLIENTS / 10 {
        let started_batch: Vec<BalancedChannel> = (0..10)
            .map(|_| channel(etcd, FLEET, Subsetting::always(K)))
            .collect::<anyhow::Result<_>>()?;
        for (i, c) in started_batch.iter().enumerate() {
            if let Err(e) = c.wait_ready(K, Duration::from_secs(120)).await {
                bail!(
                    "client {} of {CLIENTS}: {e}; its discovery reports {:?}",
                    batch * 10 + i,
                    c.discovery().membership().problem
                );
            }
        }
        channels.extend(started_batch);
    }
    let ready_ms = ms(started.elapsed());
    let kernel = client_connections(fleet);
    let rss_mib = machine::sample(None)?
        .rss_kib
        .saturating_sub(before.rss_kib) as f64
        / 1024.0;
    let (_, health_per_s) = idle(sinks, window).await?;

    let mut per_instance: BTreeMap<String, usize> = BTreeMap::new();
    for c in &channels {
        for addr in c.connected_addrs() {
            *per_instance.entry(addr.to_string()).or_default() += 1;
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for c in &channels {
        let c = c.clone();
        tasks.spawn(async move { call_each(&c, CALLS_PER_CLIENT, 1).await });
    }
    let mut calls: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        for (addr, n) in done.context("a client's calls")?? {
            *calls.entry(addr).or_default() += n;
        }
    }
    let counts: Vec<f64> = (0..INSTANCES)
        .map(|i| calls.get(&fleet.addr(i)).copied().unwrap_or(0) as f64)
        .collect();
    let p = K as f64 / INSTANCES as f64;
    let conns: Vec<usize> = (0..INSTANCES)
        .map(|i| per_instance.get(&fleet.addr(i)).copied().unwrap_or(0))
        .collect();
    let nonzero: Vec<usize> = conns.iter().copied().filter(|&c| c > 0).collect();
    let churn = restart_one_percent(etcd, fleet, sinks, &channels, K, 5, generation).await?;
    drop(channels);
    wait_until(
        Duration::from_secs(30),
        "the clients' connections to close",
        || client_connections(fleet) == 0,
    )
    .await?;
    Ok(Spread {
        ready_ms,
        kernel,
        rss_mib,
        health_per_s,
        calls_cv: cv(&counts),
        expected_cv: ((1.0 - p) / (CLIENTS as f64 * p)).sqrt(),
        called: counts.iter().filter(|&&c| c > 0.0).count(),
        expected_covered: 1.0 - (1.0 - p).powi(CLIENTS as i32),
        all: min_median_max(&conns),
        connected: min_median_max(&nonzero),
        connected_instances: nonzero.len(),
        churn,
    })
}

/// Makes `n` calls through `channel` on `concurrency` tasks; returns the calls each instance
/// served.
///
/// # Errors
/// On a failed call: nothing is expected to fail here.
async fn call_each(
    channel: &BalancedChannel,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let left = Arc::new(AtomicU64::new(n as u64));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (left, mut client) = (left.clone(), GreeterClient::new(channel.clone()));
        tasks.spawn(async move {
            let mut served: BTreeMap<String, usize> = BTreeMap::new();
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                .is_ok()
            {
                *served.entry(call(&mut client).await?).or_default() += 1;
            }
            Ok::<_, tonic::Status>(served)
        });
    }
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        for (addr, n) in done.context("a calling task")?.context("a call failed")? {
            *served.entry(addr).or_default() += n;
        }
    }
    Ok(served)
}

/// One `SayHello`; the instance that served it, from the channel's [`ServedBy`] (every sink
/// answers many addresses, so the reply's own `addr` cannot say).
async fn call(client: &mut GreeterClient<BalancedChannel>) -> Result<String, tonic::Status> {
    let response = client
        .say_hello(HelloRequest {
            name: "fleet".into(),
        })
        .await?;
    Ok(response
        .extensions()
        .get::<ServedBy>()
        .map_or_else(String::new, |s| s.addr.to_string()))
}

/// This process's memory before a measurement, after handing freed memory back to the kernel:
/// otherwise what an earlier measurement freed is reused and the next growth looks smaller.
fn baseline() -> anyhow::Result<machine::ProcSample> {
    // SAFETY: malloc_trim only walks glibc's own heap; it has no preconditions.
    unsafe { libc::malloc_trim(0) };
    machine::sample(None)
}

/// Client ends of established connections to the fleet's ports, as the kernel counts them.
fn client_connections(fleet: &Fleet) -> usize {
    testkit::sockets::established()
        .iter()
        .filter(|c| {
            fleet.ports.contains(&c.remote.port()) && !fleet.ports.contains(&c.local.port())
        })
        .count()
}

/// Polls `check` every 2 ms until true, failing after `timeout`.
async fn wait_until(timeout: Duration, what: &str, check: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            bail!("waited {timeout:?} for {what}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

fn cv(counts: &[f64]) -> f64 {
    let n = counts.len() as f64;
    let mean = counts.iter().sum::<f64>() / n;
    let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / n;
    var.sqrt() / mean
}

fn min_median_max(values: &[usize]) -> (usize, usize, usize) {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    match (sorted.first(), sorted.last()) {
        (Some(&min), Some(&max)) => (min, sorted[sorted.len() / 2], max),
        _ => (0, 0, 0),
    }
}

/// Raises this process's open-file limit to its hard limit (10,000 connections need as many
/// descriptors); returns the old soft limit and the hard one.
///
/// # Errors
/// When the limit cannot be read or set.
pub fn raise_nofile() -> anyhow::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    let soft = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        bail!(
            "setrlimit(RLIMIT_NOFILE, {}): {}",
            limit.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    Ok((soft, limit.rlim_max))
}

/// What a sink counted since it started.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct SinkStats {
    /// `grpc.health.v1` calls answered.
    pub health: u64,
    /// Greeter calls answered.
    pub greeter: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Connections closed.
    pub closed: u64,
}

/// A `fleet-sink` child process, driven over its stdin and stdout.
struct Sink {
    port: u16,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    /// Killed when the sink is dropped.
    child: ChildGuard,
}

impl Sink {
    /// Starts a sink on `0.0.0.0:port` and waits for its `ready` line.
    async fn start(port: u16) -> anyhow::Result<Sink> {
        let mut child = testkit::spawn(
            Command::new(bench_exe()?)
                .args(["fleet-sink", "--port", &port.to_string()])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        );
        let stdin = child.child_mut().stdin.take().context("the sink's stdin")?;
        let stdout = child
            .child_mut()
            .stdout
            .take()
            .context("the sink's stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        // A plain thread: reading a pipe blocks. It ends when the sink's stdout closes.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut sink = Sink {
            port,
            stdin,
            lines,
            child,
        };
        let ready = sink.reply().await?;
        anyhow::ensure!(ready == "ready", "the sink on port {port} said {ready:?}");
        Ok(sink)
    }

    async fn reply(&mut self) -> anyhow::Result<String> {
        match tokio::time::timeout(Duration::from_secs(10), self.lines.recv()).await {
            Ok(Some(line)) => Ok(line),
            Ok(None) => bail!("the sink on port {} exited", self.port),
            Err(_) => bail!("the sink on port {} did not answer within 10 s", self.port),
        }
    }

    async fn command(&mut self, command: &str) -> anyhow::Result<SinkStats> {
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .with_context(|| format!("writing to the sink on port {}", self.port))?;
        let line = self.reply().await?;
        serde_json::from_str(&line).with_context(|| format!("the sink's reply {line:?}"))
    }

    async fn stats(&mut self) -> anyhow::Result<SinkStats> {
        self.command("stats").await
    }

    /// Reports NOT_SERVING, as a server about to stop does.
    async fn drain(&mut self) -> anyhow::Result<SinkStats> {
        self.command("drain").await
    }
}

/// The sinks' counts added up.
async fn total(sinks: &mut [Sink]) -> anyhow::Result<SinkStats> {
    let mut sum = SinkStats::default();
    for sink in sinks {
        let s = sink.stats().await?;
        sum.health += s.health;
        sum.greeter += s.greeter;
        sum.accepted += s.accepted;
        sum.closed += s.closed;
    }
    Ok(sum)
}

/// The counts of the sinks that do not restart.
async fn stable_total(sinks: &mut [Sink]) -> anyhow::Result<SinkStats> {
    total(&mut sinks[..SINKS]).await
}

/// The `fleet-sink` child role: Greeter and health on `0.0.0.0:port`, so any `127.x.y.z:port`
/// reaches it. Prints `ready` once bound; then answers each stdin line, `stats` or `drain`
/// (NOT_SERVING), with its [`SinkStats`] as JSON. Exits when stdin closes.
///
/// # Errors
/// When the port cannot be bound or the server fails.
pub async fn sink(port: u16) -> anyhow::Result<()> {
    raise_nofile()?;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("binding 0.0.0.0:{port}"))?;
    let counts = Arc::new(Counts::default());
    let (health, health_service) = tonic_health::server::health_reporter();
    let greeter = server::greeter::Greeter::new(format!("sink-{port}"), format!("0.0.0.0:{port}"));
    let health_service = {
        let counts = counts.clone();
        tonic::service::interceptor::InterceptedService::new(health_service, move |r| {
            counts.health.fetch_add(1, Ordering::Relaxed);
            Ok(r)
        })
    };
    let greeter = {
        let counts = counts.clone();
        GreeterServer::with_interceptor(greeter, move |r| {
            counts.greeter.fetch_add(1, Ordering::Relaxed);
            Ok(r)
        })
    };
    let incoming = {
        let counts = counts.clone();
        tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |accepted| {
            let stream = accepted?;
            stream.set_nodelay(true)?;
            counts.accepted.fetch_add(1, Ordering::Relaxed);
            Ok::<_, std::io::Error>(counted::Counted::new(stream, counts.clone()))
        })
    };
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(greeter)
            .serve_with_incoming(incoming),
    );
    println!("ready");
    // Commands from a plain thread (tokio's stdin is a blocking thread anyway); it ends, and
    // with it the sink, when the bench closes the pipe.
    let (tx, mut commands) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    loop {
        tokio::select! {
            ended = &mut server => {
                ended.context("the sink's server task")?.context("the sink's server")?;
                bail!("the sink's server on port {port} stopped");
            }
            line = commands.recv() => {
                let Some(line) = line else {
                    return Ok(());
                };
                if line == "drain" {
                    health
                        .set_service_status("", tonic_health::ServingStatus::NotServing)
                        .await;
                }
                println!("{}", serde_json::to_string(&counts.snapshot())?);
            }
        }
    }
}

/// The sink's counters.
#[derive(Debug, Default)]
struct Counts {
    health: AtomicU64,
    greeter: AtomicU64,
    accepted: AtomicU64,
    closed: AtomicU64,
}

impl Counts {
    fn snapshot(&self) -> SinkStats {
        SinkStats {
            health: self.health.load(Ordering::Relaxed),
            greeter: self.greeter.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
        }
    }
}

mod counted {
    //! An accepted connection that counts itself closed when tonic drops it.

    use std::{
        pin::Pin,
        sync::{Arc, atomic::Ordering},
        task::{Context, Poll},
    };

    use tokio::{
        io::{AsyncRead, AsyncWrite, ReadBuf},
        net::TcpStream,
    };
    use tonic::transport::server::{Connected, TcpConnectInfo};

    use super::Counts;

    pub(super) struct Counted {
        inner: TcpStream,
        counts: Arc<Counts>,
    }

    impl Counted {
        pub(super) fn new(inner: TcpStream, counts: Arc<Counts>) -> Self {
            Self { inner, counts }
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.counts.closed.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl Connected for Counted {
        type ConnectInfo = TcpConnectInfo;

        fn connect_info(&self) -> TcpConnectInfo {
            self.inner.connect_info()
        }
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }
}
