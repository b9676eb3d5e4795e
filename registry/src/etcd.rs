//! Connecting to etcd: endpoint parsing, connection options, and the clone-able [`Etcd`] handle that
//! registration and discovery share.
//!
//! Three options matter for failure handling, and all are on by default:
//! - HTTP/2 keep-alive pings while streams are open, so a member that froze or vanished behind a
//!   dead network is noticed within `keep_alive_interval + keep_alive_timeout` and its watch and
//!   keep-alive streams fail instead of hanging (etcd-client #48, etcd #8691). Not more often than
//!   etcd allows: see [`EtcdConfigBuilder::build`];
//! - `require_leader`, so a member cut off from the quorum fails watches and requests at once
//!   instead of serving a stale view;
//! - a deadline on every unary request ([`Etcd::call`]), so nothing waits forever.
//!
//! Security is optional and off by default: TLS ([`EtcdConfig::tls`], `https://` endpoints) and
//! username/password ([`EtcdConfig::auth`]). With a password, etcd-client authenticates while
//! connecting and fetches a new token whenever etcd says the old one expired, so a long-running
//! process survives token expiry; failures that retrying cannot fix (a wrong password, an untrusted
//! certificate, a role that does not cover the key) are reported at once, with what to change.

use std::{future::Future, sync::Arc, time::Duration};

use etcd_client::{Client, ConnectOptions};
use tokio::time::Instant;

use crate::{
    backoff::Backoff,
    credentials::Credentials,
    endpoint::is_dialable,
    error::{Error, Result, chain},
    tls::{Tls, TlsFiles},
};

/// Where and how to reach etcd: the one configuration of the etcd connection, shared by everything
/// that talks to etcd (registrations, discoveries, leases, locks). Build it with
/// [`EtcdConfig::builder`], or [`EtcdConfig::new`] for the defaults; either way it is checked once,
/// when built, and read-only afterwards.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `scheme://host:port`, normalised.
    pub(crate) endpoints: Vec<String>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    /// Deadline for one attempt of a request; a slower attempt is abandoned and retried. etcd
    /// answers in milliseconds, but a request routed to a member that just died can hang.
    pub(crate) attempt_timeout: Duration,
    /// Interval between HTTP/2 keep-alive pings to etcd.
    pub(crate) keep_alive_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub(crate) keep_alive_timeout: Duration,
    pub(crate) tls: Option<Tls>,
    pub(crate) auth: Option<Credentials>,
}

impl EtcdConfig {
    /// The defaults for `endpoints`, each `host:port` or `http://host:port` (blank entries are
    /// ignored): no TLS, no auth, the timeouts of [`EtcdConfig::builder`].
    ///
    /// # Errors
    /// [`Error::NoEndpoints`] or [`Error::InvalidEndpoint`], naming the offending entry;
    /// [`Error::InvalidConfig`] for an `https://` endpoint (TLS needs [`EtcdConfig::builder`]).
    pub fn new<S: AsRef<str>>(endpoints: impl IntoIterator<Item = S>) -> Result<Self> {
        Self::builder().endpoints(endpoints).build()
    }

    /// A builder starting from the defaults: no endpoints (one is required), a 3 s connect
    /// timeout, a 5 s request timeout of 1 s attempts, pings every 6 s with a 2 s timeout, no TLS,
    /// no auth.
    pub fn builder() -> EtcdConfigBuilder {
        EtcdConfigBuilder::default()
    }

    /// The endpoints, as `http://host:port` or `https://host:port`.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Deadline for opening a connection to one member.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Deadline for each request (grant, put, get, revoke, opening a stream), retries included.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Deadline for one attempt of a request.
    pub fn attempt_timeout(&self) -> Duration {
        self.attempt_timeout
    }

    /// The HTTP/2 keep-alive ping interval and timeout.
    pub fn keep_alive(&self) -> (Duration, Duration) {
        (self.keep_alive_interval, self.keep_alive_timeout)
    }

    /// TLS to etcd, if configured.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// The username and password, if configured.
    pub fn auth(&self) -> Option<&Credentials> {
        self.auth.as_ref()
    }

    /// Opens a client.
    ///
    /// Without credentials or TLS, etcd-client connects lazily, so this does not fail when etcd is
    /// down; the first request does, with an error naming the endpoints. With credentials, it
    /// authenticates now (retrying an unreachable cluster for up to `request_timeout`); with TLS it
    /// makes one request to check the handshake. Either way a wrong password or an untrusted
    /// certificate fails here, at startup, rather than in every later request.
    ///
    /// # Errors
    /// [`Error::Unauthenticated`] for refused credentials, [`Error::Etcd`] for a failed TLS check
    /// or a client that cannot be built, [`Error::InvalidConfig`] (setting `etcd-cert`) when etcd
    /// drops every connection right after the TLS handshake (it wants a client certificate we do
    /// not have, or does not accept ours), [`Error::Timeout`] if authentication got no answer.
    pub async fn connect(&self) -> Result<Etcd> {
        // The schemes were checked when the configuration was built; it cannot change since.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(self.keep_alive_interval, self.keep_alive_timeout)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.client_config(None));
        }
        if let Some(auth) = &self.auth {
            options = options
                .with_user(auth.username(), auth.password().expose())
                .with_auto_token_refresh(true);
        }
        let client = self.open(options).await?;
        let etcd = Etcd {
            client,
            config: Arc::new(self.clone()),
        };
        if self.tls.is_some() && self.auth.is_none() {
            etcd.check_handshake().await?;
        }
        Ok(etcd)
    }

    /// Builds the client; with credentials that means authenticating, so transient failures are
    /// retried, each attempt bounded (a balanced channel with no reachable member waits forever).
    async fn open(&self, options: ConnectOptions) -> Result<Client> {
        let deadline = Instant::now() + self.request_timeout;
        let mut backoff = Backoff::etcd_task();
        let mut last_error = None;
        loop {
            let attempt = tokio::time::timeout(
                self.attempt_timeout.max(self.connect_timeout),
                Client::connect(&self.endpoints, Some(options.clone())),
            )
            .await;
            match attempt {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(source)) => {
                    if let (Some(auth), Some(reason)) = (&self.auth, auth_refusal(&source)) {
                        return Err(Error::Unauthenticated {
                            user: auth.username().to_owned(),
                            endpoints: self.endpoints.join(","),
                            reason,
                        });
                    }
                    if !is_transient(&source) {
                        return Err(self.connect_error(source));
                    }
                    last_error = Some(source);
                }
                Err(_) => {}
            }
            let retry_at = Instant::now() + backoff.next_delay();
            if retry_at >= deadline {
                return Err(match last_error {
                    Some(source) => self.connect_error(source),
                    None => Error::Timeout {
                        op: "authenticate",
                        key: String::new(),
                        endpoints: self.endpoints.join(","),
                        timeout: self.request_timeout,
                    },
                });
            }
            tokio::time::sleep_until(retry_at).await;
        }
    }

    fn connect_error(&self, source: etcd_client::Error) -> Error {
        Error::Etcd {
            op: "connect",
            key: String::new(),
            endpoints: self.endpoints.join(","),
            source,
        }
    }

    /// `https://` endpoints need TLS settings, and TLS settings need `https://` endpoints: a
    /// mismatch would otherwise surface as an obscure handshake or protocol error per request.
    fn check_schemes(&self) -> Result<()> {
        let tls = self.tls.is_some();
        match self
            .endpoints
            .iter()
            .find(|e| e.starts_with("https://") != tls)
        {
            None => Ok(()),
            Some(endpoint) if tls => Err(Error::InvalidConfig {
                setting: "etcd-endpoints",
                reason: format!(
                    "{endpoint} is plain http but TLS is configured (etcd-ca, etcd-cert, etcd-key): \
                     write the endpoints as https://host:port or host:port"
                ),
            }),
            Some(endpoint) => Err(Error::InvalidConfig {
                setting: "etcd-endpoints",
                reason: format!(
                    "{endpoint} is https but no TLS settings are given: set etcd-ca to the CA that \
                     signed etcd's certificate"
                ),
            }),
        }
    }
}

/// Builds an [`EtcdConfig`]; every setter is optional except
/// [`endpoints`](EtcdConfigBuilder::endpoints).
#[derive(Debug, Clone)]
pub struct EtcdConfigBuilder {
    endpoints: Vec<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    attempt_timeout: Duration,
    keep_alive: (Duration, Duration),
    tls: TlsFiles,
    auth: Option<Credentials>,
}

impl Default for EtcdConfigBuilder {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(1),
            // etcd (grpc-go) answers pings more often than every 5 s on a connection with streams,
            // and any ping on a connection without streams, with GOAWAY "too_many_pings"
            // (`--grpc-keepalive-min-time`). 6 s + 2 s still notices a frozen member within 8 s.
            keep_alive: (Duration::from_secs(6), Duration::from_secs(2)),
            tls: TlsFiles::default(),
            auth: None,
        }
    }
}

impl EtcdConfigBuilder {
    /// etcd endpoints, each `host:port`, `http://host:port` or `https://host:port`; a bare
    /// `host:port` uses TLS when [`tls`](Self::tls) is set. Blank entries are ignored.
    pub fn endpoints<S: AsRef<str>>(mut self, endpoints: impl IntoIterator<Item = S>) -> Self {
        self.endpoints = endpoints
            .into_iter()
            .map(|e| e.as_ref().trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        self
    }

    /// Deadline for opening a connection to one etcd member.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Deadline for each etcd request, retries included.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Deadline for one attempt of a request (at most the request timeout); a slower attempt, as
    /// on a member that just died, is abandoned and retried. etcd answers in milliseconds.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// HTTP/2 keep-alive pings to etcd every `interval` while streams are open, the connection
    /// dropped when one goes unanswered for `timeout`. Keep `interval` at or above the cluster's
    /// `--grpc-keepalive-min-time` (5 s by default), or etcd closes the connection.
    pub fn keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keep_alive = (interval, timeout);
        self
    }

    /// TLS to etcd; the files are read by [`build`](Self::build). Empty files mean no TLS.
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = files;
        self
    }

    /// Username and password for a cluster with auth enabled.
    pub fn auth(mut self, credentials: Credentials) -> Self {
        self.auth = Some(credentials);
        self
    }

    /// Checks everything and reads the TLS files.
    ///
    /// # Errors
    /// [`Error::NoEndpoints`], [`Error::InvalidEndpoint`] naming the endpoint,
    /// [`Error::InvalidConfig`] for zero timeouts, an empty username or endpoints whose scheme does
    /// not match the TLS setting, [`Error::TlsFile`] / [`Error::InvalidTls`] for TLS files.
    pub fn build(self) -> Result<EtcdConfig> {
        let tls_on = !self.tls.is_empty();
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| with_scheme(e, tls_on))
            .collect::<Result<Vec<_>>>()?;
        if endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        let (keep_alive_interval, keep_alive_timeout) = self.keep_alive;
        for (setting, value) in [
            ("etcd-connect-timeout", self.connect_timeout),
            ("etcd-request-timeout", self.request_timeout),
            ("etcd-attempt-timeout", self.attempt_timeout),
            ("etcd-keep-alive-interval", keep_alive_interval),
            ("etcd-keep-alive-timeout", keep_alive_timeout),
        ] {
            if value.is_zero() {
                return Err(Error::InvalidConfig {
                    setting,
                    reason: "must be more than zero".to_owned(),
                });
            }
        }
        if let Some(auth) = &self.auth {
            if auth.username().is_empty() {
                return Err(Error::InvalidConfig {
                    setting: "etcd-username",
                    reason: "is empty but a password is set".to_owned(),
                });
            }
        }
        let config = EtcdConfig {
            endpoints,
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            attempt_timeout: self.attempt_timeout.min(self.request_timeout),
            keep_alive_interval,
            keep_alive_timeout,
            tls: tls_on.then(|| self.tls.load()).transpose()?,
            auth: self.auth,
        };
        // A scheme that does not match the TLS setting is reported now, not at connect time.
        config.check_schemes()?;
        Ok(config)
    }
}

/// The reason etcd refused our credentials, if that is what `error` is.
fn auth_refusal(error: &etcd_client::Error) -> Option<String> {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return None;
    };
    let message = status.message();
    (message.contains("authentication failed") || message.contains("authentication is not enabled"))
        .then(|| message.trim_start_matches("etcdserver: ").to_owned())
}

/// Parses one endpoint given as `host:port`, `http://host:port` or `https://host:port` into
/// `scheme://host:port`; a bare `host:port` becomes `http://` (see `with_scheme` for TLS).
///
/// # Errors
/// [`Error::InvalidEndpoint`] saying what is wrong.
pub fn parse_endpoint(endpoint: &str) -> Result<String> {
    let invalid = |reason| Error::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let (scheme, authority) = match endpoint.split_once("://") {
        None => ("http", endpoint),
        Some((scheme @ ("http" | "https"), rest)) => {
            (scheme, rest.strip_suffix('/').unwrap_or(rest))
        }
        Some(_) => return Err(invalid("the scheme must be http or https")),
    };
    if !is_dialable(authority) {
        return Err(invalid("not a host:port with a port in 1-65535"));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// Like [`parse_endpoint`], but a bare `host:port` gets `https://` when `tls` is on.
///
/// # Errors
/// [`Error::InvalidEndpoint`] saying what is wrong.
pub(crate) fn with_scheme(endpoint: &str, tls: bool) -> Result<String> {
    let parsed = parse_endpoint(endpoint)?;
    Ok(if tls && !endpoint.contains("://") {
        parsed.replacen("http://", "https://", 1)
    } else {
        parsed
    })
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
        self.call_within(op, key, self.config.attempt_timeout, request)
            .await
    }

    /// [`Etcd::call`] with a first attempt bounded by `first` instead of the configured
    /// `attempt_timeout`, for requests whose answer is known to be quick: an attempt routed to a
    /// stuck member is abandoned sooner. After two attempts that timed out, each further one gets
    /// half as much time again, up to `attempt_timeout`, so an etcd that is slow but answers still
    /// gets through (two first, as the first two may both have gone to the stuck member).
    pub(crate) async fn call_within<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        first: Duration,
        request: F,
    ) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.config.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::etcd_request();
        let mut last_error = None;
        let longest = self.config.attempt_timeout.max(first);
        let mut attempt = first;
        let mut timed_out = 0;
        loop {
            let attempt_deadline = (Instant::now() + attempt).min(deadline);
            match tokio::time::timeout_at(attempt_deadline, request(self.client.clone())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(source)) if is_expired_token(&source) => {
                    // etcd-client refreshes the token for unary requests itself; a stream that
                    // failed on one mid-way (a watch or keep-alive reopened later) needs it here.
                    if let Err(e) = self.client.refresh_token().await {
                        tracing::debug!(error = %chain(&e), "refreshing the etcd auth token failed; retrying");
                    }
                    last_error = Some(source);
                }
                Ok(Err(source)) if !is_transient(&source) => {
                    return Err(self.error(op, key, source));
                }
                Ok(Err(source)) => {
                    tracing::debug!(op, key, error = %chain(&source), "etcd request attempt failed; retrying");
                    last_error = Some(source);
                }
                Err(_) => {
                    tracing::debug!(
                        op,
                        key,
                        ?attempt,
                        "etcd request attempt got no answer in time; retrying"
                    );
                    timed_out += 1;
                    if timed_out >= 2 {
                        attempt = attempt.mul_f64(1.5).min(longest);
                    }
                }
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

    /// A few requests over TLS, to turn a TLS setup that can never work into an error at startup.
    /// Transient failures are not errors here (etcd may simply not be up yet, and later requests
    /// retry), except one: a cluster that does not accept our client certificate, or wants one we
    /// do not have, completes the handshake and then drops every connection, which looks
    /// transient but never passes. Three such drops in a row, with no answer in between, say so.
    async fn check_handshake(&self) -> Result<()> {
        const DROPS_IN_A_ROW: u32 = 3;
        let config = &self.config;
        let has_identity = config.tls.as_ref().is_some_and(Tls::has_identity);
        let deadline = Instant::now() + config.request_timeout;
        let mut backoff = Backoff::etcd_request();
        let mut drops = 0;
        loop {
            let attempt =
                tokio::time::timeout(config.attempt_timeout, self.client.clone().status()).await;
            match attempt {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(source)) => {
                    tracing::debug!(error = %chain(&source), "TLS check: etcd status request failed");
                    if dropped_after_handshake(&source) {
                        drops += 1;
                        if drops >= DROPS_IN_A_ROW {
                            return Err(self.refused_after_handshake(has_identity));
                        }
                    } else if is_tls_failure(&source) {
                        return Err(self.error("TLS handshake", "status", source));
                    } else if !is_transient(&source) {
                        // etcd itself answered: the handshake works.
                        return Ok(());
                    } else {
                        drops = 0;
                    }
                }
                // No answer in time: etcd may be slow or still starting.
                Err(_) => drops = 0,
            }
            let retry_at = Instant::now() + backoff.next_delay();
            if retry_at >= deadline {
                return Ok(());
            }
            tokio::time::sleep_until(retry_at).await;
        }
    }

    fn refused_after_handshake(&self, has_identity: bool) -> Error {
        let endpoints = self.endpoints();
        let reason = if has_identity {
            format!(
                "etcd at {endpoints} closed every connection right after the TLS handshake: it \
                 probably does not accept the client certificate in etcd-cert (is it signed by a \
                 CA that etcd's --trusted-ca-file trusts?)"
            )
        } else {
            format!(
                "etcd at {endpoints} closed every connection right after the TLS handshake: it \
                 probably requires a client certificate; set etcd-cert and etcd-key"
            )
        };
        Error::InvalidConfig {
            setting: "etcd-cert",
            reason,
        }
    }

    fn error(&self, op: &'static str, key: &str, source: etcd_client::Error) -> Error {
        if let etcd_client::Error::GRpcStatus(status) = &source {
            if status.code() == tonic::Code::PermissionDenied {
                return Error::PermissionDenied {
                    op,
                    key: key.to_owned(),
                    user: self
                        .config
                        .auth
                        .as_ref()
                        .map(|a| a.username().to_owned())
                        .unwrap_or_default(),
                    endpoints: self.endpoints(),
                };
            }
        }
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
/// Anything else (a lease that does not exist, a permission, a malformed request, a certificate we
/// do not trust) will not change.
fn is_transient(error: &etcd_client::Error) -> bool {
    use tonic::Code;
    if is_tls_failure(error) {
        return false;
    }
    match error {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        // A request the transport cancelled unsent (its connection died first) is safe to
        // retry; etcd itself never answers Cancelled to a request we did not cancel.
        etcd_client::Error::GRpcStatus(status) if status.code() == Code::Cancelled => {
            std::error::Error::source(status).is_some()
        }
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::ResourceExhausted
        ),
        _ => false,
    }
}

/// A connection that etcd dropped at or right after the TLS handshake. How a member turns away a
/// client certificate it does not accept (or a missing one) differs by etcd version and timing:
/// 3.4.23 closes the connection, 3.5.1 sends a fatal `BadCertificate` alert (TLS 1.3 may say
/// `CertificateRequired`), and a request racing the drop sees a broken pipe or is cancelled
/// unsent because the connection was not ready. A member that is down refuses the TCP connection
/// instead, which none of these match.
fn dropped_after_handshake(error: &etcd_client::Error) -> bool {
    mentions_any(
        error,
        &[
            "connection closed",
            "BadCertificate",
            "CertificateRequired",
            "UnknownCA",
            "broken pipe",
            "connection reset",
            "connection was not ready",
        ],
    )
}

/// A TLS handshake that failed on a certificate: retrying will not help.
fn is_tls_failure(error: &etcd_client::Error) -> bool {
    mentions_any(
        error,
        &[
            "certificate",
            "UnknownIssuer",
            "NotValidForName",
            "CertNotValidForName",
            "handshake",
        ],
    )
}

/// True if the error or one of its causes says any of `signs` (the transport's errors have no
/// kinds to match on for these, only their text).
fn mentions_any(error: &etcd_client::Error, signs: &[&str]) -> bool {
    let text = chain(error);
    signs.iter().any(|sign| text.contains(sign))
}

/// etcd's answer to an expired or unknown auth token (see etcd-client's `caller.rs`: the lock and
/// election services report it with code Unknown).
fn is_expired_token(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unauthenticated
                || status.message().contains("invalid auth token")
        }
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
            cfg.endpoints(),
            ["http://127.0.0.1:2379", "http://10.0.0.1:23791"]
        );
        assert_eq!(with_scheme("h:1", true).unwrap(), "https://h:1");
        assert_eq!(with_scheme("http://h:1", true).unwrap(), "http://h:1");
        assert_eq!(with_scheme("https://h:1", false).unwrap(), "https://h:1");
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
            "https://h",
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
