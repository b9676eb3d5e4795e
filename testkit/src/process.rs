//! Child processes that never outlive the test that started them.
//!
//! A test that panics unwinds and runs `Drop`, but a test binary that is killed (Ctrl-C, a CI
//! timeout, `abort`) runs no destructors at all. Two mechanisms together cover both cases:
//!
//! - [`ChildGuard`]'s `Drop` sends `SIGKILL` and reaps the child, for the ordinary end of a test.
//! - Every child is spawned with `prctl(PR_SET_PDEATHSIG, SIGKILL)`, so the kernel kills it when
//!   its parent dies, for the cases where no destructor runs.
//!
//! # The `PR_SET_PDEATHSIG` caveat
//!
//! Linux delivers the parent-death signal when the *thread* that forked the child exits, not when
//! the whole process exits. The test harness runs each `#[test]` on its own thread, so a child
//! spawned by a test is killed when that test's thread ends. That is what we want for a guard
//! owned by the test, but it means a child must not be spawned on one thread and expected to keep
//! running after that thread has finished: do not, for example, start a process lazily inside a
//! `static OnceLock` shared by several tests, because it dies with whichever test created it.

use std::fmt;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

/// How often [`ChildGuard::wait_timeout`] polls the child.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Spawns `cmd` as a [`ChildGuard`]; shorthand for [`ChildGuard::spawn`].
///
/// # Panics
///
/// Panics if the program cannot be started, naming it.
pub fn spawn(cmd: &mut Command) -> ChildGuard {
    ChildGuard::spawn(cmd)
}

/// A child process that is killed and reaped when the guard is dropped.
///
/// Use it for every process a test starts (a server binary, a client, an etcd member) so that a
/// failing assertion cannot leave a process behind that holds a port or a lease.
///
/// ```no_run
/// use std::process::Command;
/// use std::time::Duration;
///
/// let mut server = testkit::spawn(Command::new("sleep").arg("30"));
/// server.signal(libc::SIGTERM);
/// let status = server.wait_timeout(Duration::from_secs(5));
/// assert!(status.is_some(), "sleep ignored SIGTERM");
/// ```
pub struct ChildGuard {
    child: Child,
    /// What was started, for panic messages.
    program: String,
    /// Set once the child has been reaped. After that its pid may belong to an unrelated
    /// process, so no signal may be sent to it.
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` with `PR_SET_PDEATHSIG` set to `SIGKILL` (see the [module docs](self) for the
    /// thread caveat).
    ///
    /// Stdio is whatever `cmd` configures; `Command`'s default inherits the test's.
    ///
    /// # Panics
    ///
    /// Panics if the program cannot be started, naming it.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
        // functions may be called. `prctl`, `getppid` and `_exit` are system calls that neither
        // allocate nor take locks.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // If the parent died between fork and prctl, the signal was never armed and the
                // child has already been re-parented: exit instead of running unsupervised.
                if libc::getppid() as u32 != parent {
                    libc::_exit(127);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("testkit: cannot start `{program}`: {e}"));
        ChildGuard {
            child,
            program,
            status: None,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The underlying [`Child`], e.g. to take its piped stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `SIGKILL` and waits for the child to exit; returns its exit status.
    ///
    /// Calling it again, or on a child that already exited, returns the recorded status.
    ///
    /// # Panics
    ///
    /// Panics if waiting for the child fails, which only happens if something else reaped it.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.try_status() {
            return status;
        }
        // `Child::kill` sends SIGKILL. It also terminates a stopped (SIGSTOP) process: the kernel
        // wakes a stopped task to deliver SIGKILL, so no SIGCONT is needed first.
        if let Err(e) = self.child.kill() {
            // The only expected error is that the child is already gone, which `wait` reports.
            eprintln!(
                "testkit: SIGKILL to `{}` (pid {}): {e}",
                self.program,
                self.pid()
            );
        }
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("testkit: waiting for `{}`: {e}", self.program));
        self.status = Some(status);
        status
    }

    /// Sends signal `sig` (e.g. `libc::SIGTERM`, `libc::SIGSTOP`, `libc::SIGCONT`) to the child.
    ///
    /// # Panics
    ///
    /// Panics if the child has already exited: its pid may have been reused, and a test that
    /// signals a dead process has a wrong idea of what is running.
    pub fn signal(&mut self, sig: i32) {
        if let Some(status) = self.try_status() {
            panic!(
                "testkit: cannot send signal {sig} to `{}` (pid {}): it already exited with {status}",
                self.program,
                self.pid()
            );
        }
        // The child is not reaped yet (at worst a zombie), so its pid cannot have been reused.
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) has no memory-safety preconditions.
        if unsafe { libc::kill(pid, sig) } != 0 {
            panic!(
                "testkit: kill({pid}, {sig}) for `{}`: {}",
                self.program,
                io::Error::last_os_error()
            );
        }
    }

    /// Returns the exit status if the child exits within `timeout`, otherwise `None` (the child
    /// keeps running).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            thread::sleep(POLL_INTERVAL.min(deadline - now));
        }
    }

    /// Whether the child has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Reaps the child if it has exited, remembering the status.
    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(status) => self.status = status,
                Err(e) => panic!("testkit: polling `{}`: {e}", self.program),
            }
        }
        self.status
    }
}

impl fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildGuard")
            .field("program", &self.program)
            .field("pid", &self.pid())
            .field("status", &self.status)
            .finish()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        // Not `self.kill()`: a panic inside `drop` while the test is already unwinding aborts the
        // whole test binary, hiding the original failure.
        let _ = self.child.kill();
        if let Err(e) = self.child.wait() {
            eprintln!(
                "testkit: reaping `{}` (pid {}): {e}",
                self.program,
                self.pid()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wait::wait_until;

    fn sleeper() -> ChildGuard {
        spawn(Command::new("sleep").arg("30"))
    }

    fn proc_exists(pid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn sigterm_ends_the_child_and_wait_timeout_reports_it() {
        let mut child = sleeper();
        assert_eq!(child.wait_timeout(Duration::from_millis(100)), None);
        child.signal(libc::SIGTERM);
        let status = child
            .wait_timeout(Duration::from_secs(5))
            .expect("sleep should exit on SIGTERM");
        assert!(!status.success());
        assert!(!child.is_running());
    }

    #[test]
    fn drop_kills_a_stopped_child() {
        let mut child = sleeper();
        let pid = child.pid();
        child.signal(libc::SIGSTOP);
        drop(child);
        // Drop reaps the child, so /proc/<pid> is gone as soon as it returns.
        assert!(!proc_exists(pid), "pid {pid} survived its guard");
    }

    #[test]
    fn kill_is_idempotent() {
        let mut child = sleeper();
        let first = child.kill();
        assert_eq!(child.kill(), first);
    }

    #[test]
    #[should_panic(expected = "already exited")]
    fn signalling_an_exited_child_panics() {
        let mut child = spawn(&mut Command::new("true"));
        wait_until(Duration::from_secs(5), "`true` to exit", || {
            !child.is_running()
        });
        child.signal(libc::SIGTERM);
    }
}
