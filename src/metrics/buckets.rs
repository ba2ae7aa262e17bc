//! Fixed-bucket histograms and their bounds: plain values that the shards fill on the packet path and a
//! scrape renders. A leaf module — it imports nothing of the crate — so the shards can use it without
//! reaching back into the metrics that read them.

/// A histogram of integer observations (µs, ns, bytes) in fixed buckets. Plain integers, no atomics and no
/// allocation, so a shard's [`crate::shard::ShardStats`] can carry one and hand over a copy like its counters; the
/// bounds are passed in (constants beside each use), so it is `Default` and `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buckets<const N: usize> {
    /// Observations ≤ `bounds[i]` and > `bounds[i - 1]`.
    counts: [u64; N],
    /// Observations above the last bound.
    over: u64,
    /// Sum of all observations.
    sum: u64,
}

impl<const N: usize> Default for Buckets<N> {
    fn default() -> Self {
        Buckets {
            counts: [0; N],
            over: 0,
            sum: 0,
        }
    }
}

impl<const N: usize> Buckets<N> {
    /// Counts `value` in the first bucket whose bound is ≥ it (`bounds` ascending).
    pub fn observe(&mut self, bounds: &[u64; N], value: u64) {
        match bounds.iter().position(|b| value <= *b) {
            Some(i) => self.counts[i] += 1,
            None => self.over += 1,
        }
        self.sum = self.sum.saturating_add(value);
    }

    /// Adds `other`'s observations (made with the same bounds): the shards' histograms summed.
    pub fn merge(&mut self, other: &Buckets<N>) {
        for (c, o) in self.counts.iter_mut().zip(other.counts) {
            *c += o;
        }
        self.over += other.over;
        self.sum = self.sum.saturating_add(other.sum);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.over
    }

    /// Sum of the observations.
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// Cumulative `(upper bound, count)` pairs ending with `+Inf`, as Prometheus histograms are exposed;
    /// the bounds in base units (`per_unit` observation units make one: 1e6 for µs → seconds).
    pub fn cumulative(&self, bounds: &[u64; N], per_unit: f64) -> Vec<(f64, u64)> {
        let mut total = 0;
        let mut out: Vec<(f64, u64)> = bounds
            .iter()
            .zip(self.counts)
            .map(|(b, c)| {
                total += c;
                // A division, not a multiplication by 1e-6, so 250 µs prints as 0.00025.
                (*b as f64 / per_unit, total)
            })
            .collect();
        out.push((f64::INFINITY, total + self.over));
        out
    }
}

/// Press → granted, in µs: the target is p99 < 1 ms on the embedded store, < 2 ms on Redis.
pub const PRESS_TO_GRANT_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];
/// Bytes in a client's send queue when a frame is queued (the limit is 1 MiB by default).
pub const WS_QUEUE_BYTES: [u64; 8] = [
    256, 1_024, 4_096, 16_384, 65_536, 262_144, 524_288, 1_048_576,
];
/// In-server forwarding latency, in ns (target p99 < 250 µs at 70 % load).
pub const FORWARD_LATENCY_NS: [u64; 11] = [
    10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
    25_000_000,
];
/// One packet in this many is timed for [`FORWARD_LATENCY_NS`] (two clock reads per sample).
pub const FORWARD_LATENCY_SAMPLE: u64 = 64;
/// A receiver report's fraction lost, in 1/256 (as on the wire): 0.4 %, 1 %, 2 %, 5 %, 10 %, 20 %, 50 %, 100 %.
pub const LOSS_PER_256: [u64; 8] = [1, 3, 5, 13, 26, 51, 128, 256];
/// A receiver report's interarrival jitter, in µs.
pub const JITTER_US: [u64; 9] = [
    1_000, 2_500, 5_000, 10_000, 20_000, 40_000, 80_000, 160_000, 500_000,
];
