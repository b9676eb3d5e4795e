//! The connection task of one backend: connect, prove the connection is answered, follow the
//! instance's health while it lives, notice the moment its socket closes, reconnect with backoff.
//!
//! A balancer that waited for calls to fail would keep picking a crashed instance until discovery
//! removes it: with a 10 s lease, up to 10 s of failed calls. Here the socket itself reports
//! (`transport`): on loopback a SIGKILLed server's socket is closed by the kernel, so the instance
//! is taken out of rotation before any call is sent to it.
//!
//! A new connection enters the rotation only once the server has answered a health check (the kernel
//! accepts TCP connections for a frozen process, so "connected" alone proves nothing), and while it
//! lives the instance's `grpc.health.v1` status is polled: NOT_SERVING takes it out of rotation.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tracing::{debug, info, warn};

use super::{
    backend::{Backend, Live},
    transport::{Connection, Liveness, Target},
};
use crate::{backoff::Backoff, metrics, problem::Problem};

/// Keeps `backend` connected until `stop` fires: connect, wait for the socket to close, mark the
/// backend unusable, reconnect with capped backoff. `on_change` is called whenever the backend becomes
/// usable or unusable.
pub(crate) async fn maintain(
    backend: Arc<Backend>,
    target: Target,
    health_interval: Duration,
    on_change: impl Fn(),
    mut first_attempt: FirstAttempt,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::reconnect();
    let mut problem = Problem::default();
    let mut connected_before = false;
    let probe_timeout = target.dial().probe_timeout();
    loop {
        let closed = CancellationToken::new();
        let connected = async {
            let (connection, liveness) = target.connect(closed.clone()).await?;
            let serving = probe(&connection, probe_timeout).await?;
            Ok::<_, String>((connection, liveness, serving))
        };
        let connected = tokio::select! {
            _ = stop.cancelled() => break,
            connected = connected => connected,
        };
        // The first attempt ends once its outcome is visible (the backend published and a picker
        // rebuild requested, or the failure known), never before: a call that sees "nothing
        // connecting" must also see the connection, or fail for a reason.
        match connected {
            Ok((connection, liveness, serving)) => {
                info!(addr = %backend.addr, id = %backend.instance_id, serving, "connected; instance in rotation");
                if connected_before {
                    metrics::readmitted(&backend.service, &backend.addr);
                }
                connected_before = true;
                backend.serving.store(serving, Ordering::Release);
                backend.health_answered.store(true, Ordering::Release);
                backend.connections.fetch_add(1, Ordering::AcqRel);
                backend.reset_outlier();
                backend.set(Some(Live {
                    connection: connection.clone(),
                    closed: closed.clone(),
                }));
                on_change();
                first_attempt.done();
                backoff.reset();
                problem.clear();
                // Stop first: a channel dropped closes its connections too, and that is no loss
                // to warn about.
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    _ = closed.cancelled() => {}
                    _ = watch_health(&backend, connection.clone(), health_interval, probe_timeout, &on_change) => {}
                    stalled = watch_stall(&backend, connection, &liveness, target.dial().keep_alive_interval, target.dial().keep_alive_timeout) => {
                        warn!(addr = %backend.addr, id = %backend.instance_id, problem = %stalled, "connection stalled; closing it");
                        liveness.shut_down();
                    }
                }
                backend.set(None);
                on_change();
                if stop.is_cancelled() {
                    break;
                }
                metrics::ejected(&backend.service, &backend.addr, "connection");
                warn!(addr = %backend.addr, id = %backend.instance_id, "connection lost; instance out of rotation until it reconnects");
            }
            Err(failed) => {
                if let Some(problem) = problem.text(failed) {
                    warn!(addr = %backend.addr, id = %backend.instance_id, problem, "cannot connect; retrying with backoff");
                } else {
                    debug!(addr = %backend.addr, "still cannot connect");
                }
                // Calls waiting for this backend's first connection can stop waiting (a no-op
                // after the first attempt).
                first_attempt.done();
                on_change();
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
    backend.set(None);
    debug!(addr = %backend.addr, "connection maintainer stopped");
}

/// Proves a new connection is answered before the instance enters the rotation, and returns whether
/// the instance says it is serving. Connecting alone proves little: the kernel completes the TCP
/// handshake for a frozen (SIGSTOPped) process, and the HTTP/2 handshake does not wait for the
/// server. One `grpc.health.v1.Health/Check` does: any gRPC answer (even UNIMPLEMENTED, from a
/// server without a health service, which then counts as serving) means it processes requests.
async fn probe(connection: &Connection, timeout: Duration) -> Result<bool, String> {
    let mut health = HealthClient::new(connection.clone());
    match check(&mut health, timeout).await {
        Health::Serving(serving) => Ok(serving),
        Health::NoService => Ok(true),
        Health::NoAnswer(why) => Err(why),
    }
}

/// What one `grpc.health.v1.Health/Check` said.
enum Health {
    /// An answer: SERVING (or anything but NOT_SERVING), or NOT_SERVING.
    Serving(bool),
    /// The server has no health service (UNIMPLEMENTED, or NOT_FOUND for the overall status):
    /// it counts as serving and is not asked again.
    NoService,
    /// No answer in time, or a failed call.
    NoAnswer(String),
}

/// Asks for the overall health (service ""), bounded by `timeout`: the one health request, made
/// by the first probe and by every poll after it.
async fn check(health: &mut HealthClient<Connection>, timeout: Duration) -> Health {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(timeout, health.check(request)).await {
        Err(_) => Health::NoAnswer(format!("no answer to a health check within {timeout:?}")),
        Ok(Ok(reply)) => Health::Serving(reply.get_ref().status() != ServingStatus::NotServing),
        Ok(Err(status)) => match status.code() {
            Code::Unimplemented | Code::NotFound => Health::NoService,
            _ => Health::NoAnswer(format!("health check failed: {status}")),
        },
    }
}

/// Follows the instance's health while the connection lives, so an instance that reports
/// NOT_SERVING (draining, or flipped by an operator) leaves the rotation and comes back when SERVING
/// again: a `grpc.health.v1.Health/Check` every `interval`, each bounded by `timeout`.
///
/// Polling rather than holding a `Health/Watch` stream open, on purpose: an open stream would
/// keep a draining server from finishing its graceful shutdown, and would count as a call in
/// flight for the stall check. An instance without a health service (UNIMPLEMENTED) simply stays
/// serving and is not asked again.
async fn watch_health(
    backend: &Backend,
    connection: Connection,
    interval: Duration,
    timeout: Duration,
    on_change: &impl Fn(),
) {
    let mut health = HealthClient::new(connection);
    loop {
        tokio::time::sleep(interval).await;
        let serving = match check(&mut health, timeout).await {
            Health::Serving(serving) => serving,
            Health::NoService => return std::future::pending().await,
            // No answer: the connection's own checks (socket, stall check) decide about the
            // rotation; but an instance in removal grace is only kept on the strength of its
            // answers, so it leaves now.
            Health::NoAnswer(_) => {
                if backend.health_answered.swap(false, Ordering::AcqRel) {
                    debug!(addr = %backend.addr, id = %backend.instance_id, "health check unanswered");
                    on_change();
                }
                continue;
            }
        };
        if !backend.health_answered.swap(true, Ordering::AcqRel) {
            on_change();
        }
        if backend.serving.swap(serving, Ordering::AcqRel) != serving {
            info!(addr = %backend.addr, id = %backend.instance_id, serving, "health changed");
            if serving {
                metrics::readmitted(&backend.service, &backend.addr);
            } else {
                metrics::ejected(&backend.service, &backend.addr, "health");
            }
            on_change();
        }
    }
}

/// Returns once the connection looks frozen: calls are waiting on it, nothing has been read for
/// about `quiet` (three quarters of it to all of it), and a health check then goes unanswered for
/// `timeout`. The kernel keeps a frozen (SIGSTOPped) or wedged process's socket open, so neither
/// the socket nor the deadline of each call would take it out of rotation; this does, within
/// `quiet + timeout` of the last byte read.
///
/// "Nothing read" is judged by the instance, not by this process: bytes waiting unread in the
/// socket, or read while the probe was out, count as an answer, so a client too busy to read in
/// time does not close its own live connections.
///
/// It does the work HTTP/2 keep-alive pings did, off the call path: a read only bumps a counter,
/// and this task looks at it four times per `quiet` (a timer wake-up per connection, not per
/// call). The probe is the health check (any answer counts, UNIMPLEMENTED included),
/// which no server counts as ping abuse. A connection whose calls are merely slow answers it,
/// and is left alone.
async fn watch_stall(
    backend: &Backend,
    connection: Connection,
    liveness: &Liveness,
    quiet: Duration,
    timeout: Duration,
) -> String {
    let mut health = HealthClient::new(connection);
    let busy_tick = (quiet / 4).max(Duration::from_millis(1));
    // The counter is looked at once per tick, so a read is seen up to a tick late: asking for a
    // tick less of silence keeps the probe within `quiet` of the last read.
    let silence = quiet.saturating_sub(busy_tick);
    // Always the short tick: after a longer idle one, a read just before a freeze would be seen
    // up to that long late, and the freeze found as late (measured: 1.73 s instead of 1.5 s).
    let mut tick = tokio::time::interval(busy_tick);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut reads, mut since) = (liveness.reads(), Instant::now());
    loop {
        let now = tick.tick().await;
        let now_reads = liveness.reads();
        if now_reads != reads || backend.in_flight() == 0 {
            (reads, since) = (now_reads, now);
            continue;
        }
        if now.saturating_duration_since(since) < silence {
            continue;
        }
        // Bytes waiting in the socket mean the instance is sending and this process is slow to
        // read (a starved runtime; under valgrind this killed live connections): not a stall.
        if !liveness.bytes_waiting()
            && let Health::NoAnswer(why) = check(&mut health, timeout).await
            && liveness.reads() == now_reads
            && !liveness.bytes_waiting()
        {
            return format!("calls were waiting, nothing was read for {quiet:?}, and then {why}");
        }
        (reads, since) = (liveness.reads(), Instant::now());
    }
}

/// A backend's first connection attempt, counted in the channel's `connecting` while it lasts:
/// calls wait for it (within their deadline) rather than fail. Counted down once, when the
/// attempt's outcome is visible, or when the backend is dropped before it ends.
#[derive(Debug)]
pub(super) struct FirstAttempt(Option<Arc<AtomicUsize>>);

impl FirstAttempt {
    pub(super) fn new(connecting: &Arc<AtomicUsize>) -> Self {
        connecting.fetch_add(1, Ordering::SeqCst);
        Self(Some(connecting.clone()))
    }

    /// The first attempt's outcome is visible (published to the picker, or known to have failed).
    pub(super) fn done(&mut self) {
        if let Some(connecting) = self.0.take() {
            connecting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for FirstAttempt {
    fn drop(&mut self) {
        self.done();
    }
}
