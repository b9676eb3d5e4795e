//! The flags both binaries share: where etcd is and how to reach it ([`EtcdArgs`]), TLS on the gRPC
//! port ([`GrpcTlsArgs`]) and the metrics exporter ([`MetricsArgs`]). A binary flattens them into
//! its own flag struct.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use registry::{
    Credentials, EtcdConfig, RegistryConfig, Secret, Tls, TlsFiles, key, parse_endpoint,
};
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    layered::Sources,
    values::{duration, list, parse_nonzero_duration},
};

/// The endpoints of the demo cluster (`docker-compose.yml`, `scripts/etcd-cluster.sh`).
pub const DEMO_ENDPOINTS: &str = "127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793";

/// Where etcd is, how to reach it securely, and which service to register or discover.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated, each host:port, http://host:port or https://host:port
    /// (bare host:port uses TLS when --etcd-ca is set).
    #[arg(
        global = true,
        long = "etcd-endpoints",
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = DEMO_ENDPOINTS,
        value_parser = parse_endpoint_arg,
    )]
    #[serde(deserialize_with = "list::deserialize")]
    pub etcd_endpoints: Vec<String>,

    /// Service name: instances live under NAMESPACE/SERVICE/.
    #[arg(global = true, long, env = "REGISTRY_SERVICE", default_value = "helloworld", value_parser = parse_service)]
    pub service: String,

    /// Key namespace (a Go client dials etcd:///NAMESPACE/SERVICE).
    #[arg(global = true, long, env = "REGISTRY_NAMESPACE", default_value = key::DEFAULT_NAMESPACE, value_parser = parse_namespace)]
    pub namespace: String,

    /// How long to keep retrying etcd at startup before giving up with an error.
    #[arg(global = true, long, env = "ETCD_TIMEOUT", default_value = "10s", value_parser = parse_nonzero_duration)]
    #[serde(with = "duration")]
    pub etcd_timeout: Duration,

    /// etcd username, for a cluster with auth enabled.
    #[arg(global = true, long, env = "ETCD_USERNAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_username: Option<String>,

    /// etcd password. Prefer ETCD_PASSWORD or --etcd-password-file: a flag is visible in `ps`.
    #[arg(global = true, long, env = "ETCD_PASSWORD", hide_env_values = true, value_parser = parse_secret, conflicts_with = "etcd_password_file")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_password: Option<Secret>,

    /// File holding the etcd password (one trailing newline is ignored).
    #[arg(global = true, long, env = "ETCD_PASSWORD_FILE", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_password_file: Option<PathBuf>,

    /// CA certificate (PEM) to trust for etcd's TLS; turns TLS to etcd on.
    #[arg(global = true, long, env = "ETCD_CA", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) to present to etcd (with --etcd-key).
    #[arg(global = true, long, env = "ETCD_CERT", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_cert: Option<PathBuf>,

    /// Private key (PEM) of --etcd-cert.
    #[arg(global = true, long, env = "ETCD_KEY", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_key: Option<PathBuf>,
}

/// Where to expose Prometheus metrics, if anywhere.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464) at any path; off unless set.
    #[arg(global = true, long, env = "METRICS_ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
}

/// TLS for gRPC calls between the client and the servers (both binaries flatten this).
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GrpcTlsArgs {
    /// Certificate (PEM): the server's own, or the client's for mutual TLS.
    #[arg(global = true, long, env = "TLS_CERT", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(global = true, long, env = "TLS_KEY", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM): on a client, the CA that signed the servers' certificates (turns TLS on); on a
    /// server, requires clients to present a certificate signed by it (mutual TLS).
    #[arg(global = true, long, env = "TLS_CA", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
}

impl GrpcTlsArgs {
    /// Checks that the files are usable (read and parsed, as at startup).
    ///
    /// # Errors
    /// As [`GrpcTlsArgs::load`].
    pub fn validate(&self) -> Result<()> {
        self.load().map(drop)
    }

    /// The files, loaded; `None` when none is set.
    ///
    /// # Errors
    /// [`Error::Registry`] as [`TlsFiles::load`].
    pub fn load(&self) -> Result<Option<Tls>> {
        let files = TlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        };
        Ok((!files.is_empty()).then(|| files.load()).transpose()?)
    }
}

impl MetricsArgs {
    /// Installs the process-wide Prometheus exporter when `--metrics-addr` is set. Must run inside
    /// a Tokio runtime (the exporter's HTTP listener is a task on it), once per process.
    ///
    /// # Errors
    /// [`Error::Metrics`] naming the address, e.g. when it is in use.
    pub fn install(&self) -> Result<()> {
        let Some(addr) = self.metrics_addr else {
            return Ok(());
        };
        // Per-instance series of instances long gone would otherwise be exported forever.
        let idle = metrics_util::MetricKindMask::COUNTER | metrics_util::MetricKindMask::HISTOGRAM;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .idle_timeout(idle, Some(registry::metrics::IDLE_SERIES_DROPPED_AFTER))
            .install()
            .map_err(|source| Error::Metrics { addr, source })?;
        registry::metrics::describe();
        tracing::info!(%addr, "serving Prometheus metrics");
        Ok(())
    }
}

impl EtcdArgs {
    /// Checks what a config file can get past clap: every endpoint, the names, a zero timeout,
    /// credentials that do not fit together, unreadable password, certificate or key files.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the setting as the user wrote it, or [`Error::Registry`] naming
    /// the file that cannot be used.
    pub fn validate(&self, sources: &Sources) -> Result<()> {
        for endpoint in &self.etcd_endpoints {
            parse_endpoint_arg(endpoint).map_err(|e| sources.invalid("etcd-endpoints", e))?;
        }
        parse_service(&self.service).map_err(|e| sources.invalid("service", e))?;
        parse_namespace(&self.namespace).map_err(|e| sources.invalid("namespace", e))?;
        if self.etcd_timeout.is_zero() {
            return Err(sources.invalid("etcd-timeout", "must be more than zero"));
        }
        match (
            &self.etcd_username,
            &self.etcd_password,
            &self.etcd_password_file,
        ) {
            (_, Some(_), Some(_)) => {
                return Err(sources.invalid(
                    "etcd-password",
                    format!(
                        "both it and {} are set; keep one",
                        sources.name("etcd-password-file")
                    ),
                ));
            }
            (Some(_), None, None) => {
                return Err(sources.invalid(
                    "etcd-username",
                    "is set without a password: set ETCD_PASSWORD or --etcd-password-file",
                ));
            }
            (None, Some(_), _) => {
                return Err(sources.invalid(
                    "etcd-password",
                    "is set but no username: set --etcd-username",
                ));
            }
            (None, _, Some(_)) => {
                return Err(sources.invalid(
                    "etcd-password-file",
                    "is set but no username: set --etcd-username",
                ));
            }
            (Some(_), None, Some(file)) => {
                if let Err(e) = std::fs::read_to_string(file) {
                    return Err(sources.invalid(
                        "etcd-password-file",
                        format!("cannot read {}: {e}", file.display()),
                    ));
                }
            }
            _ => {}
        }
        // The rest (TLS files, empty password file, schemes) is the registry's own check.
        self.registry_config(registry::DEFAULT_TTL)?;
        Ok(())
    }

    /// The registry configuration these settings describe, with lease TTL `ttl` (a client, which
    /// registers nothing, passes the default).
    ///
    /// # Errors
    /// [`Error::Registry`] as [`registry::EtcdConfigBuilder::build`] and
    /// [`registry::RegistryConfigBuilder::build`], or for an
    /// unreadable password file, [`Error::Invalid`] for a username without a password or the other
    /// way round.
    pub fn registry_config(&self, ttl: Duration) -> Result<RegistryConfig> {
        let mut etcd = EtcdConfig::builder()
            .endpoints(&self.etcd_endpoints)
            .tls(TlsFiles {
                ca: self.etcd_ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            });
        let credentials = match (
            &self.etcd_username,
            &self.etcd_password,
            &self.etcd_password_file,
        ) {
            (None, None, None) => None,
            (Some(user), Some(password), None) => Some(Credentials::new(user, password.expose())),
            (Some(user), None, Some(file)) => Some(Credentials::from_password_file(user, file)?),
            (Some(_), Some(_), Some(_)) => {
                return Err(Error::Invalid {
                    setting: "etcd-password".into(),
                    reason: "both etcd-password and etcd-password-file are set; keep one".into(),
                });
            }
            (Some(_), None, None) => {
                return Err(Error::Invalid {
                    setting: "etcd-username".into(),
                    reason: "is set without a password: set etcd-password (ETCD_PASSWORD) or \
                             etcd-password-file"
                        .into(),
                });
            }
            (None, _, _) => {
                return Err(Error::Invalid {
                    setting: "etcd-username".into(),
                    reason: "a password is set but no username: set etcd-username".into(),
                });
            }
        };
        if let Some(credentials) = credentials {
            etcd = etcd.auth(credentials);
        }
        Ok(RegistryConfig::builder(etcd.build()?)
            .namespace(&self.namespace)
            .ttl(ttl)
            .build()?)
    }
}

fn parse_secret(text: &str) -> Result<Secret, String> {
    Ok(Secret::new(text))
}

/// Checks an endpoint but keeps it as written: whether a bare `host:port` means http or https is
/// decided later, by the TLS settings.
fn parse_endpoint_arg(text: &str) -> Result<String, String> {
    parse_endpoint(text)
        .map(|_| text.trim().to_owned())
        .map_err(|e| e.to_string())
}

fn parse_service(text: &str) -> Result<String, String> {
    key::service_prefix(key::DEFAULT_NAMESPACE, text)
        .map(|_| text.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_namespace(text: &str) -> Result<String, String> {
    key::service_prefix(text, "x")
        .map(|_| text.to_owned())
        .map_err(|e| e.to_string())
}
