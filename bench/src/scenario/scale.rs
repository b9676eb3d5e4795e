//! Scenario 7, scale: one service with 1,000 and 10,000 registered instances. The instances are
//! records, not servers: keys in the Go naming format (the registry's own key layout and value
//! codec) under a few shared leases, as a few processes registering many instances would leave
//! them. Measured: a fresh [`Discovery`]'s initial sync, the time to apply one change, and the
//! memory the synced discovery holds.
//!
//! "Applied" is timed against a second, raw etcd watch on the same prefix: from the moment that
//! watch delivers the event to the moment the discovery's subscribers see the new membership.
//! Both watches are streams of one HTTP/2 connection to one member (the discovery measured is
//! started on a client of that member alone), so each event reaches both in the same read and the
//! figure is this process's own work: the discovery's decoding, applying and publishing, and the
//! scheduling of its task. Measured against a watch on another connection, as before, the figure
//! also held the two connections' jitter, and could be negative.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context, bail};
use etcd_client::{GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use registry::{Discovery, Endpoint, Etcd, key};
use tokio::time::Instant;

use super::Ctx;
use crate::{
    clients::{AbortOnDrop, NAMESPACE},
    fixture::Fixture,
    machine,
    report::Section,
    stats::{Summary, cells, ms, num, thousands},
};

/// Instance counts measured unless `--scale-sizes` names others (100,000 adds about 10 s of writing
/// and a second per sync trial).
const SIZES: [usize; 2] = [1_000, 10_000];

/// The service the records belong to: not the fixture's, so its observer stays out of the way.
const SCALE_SERVICE: &str = "scale";

/// Leases the records share: "a few processes".
const LEASES: usize = 4;

/// Runs the scenario.
///
/// # Errors
/// When `--scale-sizes` names 0, etcd refuses the records or a discovery never syncs.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Section> {
    let mut sizes = if ctx.scale_sizes.is_empty() {
        SIZES.to_vec()
    } else {
        ctx.scale_sizes.clone()
    };
    // Records are topped up from one size to the next, so the sizes go up.
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.first() == Some(&0) {
        bail!("--scale-sizes: 0 is not an instance count");
    }
    let fixture = Fixture::start(0, &[]).await?;
    // The discoveries measured run on a client of one member, whose connection the reference
    // watch of `change_latencies` shares.
    let member = fixture
        .etcd
        .config()
        .endpoints()
        .first()
        .cloned()
        .context("the fixture's cluster has an endpoint")?;
    let one_member = registry::EtcdConfig::new([member])?.connect().await?;
    let title = sizes.iter().map(|&n| thousands(n)).collect::<Vec<_>>();
    let mut s = Section::new(format!("7. Scale: {} instances", title.join(", ")));
    let sync_trials = ctx.trials(5, 2);
    let change_trials = ctx.trials(20, 5);
    s.line(format!(
        "Records under {LEASES} shared leases. Initial sync: a new `Discovery` (on an existing \
         etcd connection) until its membership lists every instance, {sync_trials} trials. One \
         change: a put (then a delete) of one more instance, {change_trials} of each, timed \
         from the raw watch event to the discovery's subscribers seeing it (both watches \
         streams of one connection to one member, so the gap is this process's own work). Memory: growth of \
         this process's VmRSS from before the first discovery of that size started to when it \
         had synced (allocator reuse makes later trials smaller, so the first is reported).\n"
    ));
    s.line("| instances | write all (s) | initial sync median ms | p99 ms | watch event → applied median ms | p99 ms | put sent → applied median ms | p99 ms | RSS growth MiB |\n|---|---|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    for &n in &sizes {
        let written = Instant::now();
        populate(&fixture.etcd, n).await?;
        let written = written.elapsed();
        let mut syncs = Vec::new();
        let mut rss_growth = f64::NAN;
        let mut last = None;
        for trial in 0..sync_trials {
            // The previous trial's discovery goes first: one discovery of this size at a time.
            drop(last.take());
            let before = machine::sample(None)?;
            let started = Instant::now();
            let discovery = Discovery::builder(SCALE_SERVICE)
                .namespace(NAMESPACE)
                .start(&one_member)?;
            let mut rx = discovery.subscribe();
            tokio::time::timeout(
                Duration::from_secs(30),
                rx.wait_for(|m| m.synced && m.instances.len() == n),
            )
            .await
            .map_err(|_| anyhow::anyhow!("{n} instances not synced in 30 s"))?
            .context("discovery ended")?;
            syncs.push(started.elapsed());
            if trial == 0 {
                let after = machine::sample(None)?;
                rss_growth = (after.rss_kib as f64 - before.rss_kib as f64) / 1024.0;
            }
            last = Some(discovery);
        }
        let discovery = last.context("at least one trial")?;
        let (seen, applied) = change_latencies(&one_member, &discovery, change_trials).await?;
        let sync = Summary::of_ms(&syncs);
        let seen_s = Summary::of(&seen);
        s.line(format!(
            "| {n} | {:.1} | {} | {} | {} | {} |",
            written.as_secs_f64(),
            cells(sync),
            cells(seen_s),
            cells(Summary::of(&applied)),
            num(rss_growth)
        ));
        // Issue #13's targets: one change within 1 ms p99 at 10,000 and at 100,000, and an
        // initial sync of 100,000 (so of anything up to it) under 2 s.
        if n >= 10_000 {
            let p99 = sync.map_or(f64::NAN, |x| x.p99);
            verdicts.push((
                format!("{} instances synced < 2 s", thousands(n)),
                format!("p99 {} ms", num(p99)),
                sync.map(|_| p99 < 2000.0),
            ));
            let p99 = seen_s.map_or(f64::NAN, |x| x.p99);
            verdicts.push((
                format!(
                    "{}: one change applied < 1 ms after the watch event",
                    thousands(n)
                ),
                format!("p99 {} ms", num(p99)),
                seen_s.map(|_| p99 < 1.0),
            ));
        }
        // Leave the records for the next size to top up; the last size's go with the cluster.
    }
    for (target, measured, met) in verdicts {
        s.verdict(target, measured, met);
    }
    Ok(s)
}

/// Puts instances `0..n` (those not there yet) under [`LEASES`] leases, 100 per transaction.
async fn populate(etcd: &Etcd, n: usize) -> anyhow::Result<()> {
    let mut client = etcd.client();
    let prefix = key::service_prefix(NAMESPACE, SCALE_SERVICE)?;
    let have = client
        .get(
            prefix.as_str(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .context("counting records")?
        .count() as usize;
    let mut leases = Vec::new();
    for _ in 0..LEASES {
        leases.push(
            client
                .lease_grant(600, None)
                .await
                .context("granting a lease")?
                .id(),
        );
    }
    let mut ops = Vec::with_capacity(n);
    for i in have..n {
        let id = format!("inst-{i:05}");
        // Addresses that are never dialled: only discovery runs here.
        let addr = format!(
            "10.{}.{}.{}:50051",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        );
        ops.push(TxnOp::put(
            key::instance_key(NAMESPACE, SCALE_SERVICE, &id)?,
            Endpoint::new(addr, &id)?.encode(),
            Some(PutOptions::new().with_lease(leases[i % LEASES])),
        ));
    }
    // etcd's default --max-txn-ops is 128.
    for chunk in ops.chunks(100) {
        client
            .txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .context("writing instance records")?;
    }
    Ok(())
}

/// Puts and deletes one extra instance `trials` times each, and returns, per change, the time
/// from the raw watch event to the discovery's subscribers seeing it, and from sending the
/// request to that moment (ms). The raw watch shares `etcd`'s connection with the discovery, which
/// must have been started on it.
async fn change_latencies(
    etcd: &Etcd,
    discovery: &Discovery,
    trials: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut client = etcd.client();
    let prefix = discovery.prefix().to_owned();
    let raw = record_raw_watch(etcd.client(), &prefix).await?;
    let applied = record_applied(discovery);
    let lease = client
        .lease_grant(600, None)
        .await
        .context("granting a lease")?
        .id();
    let mut seen_to_applied = Vec::new();
    let mut sent_to_applied = Vec::new();
    for j in 0..trials {
        let id = format!("extra-{j:03}");
        let key = key::instance_key(NAMESPACE, SCALE_SERVICE, &id)?;
        let value = Endpoint::new("192.0.2.1:50051", &id)?.encode();
        for put in [true, false] {
            let sent = Instant::now();
            let revision = if put {
                client
                    .put(
                        key.as_str(),
                        value.as_str(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await
                    .context("putting one instance")?
                    .header()
                    .map(|h| h.revision())
            } else {
                client
                    .delete(key.as_str(), None)
                    .await
                    .context("deleting one instance")?
                    .header()
                    .map(|h| h.revision())
            }
            .context("a response without a header")?;
            let applied_at = wait_revision(&applied.1, revision, "the discovery to apply").await?;
            let seen_at = wait_revision(&raw.1, revision, "the raw watch to deliver").await?;
            seen_to_applied.push(signed_ms(applied_at, seen_at));
            sent_to_applied.push(ms(applied_at - sent));
        }
    }
    Ok((seen_to_applied, sent_to_applied))
}

/// `a - b` in milliseconds, negative when `a` is earlier.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b { ms(a - b) } else { -ms(b - a) }
}

/// When each revision was first seen, by revision.
pub type Seen = Arc<Mutex<BTreeMap<i64, Instant>>>;

/// A raw etcd watch on `prefix`, opened on `client`, recording when each revision arrived; the
/// task stops with the returned guard.
///
/// # Errors
/// When the watch cannot be opened.
pub async fn record_raw_watch(
    mut client: etcd_client::Client,
    prefix: &str,
) -> anyhow::Result<(AbortOnDrop, Seen)> {
    let mut stream = client
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await
        .context("opening the raw watch")?;
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    let now = Instant::now();
                    let mut map = record.lock().unwrap_or_else(PoisonError::into_inner);
                    for event in resp.events() {
                        if let Some(kv) = event.kv() {
                            map.entry(kv.mod_revision()).or_insert(now);
                        }
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "the raw watch failed");
                    return;
                }
            }
        }
    });
    Ok((AbortOnDrop(task), seen))
}

/// Records when each membership revision reached `discovery`'s subscribers.
pub fn record_applied(discovery: &Discovery) -> (AbortOnDrop, Seen) {
    let mut rx = discovery.subscribe();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let task = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let now = Instant::now();
            let revision = rx.borrow_and_update().revision;
            record
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(revision)
                .or_insert(now);
        }
    });
    (AbortOnDrop(task), seen)
}

/// The first time a revision at or after `revision` was recorded, waiting up to 10 s.
async fn wait_revision(seen: &Seen, revision: i64, what: &str) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((_, at)) = seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .range(revision..)
            .next()
        {
            return Ok(*at);
        }
        if Instant::now() > deadline {
            bail!("waited 10 s for {what} revision {revision}");
        }
        // Polling the record; the recorders take their own timestamps.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// For every revision in `raw`, the delay until `applied` reached it (ms); revisions the
/// discovery published together count once each.
pub fn delays(raw: &Seen, applied: &Seen) -> Vec<f64> {
    let raw = raw.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let applied = applied
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    raw.iter()
        .filter_map(|(rev, seen)| {
            applied
                .range(rev..)
                .next()
                .map(|(_, at)| signed_ms(*at, *seen))
        })
        .collect()
}
