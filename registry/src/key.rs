//! Where instances live in etcd: `<namespace>/<service>/<instance-id>`.
//!
//! This is the layout of etcd's Go naming package (`go.etcd.io/etcd/client/v3/naming/endpoints`):
//! a Go client dialing `etcd:///services/helloworld` lists and watches the prefix
//! `services/helloworld/`, so with the default namespace `services` Go clients find our servers
//! and we find theirs. There is no leading slash, and we always watch the prefix *with* its trailing
//! slash: a bare `services/helloworld` would also match `services/helloworld-canary/...`.

use crate::error::{Error, Result};

/// The namespace used when none is configured.
pub const DEFAULT_NAMESPACE: &str = "services";

/// The etcd key prefix under which a service's instances live, e.g. `services/helloworld/`.
///
/// # Errors
/// [`Error::InvalidName`] if the namespace or service cannot be used in a key.
pub fn service_prefix(namespace: &str, service: &str) -> Result<String> {
    check_namespace(namespace)?;
    check_segment("service", service)?;
    Ok(format!("{namespace}/{service}/"))
}

/// The etcd key of one instance, e.g. `services/helloworld/127.0.0.1-50051`.
///
/// # Errors
/// [`Error::InvalidName`] if any part cannot be used in a key.
pub fn instance_key(namespace: &str, service: &str, instance_id: &str) -> Result<String> {
    check_segment("instance id", instance_id)?;
    Ok(format!(
        "{}{instance_id}",
        service_prefix(namespace, service)?
    ))
}

/// The instance id in `key`, if `key` is `<prefix><id>` with a well-formed id; `None` for keys
/// outside the layout (nested deeper, empty id), which discovery skips.
pub(crate) fn instance_id<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    let id = key.strip_prefix(prefix)?;
    segment_problem(id).is_none().then_some(id)
}

/// Checks one path segment (service name or instance id).
fn check_segment(what: &'static str, value: &str) -> Result<()> {
    match segment_problem(value) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidName {
            what,
            value: value.to_owned(),
            reason,
        }),
    }
}

/// A namespace is one or more segments joined by `/`, without leading or trailing slash.
fn check_namespace(namespace: &str) -> Result<()> {
    let problem = if namespace.starts_with('/') || namespace.ends_with('/') {
        Some("must not start or end with '/' (Go clients dial etcd:///<namespace>/<service>)")
    } else {
        namespace.split('/').find_map(segment_problem)
    };
    match problem {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidName {
            what: "namespace",
            value: namespace.to_owned(),
            reason,
        }),
    }
}

fn segment_problem(segment: &str) -> Option<&'static str> {
    if segment.is_empty() {
        Some("must not be empty")
    } else if segment.contains('/') {
        Some("must not contain '/'")
    } else if segment.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain whitespace or control characters")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_go_naming_package() {
        assert_eq!(
            service_prefix("services", "helloworld").unwrap(),
            "services/helloworld/"
        );
        assert_eq!(
            instance_key("services", "helloworld", "127.0.0.1-50051").unwrap(),
            "services/helloworld/127.0.0.1-50051"
        );
        assert_eq!(
            service_prefix("prod/services", "hello").unwrap(),
            "prod/services/hello/"
        );
    }

    #[test]
    fn instance_ids_are_parsed_back_and_strays_rejected() {
        let prefix = "services/helloworld/";
        assert_eq!(instance_id(prefix, "services/helloworld/a-1"), Some("a-1"));
        // The Go manager conventionally uses the address itself as the id.
        assert_eq!(
            instance_id(prefix, "services/helloworld/10.0.0.5:50051"),
            Some("10.0.0.5:50051")
        );
        assert_eq!(instance_id(prefix, "services/helloworld/"), None);
        assert_eq!(instance_id(prefix, "services/helloworld/a/b"), None);
        assert_eq!(instance_id(prefix, "services/helloworld-canary/a"), None);
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        for (ns, svc, id) in [
            ("services", "", "a"),
            ("services", "hello/world", "a"),
            ("/services", "hello", "a"),
            ("services/", "hello", "a"),
            ("", "hello", "a"),
            ("services", "hello", "a b"),
            ("services", "hello", ""),
        ] {
            let err = instance_key(ns, svc, id).unwrap_err();
            assert!(
                matches!(err, Error::InvalidName { .. }),
                "{ns:?} {svc:?} {id:?}: {err}"
            );
        }
    }
}
