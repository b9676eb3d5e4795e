//! Balancing policies: which of the usable instances a call goes to.
//!
//! | policy | picks | use it when |
//! |---|---|---|
//! | `round_robin` (default) | each instance in turn | instances are alike |
//! | `weighted_round_robin` | in proportion to each instance's `weight` metadata, smoothly (nginx's algorithm: 1:2:3 gives `c b a b c c`, never bursts) | instances differ in capacity; weight 0 drains one |
//! | `random` | uniformly at random | many clients, no shared state wanted |
//! | `least_request` | the less busy of two random instances (power of two choices over calls in flight) | call costs or instance speeds vary |
//! | `consistent_hash` | the instance owning the call's key on a hash ring; adding one of N instances moves about 1/N of the keys | per-key caches or affinity |
//! | `pick_first` | the first usable instance, in address order, until it fails | one primary, the rest as standby |
//!
//! A `Picker` is built from the usable instances each time they change; picking is a read of that
//! snapshot plus, depending on the policy, an atomic increment, a short lock or a random draw.

use std::{
    fmt,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use rand::{RngExt, SeedableRng, rngs::StdRng};
use tokio::time::Instant;

use super::{Shared, backend::Backend};
use crate::metrics;
use crate::sync::Unpoisoned;

/// How calls are spread over instances:
///
/// | policy | picks | use it when |
/// |---|---|---|
/// | `round_robin` (default) | each instance in turn | instances are alike |
/// | `weighted_round_robin` | in proportion to each instance's `weight` metadata, smoothly (nginx's algorithm: 1:2:3 gives `c b a b c c`, never bursts) | instances differ in capacity; weight 0 drains one |
/// | `random` | uniformly at random | many clients, no shared state wanted |
/// | `least_request` | the less busy of two random instances (power of two choices over calls in flight) | call costs or instance speeds vary |
/// | `consistent_hash` | the instance owning the call's key on a hash ring; adding one of N instances moves about 1/N of the keys | per-key caches or affinity |
/// | `pick_first` | the first usable instance, in address order, until it fails | one primary, the rest as standby |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Each usable instance in turn.
    #[default]
    RoundRobin,
    /// Smooth weighted rotation by the `weight` metadata (default 1; 0 receives nothing).
    WeightedRoundRobin,
    /// Uniformly at random.
    Random,
    /// Power of two choices over the number of calls in flight.
    LeastRequest,
    /// Ring hash over the call's key ([`crate::HASH_KEY`]); round robin for calls without.
    ConsistentHash,
    /// The first usable instance in address order.
    PickFirst,
}

impl Policy {
    /// Every policy, in the order of the module docs.
    pub const ALL: [Policy; 6] = [
        Policy::RoundRobin,
        Policy::WeightedRoundRobin,
        Policy::Random,
        Policy::LeastRequest,
        Policy::ConsistentHash,
        Policy::PickFirst,
    ];

    /// The policy's name as used on the command line, e.g. `least_request`.
    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::WeightedRoundRobin => "weighted_round_robin",
            Policy::Random => "random",
            Policy::LeastRequest => "least_request",
            Policy::ConsistentHash => "consistent_hash",
            Policy::PickFirst => "pick_first",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;

    /// Accepts the names of [`Policy::name`], with `-` or `_`.
    fn from_str(text: &str) -> Result<Self, String> {
        let wanted = text.trim().replace('-', "_");
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == wanted)
            .ok_or_else(|| {
                let names: Vec<_> = Policy::ALL.iter().map(|p| p.name()).collect();
                format!(
                    "unknown policy {text:?}; choose one of {}",
                    names.join(", ")
                )
            })
    }
}

/// What a policy needs to know about an instance.
pub(crate) trait Candidate {
    /// A stable identity for the hash ring (the address).
    fn ring_key(&self) -> &str;
    /// Relative capacity, at least 1 (instances of weight 0 are never handed to a picker).
    fn weight(&self) -> u32;
    /// Calls in flight right now.
    fn in_flight(&self) -> usize;
}

/// Points each instance gets on the hash ring: enough for an even split (about 1/N of the keys move
/// when one of N instances joins), cheap to build for thousands of instances.
const RING_POINTS: usize = 100;

/// One policy applied to one snapshot of usable instances.
pub(crate) struct Picker<T> {
    policy: Policy,
    items: Vec<T>,
    /// Smooth weighted round robin: each item's weight, read once when the picker is built
    /// (a change of weight rebuilds it), so a pick reads no metadata.
    weights: Vec<i64>,
    /// Smooth weighted round robin: each item's current weight.
    current: Mutex<Vec<i64>>,
    /// Consistent hash: (point, item index), sorted by point.
    ring: Vec<(u64, usize)>,
    rng: Mutex<StdRng>,
}

impl<T> fmt::Debug for Picker<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Picker")
            .field("policy", &self.policy)
            .field("items", &self.items.len())
            .finish()
    }
}

impl<T: Candidate> Picker<T> {
    /// A picker over `items` (in address order). `seed` makes random choices repeatable.
    pub(crate) fn new(policy: Policy, items: Vec<T>, seed: Option<u64>) -> Self {
        let ring = if policy == Policy::ConsistentHash {
            build_ring(&items)
        } else {
            Vec::new()
        };
        let weights = if policy == Policy::WeightedRoundRobin {
            items.iter().map(|item| i64::from(item.weight())).collect()
        } else {
            Vec::new()
        };
        let seed = seed.unwrap_or_else(|| rand::rng().random());
        Self {
            policy,
            weights,
            current: Mutex::new(vec![0; items.len()]),
            items,
            ring,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    pub(crate) fn items(&self) -> &[T] {
        &self.items
    }

    /// The policy's choice among the items `usable` accepts. `counter` drives rotations and is
    /// shared across pickers, so a rebuild does not restart the rotation; `key` is the call's hash
    /// key, if it has one.
    pub(crate) fn pick(
        &self,
        counter: &AtomicUsize,
        key: Option<&[u8]>,
        usable: impl Fn(&T) -> bool,
    ) -> Option<&T> {
        let n = self.items.len();
        if n == 0 {
            return None;
        }
        let index = match self.policy {
            Policy::RoundRobin => self.scan(counter.fetch_add(1, Ordering::Relaxed), &usable),
            Policy::PickFirst => self.scan(0, &usable),
            Policy::Random => {
                let start = self.random_index(n);
                self.scan(start, &usable)
            }
            Policy::WeightedRoundRobin => self.smooth_weighted(&usable),
            Policy::LeastRequest => self.two_choices(&usable),
            Policy::ConsistentHash => match key {
                Some(key) => self.ring_owner(key, &usable),
                None => self.scan(counter.fetch_add(1, Ordering::Relaxed), &usable),
            },
        };
        index.map(|i| &self.items[i])
    }

    /// The first usable item at or after `start`, wrapping around.
    fn scan(&self, start: usize, usable: &impl Fn(&T) -> bool) -> Option<usize> {
        let n = self.items.len();
        (0..n)
            .map(|offset| (start.wrapping_add(offset)) % n)
            .find(|&i| usable(&self.items[i]))
    }

    fn random_index(&self, n: usize) -> usize {
        // The lock guards a random generator; a panic cannot leave it unusable.
        self.rng.locked().random_range(0..n)
    }

    /// nginx's smooth weighted round robin: every usable item gains its weight, the richest is
    /// picked and pays the total. Over any window of `sum(weights)` picks each item is picked
    /// exactly `weight` times, interleaved rather than in bursts.
    fn smooth_weighted(&self, usable: &impl Fn(&T) -> bool) -> Option<usize> {
        let mut current = self.current.locked();
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, item) in self.items.iter().enumerate() {
            if !usable(item) {
                continue;
            }
            let weight = self.weights[i];
            current[i] += weight;
            total += weight;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }

    /// Power of two choices: of two distinct random items, the one with fewer calls in flight.
    fn two_choices(&self, usable: &impl Fn(&T) -> bool) -> Option<usize> {
        let n = self.items.len();
        let a = self.random_index(n);
        let b = if n > 1 {
            (a + 1 + self.random_index(n - 1)) % n
        } else {
            a
        };
        let candidates = [a, b].into_iter().filter(|&i| usable(&self.items[i]));
        candidates
            .min_by_key(|&i| self.items[i].in_flight())
            .or_else(|| self.scan(a, usable))
    }

    /// The owner of `key` on the ring: the first point at or after the key's hash, skipping points
    /// of unusable items (so their keys spread over the rest instead of piling on one neighbour).
    fn ring_owner(&self, key: &[u8], usable: &impl Fn(&T) -> bool) -> Option<usize> {
        let hash = hash64(key);
        let start = self.ring.partition_point(|&(point, _)| point < hash);
        (0..self.ring.len())
            .map(|offset| self.ring[(start + offset) % self.ring.len()].1)
            .find(|&i| usable(&self.items[i]))
    }
}

fn build_ring<T: Candidate>(items: &[T]) -> Vec<(u64, usize)> {
    let mut ring: Vec<(u64, usize)> = items
        .iter()
        .enumerate()
        .flat_map(|(i, item)| {
            (0..RING_POINTS).map(move |point| {
                let label = format!("{}#{point}", item.ring_key());
                (hash64(label.as_bytes()), i)
            })
        })
        .collect();
    ring.sort_unstable();
    ring
}

/// FNV-1a, then the SplitMix64 finaliser to spread similar inputs over the whole ring. Stable across
/// processes, platforms and Rust versions, which `std`'s hasher does not promise: every client must
/// put a key on the same instance.
pub(crate) fn hash64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

impl Shared {
    /// Asks the updater for a rebuild; cheap, and safe to call from any task.
    pub(super) fn request_rebuild(&self) {
        self.rebuild_requested.fetch_add(1, Ordering::SeqCst);
        self.rebuild_wanted.notify_one();
    }

    /// Rebuilds the picker if a rebuild was asked for since the last one (the updater's job:
    /// requests that arrive while it is busy are served by one rebuild).
    pub(super) fn rebuild_if_requested(&self) {
        let requested = self.rebuild_requested.load(Ordering::SeqCst);
        if requested != self.rebuild_published.load(Ordering::SeqCst) {
            self.rebuild(requested);
        }
    }

    /// Rebuilds the picker from the backends that may be called: connected, reporting SERVING,
    /// weight above 0, not draining, not at the end of a removal grace, admitted by the selector,
    /// and preferred by it when any is. `requested` is the request count read before looking at
    /// the backends: every change requested up to it is reflected.
    fn rebuild(&self, requested: u64) {
        let backends = self.backends.locked();
        let now = Instant::now();
        let usable: Vec<Arc<Backend>> = backends
            .values()
            .filter(|b| {
                b.is_ready()
                    && b.is_serving()
                    && b.weight() > 0
                    && !b.is_draining()
                    && b.grace_over(now).is_none()
                    && self.selector.admits(&b.metadata())
            })
            .cloned()
            .collect();
        let usable = self
            .selector
            .narrow(usable, |b| self.selector.prefers(&b.metadata()));
        metrics::instances(
            &self.service,
            self.membership.borrow().instances.len(),
            usable.len(),
        );
        let picker = Arc::new(Picker::new(self.policy, usable, self.seed));
        *crate::sync::write(&self.picker) = picker;
        drop(backends);
        self.rebuild_published.store(requested, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

impl Candidate for Arc<Backend> {
    fn ring_key(&self) -> &str {
        &self.addr
    }

    fn weight(&self) -> u32 {
        Backend::weight(self)
    }

    fn in_flight(&self) -> usize {
        Backend::in_flight(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    struct Fake {
        addr: String,
        weight: u32,
        in_flight: usize,
    }

    impl Candidate for Fake {
        fn ring_key(&self) -> &str {
            &self.addr
        }
        fn weight(&self) -> u32 {
            self.weight
        }
        fn in_flight(&self) -> usize {
            self.in_flight
        }
    }

    fn fakes(weights: &[u32]) -> Vec<Fake> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Fake {
                addr: format!("10.0.0.{i}:50051"),
                weight,
                in_flight: 0,
            })
            .collect()
    }

    fn counts(
        picker: &Picker<Fake>,
        calls: usize,
        key: impl Fn(usize) -> Option<Vec<u8>>,
    ) -> BTreeMap<String, usize> {
        let counter = AtomicUsize::new(0);
        let mut counts = BTreeMap::new();
        for n in 0..calls {
            let key = key(n);
            let item = picker.pick(&counter, key.as_deref(), |_| true).unwrap();
            *counts.entry(item.addr.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn names_round_trip_and_bad_names_list_the_choices() {
        for policy in Policy::ALL {
            assert_eq!(policy.name().parse::<Policy>(), Ok(policy));
        }
        assert_eq!("least-request".parse::<Policy>(), Ok(Policy::LeastRequest));
        assert!(
            "fastest"
                .parse::<Policy>()
                .unwrap_err()
                .contains("pick_first")
        );
    }

    #[test]
    fn round_robin_rotates_exactly_and_skips_unusable_items() {
        let picker = Picker::new(Policy::RoundRobin, fakes(&[1, 1, 1]), Some(1));
        let counter = AtomicUsize::new(0);
        let order: Vec<_> = (0..6)
            .map(|_| picker.pick(&counter, None, |_| true).unwrap().addr.clone())
            .collect();
        assert_eq!(order[..3], order[3..]);
        let skipping: Vec<_> = (0..4)
            .map(|_| {
                picker
                    .pick(&counter, None, |f| !f.addr.starts_with("10.0.0.1"))
                    .unwrap()
                    .addr
                    .clone()
            })
            .collect();
        assert!(skipping.iter().all(|a| !a.starts_with("10.0.0.1")));
        assert!(picker.pick(&counter, None, |_| false).is_none());
    }

    #[test]
    fn smooth_weights_split_exactly_and_interleave() {
        let picker = Picker::new(Policy::WeightedRoundRobin, fakes(&[1, 2, 3]), Some(1));
        let counts = counts(&picker, 6000, |_| None);
        assert_eq!(
            counts.values().copied().collect::<Vec<_>>(),
            [1000, 2000, 3000]
        );
        // No bursts: within any six picks the weight-3 instance appears exactly three times,
        // never three in a row.
        let counter = AtomicUsize::new(0);
        let order: Vec<_> = (0..12)
            .map(|_| picker.pick(&counter, None, |_| true).unwrap().weight)
            .collect();
        assert!(order.windows(3).all(|w| w != [3, 3, 3]), "{order:?}");
    }

    #[test]
    fn random_with_a_seed_is_repeatable_and_even() {
        let a = counts(
            &Picker::new(Policy::Random, fakes(&[1, 1, 1]), Some(7)),
            3000,
            |_| None,
        );
        let b = counts(
            &Picker::new(Policy::Random, fakes(&[1, 1, 1]), Some(7)),
            3000,
            |_| None,
        );
        assert_eq!(a, b);
        assert!(a.values().all(|&c| (900..=1100).contains(&c)), "{a:?}");
    }

    #[test]
    fn least_request_avoids_the_busy_instance() {
        let mut items = fakes(&[1, 1, 1]);
        items[1].in_flight = 10;
        let counts = counts(
            &Picker::new(Policy::LeastRequest, items, Some(3)),
            3000,
            |_| None,
        );
        // The busy one only wins when drawn twice, which two distinct draws never do.
        assert_eq!(counts.get("10.0.0.1:50051"), None, "{counts:?}");
    }

    #[test]
    fn consistent_hash_keeps_keys_in_place_when_an_instance_joins() {
        let ten = Picker::new(Policy::ConsistentHash, fakes(&[1; 10]), None);
        let eleven = Picker::new(Policy::ConsistentHash, fakes(&[1; 11]), None);
        let counter = AtomicUsize::new(0);
        let keys: Vec<String> = (0..10_000).map(|k| format!("user-{k}")).collect();
        let owner = |p: &Picker<Fake>, key: &str| {
            p.pick(&counter, Some(key.as_bytes()), |_| true)
                .unwrap()
                .addr
                .clone()
        };
        let kept = keys
            .iter()
            .filter(|k| owner(&ten, k) == owner(&eleven, k))
            .count();
        let share = kept as f64 / keys.len() as f64;
        assert!(share >= 0.85, "only {share:.3} of keys stayed");
        // Every instance owns a fair share (100 points each).
        let load = counts(&ten, 10_000, |n| Some(format!("user-{n}").into_bytes()));
        assert!(
            load.values().all(|&c| (500..=1500).contains(&c)),
            "{load:?}"
        );
        // The same key always lands on the same instance, and skips an unusable owner.
        let first = owner(&ten, "user-42");
        assert_eq!(owner(&ten, "user-42"), first);
        let other = ten
            .pick(&counter, Some(b"user-42"), |f| f.addr != first)
            .unwrap();
        assert_ne!(other.addr, first);
    }

    #[test]
    fn pick_first_sticks_to_the_first_usable() {
        let picker = Picker::new(Policy::PickFirst, fakes(&[1, 1, 1]), None);
        let counts = counts(&picker, 10, |_| None);
        assert_eq!(counts.get("10.0.0.0:50051"), Some(&10));
        let counter = AtomicUsize::new(0);
        let next = picker
            .pick(&counter, None, |f| f.addr != "10.0.0.0:50051")
            .unwrap();
        assert_eq!(next.addr, "10.0.0.1:50051");
    }

    const PINNED_USER_42: u64 = 0x7a15_96f0_e94b_5793;

    #[test]
    fn the_hash_is_stable() {
        // Pinned: changing the hash would move every key of every deployed client.
        assert_eq!(hash64(b"user-42"), hash64(b"user-42"));
        assert_ne!(hash64(b"user-42"), hash64(b"user-43"));
        assert_eq!(
            hash64(b"user-42"),
            PINNED_USER_42,
            "{:#x}",
            hash64(b"user-42")
        );
    }
}
