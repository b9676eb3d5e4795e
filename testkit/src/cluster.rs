//! What tests need from any etcd cluster, whichever way it runs: local processes
//! ([`EtcdCluster`](crate::EtcdCluster)) or containers ([`ComposeCluster`](crate::ComposeCluster)).
//!
//! Helpers written against this trait (start a server on the cluster, check a key, read a lease)
//! serve both the process-level and the container-level fault suites.

/// An etcd cluster a test can point code at and inspect with `etcdctl`.
pub trait Cluster {
    /// Client URLs of every member (`http://127.0.0.1:<port>`), live or not, for the code under test.
    fn endpoints(&self) -> Vec<String>;

    /// Runs `etcdctl` (API v3) against the members that can answer, and returns its stdout.
    ///
    /// # Panics
    ///
    /// Panics, quoting stderr, if etcdctl exits unsuccessfully or no member can answer.
    fn etcdctl_ok(&self, args: &[&str]) -> String;
}
