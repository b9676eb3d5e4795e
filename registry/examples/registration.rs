//! Registration: two services of one process announced in etcd on one shared lease, kept there
//! until Ctrl-C, then deregistered.
//!
//! ```text
//! scripts/etcd-cluster.sh start                      # or: docker compose up -d
//! cargo run -p registry --example registration       # Ctrl-C to deregister and stop
//! ```
//!
//! It registers `services/example-greeter/<id>` and `services/example-admin/<id>` (addresses are
//! only announced, nothing listens on them) on one [`SharedLease`], prints every state change, and
//! on Ctrl-C deletes both keys and revokes the lease. Meanwhile, try from another terminal:
//! `etcdctl --endpoints 127.0.0.1:23791 lease list` (one lease), or revoke it with
//! `etcdctl ... lease revoke <id>` and watch both keys come back on a new lease. etcd's endpoints
//! come from `ETCD_ENDPOINTS` (comma-separated `host:port`), else the demo cluster.

use std::{error::Error, time::Duration};

use registry::{EtcdConfig, Registration, RegistrationState, SharedLease};

/// The demo cluster started by `scripts/etcd-cluster.sh` or `docker compose up`.
const DEMO_ENDPOINTS: &str = "127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793";

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let endpoints = std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| DEMO_ENDPOINTS.to_owned());
    let etcd = EtcdConfig::new(endpoints.split(','))?.connect().await?;
    let id = format!("pid-{}", std::process::id());

    // One lease for the whole process: every registration (and lock) hangs on it.
    let lease = SharedLease::start(&etcd, Duration::from_secs(5))?;
    let greeter = Registration::builder("example-greeter", &id, "127.0.0.1:50051")
        .lease(&lease)
        .metadata("version", "v1")
        .start(&etcd)?;
    let admin = Registration::builder("example-admin", &id, "127.0.0.1:50052")
        .lease(&lease)
        .start(&etcd)?;
    for registration in [&greeter, &admin] {
        let lease_id = registration
            .wait_registered(Duration::from_secs(10))
            .await?;
        println!("registered {} on lease {lease_id:x}", registration.key());
    }
    println!("both keys on one lease; Ctrl-C to deregister");

    let mut states = greeter.state();
    states.borrow_and_update(); // seen: report only what changes from here
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            changed = states.changed() => {
                if changed.is_err() {
                    break;
                }
                match &*states.borrow_and_update() {
                    RegistrationState::Registered { lease_id } => {
                        println!("{} registered again on lease {lease_id:x}", greeter.key());
                    }
                    other => println!("{}: {other:?}", greeter.key()),
                }
            }
        }
    }

    // Deregistering deletes each key at once; releasing the last handle revokes the lease.
    greeter.deregister().await?;
    admin.deregister().await?;
    lease.release().await?;
    println!("deregistered; lease revoked");
    Ok(())
}
