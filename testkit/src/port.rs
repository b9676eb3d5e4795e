//! Free loopback ports for servers a test starts.
//!
//! The kernel picks an unused port when binding port 0; we release it and hand the number to the
//! process that will listen on it. Between the release and that process's `bind` another socket
//! could take the port. Inside one test binary, where tests run in parallel threads, a
//! process-wide record of ports already handed out rules out the likeliest collision: two tests
//! receiving the same number. Other processes on the machine can still race us, so a server that
//! fails with "address already in use" is the symptom to recognise.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, PoisonError};

/// Ports returned by [`free_port`] in this process; never handed out twice.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Returns a TCP port on 127.0.0.1 that was free a moment ago and that this process has not
/// returned before.
///
/// # Panics
///
/// Panics if the kernel refuses to bind 127.0.0.1:0 (no loopback interface, or the ephemeral port
/// range is exhausted).
pub fn free_port() -> u16 {
    // A panic elsewhere while holding the lock leaves the set intact, so poisoning is harmless.
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap_or_else(|e| {
            panic!("testkit: cannot bind 127.0.0.1:0 to find a free port: {e}")
        });
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("testkit: local address of a bound listener: {e}"))
            .port();
        // The listener is dropped (the port released) at the end of this iteration.
        if handed_out.insert(port) {
            return port;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_repeats_and_is_bindable() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let unique: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        let last = *ports.last().expect("200 ports were requested");
        TcpListener::bind((Ipv4Addr::LOCALHOST, last)).expect("the port should still be free");
    }
}
