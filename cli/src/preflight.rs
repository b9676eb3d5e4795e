//! One request to etcd before a binary settles down to wait for it, so that a mistake no amount of
//! waiting can fix is reported at once instead of after the whole `--etcd-timeout`.
//!
//! Waiting is right for a cluster that is down or between leaders: it may come back. It is wrong
//! for a cluster with authentication on and no username given (etcd answers every request with
//! "user name is empty"), and for an endpoint that is not etcd at all (an HTTP server, another
//! gRPC service), whose answers never change.

use std::time::Duration;

use etcd_client::GetOptions;
use registry::error::chain;
use tokio::time::Instant;

use crate::error::{Error, Result};

/// Lists at most one key under `prefix`, retrying failures that may pass for up to `within`.
/// Returns `Ok` once etcd answers or when time runs out on a passing failure (the caller's own
/// wait then reports it as usual).
///
/// # Errors
/// [`Error::Unusable`] saying what is wrong: authentication required but no username, or an
/// endpoint that does not speak etcd's protocol.
pub async fn check(etcd: &registry::Etcd, prefix: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let endpoints = etcd.config().endpoints().join(",");
    let options = GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_limit(1);
    loop {
        let attempt_deadline = (Instant::now() + Duration::from_secs(1)).min(deadline);
        let mut client = etcd.client();
        let attempt =
            tokio::time::timeout_at(attempt_deadline, client.get(prefix, Some(options.clone())))
                .await;
        match attempt {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => {
                if let Some(reason) = lasting(&e, etcd.config().auth().is_some()) {
                    return Err(Error::Unusable { endpoints, reason });
                }
                tracing::debug!(error = %e, "etcd not answering yet");
            }
            Err(_) => {}
        }
        if Instant::now() + Duration::from_millis(100) >= deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What is wrong, when `error` will not change by retrying.
fn lasting(error: &etcd_client::Error, has_user: bool) -> Option<String> {
    use tonic::Code;
    let text = chain(error);
    if let etcd_client::Error::GRpcStatus(status) = error {
        let message = status.message();
        if message.contains("user name is empty")
            || (!has_user && status.code() == Code::Unauthenticated)
        {
            return Some(
                "it has authentication enabled and no username was given: set --etcd-username, \
                 and ETCD_PASSWORD or --etcd-password-file"
                    .to_owned(),
            );
        }
        // A permission denied is left to the requests that need it: the registry reports it at
        // once, naming the operation and key, and a role may allow what this probe does not.
        if status.code() == Code::Unimplemented {
            return Some(format!(
                "it answers gRPC but is not etcd (no etcd KV service): {message}"
            ));
        }
    }
    let not_http2 = [
        "frame with invalid size",
        "FRAME_SIZE_ERROR",
        "PROTOCOL_ERROR",
        "protocol error",
        "invalid HTTP version",
        "http2 error",
        "malformed",
        "invalid content-type",
        "content-type",
    ];
    not_http2
        .iter()
        .any(|needle| text.contains(needle))
        .then(|| {
            format!(
                "it does not speak etcd's protocol (gRPC over HTTP/2): is this an etcd client \
                 port (2379 by default) and not an HTTP or peer port? ({text})"
            )
        })
}
