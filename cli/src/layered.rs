//! Layered configuration: one model, four sources.
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
//! with kebab-case names; [`load`] does the rest.

use std::path::{Path, PathBuf};

use clap::{Args as _, FromArgMatches, parser::ValueSource};
use figment::{
    Figment, Metadata, Profile, Provider,
    providers::{Format as _, Json, Toml, Yaml},
    value::{Dict, Map},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};

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
/// [`Error::Config`] naming the file, key and expected type; [`Error::Invalid`] for an
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
/// As [`load`], plus clap's parse error as [`Error::Invalid`].
pub fn load_args<T: Layered>(binary: &str, args: &[&str], dir: &Path) -> Result<Loaded<T>> {
    let command = ConfigArgs::augment_args(T::command());
    let matches = command
        .clone()
        .try_get_matches_from(std::iter::once(binary).chain(args.iter().copied()))
        .map_err(|e| Error::Invalid {
            setting: "command line".into(),
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
    let config_args = ConfigArgs::from_arg_matches(matches).map_err(|e| Error::Invalid {
        setting: "config".into(),
        reason: e.to_string(),
    })?;
    let parsed = T::from_arg_matches(matches).map_err(|e| Error::Invalid {
        setting: "command line".into(),
        reason: e.to_string(),
    })?;
    let settings = settings_of(command);

    // Split what clap resolved into the layer each value came from.
    let resolved = serde_json::to_value(&parsed).map_err(|e| Error::Invalid {
        setting: "command line".into(),
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
        many => Err(Error::Invalid {
            setting: "config".into(),
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
        return Err(Error::Invalid {
            setting: "config".into(),
            reason: format!("{} does not exist or is not a file", path.display()),
        });
    }
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    Ok(match extension {
        "toml" => Figment::from(Toml::file_exact(path)),
        "yaml" | "yml" => Figment::from(Yaml::file_exact(path)),
        "json" => Figment::from(Json::file_exact(path)),
        _ => {
            return Err(Error::Invalid {
                setting: "config".into(),
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
    let data = file.data().map_err(|e| Error::Invalid {
        setting: "config".into(),
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
                return Err(Error::Invalid {
                    setting: "config".into(),
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
