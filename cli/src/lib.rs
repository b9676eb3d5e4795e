//! The command-line and config-file layer of the `server` and `client` binaries.
//!
//! The `registry` library is configured in code ([`registry::RegistryConfig::builder`]); this crate
//! is what turns flags, environment variables and a config file into that configuration, so the
//! library itself pulls in no argument parser, no config-file reader and no metrics exporter. Every
//! setting has one name everywhere: `--etcd-username`, `ETCD_USERNAME`, `etcd-username` in a file.
//!
//! # Layout
//! - [`args`]: the flags both binaries flatten into theirs: etcd ([`EtcdArgs`]), gRPC TLS
//!   ([`GrpcTlsArgs`]) and the Prometheus exporter ([`MetricsArgs`]).
//! - [`layered`]: [`load`], merging defaults < config file < environment < flags, and the
//!   `--print-config` report.
//! - [`logging`]: `tracing` to stderr, through a writer that a closed or unread stderr can
//!   neither break nor stall.
//! - [`preflight`]: one request to etcd at startup, failing fast on what waiting cannot fix.
//! - [`values`]: durations, `KEY=VALUE` pairs and other values written as text, with their serde
//!   helpers.
//! - [`error`]: the crate's [`Error`], which names flags, variables and file keys.
//!
//! # Example
//! ```no_run
//! use clap::Parser;
//! use serde::{Deserialize, Serialize};
//!
//! /// Says hello to etcd.
//! #[derive(Debug, Parser, Serialize, Deserialize)]
//! #[serde(rename_all = "kebab-case")]
//! struct Config {
//!     #[command(flatten)]
//!     #[serde(flatten)]
//!     etcd: cli::EtcdArgs,
//! }
//! impl cli::Layered for Config {}
//!
//! // `--help`, a bad flag or a bad file exit like clap; `--print-config` prints and returns None.
//! if let Some(config) = cli::load_or_exit::<Config>("hello") {
//!     let registry = config.etcd.registry_config(registry::DEFAULT_TTL)?;
//!     println!("{:?}", registry.etcd().endpoints());
//! }
//! # Ok::<(), cli::Error>(())
//! ```

pub mod args;
pub mod error;
pub mod layered;
pub mod logging;
pub mod preflight;
pub mod values;

pub use args::{DEMO_ENDPOINTS, EtcdArgs, GrpcTlsArgs, MetricsArgs};
pub use error::{Error, Result, settings_to_check};
pub use layered::{
    ConfigArgs, Layered, Loaded, Sources, command, exit_invalid, load, load_args, load_or_exit,
};
pub use values::{duration, pairs, parse_duration, parse_nonzero_duration, parse_pair, text};
