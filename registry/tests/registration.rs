//! Registration against a real three-member etcd cluster: the record Go clients read, the lease it
//! hangs on, deregistration, and recovery when the lease is taken away.

mod common;

use std::time::{Duration, Instant};

use common::cluster;
use registry::{Registration, RegistrationState};
use testkit::eventually;

fn lease_hex(id: i64) -> String {
    format!("{id:x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_is_stored_in_the_go_naming_format_under_a_lease() {
    let (cluster, etcd) = cluster().await;
    let registration = Registration::builder("greeter", "node-a", "127.0.0.1:50051")
        .start(&etcd)
        .unwrap();
    let lease = registration
        .wait_registered(Duration::from_secs(10))
        .await
        .unwrap();

    assert_eq!(registration.key(), "services/greeter/node-a");
    let value = cluster.etcdctl_ok(&["get", "services/greeter/node-a", "--print-value-only"]);
    assert_eq!(
        value.trim(),
        r#"{"Op":0,"Addr":"127.0.0.1:50051","Metadata":"{\"instance_id\":\"node-a\"}"}"#
    );
    let ttl = cluster.etcdctl_ok(&["lease", "timetolive", &lease_hex(lease), "--keys"]);
    assert!(ttl.contains("granted with TTL(10s)"), "{ttl}");
    assert!(ttl.contains("services/greeter/node-a"), "{ttl}");
    assert_eq!(
        *registration.state().borrow(),
        RegistrationState::Registered { lease_id: lease }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistration_deletes_the_key_at_once() {
    let (cluster, etcd) = cluster().await;
    let registration = Registration::builder("greeter", "node-a", "127.0.0.1:50051")
        .start(&etcd)
        .unwrap();
    registration
        .wait_registered(Duration::from_secs(10))
        .await
        .unwrap();
    let mut state = registration.state();

    let started = Instant::now();
    registration.deregister().await.unwrap();
    let keys = cluster.etcdctl_ok(&["get", "--prefix", "services/", "--keys-only"]);
    let elapsed = started.elapsed();
    eprintln!("deregister() returned and the key was gone after {elapsed:?}");
    assert!(keys.trim().is_empty(), "key still present: {keys}");
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert_eq!(*state.borrow_and_update(), RegistrationState::Deregistered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcing_draining_rewrites_the_record_on_the_same_lease_then_deregistration_revokes_it()
{
    let (cluster, etcd) = cluster().await;
    let registration = Registration::builder("greeter", "node-a", "127.0.0.1:50051")
        .metadata("weight", 1)
        .start(&etcd)
        .unwrap();
    let lease = registration
        .wait_registered(Duration::from_secs(10))
        .await
        .unwrap();

    registration
        .announce_draining(Duration::from_secs(5))
        .await
        .unwrap();
    let value = cluster.etcdctl_ok(&["get", "services/greeter/node-a", "--print-value-only"]);
    // Still Go's shape, the metadata still one JSON string, now with the flag.
    assert_eq!(
        value.trim(),
        r#"{"Op":0,"Addr":"127.0.0.1:50051","Metadata":"{\"draining\":true,\"instance_id\":\"node-a\",\"weight\":1}"}"#
    );
    let ttl = cluster.etcdctl_ok(&["lease", "timetolive", &lease_hex(lease), "--keys"]);
    assert!(
        ttl.contains("services/greeter/node-a"),
        "not on the same lease: {ttl}"
    );

    registration.deregister().await.unwrap();
    let leases = cluster.etcdctl_ok(&["lease", "list"]);
    assert!(
        !leases.contains(&lease_hex(lease)),
        "lease not revoked: {leases}"
    );
    let keys = cluster.etcdctl_ok(&["get", "--prefix", "services/", "--keys-only"]);
    assert!(keys.trim().is_empty(), "key still present: {keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_behind_our_back_is_replaced_and_the_key_put_again() {
    let (cluster, etcd) = cluster().await;
    let registration = Registration::builder("greeter", "node-a", "127.0.0.1:50051")
        .ttl(Duration::from_secs(3))
        .start(&etcd)
        .unwrap();
    let first = registration
        .wait_registered(Duration::from_secs(10))
        .await
        .unwrap();

    // Revoking deletes the key; the next keep-alive (every TTL/3 = 1 s) learns the lease is gone.
    let revoked = Instant::now();
    cluster.etcdctl_ok(&["lease", "revoke", &lease_hex(first)]);
    let mut state = registration.state();
    let second = eventually(Duration::from_secs(5), "a new lease", || {
        let current = state.borrow_and_update().clone();
        async move {
            match current {
                RegistrationState::Registered { lease_id } if lease_id != first => Some(lease_id),
                _ => None,
            }
        }
    })
    .await;
    eprintln!(
        "re-registered under a new lease {:?} after the revoke",
        revoked.elapsed()
    );

    let ttl = cluster.etcdctl_ok(&["lease", "timetolive", &lease_hex(second), "--keys"]);
    assert!(
        ttl.contains("services/greeter/node-a"),
        "key not re-attached: {ttl}"
    );
    registration.deregister().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_anything_is_written() {
    let (cluster, etcd) = cluster().await;
    for builder in [
        Registration::builder("greeter", "node a", "127.0.0.1:1"),
        Registration::builder("greeter/x", "node", "127.0.0.1:1"),
        Registration::builder("greeter", "node", "no-port"),
        Registration::builder("greeter", "node", "127.0.0.1:1").ttl(Duration::from_secs(1)),
        Registration::builder("greeter", "node", "127.0.0.1:1").namespace("/services"),
    ] {
        let err = builder.start(&etcd).unwrap_err();
        assert!(!err.to_string().is_empty());
    }
    let keys = cluster.etcdctl_ok(&["get", "--prefix", "", "--keys-only"]);
    assert!(keys.trim().is_empty(), "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistration_that_can_neither_delete_nor_revoke_reports_both() {
    let (mut cluster, _) = cluster().await;
    let etcd = registry::EtcdConfig::builder()
        .endpoints(cluster.endpoints())
        .request_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let config = registry::RegistryConfig::builder(etcd).build().unwrap();
    let etcd = config.connect().await.unwrap();
    let registration = config
        .registration("greeter", "node-gone", "127.0.0.1:50051")
        .start(&etcd)
        .unwrap();
    registration
        .wait_registered(Duration::from_secs(10))
        .await
        .unwrap();
    for member in 0..cluster.size() {
        cluster.kill(member);
    }

    let err = registration
        .deregister()
        .await
        .expect_err("nothing answers: neither the delete nor the revoke can succeed");
    let registry::Error::Deregistration {
        key,
        delete,
        revoke,
    } = &err
    else {
        panic!("expected both failures, got {err:?}");
    };
    assert_eq!(key, "services/greeter/node-gone");
    let text = err.to_string();
    assert!(
        text.contains(&delete.to_string()) && text.contains(&revoke.to_string()),
        "{text}"
    );
}
