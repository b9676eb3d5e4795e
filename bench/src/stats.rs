//! Summaries of repeated measurements: median and p99, the two figures every scenario reports.
//!
//! Percentiles use the nearest-rank method on the sorted samples, so every figure printed is a value
//! that was actually measured (no interpolation between two trials).

use std::{fmt, time::Duration};

/// Median, p99 and extremes of a set of samples, in the samples' unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// The 50th percentile.
    pub median: f64,
    /// The 99th percentile.
    pub p99: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|s| s.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        Some(Summary {
            n: sorted.len(),
            median: percentile_sorted(&sorted, 50.0),
            p99: percentile_sorted(&sorted, 99.0),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        })
    }

    /// Summarises durations in milliseconds.
    pub fn of_ms(samples: &[Duration]) -> Option<Summary> {
        Summary::of(&samples.iter().map(|d| ms(*d)).collect::<Vec<_>>())
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "median {} p99 {} (n={}, min {}, max {})",
            num(self.median),
            num(self.p99),
            self.n,
            num(self.min),
            num(self.max)
        )
    }
}

/// The `p`-th percentile (0-100) of sorted samples, nearest rank.
fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The `p`-th percentile (0-100) of `samples`, nearest rank; `None` when empty.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    let mut sorted = samples.to_vec();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    Some(percentile_sorted(&sorted, p))
}

/// A duration in (fractional) milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A count with thousands separated: `100,000`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A number with precision suited to its size: `0.123`, `12.3`, `1234`.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".to_owned()
    } else if a < 1.0 {
        format!("{x:.3}")
    } else if a < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

/// A summary as a Markdown table cell pair `median | p99`, or `n/a | n/a`.
pub fn cells(summary: Option<Summary>) -> String {
    match summary {
        Some(s) => format!("{} | {}", num(s.median), num(s.p99)),
        None => "n/a | n/a".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        let shown: Vec<String> = [0, 999, 1_000, 10_000, 100_000, 1_234_567]
            .into_iter()
            .map(thousands)
            .collect();
        assert_eq!(
            shown,
            ["0", "999", "1,000", "10,000", "100,000", "1,234,567"]
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!(
            (s.median, s.p99, s.min, s.max, s.n),
            (50.0, 99.0, 1.0, 100.0, 100)
        );
        // Few samples: p99 is the largest, the median a measured value.
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.p99), (2.0, 3.0));
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
    }

    #[test]
    fn numbers_keep_sensible_precision() {
        assert_eq!(num(0.12345), "0.123");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(1234.5), "1234");
        assert_eq!(num(0.0), "0");
    }
}
