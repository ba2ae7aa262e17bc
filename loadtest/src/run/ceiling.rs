//! The ceiling ratio: A (talkgroup) and B (raw forwarder) phases alternate under the same load, and the
//! ratio is raw CPU per packet ÷ talkgroup CPU per packet, from the medians of the rounds.

use super::results::Done;
use crate::cli::Config;
use crate::report::{Ceiling, CeilingRound};
use crate::stats::{median, LatencyHist};

/// The ceiling ratio the issue sets: ≥ 0.9 for plain RTP; ≥ 0.7 as soon as WebRTC listeners are in the
/// mix (their SRTP work has no counterpart in the raw forwarder).
pub fn goal(transport: &str) -> f64 {
    if transport == "rtp" {
        0.9
    } else {
        0.7
    }
}

/// The ceiling figures of the A/B phases in `done`; `cpu`: where the raw forwarder ran.
pub fn ceiling(cfg: &Config, done: &[Done], cpu: Option<usize>) -> Ceiling {
    let of = |target: &'static str| {
        done.iter()
            .filter(move |d| d.result.kind == "ceiling" && d.result.target == target)
    };
    let tg: Vec<Option<f64>> = of("talkgroup")
        .map(|d| d.result.server.as_ref().and_then(|s| s.cpu_per_fwd_ns))
        .collect();
    let rw: Vec<Option<f64>> = of("raw")
        .map(|d| d.result.raw.as_ref().and_then(|s| s.cpu_per_fwd_ns))
        .collect();
    let mut raw_lat = LatencyHist::new();
    for d in of("raw") {
        raw_lat.merge(&d.latency);
    }
    let rounds: Vec<CeilingRound> = tg
        .iter()
        .zip(rw.iter().chain(std::iter::repeat(&None)))
        .map(|(a, b)| CeilingRound {
            talkgroup_cpu_per_fwd_ns: *a,
            raw_cpu_per_fwd_ns: *b,
            ratio: ratio(*b, *a),
        })
        .collect();
    let shard: Vec<f64> = of("talkgroup")
        .filter_map(|d| {
            d.result
                .server
                .as_ref()
                .and_then(|s| s.shard_cpu_per_fwd_ns)
        })
        .collect();
    let mts = median(&shard);
    let mt = median(&tg.iter().flatten().copied().collect::<Vec<_>>());
    let mr = median(&rw.iter().flatten().copied().collect::<Vec<_>>());
    let r = ratio(mr, mt);
    Ceiling {
        cpu,
        rounds,
        median_talkgroup_ns: mt,
        median_raw_ns: mr,
        ratio: r,
        median_talkgroup_shard_ns: mts,
        ratio_shard_thread: ratio(mr, mts),
        goal: goal(&cfg.transport),
        meets_goal: r.map(|r| r >= goal(&cfg.transport)),
        raw_latency: raw_lat.summary(),
    }
}

/// raw ÷ talkgroup, when both are known and talkgroup's is positive.
fn ratio(raw: Option<f64>, talkgroup: Option<f64>) -> Option<f64> {
    match (raw, talkgroup) {
        (Some(r), Some(t)) if t > 0.0 => Some(r / t),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_by_transport() {
        assert_eq!(goal("rtp"), 0.9);
        assert_eq!(goal("webrtc"), 0.7);
        assert_eq!(goal("mixed"), 0.7);
    }
}
