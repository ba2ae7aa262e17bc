//! A phase's figures, from the snapshots that open and close it and what the receivers reported:
//! latency, loss, floor timings, the server's CPU per packet (per node too), the harness's own load, and
//! the warnings that tell a reader when the figures are the harness's or the machine's rather than the
//! server's.

use super::cost::{attribute, per_packet};
use super::phase::Measured;
use super::placement::Placement;
use super::plan::Plan;
use super::servers::{idle_total, IdleCpu};
use super::snapshot::Snapshot;
use crate::metrics;
use crate::procfs;
use crate::report::{NodePhase, PhaseResult, RawPhase, ServerPhase, ThreadDelta};
use crate::stats::{loss_pct, LatencyHist};
use std::collections::BTreeMap;

/// A phase's result kept with its histograms, for the summary.
pub struct Done {
    pub result: PhaseResult,
    pub latency: LatencyHist,
    pub switch: LatencyHist,
    pub grant: LatencyHist,
}

/// The figures of plan entry `p` from what it collected; warnings about the phase go to `warnings`.
pub fn phase_result(
    p: &Plan,
    m: &Measured,
    placement: &Placement,
    idle: &IdleCpu,
    pids: &[Option<i32>],
    warnings: &mut Vec<String>,
) -> PhaseResult {
    let (s0, s1, acc, floor, lag) = (&m.s0, &m.s1, &m.acc, &m.floor, &m.lag);
    let (harness_cpus, shard_cpus) = (&placement.harness_cpus, &placement.shard_cpus);
    let idle_cpu_per_s = idle_total(idle);
    let node_idle = idle;
    let secs = (s1.t_ns - s0.t_ns) as f64 / 1e9;
    let expected = s1.expected - s0.expected;
    let sent = s1.media - s0.media;
    let delivered = acc.counters.delivered;
    let mut r = PhaseResult {
        name: p.name.clone(),
        kind: p.kind.into(),
        target: if p.server { "talkgroup" } else { "raw" }.into(),
        measured: p.measured,
        active_channels: p.active,
        seconds: secs,
        latency: acc.latency.summary(),
        switch: acc.switch.summary(),
        grant: floor.grant.summary(),
        release_to_idle: floor.release_to_idle.summary(),
        send_lag: lag.summary(),
        sent_packets: sent,
        send_errors: s1.send_errors - s0.send_errors,
        keepalive_errors: s1.keepalive_errors - s0.keepalive_errors,
        expected_deliveries: expected,
        delivered,
        loss_pct: loss_pct(expected, delivered),
        recv: acc.counters,
        seq: acc.seq,
        floor: floor.counts(),
        pps_in: sent as f64 / secs.max(1e-9),
        pps_out: delivered as f64 / secs.max(1e-9),
        ..Default::default()
    };
    if p.server {
        let mut sp = ServerPhase::default();
        if let (Some(m0), Some(m1)) = (&s0.metrics, &s1.metrics) {
            let d =
                |name: &str| -> Option<f64> { Some(m1.sum(name)? - m0.sum(name).unwrap_or(0.0)) };
            sp.packets_in = d(metrics::PACKETS_IN);
            sp.metrics_forwarded = d(metrics::PACKETS_FORWARDED);
            let before: BTreeMap<String, f64> =
                m0.series(metrics::PACKETS_DROPPED).into_iter().collect();
            for (labels, v) in m1.series(metrics::PACKETS_DROPPED) {
                let dv = v - before.get(&labels).copied().unwrap_or(0.0);
                if dv != 0.0 {
                    sp.dropped.insert(labels, dv);
                }
            }
            sp.metrics_pps_in = sp.packets_in.map(|x| x / secs.max(1e-9));
            sp.metrics_pps_out = sp.metrics_forwarded.map(|x| x / secs.max(1e-9));
        }
        if !s1.threads.is_empty() {
            let mut threads: Vec<ThreadDelta> = s1
                .threads
                .iter()
                .map(|(tid, t)| ThreadDelta {
                    tid: *tid,
                    name: t.name.clone(),
                    cpu_ns: t
                        .run_ns
                        .saturating_sub(s0.threads.get(tid).map(|x| x.run_ns).unwrap_or(0)),
                })
                .collect();
            threads.sort_by_key(|t| std::cmp::Reverse(t.cpu_ns));
            let a = attribute(&threads, delivered, idle_cpu_per_s.map(|i| i * secs));
            sp.cpu_ns = Some(a.cpu_ns);
            sp.shard_cpu_ns = Some(a.shard_cpu_ns);
            sp.control_cpu_ns = Some(a.control_cpu_ns);
            sp.cpu_per_delivered_ns = a.per_delivered_ns;
            sp.shard_cpu_per_delivered_ns = a.shard_per_delivered_ns;
            sp.cpu_per_delivered_marginal_ns = a.marginal_per_delivered_ns;
            if let Some(t) = threads.first() {
                sp.busiest_thread = Some(format!("{} ({})", t.name, t.tid));
                sp.busiest_thread_cpu_ns = Some(t.cpu_ns);
            }
            threads.truncate(16);
            sp.threads = threads;
        }
        if let (Some(a), Some(b)) = (s0.proc_cpu, s1.proc_cpu) {
            sp.cpu_ns_stat = Some(b.saturating_sub(a));
        }
        sp.rss_bytes = None;
        r.server = Some(sp);
        r.nodes = node_phases(s0, s1, secs, node_idle, pids);
    } else if let (Some(a), Some(b)) = (s0.raw, s1.raw) {
        let fwd = b.1 - a.1;
        let cpu = match (a.3, b.3) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x)),
            _ => None,
        };
        r.raw = Some(RawPhase {
            received: b.0 - a.0,
            forwarded: fwd,
            dropped: b.2 - a.2,
            cpu_ns: cpu,
            cpu_per_delivered_ns: cpu.and_then(|c| per_packet(c as f64, delivered)),
        });
    }
    // The sender's pre-deadline spin yields to anything runnable: it is idle time, not load.
    let spin_pct = (s1.spin_ns - s0.spin_ns) as f64 / 1e9 / secs.max(1e-9) * 100.0;
    r.sender_spin_pct = spin_pct;
    if let (Some(a), Some(b)) = (s0.own_cpu, s1.own_cpu) {
        let total = b.saturating_sub(a) as f64 / 1e9 / secs.max(1e-9) * 100.0;
        r.harness_cpu_pct = Some((total - spin_pct).max(0.0));
    }
    r.cpu_busy_pct = procfs::cpu_busy(&s0.cpus, &s1.cpus)
        .into_iter()
        .map(|(c, f)| (c, (f * 1000.0).round() / 10.0))
        .collect();
    for (k, v) in &s1.udp {
        let d = *v as i64 - s0.udp.get(k).copied().unwrap_or(0) as i64;
        if d != 0 {
            r.udp.insert(k.clone(), d);
        }
    }
    let overloaded = if harness_cpus.is_empty() {
        let allowed = crate::sys::affinity_of(0)
            .map(|v| v.len())
            .unwrap_or(1)
            .max(1) as f64;
        r.harness_cpu_pct.is_some_and(|c| c / allowed > 80.0)
    } else {
        let spin_per_cpu = spin_pct / harness_cpus.len() as f64;
        harness_cpus.iter().any(|c| {
            r.cpu_busy_pct
                .get(c)
                .is_some_and(|b| *b - spin_per_cpu > 80.0)
        })
    };
    r.harness_overloaded = overloaded;
    if overloaded && p.measured {
        warnings.push(format!(
            "{}: the harness's core was > 80 % busy: latency and loss may be the harness's, not the server's",
            p.name
        ));
    }
    if p.measured && p.server {
        for c in shard_cpus {
            if let Some(b) = r.cpu_busy_pct.get(c).filter(|b| **b > 95.0) {
                let shard_pct = r
                    .server
                    .as_ref()
                    .and_then(|s| s.busiest_thread_cpu_ns)
                    .map(|ns| ns as f64 / 1e7 / secs.max(1e-9))
                    .unwrap_or(0.0);
                warnings.push(format!(
                    "{}: CPU {c}, the server's shard core, was {b:.0} % busy (its busiest thread {shard_pct:.0} %): \
                     at capacity{}",
                    p.name,
                    if *b - shard_pct > 30.0 {
                        ", much of it other work (softirq, other processes)"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    if p.measured && r.send_lag.p99_us > 1000.0 {
        warnings.push(format!(
            "{}: the sender ran late (p99 {:.0} µs behind schedule); that delay is in the latency figures",
            p.name, r.send_lag.p99_us
        ));
    }
    if let Some(&e) = r.udp.get("RcvbufErrors") {
        if e > 0 && p.measured {
            warnings.push(format!(
                "{}: the kernel dropped {e} datagrams for full receive buffers (RcvbufErrors)",
                p.name
            ));
        }
    }
    r
}

/// Per-node CPU and counters over a phase.
fn node_phases(
    s0: &Snapshot,
    s1: &Snapshot,
    secs: f64,
    idle: &[Option<(f64, f64)>],
    pids: &[Option<i32>],
) -> Vec<NodePhase> {
    s0.nodes
        .iter()
        .zip(&s1.nodes)
        .enumerate()
        .map(|(i, ((m0, c0, h0), (m1, c1, h1)))| {
            let d = |name: &str| match (m0, m1) {
                (Some(a), Some(b)) => b.sum(name).unwrap_or(0.0) - a.sum(name).unwrap_or(0.0),
                _ => 0.0,
            };
            NodePhase {
                node: i as u32,
                pid: pids.get(i).copied().flatten(),
                cpu_ns: c1.saturating_sub(*c0) as f64,
                idle_ns: idle.get(i).copied().flatten().map_or(0.0, |x| x.0) * secs,
                shard_cpu_ns: h1.saturating_sub(*h0) as f64,
                shard_idle_ns: idle.get(i).copied().flatten().map_or(0.0, |x| x.1) * secs,
                packets_in: d(metrics::PACKETS_IN),
                forwarded: d(metrics::PACKETS_FORWARDED),
                relay_sent: d(metrics::RELAY_SENT),
                relay_in: d(metrics::RELAY_IN),
                relay_dropped: d(metrics::RELAY_DROPPED),
                relay_dropped_by_reason: match (m0, m1) {
                    (Some(a), Some(b)) => {
                        metrics::delta_by_label(a, b, metrics::RELAY_DROPPED, "reason")
                    }
                    _ => BTreeMap::new(),
                },
            }
        })
        .collect()
}
