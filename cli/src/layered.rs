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

// `--config` and `--print-config`, added to every binary's flags by `load`. (A plain comment on
// purpose: clap would take a doc comment here for the binary's own description in `--help`.)
#[derive(Debug, Clone, Default, clap::Args)]
#[allow(missing_docs)]
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
    /// Where each setting came from.
    pub sources: Sources,
    report: String,
}

impl<T> Loaded<T> {
    /// The effective configuration, one `key = value  # source` line per setting, secrets
    /// redacted: what `--print-config` prints. It is valid TOML.
    pub fn report(&self) -> &str {
        &self.report
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// The command line, or the built-in default.
    Flag,
    /// This environment variable.
    Environment(String),
    /// This config file.
    File(PathBuf),
}

/// Where each setting came from, so an error names what the user wrote: `--ttl`, `REGISTRY_TTL`
/// or `ttl in ./server.toml`.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    origins: Vec<(String, Origin)>,
}

impl Sources {
    /// Every setting named as its flag: for settings parsed from the command line alone.
    pub fn flags() -> Self {
        Self::default()
    }

    /// How to name setting `key` (the long flag without dashes) in an error.
    pub fn name(&self, key: &str) -> String {
        match self.origins.iter().find(|(k, _)| k == key).map(|(_, o)| o) {
            None | Some(Origin::Flag) => format!("--{key}"),
            Some(Origin::Environment(var)) => var.clone(),
            Some(Origin::File(path)) => format!("{key} in {}", path.display()),
        }
    }

    /// An [`Error::Invalid`] about setting `key`, named by where it came from.
    pub fn invalid(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::invalid(self.name(key), reason)
    }
}

/// Settings types [`load`] can fill: a clap parser whose serde names are the flags' long names.
pub trait Layered: clap::Parser + Serialize + DeserializeOwned {
    /// Copies what only the command line sets (a subcommand, skipped by serde) from `parsed`.
    fn keep_command_line_only(&mut self, parsed: Self) {
        let _ = parsed;
    }

    /// Checks the merged settings, what clap cannot (values from a file skip clap's parsers, and
    /// some settings only make sense together); [`load`] calls it, `--print-config` included.
    ///
    /// # Errors
    /// The first problem, naming the setting through `sources`.
    fn validate(&self, sources: &Sources) -> Result<()> {
        let _ = sources;
        Ok(())
    }
}

/// Parses the process's arguments and merges all layers: defaults < config file < environment <
/// flags. `binary` names the conventional config file (`<binary>.toml` etc. in the working
/// directory). Exits like clap on a bad flag or `--help`; a bad environment value is reported
/// under the variable's name.
///
/// # Errors
/// [`Error::Config`] naming the file, key and expected type; [`Error::Invalid`] for an
/// unknown key in the file, two conventional files, or what [`Layered::validate`] refuses.
pub fn load<T: Layered>(binary: &str) -> Result<Loaded<T>> {
    let command = command::<T>(binary);
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let matches = match command.clone().try_get_matches_from(&args) {
        Ok(matches) => matches,
        Err(e) => blame_environment(&command, e, &args).exit(),
    };
    load_from(binary, &command, &matches, Path::new("."))
}

/// What a binary's `main` does with [`load`]: on an error, print it like a bad flag and exit 2; on
/// `--print-config`, print the report and return `None` (the binary exits 0); else the settings.
pub fn load_or_exit<T: Layered>(binary: &str) -> Option<T> {
    match load::<T>(binary) {
        Ok(loaded) if loaded.print_config => {
            use std::io::Write as _;
            // A reader that left early (`--print-config | head -1`) is no error.
            let _ = std::io::stdout().write_all(loaded.report().as_bytes());
            None
        }
        Ok(loaded) => Some(loaded.value),
        Err(e) => exit_invalid::<T>(binary, &e),
    }
}

/// Prints `error` like a bad flag and exits with clap's usage status, 2.
pub fn exit_invalid<T: clap::CommandFactory>(binary: &str, error: &dyn std::fmt::Display) -> ! {
    command::<T>(binary)
        .error(clap::error::ErrorKind::ValueValidation, error.to_string())
        .exit()
}

/// [`load`] with explicit arguments and working directory, for tests.
///
/// # Errors
/// As [`load`], plus clap's parse error as [`Error::Invalid`].
pub fn load_args<T: Layered>(binary: &str, args: &[&str], dir: &Path) -> Result<Loaded<T>> {
    let command = command::<T>(binary);
    let args: Vec<std::ffi::OsString> = std::iter::once(binary)
        .chain(args.iter().copied())
        .map(Into::into)
        .collect();
    let matches = command.clone().try_get_matches_from(&args).map_err(|e| {
        Error::invalid(
            "command line",
            blame_environment(&command, e, &args).to_string(),
        )
    })?;
    load_from(binary, &command, &matches, dir)
}

/// The binary's command with `--config` and `--print-config` added, its own description kept and
/// the conventional file named after it.
pub fn command<T: clap::CommandFactory>(binary: &str) -> clap::Command {
    let own = T::command();
    let (about, long_about) = (own.get_about().cloned(), own.get_long_about().cloned());
    let mut command = ConfigArgs::augment_args(own)
        .about(None::<&'static str>)
        .long_about(None::<&'static str>);
    if let Some(about) = about {
        command = command.about(about);
    }
    if let Some(long_about) = long_about {
        command = command.long_about(long_about);
    }
    command.mut_arg("config", |arg| {
            arg.help(format!(
                "Configuration file: TOML, YAML or JSON by extension, keys named like the flags \
                 (etcd-endpoints = [...]) [default: ./{binary}.toml (or .yaml, .yml, .json) if present]"
            ))
        })
}

/// clap names the flag when a value is bad or two settings conflict, even when the value came
/// from the flag's environment variable (`SERVER_PORT=abc` is reported as a bad `--port`): name
/// the variable instead.
fn blame_environment(
    command: &clap::Command,
    error: clap::Error,
    args: &[std::ffi::OsString],
) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        error.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue | ErrorKind::ArgumentConflict
    ) {
        return error;
    }
    let mut shown = Vec::new();
    for kind in [ContextKind::InvalidArg, ContextKind::PriorArg] {
        match error.get(kind) {
            Some(ContextValue::String(one)) => shown.push(one.clone()),
            Some(ContextValue::Strings(many)) => shown.extend(many.iter().cloned()),
            _ => {}
        }
    }
    let rendered = error.render().to_string();
    let rendered = rendered.strip_prefix("error: ").unwrap_or(&rendered);
    let mut text = rendered
        .split("\n\n")
        .next()
        .unwrap_or(rendered)
        .trim_end()
        .to_owned();
    let mut blamed = false;
    for shown in shown {
        if let Some((long, var)) = from_environment(command, &shown, args) {
            let blame = format!("environment variable {var} (--{long})");
            text = text
                .replace(&format!("the argument '{shown}'"), &blame)
                .replace(&format!("'{shown}'"), &blame);
            blamed = true;
        }
    }
    if !blamed {
        return error;
    }
    command.clone().error(error.kind(), text)
}

/// The long flag and environment variable of the argument clap shows as `shown` (`--port
/// <PORT>`), if its value came from the environment: the variable is set and the flag is not on
/// the command line.
fn from_environment(
    command: &clap::Command,
    shown: &str,
    args: &[std::ffi::OsString],
) -> Option<(String, String)> {
    let flag = shown.split(' ').next()?;
    let arg = command.get_arguments().find(|arg| {
        arg.get_long()
            .is_some_and(|long| flag == format!("--{long}"))
    })?;
    let (long, var) = (arg.get_long()?, arg.get_env()?);
    let on_command_line = args.iter().skip(1).any(|a| {
        let a = a.to_string_lossy();
        a == format!("--{long}") || a.starts_with(&format!("--{long}="))
    });
    (!on_command_line && std::env::var_os(var).is_some())
        .then(|| (long.to_owned(), var.to_string_lossy().into_owned()))
}

fn load_from<T: Layered>(
    binary: &str,
    command: &clap::Command,
    matches: &clap::ArgMatches,
    dir: &Path,
) -> Result<Loaded<T>> {
    let config_args = ConfigArgs::from_arg_matches(matches)
        .map_err(|e| Error::invalid("config", e.to_string()))?;
    let parsed =
        T::from_arg_matches(matches).map_err(|e| Error::invalid("command line", e.to_string()))?;
    let settings = settings_of(command);

    // Split what clap resolved into the layer each value came from.
    let resolved =
        serde_json::to_value(&parsed).map_err(|e| Error::invalid("command line", e.to_string()))?;
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
    let mut figment = Figment::new().merge(Layer::new("default", defaults.clone()));
    let mut file_values = Dict::new();
    if let Some(path) = &file {
        let provider = file_provider(path)?;
        file_values = check_keys(&provider, path, &settings)?;
        figment = figment.merge(provider);
    }
    let figment = figment
        .merge(Layer::new("environment", environment.clone()))
        .merge(Layer::new("command line", flags.clone()));
    let mut value: T = match figment.extract() {
        Ok(value) => value,
        // serde's `flatten` loses the key of a bad value: find it by trying the file's keys
        // one at a time on top of the other layers.
        Err(e) if e.path.is_empty() && file.is_some() => {
            let path = file.as_deref().unwrap_or(Path::new(""));
            for (key, value) in &file_values {
                let alone = Figment::new()
                    .merge(Layer::new("default", defaults.clone()))
                    .merge(Layer::new(
                        "file",
                        Dict::from([(key.clone(), value.clone())]),
                    ));
                if let Err(one) = alone.extract::<T>() {
                    return Err(Error::invalid(
                        format!("{key} in {}", path.display()),
                        one.kind.to_string(),
                    ));
                }
            }
            return Err(boxed(e));
        }
        Err(e) => return Err(boxed(e)),
    };
    value.keep_command_line_only(parsed);
    let sources = sources_of(&figment, &settings);
    value.validate(&sources)?;
    let report = report(binary, &figment, &settings);
    Ok(Loaded {
        value,
        file,
        print_config: config_args.print_config,
        sources,
        report,
    })
}

/// Where each setting's value came from, by figment's metadata.
fn sources_of(figment: &Figment, settings: &[Setting]) -> Sources {
    let origins = settings
        .iter()
        .filter_map(|setting| {
            let meta = figment.find_metadata(&setting.key)?;
            let origin = match (meta.name.as_ref(), &meta.source) {
                ("environment", _) => Origin::Environment(setting.env.clone()?),
                (_, Some(figment::Source::File(path))) => Origin::File(path.clone()),
                _ => Origin::Flag,
            };
            Some((setting.key.clone(), origin))
        })
        .collect();
    Sources { origins }
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
/// than ignore it. Returns the file's values.
fn check_keys(file: &Figment, path: &Path, settings: &[Setting]) -> Result<Dict> {
    let data = file.data().map_err(|e| Error::Invalid {
        setting: "config".into(),
        reason: format!("{}: {e}", path.display()),
    })?;
    let mut values = Dict::new();
    for dict in data.values() {
        for (key, value) in dict {
            values.insert(key.clone(), value.clone());
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
    Ok(values)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde::Deserialize;

    use super::*;
    use crate::{EtcdArgs, duration, parse_duration};

    /// Says hello.
    #[derive(Debug, clap::Parser, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    #[command(about = "Says hello.")]
    struct Hello {
        /// How often.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        #[serde(with = "duration")]
        every: Duration,

        #[command(flatten)]
        #[serde(flatten)]
        etcd: EtcdArgs,
    }

    impl Layered for Hello {
        fn validate(&self, sources: &Sources) -> Result<()> {
            if self.every.is_zero() {
                return Err(sources.invalid("every", "must be more than zero"));
            }
            self.etcd.validate(sources)
        }
    }

    fn load_in(dir: &Path, file: &str, args: &[&str]) -> Result<Loaded<Hello>> {
        std::fs::write(dir.join("hello.toml"), file).unwrap();
        load_args("hello", args, dir)
    }

    #[test]
    fn validation_names_the_source_of_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let from_file = load_in(dir.path(), "every = \"0s\"\n", &[]).unwrap_err();
        assert!(
            from_file.to_string().contains("every in ")
                && from_file.to_string().contains("hello.toml"),
            "{from_file}"
        );
        let from_flag = load_in(dir.path(), "", &["--every", "0s"]).unwrap_err();
        assert!(from_flag.to_string().contains("--every"), "{from_flag}");
        let loaded = load_in(dir.path(), "every = 0.5\n", &[]).unwrap();
        assert_eq!(loaded.value.every, Duration::from_millis(500));
        assert_eq!(
            loaded.sources.name("every"),
            format!("every in {}", dir.path().join("hello.toml").display())
        );
        assert_eq!(loaded.sources.name("service"), "--service");
    }

    #[test]
    fn a_bad_value_in_a_flattened_group_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_in(dir.path(), "etcd-timeout = [1]\n", &[]).unwrap_err();
        assert!(e.to_string().contains("etcd-timeout in "), "{e}");
        let e = load_in(dir.path(), "etcd-endpoints = [\"h:0\"]\n", &[]).unwrap_err();
        assert!(
            e.to_string().contains("etcd-endpoints in ") && e.to_string().contains("h:0"),
            "{e}"
        );
        let loaded = load_in(dir.path(), "etcd-endpoints = \"a:1, b:2\"\n", &[]).unwrap();
        assert_eq!(loaded.value.etcd.etcd_endpoints, ["a:1", "b:2"]);
    }

    #[test]
    fn the_command_keeps_its_description_and_names_its_file() {
        let mut command = command::<Hello>("hello");
        let help = command.render_help().to_string();
        assert!(help.starts_with("Says hello."), "{help}");
        assert!(help.contains("./hello.toml"), "{help}");
        command.debug_assert();
    }
}
