//! The three ways a Rust client can spread calls over a service's instances, behind one `call`:
//!
//! - **ours**: [`registry::BalancedChannel`] over [`registry::Discovery`], configured like the
//!   `client` binary (`SayHello` idempotent, so a call that failed on a dead instance is retried on
//!   another), with any [`Policy`];
//! - **tonic**: `tonic::transport::Channel::balance_channel`, its change channel fed from the same
//!   kind of `Discovery` (`Insert` when an instance joins, `Remove` when it leaves): what a user
//!   gets by wiring tonic's own balancer to etcd;
//! - **ideal**: plain tonic `Channel`s to fixed addresses, rotated by an atomic counter: no
//!   discovery, no health, no retry; the floor of what balancing can cost.
//!
//! Every call reports the address that served it from the reply's `addr` field, so all three are
//! judged the same way.

use std::{
    collections::BTreeSet,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
use registry::{
    BalanceOptions, BalancedChannel, Discovery, Etcd, Instances, Membership, Policy, RetryPolicy,
};
use tokio::{sync::watch, task::JoinHandle};
use tonic::{
    Code,
    transport::{Channel, Endpoint, channel::Change},
};

/// The service every scenario discovers.
pub const SERVICE: &str = "helloworld";

/// The namespace every scenario registers under.
pub const NAMESPACE: &str = "services";

/// Deadline of every call, for all three clients.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Which client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `BalancedChannel` with this policy.
    Ours(Policy),
    /// `BalancedChannel`, round robin, with retries disabled: what retrying costs per call.
    OursNoRetry,
    /// tonic's `balance_channel` fed by `Discovery`.
    Tonic,
    /// Hand-rotated plain channels.
    Ideal,
}

impl Kind {
    /// A short label for tables and charts.
    pub fn label(self) -> String {
        match self {
            Kind::Ours(p) => format!("ours ({p})"),
            Kind::OursNoRetry => "ours (round_robin, retries off)".to_owned(),
            Kind::Tonic => "tonic balance_channel".to_owned(),
            Kind::Ideal => "ideal (3 channels rotated)".to_owned(),
        }
    }

    /// The name the hidden `client` and `calls` roles take (`--kind`): a policy's name for ours,
    /// `round_robin-no-retry`, `tonic` or `ideal`.
    pub fn arg(self) -> String {
        match self {
            Kind::Ours(policy) => policy.name().to_owned(),
            Kind::OursNoRetry => "round_robin-no-retry".to_owned(),
            Kind::Tonic => "tonic".to_owned(),
            Kind::Ideal => "ideal".to_owned(),
        }
    }

    /// The kind named by [`Kind::arg`].
    ///
    /// # Errors
    /// For a name that is none of those.
    pub fn from_arg(name: &str) -> anyhow::Result<Kind> {
        Ok(match name {
            "tonic" => Kind::Tonic,
            "ideal" => Kind::Ideal,
            "round_robin-no-retry" => Kind::OursNoRetry,
            policy => Kind::Ours(policy.parse::<Policy>().map_err(anyhow::Error::msg)?),
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// The outcome of one call: the address that served it, or the status code it failed with.
pub type Outcome = Result<String, Code>;

/// A running client of one [`Kind`]. Cheap to clone; its background tasks stop with the last clone.
#[derive(Clone)]
pub enum Client {
    /// Ours.
    Ours(BalancedChannel),
    /// tonic's balancer, and the task feeding it (aborted with the last clone).
    Tonic {
        /// The balanced channel.
        channel: Channel,
        /// The discovery feeding it, for membership checks.
        discovery: Discovery,
        /// Aborts the feeder when the last clone goes.
        feeder: Arc<AbortOnDrop>,
    },
    /// Plain channels and the rotation counter.
    Ideal {
        /// One channel per instance.
        channels: Arc<[Channel]>,
        /// The rotation.
        next: Arc<AtomicUsize>,
    },
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Client::Ours(c) => c.fmt(f),
            Client::Tonic { discovery, .. } => f
                .debug_struct("Tonic")
                .field("service", &discovery.service())
                .finish(),
            Client::Ideal { channels, .. } => f
                .debug_struct("Ideal")
                .field("channels", &channels.len())
                .finish(),
        }
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Ours, configured like the `client` binary (or with retries off).
pub fn ours(etcd: &Etcd, policy: Policy, retry: bool) -> anyhow::Result<Client> {
    let options = BalanceOptions {
        call_timeout: CALL_TIMEOUT,
        retry: if retry {
            RetryPolicy::default().idempotent("/helloworld.Greeter/SayHello")
        } else {
            RetryPolicy::disabled()
        },
        policy,
        ..BalanceOptions::default()
    };
    let discovery = Discovery::builder(SERVICE)
        .namespace(NAMESPACE)
        .start(etcd)
        .context("starting discovery")?;
    Ok(Client::Ours(BalancedChannel::new(discovery, options)))
}

/// tonic's `balance_channel`, fed from a `Discovery` of its own.
pub fn tonic(etcd: &Etcd) -> anyhow::Result<Client> {
    let discovery = Discovery::builder(SERVICE)
        .namespace(NAMESPACE)
        .start(etcd)
        .context("starting discovery")?;
    let (channel, changes) = Channel::balance_channel::<String>(64);
    let feeder = tokio::spawn(feed(discovery.subscribe(), changes));
    Ok(Client::Tonic {
        channel,
        discovery,
        feeder: Arc::new(AbortOnDrop(feeder)),
    })
}

/// Turns membership snapshots into `Insert`/`Remove` for tonic, by address. Ends only when
/// discovery or the channel is gone (the client was dropped).
async fn feed(
    mut membership: watch::Receiver<Membership>,
    changes: tokio::sync::mpsc::Sender<Change<String, Endpoint>>,
) {
    let mut known: BTreeSet<String> = BTreeSet::new();
    loop {
        let current = addrs(&membership.borrow_and_update().instances);
        for gone in known.difference(&current) {
            if changes.send(Change::Remove(gone.clone())).await.is_err() {
                return;
            }
        }
        for new in current.difference(&known) {
            match endpoint(new) {
                Ok(e) => {
                    if changes.send(Change::Insert(new.clone(), e)).await.is_err() {
                        return;
                    }
                }
                Err(error) => tracing::warn!(addr = %new, %error, "not a usable endpoint"),
            }
        }
        known = current;
        if membership.changed().await.is_err() {
            return;
        }
    }
}

fn addrs(instances: &Instances) -> BTreeSet<String> {
    instances.values().map(|i| i.addr.clone()).collect()
}

/// A lazily connecting endpoint for `addr` with the same connect timeout as ours.
fn endpoint(addr: &str) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("endpoint for {addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(CALL_TIMEOUT))
}

/// Plain channels to `addrs`, connected now, rotated by hand.
///
/// # Errors
/// When an address does not parse or does not accept a connection.
pub async fn ideal(addrs: &[String]) -> anyhow::Result<Client> {
    let mut channels = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let channel = endpoint(addr)?
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        channels.push(channel);
    }
    Ok(Client::Ideal {
        channels: channels.into(),
        next: Arc::new(AtomicUsize::new(0)),
    })
}

/// Starts a client of `kind`; the ideal one needs the addresses.
///
/// # Errors
/// When discovery cannot start or an ideal channel cannot connect.
pub async fn start(kind: Kind, etcd: &Etcd, addrs: &[String]) -> anyhow::Result<Client> {
    match kind {
        Kind::Ours(policy) => ours(etcd, policy, true),
        Kind::OursNoRetry => ours(etcd, Policy::RoundRobin, false),
        Kind::Tonic => tonic(etcd),
        Kind::Ideal => ideal(addrs).await,
    }
}

impl Client {
    /// One `SayHello`, within [`CALL_TIMEOUT`].
    pub async fn call(&self) -> Outcome {
        let request = HelloRequest {
            name: "bench".into(),
        };
        let result = match self {
            Client::Ours(channel) => GreeterClient::new(channel.clone()).say_hello(request).await,
            Client::Tonic { channel, .. } => {
                // tonic's balancer waits (Pending) while it has no ready endpoint, so bound it.
                match tokio::time::timeout(
                    CALL_TIMEOUT,
                    GreeterClient::new(channel.clone()).say_hello(request),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => return Err(Code::DeadlineExceeded),
                }
            }
            Client::Ideal { channels, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % channels.len();
                GreeterClient::new(channels[i].clone())
                    .say_hello(request)
                    .await
            }
        };
        result.map(|r| r.into_inner().addr).map_err(|s| s.code())
    }

    /// Waits until the client is ready to call every one of `addrs`: for ours, until they are in
    /// rotation; for the others (which connect lazily), until each has served a call, calling as
    /// fast as answers come.
    ///
    /// # Errors
    /// When some address has served nothing after `timeout`.
    pub async fn warm_up(&self, addrs: &[String], timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        if let Client::Ours(channel) = self {
            // Ours says when its instances are in rotation; some policies (pick_first) would
            // never call them all.
            channel
                .wait_ready(addrs.len(), timeout)
                .await
                .with_context(|| format!("{self:?}: warming up"))?;
            return match self.call().await {
                Ok(_) => Ok(()),
                Err(code) => anyhow::bail!("{self:?}: first call failed with {code:?}"),
            };
        }
        let mut seen = BTreeSet::new();
        while !addrs.iter().all(|a| seen.contains(a)) {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "{self:?}: after {timeout:?} only {seen:?} of {addrs:?} served a call"
                );
            }
            if let Ok(addr) = self.call().await {
                seen.insert(addr);
            }
        }
        Ok(())
    }

    /// The discovery behind this client, if it has one.
    pub fn discovery(&self) -> Option<&Discovery> {
        match self {
            Client::Ours(c) => Some(c.discovery()),
            Client::Tonic { discovery, .. } => Some(discovery),
            Client::Ideal { .. } => None,
        }
    }
}
