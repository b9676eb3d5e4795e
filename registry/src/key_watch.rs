//! Waiting for one etcd key to be deleted: the watch that a registration's key guard and a lock's
//! ownership check both need.
//!
//! A watch on one key looks simple and has three traps, handled here once: a stream that breaks
//! (member restarted, leader lost) must be resumed from the last revision seen, not "from now", or a
//! delete in the gap is missed; a start revision that was compacted away cancels the watch, and the
//! key itself must then be read; and an error that does not pass (a role without read permission
//! on the key) must be reported, not retried in silence.

use etcd_client::{EventType, WatchOptions};
use tracing::{debug, warn};

use crate::{backoff::Backoff, etcd::Etcd, problem::Problem};

/// Returns once `key` is deleted after `revision`: the revision of the deletion (or of the read that
/// found the key gone, after a compaction). Retries for ever, with backoff; the caller bounds it by
/// dropping the future (a `select!` with its cancellation).
pub(crate) async fn deleted(etcd: &Etcd, key: &str, mut revision: i64) -> i64 {
    let mut backoff = Backoff::etcd_task();
    let mut problem = Problem::default();
    loop {
        let start = revision + 1;
        let opened = etcd
            .call("watch", key, |mut c| async move {
                c.watch(key, Some(WatchOptions::new().with_start_revision(start)))
                    .await
            })
            .await;
        match opened {
            Err(e) => note(&mut problem, key, "opening the watch", &e),
            Ok(mut stream) => loop {
                let resp = match stream.message().await {
                    Ok(Some(resp)) => resp,
                    // Ended or broken: resume from `revision` below.
                    Ok(None) => break,
                    Err(e) => {
                        note(&mut problem, key, "reading the watch", &e);
                        break;
                    }
                };
                if resp.canceled() {
                    // Our start revision was compacted away: look at the key itself.
                    match etcd
                        .call("get", key, |mut c| async move { c.get(key, None).await })
                        .await
                    {
                        Ok(got) => {
                            let now = got.header().map_or(revision, |h| h.revision());
                            if got.kvs().is_empty() {
                                return now;
                            }
                            revision = revision.max(now);
                        }
                        Err(e) => note(&mut problem, key, "reading the key after a compaction", &e),
                    }
                    break;
                }
                backoff.reset();
                problem.clear();
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    revision = revision.max(kv.mod_revision());
                    if event.event_type() == EventType::Delete {
                        return kv.mod_revision();
                    }
                }
            },
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Logs a problem once at `warn` while it lasts (see [`Problem`]), and its repeats at `debug`.
fn note(problem: &mut Problem, key: &str, what: &str, error: &(dyn std::error::Error + 'static)) {
    match problem.error(what, error) {
        Some(new) => warn!(
            key,
            problem = new,
            "cannot watch the key; retrying with backoff"
        ),
        None => debug!(
            key,
            problem = problem.current(),
            "still cannot watch the key; retrying"
        ),
    }
}
