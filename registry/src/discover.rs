//! Discovery: the live set of a service's instances, kept current by a task of its own.
//!
//! The protocol is list-then-watch, the only one that cannot miss an event:
//! 1. a linearizable `get` of the prefix gives the full set *and* the revision it reflects;
//! 2. a watch from exactly `revision + 1` then delivers every later change, in order.
//!
//! Watching "from now" after the get would lose whatever happened in between. When the watch stream
//! breaks (a member died, the network blinked), the watch is resumed from the last revision received,
//! and etcd replays what happened meanwhile. When it cannot be resumed (the revision was compacted
//! away, etcd cancelled the watch, or the endpoints now lead to a rebuilt cluster whose revisions mean
//! nothing to us) the task lists again, publishes the difference and watches from the new revision.
//! While etcd is unreachable the last known set is kept: a registry outage must not turn into a
//! service outage. For the same reason, after the cluster was rebuilt empty, instances it does not
//! list yet are kept for a grace period while their servers register again.
//!
//! Subscribers get [`Membership`] snapshots through a `tokio::sync::watch` channel; the task applies
//! changes as they arrive, not when a request happens to need them.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use etcd_client::{EventType, GetOptions, KeyValue, WatchOptions};
use serde_json::Value;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::{CancellationToken, DropGuard, ReusableBoxFuture};
use tracing::{debug, info, warn};

use crate::problem::Problem;
use crate::sync::Waited;
use crate::{
    backoff::Backoff,
    endpoint::Format,
    error::{Error, Result},
    etcd::Etcd,
    key, metrics,
};

/// One discovered instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The instance id: the last segment of its key.
    pub id: String,
    /// The full etcd key.
    pub key: String,
    /// The `host:port` to dial.
    pub addr: String,
    /// The record's metadata (any JSON; `null` when absent).
    pub metadata: Value,
}

/// A service's instances by id: a persistent map, so that taking a snapshot costs O(1), applying
/// one watch event O(log n), and comparing two snapshots of the same discovery time in proportion
/// to what changed between them, not to the size of the fleet (unchanged parts of the tree are
/// shared, and [`Instances::diff`] skips them).
#[derive(Clone, Default, PartialEq)]
pub struct Instances(imbl::OrdMap<String, Instance>);

impl Instances {
    /// How many instances.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The instance with this id.
    pub fn get(&self, id: &str) -> Option<&Instance> {
        self.0.get(id)
    }

    /// Whether an instance has this id.
    pub fn contains_key(&self, id: &str) -> bool {
        self.0.contains_key(id)
    }

    /// The ids, in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// The instances, in id order.
    pub fn values(&self) -> impl Iterator<Item = &Instance> {
        self.0.values()
    }

    /// What changed from `self` to `newer`, in id order. Between two snapshots of one discovery
    /// this costs time in proportion to the changes.
    pub fn diff<'a>(&'a self, newer: &'a Instances) -> impl Iterator<Item = Change> + 'a {
        self.0.diff(&newer.0).map(|item| match item {
            imbl::ordmap::DiffItem::Add(_, new) => Change::Added(new.clone()),
            imbl::ordmap::DiffItem::Remove(_, old) => Change::Removed(old.clone()),
            imbl::ordmap::DiffItem::Update {
                old: (_, old),
                new: (_, new),
            } => Change::Updated {
                old: old.clone(),
                new: new.clone(),
            },
        })
    }

    /// Whether both are the very same snapshot (not merely equal): O(1).
    pub(crate) fn same_snapshot(&self, other: &Instances) -> bool {
        self.0.ptr_eq(&other.0)
    }

    fn insert(&mut self, instance: Instance) {
        self.0.insert(instance.id.clone(), instance);
    }

    fn remove(&mut self, id: &str) -> Option<Instance> {
        self.0.remove(id)
    }

    /// Makes `self` equal to `target` by applying their difference, so that it stays a
    /// descendant of the snapshots before it (and later diffs stay proportional to changes).
    /// Instances that go while their record announced draining are recorded in `departed`, at
    /// `revision`.
    fn replace_with(&mut self, target: &Instances, departed: &mut Departed, revision: i64) {
        if self.is_empty() {
            // Nothing to descend from (a first list): the target itself will do.
            *self = target.clone();
            departed.forget_listed(target);
            return;
        }
        let changes: Vec<Change> = self.diff(target).collect();
        for change in changes {
            match change {
                Change::Removed(old) => {
                    self.remove(&old.id);
                    departed.gone(&old, revision);
                }
                Change::Added(new) | Change::Updated { new, .. } => {
                    departed.back(&new.id);
                    self.insert(new);
                }
            }
        }
    }
}

/// The instances whose key went while their record announced draining (see
/// [`crate::Registration::announce_draining`]), by id, with the revision at which they went.
///
/// A snapshot only shows the current records, and snapshots published in quick succession reach
/// a subscriber as one: a server that announces draining and revokes its lease a millisecond
/// later often reaches the balancer as a plain removal. This record keeps the announcement, so the
/// balancer still knows the instance left on purpose and gives it no removal grace. An id
/// registered again is forgotten; beyond [`DEPARTED_KEPT`] ids the oldest are.
#[derive(Debug, Clone, Default)]
pub(crate) struct Departed(imbl::OrdMap<String, i64>);

/// How many draining departures a [`Departed`] record keeps, at least: a subscriber would have to
/// miss this many snapshots' worth of departures to miss one.
const DEPARTED_KEPT: usize = 1_024;

impl Departed {
    /// Notes that `old` is gone at `revision`, if its record announced draining.
    fn gone(&mut self, old: &Instance, revision: i64) {
        if !crate::endpoint::is_draining(&old.metadata) {
            return;
        }
        self.0.insert(old.id.clone(), revision);
        if self.0.len() > 2 * DEPARTED_KEPT {
            // Keep the newest: an O(n log n) pass once every DEPARTED_KEPT departures.
            let mut revisions: Vec<i64> = self.0.values().copied().collect();
            revisions.sort_unstable();
            let oldest_kept = revisions[revisions.len() - DEPARTED_KEPT];
            self.retain(|_, revision| revision >= oldest_kept);
        }
    }

    /// Forgets `id`: it is registered again.
    fn back(&mut self, id: &str) {
        self.0.remove(id);
    }

    /// Forgets every id that `listed` holds: they are registered again.
    fn forget_listed(&mut self, listed: &Instances) {
        if self.0.keys().any(|id| listed.contains_key(id)) {
            self.retain(|id, _| !listed.contains_key(id));
        }
    }

    /// Keeps the departures `keep` says yes to (the map has no `retain`: rebuilt, O(n)).
    fn retain(&mut self, keep: impl Fn(&str, i64) -> bool) {
        self.0 = self
            .0
            .iter()
            .filter(|(id, revision)| keep(id, **revision))
            .map(|(id, revision)| (id.clone(), *revision))
            .collect();
    }

    /// Whether `id` went while announcing draining.
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.0.contains_key(id)
    }
}

impl std::fmt::Debug for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

impl std::ops::Index<&str> for Instances {
    type Output = Instance;

    /// # Panics
    /// If no instance has this id (like indexing a map); use [`Instances::get`] otherwise.
    fn index(&self, id: &str) -> &Instance {
        &self.0[id]
    }
}

impl FromIterator<Instance> for Instances {
    fn from_iter<T: IntoIterator<Item = Instance>>(iter: T) -> Self {
        Self(iter.into_iter().map(|i| (i.id.clone(), i)).collect())
    }
}

/// A snapshot of what discovery knows.
#[derive(Debug, Clone, Default)]
pub struct Membership {
    /// The instances, by id.
    pub instances: Instances,
    /// The etcd revision the snapshot reflects (0 before the first list).
    pub revision: i64,
    /// True once a list has succeeded; until then an empty set means "unknown", not "none".
    pub synced: bool,
    /// The current problem talking to etcd, if any; the instances are then the last known set.
    pub problem: Option<String>,
    /// Full lists of the prefix made so far: the first, then one per watch that could not be
    /// resumed (compaction, cancellation, a rebuilt cluster).
    pub lists: u64,
    /// The instances that went while announcing draining, for the balancer.
    pub(crate) departed: Departed,
    /// Tells a new problem from a repeat; `problem` is what it last warned about.
    tracked: Problem,
}

/// A difference between two instance sets.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A new instance.
    Added(Instance),
    /// An instance that is gone.
    Removed(Instance),
    /// The same id with a new address or metadata.
    Updated {
        /// Before.
        old: Instance,
        /// After.
        new: Instance,
    },
}

/// A change for a tower balancer: an instance (by id) to insert or to remove.
type TowerChange = tower::discover::Change<String, Instance>;

/// [`Discovery::changes`]: the membership as a stream of [`tower::discover::Change`]s.
pub struct Changes {
    /// Keeps discovery's task alive for as long as the stream.
    _discovery: Discovery,
    /// The instances the stream has reported so far.
    seen: Instances,
    /// Changes worked out from the last snapshot, not yet yielded.
    pending: std::collections::VecDeque<TowerChange>,
    next: ReusableBoxFuture<'static, Option<watch::Receiver<Membership>>>,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes")
            .field("reported", &self.seen.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// Waits for the next snapshot; `None` once discovery's task has ended.
async fn next_snapshot(
    mut membership: watch::Receiver<Membership>,
) -> Option<watch::Receiver<Membership>> {
    membership.changed().await.ok()?;
    Some(membership)
}

impl futures_core::Stream for Changes {
    type Item = std::result::Result<TowerChange, std::convert::Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            let Some(mut membership) = std::task::ready!(self.next.poll(cx)) else {
                return Poll::Ready(None);
            };
            let current = membership.borrow_and_update().instances.clone();
            let changes: Vec<Change> = self.seen.diff(&current).collect();
            for change in changes {
                self.pending.push_back(match change {
                    Change::Added(instance) | Change::Updated { new: instance, .. } => {
                        tower::discover::Change::Insert(instance.id.clone(), instance)
                    }
                    Change::Removed(instance) => tower::discover::Change::Remove(instance.id),
                });
            }
            self.seen = current;
            self.next.set(next_snapshot(membership));
        }
    }
}

/// A running discovery of one service. Cheap to clone; the task stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Discovery {
    service: Arc<str>,
    prefix: Arc<str>,
    membership: watch::Receiver<Membership>,
    _task: Arc<DropGuard>,
}

/// What to discover, before it starts: [`Discovery::builder`]. The same shape as
/// [`crate::RegistrationBuilder`]: the service first, options after, the etcd handle last.
#[derive(Debug, Clone)]
pub struct DiscoveryBuilder {
    service: String,
    namespace: String,
    format: Format,
}

impl DiscoveryBuilder {
    /// The key namespace (default [`key::DEFAULT_NAMESPACE`]): instances live under
    /// `<namespace>/<service>/`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How the records are written (default [`Format::GoNaming`]), for instances registered by
    /// another framework.
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Starts discovering; returns at once. The first list happens in the background: see
    /// [`Discovery::wait_for_instances`]. Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidName`] if the namespace or service cannot be used in a key.
    pub fn start(self, etcd: &Etcd) -> Result<Discovery> {
        let prefix: Arc<str> = self.format.prefix(&self.namespace, &self.service)?.into();
        let (tx, membership) = watch::channel(Membership::default());
        let cancel = CancellationToken::new();
        tokio::spawn(run(
            etcd.clone(),
            prefix.clone(),
            self.format,
            tx,
            cancel.clone(),
        ));
        Ok(Discovery {
            service: self.service.into(),
            prefix,
            membership,
            _task: Arc::new(cancel.drop_guard()),
        })
    }
}

impl Discovery {
    /// Discovery of `service`: set the namespace or the record format if need be, then
    /// [`DiscoveryBuilder::start`] it on an etcd connection.
    ///
    /// ```no_run
    /// # async fn demo(etcd: registry::Etcd) -> Result<(), registry::Error> {
    /// let discovery = registry::Discovery::builder("helloworld").start(&etcd)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(service: impl Into<String>) -> DiscoveryBuilder {
        DiscoveryBuilder {
            service: service.into(),
            namespace: key::DEFAULT_NAMESPACE.to_owned(),
            format: Format::GoNaming,
        }
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The watched key prefix, e.g. `services/helloworld/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The current snapshot.
    pub fn membership(&self) -> Membership {
        self.membership.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Membership> {
        self.membership.clone()
    }

    /// The membership as a stream of tower's [`tower::discover::Change`]s, keyed by instance id:
    /// `Insert` for each instance of the first list and for every one that joins or changes,
    /// `Remove` for every one that leaves. Any tower balancer consumes such a stream (`Discover`
    /// is implemented for it); so does tonic's `Channel::balance_channel` once each `Instance` is
    /// mapped to an `Endpoint`. Snapshots published while the stream is not polled are merged:
    /// the stream always converges on the current membership. It keeps discovery running while it
    /// lives, and ends only if discovery's task does.
    ///
    /// ```no_run
    /// use std::pin::pin;
    /// use tower::discover::Change;
    /// # async fn demo(discovery: registry::Discovery) {
    /// let mut changes = pin!(discovery.changes());
    /// while let Some(Ok(change)) = std::future::poll_fn(|cx| {
    ///     futures_core::Stream::poll_next(changes.as_mut(), cx)
    /// })
    /// .await
    /// {
    ///     match change {
    ///         Change::Insert(id, instance) => println!("+ {id} at {}", instance.addr),
    ///         Change::Remove(id) => println!("- {id}"),
    ///     }
    /// }
    /// # }
    /// ```
    pub fn changes(&self) -> Changes {
        let mut membership = self.membership.clone();
        // The current snapshot counts as new, so the first poll reports what is known already.
        membership.mark_changed();
        Changes {
            _discovery: self.clone(),
            seen: Instances::default(),
            pending: std::collections::VecDeque::new(),
            next: ReusableBoxFuture::new(next_snapshot(membership)),
        }
    }

    /// Waits until the first list has succeeded, so the membership reflects etcd rather than
    /// "nothing known yet".
    ///
    /// # Errors
    /// [`Error::GaveUp`] after `timeout`, with the last problem talking to etcd.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<Membership> {
        self.wait_until(timeout, "the first list", |m| m.synced)
            .await
    }

    /// Waits until at least `min` instances are known.
    ///
    /// # Errors
    /// [`Error::GaveUp`] after `timeout`, saying whether etcd was unreachable or simply had no
    /// instances under the prefix.
    pub async fn wait_for_instances(&self, min: usize, timeout: Duration) -> Result<Membership> {
        let what = format!("{min} instance(s)");
        self.wait_until(timeout, &what, |m| m.instances.len() >= min)
            .await
    }

    async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        done: impl FnMut(&Membership) -> bool,
    ) -> Result<Membership> {
        let m = match crate::sync::wait_for(&self.membership, timeout, done).await {
            Waited::Reached(m) => return Ok(m),
            Waited::Stopped => self.membership(),
            Waited::TimedOut(m) => m,
        };
        let why = match (&m.problem, m.synced) {
            (Some(problem), _) => format!("etcd problem: {problem}"),
            (None, true) => format!("{} registered under {}", m.instances.len(), self.prefix),
            (None, false) => "no answer from etcd yet".to_owned(),
        };
        Err(Error::GaveUp {
            what: format!("{what} of service {:?} ({why})", self.service),
            waited: timeout,
        })
    }
}

/// Why a watch session ended.
enum WatchEnd {
    /// The owner went away.
    Cancelled,
    /// The stream broke or could not be opened: resume from the last revision seen, after a
    /// backoff. etcd replays everything after that revision, so nothing is missed.
    Resume { reason: String },
    /// The watch cannot be resumed (its revision was compacted, etcd cancelled it, or the cluster
    /// was replaced): list again and publish the difference.
    Relist {
        reason: String,
        /// `compacted`, `cancelled`, or `rebuilt` when the endpoints now lead to a rebuilt
        /// cluster (new cluster id, revisions gone back).
        cause: &'static str,
    },
}

/// How long instances known before etcd was rebuilt are kept while the rebuilt cluster does not
/// list them (yet). A live server notices its lease is gone and registers again within about a
/// second; this grace keeps its clients from dropping it, and failing calls, in between.
const REBUILD_GRACE: Duration = Duration::from_secs(10);

/// Instances carried over from before a cluster rebuild, not yet confirmed by the new cluster.
struct Carried {
    ids: BTreeSet<String>,
    until: Instant,
}

/// What is being watched: the key prefix and how its values are written.
#[derive(Clone, Copy)]
struct Target<'a> {
    prefix: &'a str,
    format: Format,
}

/// Where a watch resumes from, and which cluster that revision belongs to.
struct Position {
    revision: i64,
    cluster_id: u64,
}

/// The discovery task: list, watch, resume the watch after failures, list again when it cannot.
async fn run(
    etcd: Etcd,
    prefix: Arc<str>,
    format: Format,
    tx: watch::Sender<Membership>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::etcd_task();
    let mut carried: Option<Carried> = None;
    loop {
        let listed = tokio::select! {
            _ = cancel.cancelled() => return,
            listed = list(&etcd, &prefix, format) => listed,
        };
        let mut position = match listed {
            Ok((mut instances, position)) => {
                // Counted without waking subscribers: nothing they can see changed yet.
                tx.send_if_modified(|m| {
                    m.lists += 1;
                    false
                });
                if let Some(c) = &mut carried {
                    c.ids.retain(|id| !instances.contains_key(id));
                }
                publish(&tx, &prefix, position.revision, |current, departed| {
                    // Keep what a rebuilt cluster has not re-listed yet (see REBUILD_GRACE).
                    for id in carried.iter().flat_map(|c| &c.ids) {
                        if let Some(old) = current.get(id) {
                            instances.insert(old.clone());
                        }
                    }
                    current.replace_with(&instances, departed, position.revision);
                });
                position
            }
            Err(e) => {
                report_problem(&tx, &prefix, &e);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
        };

        loop {
            let watched = watch_from(
                &etcd,
                Target {
                    prefix: &prefix,
                    format,
                },
                &mut position,
                &tx,
                &cancel,
                &mut backoff,
                &mut carried,
            );
            match watched.await {
                WatchEnd::Cancelled => return,
                WatchEnd::Resume { reason } => {
                    debug!(prefix = %prefix, %reason, revision = position.revision, "resuming the watch");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
                WatchEnd::Relist { reason, cause } => {
                    info!(prefix = %prefix, %reason, "re-listing");
                    metrics::relist(&prefix, cause);
                    if cause == "rebuilt" {
                        let ids = tx.borrow().instances.keys().cloned().collect();
                        carried = Some(Carried {
                            ids,
                            until: Instant::now() + REBUILD_GRACE,
                        });
                    }
                    break;
                }
            }
        }
    }
}

/// Keys asked for per page of a list. A single get of 100,000 records (about 13 MB) would be
/// refused by gRPC's default 4 MiB message limit; pages of 5,000 typical records stay far below
/// the [`LIST_MESSAGE_LIMIT`] at any fleet size.
const LIST_PAGE: i64 = 5_000;

/// The largest list response accepted: 5,000 records of up to 12 KiB. A page of larger records
/// (etcd accepts values up to 1.5 MiB) is asked for again in halves.
const LIST_MESSAGE_LIMIT: usize = 64 * 1024 * 1024;

/// Lists the prefix with linearizable gets: every instance plus the revision of that view. Large
/// services are read in pages, every page after the first at the first page's revision, so the
/// pages together are one consistent view (a compaction in between fails the list, which is then
/// retried from scratch).
async fn list(etcd: &Etcd, prefix: &str, format: Format) -> Result<(Instances, Position)> {
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut page = LIST_PAGE;
    let mut position: Option<Position> = None;
    let mut found: Vec<Instance> = Vec::new();
    loop {
        let at = position.as_ref().map_or(0, |p| p.revision);
        let (start, end) = (&from, &end);
        let answer = etcd
            .call("get", prefix, |c| async move {
                let options = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(page)
                    .with_revision(at);
                c.kv_client()
                    .max_decoding_message_size(LIST_MESSAGE_LIMIT)
                    .get(start.clone(), Some(options))
                    .await
            })
            .await;
        let resp = match answer {
            Ok(resp) => resp,
            Err(e) if page > 1 && is_too_large(&e) => {
                page /= 2;
                debug!(
                    prefix,
                    page, "a page of the list was too large; asking for fewer keys"
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        // The first page fixes the revision (and cluster) the whole list reflects.
        position.get_or_insert_with(|| Position {
            revision: resp.header().map_or(0, |h| h.revision()),
            cluster_id: resp.header().map_or(0, |h| h.cluster_id()),
        });
        found.extend(
            resp.kvs()
                .iter()
                .filter_map(|kv| decode(prefix, format, kv)),
        );
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                // The next page starts just after the last key of this one.
                from = last.key().to_vec();
                from.push(0);
            }
            _ => {
                let position = position.unwrap_or(Position {
                    revision: 0,
                    cluster_id: 0,
                });
                return Ok((found.into_iter().collect(), position));
            }
        }
    }
}

/// Whether etcd's answer was refused for its size (gRPC `OUT_OF_RANGE`, "message length too
/// large").
fn is_too_large(error: &Error) -> bool {
    matches!(
        error,
        Error::Etcd {
            source: etcd_client::Error::GRpcStatus(status),
            ..
        } if status.code() == tonic::Code::OutOfRange
    )
}

/// The end of the key range holding every key that starts with `prefix`: the prefix with its last
/// byte below 0xff incremented (etcd's convention; our prefixes end with '/').
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: every key from the prefix on (etcd's "\0" range end).
    vec![0]
}

/// Watches the prefix from `position.revision + 1`, applying every event to the published
/// membership and advancing `position` only past events actually received.
async fn watch_from(
    etcd: &Etcd,
    target: Target<'_>,
    position: &mut Position,
    tx: &watch::Sender<Membership>,
    cancel: &CancellationToken,
    backoff: &mut Backoff,
    carried: &mut Option<Carried>,
) -> WatchEnd {
    let Target { prefix, format } = target;
    let start = position.revision + 1;
    let open = etcd.call("watch", prefix, |mut c| async move {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start)
            .with_progress_notify();
        c.watch(prefix, Some(options)).await
    });
    let opened = tokio::select! {
        _ = cancel.cancelled() => return WatchEnd::Cancelled,
        opened = open => opened,
    };
    let mut stream = match opened {
        Ok(stream) => stream,
        Err(e) => {
            report_problem(tx, prefix, &e);
            return WatchEnd::Resume {
                reason: "the watch could not be opened".into(),
            };
        }
    };

    loop {
        let grace_ends = carried.as_ref().map(|c| c.until);
        let message = tokio::select! {
            _ = cancel.cancelled() => return WatchEnd::Cancelled,
            message = stream.message() => message,
            _ = crate::sync::sleep_until_some(grace_ends) => {
                if let Some(c) = carried.take() {
                    info!(prefix, count = c.ids.len(), "dropping instances the rebuilt etcd cluster never listed again");
                    publish(tx, prefix, position.revision, |instances, _| {
                        for id in &c.ids {
                            instances.remove(id);
                        }
                    });
                }
                continue;
            }
        };
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                return WatchEnd::Resume {
                    reason: "etcd closed the watch stream".into(),
                };
            }
            Err(e) => {
                let e = Error::Etcd {
                    op: "watch",
                    key: prefix.to_owned(),
                    endpoints: etcd.endpoints(),
                    source: e,
                };
                report_problem(tx, prefix, &e);
                return WatchEnd::Resume {
                    reason: "the watch stream failed".into(),
                };
            }
        };
        if resp.canceled() {
            return WatchEnd::Relist {
                cause: if resp.compact_revision() > 0 {
                    "compacted"
                } else {
                    "cancelled"
                },
                reason: if resp.compact_revision() > 0 {
                    format!(
                        "revision {} was compacted (oldest kept: {}); events were missed",
                        position.revision + 1,
                        resp.compact_revision()
                    )
                } else {
                    format!("etcd cancelled the watch: {:?}", resp.cancel_reason())
                },
            };
        }
        let (header_revision, cluster_id) = resp
            .header()
            .map_or((0, 0), |h| (h.revision(), h.cluster_id()));
        if cluster_id != position.cluster_id {
            // The endpoints now lead to a different cluster (rebuilt from scratch, restored from a
            // snapshot): its revisions say nothing about ours.
            return WatchEnd::Relist {
                cause: "rebuilt",
                reason: format!(
                    "etcd cluster id changed from {:x} to {cluster_id:x}",
                    position.cluster_id
                ),
            };
        }
        if resp.created() {
            if header_revision < position.revision {
                return WatchEnd::Relist {
                    cause: "rebuilt",
                    reason: format!(
                        "etcd's revision went back from {} to {header_revision}",
                        position.revision
                    ),
                };
            }
            // The watch is established: whatever went wrong before is over.
            backoff.reset();
            clear_problem(tx, prefix);
        }
        let events = resp.events();
        match events.last().and_then(|e| e.kv()) {
            Some(kv) => position.revision = position.revision.max(kv.mod_revision()),
            // A progress notification: every event up to the header's revision has been sent.
            // (Not so for the `created` response of a watch still catching up.)
            None if !resp.created() => position.revision = position.revision.max(header_revision),
            None => {}
        }
        if events.is_empty() {
            continue;
        }
        publish(tx, prefix, position.revision, |instances, departed| {
            for event in events {
                let Some(kv) = event.kv() else { continue };
                let Ok(key) = kv.key_str() else { continue };
                let Some(id) = key::instance_id(prefix, key) else {
                    if event.event_type() == EventType::Put {
                        warn!(
                            key,
                            prefix, "skipping a key outside the layout <prefix><instance-id>"
                        );
                    }
                    continue;
                };
                if let Some(c) = carried.as_mut() {
                    // The rebuilt cluster has spoken about this instance: no longer carried.
                    c.ids.remove(id);
                }
                match event.event_type() {
                    EventType::Delete => {
                        if let Some(old) = instances.remove(id) {
                            departed.gone(&old, kv.mod_revision());
                        }
                    }
                    EventType::Put => match decode(prefix, format, kv) {
                        Some(instance) => {
                            departed.back(id);
                            instances.insert(instance);
                        }
                        // An unreadable new value makes the old one stale too.
                        None => {
                            instances.remove(id);
                        }
                    },
                }
            }
        });
    }
}

/// Decodes one key-value pair, or warns once and returns `None`.
fn decode(prefix: &str, format: Format, kv: &KeyValue) -> Option<Instance> {
    let key = String::from_utf8_lossy(kv.key());
    let Some(id) = key::instance_id(prefix, &key) else {
        warn!(key = %key, prefix, "skipping a key outside the layout <prefix><instance-id>");
        return None;
    };
    match format.decode(kv.value()) {
        Ok(endpoint) => Some(Instance {
            id: id.to_owned(),
            key: key.to_string(),
            addr: endpoint.addr,
            metadata: endpoint.metadata,
        }),
        Err(error) => {
            warn!(key = %key, %error, "skipping an endpoint record that does not decode");
            None
        }
    }
}

/// Applies `update` to a snapshot of the current instances (and of the draining departures) and
/// publishes the result; then logs each change. Subscribers are only woken when something they
/// can see changed.
///
/// Every step costs in proportion to the change, not to the fleet: the snapshot is a persistent
/// map (taking it is O(1), each update O(log n)) and the diff skips what the two share. The
/// logging happens after the channel's lock is released.
fn publish(
    tx: &watch::Sender<Membership>,
    prefix: &str,
    revision: i64,
    update: impl FnOnce(&mut Instances, &mut Departed),
) {
    let mut summary = ChangeSummary::default();
    tx.send_if_modified(|m| {
        let mut instances = m.instances.clone();
        update(&mut instances, &mut m.departed);
        summary = ChangeSummary::of(&m.instances, &instances);
        let first_sync = !m.synced;
        m.revision = revision;
        m.synced = true;
        if summary.is_empty() && !first_sync {
            return false;
        }
        m.instances = instances;
        true
    });
    if summary.is_empty() {
        debug!(prefix, revision, "no membership change");
        return;
    }
    metrics::discovery_update(prefix);
    summary.log(prefix);
}

/// Beyond this many changes at once (a first list, a re-list) the log gets a summary line instead
/// of a line per instance: 100,000 lines would cost more than the list itself.
const CHANGES_LOGGED_ONE_BY_ONE: usize = 20;

/// What one publication changed: counted without copying an instance, and the changes themselves
/// only when few enough to log one by one.
#[derive(Default)]
struct ChangeSummary {
    added: usize,
    removed: usize,
    updated: usize,
    few: Vec<Change>,
}

impl ChangeSummary {
    fn of(old: &Instances, new: &Instances) -> Self {
        let mut summary = Self::default();
        for item in old.0.diff(&new.0) {
            match item {
                imbl::ordmap::DiffItem::Add(..) => summary.added += 1,
                imbl::ordmap::DiffItem::Remove(..) => summary.removed += 1,
                imbl::ordmap::DiffItem::Update { .. } => summary.updated += 1,
            }
        }
        if summary.len() <= CHANGES_LOGGED_ONE_BY_ONE {
            summary.few = old.diff(new).collect();
        }
        summary
    }

    fn len(&self) -> usize {
        self.added + self.removed + self.updated
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn log(&self, prefix: &str) {
        for change in &self.few {
            match change {
                Change::Added(i) => info!(prefix, id = %i.id, addr = %i.addr, "instance added"),
                Change::Removed(i) => info!(prefix, id = %i.id, addr = %i.addr, "instance removed"),
                Change::Updated { new, .. } => {
                    info!(prefix, id = %new.id, addr = %new.addr, "instance updated")
                }
            }
        }
        if self.few.is_empty() {
            info!(
                prefix,
                added = self.added,
                removed = self.removed,
                updated = self.updated,
                "membership changed"
            );
        }
    }
}

/// Records a problem and publishes it, warning, only when it is a new one by the crate's one rule
/// (see [`Problem`]).
fn report_problem(tx: &watch::Sender<Membership>, prefix: &str, error: &Error) {
    tx.send_if_modified(|m| {
        let Some(problem) = m.tracked.of(error).map(str::to_owned) else {
            return false;
        };
        warn!(prefix, %problem, known = m.instances.len(), "discovery cannot reach etcd; keeping the last known instances and retrying");
        m.problem = Some(problem);
        true
    });
}

fn clear_problem(tx: &watch::Sender<Membership>, prefix: &str) {
    tx.send_if_modified(|m| {
        m.tracked.clear();
        let had = m.problem.take().is_some();
        if had {
            info!(prefix, "discovery is in sync with etcd again");
        }
        had
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, addr: &str) -> Instance {
        Instance {
            id: id.into(),
            key: format!("services/s/{id}"),
            addr: addr.into(),
            metadata: Value::Null,
        }
    }

    fn map(items: &[Instance]) -> Instances {
        items.iter().cloned().collect()
    }

    fn diff(old: &Instances, new: &Instances) -> Vec<Change> {
        old.diff(new).collect()
    }

    fn draining(id: &str) -> Instance {
        Instance {
            metadata: serde_json::json!({ "draining": true }),
            ..instance(id, "h:1")
        }
    }

    #[test]
    fn only_draining_departures_are_recorded_and_a_return_forgets_one() {
        let mut departed = Departed::default();
        departed.gone(&instance("a", "h:1"), 5);
        departed.gone(&draining("b"), 6);
        assert!(!departed.contains("a"));
        assert!(departed.contains("b"));
        departed.back("b");
        assert!(!departed.contains("b"));
    }

    #[test]
    fn departures_beyond_the_bound_forget_the_oldest() {
        let mut departed = Departed::default();
        let total = 2 * DEPARTED_KEPT + 1;
        for n in 0..total {
            departed.gone(&draining(&format!("i{n:05}")), n as i64);
        }
        assert_eq!(departed.0.len(), DEPARTED_KEPT);
        assert!(departed.contains(&format!("i{:05}", total - 1)));
        assert!(!departed.contains(&format!("i{:05}", total - DEPARTED_KEPT - 1)));
    }

    #[test]
    fn a_re_list_records_draining_departures_too() {
        let mut current = map(&[draining("a"), instance("b", "h:2")]);
        let mut departed = Departed::default();
        current.replace_with(&map(&[instance("b", "h:2")]), &mut departed, 9);
        assert!(departed.contains("a"));
        current.replace_with(
            &map(&[instance("a", "h:1"), instance("b", "h:2")]),
            &mut departed,
            10,
        );
        assert!(!departed.contains("a"));
        // From nothing (every instance gone), a list brings an instance back as well.
        let mut current = map(&[draining("a")]);
        current.replace_with(&Instances::default(), &mut departed, 11);
        assert!(departed.contains("a"));
        current.replace_with(&map(&[instance("a", "h:1")]), &mut departed, 12);
        assert!(!departed.contains("a"));
    }

    #[test]
    fn a_prefix_range_ends_just_past_the_prefix() {
        assert_eq!(prefix_end(b"services/s/"), b"services/s0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn diff_reports_added_removed_and_updated_in_id_order() {
        let old = map(&[
            instance("a", "h:1"),
            instance("b", "h:2"),
            instance("c", "h:3"),
        ]);
        let new = map(&[
            instance("a", "h:1"),
            instance("c", "h:33"),
            instance("d", "h:4"),
        ]);
        assert_eq!(
            diff(&old, &new),
            [
                Change::Removed(instance("b", "h:2")),
                Change::Updated {
                    old: instance("c", "h:3"),
                    new: instance("c", "h:33")
                },
                Change::Added(instance("d", "h:4")),
            ]
        );
        assert!(diff(&new, &new).is_empty());
        assert_eq!(diff(&Instances::default(), &old).len(), 3);
    }
}
