//! The helloworld Greeter server: serve first, then register in etcd; on shutdown, leave the rotation
//! before closing the door.
//!
//! [`run`] binds the address from the flags and calls [`serve`], which hands the whole life of the
//! instance to [`registry::serve::Lifecycle`]:
//! 1. serve `helloworld.Greeter`, `grpc.health.v1.Health` and reflection (v1 and v1alpha) on the
//!    bound listener;
//! 2. register `<namespace>/<service>/<instance-id>` under a kept-alive lease, giving up after
//!    `--etcd-timeout` if etcd never answers;
//! 3. while registered, SIGUSR1 flips the reported health (an operator's switch to take the
//!    instance out of clients' rotation without deregistering it);
//! 4. on shutdown: report NOT_SERVING, announce the departure in etcd (the record rewritten with
//!    `draining: true`, so clients stop calling it on that event), revoke the lease (clients see the
//!    DELETE at once), keep serving for `--deregister-grace` while that propagates, then stop
//!    accepting and drain in-flight calls within `--drain-timeout`.
//!
//! Tests bind `127.0.0.1:0` themselves and call [`serve`] with the listener.
//!
//! # Layout
//! - [`Config`]: command-line flags (`main.rs` parses them and installs logging).
//! - [`greeter`]: the `SayHello` implementation that reports its own identity.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::Parser;
use cli::{EtcdArgs, GrpcTlsArgs, Layered, MetricsArgs, Sources, duration, pairs, parse_duration};
use proto::helloworld::greeter_server::GreeterServer;
use registry::serve::Lifecycle;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

pub mod greeter;

/// Settings of the `server` binary: flags, `SERVER_*`/`ETCD_*` environment variables, or the same
/// names in `server.toml` (see the `cli` crate for the layering).
#[derive(Debug, Clone, Parser, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[command(version, about = "A helloworld Greeter that registers itself in etcd.")]
pub struct Config {
    /// Host or IP to listen on.
    #[arg(long, env = "SERVER_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 picks a free port, registered as bound); required.
    #[arg(long, env = "SERVER_PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,

    /// Address clients should dial, host:port [default: HOST:PORT; required when listening on
    /// 0.0.0.0 or ::].
    #[arg(long, env = "SERVER_ADVERTISE_ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<String>,

    /// Instance id, the last segment of the etcd key [default: HOST-PORT of the advertised
    /// address].
    #[arg(long, env = "SERVER_INSTANCE_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,

    /// Relative capacity published as metadata, for weighted_round_robin clients; 0 drains the
    /// instance (registered, but sent nothing).
    #[arg(long, env = "SERVER_WEIGHT", default_value_t = 1)]
    pub weight: u32,

    /// Version of this deployment, published as the `version` metadata (clients can select on
    /// it, e.g. --select version=v2).
    #[arg(long, env = "SERVER_SERVICE_VERSION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_version: Option<String>,

    /// Zone published as metadata (clients can prefer their own, e.g. --prefer zone=a).
    #[arg(long, env = "SERVER_ZONE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,

    /// More metadata, as key=value; repeatable.
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = cli::parse_pair)]
    #[serde(with = "pairs")]
    pub meta: Vec<(String, String)>,

    /// Lease TTL: how long the key outlives a crashed server (at least 2s).
    #[arg(long, env = "REGISTRY_TTL", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub ttl: Duration,

    /// After revoking the lease on shutdown, keep serving this long so clients can act on the
    /// DELETE before the listener closes.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub deregister_grace: Duration,

    /// On shutdown, announce the departure in etcd (the record rewritten with `draining: true`)
    /// before revoking the lease, so clients stop calling at once rather than keep this
    /// instance in their removal grace until a health check says NOT_SERVING.
    #[arg(long, env = "SERVER_ANNOUNCE_DRAINING", default_value_t = true, action = clap::ArgAction::Set)]
    #[serde(default = "yes")]
    pub announce_draining: bool,

    /// Deadline for in-flight calls to finish on shutdown.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "duration")]
    pub drain_timeout: Duration,

    #[command(flatten)]
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub etcd: EtcdArgs,

    /// TLS for the gRPC port: --tls-cert and --tls-key serve TLS; --tls-ca also requires client
    /// certificates signed by that CA (mutual TLS).
    #[command(flatten)]
    #[serde(flatten)]
    pub tls: GrpcTlsArgs,

    #[command(flatten)]
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub metrics: MetricsArgs,
}

impl Layered for Config {
    fn validate(&self, sources: &Sources) -> cli::Result<()> {
        self.check(sources)
    }
}

impl Config {
    /// Checks what clap cannot: a usable advertised address and instance id, and the TTL. Errors
    /// name the flags; the binary checks the same things while loading, naming the environment
    /// variable or the config file a value came from.
    ///
    /// # Errors
    /// A message naming the flag to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        Ok(self.check(&Sources::flags())?)
    }

    fn check(&self, sources: &Sources) -> cli::Result<()> {
        let Some(port) = self.port else {
            return Err(cli::Error::invalid(
                "--port",
                "no port: pass --port PORT (or set SERVER_PORT, or port in the config file)",
            ));
        };
        if self.tls.tls_ca.is_some() && self.tls.tls_cert.is_none() {
            return Err(sources.invalid(
                "tls-ca",
                "requires client certificates, which needs TLS: also pass --tls-cert and --tls-key",
            ));
        }
        if self.ttl < registry::MIN_TTL {
            return Err(sources.invalid(
                "ttl",
                format!(
                    "{:?} is too short: etcd grants leases of at least 2s",
                    self.ttl
                ),
            ));
        }
        if self.advertise_addr.is_none() && is_unspecified(&self.host) {
            return Err(sources.invalid(
                "host",
                format!(
                    "{} listens on every interface, so there is no single address to register: \
                     pass --advertise-addr host:port (the address clients should dial)",
                    self.host
                ),
            ));
        }
        // A host that does not resolve would fail at bind time, blamed on the port.
        if let Err(e) = std::net::ToSocketAddrs::to_socket_addrs(&(self.host.as_str(), port)) {
            return Err(sources.invalid(
                "host",
                format!(
                    "{:?} is not an IP address or a host name that resolves: {e}",
                    self.host
                ),
            ));
        }
        if let Some(addr) = &self.advertise_addr {
            if !registry::endpoint::is_dialable(addr) {
                return Err(sources.invalid(
                    "advertise-addr",
                    format!("{addr:?} is not a dialable host:port"),
                ));
            }
        }
        if let Some(id) = &self.instance_id {
            registry::key::instance_key(&self.etcd.namespace, &self.etcd.service, id)
                .map_err(|e| sources.invalid("instance-id", e.to_string()))?;
        }
        self.etcd.validate(sources)?;
        self.tls.validate()?;
        Ok(())
    }

    /// The advertised address once the listener is bound (`local` carries the real port).
    fn advertised(&self, local: SocketAddr) -> String {
        match &self.advertise_addr {
            Some(addr) => addr.clone(),
            None if self.host.contains(':') => format!("[{}]:{}", self.host, local.port()),
            None => format!("{}:{}", self.host, local.port()),
        }
    }
}

fn yes() -> bool {
    true
}

fn is_unspecified(host: &str) -> bool {
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
}

/// The default instance id for an advertised address: `127.0.0.1:50051` becomes `127.0.0.1-50051`.
pub fn default_instance_id(advertised: &str) -> String {
    // Keep what is safe in a key segment; collapse every run of anything else into one '-'.
    let mut id = String::with_capacity(advertised.len());
    for c in advertised.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            id.push(c);
        } else if !id.is_empty() && !id.ends_with('-') {
            id.push('-');
        }
    }
    id.trim_end_matches('-').to_owned()
}

/// Binds the address from the configuration and serves on it until `shutdown` fires (see
/// [`serve`]).
///
/// # Errors
/// When the port cannot be bound, or as [`serve`].
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Bad settings are reported before the port is taken.
    config.validate()?;
    let bind = format!(
        "{}:{}",
        bracket(&config.host),
        config.port.unwrap_or_default()
    );
    let listener = TcpListener::bind(&bind)
        .await
        .with_context(|| format!("cannot listen on {bind}; is another process using the port?"))?;
    serve(config, listener, shutdown).await
}

/// Serves the Greeter, health and reflection on `listener` (already bound; `--host` and `--port`
/// are not used to bind) until `shutdown` fires, registered in etcd meanwhile, then deregisters
/// and drains: [`registry::serve::Lifecycle`] with this binary's flags. The advertised address and
/// the default instance id take the listener's port.
///
/// # Errors
/// Invalid settings, etcd not reached within `--etcd-timeout`, or serving failed.
pub async fn serve(
    mut config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let local = listener.local_addr().context("reading the bound address")?;
    // The listener decides the port; validation still wants one to check the host with.
    config.port = Some(local.port());
    config.validate()?;
    let registry_config = config
        .etcd
        .registry_config(config.ttl)
        .context("etcd settings")?;
    let tls = config.tls.load().context("TLS settings")?;
    config.metrics.install()?;
    let addr = config.advertised(local);
    let instance_id = config
        .instance_id
        .clone()
        .unwrap_or_else(|| default_instance_id(&addr));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")?;
    let greeter = greeter::Greeter::new(instance_id.clone(), addr.clone());
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        builder = builder
            .tls_config(tls.server_config()?)
            .context("configuring TLS on the gRPC port")?;
    }
    let router = builder
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(GreeterServer::new(greeter));
    let mode = match &tls {
        None => "plaintext",
        Some(tls) if tls.files().ca.is_some() => "mutual TLS",
        Some(_) => "TLS",
    };
    info!(listen = %local, %addr, id = %instance_id, mode, "starting");

    let etcd = registry_config.connect().await?;
    let mut registration = registry_config
        .registration(&config.etcd.service, &instance_id, &addr)
        .metadata("weight", config.weight);
    for (key, value) in [("version", &config.service_version), ("zone", &config.zone)] {
        if let Some(value) = value {
            registration = registration.metadata(key, value.as_str());
        }
    }
    for (key, value) in &config.meta {
        registration = registration.metadata(key.as_str(), value.as_str());
    }
    let lifecycle = Lifecycle::new(&etcd, registration)
        .health_of(GreeterServer::<greeter::Greeter>::NAME)
        .register_timeout(config.etcd.etcd_timeout)
        .announce_draining(config.announce_draining)
        .deregister_grace(config.deregister_grace)
        .drain_timeout(config.drain_timeout);
    let switch = toggle_health_on_sigusr1(lifecycle.reporter());
    lifecycle
        .while_serving(switch)
        .serve(router, listener, shutdown)
        .await?;
    Ok(())
}

/// Reports the whole server and the Greeter as SERVING or NOT_SERVING.
async fn set_serving(health: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health
        .set_service_status(GreeterServer::<greeter::Greeter>::NAME, status)
        .await;
    health.set_service_status("", status).await;
}

/// The operator's switch: each SIGUSR1 flips the reported health between SERVING and NOT_SERVING,
/// so clients stop and resume calling this instance without it leaving etcd
/// (`kill -USR1 <pid>`). Runs while the instance is registered; returns only if the signal cannot
/// be listened for.
async fn toggle_health_on_sigusr1(health: HealthReporter) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut usr1 = match signal(SignalKind::user_defined1()) {
        Ok(usr1) => usr1,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGUSR1; the health switch is off");
            return;
        }
    };
    let mut serving = true;
    while usr1.recv().await.is_some() {
        serving = !serving;
        set_serving(&health, serving).await;
        info!(serving, "SIGUSR1: health switched");
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn instance_ids_derive_from_the_address() {
        assert_eq!(default_instance_id("127.0.0.1:50051"), "127.0.0.1-50051");
        assert_eq!(default_instance_id("[::1]:50051"), "1-50051");
        assert_eq!(
            default_instance_id("node-a.example:443"),
            "node-a.example-443"
        );
    }

    #[test]
    fn validation_names_the_flag() {
        let parse = |args: &[&str]| Config::try_parse_from([&["server"], args].concat());
        assert!(
            parse(&[])
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
                .contains("--port")
        );
        let wildcard = parse(&["--port", "1", "--host", "0.0.0.0"]).unwrap();
        assert!(
            wildcard
                .validate()
                .unwrap_err()
                .to_string()
                .contains("--advertise-addr")
        );
        let short = parse(&["--port", "1", "--ttl", "1s"]).unwrap();
        assert!(short.validate().unwrap_err().to_string().contains("--ttl"));
        assert!(parse(&["--port", "70000"]).is_err());
        assert!(parse(&["--port", "1", "--etcd-endpoints", "nope"]).is_err());
        assert!(parse(&["--port", "1"]).unwrap().validate().is_ok());
    }
}
