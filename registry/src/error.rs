//! The registry's one error type.
//!
//! Every variant names what failed (the endpoint, key or address) so a log line is enough to act on.
//! Values found in etcd that do not decode are *not* errors of this type: discovery skips them with a
//! warning (see [`crate::endpoint::DecodeError`]), because one bad record must never take down a client.

use std::{path::PathBuf, time::Duration};

/// Errors returned by the registry library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No etcd endpoint was configured.
    #[error(
        "no etcd endpoints configured: give at least one as host:port, http://host:port or https://host:port"
    )]
    NoEndpoints,

    /// An etcd endpoint could not be parsed.
    #[error(
        "invalid etcd endpoint {endpoint:?}: {reason}; expected host:port, http://host:port or https://host:port"
    )]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A service name, namespace or instance id cannot be used in an etcd key.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// Which name (`service`, `namespace`, `instance id`).
        what: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// An address to register is not a dialable `host:port`.
    #[error("invalid address {addr:?}: expected host:port with a port in 1-65535")]
    InvalidAddr {
        /// The address as given.
        addr: String,
    },

    /// The lease TTL is below what etcd grants.
    #[error("invalid lease TTL {ttl:?}: etcd grants leases of at least 2 s")]
    InvalidTtl {
        /// The TTL as given.
        ttl: Duration,
    },

    /// A setting is out of range or inconsistent with another.
    #[error("invalid setting {setting}: {reason}")]
    InvalidConfig {
        /// The setting, by its configuration name (`ttl`, `etcd-endpoints`).
        setting: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },

    /// A TLS file cannot be used.
    #[error("cannot use {what} {path:?}: {problem}")]
    TlsFile {
        /// Which file (`CA certificate`, `certificate`, `private key`).
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// Why it cannot be used.
        problem: String,
    },

    /// TLS settings that do not fit together.
    #[error("invalid TLS settings: {reason}")]
    InvalidTls {
        /// What is wrong.
        reason: &'static str,
    },

    /// etcd refused the username or password (or auth is not enabled on the cluster).
    #[error(
        "etcd at {endpoints} refused to authenticate user {user:?}: {reason}; check the username and password"
    )]
    Unauthenticated {
        /// The user we authenticated as.
        user: String,
        /// The etcd endpoints.
        endpoints: String,
        /// etcd's reason.
        reason: String,
    },

    /// The etcd user's roles do not allow an operation on a key.
    #[error(
        "etcd user {user:?} may not {op} {key:?} (endpoints {endpoints}): grant its role readwrite on the prefix, e.g. `etcdctl role grant-permission ROLE --prefix=true readwrite services/`"
    )]
    PermissionDenied {
        /// The operation.
        op: &'static str,
        /// The key or prefix.
        key: String,
        /// The user (empty without auth).
        user: String,
        /// The etcd endpoints.
        endpoints: String,
    },

    /// An etcd request failed; `source` holds etcd's or the transport's reason.
    #[error("etcd {op} of {key:?} failed (endpoints {endpoints})")]
    Etcd {
        /// The operation (`grant`, `put`, `get`, `watch`, `keep-alive`, `revoke`).
        op: &'static str,
        /// The key (or prefix, or lease id) the operation was about.
        key: String,
        /// The etcd endpoints the client was using.
        endpoints: String,
        /// The underlying error.
        #[source]
        source: etcd_client::Error,
    },

    /// An etcd request got no answer in time.
    #[error(
        "etcd {op} of {key:?} timed out after {timeout:?} (endpoints {endpoints}); is the cluster up and has it a leader?"
    )]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The key (or prefix, or lease id) the operation was about.
        key: String,
        /// The etcd endpoints the client was using.
        endpoints: String,
        /// How long we waited.
        timeout: Duration,
    },

    /// Waiting for a condition (first registration, first instances) ran out of time.
    #[error("gave up after {waited:?} waiting for {what}")]
    GaveUp {
        /// What we were waiting for.
        what: String,
        /// How long we waited.
        waited: Duration,
    },

    /// A lock was not acquired in time: someone else held it all along, or the lease could not be
    /// granted (see [`crate::lease::LeaseState::Lost`]).
    #[error(
        "lock {name:?} not acquired within {waited:?} (still waiting for {waiting_for}); try again later or wait longer"
    )]
    LockTimeout {
        /// The lock's name.
        name: String,
        /// How long we waited.
        waited: Duration,
        /// What we were still waiting for: the holder to release it, or a live lease.
        waiting_for: &'static str,
    },

    /// A lock was lost before it was released: its lease was lost or its key deleted, so another
    /// contender may have held it meanwhile.
    #[error(
        "lock {name:?} was lost before it was released ({reason}); work done under it may have overlapped another holder's: check or redo it"
    )]
    LockLost {
        /// The lock's name.
        name: String,
        /// Why ownership ended.
        reason: String,
    },

    /// Deregistration failed twice over: the key could not be deleted and its lease could not be
    /// revoked. (When only one of them fails, that error is returned as it is.) The key goes when
    /// the lease expires, within one TTL.
    #[error(
        "could not delete {key:?} ({delete}) nor revoke its lease ({revoke}); it expires with the lease"
    )]
    Deregistration {
        /// The registration's key.
        key: String,
        /// Why deleting the key failed.
        #[source]
        delete: Box<Error>,
        /// Why revoking the lease failed.
        revoke: Box<Error>,
    },

    /// [`crate::serve::Lifecycle::serve`] gave up on the first registration: the key was not in
    /// etcd within the register timeout. `source` says what the last attempt met.
    #[error(
        "could not register {key:?} in etcd at {endpoints} within {waited:?}; check that etcd is running and reachable at those endpoints"
    )]
    NotRegistered {
        /// The key that was to be registered.
        key: String,
        /// The etcd endpoints the client was using.
        endpoints: String,
        /// How long we waited.
        waited: Duration,
        /// Why it was not registered (an [`Error::GaveUp`] naming the last failure).
        #[source]
        source: Box<Error>,
    },

    /// The address a listener is bound to could not be read.
    #[error("cannot read the address of the listener to serve on")]
    Listener {
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },

    /// Serving gRPC on a listener failed.
    #[error("serving on {addr} failed")]
    Serve {
        /// The address the listener is bound to.
        addr: std::net::SocketAddr,
        /// tonic's reason.
        #[source]
        source: tonic::transport::Error,
    },

    /// A background task (a registration's, or a lease's keep-alive) stopped unexpectedly.
    #[error("the {task} task for {key:?} stopped unexpectedly")]
    TaskLost {
        /// Which task: `registration` or `lease keep-alive`.
        task: &'static str,
        /// The key the task was keeping registered (or the lease's name).
        key: String,
        /// Why the task ended (a panic or cancellation by the runtime).
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources on one line, each cause once: etcd-client's top-level messages are
/// often just "transport error", with the useful part (connection refused, which endpoint) further
/// down. For log lines and messages about any error, this crate's or another's.
pub fn chain(err: &dyn std::error::Error) -> String {
    chain_levels(err, usize::MAX)
}

/// [`chain`] cut after `levels` messages (a cause already said by an earlier one does not count).
pub(crate) fn chain_levels(err: &dyn std::error::Error, levels: usize) -> String {
    let mut text = err.to_string();
    let mut said = 1;
    let mut source = err.source();
    while let Some(cause) = source {
        if said >= levels {
            break;
        }
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
            said += 1;
        }
        source = cause.source();
    }
    text
}
