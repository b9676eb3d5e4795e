//! One validated configuration for everything the registry needs: where etcd is and how to reach it
//! securely, and the namespace and lease TTL of registrations.
//!
//! Library users build it in code with [`RegistryConfig::builder`]; the binaries build the same
//! thing from layered settings (defaults < config file < environment < flags, see the `cli` crate). Either
//! way [`RegistryConfigBuilder::build`] is the one place that checks it, so a bad value is reported
//! once, at startup, by name.
//!
//! ```no_run
//! use std::time::Duration;
//! use registry::{Credentials, RegistryConfig, TlsFiles};
//! # async fn demo() -> Result<(), registry::Error> {
//! let config = RegistryConfig::builder()
//!     .endpoints(["etcd-1:2379", "etcd-2:2379", "etcd-3:2379"])
//!     .connect_timeout(Duration::from_secs(3))
//!     .ttl(Duration::from_secs(10))
//!     
//!     .tls(TlsFiles { ca: Some("ca.pem".into()), ..TlsFiles::default() })
//!     .auth(Credentials::new("greeter", "s3cret"))
//!     .build()?;
//! let etcd = config.connect().await?;
//! let registration = config.registration("helloworld", "node-1", "10.0.0.5:50051").start(&etcd)?;
//! # Ok(())
//! # }
//! ```

use std::{fmt, path::Path, time::Duration};

use crate::{
    discover::{Discovery, DiscoveryBuilder},
    error::{Error, Result},
    etcd::{Etcd, EtcdConfig, with_scheme},
    key,
    lease::{self, DEFAULT_TTL},
    register::{Registration, RegistrationBuilder},
    tls::TlsFiles,
};

/// A string that must not be printed: `Debug` and `Display` show `<redacted>`. Read it with
/// [`Secret::expose`], only where it is handed to etcd.
#[derive(Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

/// An etcd username and password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    password: Secret,
}

impl Credentials {
    /// A username and password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: Secret::new(password),
        }
    }

    /// A username, and the password read from a file (one trailing newline is ignored, as a file
    /// written by `echo` or a secrets mount has one).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the file if it cannot be read or is empty.
    pub fn from_password_file(username: impl Into<String>, path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::InvalidConfig {
            setting: "etcd-password-file",
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        let password = text.strip_suffix('\n').unwrap_or(&text);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.is_empty() {
            return Err(Error::InvalidConfig {
                setting: "etcd-password-file",
                reason: format!("{} is empty", path.display()),
            });
        }
        Ok(Self::new(username, password))
    }

    /// The username.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The password (redacted when printed).
    pub fn password(&self) -> &Secret {
        &self.password
    }
}

/// The registry's configuration: etcd connection (endpoints, timeouts, TLS, auth), the key
/// namespace and the lease TTL. Build with [`RegistryConfig::builder`].
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// How to reach etcd.
    pub etcd: EtcdConfig,
    /// The key namespace: instances live under `<namespace>/<service>/`.
    pub namespace: String,
    /// The lease TTL of registrations.
    pub ttl: Duration,
}

impl RegistryConfig {
    /// A builder starting from the defaults: no endpoints (one is required), 3 s connect timeout,
    /// 5 s request timeout, namespace [`key::DEFAULT_NAMESPACE`], TTL [`DEFAULT_TTL`], no TLS, no
    /// auth.
    pub fn builder() -> RegistryConfigBuilder {
        RegistryConfigBuilder::default()
    }

    /// Connects to etcd (see [`EtcdConfig::connect`]).
    ///
    /// # Errors
    /// As [`EtcdConfig::connect`].
    pub async fn connect(&self) -> Result<Etcd> {
        self.etcd.connect().await
    }

    /// A registration of `service` with this configuration's namespace and TTL; add metadata and
    /// call `start`.
    pub fn registration(
        &self,
        service: impl Into<String>,
        instance_id: impl Into<String>,
        addr: impl Into<String>,
    ) -> RegistrationBuilder {
        Registration::builder(service, instance_id, addr)
            .namespace(&self.namespace)
            .ttl(self.ttl)
    }

    /// A discovery of `service` in this configuration's namespace; call `start`.
    pub fn discovery(&self, service: impl Into<String>) -> DiscoveryBuilder {
        Discovery::builder(service).namespace(&self.namespace)
    }
}

/// Builds a [`RegistryConfig`]; every setter is optional except
/// [`endpoints`](RegistryConfigBuilder::endpoints).
#[derive(Debug, Clone)]
pub struct RegistryConfigBuilder {
    endpoints: Vec<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    ttl: Duration,
    namespace: String,
    tls: TlsFiles,
    auth: Option<Credentials>,
}

impl Default for RegistryConfigBuilder {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            ttl: DEFAULT_TTL,
            namespace: key::DEFAULT_NAMESPACE.to_owned(),
            tls: TlsFiles::default(),
            auth: None,
        }
    }
}

impl RegistryConfigBuilder {
    /// etcd endpoints, each `host:port`, `http://host:port` or `https://host:port`; a bare
    /// `host:port` uses TLS when [`tls`](Self::tls) is set.
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

    /// The lease TTL of registrations (at least [`crate::MIN_TTL`]).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The key namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// TLS to etcd; files are read by [`build`](Self::build). Empty files mean no TLS.
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
    /// [`Error::NoEndpoints`], [`Error::InvalidEndpoint`] naming the endpoint, [`Error::InvalidTtl`],
    /// [`Error::InvalidName`] for the namespace, [`Error::InvalidConfig`] for zero timeouts, an
    /// empty username or mixed schemes, [`Error::TlsFile`] / [`Error::InvalidTls`] for TLS files.
    pub fn build(self) -> Result<RegistryConfig> {
        let tls_on = !self.tls.is_empty();
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| with_scheme(e, tls_on))
            .collect::<Result<Vec<_>>>()?;
        let mut etcd = EtcdConfig::new(&endpoints)?;
        lease::check_ttl(self.ttl)?;
        key::service_prefix(&self.namespace, "x")?;
        for (setting, value) in [
            ("etcd-connect-timeout", self.connect_timeout),
            ("etcd-request-timeout", self.request_timeout),
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
        etcd.connect_timeout = self.connect_timeout;
        etcd.request_timeout = self.request_timeout;
        etcd.attempt_timeout = etcd.attempt_timeout.min(self.request_timeout);
        etcd.tls = tls_on.then(|| self.tls.load()).transpose()?;
        etcd.auth = self.auth;
        // A scheme that does not match the TLS setting is reported now, not at connect time.
        etcd.check_schemes()?;
        Ok(RegistryConfig {
            etcd,
            namespace: self.namespace,
            ttl: self.ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(builder: RegistryConfigBuilder) -> String {
        builder.build().unwrap_err().to_string()
    }

    #[test]
    fn builder_validates_with_named_errors() {
        let ok = RegistryConfig::builder()
            .endpoints(["127.0.0.1:2379"])
            .build()
            .unwrap();
        assert_eq!(ok.etcd.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(ok.ttl, DEFAULT_TTL);

        assert!(err(RegistryConfig::builder()).contains("no etcd endpoints"));
        assert!(err(RegistryConfig::builder().endpoints(["h:99999"])).contains("\"h:99999\""));
        assert!(
            err(RegistryConfig::builder()
                .endpoints(["h:1"])
                .ttl(Duration::from_secs(1)))
            .contains("at least 2 s")
        );
        assert!(
            err(RegistryConfig::builder()
                .endpoints(["h:1"])
                .namespace("a b"))
            .contains("namespace")
        );
        assert!(err(RegistryConfig::builder().endpoints(["https://h:1"])).contains("etcd-ca"));
        assert!(
            err(RegistryConfig::builder()
                .endpoints(["h:1"])
                .connect_timeout(Duration::ZERO))
            .contains("etcd-connect-timeout")
        );
        assert!(
            err(RegistryConfig::builder()
                .endpoints(["h:1"])
                .auth(Credentials::new("", "pw")))
            .contains("etcd-username")
        );
    }

    #[test]
    fn secrets_never_print() {
        let credentials = Credentials::new("alice", "hunter2");
        assert!(!format!("{credentials:?}").contains("hunter2"));
        assert_eq!(credentials.password().to_string(), "<redacted>");
        assert_eq!(credentials.password().expose(), "hunter2");
    }

    #[test]
    fn password_files_lose_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let credentials = Credentials::from_password_file("u", &path).unwrap();
        assert_eq!(credentials.password().expose(), "s3cret");
        std::fs::write(&path, "").unwrap();
        let e = Credentials::from_password_file("u", &path).unwrap_err();
        assert!(e.to_string().contains("is empty"));
    }
}
