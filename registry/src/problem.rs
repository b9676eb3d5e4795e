//! What a retry loop tells its log: a problem is warned about when it first appears or changes, its
//! repeats go to `debug`, and the loop may say once that it recovered. Every loop in the crate uses
//! this one rule.
//!
//! Two failures are the same problem when they agree on what failed and on the kind of its first
//! cause: for an etcd request, the gRPC status code or that the transport failed ("etcd put of ...
//! failed: status PermissionDenied", "...: transport error"); for other errors, the first cause's
//! message. The rest (the status message, which member refused this time, the socket error of this
//! attempt) varies from one retry to the next and is not news.

use crate::error::chain;

/// How many levels of an error's chain decide whether it is a new problem.
const SUMMARY_LEVELS: usize = 2;

/// The problem a retry loop is in, if any.
#[derive(Debug, Clone, Default)]
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
    pub(crate) fn error(
        &mut self,
        what: &str,
        error: &(dyn std::error::Error + 'static),
    ) -> Option<&str> {
        self.record(
            format!("{what}: {}", summary(error)),
            format!("{what}: {}", chain(error)),
        )
    }

    /// [`Problem::error`] for an error that says itself what failed.
    pub(crate) fn of(&mut self, error: &(dyn std::error::Error + 'static)) -> Option<&str> {
        self.record(summary(error), chain(error))
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

/// What tells one problem from another (see the module docs).
fn summary(error: &(dyn std::error::Error + 'static)) -> String {
    // etcd-client's errors have no sources: the whole story, member address included, is in one
    // message, so only its kind counts.
    if let Some(crate::Error::Etcd { source, .. }) = error.downcast_ref::<crate::Error>() {
        let kind = match source {
            etcd_client::Error::GRpcStatus(status) => format!("status {:?}", status.code()),
            other => {
                let text = other.to_string();
                text.split(':').next().unwrap_or_default().to_owned()
            }
        };
        return format!("{error}: {kind}");
    }
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
    fn the_summary_is_what_failed_and_the_first_cause() {
        let e = error(&["a", "b", "c"]);
        assert_eq!(summary(&e), "a: b");
        assert_eq!(chain(&e), "a: b: c");
    }

    fn etcd(status: tonic::Status) -> crate::Error {
        crate::Error::Etcd {
            op: "get",
            key: "services/x/".into(),
            endpoints: "http://127.0.0.1:2379".into(),
            source: etcd_client::Error::GRpcStatus(status),
        }
    }

    #[test]
    fn an_etcd_error_counts_by_its_status_code_not_its_message() {
        let mut problem = Problem::default();
        let refused = |member: &str| etcd(tonic::Status::unavailable(format!("{member} refused")));
        assert!(problem.of(&refused("10.0.0.1:2379")).is_some());
        assert_eq!(problem.of(&refused("10.0.0.2:2379")), None);
        assert!(problem.current().unwrap().contains("10.0.0.2:2379"));
        let denied = etcd(tonic::Status::permission_denied(
            "etcdserver: permission denied",
        ));
        assert!(problem.of(&denied).is_some());
    }
}
