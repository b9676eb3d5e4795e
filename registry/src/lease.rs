//! Keeping one etcd lease alive, and knowing for certain when it is gone.
//!
//! etcd-client's `LeaseKeeper::keep_alive()` sends a single request; there is no background loop.
//! This module is that loop: send every `ttl / 3`, read every reply, and end with
//! [`LeaseEnd::Lost`] as soon as the lease cannot be trusted any more:
//! - a reply with TTL 0, or "lease not found" when reopening the stream: etcd says it is gone;
//! - no successful reply until the moment the lease would have expired: whatever etcd thinks, our
//!   key may already have been deleted, so the caller must grant a new lease and put the key again.
//!
//! A broken stream (the member carrying it died, a network blip) is not a lost lease: it is reopened,
//! on whichever member the client reaches, with a short capped backoff, until that deadline.

use std::time::Duration;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    backoff::Backoff,
    error::{Error, chain},
    etcd::Etcd,
    metrics,
};

/// How a keep-alive session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseEnd {
    /// The owner cancelled; the lease may still be alive (the caller decides whether to revoke).
    Cancelled,
    /// The lease is gone or cannot be trusted; the reason is for the log.
    Lost(String),
}

/// Grants a lease of `ttl` (whole seconds, rounded up) and returns its id.
pub(crate) async fn grant(etcd: &Etcd, ttl: Duration, key: &str) -> Result<i64, Error> {
    let seconds = ttl_seconds(ttl);
    let resp = etcd
        .call("lease grant", key, |mut c| async move {
            c.lease_grant(seconds, None).await
        })
        .await?;
    Ok(resp.id())
}

/// Revokes a lease, deleting every key attached to it at once.
pub(crate) async fn revoke(etcd: &Etcd, id: i64, key: &str) -> Result<(), Error> {
    etcd.call("lease revoke", key, |mut c| async move {
        c.lease_revoke(id).await
    })
    .await
    .map(drop)
}

/// Keeps lease `id` (granted with `ttl`) alive until `cancel` fires or the lease is lost. `key` is only
/// used to name the lease's purpose in logs and errors.
pub(crate) async fn keep_alive(
    etcd: &Etcd,
    id: i64,
    ttl: Duration,
    key: &str,
    cancel: &CancellationToken,
) -> LeaseEnd {
    let interval = (ttl / 3).max(Duration::from_millis(500));
    // The latest instant at which the lease is surely still alive: a lease refreshed by a request
    // *sent* at time t lives until t + ttl, so deadlines are always counted from send times.
    let mut expires = Instant::now() + ttl;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    let mut last_problem: Option<String> = None;

    loop {
        let opened_at = Instant::now();
        let open = etcd.call("lease keep-alive", key, |mut c| async move {
            c.lease_keep_alive(id).await
        });
        let opened = tokio::select! {
            _ = cancel.cancelled() => return LeaseEnd::Cancelled,
            _ = sleep_until(expires) => return LeaseEnd::Lost(expired_reason(&last_problem)),
            opened = open => opened,
        };
        let (mut keeper, mut replies) = match opened {
            Ok(pair) => pair,
            Err(e) if is_lease_not_found(&e) => {
                return LeaseEnd::Lost(format!("etcd no longer knows lease {id:x}"));
            }
            Err(e) => {
                let problem = format!("cannot reopen the keep-alive stream: {}", chain(&e));
                note_problem(&mut last_problem, problem, id, key);
                let retry_at = (Instant::now() + backoff.next_delay()).min(expires);
                tokio::select! {
                    _ = cancel.cancelled() => return LeaseEnd::Cancelled,
                    _ = sleep_until(retry_at) => continue,
                }
            }
        };
        // Opening the stream sent one keep-alive and got a reply with TTL > 0.
        expires = opened_at + ttl;
        backoff.reset();
        if last_problem.take().is_some() {
            warn!(
                key,
                lease = format_args!("{id:x}"),
                "keep-alive stream reopened; lease kept"
            );
        }

        let mut last_sent = opened_at;
        let mut tick = tokio::time::interval_at(opened_at + interval, interval);
        let broken = loop {
            tokio::select! {
                _ = cancel.cancelled() => return LeaseEnd::Cancelled,
                _ = sleep_until(expires) => return LeaseEnd::Lost(expired_reason(&last_problem)),
                _ = tick.tick() => {
                    last_sent = Instant::now();
                    if let Err(e) = keeper.keep_alive().await {
                        break format!("sending a keep-alive failed: {e}");
                    }
                }
                reply = replies.message() => match reply {
                    Ok(Some(reply)) if reply.ttl() <= 0 => {
                        return LeaseEnd::Lost(format!("etcd reports lease {id:x} expired (TTL 0)"));
                    }
                    Ok(Some(reply)) => {
                        metrics::keepalive_rtt(key, last_sent.elapsed());
                        // `ttl()` is positive here; seconds fit a u64.
                        expires = last_sent + Duration::from_secs(reply.ttl().unsigned_abs());
                        debug!(key, lease = format_args!("{id:x}"), ttl = reply.ttl(), "lease refreshed");
                    }
                    Ok(None) => break "etcd closed the keep-alive stream".to_owned(),
                    Err(e) => break format!("keep-alive stream failed: {e}"),
                },
            }
        };
        note_problem(&mut last_problem, broken, id, key);
    }
}

/// etcd grants whole seconds; round up so we never ask for less than configured.
pub(crate) fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

fn expired_reason(last_problem: &Option<String>) -> String {
    match last_problem {
        Some(problem) => {
            format!("no keep-alive reply before the lease's TTL ran out (last problem: {problem})")
        }
        None => "no keep-alive reply before the lease's TTL ran out".to_owned(),
    }
}

/// Logs a problem once when it first appears or changes, not on every retry. `problem` may carry
/// details that vary from one attempt to the next (which member refused, deep in the error chain);
/// only its first two `: `-separated parts (what failed, and etcd's summary) decide whether it is new.
fn note_problem(last: &mut Option<String>, problem: String, id: i64, key: &str) {
    let summary = |p: &str| p.split(": ").take(2).collect::<Vec<_>>().join(": ");
    if last.as_deref().map(summary) != Some(summary(&problem)) {
        warn!(key, lease = format_args!("{id:x}"), %problem, "lease keep-alive interrupted; retrying until the lease would expire");
    }
    *last = Some(problem);
}

/// True when etcd says the lease does not exist (any more).
pub(crate) fn is_lease_not_found(err: &Error) -> bool {
    match err {
        Error::Etcd { source, .. } => match source {
            etcd_client::Error::LeaseKeepAliveError(msg) => msg.contains("not found"),
            etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::from_secs(10)), 10);
        assert_eq!(ttl_seconds(Duration::from_millis(2500)), 3);
    }
}
