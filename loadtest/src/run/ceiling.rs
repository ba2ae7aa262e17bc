//! The ceiling ratio: A (talkgroup) and B (raw forwarder) phases alternate under the same load, and the
//! ratio is raw CPU per delivered packet ÷ talkgroup's, from the medians of the rounds.
//!
//! Like is compared with like (`cost.rs`): the raw forwarder's one thread against talkgroup's shard
//! threads, the packet path on both sides, each divided by the media packets its listeners received. The
//! raw phases do no signalling, and talkgroup's signalling runs on its control thread, which the packet
//! path leaves out; the whole-process ratio, control plane included, is reported beside it.

use super::cost::ratio;
use super::results::Done;
use crate::cli::Config;
use crate::report::{Ceiling, CeilingRound};
use crate::stats::{median, LatencyHist};

/// The ceiling ratio the issues set: ≥ 0.9 for plain RTP; ≥ 0.8 for WebRTC listeners (#13: a sealed
/// packet costs at most 25 % more than the raw forwarder's plain one); ≥ 0.7 for the mixed scenario.
pub fn goal(transport: &str) -> f64 {
    match transport {
        "rtp" => 0.9,
        "webrtc" => 0.8,
        _ => 0.7,
    }
}

/// How the ratio is made, for the report.
const YARDSTICK: &str = "CPU per delivered media packet (first copies received by the harness's \
    listeners), medians of the rounds; talkgroup's shard threads (the packet path: no signalling) \
    against the raw forwarder's thread; ratio_process uses talkgroup's whole process";

/// The ceiling figures of the A/B phases in `done`; `cpu`: where the raw forwarder ran.
pub fn ceiling(cfg: &Config, done: &[Done], cpu: Option<usize>) -> Ceiling {
    let of = |target: &'static str| {
        done.iter()
            .filter(move |d| d.result.kind == "ceiling" && d.result.target == target)
    };
    let tg: Vec<(Option<f64>, Option<f64>)> = of("talkgroup")
        .map(|d| {
            let s = d.result.server.as_ref();
            (
                s.and_then(|s| s.shard_cpu_per_delivered_ns),
                s.and_then(|s| s.cpu_per_delivered_ns),
            )
        })
        .collect();
    let rw: Vec<Option<f64>> = of("raw")
        .map(|d| d.result.raw.as_ref().and_then(|s| s.cpu_per_delivered_ns))
        .collect();
    let mut raw_lat = LatencyHist::new();
    for d in of("raw") {
        raw_lat.merge(&d.latency);
    }
    let rounds: Vec<CeilingRound> = tg
        .iter()
        .zip(rw.iter().chain(std::iter::repeat(&None)))
        .map(|(&(shard, process), &raw)| CeilingRound {
            talkgroup_shard_ns: shard,
            talkgroup_process_ns: process,
            raw_ns: raw,
            ratio: ratio(raw, shard),
        })
        .collect();
    let med = |v: Vec<Option<f64>>| median(&v.into_iter().flatten().collect::<Vec<_>>());
    let shard = med(tg.iter().map(|t| t.0).collect());
    let process = med(tg.iter().map(|t| t.1).collect());
    let raw = med(rw);
    let r = ratio(raw, shard);
    Ceiling {
        cpu,
        rounds,
        median_raw_ns: raw,
        median_talkgroup_shard_ns: shard,
        median_talkgroup_process_ns: process,
        ratio: r,
        ratio_process: ratio(raw, process),
        goal: goal(&cfg.transport),
        meets_goal: r.map(|r| r >= goal(&cfg.transport)),
        yardstick: YARDSTICK.into(),
        raw_latency: raw_lat.summary(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{PhaseResult, RawPhase, ServerPhase};

    #[test]
    fn goals_by_transport() {
        assert_eq!(goal("rtp"), 0.9);
        assert_eq!(goal("webrtc"), 0.8);
        assert_eq!(goal("mixed"), 0.7);
    }

    fn done(target: &str, shard: f64, process: f64) -> Done {
        let result = PhaseResult {
            kind: "ceiling".into(),
            target: target.into(),
            server: (target == "talkgroup").then(|| ServerPhase {
                shard_cpu_per_delivered_ns: Some(shard),
                cpu_per_delivered_ns: Some(process),
                ..Default::default()
            }),
            raw: (target == "raw").then(|| RawPhase {
                cpu_per_delivered_ns: Some(process),
                ..Default::default()
            }),
            ..Default::default()
        };
        Done {
            result,
            latency: LatencyHist::new(),
            switch: LatencyHist::new(),
            grant: LatencyHist::new(),
        }
    }

    #[test]
    fn the_ratio_is_of_medians_packet_path_against_packet_path() {
        let cfg = crate::cli::resolve(&clap::Parser::parse_from(["loadtest"])).unwrap();
        // Three rounds: talkgroup's shards 2,000 / 2,500 / 3,000 ns per packet (whole process 3,000 /
        // 3,500 / 9,000), the raw forwarder 2,200 / 2,250 / 1,000.
        let phases = [
            done("talkgroup", 2000.0, 3000.0),
            done("raw", 0.0, 2200.0),
            done("talkgroup", 2500.0, 3500.0),
            done("raw", 0.0, 2250.0),
            done("talkgroup", 3000.0, 9000.0),
            done("raw", 0.0, 1000.0),
        ];
        let c = ceiling(&cfg, &phases, Some(1));
        assert_eq!(c.rounds.len(), 3);
        assert_eq!(c.rounds[0].ratio, Some(1.1));
        assert_eq!(c.median_talkgroup_shard_ns, Some(2500.0));
        assert_eq!(c.median_talkgroup_process_ns, Some(3500.0));
        assert_eq!(c.median_raw_ns, Some(2200.0));
        assert_eq!(c.ratio, Some(2200.0 / 2500.0));
        assert_eq!(c.ratio_process, Some(2200.0 / 3500.0));
        assert_eq!(c.meets_goal, Some(false));
        assert_eq!(c.cpu, Some(1));
    }
}
