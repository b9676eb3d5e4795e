//! Locks that survive a panic: the crate's std locks guard only short critical sections (copy a
//! field, swap an `Arc`, one map operation), so a panic while one is held cannot leave the value
//! half-written, and a poisoned lock is used as it is rather than turning one panic into many.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// `lock()` that ignores poisoning (see the module docs).
pub(crate) trait Unpoisoned<T> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> Unpoisoned<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The read lock of a [`RwLock`], ignoring poisoning.
pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// The write lock of a [`RwLock`], ignoring poisoning.
pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Sleeps until `deadline`, or forever without one (a `select!` arm that only fires when there
/// is something to wait for).
pub(crate) async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// How a bounded wait for a state ended.
#[derive(Debug)]
pub(crate) enum Waited<T> {
    /// The state arrived: here it is.
    Reached(T),
    /// The task publishing the states ended first.
    Stopped,
    /// Time ran out: the state at that moment, to say why.
    TimedOut(T),
}

/// Waits at most `timeout` for a value of `rx` that satisfies `done`: the one wait-for-state of
/// the crate (registrations, leases, discovery), whose callers turn the outcome into an error that
/// says what was awaited and where things stood.
pub(crate) async fn wait_for<T: Clone>(
    rx: &tokio::sync::watch::Receiver<T>,
    timeout: std::time::Duration,
    done: impl FnMut(&T) -> bool,
) -> Waited<T> {
    let mut waiting = rx.clone();
    let outcome = match tokio::time::timeout(timeout, waiting.wait_for(done)).await {
        Ok(Ok(value)) => Some(Ok(value.clone())),
        Ok(Err(_)) => Some(Err(())),
        Err(_) => None,
    };
    match outcome {
        Some(Ok(value)) => Waited::Reached(value),
        Some(Err(())) => Waited::Stopped,
        None => Waited::TimedOut(rx.borrow().clone()),
    }
}
