//! Connecting to etcd: endpoint parsing, connection options, and the clone-able [`Etcd`] handle that
//! registration and discovery share.
//!
//! Three options matter for failure handling, and all are on by default:
//! - HTTP/2 keep-alive pings while streams are open, so a member that froze or vanished behind a
//!   dead network is noticed within `keep_alive_interval + keep_alive_timeout` and its watch and
//!   keep-alive streams fail instead of hanging (etcd-client #48, etcd #8691). Not more often than
//!   etcd allows: see [`EtcdConfig::new`];
//! - `require_leader`, so a member cut off from the quorum fails watches and requests at once
//!   instead of serving a stale view;
//! - a deadline on every unary request ([`Etcd::call`]), so nothing waits forever.

use std::{future::Future, sync::Arc, time::Duration};

use etcd_client::{Client, ConnectOptions};
use tokio::time::Instant;

use crate::{
    backoff::Backoff,
    endpoint::is_dialable,
    error::{Error, Result},
};

/// Where and how to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Endpoints as `http://host:port` (normalised by [`EtcdConfig::new`]).
    pub endpoints: Vec<String>,
    /// Deadline for opening a connection to one member.
    pub connect_timeout: Duration,
    /// Deadline for each request (grant, put, get, revoke, opening a stream), retries included.
    pub request_timeout: Duration,
    /// Deadline for one attempt of a request; a slower attempt is abandoned and retried. etcd
    /// answers in milliseconds, but a request routed to a member that just died can hang.
    pub attempt_timeout: Duration,
    /// Interval between HTTP/2 keep-alive pings to etcd.
    pub keep_alive_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub keep_alive_timeout: Duration,
}

impl EtcdConfig {
    /// A configuration with default timeouts for `endpoints`, each given as `host:port` or
    /// `http://host:port`; blank entries are ignored.
    ///
    /// # Errors
    /// [`Error::NoEndpoints`] or [`Error::InvalidEndpoint`], naming the offending entry.
    pub fn new<S: AsRef<str>>(endpoints: impl IntoIterator<Item = S>) -> Result<Self> {
        let endpoints = endpoints
            .into_iter()
            .map(|e| e.as_ref().trim().to_owned())
            .filter(|e| !e.is_empty())
            .map(|e| parse_endpoint(&e))
            .collect::<Result<Vec<_>>>()?;
        if endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        Ok(Self {
            endpoints,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(1),
            // etcd (grpc-go) answers pings more often than every 5 s on a connection with streams,
            // and any ping on a connection without streams, with GOAWAY "too_many_pings"
            // (`--grpc-keepalive-min-time`). 6 s + 2 s still notices a frozen member within 8 s.
            keep_alive_interval: Duration::from_secs(6),
            keep_alive_timeout: Duration::from_secs(2),
        })
    }

    /// Opens a client. etcd-client connects lazily, so this does not fail when etcd is down; the
    /// first request does, with an error naming the endpoints.
    ///
    /// # Errors
    /// [`Error::Etcd`] if the client cannot be built from the endpoints.
    pub async fn connect(&self) -> Result<Etcd> {
        let options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(self.keep_alive_interval, self.keep_alive_timeout)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        let client = Client::connect(&self.endpoints, Some(options))
            .await
            .map_err(|source| Error::Etcd {
                op: "connect",
                key: String::new(),
                endpoints: self.endpoints.join(","),
                source,
            })?;
        Ok(Etcd {
            client,
            config: Arc::new(self.clone()),
        })
    }
}

/// Parses one endpoint given as `host:port` or `http://host:port` into `http://host:port`.
///
/// # Errors
/// [`Error::InvalidEndpoint`] saying what is wrong.
pub fn parse_endpoint(endpoint: &str) -> Result<String> {
    let invalid = |reason| Error::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let authority = match endpoint.split_once("://") {
        None => endpoint,
        Some(("http", rest)) => rest.strip_suffix('/').unwrap_or(rest),
        Some(("https", _)) => return Err(invalid("TLS (https) is not supported yet")),
        Some(_) => return Err(invalid("the scheme must be http")),
    };
    if !is_dialable(authority) {
        return Err(invalid("not a host:port with a port in 1-65535"));
    }
    Ok(format!("http://{authority}"))
}

/// A connected etcd client with its configuration: cheap to clone, shared by every registration and
/// discovery of a process. There is no global instance; pass it where it is needed.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    config: Arc<EtcdConfig>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.config.endpoints)
            .finish()
    }
}

impl Etcd {
    /// The underlying etcd-client handle (a cheap clone), for operations this crate does not wrap.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The configuration this handle was opened with.
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// Runs one etcd request: each attempt bounded by `attempt_timeout`, attempts that failed for a
    /// passing reason (a dead member, no leader yet, an attempt that hung) retried with a short
    /// jittered backoff, all within `request_timeout`. Every request this crate makes is safe to
    /// repeat: gets, watches and revokes trivially, puts write the same value on the same lease,
    /// and a lease granted by an abandoned attempt simply expires.
    ///
    /// # Errors
    /// [`Error::Etcd`] if etcd answered with a lasting error (or the last passing one when time ran
    /// out), [`Error::Timeout`] if no attempt got an answer in time.
    pub async fn call<T, F, Fut>(&self, op: &'static str, key: &str, request: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.config.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        let mut last_error = None;
        loop {
            let attempt_deadline = (Instant::now() + self.config.attempt_timeout).min(deadline);
            match tokio::time::timeout_at(attempt_deadline, request(self.client.clone())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(source)) if !is_transient(&source) => {
                    return Err(self.error(op, key, source));
                }
                Ok(Err(source)) => last_error = Some(source),
                Err(_) => {}
            }
            let retry_at = Instant::now() + backoff.next_delay();
            if retry_at >= deadline {
                return Err(match last_error {
                    Some(source) => self.error(op, key, source),
                    None => Error::Timeout {
                        op,
                        key: key.to_owned(),
                        endpoints: self.endpoints(),
                        timeout,
                    },
                });
            }
            tokio::time::sleep_until(retry_at).await;
        }
    }

    fn error(&self, op: &'static str, key: &str, source: etcd_client::Error) -> Error {
        Error::Etcd {
            op,
            key: key.to_owned(),
            endpoints: self.endpoints(),
            source,
        }
    }

    /// The endpoints, comma-separated, for error messages.
    pub(crate) fn endpoints(&self) -> String {
        self.config.endpoints.join(",")
    }
}

/// Errors worth another attempt: the transport failed, or etcd is between leaders or overloaded.
/// Anything else (a lease that does not exist, a permission, a malformed request) will not change.
fn is_transient(error: &etcd_client::Error) -> bool {
    use tonic::Code;
    match error {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::ResourceExhausted
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalised() {
        let cfg = EtcdConfig::new(["127.0.0.1:2379", " http://10.0.0.1:23791/ ", ""]).unwrap();
        assert_eq!(
            cfg.endpoints,
            ["http://127.0.0.1:2379", "http://10.0.0.1:23791"]
        );
    }

    #[test]
    fn bad_endpoints_are_named() {
        assert!(matches!(EtcdConfig::new([""; 0]), Err(Error::NoEndpoints)));
        assert!(matches!(
            EtcdConfig::new([" ", ""]),
            Err(Error::NoEndpoints)
        ));
        for bad in [
            "localhost",
            "127.0.0.1:0",
            "ftp://h:1",
            "https://h:1",
            "h:1:2",
            "http://",
        ] {
            match EtcdConfig::new([bad]) {
                Err(Error::InvalidEndpoint { endpoint, .. }) => assert_eq!(endpoint, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
