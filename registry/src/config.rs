//! The registry's configuration: the etcd connection (an [`EtcdConfig`], the one way to configure
//! it), and the namespace and lease TTL of registrations.
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

use std::time::Duration;

use crate::{
    discover::{Discovery, DiscoveryBuilder},
    error::Result,
    etcd::{Etcd, EtcdConfig},
    key,
    lease::{self, DEFAULT_TTL},
    register::{Registration, RegistrationBuilder},
};

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
    /// [`Error::InvalidTtl`](crate::Error::InvalidTtl), [`Error::InvalidName`](crate::Error::InvalidName)
    /// for the namespace.
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
    use crate::credentials::Credentials;

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
}
