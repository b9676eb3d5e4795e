//! Logging for the binaries: `tracing` events to stderr, filtered by `RUST_LOG`, through a writer
//! that a closed stderr cannot break.
//!
//! A log line must never decide whether a server deregisters. When stderr is a pipe whose reader
//! went away (`server 2> >(head -1)`), every write fails with EPIPE; tracing-subscriber then reports
//! its own failure with `eprintln!`, which panics on that same closed stderr, killing whichever task
//! happened to log: the signal handler (so SIGTERM is never acted on) or `main` (exit 101 with the
//! key left to expire). [`init`] turns that reporting off and writes through [`Stderr`], which
//! drops what it cannot write.

use std::{
    io::{self, IsTerminal, Write},
    sync::atomic::{AtomicBool, Ordering},
};

use tracing_subscriber::EnvFilter;

/// Set once a write to stderr failed: nobody is reading, so later lines are not even attempted.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Installs the process's subscriber: `RUST_LOG` if set, else `default` (e.g. `"info"`), to
/// [`Stderr`], with colours only on a terminal. Call once, from `main`.
pub fn init(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(|| Stderr)
        .with_ansi(io::stderr().is_terminal())
        .log_internal_errors(false)
        .init();
}

/// Standard error that never fails: a line that cannot be written (closed pipe, full disk) is
/// dropped, and after the first failure nothing more is tried.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !CLOSED.load(Ordering::Relaxed) && io::stderr().write_all(buf).is_err() {
            CLOSED.store(true, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !CLOSED.load(Ordering::Relaxed) && io::stderr().flush().is_err() {
            CLOSED.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Writes `text` to stderr if it can; for a binary's last words (`error: ...`), which must not
/// panic as `eprintln!` does when stderr is closed.
pub fn eprint(text: &str) {
    let _ = Stderr.write_all(text.as_bytes());
    let _ = Stderr.flush();
}
