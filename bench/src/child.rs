//! The hidden subcommands the bench runs in child processes, so faults can be injected into real
//! processes (SIGKILL, SIGSTOP) and costs measured per process:
//!
//! - `serve`: one Greeter server, exactly as the `server` binary runs it ([`server::run`]);
//! - `sink`: Greeter servers on `127.0.0.2`.. `127.0.0.<n+1>`, one port: real, healthy addresses
//!   for the instances that flap in the churn scenario, all on loopback;
//! - `flap`: registers those instances and toggles them (put / delete) at a steady rate;
//! - `client`: one client of a given kind, idle or under an open-loop load, that prints its own
//!   memory and CPU use (the footprint scenario);
//! - `calls`: one client making a given number of calls, a given number at a time, run under
//!   valgrind by the callgrind scenario.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use clap::Parser;
use etcd_client::{PutOptions, Txn, TxnOp};
use registry::{Endpoint, EtcdConfig, key};
use testkit::{TestServer, greeter::Behaviour};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    clients::{self, Kind, NAMESPACE, SERVICE},
    load::{self, Load},
    machine,
};

/// Runs the Greeter server with the `server` binary's flags until SIGTERM or SIGINT.
///
/// # Errors
/// Bad flags, or whatever [`server::run`] reports.
pub async fn serve(args: Vec<String>) -> anyhow::Result<()> {
    let config = server::Config::try_parse_from(std::iter::once("server".to_owned()).chain(args))
        .context("server flags")?;
    config.validate()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    server::run(config, shutdown).await
}

/// Cancels `token` on SIGTERM or SIGINT.
pub async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    token.cancel();
}

/// The address of flapping instance `i` (0-based) on the sink's `port`.
pub fn sink_addr(i: usize, port: u16) -> String {
    // 127.0.0.2 upwards: 127.0.0.1 is the stable servers'; 250 addresses fit below .255.
    format!("127.0.0.{}:{port}", i + 2)
}

/// The instance id of flapping instance `i`.
pub fn flap_id(i: usize) -> String {
    format!("flap-{i:03}")
}

/// Serves Greeter and health on `count` loopback addresses, one port, until killed.
///
/// # Errors
/// When an address cannot be bound.
pub async fn sink(port: u16, count: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        count <= 250,
        "at most 250 sink addresses fit in 127.0.0.2-127.0.0.251"
    );
    let mut servers = JoinSet::new();
    for i in 0..count {
        let addr = sink_addr(i, port);
        let listener = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let health = Behaviour {
            health: true,
            ..Behaviour::default()
        };
        servers.spawn(
            TestServer::serve(listener, &flap_id(i), health)
                .await
                .wait(),
        );
    }
    // A test server only stops by failing, and then its panic names the address.
    if let Some(ended) = servers.join_next().await {
        ended.context("a sink server failed")?;
    }
    Ok(())
}

/// Registers `count` flapping instances (all present at first), then every `1/rate` seconds
/// toggles the next one (delete if present, put if absent), for `seconds`; removes them all at the
/// end.
///
/// # Errors
/// When etcd fails.
pub async fn flap(
    endpoints: Vec<String>,
    port: u16,
    count: usize,
    rate: u32,
    seconds: f64,
) -> anyhow::Result<()> {
    let etcd = EtcdConfig::new(&endpoints)?.connect().await?;
    let mut client = etcd.client();
    let lease = client
        .lease_grant(120, None)
        .await
        .context("granting the flapping instances' lease")?
        .id();
    let key_of = |i: usize| key::instance_key(NAMESPACE, SERVICE, &flap_id(i));
    let value_of = |i: usize| -> anyhow::Result<String> {
        Ok(Endpoint::new(sink_addr(i, port), &flap_id(i))?.encode())
    };
    let mut ops = Vec::with_capacity(count);
    for i in 0..count {
        ops.push(TxnOp::put(
            key_of(i)?,
            value_of(i)?,
            Some(PutOptions::new().with_lease(lease)),
        ));
    }
    for chunk in ops.chunks(100) {
        client
            .txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .context("registering the flapping instances")?;
    }
    let mut present = vec![true; count];
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut i = 0;
    while Instant::now() < end {
        tick.tick().await;
        let key = key_of(i)?;
        if present[i] {
            client
                .delete(key, None)
                .await
                .context("deleting a flapping instance")?;
        } else {
            client
                .put(key, value_of(i)?, Some(PutOptions::new().with_lease(lease)))
                .await
                .context("putting a flapping instance back")?;
        }
        present[i] = !present[i];
        i = (i + 1) % count;
    }
    client
        .lease_revoke(lease)
        .await
        .context("revoking the flapping instances' lease")?;
    Ok(())
}

/// What a `client` child measured about itself.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Footprint {
    /// Resident memory at the end, KiB.
    pub rss_kib: u64,
    /// CPU used during the window, percent of one core.
    pub cpu_percent: f64,
    /// Calls made during the window.
    pub calls: usize,
    /// Of which failed.
    pub failed: usize,
    /// The failures by status code.
    pub failures: String,
}

/// Runs one client of `kind` (warmed up on `addrs`), idle (`rate` 0) or at `rate` calls a second,
/// for `seconds`, and prints its [`Footprint`] as JSON.
///
/// # Errors
/// When the client cannot start or `/proc/self` cannot be read.
pub async fn client(
    endpoints: Vec<String>,
    kind: &str,
    addrs: Vec<String>,
    rate: u32,
    seconds: f64,
) -> anyhow::Result<()> {
    let kind = Kind::from_arg(kind)?;
    let etcd = EtcdConfig::new(&endpoints)?.connect().await?;
    let client = clients::start(kind, &etcd, &addrs).await?;
    client.warm_up(&addrs, Duration::from_secs(10)).await?;
    let window = Duration::from_secs_f64(seconds);
    let before = machine::sample(None)?;
    let started = Instant::now();
    let calls = if rate == 0 {
        // Idle: nothing to do but let the background tasks (watch, health checks) run.
        tokio::time::sleep(window).await;
        Vec::new()
    } else {
        let load = Load::start(client.clone(), rate);
        tokio::time::sleep(window).await;
        load.finish().await
    };
    let after = machine::sample(None)?;
    let footprint = Footprint {
        rss_kib: after.rss_kib,
        cpu_percent: machine::cpu_percent(&before, &after, started.elapsed()),
        calls: calls.len(),
        failed: load::failed(&calls),
        failures: load::failures_by_code(&calls),
    };
    println!(
        "{}",
        serde_json::to_string(&footprint).context("encoding the footprint")?
    );
    Ok(())
}

/// Makes `count` calls with one client of `kind` (warmed up on `addrs`), `concurrency` at a time
/// (closed loop), and prints how many failed: the work the `callgrind` scenario counts
/// instructions of. Everything before the calls (start, warm-up) is the same for any `count`, so
/// two runs with different counts give the cost of a call by difference.
///
/// # Errors
/// When the client cannot start or warm up, or a call fails.
pub async fn calls(
    endpoints: Vec<String>,
    kind: &str,
    addrs: Vec<String>,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let kind = Kind::from_arg(kind)?;
    anyhow::ensure!(concurrency > 0, "--concurrency must be at least 1");
    let etcd = EtcdConfig::new(&endpoints)?.connect().await?;
    let client = clients::start(kind, &etcd, &addrs).await?;
    client.warm_up(&addrs, Duration::from_secs(60)).await?;
    // The calls alone are timed and their CPU counted: start-up and warm-up differ between
    // clients.
    let before = machine::sample(None)?;
    let started = std::time::Instant::now();
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let client = client.clone();
        // The calls split as evenly as they go: the first `count % concurrency` make one more.
        let calls = count / concurrency + usize::from(worker < count % concurrency);
        workers.spawn(async move {
            let mut failed = Vec::new();
            for _ in 0..calls {
                if let Err(code) = client.call().await {
                    failed.push(code);
                }
            }
            failed
        });
    }
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(worker) = workers.join_next().await {
        for code in worker.context("a calling task panicked")? {
            *failed.entry(format!("{code:?}")).or_default() += 1;
        }
    }
    let failures: usize = failed.values().sum();
    if failures > 0 {
        anyhow::bail!("{kind}: {failures} of {count} calls failed: {failed:?}");
    }
    let elapsed = started.elapsed();
    let cpu = machine::sample(None)?.cpu.saturating_sub(before.cpu);
    println!(
        "{count} calls, {concurrency} at a time, 0 failed, in {:.3} s: {:.0} calls/s, \
         client CPU {:.1} µs a call",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / count as f64
    );
    Ok(())
}
