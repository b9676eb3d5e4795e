//! Subsetting: each client connects to, and health-checks, at most K of a service's N instances
//! instead of all of them, chosen by rendezvous (highest-random-weight) hashing.
//!
//! Every address gets a score, a stable hash of the client's identity and the address; the
//! client's subset is the K addresses with the highest scores. Because a score depends only on its
//! own address, one instance joining or leaving the service changes a client's subset only if
//! that instance ranks (or ranked) in its top K: with probability about K/N, and then by exactly
//! one member in and at most one out. Different identities rank the fleet independently, so many
//! clients together spread over it like independent random choices (gRFC A68's random subsetting;
//! the SRE book's deterministic subsetting balances more tightly but needs every client's index
//! and the client count, which an etcd client does not know).
//!
//! The set is kept incrementally: the members and the other known addresses are two ordered sets
//! of `(score, address)`, so a change costs O(log N) and the whole fleet is never ranked again.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use super::picker::hash64;

/// Which instances a client connects to: all of them, or, when the service has more than
/// [`Subsetting::above`] instances, a subset of [`Subsetting::size`] chosen by rendezvous hashing
/// on the client's identity ([`BalanceOptions::subset`](crate::BalanceOptions::subset)).
///
/// With a few instances a subset only hurts: the calls of a few clients spread unevenly over the
/// instances (each instance gets the clients whose subsets happen to include it), retries and
/// outlier ejection have fewer instances to turn to, and all it saves is a few connections. With
/// thousands, connecting to everything costs every client thousands of connections and health
/// checks a second, and every instance a connection from every client. The default, subsets of
/// 20 above 100 instances, keeps every fleet of up to 100 instances exactly as without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subsetting {
    /// K: how many instances a client connects to once subsetting applies. Larger subsets spread
    /// load more evenly (the calls an instance receives vary with the number of clients that
    /// chose it, a binomial count with mean `clients * size / instances`) and leave more
    /// instances to retry on; smaller ones save connections. 0 turns subsetting off.
    pub size: usize,
    /// Subsetting applies only while the service has more than this many instances (distinct
    /// addresses); at or below it the client connects to all. Crossing it moves many instances
    /// into or out of the subset at once, gracefully (no call fails).
    pub above: usize,
    /// What the subset is derived from. `None` (the default) draws a random identity per
    /// channel: every channel, even many in one process, gets an independent subset, which is
    /// what spreads a fleet of clients evenly. Derived from host and pid instead, all channels of
    /// a process would share one subset and a process restart would pick a new one anyway. Set
    /// it to a stable name (a pod name) to keep a client's subset across its restarts.
    pub identity: Option<String>,
}

impl Default for Subsetting {
    fn default() -> Self {
        Self {
            // 20 keeps a binomial spread that a few hundred clients smooth out (with C clients
            // over N instances an instance's share has a coefficient of variation of about
            // sqrt(N / (C * 20))), survives a few instances ejected or restarting at once, and
            // costs each client 20 connections and 20 health checks a second at any fleet size.
            size: 20,
            // Up to 100 instances a client holds at most 100 connections (about 100 health
            // checks a second): cheap, and the even spread of connecting to all is worth more.
            above: 100,
            identity: None,
        }
    }
}

impl Subsetting {
    /// Never subset: connect to every instance.
    pub fn off() -> Self {
        Self {
            size: 0,
            ..Self::default()
        }
    }

    /// Subsets of `size` whenever the service has more than `size` instances.
    pub fn always(size: usize) -> Self {
        Self {
            size,
            above: size,
            identity: None,
        }
    }
}

/// How many instances a channel knows and how many it connects to: see
/// [`BalancedChannel::subset`](crate::BalancedChannel::subset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubsetStatus {
    /// Distinct instance addresses discovery lists, as last applied.
    pub known: usize,
    /// Of which in this client's subset: the only ones it connects to and health-checks (all of
    /// them while subsetting is off or does not apply).
    pub members: usize,
}

/// The last applied [`SubsetStatus`], readable while the updater owns the [`Subset`].
#[derive(Debug, Default)]
pub(crate) struct Counts {
    known: AtomicUsize,
    members: AtomicUsize,
}

impl Counts {
    pub(crate) fn set(&self, status: SubsetStatus) {
        self.known.store(status.known, Ordering::Relaxed);
        self.members.store(status.members, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> SubsetStatus {
        SubsetStatus {
            known: self.known.load(Ordering::Relaxed),
            members: self.members.load(Ordering::Relaxed),
        }
    }
}

/// How an update changed the subset: the addresses that joined and those that left. A single
/// address added or removed moves at most one of each; only crossing [`Subsetting::above`] moves
/// more.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Delta {
    pub(crate) joined: Vec<Arc<str>>,
    pub(crate) left: Vec<Arc<str>>,
}

/// An address with its score; ordered by score, then address, so ties cannot collapse two
/// addresses into one entry.
type Ranked = (u64, Arc<str>);

/// Every known address of one service, ranked for one client.
#[derive(Debug)]
pub(crate) struct Subset {
    size: usize,
    above: usize,
    identity: u64,
    scores: HashMap<Arc<str>, u64>,
    /// The subset: the highest-scoring addresses.
    members: BTreeSet<Ranked>,
    /// Every other known address.
    rest: BTreeSet<Ranked>,
}

impl Subset {
    pub(crate) fn new(options: &Subsetting) -> Self {
        let identity = match &options.identity {
            Some(name) => hash64(name.as_bytes()),
            None => rand::random(),
        };
        Self {
            size: options.size,
            above: options.above,
            identity,
            scores: HashMap::new(),
            members: BTreeSet::new(),
            rest: BTreeSet::new(),
        }
    }

    /// How many addresses are known.
    pub(crate) fn known(&self) -> usize {
        self.scores.len()
    }

    /// How many of them are in the subset.
    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    pub(crate) fn status(&self) -> SubsetStatus {
        SubsetStatus {
            known: self.known(),
            members: self.len(),
        }
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, addr: &str) -> bool {
        self.scores.contains_key(addr)
    }

    pub(crate) fn is_member(&self, addr: &str) -> bool {
        self.scores
            .get_key_value(addr)
            .is_some_and(|(a, &score)| self.members.contains(&(score, a.clone())))
    }

    /// The members, highest score first.
    #[cfg(test)]
    pub(crate) fn members(&self) -> Vec<Arc<str>> {
        self.members.iter().rev().map(|(_, a)| a.clone()).collect()
    }

    /// Adds a known address (nothing if already known).
    pub(crate) fn insert(&mut self, addr: &str) -> Delta {
        let mut delta = Delta::default();
        if self.scores.contains_key(addr) {
            return delta;
        }
        let addr: Arc<str> = addr.into();
        let score = score(self.identity, &addr);
        self.scores.insert(addr.clone(), score);
        // Into the subset only if it outranks its lowest member; `settle` then moves the member
        // it displaced out (or fills a subset that was short).
        let outranks = self
            .members
            .first()
            .is_none_or(|low| (score, &addr) > (low.0, &low.1));
        if outranks {
            self.members.insert((score, addr.clone()));
            delta.joined.push(addr);
        } else {
            self.rest.insert((score, addr));
        }
        self.settle(&mut delta);
        delta
    }

    /// Forgets an address (nothing if unknown).
    pub(crate) fn remove(&mut self, addr: &str) -> Delta {
        let mut delta = Delta::default();
        let Some((addr, score)) = self.scores.remove_entry(addr) else {
            return delta;
        };
        let ranked = (score, addr);
        if self.members.remove(&ranked) {
            delta.left.push(ranked.1);
        } else {
            self.rest.remove(&ranked);
        }
        self.settle(&mut delta);
        delta
    }

    /// Makes the known addresses exactly `addrs`, one insert or remove per difference. The scan
    /// is O(N) because a full snapshot has to be compared; the subset work stays O(log N) each.
    #[cfg(test)]
    pub(crate) fn sync<'a>(&mut self, addrs: impl IntoIterator<Item = &'a str> + Clone) -> Delta {
        let wanted: std::collections::HashSet<&str> = addrs.clone().into_iter().collect();
        let gone: Vec<Arc<str>> = self
            .scores
            .keys()
            .filter(|a| !wanted.contains(&***a))
            .cloned()
            .collect();
        let mut delta = Delta::default();
        for addr in gone {
            delta.merge(self.remove(&addr));
        }
        for addr in addrs {
            delta.merge(self.insert(addr));
        }
        delta
    }

    /// The subset's size for the addresses known now.
    fn capacity(&self) -> usize {
        if self.size == 0 || self.scores.len() <= self.above {
            usize::MAX
        } else {
            self.size
        }
    }

    /// Moves the lowest members out while the subset is too large and the best of the rest in
    /// while it is short, recording who moved.
    fn settle(&mut self, delta: &mut Delta) {
        let capacity = self.capacity();
        while self.members.len() > capacity {
            let Some(low) = self.members.pop_first() else {
                break;
            };
            delta.note_left(low.1.clone());
            self.rest.insert(low);
        }
        while self.members.len() < capacity {
            let Some(best) = self.rest.pop_last() else {
                break;
            };
            delta.note_joined(best.1.clone());
            self.members.insert(best);
        }
    }
}

impl Delta {
    /// Adds every address that joined or left to `touched`: their backends must be looked at.
    pub(crate) fn touch(self, touched: &mut BTreeSet<Arc<str>>) {
        touched.extend(self.joined);
        touched.extend(self.left);
    }

    /// An address that joined and left in the same update did neither.
    fn note_left(&mut self, addr: Arc<str>) {
        match self.joined.iter().position(|a| *a == addr) {
            Some(i) => {
                self.joined.swap_remove(i);
            }
            None => self.left.push(addr),
        }
    }

    fn note_joined(&mut self, addr: Arc<str>) {
        match self.left.iter().position(|a| *a == addr) {
            Some(i) => {
                self.left.swap_remove(i);
            }
            None => self.joined.push(addr),
        }
    }

    #[cfg(test)]
    fn merge(&mut self, other: Delta) {
        for addr in other.left {
            self.note_left(addr);
        }
        for addr in other.joined {
            self.note_joined(addr);
        }
    }
}

/// The rendezvous score of `addr` for a client: the address's stable hash combined with the
/// client's and mixed (the SplitMix64 finaliser), so two identities rank the fleet independently.
fn score(identity: u64, addr: &str) -> u64 {
    mix(hash64(addr.as_bytes()) ^ identity)
}

/// A 64-bit finaliser (splitmix64's): spreads the combined hash over the whole range, so the
/// ranks of one address under different identities are independent.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: usize) -> String {
        format!(
            "10.{}.{}.{}:50051",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        )
    }

    fn subset(identity: &str, size: usize, n: usize) -> Subset {
        let addrs: Vec<String> = (0..n).map(addr).collect();
        subset_of(identity, size, &addrs)
    }

    fn subset_of(identity: &str, size: usize, addrs: &[String]) -> Subset {
        let mut s = Subset::new(&Subsetting {
            size,
            above: size,
            identity: Some(identity.to_owned()),
        });
        for a in addrs {
            s.insert(a);
        }
        s
    }

    /// The top `size` by score, ranked from scratch: what the incremental sets must equal.
    fn recomputed(s: &Subset) -> Vec<Arc<str>> {
        let mut all: Vec<Ranked> = s.scores.iter().map(|(a, &sc)| (sc, a.clone())).collect();
        all.sort();
        all.reverse();
        all.truncate(s.capacity().min(all.len()));
        all.into_iter().map(|(_, a)| a).collect()
    }

    fn cv(counts: &[f64]) -> f64 {
        let n = counts.len() as f64;
        let mean = counts.iter().sum::<f64>() / n;
        let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / n;
        var.sqrt() / mean
    }

    #[test]
    fn holds_min_of_size_and_known() {
        for n in [0, 1, 5, 19, 20, 21, 100] {
            let s = subset("client-a", 20, n);
            assert_eq!(s.len(), n.min(20), "n = {n}");
            assert_eq!(s.known(), n);
        }
    }

    #[test]
    fn incremental_changes_match_a_full_ranking_and_move_at_most_one_each_way() {
        let mut s = subset("client-b", 20, 300);
        // Remove every third address, then add new ones, checking against a full ranking.
        for i in (0..300).step_by(3) {
            let before = s.members();
            let delta = s.remove(&addr(i));
            assert!(
                delta.left.len() <= 1 && delta.joined.len() <= 1,
                "{delta:?}"
            );
            assert_eq!(
                delta.left.len(),
                delta.joined.len(),
                "a full subset refills"
            );
            assert_eq!(before.contains(&Arc::from(addr(i))), !delta.left.is_empty());
            assert_eq!(s.members(), recomputed(&s));
        }
        for i in 1000..1100 {
            let delta = s.insert(&addr(i));
            assert!(
                delta.left.len() <= 1 && delta.joined.len() <= 1,
                "{delta:?}"
            );
            assert_eq!(s.members(), recomputed(&s));
        }
        assert_eq!(s.len(), 20);
    }

    #[test]
    fn the_same_identity_gives_the_same_subset_in_any_order() {
        let a = subset("pod-7", 20, 500);
        let mut b = Subset::new(&Subsetting {
            size: 20,
            above: 20,
            identity: Some("pod-7".into()),
        });
        for i in (0..500).rev() {
            b.insert(&addr(i));
        }
        assert_eq!(a.members(), b.members());
        assert_ne!(a.members(), subset("pod-8", 20, 500).members());
    }

    #[test]
    fn scores_are_stable_across_processes_and_versions() {
        // Pinned: a stable hash (not std's randomly keyed SipHash) keeps an explicit identity's
        // subset the same in every process, on every platform, after every upgrade.
        assert_eq!(
            score(hash64(b"pod-7"), "10.0.0.1:50051"),
            0xb465_9e0d_09f3_3fea
        );
    }

    #[test]
    fn one_change_moves_about_k_over_n_of_each_clients_subset() {
        // 200 clients, K = 20 of N = 500: adding (then removing) one instance replaces a member
        // of a given client's subset with probability about K / N, so over 10 changes of each
        // kind 200 * 10 * 20 / 500 = 80 replacements are expected (Poisson, sd 9); [48, 112] is
        // 3.5 sd either way. Recomputing on every change would find the same count; what this
        // checks is that rendezvous hashing moves only that many.
        let (k, n, clients) = (20, 500, 200);
        let addrs: Vec<String> = (0..n).map(addr).collect();
        let mut subsets: Vec<Subset> = (0..clients)
            .map(|c| subset_of(&format!("client-{c}"), k, &addrs))
            .collect();
        let (mut added, mut removed) = (0, 0);
        for j in 0..10 {
            let new = addr(n + j);
            for s in &mut subsets {
                let delta = s.insert(&new);
                assert!(delta.joined.len() <= 1 && delta.left.len() <= 1);
                added += delta.left.len();
            }
        }
        for j in 0..10 {
            let old = addr(j);
            for s in &mut subsets {
                let delta = s.remove(&old);
                assert!(delta.joined.len() <= 1 && delta.left.len() <= 1);
                removed += delta.left.len();
            }
        }
        for moved in [added, removed] {
            assert!((48..=112).contains(&moved), "{moved} replacements");
        }
    }

    /// How many of `clients` subsets of `k` include each of `n` instances, and the coefficient of
    /// variation independent random choices would give. Ranks with the scores directly (what
    /// `Subset` keeps incrementally; `incremental_changes_match_a_full_ranking...` checks the two
    /// agree), so a test over 10,000 instances stays fast in a debug build.
    fn spread(clients: usize, k: usize, n: usize) -> (Vec<f64>, f64) {
        let mut counts = vec![0.0; n];
        let addrs: Vec<String> = (0..n).map(addr).collect();
        let hashes: Vec<u64> = addrs.iter().map(|a| hash64(a.as_bytes())).collect();
        for c in 0..clients {
            let identity = hash64(format!("client-{c}").as_bytes());
            let mut ranked: Vec<(u64, usize)> = hashes
                .iter()
                .enumerate()
                .map(|(i, &h)| (mix(h ^ identity), i))
                .collect();
            ranked.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
            for &(_, i) in &ranked[..k] {
                counts[i] += 1.0;
            }
        }
        let p = k as f64 / n as f64;
        let expected = ((1.0 - p) / (clients as f64 * p)).sqrt();
        (counts, expected)
    }

    #[test]
    fn a_hundred_clients_spread_like_independent_random_choices() {
        // 100 clients x K = 20 over 10,000 instances: 2,000 connections for 10,000 instances, so
        // an instance is chosen by Bin(100, 0.002) clients: mean 0.2, CV 2.23, and about
        // 1 - 0.998^100 = 18.1 % of instances chosen at all. The sample CV over 10,000 instances
        // has a standard error under 1 %, so 10 % either way fails only for a biased hash.
        let (counts, expected) = spread(100, 20, 10_000);
        let measured = cv(&counts);
        assert!(
            (measured / expected - 1.0).abs() < 0.1,
            "CV {measured:.3}, binomial {expected:.3}"
        );
        let covered = counts.iter().filter(|&&c| c > 0.0).count();
        assert!((1_650..=1_970).contains(&covered), "{covered} covered");
        assert_eq!(counts.iter().sum::<f64>(), 2_000.0);
    }

    #[test]
    fn enough_clients_cover_the_fleet_evenly() {
        // 500 clients x K = 20 over 1,000: Bin(500, 0.02), mean 10, CV 0.31; every instance is
        // chosen unless one is missed with probability 0.98^500 = 4e-5 (0.04 expected).
        let (counts, expected) = spread(500, 20, 1_000);
        let measured = cv(&counts);
        assert!(
            (measured / expected - 1.0).abs() < 0.1,
            "CV {measured:.3}, binomial {expected:.3}"
        );
        assert!(counts.iter().all(|&c| c > 0.0), "an instance nobody chose");
    }

    #[test]
    fn stays_off_at_or_below_the_threshold_and_switches_gracefully() {
        let mut s = Subset::new(&Subsetting {
            size: 20,
            above: 100,
            identity: Some("c".into()),
        });
        for i in 0..100 {
            let delta = s.insert(&addr(i));
            assert_eq!(delta.joined.len(), 1);
        }
        assert_eq!(s.len(), 100, "off at the threshold: all are members");
        // The 101st switches it on: the 81 lowest-ranked leave at once (the new one among them
        // or not), and nothing joins twice.
        let delta = s.insert(&addr(100));
        assert_eq!(s.len(), 20);
        assert_eq!(delta.left.len() + 20, 100 + delta.joined.len());
        assert_eq!(s.members(), recomputed(&s));
        // And back: everything known joins again.
        let delta = s.remove(&addr(100));
        assert_eq!(s.len(), 100);
        assert_eq!(20 + delta.joined.len() - delta.left.len(), 100);
        let mut off = Subset::new(&Subsetting::off());
        let all: Vec<String> = (0..500).map(addr).collect();
        off.sync(all.iter().map(String::as_str));
        assert_eq!(off.len(), 500);
    }

    #[test]
    fn sync_applies_a_snapshot_as_single_changes() {
        let mut s = subset("d", 5, 50);
        let next: Vec<String> = (10..60).map(addr).collect();
        let before = s.members();
        let delta = s.sync(next.iter().map(String::as_str));
        assert_eq!(s.known(), 50);
        assert_eq!(s.members(), recomputed(&s));
        for a in &delta.left {
            assert!(before.contains(a) && !s.members().contains(a));
        }
        for a in &delta.joined {
            assert!(!before.contains(a) && s.members().contains(a));
        }
        assert!(s.is_member(&s.members()[0]) && !s.is_member("nowhere:1"));
        assert!(s.contains(&addr(59)) && !s.contains(&addr(0)));
    }
}
