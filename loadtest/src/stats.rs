//! Latency histograms (HdrHistogram, nanoseconds) and the counters that travel from the I/O threads to
//! the coordinator. Each thread records into its own histogram and ships it; the coordinator merges, so
//! nothing is shared on the hot path.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Lowest value told apart. HdrHistogram's resolution near the bottom is the power of two below this,
/// so 1 ns keeps 3 significant digits at the 10–100 µs that loopback forwarding takes.
const LOW_NS: u64 = 1;
/// Highest value recorded (60 s); anything above is clamped, not dropped.
const HIGH_NS: u64 = 60_000_000_000;

/// A latency histogram in nanoseconds with 3 significant digits.
#[derive(Clone, Debug)]
pub struct LatencyHist {
    h: Histogram<u64>,
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHist {
    pub fn new() -> Self {
        LatencyHist {
            h: Histogram::new_with_bounds(LOW_NS, HIGH_NS, 3)
                .expect("static histogram bounds are valid"),
        }
    }

    /// Record one sample; values out of range are clamped to it.
    pub fn record(&mut self, ns: u64) {
        self.h.saturating_record(ns.clamp(1, HIGH_NS));
    }

    pub fn merge(&mut self, other: &LatencyHist) {
        // Same bounds on both sides, so `add` cannot fail.
        let _ = self.h.add(&other.h);
    }

    pub fn len(&self) -> u64 {
        self.h.len()
    }

    pub fn is_empty(&self) -> bool {
        self.h.is_empty()
    }

    /// Value at quantile `q` (0..=1), ns.
    pub fn quantile(&self, q: f64) -> u64 {
        self.h.value_at_quantile(q)
    }

    pub fn summary(&self) -> Percentiles {
        if self.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: self.h.len(),
            min_us: self.h.min() as f64 / 1e3,
            mean_us: self.h.mean() / 1e3,
            p50_us: self.quantile(0.5) as f64 / 1e3,
            p90_us: self.quantile(0.9) as f64 / 1e3,
            p99_us: self.quantile(0.99) as f64 / 1e3,
            p999_us: self.quantile(0.999) as f64 / 1e3,
            max_us: self.h.max() as f64 / 1e3,
        }
    }

    /// Points of the percentile-distribution plot: (quantile, µs) at 1 − 10^(−k/4) steps up to the
    /// last recorded sample, the classic HdrHistogram view where the tail gets as much room as the body.
    pub fn percentile_curve(&self) -> Vec<(f64, f64)> {
        if self.h.is_empty() {
            return Vec::new();
        }
        let n = self.h.len() as f64;
        let mut pts = Vec::new();
        let mut k = 0u32;
        loop {
            let q = 1.0 - 10f64.powf(-(k as f64) / 4.0);
            // Stop once the quantile's tail is under one sample.
            if (1.0 - q) * n < 1.0 || k > 40 {
                break;
            }
            pts.push((q, self.quantile(q) as f64 / 1e3));
            k += 1;
        }
        pts.push((1.0 - 1.0 / n.max(2.0), self.h.max() as f64 / 1e3));
        pts
    }
}

/// A histogram summary in microseconds, the unit people read latency in at this scale.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Loss in % of `expected` deliveries. Not floored: more deliveries than expected comes out negative,
/// a books error for the verdict to catch rather than a zero to hide it behind.
pub fn loss_pct(expected: u64, delivered: u64) -> f64 {
    if expected == 0 {
        0.0
    } else {
        (expected as f64 - delivered as f64) * 100.0 / expected as f64
    }
}

/// Median of a list (for the A B A B ceiling rounds); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_percentage() {
        assert_eq!(loss_pct(0, 0), 0.0);
        assert_eq!(loss_pct(1000, 999), 0.1);
        // More deliveries than expected is not "no loss": it shows, negative.
        assert_eq!(loss_pct(10, 12), -20.0);
    }

    #[test]
    fn merge_combines_counts_and_tails() {
        let mut a = LatencyHist::new();
        let mut b = LatencyHist::new();
        for i in 1..=1000u64 {
            a.record(i * 1_000); // 1 µs .. 1 ms
        }
        b.record(50_000_000); // one 50 ms outlier
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 1001);
        assert!((s.max_us - 50_000.0).abs() / 50_000.0 < 0.001, "{s:?}");
        assert!((s.p50_us - 501.0).abs() < 2.0, "{s:?}");
        assert!((s.p99_us - 991.0).abs() < 2.0, "{s:?}");
    }

    #[test]
    fn merge_of_empty_is_identity() {
        let mut a = LatencyHist::new();
        a.record(5_000);
        let before = a.summary();
        a.merge(&LatencyHist::new());
        assert_eq!(a.summary(), before);
        let mut e = LatencyHist::new();
        e.merge(&a);
        assert_eq!(e.summary(), before);
    }

    #[test]
    fn out_of_range_values_are_clamped() {
        let mut a = LatencyHist::new();
        a.record(0);
        a.record(u64::MAX);
        assert_eq!(a.len(), 2);
        assert!(a.summary().max_us >= 59_000_000.0);
    }

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(LatencyHist::new().summary(), Percentiles::default());
        assert!(LatencyHist::new().percentile_curve().is_empty());
    }

    #[test]
    fn percentile_curve_is_monotonic() {
        let mut a = LatencyHist::new();
        for i in 1..=10_000u64 {
            a.record(i * 100);
        }
        let c = a.percentile_curve();
        assert!(c.len() > 10);
        assert!(
            c.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{c:?}"
        );
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }
}
