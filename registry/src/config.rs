//! The registry's configuration: the etcd connection (an [`EtcdConfig`], the one way to configure
//! it), and the namespace and lease TTL of registrations; and the credentials the connection may
//! carry.
//!
//! Library users build it in code with [`RegistryConfig::builder`]; the binaries build the same
//! thing from layered settings (defaults < config file < environment < flags, see the `cli` crate).
//! Either way the two `build` calls are the one place that checks it, so a bad value is reported
//! once, at startup, by name.
//!
//! ```no_run
//! use std::time::Duration;
//! use registry::{Credentials, EtcdConfig, RegistryConfig, TlsFiles};
//! # async fn demo() -> Result<(), registry::Error> {
//! let etcd = EtcdConfig::builder()
//!     .endpoints(["etcd-1:2379", "etcd-2:2379", "etcd-3:2379"])
//!     .connect_timeout(Duration::from_secs(3))
//!     .tls(TlsFiles { ca: Some("ca.pem".into()), ..TlsFiles::default() })
//!     .auth(Credentials::new("greeter", "s3cret"))
//!     .build()?;
//! let config = RegistryConfig::builder(etcd)
//!     .ttl(Duration::from_secs(10))
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
    etcd::{Etcd, EtcdConfig},
    key,
    lease::{self, DEFAULT_TTL},
    register::{Registration, RegistrationBuilder},
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

/// The registry's configuration: the etcd connection, the key namespace and the lease TTL. Build
/// with [`RegistryConfig::builder`].
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    etcd: EtcdConfig,
    namespace: String,
    ttl: Duration,
}

impl RegistryConfig {
    /// A builder for the registry on the etcd connection `etcd`, starting from namespace
    /// [`key::DEFAULT_NAMESPACE`] and TTL [`DEFAULT_TTL`].
    pub fn builder(etcd: EtcdConfig) -> RegistryConfigBuilder {
        RegistryConfigBuilder {
            etcd,
            ttl: DEFAULT_TTL,
            namespace: key::DEFAULT_NAMESPACE.to_owned(),
        }
    }

    /// How to reach etcd.
    pub fn etcd(&self) -> &EtcdConfig {
        &self.etcd
    }

    /// The key namespace: instances live under `<namespace>/<service>/`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The lease TTL of registrations.
    pub fn ttl(&self) -> Duration {
        self.ttl
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

/// Builds a [`RegistryConfig`]; every setter is optional.
#[derive(Debug, Clone)]
pub struct RegistryConfigBuilder {
    etcd: EtcdConfig,
    ttl: Duration,
    namespace: String,
}

impl RegistryConfigBuilder {
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

    /// Checks the TTL and the namespace (the etcd connection was checked when it was built).
    ///
    /// # Errors
    /// [`Error::InvalidTtl`], [`Error::InvalidName`] for the namespace.
    pub fn build(self) -> Result<RegistryConfig> {
        lease::check_ttl(self.ttl)?;
        key::service_prefix(&self.namespace, "x")?;
        Ok(RegistryConfig {
            etcd: self.etcd,
            namespace: self.namespace,
            ttl: self.ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd_err(builder: crate::etcd::EtcdConfigBuilder) -> String {
        builder.build().unwrap_err().to_string()
    }

    fn etcd() -> EtcdConfig {
        EtcdConfig::new(["h:1"]).unwrap()
    }

    #[test]
    fn builders_validate_with_named_errors() {
        let ok = RegistryConfig::builder(EtcdConfig::new(["127.0.0.1:2379"]).unwrap())
            .build()
            .unwrap();
        assert_eq!(ok.etcd().endpoints(), ["http://127.0.0.1:2379"]);
        assert_eq!(ok.ttl(), DEFAULT_TTL);
        assert_eq!(ok.namespace(), key::DEFAULT_NAMESPACE);

        assert!(etcd_err(EtcdConfig::builder()).contains("no etcd endpoints"));
        assert!(etcd_err(EtcdConfig::builder().endpoints(["h:99999"])).contains("\"h:99999\""));
        let short = RegistryConfig::builder(etcd()).ttl(Duration::from_secs(1));
        assert!(
            short
                .build()
                .unwrap_err()
                .to_string()
                .contains("at least 2 s")
        );
        let spaced = RegistryConfig::builder(etcd()).namespace("a b");
        assert!(
            spaced
                .build()
                .unwrap_err()
                .to_string()
                .contains("namespace")
        );
        assert!(etcd_err(EtcdConfig::builder().endpoints(["https://h:1"])).contains("etcd-ca"));
        assert!(
            etcd_err(
                EtcdConfig::builder()
                    .endpoints(["h:1"])
                    .connect_timeout(Duration::ZERO)
            )
            .contains("etcd-connect-timeout")
        );
        assert!(
            etcd_err(
                EtcdConfig::builder()
                    .endpoints(["h:1"])
                    .auth(Credentials::new("", "pw"))
            )
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
