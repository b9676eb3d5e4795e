//! One lease per process: two registrations and a lock on a single [`SharedLease`] against a real
//! three-member etcd cluster, what happens to each when the lease is taken away, and who revokes it.

mod common;

use std::time::{Duration, Instant};

use common::cluster;
use registry::{Error, LeaseState, Lock, Registration, RegistrationState, SharedLease};
use testkit::eventually;

fn lease_hex(id: i64) -> String {
    format!("{id:x}")
}

/// The lease ids etcd knows, in [`lease_hex`]'s form: `etcdctl lease list` pads ids to 16 hex
/// digits (`076ea201ded27005`), so leading zeros are dropped to compare.
fn leases(cluster: &testkit::EtcdCluster) -> Vec<String> {
    cluster
        .etcdctl_ok(&["lease", "list"])
        .lines()
        .skip(1) // "found N leases"
        .filter(|l| !l.is_empty())
        .map(|l| {
            let digits = l.trim().trim_start_matches('0');
            if digits.is_empty() { "0" } else { digits }.to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_a_lock_share_one_lease_and_survive_its_loss() {
    let (cluster, etcd) = cluster().await;
    let lease = SharedLease::start(&etcd, Duration::from_secs(3)).unwrap();
    let greeter = Registration::builder("greeter", "node-a", "127.0.0.1:50051")
        .lease(&lease)
        .start(&etcd)
        .unwrap();
    let admin = Registration::builder("admin", "node-a", "127.0.0.1:50052")
        .lease(&lease)
        .start(&etcd)
        .unwrap();
    let locks = Lock::new(&lease);
    let guard = locks
        .lock("jobs/nightly", Duration::from_secs(10))
        .await
        .unwrap();
    let first = greeter
        .wait_registered(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        admin
            .wait_registered(Duration::from_secs(10))
            .await
            .unwrap(),
        first
    );
    assert_eq!(lease.id(), Some(first));

    // One lease in etcd, carrying all three keys.
    assert_eq!(leases(&cluster), [lease_hex(first)]);
    let keys = cluster.etcdctl_ok(&["lease", "timetolive", &lease_hex(first), "--keys"]);
    for key in [
        "services/greeter/node-a",
        "services/admin/node-a",
        guard.key(),
    ] {
        assert!(keys.contains(key), "{key} not on the lease: {keys}");
    }
    assert_eq!(guard.key(), format!("jobs/nightly/{}", lease_hex(first)));

    // Take the lease away: both keys come back on one new lease, the lock is reported lost.
    let revoked = Instant::now();
    cluster.etcdctl_ok(&["lease", "revoke", &lease_hex(first)]);
    let reason = tokio::time::timeout(Duration::from_secs(10), guard.lost())
        .await
        .expect("the lock reported lost within 10 s");
    let lock_lost = revoked.elapsed();
    assert!(!guard.is_held());
    let mut greeter_state = greeter.state();
    let mut admin_state = admin.state();
    let second = eventually(Duration::from_secs(10), "both keys on a new lease", || {
        let g = greeter_state.borrow_and_update().clone();
        let a = admin_state.borrow_and_update().clone();
        async move {
            match (g, a) {
                (
                    RegistrationState::Registered { lease_id: g },
                    RegistrationState::Registered { lease_id: a },
                ) if g != first && g == a => Some(g),
                _ => None,
            }
        }
    })
    .await;
    println!(
        "LEASE revoked: lock lost after {lock_lost:?} ({reason}); both keys on new lease {} after {:?}",
        lease_hex(second),
        revoked.elapsed()
    );
    assert_eq!(leases(&cluster), [lease_hex(second)]);
    let keys = cluster.etcdctl_ok(&["lease", "timetolive", &lease_hex(second), "--keys"]);
    assert!(keys.contains("services/greeter/node-a"), "{keys}");
    assert!(keys.contains("services/admin/node-a"), "{keys}");
    // The lock is not taken again behind the holder's back.
    assert!(!keys.contains("jobs/nightly"), "{keys}");
    let err = guard.unlock().await.unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err}");

    // Deregistering one deletes just its key; the lease stays for the other.
    greeter.deregister().await.unwrap();
    let left = cluster.etcdctl_ok(&["get", "--prefix", "services/", "--keys-only"]);
    assert_eq!(left.trim(), "services/admin/node-a");
    assert_eq!(leases(&cluster), [lease_hex(second)]);

    // The last user gone, the lease is revoked.
    admin.deregister().await.unwrap();
    drop(locks);
    let mut state = lease.state();
    lease.release().await.unwrap();
    assert_eq!(*state.borrow_and_update(), LeaseState::Closed);
    assert!(leases(&cluster).is_empty(), "{:?}", leases(&cluster));
    let left = cluster.etcdctl_ok(&["get", "--prefix", "", "--keys-only"]);
    assert!(left.trim().is_empty(), "{left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_registration_leaves_a_shared_lease_to_the_others() {
    let (cluster, etcd) = cluster().await;
    let lease = SharedLease::start(&etcd, Duration::from_secs(3)).unwrap();
    let a = Registration::builder("greeter", "node-a", "127.0.0.1:50051")
        .lease(&lease)
        .start(&etcd)
        .unwrap();
    let b = Registration::builder("greeter", "node-b", "127.0.0.1:50052")
        .lease(&lease)
        .start(&etcd)
        .unwrap();
    let id = a.wait_registered(Duration::from_secs(10)).await.unwrap();
    b.wait_registered(Duration::from_secs(10)).await.unwrap();

    // Dropped, not deregistered: the key goes in the background.
    drop(a);
    eventually(Duration::from_secs(5), "node-a's key to go", || async {
        let keys = cluster.etcdctl_ok(&["get", "--prefix", "services/", "--keys-only"]);
        (keys.trim() == "services/greeter/node-b").then_some(())
    })
    .await;
    assert_eq!(lease.id(), Some(id));
    assert_eq!(leases(&cluster), [lease_hex(id)]);

    // Our handle and b's are the last users: dropping both revokes the lease.
    drop(lease);
    drop(b);
    eventually(
        Duration::from_secs(5),
        "the lease to be revoked",
        || async { leases(&cluster).is_empty().then_some(()) },
    )
    .await;
}
