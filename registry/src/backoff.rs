//! Capped exponential backoff with jitter, used by every retry loop in the crate.
//!
//! Two properties matter more than the exact curve:
//! - the delay never exceeds the cap, jitter included (an inverted or missing cap is a classic bug);
//! - every delay is jittered, so instances that lost etcd at the same instant do not all come back at
//!   the same instant and hammer the cluster in lockstep.

use std::time::Duration;

use rand::RngExt;

/// Exponential backoff: the base delay doubles after each failure up to `max`; each delay returned is
/// the base scaled by a random factor in `[0.5, 1.5)`, then capped at `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    base: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and never exceeding `max` (`max` is raised to `initial` if
    /// given smaller, so the cap can never be inverted).
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        let max = max.max(initial);
        Self {
            initial,
            max,
            base: initial,
        }
    }

    /// Between attempts of a task that keeps something in etcd (a lease, a key, a watch, a lock):
    /// 100 ms to 1 s, so an outage is noticed again within a second of its end.
    pub(crate) fn etcd_task() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// Between the tries of one etcd request within its deadline: 50 ms to 500 ms, so a
    /// request rotates through the members a few times before it gives up.
    pub(crate) fn etcd_request() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_millis(500))
    }

    /// Between puts of a registration's key after a failure: 50 ms to 1 s, a little quicker
    /// at first than [`Backoff::etcd_task`], since clients are waiting for the key.
    pub(crate) fn key_put() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// Between connection attempts to an instance: 100 ms to 3 s, longer than etcd's, since a
    /// missing instance is discovery's business and dialling it often helps no one.
    pub(crate) fn reconnect() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(3))
    }

    /// The delay before the next attempt; grows the base for the attempt after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let factor = rand::rng().random_range(0.5..1.5);
        self.next_delay_with(factor)
    }

    /// Forget past failures: the next delay starts from `initial` again.
    pub(crate) fn reset(&mut self) {
        self.base = self.initial;
    }

    /// [`Self::next_delay`] with the jitter factor given, so the curve can be tested exactly.
    fn next_delay_with(&mut self, factor: f64) -> Duration {
        let delay = self.base.mul_f64(factor).min(self.max);
        self.base = self.base.saturating_mul(2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        let delays: Vec<_> = (0..6).map(|_| b.next_delay_with(1.0)).collect();
        assert_eq!(
            delays,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
    }

    #[test]
    fn jitter_never_exceeds_the_cap() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        for _ in 0..10 {
            b.next_delay_with(1.0);
        }
        assert_eq!(b.next_delay_with(1.49), 1000 * MS);
        assert_eq!(b.next_delay_with(0.5), 500 * MS);
    }

    #[test]
    fn random_delays_stay_within_bounds() {
        let mut b = Backoff::new(100 * MS, 2000 * MS);
        let mut base = 100 * MS;
        for _ in 0..50 {
            let d = b.next_delay();
            assert!(
                d >= base / 2 && d <= (base * 3 / 2).min(2000 * MS),
                "{d:?} for base {base:?}"
            );
            base = (base * 2).min(2000 * MS);
        }
    }

    #[test]
    fn reset_starts_over_and_inverted_cap_is_raised() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        b.next_delay_with(1.0);
        b.next_delay_with(1.0);
        b.reset();
        assert_eq!(b.next_delay_with(1.0), 100 * MS);

        let mut inverted = Backoff::new(500 * MS, 100 * MS);
        assert_eq!(inverted.next_delay_with(1.4), 500 * MS);
    }
}
