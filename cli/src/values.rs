//! Values written as text on the command line and in config files: durations (`500ms`, `2s`, bare
//! seconds), `KEY=VALUE` pairs and anything with `Display`/`FromStr`, with the serde helpers that
//! read and write them the same way in every file format.

use std::time::Duration;

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

    /// Reads `"10s"`, `"1m 30s"`, `10` or `0.5`.
    ///
    /// # Errors
    /// A message saying what forms are accepted.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Seconds(u64),
            Decimal(f64),
            Text(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Seconds(seconds) => Ok(Duration::from_secs(seconds)),
            Written::Decimal(seconds) => Duration::try_from_secs_f64(seconds)
                .map_err(|_| D::Error::custom(format!("{seconds} seconds is out of range"))),
            Written::Text(text) => super::parse_duration(&text).map_err(D::Error::custom),
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
                .map(|pair| super::parse_pair(pair).map_err(D::Error::custom))
                .collect(),
        }
    }
}

/// Serde for lists that the command line and the environment write comma-separated
/// (`ETCD_ENDPOINTS=a:1,b:2`): a file may use an array or the same comma-separated string.
pub mod list {
    use serde::{Deserialize, Deserializer};

    /// Reads `["a", "b"]` or `"a,b"`.
    ///
    /// # Errors
    /// Anything but a string or a list of strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum List {
            Items(Vec<String>),
            Text(String),
        }
        Ok(match List::deserialize(deserializer)? {
            List::Items(items) => items,
            List::Text(text) => text
                .split(',')
                .map(|item| item.trim().to_owned())
                .filter(|item| !item.is_empty())
                .collect(),
        })
    }
}

/// Parses `500ms`, `2s`, `1m 30s`, or a bare number of seconds, whole or decimal (`10`, `0.5`).
///
/// # Errors
/// A message saying what forms are accepted.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    if text.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        if let Ok(seconds) = text.parse::<f64>() {
            return Duration::try_from_secs_f64(seconds)
                .map_err(|_| format!("{text} seconds is out of range"));
        }
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}; use a number with a unit such as 500ms, 2s or 1m"))
}

/// [`parse_duration`], refusing zero: for a period or a deadline, where zero cannot mean anything.
///
/// # Errors
/// As [`parse_duration`], and for zero.
pub fn parse_nonzero_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err("must be more than zero".to_owned()),
        duration => Ok(duration),
    }
}

/// Parses `key=value` (for command-line flags).
///
/// # Errors
/// A message when there is no `=` or the key is empty.
pub fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("{text:?} is not key=value")),
    }
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

    #[test]
    fn bare_decimal_seconds_are_seconds() {
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.25"), Ok(Duration::from_millis(1250)));
        assert_eq!(parse_duration(".5"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("1e400").is_err());
    }

    #[test]
    fn lists_are_arrays_or_comma_separated() {
        #[derive(serde::Deserialize)]
        struct Endpoints(#[serde(deserialize_with = "list::deserialize")] Vec<String>);
        let read = |json: &str| serde_json::from_str::<Endpoints>(json).map(|e| e.0);
        assert_eq!(read(r#"["a:1", "b:2"]"#).unwrap(), ["a:1", "b:2"]);
        assert_eq!(read(r#""a:1, b:2,""#).unwrap(), ["a:1", "b:2"]);
        assert!(read("5").is_err());
    }

    #[test]
    fn zero_is_refused_where_it_means_nothing() {
        assert_eq!(
            parse_nonzero_duration("0.5"),
            Ok(Duration::from_millis(500))
        );
        assert!(
            parse_nonzero_duration("0s")
                .unwrap_err()
                .contains("more than zero")
        );
        assert!(parse_nonzero_duration("0").is_err());
    }

    #[test]
    fn pairs_parse() {
        assert_eq!(parse_pair("zone=eu-1"), Ok(("zone".into(), "eu-1".into())));
        assert_eq!(parse_pair("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_pair("novalue").is_err());
        assert!(parse_pair("=x").is_err());
    }
}
