//! Command-line arguments shared by every binary built on the registry (feature `cli`): where etcd is,
//! which service, and human-readable durations. Flatten [`EtcdArgs`] into a clap parser.

use std::{net::SocketAddr, time::Duration};

use crate::{
    error::Result,
    etcd::{EtcdConfig, parse_endpoint},
    key,
};

/// The endpoints of the demo cluster (`docker-compose.yml`, `scripts/etcd-cluster.sh`).
pub const DEMO_ENDPOINTS: &str = "127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793";

/// Where etcd is and which service to register or discover.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated, each host:port or http://host:port.
    #[arg(
        long = "etcd-endpoints",
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = DEMO_ENDPOINTS,
        value_parser = parse_endpoint_arg,
    )]
    pub etcd_endpoints: Vec<String>,

    /// Service name: instances live under NAMESPACE/SERVICE/.
    #[arg(long, env = "REGISTRY_SERVICE", default_value = "helloworld", value_parser = parse_service)]
    pub service: String,

    /// Key namespace (a Go client dials etcd:///NAMESPACE/SERVICE).
    #[arg(long, env = "REGISTRY_NAMESPACE", default_value = key::DEFAULT_NAMESPACE, value_parser = parse_namespace)]
    pub namespace: String,

    /// How long to keep retrying etcd at startup before giving up with an error.
    #[arg(long, env = "ETCD_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub etcd_timeout: Duration,
}

/// Where to expose Prometheus metrics, if anywhere.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464) at any path; off unless set.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

impl MetricsArgs {
    /// Installs the process-wide Prometheus exporter when `--metrics-addr` is set. Must run inside
    /// a Tokio runtime (the exporter's HTTP listener is a task on it), once per process.
    ///
    /// # Errors
    /// [`crate::Error::Metrics`] naming the address, e.g. when it is in use.
    pub fn install(&self) -> Result<()> {
        let Some(addr) = self.metrics_addr else {
            return Ok(());
        };
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|source| crate::Error::Metrics { addr, source })?;
        crate::metrics::describe();
        tracing::info!(%addr, "serving Prometheus metrics");
        Ok(())
    }
}

impl EtcdArgs {
    /// The etcd configuration these arguments describe.
    ///
    /// # Errors
    /// [`crate::Error::NoEndpoints`] if the list is empty.
    pub fn etcd_config(&self) -> Result<EtcdConfig> {
        EtcdConfig::new(&self.etcd_endpoints)
    }
}

/// Parses `500ms`, `2s`, `1m 30s`, or a bare number of seconds (`10`).
///
/// # Errors
/// A message saying what forms are accepted.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}; use a number with a unit such as 500ms, 2s or 1m"))
}

fn parse_endpoint_arg(text: &str) -> Result<String, String> {
    parse_endpoint(text).map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units_and_bare_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").unwrap_err().contains("500ms"));
    }
}
