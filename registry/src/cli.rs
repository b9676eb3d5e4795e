//! Configuration of binaries built on the registry (feature `cli`): one model, layered.
//!
//! Every setting has one name, used everywhere: the flag `--etcd-username`, the environment variable
//! `ETCD_USERNAME` and the config-file key `etcd-username`. Sources are merged in this order, later
//! ones winning: built-in defaults < config file < environment < command-line flags. The config file
//! is TOML, YAML or JSON (chosen by extension), given with `--config PATH` or found in the working
//! directory as `<binary>.toml` (or `.yaml`, `.yml`, `.json`). `--print-config` prints the result
//! with the source of every value, secrets redacted.
//!
//! The merge is figment's: clap parses flags and environment (so both are validated and documented
//! in `--help`), each value is put in the layer clap says it came from, and the file slots in
//! between. A binary's flag struct derives `clap::Parser` and serde's `Serialize`/`Deserialize`
//! with kebab-case names; [`load`] does the rest. Flatten [`EtcdArgs`] into it for the etcd settings.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args as _, FromArgMatches, parser::ValueSource};
use figment::{
    Figment, Metadata, Profile, Provider,
    providers::{Format as _, Json, Toml, Yaml},
    value::{Dict, Map},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    config::{Credentials, RegistryConfig, Secret},
    error::{Error, Result},
    etcd::parse_endpoint,
    key,
    tls::TlsFiles,
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
    #[serde(with = "duration")]
    pub etcd_timeout: Duration,

    /// etcd username, for a cluster with auth enabled.
    #[arg(long, env = "ETCD_USERNAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_username: Option<String>,

    /// etcd password. Prefer ETCD_PASSWORD or --etcd-password-file: a flag is visible in `ps`.
    #[arg(long, env = "ETCD_PASSWORD", hide_env_values = true, value_parser = parse_secret, conflicts_with = "etcd_password_file")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_password: Option<Secret>,

    /// File holding the etcd password (one trailing newline is ignored).
    #[arg(long, env = "ETCD_PASSWORD_FILE", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_password_file: Option<PathBuf>,

    /// CA certificate (PEM) to trust for etcd's TLS; turns TLS to etcd on.
    #[arg(long, env = "ETCD_CA", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) to present to etcd (with --etcd-key).
    #[arg(long, env = "ETCD_CERT", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_cert: Option<PathBuf>,

    /// Private key (PEM) of --etcd-cert.
    #[arg(long, env = "ETCD_KEY", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_key: Option<PathBuf>,
}

/// Where to expose Prometheus metrics, if anywhere.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464) at any path; off unless set.
    #[arg(long, env = "METRICS_ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
}

/// TLS for gRPC calls between the client and the servers (both binaries flatten this).
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GrpcTlsArgs {
    /// Certificate (PEM): the server's own, or the client's for mutual TLS.
    #[arg(long, env = "TLS_CERT", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "TLS_KEY", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM): on a client, the CA that signed the servers' certificates (turns TLS on); on a
    /// server, requires clients to present a certificate signed by it (mutual TLS).
    #[arg(long, env = "TLS_CA", value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
}

impl GrpcTlsArgs {
    /// The files, loaded; `None` when none is set.
    ///
    /// # Errors
    /// As [`TlsFiles::load`].
    pub fn load(&self) -> Result<Option<crate::tls::Tls>> {
        let files = TlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        };
        (!files.is_empty()).then(|| files.load()).transpose()
    }
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
    /// The registry configuration these settings describe, with lease TTL `ttl` (a client, which
    /// registers nothing, passes the default).
    ///
    /// # Errors
    /// As [`crate::config::RegistryConfigBuilder::build`], plus [`Error::InvalidConfig`] for a
    /// username without a password or the other way round, or an unreadable password file.
    pub fn registry_config(&self, ttl: Duration) -> Result<RegistryConfig> {
        let mut builder = RegistryConfig::builder()
            .endpoints(&self.etcd_endpoints)
            .namespace(&self.namespace)
            .ttl(ttl)
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
                return Err(Error::InvalidConfig {
                    setting: "etcd-password",
                    reason: "both etcd-password and etcd-password-file are set; keep one".into(),
                });
            }
            (Some(_), None, None) => {
                return Err(Error::InvalidConfig {
                    setting: "etcd-username",
                    reason: "is set without a password: set etcd-password (ETCD_PASSWORD) or \
                             etcd-password-file"
                        .into(),
                });
            }
            (None, _, _) => {
                return Err(Error::InvalidConfig {
                    setting: "etcd-username",
                    reason: "a password is set but no username: set etcd-username".into(),
                });
            }
        };
        if let Some(credentials) = credentials {
            builder = builder.auth(credentials);
        }
        builder.build()
    }
}

/// `--config` and `--print-config`, added to every binary's flags by [`load`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// Configuration file: TOML, YAML or JSON by extension, keys named like the flags
    /// (etcd-endpoints = [...]) [default: ./BINARY.toml (or .yaml, .yml, .json) if present].
    #[arg(long, env = "REGISTRY_CONFIG", value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,

    /// Print the effective configuration with the source of each value (secrets redacted), and
    /// exit.
    #[arg(long, global = true)]
    pub print_config: bool,
}

/// Settings loaded from every layer, and where each came from.
#[derive(Debug)]
pub struct Loaded<T> {
    /// The merged settings.
    pub value: T,
    /// The config file used, if any.
    pub file: Option<PathBuf>,
    /// Whether `--print-config` was given.
    pub print_config: bool,
    report: String,
}

impl<T> Loaded<T> {
    /// The effective configuration, one `key = value  # source` line per setting, secrets
    /// redacted: what `--print-config` prints. It is valid TOML.
    pub fn report(&self) -> &str {
        &self.report
    }
}

/// Settings types [`load`] can fill: a clap parser whose serde names are the flags' long names.
pub trait Layered: clap::Parser + Serialize + DeserializeOwned {
    /// Copies what only the command line sets (a subcommand, skipped by serde) from `parsed`.
    fn keep_command_line_only(&mut self, parsed: Self) {
        let _ = parsed;
    }
}

/// Parses the process's arguments and merges all layers: defaults < config file < environment <
/// flags. `binary` names the conventional config file (`<binary>.toml` etc. in the working
/// directory). Exits like clap on a bad flag or `--help`.
///
/// # Errors
/// [`Error::Config`] naming the file, key and expected type; [`Error::InvalidConfig`] for an
/// unknown key in the file or two conventional files.
pub fn load<T: Layered>(binary: &str) -> Result<Loaded<T>> {
    let command = ConfigArgs::augment_args(T::command());
    let matches = command.clone().get_matches();
    load_from(binary, &command, &matches, Path::new("."))
}

/// What a binary's `main` does with [`load`]: on an error, print it like a bad flag and exit 2; on
/// `--print-config`, print the report and return `None` (the binary exits 0); else the settings.
pub fn load_or_exit<T: Layered>(binary: &str) -> Option<T> {
    match load::<T>(binary) {
        Ok(loaded) if loaded.print_config => {
            print!("{}", loaded.report());
            None
        }
        Ok(loaded) => Some(loaded.value),
        Err(e) => T::command()
            .error(clap::error::ErrorKind::ValueValidation, format!("{e:#}"))
            .exit(),
    }
}

/// [`load`] with explicit arguments and working directory, for tests.
///
/// # Errors
/// As [`load`], plus clap's parse error as [`Error::InvalidConfig`].
pub fn load_args<T: Layered>(binary: &str, args: &[&str], dir: &Path) -> Result<Loaded<T>> {
    let command = ConfigArgs::augment_args(T::command());
    let matches = command
        .clone()
        .try_get_matches_from(std::iter::once(binary).chain(args.iter().copied()))
        .map_err(|e| Error::InvalidConfig {
            setting: "command line",
            reason: e.to_string(),
        })?;
    load_from(binary, &command, &matches, dir)
}

fn load_from<T: Layered>(
    binary: &str,
    command: &clap::Command,
    matches: &clap::ArgMatches,
    dir: &Path,
) -> Result<Loaded<T>> {
    let config_args = ConfigArgs::from_arg_matches(matches).map_err(|e| Error::InvalidConfig {
        setting: "config",
        reason: e.to_string(),
    })?;
    let parsed = T::from_arg_matches(matches).map_err(|e| Error::InvalidConfig {
        setting: "command line",
        reason: e.to_string(),
    })?;
    let settings = settings_of(command);

    // Split what clap resolved into the layer each value came from.
    let resolved = serde_json::to_value(&parsed).map_err(|e| Error::InvalidConfig {
        setting: "command line",
        reason: e.to_string(),
    })?;
    let mut layers: [Dict; 3] = Default::default();
    if let serde_json::Value::Object(values) = resolved {
        for (key, value) in values {
            if value.is_null() {
                continue;
            }
            let layer = match matches.value_source(&key.replace('-', "_")) {
                Some(ValueSource::CommandLine) => 2,
                Some(ValueSource::EnvVariable) => 1,
                _ => 0,
            };
            let value = figment::value::Value::serialize(&value).map_err(boxed)?;
            layers[layer].insert(key, value);
        }
    }
    let [defaults, environment, flags] = layers;

    let file = match config_args.config {
        Some(path) => Some(path),
        None => conventional_file(binary, dir)?,
    };
    let mut figment = Figment::new().merge(Layer::new("default", defaults));
    if let Some(path) = &file {
        let provider = file_provider(path)?;
        check_keys(&provider, path, &settings)?;
        figment = figment.merge(provider);
    }
    let figment = figment
        .merge(Layer::new("environment", environment))
        .merge(Layer::new("command line", flags));
    let mut value: T = figment.extract().map_err(boxed)?;
    value.keep_command_line_only(parsed);
    let report = report(binary, &figment, &settings);
    Ok(Loaded {
        value,
        file,
        print_config: config_args.print_config,
        report,
    })
}

fn boxed(e: figment::Error) -> Error {
    Error::Config(Box::new(e))
}

/// One setting: its key (the long flag) and environment variable.
struct Setting {
    key: String,
    env: Option<String>,
}

/// The layered settings of a command: every long flag but `--config`, `--print-config`, help and
/// version, in `--help` order.
fn settings_of(command: &clap::Command) -> Vec<Setting> {
    command
        .get_arguments()
        .filter_map(|arg| {
            let key = arg.get_long()?;
            (!matches!(key, "config" | "print-config" | "help" | "version")).then(|| Setting {
                key: key.to_owned(),
                env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
            })
        })
        .collect()
}

/// `<binary>.toml`, `.yaml`, `.yml` or `.json` in `dir`, if exactly one exists.
fn conventional_file(binary: &str, dir: &Path) -> Result<Option<PathBuf>> {
    let found: Vec<PathBuf> = ["toml", "yaml", "yml", "json"]
        .iter()
        .map(|ext| dir.join(format!("{binary}.{ext}")))
        .filter(|path| path.is_file())
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        many => Err(Error::InvalidConfig {
            setting: "config",
            reason: format!(
                "found several config files ({}); remove all but one or pass --config PATH",
                many.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// The figment provider for a config file, by extension. The file must exist: a path given
/// explicitly that is not there is a mistake, not an empty configuration.
fn file_provider(path: &Path) -> Result<Figment> {
    if !path.is_file() {
        return Err(Error::InvalidConfig {
            setting: "config",
            reason: format!("{} does not exist or is not a file", path.display()),
        });
    }
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    Ok(match extension {
        "toml" => Figment::from(Toml::file_exact(path)),
        "yaml" | "yml" => Figment::from(Yaml::file_exact(path)),
        "json" => Figment::from(Json::file_exact(path)),
        _ => {
            return Err(Error::InvalidConfig {
                setting: "config",
                reason: format!(
                    "{}: unknown extension; use .toml, .yaml, .yml or .json",
                    path.display()
                ),
            });
        }
    })
}

/// A key in the file that no flag has is a typo (or a setting of another binary): say so rather
/// than ignore it.
fn check_keys(file: &Figment, path: &Path, settings: &[Setting]) -> Result<()> {
    let data = file.data().map_err(|e| Error::InvalidConfig {
        setting: "config",
        reason: format!("{}: {e}", path.display()),
    })?;
    for dict in data.values() {
        for key in dict.keys() {
            if !settings.iter().any(|s| &s.key == key) {
                let known = settings
                    .iter()
                    .map(|s| s.key.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Error::InvalidConfig {
                    setting: "config",
                    reason: format!(
                        "{}: unknown key {key:?}; known keys: {known}",
                        path.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// A layer of values clap resolved, named for `--print-config`.
struct Layer {
    name: &'static str,
    values: Dict,
}

impl Layer {
    fn new(name: &'static str, values: Dict) -> Self {
        Self { name, values }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

/// Keys whose values are never printed.
fn is_secret(key: &str) -> bool {
    key.contains("password") && !key.ends_with("-file")
}

/// The `--print-config` text: valid TOML, one line per setting, with its source as a comment.
fn report(binary: &str, figment: &Figment, settings: &[Setting]) -> String {
    let mut out = format!(
        "# Effective configuration of `{binary}`. Later sources win: default < file < environment < command line.\n"
    );
    let width = settings.iter().map(|s| s.key.len()).max().unwrap_or(0);
    for setting in settings {
        let key = &setting.key;
        let Ok(value) = figment.find_value(key) else {
            out.push_str(&format!("# {key:width$} (not set)\n"));
            continue;
        };
        let shown = if is_secret(key) {
            "\"<redacted>\"".to_owned()
        } else {
            toml_literal(&value)
        };
        let source = match figment.find_metadata(key) {
            Some(meta) if meta.name == "environment" => match &setting.env {
                Some(env) => format!("environment {env}"),
                None => "environment".to_owned(),
            },
            Some(meta) if meta.name == "command line" => format!("command line --{key}"),
            Some(meta) => match &meta.source {
                Some(figment::Source::File(path)) => format!("file {}", path.display()),
                _ => meta.name.to_string(),
            },
            None => "unknown".to_owned(),
        };
        out.push_str(&format!("{key:width$} = {shown}  # {source}\n"));
    }
    out
}

/// A value written as a TOML literal (inline tables and arrays), so the report is a valid file.
fn toml_literal(value: &figment::value::Value) -> String {
    use figment::value::Value;
    let quote = |text: &str| serde_json::to_string(text).unwrap_or_else(|_| format!("{text:?}"));
    match value {
        Value::String(_, text) => quote(text),
        Value::Char(_, c) => quote(&c.to_string()),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(..) => serde_json::to_string(value).unwrap_or_default(),
        Value::Empty(..) => "\"\"".to_owned(),
        Value::Array(_, items) => format!(
            "[{}]",
            items
                .iter()
                .map(toml_literal)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Dict(_, dict) => format!(
            "{{ {} }}",
            dict.iter()
                .map(|(k, v)| format!("{} = {}", quote(k), toml_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Serde for durations as human-readable strings (`"10s"`, `"500ms"`), or whole seconds.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Writes `10s`, `500ms`.
    ///
    /// # Errors
    /// Only the serializer's.
    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    /// Reads `"10s"`, `"1m 30s"` or `10`.
    ///
    /// # Errors
    /// A message saying what forms are accepted.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Seconds(u64),
            Text(String),
        }
        match Text::deserialize(deserializer)? {
            Text::Seconds(seconds) => Ok(Duration::from_secs(seconds)),
            Text::Text(text) => super::parse_duration(&text).map_err(D::Error::custom),
        }
    }

    /// The same for `Option<Duration>`.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes the duration, or nothing.
        ///
        /// # Errors
        /// Only the serializer's.
        pub fn serialize<S: Serializer>(
            value: &Option<Duration>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match value {
                Some(value) => super::serialize(value, serializer),
                None => serializer.serialize_none(),
            }
        }

        /// Reads a duration as [`super::deserialize`] does.
        ///
        /// # Errors
        /// As [`super::deserialize`].
        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Wrapped(#[serde(with = "super")] Duration);
            Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|Wrapped(d)| d))
        }
    }
}

/// Serde for values written as their `Display` form and read with `FromStr` (policies, formats).
pub mod text {
    use std::{fmt::Display, str::FromStr};

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Writes `value.to_string()`.
    ///
    /// # Errors
    /// Only the serializer's.
    pub fn serialize<T: Display, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    /// Reads a string and parses it.
    ///
    /// # Errors
    /// The type's parse error.
    pub fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        String::deserialize(deserializer)?
            .parse()
            .map_err(D::Error::custom)
    }
}

/// Serde for `KEY=VALUE` lists (`--meta`, `--select`): a table in files (`meta = { zone = "a" }`),
/// or a list of `"key=value"` strings.
pub mod pairs {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Writes a table.
    ///
    /// # Errors
    /// Only the serializer's.
    pub fn serialize<S: Serializer>(
        value: &[(String, String)],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_map(value.iter().map(|(k, v)| (k, v)))
    }

    /// Reads a table or a list of `key=value` strings.
    ///
    /// # Errors
    /// A list entry without `=`.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<(String, String)>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Pairs {
            Table(std::collections::BTreeMap<String, String>),
            List(Vec<String>),
        }
        match Pairs::deserialize(deserializer)? {
            Pairs::Table(table) => Ok(table.into_iter().collect()),
            Pairs::List(list) => list
                .iter()
                .map(|pair| crate::select::parse_pair(pair).map_err(D::Error::custom))
                .collect(),
        }
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
