//! Subsetting against a real etcd cluster and real Greeter servers on loopback: a channel holds
//! connections to its subset only (counted by the kernel, not just by the channel), calls all of
//! it, and replaces members without failing a call.

mod common;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use common::{cluster, ready_channel};
use proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
use registry::{
    BalanceOptions, BalancedChannel, Endpoint, Etcd, ServedBy, SubsetStatus, Subsetting,
};
use testkit::{TestServer, eventually, greeter::Behaviour};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Starts a server with a health service and writes its record (no lease) under `greeter/<id>`.
async fn instance(etcd: &Etcd, id: &str) -> TestServer {
    let health = Behaviour {
        health: true,
        ..Behaviour::default()
    };
    let server = TestServer::start_with("127.0.0.1:0", id, health).await;
    let record = Endpoint::new(server.addr.as_str(), id).unwrap().encode();
    etcd.client()
        .put(format!("services/greeter/{id}"), record, None)
        .await
        .unwrap();
    server
}

async fn instances(etcd: &Etcd, n: usize) -> Vec<TestServer> {
    let mut servers = Vec::new();
    for i in 0..n {
        servers.push(instance(etcd, &format!("i{i}")).await);
    }
    servers
}

/// The client ends of established connections to `servers`, as the kernel counts them.
fn kernel_connections(servers: &[TestServer]) -> usize {
    let ports: BTreeSet<u16> = servers
        .iter()
        .map(|s| s.addr.rsplit_once(':').unwrap().1.parse().unwrap())
        .collect();
    testkit::sockets::established()
        .iter()
        .filter(|c| ports.contains(&c.remote.port()))
        .count()
}

async fn wait_kernel_connections(servers: &[TestServer], n: usize) {
    eventually(Duration::from_secs(5), &format!("{n} connections"), || {
        let now = kernel_connections(servers);
        async move { (now == n).then_some(()) }
    })
    .await;
}

async fn call(client: &mut GreeterClient<BalancedChannel>) -> Result<String, tonic::Status> {
    let response = client
        .say_hello(HelloRequest {
            name: "subset".into(),
        })
        .await?;
    let served = response.extensions().get::<ServedBy>().cloned();
    Ok(served.map_or_else(String::new, |s| s.addr.to_string()))
}

fn subsetting(size: usize, above: usize) -> BalanceOptions {
    BalanceOptions {
        subset: Subsetting {
            size,
            above,
            identity: None,
        },
        // The default removal grace: an instance leaving the subset must not wait for it.
        ..BalanceOptions::default()
    }
}

fn ready(channel: &BalancedChannel) -> BTreeSet<String> {
    channel
        .ready_addrs()
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_connects_to_exactly_its_subset_and_calls_all_of_it() {
    let (_cluster, etcd) = cluster().await;
    let servers = instances(&etcd, 8).await;
    let channel = ready_channel(&etcd, subsetting(3, 3), 3).await;
    assert_eq!(
        channel.subset(),
        SubsetStatus {
            known: 8,
            members: 3
        }
    );
    assert_eq!(channel.instances().len(), 3, "{:?}", channel.instances());
    wait_kernel_connections(&servers, 3).await;

    let mut client = GreeterClient::new(channel.clone());
    let mut served = BTreeSet::new();
    for _ in 0..30 {
        served.insert(call(&mut client).await.unwrap());
    }
    assert_eq!(served, ready(&channel), "round robin reaches every member");
    assert_eq!(kernel_connections(&servers), 3);
}

/// Calls in a loop on `concurrency` tasks until stopped; records where each went or why it failed.
struct Load {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    outcomes: Arc<Mutex<Vec<Result<String, String>>>>,
}

impl Load {
    fn start(channel: &BalancedChannel, concurrency: usize) -> Load {
        let stop = CancellationToken::new();
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        for _ in 0..concurrency {
            let (stop, outcomes) = (stop.clone(), outcomes.clone());
            let mut client = GreeterClient::new(channel.clone());
            tasks.spawn(async move {
                while !stop.is_cancelled() {
                    let outcome = call(&mut client).await.map_err(|s| s.to_string());
                    outcomes
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(outcome);
                }
            });
        }
        Load {
            stop,
            tasks,
            outcomes,
        }
    }

    fn calls(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    /// Waits for `n` more calls, the last `n` of which went to `addr` at least once.
    async fn wait_served_by(&self, addr: &str, n: usize) {
        let from = self.calls();
        eventually(Duration::from_secs(10), &format!("calls to {addr}"), || {
            let outcomes = self.outcomes.lock().unwrap();
            let done = outcomes.len() >= from + n
                && outcomes[from..].iter().any(|o| o.as_deref() == Ok(addr));
            async move { done.then_some(()) }
        })
        .await;
    }

    async fn finish(mut self) -> Vec<Result<String, String>> {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_leaving_the_subset_or_the_service_are_replaced_without_a_failed_call() {
    let (_cluster, etcd) = cluster().await;
    let mut servers = instances(&etcd, 6).await;
    // At or below 6 instances the channel connects to all of them.
    let channel = ready_channel(&etcd, subsetting(3, 6), 6).await;
    wait_kernel_connections(&servers, 6).await;
    let load = Load::start(&channel, 4);

    // A 7th instance switches subsetting on: at least three live instances leave the subset at
    // once (an 8th keeps it on when a member leaves below).
    servers.push(instance(&etcd, "i6").await);
    servers.push(instance(&etcd, "i7").await);
    eventually(Duration::from_secs(5), "the subset of 3 of 8", || {
        let done = channel.subset()
            == SubsetStatus {
                known: 8,
                members: 3,
            }
            && channel.instances().len() == 3
            && channel.ready_addrs().len() == 3;
        async move { done.then_some(()) }
    })
    .await;
    wait_kernel_connections(&servers, 3).await;
    let before = ready(&channel);

    // A member leaves the service as a server shutting down does (NOT_SERVING, then its key
    // deleted): the next best takes its place.
    let leaving = before.iter().next().unwrap().clone();
    let id = servers.iter().position(|s| s.addr == leaving).unwrap();
    servers[id].set_serving(false).await;
    etcd.client()
        .delete(format!("services/greeter/i{id}"), None)
        .await
        .unwrap();
    let replacement = eventually(Duration::from_secs(5), "a replacement member", || {
        let now = ready(&channel);
        let new = now.difference(&before).next().cloned();
        let done = now.len() == 3 && !now.contains(&leaving) && channel.instances().len() == 3;
        async move { new.filter(|_| done) }
    })
    .await;
    assert_eq!(
        channel.subset(),
        SubsetStatus {
            known: 7,
            members: 3
        }
    );
    wait_kernel_connections(&servers, 3).await;
    load.wait_served_by(&replacement, 40).await;

    let outcomes = load.finish().await;
    let failed: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(outcomes.len() >= 40, "only {} calls", outcomes.len());
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turned_off_or_below_the_threshold_a_channel_connects_to_all() {
    let (_cluster, etcd) = cluster().await;
    let servers = instances(&etcd, 8).await;
    let off = BalanceOptions {
        subset: Subsetting::off(),
        ..BalanceOptions::default()
    };
    let channel = ready_channel(&etcd, off, 8).await;
    assert_eq!(channel.subset().members, 8);
    wait_kernel_connections(&servers, 8).await;
    // The default subsets only above 100 instances: 8 are all connected too.
    let default = ready_channel(&etcd, BalanceOptions::default(), 8).await;
    assert_eq!(
        default.subset(),
        SubsetStatus {
            known: 8,
            members: 8
        }
    );
    wait_kernel_connections(&servers, 16).await;
    drop((channel, default));
}
