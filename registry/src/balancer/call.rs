//! One call through the balanced channel: the pick (waiting, within the call's deadline, while the
//! channel is still starting), the attempt on one backend, and the retries that are safe.
//!
//! Every failure becomes a gRPC status here and nowhere else, naming the instance it went to.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::time::Instant;
use tonic::{Status, body::Body};
use tracing::{debug, warn};

use super::{
    BoxError, HASH_KEY, INSTANCE, ServedBy, Shared,
    backend::Backend,
    picker::Policy,
    retry::{
        CallBody, Replay, grpc_timeout, is_failing, is_unavailable, never_sent,
        trailers_only_status,
    },
    transport::{self, Connection},
};
use crate::sync::Unpoisoned;
use crate::{backoff::Backoff, error::chain, metrics};

impl Shared {
    /// Like [`Shared::pick`], but while the answer may still change for the better (discovery has
    /// not completed its first list or has instances not applied yet, an instance is still making
    /// its first connection, or the picker is behind a change) waits for it, until `deadline`.
    /// This is gRPC's behaviour for a channel that is still connecting; once everything known has
    /// been tried, a call fails at once. `now` is the caller's clock reading; the pick returns the
    /// one it was made at (later, if it waited), so a call reads the clock as rarely as it can.
    async fn pick_or_wait(
        &self,
        avoid: &[Arc<str>],
        key: Option<&[u8]>,
        deadline: Instant,
        mut now: Instant,
    ) -> Result<(Arc<Backend>, Connection, Instant), Status> {
        loop {
            // The fast path is the pick alone. Only a failed pick asks whether the channel is
            // still starting, and that answer counts only if no new picker was published since
            // the pick: otherwise the pick looked at a picker already replaced, so look again.
            let published = self.rebuild_published.load(Ordering::SeqCst);
            let status = match self.pick(avoid, key, now) {
                Ok((backend, connection)) => return Ok((backend, connection, now)),
                Err(status) => status,
            };
            // Registered before the checks: a rebuild after them wakes this call, and one
            // before them shows in the published count.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let starting = self.still_starting();
            if self.rebuild_published.load(Ordering::SeqCst) != published {
                continue;
            }
            if !starting {
                return Err(status);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(Status::deadline_exceeded(format!(
                    "no instance of service {:?} became reachable before the call's deadline",
                    self.service
                )));
            }
            now = Instant::now();
        }
    }

    /// Whether a failed pick may still turn into a success without anything new happening: the
    /// first list is not done, discovery knows instances the updater has not applied yet, a
    /// backend has not finished its first connection attempt, or a change has not reached the
    /// picker yet. This one check is what "the channel is still starting" means, for every
    /// caller. Each part is published before the next is cleared (backends are counted as
    /// connecting before their snapshot is marked applied; a connection asks for a rebuild before
    /// its first attempt ends), so reading them in this order cannot see a gap.
    fn still_starting(&self) -> bool {
        let membership = self.membership.borrow();
        if !membership.synced {
            return true;
        }
        let applied = self.applied.locked();
        !membership.instances.same_snapshot(&applied)
            || self.connecting.load(Ordering::SeqCst) > 0
            || self.rebuild_requested.load(Ordering::SeqCst)
                != self.rebuild_published.load(Ordering::SeqCst)
    }

    /// The policy's choice and its connection. Prefers, in order: an instance not in `avoid` (those a
    /// retried call already failed on) and not ejected; any instance not ejected; and, when every
    /// one is ejected, any instance at all (ejecting them all would turn a partial failure into an
    /// outage).
    fn pick(
        &self,
        avoid: &[Arc<str>],
        key: Option<&[u8]>,
        now: Instant,
    ) -> Result<(Arc<Backend>, Connection), Status> {
        // Picked under the read lock rather than from a clone of the `Arc`: a call then writes
        // the lock's count and not also the picker's reference count, both shared by every
        // thread calling.
        let picker = crate::sync::read(&self.picker);
        let fresh = |b: &Arc<Backend>| b.is_ready() && !b.is_ejected(now);
        let choice = picker
            .pick(&self.next, key, |b| fresh(b) && !avoid.contains(&b.addr))
            .or_else(|| picker.pick(&self.next, key, fresh))
            .or_else(|| picker.pick(&self.next, key, |b| b.is_ready()));
        // The connection can drop between the check and here; the next rebuild removes it.
        let chosen = choice.and_then(|backend| Some((backend.clone(), backend.connection()?)));
        drop(picker);
        chosen.ok_or_else(|| self.unavailable())
    }

    /// Sends one attempt to `backend`, bounded by `deadline`, counting it in flight while it runs
    /// and recording its outcome and how long it took from `started`.
    async fn send(
        &self,
        backend: &Arc<Backend>,
        connection: Connection,
        request: http::Request<CallBody>,
        deadline: Instant,
        started: Instant,
    ) -> Sent {
        let in_flight = backend.start_call();
        let outcome = tokio::time::timeout_at(deadline, connection.send(request)).await;
        drop(in_flight);
        let (sent, attempt) = match outcome {
            Ok(Ok(response)) => {
                // Read once: it decides both the instance's record and whether to retry.
                let status = trailers_only_status(&response);
                let attempt = if status.is_some_and(is_failing) {
                    Attempt::Failed
                } else {
                    Attempt::Succeeded
                };
                (Sent::Answered(response, status), attempt)
            }
            // The caller's deadline, which may be far shorter than the instance needs: the call
            // failed, but that says nothing about the instance (a frozen one is found by the
            // connection's stall check instead).
            Err(_) => (Sent::OutOfTime, Attempt::OutOfTime),
            Ok(Err(error)) => (Sent::Failed(error), Attempt::Failed),
        };
        self.record(backend, attempt, started);
        sent
    }

    /// Counts an attempt's outcome: in the metrics, and (unless the call ran out of its own time)
    /// towards the instance's outlier detection.
    fn record(&self, backend: &Backend, attempt: Attempt, started: Instant) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(started);
        backend
            .metrics
            .call(now, elapsed, attempt != Attempt::Succeeded);
        match attempt {
            Attempt::Succeeded => backend.record_success(),
            Attempt::OutOfTime => {}
            Attempt::Failed => {
                if let Some(length) = backend.record_failure(&self.outlier, now) {
                    warn!(
                        service = %self.service,
                        addr = %backend.addr,
                        id = %backend.instance_id,
                        failures = self.outlier.consecutive_failures,
                        ejected_for = ?length,
                        "instance ejected after consecutive failures"
                    );
                    metrics::ejected(&self.service, &backend.addr, "outlier");
                }
            }
        }
    }

    fn unavailable(&self) -> Status {
        let known = self.backends.locked().len();
        Status::unavailable(if known == 0 {
            format!("no instances of service {:?} are registered", self.service)
        } else {
            format!(
                "none of the {known} instance(s) of service {:?} is reachable right now",
                self.service
            )
        })
    }

    /// One call: pick, send, and on a failure that is safe to retry, send again elsewhere, all
    /// within the call's deadline.
    pub(super) async fn call(
        self: Arc<Self>,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, BoxError> {
        let timeout =
            grpc_timeout(&request).map_or(self.call_timeout, |t| t.min(self.call_timeout));
        let started = Instant::now();
        let deadline = started + timeout;
        // Only a policy that hashes needs the key: a header lookup saved on every other call.
        let key = match self.policy {
            Policy::ConsistentHash => request
                .headers()
                .get(&HASH_KEY_HEADER)
                .map(|k| k.as_bytes().to_vec()),
            _ => None,
        };
        let key = key.as_deref();
        if !self.retry.enabled() {
            let mut request = request;
            let (backend, connection, now) = self.pick_or_wait(&[], key, deadline, started).await?;
            // After the pick: time spent waiting for an instance is no longer the server's.
            set_grpc_timeout(request.headers_mut(), deadline, now);
            let (parts, body) = request.into_parts();
            let request = http::Request::from_parts(parts, Replay::once(body).await);
            return match self
                .send(&backend, connection, request, deadline, now)
                .await
            {
                Sent::Answered(response, _) => Ok(served_by(response, &backend)),
                Sent::OutOfTime => Err(deadline_exceeded(&backend, timeout).into()),
                Sent::Failed(error) => Err(transport_failure(&backend, &error).into()),
            };
        }

        let idempotent = self.retry.is_idempotent(request.uri().path());
        let (mut parts, body) = request.into_parts();
        transport::identify(&mut parts.headers);
        // Later attempts get the method, URI and headers again; extensions stay with the first
        // (nothing below the balancer reads them, and copying them costs on every call).
        let mut extensions = Some(std::mem::take(&mut parts.extensions));
        let body = Replay::new(body, self.retry.max_replay_bytes).await;
        let mut backoff = Backoff::new(self.retry.backoff_initial, self.retry.backoff_max);
        let mut tried: Vec<Arc<str>> = Vec::new();
        self.budget.deposit(started);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let now = if attempt == 1 {
                started
            } else {
                Instant::now()
            };
            let (backend, connection, now) = self.pick_or_wait(&tried, key, deadline, now).await?;
            set_grpc_timeout(&mut parts.headers, deadline, now);
            let mut request = http::Request::from_parts(parts.clone(), body.attempt());
            if let Some(extensions) = extensions.take() {
                *request.extensions_mut() = extensions;
            }
            let (safe, failure) = match self
                .send(&backend, connection, request, deadline, now)
                .await
            {
                Sent::OutOfTime => return Err(deadline_exceeded(&backend, timeout).into()),
                Sent::Answered(response, Some(status)) if idempotent && is_unavailable(status) => {
                    (true, Ok(served_by(response, &backend)))
                }
                Sent::Answered(response, _) => return Ok(served_by(response, &backend)),
                Sent::Failed(error) => (
                    idempotent || never_sent(&error),
                    Err(transport_failure(&backend, &error)),
                ),
            };
            let retry = safe
                && attempt < self.retry.max_attempts
                && body.replayable()
                && Instant::now() < deadline
                && self.budget.try_withdraw();
            if !retry {
                return failure.map_err(BoxError::from);
            }
            debug!(service = %self.service, addr = %backend.addr, attempt, "call failed before being processed; retrying on another instance");
            tried.push(backend.addr.clone());
            tokio::time::sleep_until((Instant::now() + backoff.next_delay()).min(deadline)).await;
        }
    }
}

/// What became of one attempt.
enum Sent {
    /// The instance answered, with this trailers-only `grpc-status` if the answer is one.
    Answered(http::Response<Body>, Option<u32>),
    /// The transport failed.
    Failed(hyper::Error),
    /// The call's deadline passed first.
    OutOfTime,
}

/// How one attempt on an instance ended, as far as judging the instance goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Succeeded,
    /// The instance failed the call (a transport error, or a status saying it is failing).
    Failed,
    /// The call's deadline passed first.
    OutOfTime,
}

/// The header a call's deadline travels in.
const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// [`HASH_KEY`] as a header name, parsed once.
const HASH_KEY_HEADER: http::HeaderName = http::HeaderName::from_static(HASH_KEY);

thread_local! {
    /// The last `grpc-timeout` value formatted on this thread: calls with the same deadline
    /// left, to the millisecond (the common case under load with one call timeout), share one
    /// header value instead of formatting and allocating their own.
    static LAST_TIMEOUT: std::cell::RefCell<Option<(u128, http::HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// Tells the server how long the call has left at `now` (`grpc-timeout`), so it can give up when
/// we do.
fn set_grpc_timeout(headers: &mut http::HeaderMap, deadline: Instant, now: Instant) {
    let millis = deadline.saturating_duration_since(now).as_millis().max(1);
    let value = LAST_TIMEOUT.with_borrow_mut(|last| match last {
        Some((m, value)) if *m == millis => Some(value.clone()),
        _ => {
            let value = http::HeaderValue::try_from(format!("{millis}m")).ok()?;
            *last = Some((millis, value.clone()));
            Some(value)
        }
    });
    if let Some(value) = value {
        headers.insert(GRPC_TIMEOUT, value);
    }
}

/// Marks a response with the instance that served it.
fn served_by(mut response: http::Response<Body>, backend: &Backend) -> http::Response<Body> {
    response.extensions_mut().insert(ServedBy {
        addr: backend.addr.clone(),
        instance_id: backend.instance_id.clone(),
    });
    response
}

/// The one place transport failures become gRPC statuses, naming the instance. Any failure at the
/// transport level means the connection is unusable, so the instance leaves the rotation now
/// rather than when its socket reports it.
fn transport_failure(backend: &Backend, error: &hyper::Error) -> Status {
    backend.report_broken();
    blame(
        Status::unavailable(format!(
            "instance {} ({}) failed: {}",
            backend.addr,
            backend.instance_id,
            chain(error)
        )),
        backend,
    )
}

fn deadline_exceeded(backend: &Backend, timeout: Duration) -> Status {
    blame(
        Status::deadline_exceeded(format!(
            "no answer from instance {} ({}) within the call's {timeout:?} deadline",
            backend.addr, backend.instance_id
        )),
        backend,
    )
}

/// Names the instance a failed call went to in the status's metadata ([`INSTANCE`]).
fn blame(mut status: Status, backend: &Backend) -> Status {
    if let Ok(addr) = backend.addr.parse() {
        status.metadata_mut().insert(INSTANCE, addr);
    }
    status
}
