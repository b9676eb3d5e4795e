//! A distributed lock: take it, hold it for a while, release it. Run two at once to see the second
//! wait, or kill the holder with `kill -9` to see the waiter take over within the lease's TTL.
//!
//! ```text
//! scripts/etcd-cluster.sh start                                # or: docker compose up -d
//! cargo run -p registry --example lock [NAME] [HOLD_SECONDS]   # default: examples/lock 5
//! ```
//!
//! The lock is held under a 5 s [`SharedLease`]: if this process dies, etcd deletes its key when
//! the lease expires and the next contender gets the lock. It is interoperable with
//! `etcdctl lock NAME`. etcd's endpoints come from `ETCD_ENDPOINTS` (comma-separated `host:port`),
//! else the demo cluster.

use std::{error::Error, time::Duration};

use registry::{EtcdConfig, Lock, SharedLease};
use tokio::time::Instant;

/// The demo cluster started by `scripts/etcd-cluster.sh` or `docker compose up`.
const DEMO_ENDPOINTS: &str = "127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793";

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let endpoints = std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| DEMO_ENDPOINTS.to_owned());
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "examples/lock".to_owned());
    let hold = Duration::from_secs(args.next().map_or(Ok(5), |s| s.parse())?);
    let etcd = EtcdConfig::new(endpoints.split(','))?.connect().await?;

    let lease = SharedLease::start(&etcd, Duration::from_secs(5))?;
    let locks = Lock::new(&lease);
    println!("pid {}: waiting for lock {name:?}", std::process::id());
    let asked = Instant::now();
    let guard = locks.lock(&name, Duration::from_secs(60)).await?;
    println!(
        "acquired {name:?} after {:?} as {}; holding it for {hold:?}",
        asked.elapsed(),
        guard.key()
    );

    // The work under the lock, stopped if the lock is lost (lease lost: someone else may hold it).
    tokio::select! {
        reason = guard.lost() => {
            println!("lost the lock: {reason}; stopping");
            return Ok(());
        }
        _ = tokio::signal::ctrl_c() => println!("interrupted"),
        _ = tokio::time::sleep(hold) => {}
    }
    guard.unlock().await?;
    println!("released {name:?}");
    lease.release().await?;
    Ok(())
}
