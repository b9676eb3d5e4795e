//! Logging for the binaries: `tracing` events to stderr, filtered by `RUST_LOG`, written so that
//! stderr can neither break nor stall the process.
//!
//! A log line must never decide whether a server deregisters. Two ways it could:
//! - **A closed stderr** (`server 2> >(head -1)` once head has exited): every write fails with
//!   EPIPE; tracing-subscriber then reports its own failure with `eprintln!`, which panics on that
//!   same stderr, killing whichever task logged: the signal handler (SIGTERM is then never acted
//!   on) or `main` (exit 101, the key left to expire). Failed writes are dropped here, and that
//!   reporting is off.
//! - **A stderr nobody reads** (a paused pager, a stuck log shipper): once the pipe's buffer is
//!   full a write blocks, and a runtime worker blocked in a write stalls every task on it. Events
//!   are handed to one writer thread through a bounded queue instead; when it is full they are
//!   dropped and counted, never waited for.

use std::{
    io::{self, IsTerminal, Write},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    time::Duration,
};

use tracing_subscriber::EnvFilter;

/// Events waiting for the writer thread; beyond that they are dropped.
const QUEUE: usize = 4096;

/// How long [`Flush`] waits, at exit, for queued events to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// What the writer thread is sent.
enum Message {
    Line(Vec<u8>),
    /// Answer on this channel once everything before it was written.
    Flush(SyncSender<()>),
}

/// The queue to the writer thread, once [`init`] started it.
static QUEUE_TX: OnceLock<SyncSender<Message>> = OnceLock::new();

/// Events dropped because the queue was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Installs the process's subscriber: `RUST_LOG` if set, else `default` (e.g. `"info"`), to
/// [`Stderr`], with colours only on a terminal. Call once, from `main`, and keep the returned
/// guard until the end of `main`: dropping it writes what is still queued.
#[must_use = "dropping the guard at once would lose the last log lines at exit"]
pub fn init(default: &str) -> Flush {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let started = std::thread::Builder::new()
        .name("stderr".into())
        .spawn(move || write_lines(rx));
    // Without the thread, events go straight to stderr (still never panicking).
    if started.is_ok() {
        let _ = QUEUE_TX.set(tx);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(|| Stderr)
        .with_ansi(io::stderr().is_terminal())
        .log_internal_errors(false)
        .init();
    Flush
}

/// The writer thread: writes each event; after a failed write (stderr closed) it only drains.
fn write_lines(rx: Receiver<Message>) {
    let mut open = true;
    for message in rx {
        match message {
            Message::Line(line) => {
                if open {
                    open = io::stderr().write_all(&line).is_ok();
                }
            }
            Message::Flush(done) => {
                let dropped = DROPPED.swap(0, Ordering::Relaxed);
                if open && dropped > 0 {
                    let note = format!("({dropped} log lines dropped: stderr was not read)\n");
                    let _ = io::stderr().write_all(note.as_bytes());
                }
                let _ = done.send(());
            }
        }
    }
}

/// Standard error that never fails and never blocks: each write is queued for the writer thread,
/// and dropped if the queue is full or stderr is gone.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match QUEUE_TX.get() {
            Some(tx) => {
                if let Err(TrySendError::Full(_)) = tx.try_send(Message::Line(buf.to_vec())) {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                let _ = io::stderr().write_all(buf);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes what is queued when dropped, waiting at most a second: the last lines of a binary
/// (`stopped`, the error it exits on) are the ones most worth reading.
#[derive(Debug)]
pub struct Flush;

impl Drop for Flush {
    fn drop(&mut self) {
        flush();
    }
}

/// Waits (at most a second) until everything logged so far is written.
pub fn flush() {
    if let Some(tx) = QUEUE_TX.get() {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if tx.try_send(Message::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(FLUSH_WAIT);
        }
    }
}

/// Writes `text` to stderr after what is queued, if it can: for a binary's last words
/// (`error: ...`), which must not panic as `eprintln!` does when stderr is closed.
pub fn eprint(text: &str) {
    let _ = Stderr.write_all(text.as_bytes());
    flush();
}
