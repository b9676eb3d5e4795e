//! Choosing instances by their metadata: a canary that only calls `version=v2`, a client that prefers
//! its own `zone` and falls back to the others when none is there.
//!
//! Metadata is the `Metadata` object of each instance's record (see [`crate::endpoint`]); values are
//! compared as text, so `weight=2` matches both `"2"` and `2`.

use serde_json::Value;

/// Which instances a client may call, and which it prefers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// Every pair must match, or the instance is never called.
    pub require: Vec<(String, String)>,
    /// Instances matching every pair are called while there is at least one; the rest only when
    /// none matches.
    pub prefer: Vec<(String, String)>,
}

impl Selector {
    /// Adds a required `key=value`.
    pub fn require(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.require.push((key.into(), value.into()));
        self
    }

    /// Adds a preferred `key=value`.
    pub fn prefer(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.prefer.push((key.into(), value.into()));
        self
    }

    /// Whether `metadata` meets every requirement.
    pub fn admits(&self, metadata: &Value) -> bool {
        matches_all(metadata, &self.require)
    }

    /// Whether `metadata` matches every preference.
    pub fn prefers(&self, metadata: &Value) -> bool {
        matches_all(metadata, &self.prefer)
    }

    /// Narrows `items` (already admitted) to the preferred ones, if any is preferred.
    pub(crate) fn narrow<T>(&self, items: Vec<T>, metadata: impl Fn(&T) -> bool) -> Vec<T> {
        if self.prefer.is_empty() || !items.iter().any(&metadata) {
            return items;
        }
        items.into_iter().filter(|item| metadata(item)).collect()
    }
}

/// A metadata value as text: strings as they are, numbers and booleans printed.
pub(crate) fn text(metadata: &Value, key: &str) -> Option<String> {
    match metadata.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn matches_all(metadata: &Value, pairs: &[(String, String)]) -> bool {
    pairs
        .iter()
        .all(|(key, value)| text(metadata, key).as_deref() == Some(value.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requirements_filter_and_preferences_fall_back() {
        let selector = Selector::default()
            .require("version", "v2")
            .prefer("zone", "a");
        assert!(selector.admits(&json!({"version": "v2", "zone": "b"})));
        assert!(!selector.admits(&json!({"version": "v1"})));
        assert!(!selector.admits(&Value::Null));

        let metas = [
            json!({"zone": "a"}),
            json!({"zone": "b"}),
            json!({"zone": "a"}),
        ];
        let preferred = selector.narrow((0..3).collect(), |&i| selector.prefers(&metas[i]));
        assert_eq!(preferred, [0, 2]);
        let none_in_zone = [json!({"zone": "c"}), json!({"zone": "b"})];
        let fallback = selector.narrow((0..2).collect(), |&i| selector.prefers(&none_in_zone[i]));
        assert_eq!(fallback, [0, 1]);
    }

    #[test]
    fn values_compare_as_text() {
        let selector = Selector::default()
            .require("weight", "2")
            .require("canary", "true");
        assert!(selector.admits(&json!({"weight": 2, "canary": true})));
        assert!(selector.admits(&json!({"weight": "2", "canary": "true"})));
    }
}
