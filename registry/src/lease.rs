//! Leases: one per process, kept alive by one task, and knowing for certain when it is gone.
//!
//! [`SharedLease`] is the lease a process hangs its keys on: every [`Registration`](crate::Registration)
//! and every [`Lock`](crate::Lock) that is given the same handle shares one lease id and one
//! keep-alive stream, however many there are. When the lease is lost it grants a new one and
//! announces the new id; each registration then puts its own key on it (the registration's task is
//! the only writer of its key), and locks are *not* taken again (whoever held one is told it is
//! lost). The lease is revoked when the last handle is released or dropped.
//!
//! etcd-client's `LeaseKeeper::keep_alive()` sends a single request; there is no background loop.
//! [`SharedLease`]'s task runs that loop (`keep_alive` here): send every `ttl / 3`, read every reply,
//! and end with `LeaseEnd::Lost` as soon as the lease cannot be trusted any more:
//! - a reply with TTL 0, or "lease not found" when reopening the stream: etcd says it is gone;
//! - no successful reply until the moment the lease would have expired: whatever etcd thinks, our
//!   keys may already have been deleted, so a new lease must be granted and the keys put again.
//!
//! A broken stream (the member carrying it died, a network blip) is not a lost lease: it is reopened,
//! on whichever member the client reaches, with a short capped backoff, until that deadline. So is a
//! silent one: a keep-alive unanswered for half a second means the
//! member is stuck, typically a follower still forwarding to a leader that died or froze, and a
//! reopened stream reaches the leader elected meanwhile.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::problem::Problem;
use crate::sync::{Unpoisoned, Waited, sleep_until_some};
use crate::{
    backoff::Backoff,
    error::{Error, Result, chain},
    etcd::Etcd,
    metrics,
};

/// The serial of the next [`SharedLease`] started.
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(0);

/// The lease TTL used when none is configured.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// etcd's smallest grantable TTL (it silently raises smaller requests; we refuse them instead).
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// Refuses a TTL etcd would not grant as asked: the one check every entry point that takes a TTL
/// makes.
pub(crate) fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl < MIN_TTL {
        return Err(Error::InvalidTtl { ttl });
    }
    Ok(())
}

/// The least time a keep-alive may go unanswered before its stream counts as stuck and is reopened
/// (more when etcd's replies have been slower, see `keep_alive`).
const REPLY_TIMEOUT: Duration = Duration::from_millis(500);

/// How a keep-alive session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseEnd {
    /// The owner cancelled; the lease may still be alive (the caller decides whether to revoke).
    Cancelled,
    /// The lease is gone or cannot be trusted; the reason is for the log.
    Lost(String),
}

/// Where a [`SharedLease`] stands. Observe it with [`SharedLease::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// The first grant is in progress.
    Granting,
    /// The lease exists and is being kept alive; each registration on it puts its key on it (and
    /// says so with [`RegistrationState::Registered`](crate::RegistrationState::Registered)).
    Live {
        /// The lease id (`etcdctl lease timetolive <id as hex>`).
        id: i64,
    },
    /// The lease was lost (or etcd cannot be reached to grant one); granting a new one with backoff.
    /// Keys attached to the old lease may be missing from etcd meanwhile, and locks taken under it
    /// are gone.
    Lost {
        /// Why, for display.
        reason: String,
    },
    /// Every handle was released or dropped; the lease was revoked (or left to expire if the revoke
    /// failed) and nothing is kept alive any more.
    Closed,
}

/// One etcd lease shared by everything a process keeps in etcd: registrations and locks.
///
/// Start one per process and TTL with [`SharedLease::start`], then hand it to
/// [`RegistrationBuilder::lease`](crate::register::RegistrationBuilder::lease) and
/// [`Lock::new`](crate::Lock::new). One task keeps it alive over one keep-alive stream, so ten
/// registrations cost one stream and one request every `ttl / 3`, not ten.
///
/// On loss (revoked, expired during an outage) the task grants a new lease and announces
/// [`LeaseState::Live`] with the new id; every registration on the lease then puts its key on it.
/// Locks are not re-taken: a lock held under the old lease is reported lost to its holder.
///
/// Cloning is cheap; the task stops and the lease is revoked when the last clone (including those
/// held by registrations and locks) is released with [`SharedLease::release`] or dropped.
///
/// ```no_run
/// use std::time::Duration;
/// use registry::{EtcdConfig, Lock, Registration, SharedLease};
/// # async fn demo() -> Result<(), registry::Error> {
/// let etcd = EtcdConfig::new(["127.0.0.1:2379"])?.connect().await?;
/// let lease = SharedLease::start(&etcd, Duration::from_secs(10))?;
/// let greeter = Registration::builder("greeter", "node-1", "127.0.0.1:50051")
///     .lease(&lease)
///     .start(&etcd)?;
/// let admin = Registration::builder("admin", "node-1", "127.0.0.1:50052")
///     .lease(&lease)
///     .start(&etcd)?;
/// let locks = Lock::new(&lease);
/// // Both keys, once registered, and any lock taken through `locks` hang on lease `id`.
/// let id = lease.wait_live(Duration::from_secs(5)).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SharedLease {
    inner: Arc<Shared>,
}

/// A [`SharedLease`] that does not count as a user.
#[derive(Debug, Clone)]
pub(crate) struct WeakLease(std::sync::Weak<Shared>);

impl WeakLease {
    /// The lease, while any real handle still exists.
    pub(crate) fn upgrade(&self) -> Option<SharedLease> {
        self.0.upgrade().map(|inner| SharedLease { inner })
    }
}

/// What every clone of a [`SharedLease`] shares. Dropping it (the last clone went away) cancels the
/// task, which revokes the lease on its way out.
#[derive(Debug)]
struct Shared {
    etcd: Etcd,
    ttl: Duration,
    /// Names the lease in logs and metrics: the registration key for a registration's own lease.
    label: String,
    state: watch::Receiver<LeaseState>,
    /// Tells the task that a user found the lease gone before the keep-alive did (a put answered
    /// "lease not found"), so it re-grants at once.
    lost: mpsc::UnboundedSender<(i64, String)>,
    /// Tells this lease from every other of the process, for as long as the process runs (the
    /// lock module keys its in-process table on it).
    serial: u64,
    cancel: CancellationToken,
    /// Ends with the id of the lease it revoked, if any.
    task: Mutex<Option<JoinHandle<Result<Option<i64>>>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The task revokes the lease on its way out (if the runtime still runs).
        self.cancel.cancel();
    }
}

impl SharedLease {
    /// Starts granting a lease of `ttl` (rounded up to whole seconds) and keeping it alive in the
    /// background; returns at once. [`SharedLease::wait_live`] waits for the first grant.
    ///
    /// # Errors
    /// [`Error::InvalidTtl`] below [`MIN_TTL`]; etcd problems are never errors here: the task
    /// retries them and reports them through [`SharedLease::state`].
    ///
    /// # Panics
    /// Outside a Tokio runtime (it spawns the keep-alive task).
    pub fn start(etcd: &Etcd, ttl: Duration) -> Result<Self> {
        Self::start_labelled(etcd, ttl, "shared-lease".to_owned())
    }

    /// [`SharedLease::start`] with the name the lease goes by in logs and metrics.
    pub(crate) fn start_labelled(etcd: &Etcd, ttl: Duration, label: String) -> Result<Self> {
        check_ttl(ttl)?;
        let (state_tx, state) = watch::channel(LeaseState::Granting);
        let (lost, lost_rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            etcd.clone(),
            ttl,
            label.clone(),
            state_tx,
            lost_rx,
            cancel.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Shared {
                etcd: etcd.clone(),
                ttl,
                label,
                state,
                lost,
                serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
                cancel,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// The TTL the lease is granted with.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// A receiver of state changes.
    pub fn state(&self) -> watch::Receiver<LeaseState> {
        self.inner.state.clone()
    }

    /// The current lease id, if the lease is live.
    pub fn id(&self) -> Option<i64> {
        match *self.inner.state.borrow() {
            LeaseState::Live { id } => Some(id),
            _ => None,
        }
    }

    /// Waits until the lease is live, returning its id.
    ///
    /// # Errors
    /// [`Error::GaveUp`] after `timeout`, with the last reason granting failed.
    pub async fn wait_live(&self, timeout: Duration) -> Result<i64> {
        let gave_up = |why: String| Error::GaveUp {
            what: format!("a live lease for {} ({why})", self.inner.label),
            waited: timeout,
        };
        let live = |s: &LeaseState| matches!(s, LeaseState::Live { .. } | LeaseState::Closed);
        match crate::sync::wait_for(&self.inner.state, timeout, live).await {
            Waited::Reached(LeaseState::Live { id }) => Ok(id),
            Waited::Reached(other) => Err(gave_up(format!("the lease is {other:?}"))),
            Waited::Stopped => Err(gave_up("the lease task stopped".into())),
            Waited::TimedOut(LeaseState::Lost { reason }) => Err(gave_up(reason)),
            Waited::TimedOut(other) => Err(gave_up(format!("still {other:?}"))),
        }
    }

    /// Gives up this handle. If it was the last one (no other clone, registration or lock uses the
    /// lease), stops the keep-alive and revokes the lease, waiting for the revoke: every key still
    /// on it is deleted at once. Otherwise the lease lives on for the others.
    ///
    /// # Errors
    /// [`Error::Etcd`] / [`Error::Timeout`] if the revoke failed (the lease then expires within one
    /// TTL), or [`Error::TaskLost`] if the keep-alive task had died.
    pub async fn release(self) -> Result<()> {
        self.release_last().await.map(drop)
    }

    /// [`SharedLease::release`], returning the id of the lease revoked if this was the last handle.
    pub(crate) async fn release_last(self) -> Result<Option<i64>> {
        let Some(shared) = Arc::into_inner(self.inner) else {
            return Ok(None);
        };
        let task = shared.task.locked().take();
        let label = shared.label.clone();
        // Cancels the task: it revokes the lease and ends.
        drop(shared);
        match task {
            Some(task) => task.await.map_err(|source| Error::TaskLost {
                task: "lease keep-alive",
                key: label,
                source,
            })?,
            None => Ok(None),
        }
    }

    pub(crate) fn etcd(&self) -> &Etcd {
        &self.inner.etcd
    }

    /// A handle that does not keep the lease alive (nor stop [`SharedLease::release`] from
    /// revoking it).
    pub(crate) fn downgrade(&self) -> WeakLease {
        WeakLease(Arc::downgrade(&self.inner))
    }

    /// Reports that lease `id` turned out to be gone (a put said "lease not found"); the task
    /// re-grants at once if `id` is still the current lease.
    pub(crate) fn report_lost(&self, id: i64, reason: String) {
        // The task holds the receiver for as long as any handle exists; a send can only fail while
        // everything shuts down, when there is nothing left to re-grant for.
        let _ = self.inner.lost.send((id, reason));
    }

    /// A number no other lease of this process has (ids are etcd's and change on every grant).
    pub(crate) fn serial(&self) -> u64 {
        self.inner.serial
    }
}

/// Waits until lease `id` is no longer the live lease, and returns why.
pub(crate) async fn replaced(state: &mut watch::Receiver<LeaseState>, id: i64) -> String {
    let current = LeaseState::Live { id };
    let Ok(now) = state.wait_for(|s| *s != current).await else {
        // The lease task ended: nothing keeps lease `id` alive any more.
        return format!("the keep-alive of lease {id:x} stopped");
    };
    match &*now {
        LeaseState::Lost { reason } => reason.clone(),
        LeaseState::Live { id: new } => format!("lease {id:x} was replaced by {new:x}"),
        LeaseState::Granting => format!("lease {id:x} is being replaced"),
        LeaseState::Closed => format!("lease {id:x} was released"),
    }
}

/// The shared lease's task: grant, keep alive, start over on loss; revoke on cancellation, returning
/// the revoked lease's id.
async fn run(
    etcd: Etcd,
    ttl: Duration,
    label: String,
    state: watch::Sender<LeaseState>,
    mut lost: mpsc::UnboundedReceiver<(i64, String)>,
    cancel: CancellationToken,
) -> Result<Option<i64>> {
    // A 1 s cap: after an outage the keys are back within about a second of etcd answering again.
    let mut backoff = Backoff::etcd_task();
    let mut current = None;
    let mut problem = Problem::default();

    loop {
        let attempt = tokio::select! {
            _ = cancel.cancelled() => break,
            attempt = grant(&etcd, ttl, &label) => attempt,
        };
        let id = match attempt {
            Ok(id) => id,
            Err(e) => {
                if let Some(problem) = problem.error("granting a lease", &e) {
                    warn!(lease = %label, problem, "cannot grant a lease; retrying with backoff");
                }
                state.send_replace(LeaseState::Lost {
                    reason: e.to_string(),
                });
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
        };
        debug!(lease = %label, id = format_args!("{id:x}"), ttl_s = ttl_seconds(ttl), "lease granted");
        backoff.reset();
        problem.clear();
        current = Some(id);
        state.send_replace(LeaseState::Live { id });

        let end = tokio::select! {
            end = keep_alive(&etcd, id, ttl, &label, &cancel) => end,
            reason = reported_lost(&mut lost, id) => LeaseEnd::Lost(reason),
        };
        match end {
            LeaseEnd::Cancelled => break,
            LeaseEnd::Lost(reason) => {
                warn!(lease = %label, id = format_args!("{id:x}"), %reason, "lease lost; granting a new one");
                state.send_replace(LeaseState::Lost { reason });
                current = None;
            }
        }
    }

    let result = match current {
        Some(id) => {
            let revoked = revoke(&etcd, id, &label).await;
            match &revoked {
                Ok(()) => debug!(lease = %label, id = format_args!("{id:x}"), "lease revoked"),
                Err(e) => {
                    warn!(lease = %label, id = format_args!("{id:x}"), error = %chain(e), ttl_s = ttl_seconds(ttl), "could not revoke the lease; its keys expire within one TTL")
                }
            }
            revoked.map(|()| Some(id))
        }
        None => Ok(None),
    };
    state.send_replace(LeaseState::Closed);
    result
}

/// Waits for a report that lease `id` is gone; reports about earlier leases are stale.
async fn reported_lost(lost: &mut mpsc::UnboundedReceiver<(i64, String)>, id: i64) -> String {
    loop {
        match lost.recv().await {
            Some((reported, reason)) if reported == id => return reason,
            Some(_) => {}
            // Every handle is gone; the cancellation that comes with that ends the task.
            None => std::future::pending().await,
        }
    }
}

/// Grants a lease of `ttl` (whole seconds, rounded up) and returns its id.
async fn grant(etcd: &Etcd, ttl: Duration, key: &str) -> Result<i64, Error> {
    let seconds = ttl_seconds(ttl);
    let resp = etcd
        .call("lease grant", key, |mut c| async move {
            c.lease_grant(seconds, None).await
        })
        .await?;
    Ok(resp.id())
}

/// Revokes a lease, deleting every key attached to it at once.
async fn revoke(etcd: &Etcd, id: i64, key: &str) -> Result<(), Error> {
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
    // etcd answers a keep-alive in milliseconds; one unanswered for `patience` is stuck, and the
    // stream is reopened while the lease still has time: at the worst moment, just after a
    // refresh, a stall shows only at the next send. Patience is four of the last reply's round
    // trips, at least REPLY_TIMEOUT (or the attempt timeout, if shorter) and at most the attempt
    // timeout and the interval, and half as much again after each stream given up: an etcd that
    // is slow but answers is not taken for a stuck one for long.
    let attempt_timeout = etcd.config().attempt_timeout;
    let least = REPLY_TIMEOUT.min(attempt_timeout);
    let most = attempt_timeout.min(interval).max(least);
    let mut patience = least;
    // The latest instant at which the lease is surely still alive: a lease refreshed by a request
    // *sent* at time t lives until t + ttl, so deadlines are always counted from send times.
    let mut expires = Instant::now() + ttl;
    let mut backoff = Backoff::etcd_task();
    let mut problem = Problem::default();

    loop {
        let opened_at = Instant::now();
        // Opening sends a keep-alive and waits for its reply: as quick as any reply, so an attempt
        // on a stuck member is given up quickly (`call_within` gives later attempts more time, for
        // an etcd that is merely slow).
        let open = etcd.call_within("lease keep-alive", key, least, |mut c| async move {
            c.lease_keep_alive(id).await
        });
        let opened = tokio::select! {
            _ = cancel.cancelled() => return LeaseEnd::Cancelled,
            _ = sleep_until(expires) => return LeaseEnd::Lost(expired_reason(&problem)),
            opened = open => opened,
        };
        let (mut keeper, mut replies) = match opened {
            Ok(pair) => pair,
            Err(e) if is_lease_not_found(&e) => {
                return LeaseEnd::Lost(format!("etcd no longer knows lease {id:x}"));
            }
            Err(e) => {
                let new = problem.error("cannot reopen the keep-alive stream", &e);
                warn_interrupted(new, id, key);
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
        if problem.clear() {
            warn!(
                key,
                lease = format_args!("{id:x}"),
                "keep-alive stream reopened; lease kept"
            );
        }

        // When each keep-alive still awaiting its reply was sent, oldest first (etcd answers in
        // order). There is rarely more than one: a reply later than `patience`, which is no
        // longer than the interval, abandons the stream.
        let mut unanswered: VecDeque<Instant> = VecDeque::new();
        let mut tick = tokio::time::interval_at(opened_at + interval, interval);
        let broken = loop {
            tokio::select! {
                _ = cancel.cancelled() => return LeaseEnd::Cancelled,
                _ = sleep_until(expires) => return LeaseEnd::Lost(expired_reason(&problem)),
                // A stream can stay open and fall silent: a follower forwards each keep-alive to
                // the leader and, when the leader has died behind a network that drops packets
                // (a killed container) or froze, waits seconds for an answer while a new leader
                // is elected. Reopened, the keep-alive reaches the new leader.
                () = sleep_until_some(unanswered.front().map(|&sent| sent + patience)) => {
                    let waited = patience;
                    // Slow rather than stuck, perhaps: the next stream waits longer, until a
                    // reply says how long replies take.
                    patience = patience.mul_f64(1.5).min(most);
                    break format!("no keep-alive reply within {waited:?}");
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    // The send is bounded by the same deadline as everything else: a send that
                    // never completes (a stream etcd stopped reading) must not hide the expiry.
                    let sent = tokio::select! {
                        _ = cancel.cancelled() => return LeaseEnd::Cancelled,
                        _ = sleep_until(expires) => return LeaseEnd::Lost(expired_reason(&problem)),
                        sent = keeper.keep_alive() => sent,
                    };
                    if let Err(e) = sent {
                        break format!("sending a keep-alive failed: {e}");
                    }
                    unanswered.push_back(now);
                }
                reply = replies.message() => match reply {
                    Ok(Some(reply)) if reply.ttl() <= 0 => {
                        return LeaseEnd::Lost(format!("etcd reports lease {id:x} expired (TTL 0)"));
                    }
                    Ok(Some(reply)) => {
                        // Every reply answers one of our sends; one that does not extends nothing.
                        let Some(sent) = unanswered.pop_front() else { continue };
                        let rtt = sent.elapsed();
                        metrics::keepalive_rtt(key, rtt);
                        patience = (rtt * 4).clamp(least, most);
                        // `ttl()` is positive here; seconds fit a u64.
                        expires = sent + Duration::from_secs(reply.ttl().unsigned_abs());
                        debug!(key, lease = format_args!("{id:x}"), ttl = reply.ttl(), "lease refreshed");
                    }
                    Ok(None) => break "etcd closed the keep-alive stream".to_owned(),
                    Err(e) => break format!("keep-alive stream failed: {e}"),
                },
            }
        };
        warn_interrupted(problem.text(broken), id, key);
    }
}

/// etcd grants whole seconds; round up so we never ask for less than configured.
pub(crate) fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

fn expired_reason(problem: &Problem) -> String {
    match problem.current() {
        Some(problem) => {
            format!("no keep-alive reply before the lease's TTL ran out (last problem: {problem})")
        }
        None => "no keep-alive reply before the lease's TTL ran out".to_owned(),
    }
}

/// Warns about a new keep-alive problem (see [`Problem`]); repeats are not logged.
fn warn_interrupted(new: Option<&str>, id: i64, key: &str) {
    if let Some(problem) = new {
        warn!(
            key,
            lease = format_args!("{id:x}"),
            problem,
            "lease keep-alive interrupted; retrying until the lease would expire"
        );
    }
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
