//! Scenario 2, propagation: from an instance's registration (and, separately, its deregistration)
//! to the first call a running client routes accordingly.
//!
//! The instance is a Greeter served inside the bench (so registering it costs no process start);
//! its lease is granted beforehand, and the clock starts when the bench sends the put of its key,
//! the one raft commit a registration is made of (a [`registry::Registration`] grants the lease
//! first, a commit not counted here). Deregistration is the lease revoke a server's graceful
//! shutdown sends. Two clients run during every trial, each under an open-loop load of
//! 1,000 calls a second (so figures have a resolution of 1 ms): ours (round robin) and tonic's
//! `balance_channel` fed by the same discovery.

use std::time::Duration;

use anyhow::Context;
use etcd_client::PutOptions;
use proto::helloworld::greeter_server::GreeterServer;
use registry::{BalancedChannel, Endpoint, Policy, key};
use tokio::{net::TcpListener, time::Instant};
use tokio_stream::wrappers::TcpListenerStream;

use super::Ctx;
use crate::{
    chart::{self, Chart, Series},
    clients::{AbortOnDrop, Client, Kind, NAMESPACE, SERVICE},
    fixture::Fixture,
    load::{self, Call},
    report::Section,
    scenario::calibration::put_latencies,
    stats::{Summary, cells, ms, num},
};

/// Calls a second per client.
const RATE: u32 = 1000;

/// Runs the scenario.
///
/// # Errors
/// When the cluster, the servers or the clients cannot be started, or an instance never shows.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    let fixture = Fixture::start(2, &[]).await?;
    let floor =
        Summary::of_ms(&put_latencies(&fixture.etcd, 200).await?).context("no put latencies")?;

    // The instances whose registration is timed, served here: one accepting connections as
    // `server::run` does (`registry::serve::incoming`, TCP_NODELAY on every accepted socket), and
    // one through a bare `TcpListenerStream`, which leaves Nagle's algorithm on: the cost of the
    // mistake the library's helper exists to prevent.
    let variants = [Variant::AsServerRun, Variant::Nagle];
    let mut timed = Vec::new();
    for variant in variants {
        timed.push(serve_timed(variant).await?);
    }
    let kinds = [Kind::Ours(Policy::RoundRobin), Kind::Tonic];
    let loads = load::start_each(&kinds, &fixture, RATE).await?;

    let trials = ctx.trials(20, 5);
    let mut etcd = fixture.etcd.client();
    // [variant][client] -> samples (ms)
    let mut joined = vec![vec![Vec::new(); kinds.len()]; variants.len()];
    let mut left = vec![vec![Vec::new(); kinds.len()]; variants.len()];
    // [variant] -> registration to ours' rotation including the instance (ms)
    let mut admitted = vec![Vec::new(); variants.len()];
    for _ in 0..trials {
        for (v, instance) in timed.iter().enumerate() {
            let key = key::instance_key(NAMESPACE, SERVICE, &instance.id)?;
            let value = Endpoint::new(instance.addr.clone(), &instance.id)?.encode();
            let lease = etcd
                .lease_grant(30, None)
                .await
                .context("granting a lease")?
                .id();
            let rotation = match loads[0].client() {
                Client::Ours(channel) => Some(tokio::spawn(in_rotation(
                    channel.clone(),
                    instance.addr.clone(),
                ))),
                _ => None,
            };
            let registered = Instant::now();
            etcd.put(
                key.as_str(),
                value.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .context("registering the timed instance")?;
            for (i, load) in loads.iter().enumerate() {
                let first = load
                    .wait_served_by(&instance.addr, registered, Duration::from_secs(10))
                    .await?;
                joined[v][i].push(ms(first - registered));
            }
            if let Some(rotation) = rotation {
                let at = rotation.await.context("the rotation poller")??;
                admitted[v].push(ms(at.saturating_duration_since(registered)));
            }

            let revoked = Instant::now();
            etcd.lease_revoke(lease)
                .await
                .context("deregistering the timed instance")?;
            fixture
                .wait_member(&instance.id, false, Duration::from_secs(10))
                .await?;
            for (i, load) in loads.iter().enumerate() {
                let discovery = load.client().discovery().context("clients here discover")?;
                let mut rx = discovery.subscribe();
                tokio::time::timeout(
                    Duration::from_secs(10),
                    rx.wait_for(|m| !m.instances.contains_key(&instance.id)),
                )
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "{:?} still lists {} 10 s after the revoke",
                        load.client(),
                        instance.id
                    )
                })?
                .context("discovery ended")?;
                // Enough calls after the removal to see where they went.
                super::wait_calls(load, Instant::now(), 20, Duration::from_secs(5)).await?;
                left[v][i].push(ms(
                    routed_away(&load.calls(), &instance.addr, revoked) - revoked
                ));
            }
        }
    }
    let mut s = Section::new("2. Propagation: registration and deregistration to routing");
    s.line(format!(
        "{trials} trials. Clock starts when the bench sends the put of the instance key (lease \
         granted beforehand) or the lease revoke; it stops at the *completion* of the first call \
         served by the new instance, or at the send of the first call after the last one that \
         still went to the removed instance. Each client runs an open-loop load of {RATE} calls/s \
         (1 ms resolution) over two server processes plus the timed instance; round robin over \
         three then sends the newcomer one call in three, so up to 3 ms pass between its \
         admission and its first call. Ours' admission itself (the instance in `ready_addrs`, \
         polled every millisecond from the put): {} ms as `server::run` serves (TCP_NODELAY), \
         {} ms through a bare `TcpListenerStream` (Nagle on) (median | p99). The same \
         cluster's put latency, measured just before: median {} ms, p99 {} ms.\n",
        cells(Summary::of(&admitted[0])),
        cells(Summary::of(&admitted[1])),
        num(floor.median),
        num(floor.p99)
    ));
    s.line("| client | timed instance accepts | registration → first call to it: median ms | p99 ms | deregistration → calls avoid it: median ms | p99 ms |\n|---|---|---|---|---|---|");
    let mut series = Vec::new();
    let bound = floor.p99 + 5.0;
    let mut verdicts = Vec::new();
    for (v, variant) in variants.iter().enumerate() {
        for (i, kind) in kinds.iter().enumerate() {
            let (j, l) = (Summary::of(&joined[v][i]), Summary::of(&left[v][i]));
            s.line(format!(
                "| {kind} | {} | {} | {} |",
                variant.label(),
                cells(j),
                cells(l)
            ));
            series.push(cdf(
                &format!("{kind}, {}: registration", variant.label()),
                &joined[v][i],
            ));
            if *variant == Variant::AsServerRun {
                series.push(cdf(&format!("{kind}: deregistration"), &left[v][i]));
            }
            // The target is for what ships; the Nagle variant is there to show what it costs.
            if let (Kind::Ours(_), Variant::AsServerRun) = (kind, variant) {
                for (what, summary) in [("registration", j), ("deregistration", l)] {
                    let p99 = summary.map_or(f64::NAN, |x| x.p99);
                    verdicts.push((
                        format!(
                            "{what} ({}): p99 ≤ put p99 + 5 ms ({} ms)",
                            variant.label(),
                            num(bound)
                        ),
                        format!("p99 {} ms", num(p99)),
                        summary.map(|_| p99 <= bound),
                    ));
                }
            }
        }
    }
    for (target, measured, met) in verdicts {
        s.verdict(target, measured, met);
    }
    let (path, name) = ctx.chart("propagation.svg");
    chart::lines(
        &path,
        &Chart {
            title: "Propagation: share of trials done within x ms",
            x: "milliseconds",
            y: "share of trials",
            log_x: false,
        },
        &series,
    )?;
    s.line(format!("\n![propagation]({name})"));
    load::finish_all(loads).await;
    Ok(s)
}

/// Polls `channel` every millisecond until `addr` is in its rotation; gives up after 10 s.
async fn in_rotation(channel: BalancedChannel, addr: String) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if channel.ready_addrs().iter().any(|a| **a == *addr) {
            return Ok(Instant::now());
        }
        // The channel has no notification for its rotation; 1 ms is this figure's resolution.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    anyhow::bail!("{addr} not in rotation 10 s after its registration")
}

/// How the timed instance accepts connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Like `server::run`: `registry::serve::incoming`, TCP_NODELAY on every accepted socket.
    AsServerRun,
    /// `serve_with_incoming(TcpListenerStream)`, whose sockets keep Nagle's algorithm (tonic
    /// ignores its `tcp_nodelay` setting for a caller-supplied incoming stream).
    Nagle,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::AsServerRun => "as `server::run` (TCP_NODELAY)",
            Variant::Nagle => "bare TcpListenerStream (Nagle on)",
        }
    }
}

/// A Greeter served in this process.
struct Timed {
    addr: String,
    id: String,
    _serving: AbortOnDrop,
}

/// Serves a Greeter (and health) on a free loopback port, accepting as `variant` says.
async fn serve_timed(variant: Variant) -> anyhow::Result<Timed> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the timed instance")?;
    let addr = listener.local_addr().context("its address")?.to_string();
    let id = server::default_instance_id(&addr);
    let (_health, health_service) = tonic_health::server::health_reporter();
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(GreeterServer::new(server::greeter::Greeter::new(
            id.clone(),
            addr.clone(),
        )));
    let serving = match variant {
        Variant::AsServerRun => tokio::spawn(async move {
            let incoming = registry::serve::incoming(listener);
            if let Err(e) = router.serve_with_incoming(incoming).await {
                tracing::warn!(error = %e, "the timed instance stopped serving");
            }
        }),
        Variant::Nagle => tokio::spawn(async move {
            let incoming = TcpListenerStream::new(listener);
            if let Err(e) = router.serve_with_incoming(incoming).await {
                tracing::warn!(error = %e, "the timed instance stopped serving");
            }
        }),
    };
    Ok(Timed {
        addr,
        id,
        _serving: AbortOnDrop(serving),
    })
}

/// When calls stopped going to `addr` after `since`: the send time of the first successful call
/// to another instance after the last call that still went to `addr`.
fn routed_away(calls: &[Call], addr: &str, since: Instant) -> Instant {
    let mut after: Vec<&Call> = calls.iter().filter(|c| c.sent >= since).collect();
    after.sort_by_key(|c| c.sent);
    let last_to_it = after
        .iter()
        .filter(|c| c.outcome.as_deref() == Ok(addr))
        .map(|c| c.sent)
        .max()
        .unwrap_or(since);
    after
        .iter()
        .find(|c| c.sent > last_to_it && c.outcome.as_ref().is_ok_and(|a| a != addr))
        .map_or(last_to_it, |c| c.sent)
}

/// An empirical CDF of `samples`.
fn cdf(name: &str, samples: &[f64]) -> Series {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len().max(1) as f64;
    Series {
        name: name.to_owned(),
        points: sorted
            .iter()
            .enumerate()
            .map(|(i, &x)| (x, (i + 1) as f64 / n))
            .collect(),
    }
}
