//! What a retry loop tells its log: a problem is warned about when it first appears or changes, its
//! repeats go to `debug`, and the loop may say once that it recovered. Every loop in the crate uses
//! this one rule.
//!
//! Two failures are the same problem when they agree on what failed and on its first cause
//! ("etcd put of ... failed: transport error", "...: status: PermissionDenied"). Further down, the
//! chain names whichever member refused this time or the socket error of this attempt, which varies
//! from one retry to the next and is not news.

use crate::error::chain;

/// How many levels of an error's chain decide whether it is a new problem.
const SUMMARY_LEVELS: usize = 2;

/// The problem a retry loop is in, if any.
#[derive(Debug, Default)]
pub(crate) struct Problem {
    /// What decides whether the next failure is the same problem.
    summary: Option<String>,
    /// The problem in full, as last seen.
    detail: Option<String>,
}

impl Problem {
    /// Records that `what` failed with `error`. Returns the problem in full when it is new (the
    /// first, or one with another summary), for the caller to warn about; `None` for a repeat,
    /// which goes to `debug` if anywhere.
    pub(crate) fn error(&mut self, what: &str, error: &dyn std::error::Error) -> Option<&str> {
        self.record(
            format!("{what}: {}", summary(error)),
            format!("{what}: {}", chain(error)),
        )
    }

    /// Records a problem that is only text (nothing failed with an error: a reply never came).
    pub(crate) fn text(&mut self, problem: String) -> Option<&str> {
        self.record(problem.clone(), problem)
    }

    fn record(&mut self, summary: String, detail: String) -> Option<&str> {
        let new = self.summary.as_deref() != Some(summary.as_str());
        self.summary = Some(summary);
        self.detail = Some(detail);
        self.detail.as_deref().filter(|_| new)
    }

    /// The current problem in full: what failed and the whole chain of causes.
    pub(crate) fn current(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// Ends the problem. True if there was one, for a caller that logs the recovery.
    pub(crate) fn clear(&mut self) -> bool {
        self.summary = None;
        self.detail.take().is_some()
    }
}

/// The part of `error`'s chain that tells one problem from another; always a prefix of
/// [`chain`]`(error)`.
pub(crate) fn summary(error: &dyn std::error::Error) -> String {
    crate::error::chain_levels(error, SUMMARY_LEVELS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Layer(&'static str, #[source] Option<Box<Layer>>);

    fn error(levels: &[&'static str]) -> Layer {
        levels
            .iter()
            .rev()
            .fold(None, |source, msg| Some(Layer(msg, source.map(Box::new))))
            .expect("at least one level")
    }

    #[test]
    fn a_repeat_differing_only_deep_in_the_chain_is_not_new() {
        let mut problem = Problem::default();
        let refused = |by| error(&["etcd put failed", "transport error", by]);
        assert!(problem.error("put", &refused("refused by :1")).is_some());
        assert_eq!(problem.error("put", &refused("refused by :2")), None);
        assert_eq!(
            problem.current(),
            Some("put: etcd put failed: transport error: refused by :2")
        );
        let denied = error(&["etcd put failed", "permission denied"]);
        assert!(problem.error("put", &denied).is_some());
        assert!(problem.error("get", &denied).is_some());
    }

    #[test]
    fn clearing_ends_the_problem_once() {
        let mut problem = Problem::default();
        assert!(!problem.clear());
        assert!(problem.text("no reply within 500ms".into()).is_some());
        assert_eq!(problem.text("no reply within 500ms".into()), None);
        assert!(problem.clear());
        assert!(!problem.clear());
        assert!(problem.text("no reply within 500ms".into()).is_some());
    }

    #[test]
    fn the_summary_is_a_prefix_of_the_chain() {
        let e = error(&["a", "b", "c"]);
        assert_eq!(summary(&e), "a: b");
        assert_eq!(chain(&e), "a: b: c");
    }
}
