//! The summary over the measured talkgroup phases (in a knee search, the steps up to the knee — all of
//! them when even the first failed) and the percentile curves of the SVG.

use super::cost::per_packet;
use super::knee::within_limits;
use super::results::Done;
use crate::cli::Config;
use crate::report::{Curves, Knee, Summary};
use crate::stats::{loss_pct, LatencyHist};

/// The summary and the curves of `done`, given the knee search's answer (if it was one).
pub fn summarise(cfg: &Config, knee: Option<&Knee>, done: &[Done]) -> (Summary, Curves) {
    let none_passed = knee.is_some_and(|k| k.knee.is_none());
    let in_summary = |d: &Done| -> bool {
        d.result.measured
            && d.result.target == "talkgroup"
            && (d.result.kind != "knee-step" || none_passed || within_limits(cfg, &d.result))
    };
    let mut lat = LatencyHist::new();
    let mut sw = LatencyHist::new();
    let mut gr = LatencyHist::new();
    let mut raw_lat = LatencyHist::new();
    let mut s = Summary::default();
    let (mut secs, mut sent) = (0.0, 0u64);
    // CPU and deliveries of the phases with CPU figures, whole process and shard threads.
    let (mut cpu, mut shard_cpu, mut cpu_delivered) = (0u64, 0u64, 0u64);
    for d in done {
        if d.result.measured && d.result.target == "raw" {
            raw_lat.merge(&d.latency);
        }
        if !in_summary(d) {
            continue;
        }
        lat.merge(&d.latency);
        sw.merge(&d.switch);
        gr.merge(&d.grant);
        s.expected_deliveries += d.result.expected_deliveries;
        s.delivered += d.result.delivered;
        s.duplicates += d.result.recv.duplicates;
        s.seq_duplicates += d.result.seq.duplicates;
        s.send_errors += d.result.send_errors;
        s.keepalive_errors += d.result.keepalive_errors;
        s.reordered += d.result.seq.reordered;
        s.seq_gap_events += d.result.seq.gap_events;
        s.seq_lost += d.result.seq.lost;
        s.protocol_violations += d.result.recv.violations();
        secs += d.result.seconds;
        sent += d.result.sent_packets;
        if let Some(sp) = &d.result.server {
            if let (Some(c), Some(h)) = (sp.cpu_ns, sp.shard_cpu_ns) {
                cpu += c;
                shard_cpu += h;
                cpu_delivered += d.result.delivered;
            }
        }
    }
    s.latency = lat.summary();
    s.switch = sw.summary();
    s.grant = gr.summary();
    s.loss_pct = loss_pct(s.expected_deliveries, s.delivered);
    s.pps_in = sent as f64 / secs.max(1e-9);
    s.pps_out = s.delivered as f64 / secs.max(1e-9);
    s.server_cpu_per_delivered_ns = per_packet(cpu as f64, cpu_delivered);
    s.server_shard_cpu_per_delivered_ns = per_packet(shard_cpu as f64, cpu_delivered);
    let curves = Curves {
        forward: lat.percentile_curve(),
        raw: raw_lat.percentile_curve(),
        grant: gr.percentile_curve(),
        switch: sw.percentile_curve(),
    };
    (s, curves)
}
