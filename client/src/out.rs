//! Standard output for the call lines, the live view and the report: when the reader goes away
//! (`client | head -3`), writing stops quietly instead of panicking as `println!` does, and the
//! run ends as it would on Ctrl-C.

use std::{
    io::{self, Write},
    sync::atomic::{AtomicBool, Ordering},
};

/// Set once a write to stdout failed.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `text` as it is; returns whether it was written.
pub fn print(text: &str) -> bool {
    if is_closed() {
        return false;
    }
    let mut stdout = io::stdout().lock();
    // Flushed at once: a call line must show while the run goes on, and a closed pipe must be
    // noticed at the line that hit it.
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    if written.is_err() {
        CLOSED.store(true, Ordering::Relaxed);
    }
    written.is_ok()
}

/// Writes `text` and a newline; returns whether it was written.
pub fn line(text: &str) -> bool {
    print(&format!("{text}\n"))
}

/// Whether stdout is closed (a write to it failed).
pub fn is_closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}
