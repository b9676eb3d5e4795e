//! Service registration and discovery for tonic gRPC services, on etcd.
//!
//! A server announces `host:port` under `<namespace>/<service>/<instance-id>` with a lease that a task
//! keeps alive; a client lists and watches that prefix and spreads calls over the instances that are
//! up (round robin by default; weighted, random, least request, consistent hash and pick first on
//! request), choosing by metadata, following their health and retrying what is safe to retry. The key and value follow etcd's Go naming package, so Go
//! services using `etcd:///services/<service>` and these Rust ones find each other.
//!
//! Everything recovers by itself: broken keep-alive streams are reopened, lost leases re-granted and
//! the key put again, failed watches re-listed and resumed, dropped connections re-dialled. Nothing
//! waits without a deadline.
//!
//! # Layout
//! - `config.rs`: [`RegistryConfig`], the one validated configuration, and its builder.
//! - `etcd.rs`: endpoints, connection options (TLS, auth), the shared [`Etcd`] handle.
//! - `tls.rs`: certificates and keys from PEM files, for etcd, clients and servers.
//! - [`key`]: the key layout `<namespace>/<service>/<instance-id>`.
//! - [`endpoint`]: the value codec, compatible with Go's `endpoints.Manager`.
//! - `register.rs`: [`Registration`], a key kept alive for as long as its handle lives.
//! - `lease.rs`: [`SharedLease`], one lease per process for all its registrations and locks, kept
//!   alive by one loop that tells a broken stream from a lost lease.
//! - `lock.rs`: [`Lock`], distributed locks on etcd's lock service, released when the holder's lease
//!   ends.
//! - `discover.rs`: [`Discovery`], list-then-watch into a live [`Membership`] of [`Instances`].
//! - `balancer/`: [`BalancedChannel`], for generated clients, one file per concern:
//!   - `mod.rs`: the channel, [`BalanceOptions`] and what it reports ([`InstanceStatus`]);
//!   - `pool.rs`: the updater task, one backend per address, the removal grace;
//!   - `backend.rs`: one instance's state; `connection.rs`: its connection and health checks;
//!   - `picker.rs`: the [`Policy`]s (round robin, weighted, random, least request, consistent
//!     hash, pick first), rebuilt off the call path;
//!   - `call.rs`: one call, its deadline, the wait while starting, its retries;
//!   - `retry.rs`: which failures are safe to retry ([`RetryPolicy`]), the budget, request replay;
//!   - `select.rs`: choosing instances by metadata ([`Selector`]);
//!   - `subset.rs`: [`Subsetting`], each client connecting to K of N instances chosen by
//!     rendezvous hashing, kept incrementally.
//! - [`metrics`]: what the library records (through the `metrics` facade) and under which names.
//! - [`serve`]: [`Lifecycle`], a tonic server on a listener you bound: registered once serving,
//!   NOT_SERVING, deregistered and drained on shutdown.
//! - `backoff.rs`: capped exponential backoff with jitter.
//! - [`error`]: the crate's [`Error`].
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//! use registry::{BalanceOptions, BalancedChannel, Discovery, EtcdConfig, Registration};
//! # async fn demo() -> Result<(), registry::Error> {
//! let etcd = EtcdConfig::new(["127.0.0.1:2379"])?.connect().await?;
//!
//! // Server side: register once serving; deregister on shutdown.
//! let registration = Registration::builder("helloworld", "node-1", "127.0.0.1:50051").start(&etcd)?;
//! registration.wait_registered(Duration::from_secs(5)).await?;
//!
//! // Client side: a channel to hand to any generated client, e.g. `GreeterClient::new(channel)`.
//! let discovery = Discovery::builder("helloworld").start(&etcd)?;
//! let channel = BalancedChannel::new(discovery, BalanceOptions::default());
//! channel.wait_ready(1, Duration::from_secs(5)).await?;
//!
//! registration.deregister().await?;
//! # Ok(())
//! # }
//! ```

mod backoff;
mod balancer;
mod config;
mod credentials;
mod discover;
pub mod endpoint;
pub mod error;
mod etcd;
pub mod key;
mod key_watch;
mod lease;
mod lock;
pub mod metrics;
mod problem;
mod register;
pub mod serve;
mod sync;
mod tls;

pub use balancer::{
    BalanceOptions, BalancedChannel, HASH_KEY, INSTANCE, InstanceStatus, OutlierPolicy, Policy,
    RemovalGrace, RetryPolicy, Selector, ServedBy, SubsetStatus, Subsetting,
};
pub use config::{RegistryConfig, RegistryConfigBuilder};
pub use credentials::{Credentials, Secret};
pub use discover::{Change, Changes, Discovery, DiscoveryBuilder, Instance, Instances, Membership};
pub use endpoint::{Endpoint, Format};
pub use error::{Error, Result};
pub use etcd::{Etcd, EtcdConfig, EtcdConfigBuilder, parse_endpoint};
pub use lease::{DEFAULT_TTL, LeaseState, MIN_TTL, SharedLease};
pub use lock::{Lock, LockGuard};
pub use register::{Registration, RegistrationBuilder, RegistrationState};
pub use serve::Lifecycle;
pub use tls::{ClientTls, Tls, TlsFiles};
