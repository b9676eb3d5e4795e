//! The cli crate's one error type: what can go wrong between the command line, the environment, a
//! config file and a validated [`registry::RegistryConfig`].
//!
//! These errors name flags, environment variables and config-file keys; the registry's own
//! [`registry::Error`] never does, because library users configure it in code.

use std::net::SocketAddr;

/// Errors of the configuration layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layered configuration (defaults, file, environment, flags) cannot be read: a value of the
    /// wrong type, say. The message names the key and the file or variable it came from.
    #[error("configuration: {0}")]
    Config(#[from] Box<figment::Error>),

    /// A setting is out of range or inconsistent with another, or a config file cannot be used.
    #[error("invalid setting {setting}: {reason}")]
    Invalid {
        /// The setting as the user wrote it: `--flag`, `VARIABLE` or `key in file.toml`.
        setting: String,
        /// What is wrong and what to do.
        reason: String,
    },

    /// The Prometheus exporter could not be started.
    #[error("cannot serve metrics on {addr}; is the address in use?")]
    Metrics {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: metrics_exporter_prometheus::BuildError,
    },

    /// etcd answered in a way that waiting will not change (see [`crate::preflight`]).
    #[error("etcd at {endpoints} cannot be used: {reason}")]
    Unusable {
        /// The endpoints tried.
        endpoints: String,
        /// What is wrong and what to do.
        reason: String,
    },

    /// The settings do not make a valid registry configuration (an endpoint, a TLS file...).
    #[error(transparent)]
    Registry(#[from] registry::Error),
}

impl Error {
    /// An [`Error::Invalid`] about `setting`.
    pub fn invalid(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

/// The settings to look at for a registry error that names none (the library knows no flags): for
/// refused credentials, where the binaries take them from.
pub fn settings_to_check(error: &registry::Error) -> Option<&'static str> {
    match error {
        registry::Error::Unauthenticated { .. } => Some(
            "etcd credentials (--etcd-username, and --etcd-password, ETCD_PASSWORD or \
             --etcd-password-file)",
        ),
        _ => None,
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
