//! Discovery: list a service's instances and follow every change, the way a client's balancer does.
//!
//! ```text
//! scripts/etcd-cluster.sh start                                # or: docker compose up -d
//! cargo run -p registry --example discovery [SERVICE]          # default SERVICE: example-greeter
//! cargo run -p registry --example registration                 # in another terminal
//! ```
//!
//! It prints the instances registered under `services/<SERVICE>/`, then one line per instance that
//! comes, goes or changes, until Ctrl-C. Start and stop the `registration` example (or revoke its
//! lease with etcdctl) to see them. etcd's endpoints come from `ETCD_ENDPOINTS` (comma-separated
//! `host:port`), else the demo cluster.

use std::{error::Error, time::Duration};

use registry::{Change, Discovery, EtcdConfig};

/// The demo cluster started by `scripts/etcd-cluster.sh` or `docker compose up`.
const DEMO_ENDPOINTS: &str = "127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793";

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let endpoints = std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| DEMO_ENDPOINTS.to_owned());
    let service = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "example-greeter".to_owned());
    let etcd = EtcdConfig::new(endpoints.split(','))?.connect().await?;

    // List, then watch from the list's revision: no change between the two is missed.
    let discovery = Discovery::builder(&service).start(&etcd)?;
    let mut known = discovery.wait_synced(Duration::from_secs(10)).await?;
    println!(
        "{} instance(s) under {} at revision {}",
        known.instances.len(),
        discovery.prefix(),
        known.revision
    );
    for instance in known.instances.values() {
        println!(
            "  {} at {} {}",
            instance.id, instance.addr, instance.metadata
        );
    }

    let mut updates = discovery.subscribe();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            changed = updates.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = updates.borrow_and_update().clone();
                for change in known.instances.diff(&now.instances) {
                    match change {
                        Change::Added(i) => println!("+ {} at {} {}", i.id, i.addr, i.metadata),
                        Change::Removed(i) => println!("- {} at {}", i.id, i.addr),
                        Change::Updated { new, .. } => println!("~ {} now at {} {}", new.id, new.addr, new.metadata),
                    }
                }
                if now.problem != known.problem {
                    match &now.problem {
                        Some(problem) => println!("! etcd problem, keeping the last known set: {problem}"),
                        None => println!("etcd reachable again"),
                    }
                }
                known = now;
            }
        }
    }
    Ok(())
}
