//! The run's results: one serialisable [`Report`] written as JSON, rendered as SVG (`svg.rs`) and
//! printed as a table. Numbers are in µs for latency, ns for CPU per packet, % for loss.

use crate::controller::FloorCounts;
use crate::receiver::RecvCounters;
use crate::seq::SeqTotals;
use crate::stats::Percentiles;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub format: u32,
    pub scenario: String,
    pub description: String,
    pub started_unix_s: u64,
    pub config: serde_json::Value,
    pub server: ServerInfo,
    pub harness: HarnessInfo,
    pub setup: SetupInfo,
    pub phases: Vec<PhaseResult>,
    /// Over the measured talkgroup phases.
    pub summary: Summary,
    pub ceiling: Option<Ceiling>,
    pub knee: Option<Knee>,
    /// `--nodes N`: CPU per relayed packet against a local forward (see `relaycost.rs`).
    pub relay_cost: Option<crate::relaycost::RelayCost>,
    /// The same from the shard threads' CPU alone.
    pub relay_cost_shards: Option<crate::relaycost::RelayCost>,
    pub series: Vec<SeriesPoint>,
    pub curves: Curves,
    pub warnings: Vec<String>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerInfo {
    pub http: String,
    pub pid: Option<i32>,
    pub spawned: bool,
    pub bin: Option<String>,
    pub log: Option<String>,
    pub media_port: Option<u16>,
    /// CPUs of the server threads that did the work in the warm-up (single-CPU affinity).
    pub pinned_cpus: Vec<usize>,
    pub crashed: Option<String>,
    /// `--nodes N`: every node's HTTP address and PID (the fields above are node 0's).
    pub nodes: Vec<(String, Option<i32>)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HarnessInfo {
    pub pinned_cpus: Vec<usize>,
    /// One-way loopback latency with the harness's own send/receive path: nothing below it is measurable.
    pub loopback_floor: Percentiles,
    pub sockets: usize,
    /// Members multiplexed over wildcard-bound sockets (IP_PKTINFO) for want of descriptors.
    pub shared_sockets: bool,
    pub loopback_addresses: usize,
    pub ws_connections: usize,
    pub recv_threads: usize,
    pub nofile_limit: u64,
    /// Members on WebRTC (str0m clients in the harness's WebRTC engine thread).
    #[serde(default)]
    pub webrtc_members: usize,
    /// Datagrams the WebRTC clients could not use (neither STUN, DTLS nor SRTP of a live peer).
    #[serde(default)]
    pub webrtc_rejected: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetupInfo {
    pub join_s: f64,
    pub joins_per_s: f64,
    pub rss_before_bytes: Option<u64>,
    pub rss_after_join_bytes: Option<u64>,
    pub rss_per_member_bytes: Option<f64>,
    pub rss_end_bytes: Option<u64>,
    /// Server CPU with every member joined and latched but nobody talking (timers, keep-alives, sender
    /// reports), % of one core: the fixed cost that dominates CPU per packet at low load.
    pub server_idle_cpu_pct: Option<f64>,
    /// WebSocket frames received after joining, by type (`floor/<state>` for floor events).
    pub ws_frames_in: BTreeMap<String, u64>,
    /// From the first join to the last WebRTC member connected (ICE + DTLS), s.
    #[serde(default)]
    pub webrtc_connect_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerPhase {
    /// From `/metrics` (None when the server does not export it).
    pub packets_in: Option<f64>,
    pub forwarded: Option<f64>,
    pub dropped: BTreeMap<String, f64>,
    /// Σ per-thread schedstat run time over the phase, ns.
    pub cpu_ns: Option<u64>,
    /// Whole-process utime+stime over the phase (tick resolution), ns.
    pub cpu_ns_stat: Option<u64>,
    /// `cpu_ns` ÷ forwarded packets (server count, else what listeners received).
    pub cpu_per_fwd_ns: Option<f64>,
    /// The same less the idle CPU (`setup.server_idle_cpu_pct`) over the phase: the per-packet cost proper.
    pub cpu_per_fwd_marginal_ns: Option<f64>,
    pub busiest_thread: Option<String>,
    pub busiest_thread_cpu_ns: Option<u64>,
    /// The busiest thread's (the shard's) CPU ÷ forwarded packets: the packet path without signaling.
    pub shard_cpu_per_fwd_ns: Option<f64>,
    pub threads: Vec<ThreadDelta>,
    pub rss_bytes: Option<u64>,
    pub metrics_pps_in: Option<f64>,
    pub metrics_pps_out: Option<f64>,
}

/// One node over one phase: schedstat CPU, its idle CPU over the same time, and its `/metrics` deltas.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodePhase {
    pub node: u32,
    pub pid: Option<i32>,
    pub cpu_ns: f64,
    /// The node's CPU with everyone joined and silent, scaled to the phase's length.
    pub idle_ns: f64,
    /// The same for the node's shard threads alone (the packet path, without signaling and Redis).
    pub shard_cpu_ns: f64,
    pub shard_idle_ns: f64,
    pub packets_in: f64,
    pub forwarded: f64,
    pub relay_sent: f64,
    pub relay_in: f64,
    pub relay_dropped: f64,
    pub relay_dropped_by_reason: BTreeMap<String, f64>,
}

impl NodePhase {
    /// CPU the traffic cost: run time less idle.
    pub fn busy_ns(&self) -> f64 {
        (self.cpu_ns - self.idle_ns).max(0.0)
    }

    /// This node with its shard threads' CPU as its CPU.
    pub fn shards_only(&self) -> NodePhase {
        NodePhase {
            cpu_ns: self.shard_cpu_ns,
            idle_ns: self.shard_idle_ns,
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ThreadDelta {
    pub tid: i32,
    pub name: String,
    pub cpu_ns: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RawPhase {
    pub received: u64,
    pub forwarded: u64,
    pub dropped: u64,
    pub cpu_ns: Option<u64>,
    pub cpu_per_fwd_ns: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseResult {
    pub name: String,
    /// `warmup`, `measure`, `ceiling` or `knee-step`.
    pub kind: String,
    /// `talkgroup` or `raw`.
    pub target: String,
    pub measured: bool,
    pub active_channels: u32,
    pub seconds: f64,
    pub latency: Percentiles,
    pub switch: Percentiles,
    pub grant: Percentiles,
    pub release_to_idle: Percentiles,
    pub send_lag: Percentiles,
    pub sent_packets: u64,
    pub send_errors: u64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub loss_pct: f64,
    pub recv: RecvCounters,
    pub seq: SeqTotals,
    pub floor: FloorCounts,
    pub pps_in: f64,
    pub pps_out: f64,
    pub server: Option<ServerPhase>,
    /// Per node (`--nodes N`; one entry for a single server): CPU and counters over the phase.
    pub nodes: Vec<NodePhase>,
    pub raw: Option<RawPhase>,
    /// Harness process CPU (% of one core), the sender's pre-deadline spin excluded.
    pub harness_cpu_pct: Option<f64>,
    /// % of one core the sender spent spinning (yielding) just before deadlines.
    pub sender_spin_pct: f64,
    pub cpu_busy_pct: BTreeMap<usize, f64>,
    pub udp: BTreeMap<String, i64>,
    pub harness_overloaded: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub latency: Percentiles,
    pub switch: Percentiles,
    pub grant: Percentiles,
    pub loss_pct: f64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub seq_gap_events: u64,
    pub seq_lost: u64,
    pub protocol_violations: u64,
    pub pps_in: f64,
    pub pps_out: f64,
    pub server_cpu_per_fwd_ns: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CeilingRound {
    pub talkgroup_cpu_per_fwd_ns: Option<f64>,
    pub raw_cpu_per_fwd_ns: Option<f64>,
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ceiling {
    pub cpu: Option<usize>,
    pub rounds: Vec<CeilingRound>,
    pub median_talkgroup_ns: Option<f64>,
    pub median_raw_ns: Option<f64>,
    /// raw CPU/pkt ÷ talkgroup CPU/pkt (medians): 1.0 = as cheap as the kernel allows.
    pub ratio: Option<f64>,
    /// The same against the shard thread alone (signaling, timers and the rest of the process left out).
    pub median_talkgroup_shard_ns: Option<f64>,
    pub ratio_shard_thread: Option<f64>,
    pub goal: f64,
    pub meets_goal: Option<bool>,
    pub raw_latency: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KneeStep {
    pub active_channels: u32,
    pub pps_in: f64,
    pub pps_out: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub loss_pct: f64,
    pub server_cpu_per_fwd_ns: Option<f64>,
    pub pass: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Knee {
    pub loss_limit_pct: f64,
    pub p99_limit_us: f64,
    pub steps: Vec<KneeStep>,
    /// The highest step that passed.
    pub knee: Option<KneeStep>,
    pub found: bool,
    pub note: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SeriesPoint {
    pub t_s: f64,
    pub phase: String,
    pub target: String,
    pub pps_in: f64,
    pub pps_out: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// Percentile-distribution curves: (quantile, µs).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Curves {
    pub forward: Vec<(f64, f64)>,
    pub raw: Vec<(f64, f64)>,
    pub grant: Vec<(f64, f64)>,
    pub switch: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Verdict {
    pub pass: bool,
    pub exit_code: i32,
    pub reasons: Vec<String>,
}

impl Report {
    /// Write `<dir>/<scenario>.json` and `.svg`; returns their paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let json = dir.join(format!("{}.json", self.scenario));
        let svg = dir.join(format!("{}.svg", self.scenario));
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(&json, text).map_err(|e| format!("{}: {e}", json.display()))?;
        std::fs::write(&svg, crate::svg::render(self))
            .map_err(|e| format!("{}: {e}", svg.display()))?;
        Ok((json, svg))
    }

    /// The end-of-run table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\n== talkgroup loadtest: {} — {} ==",
            self.scenario,
            if self.description.is_empty() {
                "ad hoc"
            } else {
                &self.description
            }
        );
        let _ = writeln!(
            s,
            "{:<12} {:>6} {:>5} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>5} {:>5} {:>8} {:>8} {:>8}",
            "phase", "target", "chan", "in/s", "out/s", "p50µs", "p90µs", "p99µs", "p99.9µs", "maxµs", "loss%",
            "dup", "reord", "gaps", "grant99", "switch99", "cpu/pkt"
        );
        for p in &self.phases {
            let cpu = p
                .server
                .as_ref()
                .and_then(|x| x.cpu_per_fwd_ns)
                .or(p.raw.as_ref().and_then(|x| x.cpu_per_fwd_ns));
            let _ = writeln!(
                s,
                "{:<12} {:>6} {:>5} {:>8.0} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.3} {:>5} {:>5} {:>5} {:>8} {:>8} {:>8}",
                truncate(&p.name, 12),
                if p.target == "talkgroup" { "tg" } else { "raw" },
                p.active_channels,
                p.pps_in,
                p.pps_out,
                p.latency.p50_us,
                p.latency.p90_us,
                p.latency.p99_us,
                p.latency.p999_us,
                p.latency.max_us,
                p.loss_pct,
                p.seq.duplicates,
                p.seq.reordered,
                p.seq.gap_events,
                opt_us(p.grant.count, p.grant.p99_us),
                opt_us(p.switch.count, p.switch.p99_us),
                cpu.map(|c| format!("{c:.0}ns")).unwrap_or_else(|| "-".into()),
            );
        }
        let m = &self.summary;
        let _ = writeln!(
            s,
            "forwarding latency (measured talkgroup phases): p50 {:.1} µs  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  ({} samples; harness loopback floor p50 {:.1} µs, p99 {:.1})",
            m.latency.p50_us,
            m.latency.p90_us,
            m.latency.p99_us,
            m.latency.p999_us,
            m.latency.max_us,
            m.latency.count,
            self.harness.loopback_floor.p50_us,
            self.harness.loopback_floor.p99_us
        );
        let _ = writeln!(
            s,
            "loss {:.4} % ({} of {} deliveries missing)  duplicates {}  reordered {}  seq gaps {} ({} numbers)  protocol violations {}",
            m.loss_pct,
            m.expected_deliveries.saturating_sub(m.delivered),
            m.expected_deliveries,
            m.duplicates,
            m.reordered,
            m.seq_gap_events,
            m.seq_lost,
            m.protocol_violations
        );
        let _ = writeln!(
            s,
            "press→granted p50 {:.0} µs p99 {:.0} µs ({} grants)   speaker switch p50 {:.0} µs p99 {:.0} µs ({} timed)",
            m.grant.p50_us, m.grant.p99_us, m.grant.count, m.switch.p50_us, m.switch.p99_us, m.switch.count
        );
        let _ = writeln!(
            s,
            "packets/s in {:.0}, out {:.0}; server CPU per forwarded packet {} (idle server: {} of a core); RSS per member {}",
            m.pps_in,
            m.pps_out,
            m.server_cpu_per_fwd_ns.map(|c| format!("{c:.0} ns")).unwrap_or_else(|| "n/a".into()),
            self.setup
                .server_idle_cpu_pct
                .map(|c| format!("{c:.1} %"))
                .unwrap_or_else(|| "n/a".into()),
            self.setup
                .rss_per_member_bytes
                .map(|b| format!("{:.0} B", b))
                .unwrap_or_else(|| "n/a".into())
        );
        if let Some(c) = &self.ceiling {
            let _ = writeln!(
                s,
                "ceiling: raw {} ns/pkt vs talkgroup {} ns/pkt (medians of {} A/B rounds) → ratio {} (shard thread alone: {} ns/pkt, ratio {}; goal ≥ {:.2}{})",
                fmt_opt(c.median_raw_ns, 0),
                fmt_opt(c.median_talkgroup_ns, 0),
                c.rounds.len(),
                fmt_opt(c.ratio, 3),
                fmt_opt(c.median_talkgroup_shard_ns, 0),
                fmt_opt(c.ratio_shard_thread, 3),
                c.goal,
                match c.meets_goal {
                    Some(true) => ", met",
                    Some(false) => ", NOT met",
                    None => "",
                }
            );
        }
        if let Some(k) = &self.knee {
            match &k.knee {
                Some(st) => {
                    let _ = writeln!(
                        s,
                        "knee: {} channels, {:.0} pkt/s in, {:.0} out (p99 {:.0} µs, loss {:.3} %) — {}",
                        st.active_channels, st.pps_in, st.pps_out, st.p99_us, st.loss_pct, k.note
                    );
                }
                None => {
                    let _ = writeln!(s, "knee: {}", k.note);
                }
            }
        }
        if self.phases.iter().any(|p| p.nodes.len() > 1) {
            let _ = writeln!(
                s,
                "per node: {:<12} {:>4} {:>9} {:>8} {:>9} {:>10} {:>9} {:>8}",
                "phase", "node", "cpu ms", "idle ms", "in", "forwarded", "relay out", "relay in"
            );
            for p in self
                .phases
                .iter()
                .filter(|p| p.nodes.len() > 1 && p.measured)
            {
                for n in &p.nodes {
                    let _ = writeln!(
                        s,
                        "          {:<12} {:>4} {:>9.0} {:>8.0} {:>9.0} {:>10.0} {:>9.0} {:>8.0}{}",
                        truncate(&p.name, 12),
                        n.node,
                        n.cpu_ns / 1e6,
                        n.idle_ns / 1e6,
                        n.packets_in,
                        n.forwarded,
                        n.relay_sent,
                        n.relay_in,
                        if n.relay_dropped > 0.0 {
                            format!(
                                "  relay dropped {:.0} {:?}",
                                n.relay_dropped, n.relay_dropped_by_reason
                            )
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
        for (what, r) in [
            ("process", &self.relay_cost),
            ("shard threads", &self.relay_cost_shards),
        ] {
            let Some(r) = r else { continue };
            let _ = writeln!(s, "relay cost, {what} CPU:");
            let _ = writeln!(
                s,
                "relay cost: local forward (1-node reference) {:.0} ns per forwarded packet, {:.0} ns per datagram in or out (fan-out {:.1})",
                r.local_ns_per_fwd, r.local_ns_per_datagram, r.local_fanout
            );
            let _ = writeln!(
                s,
                "relay cost: per relay datagram sent at the speaker's node +{} ns; received + fanned out at a receiving node {} ns \
                 (fan-out {}; a local packet with that fan-out: {} ns; beyond its fan-out: +{} ns)",
                fmt_opt(r.send_ns_per_relay, 0),
                fmt_opt(r.recv_ns_per_relay, 0),
                fmt_opt(r.recv_fanout, 1),
                fmt_opt(r.recv_local_equiv_ns, 0),
                fmt_opt(r.recv_extra_ns_per_relay, 0),
            );
            let _ = writeln!(
                s,
                "relay cost: all nodes talking: {} ns per delivered packet (vs {:.0} on one node), {} relay datagrams/s, +{} ns per relay datagram (send + receive)",
                fmt_opt(r.all_ns_per_fwd, 0),
                r.local_ns_per_fwd,
                fmt_opt(r.all_relay_pps, 0),
                fmt_opt(r.all_extra_ns_per_relay, 0),
            );
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        let _ = writeln!(
            s,
            "verdict: {}{}",
            if self.verdict.pass { "PASS" } else { "FAIL" },
            if self.verdict.reasons.is_empty() {
                String::new()
            } else {
                format!(" — {}", self.verdict.reasons.join("; "))
            }
        );
        s
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn opt_us(count: u64, v: f64) -> String {
    if count == 0 {
        "-".into()
    } else {
        format!("{v:.0}")
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "n/a".into())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::stats::LatencyHist;

    pub fn sample_report() -> Report {
        let mut h = LatencyHist::new();
        for i in 1..=5000u64 {
            h.record(20_000 + i * 30);
        }
        let lat = h.summary();
        let phase = |name: &str, target: &str| PhaseResult {
            name: name.into(),
            kind: "ceiling".into(),
            target: target.into(),
            measured: true,
            active_channels: 20,
            seconds: 10.0,
            latency: lat,
            sent_packets: 5000,
            expected_deliveries: 15_000,
            delivered: 14_990,
            loss_pct: 0.0667,
            pps_in: 500.0,
            pps_out: 1499.0,
            server: (target == "talkgroup").then(|| ServerPhase {
                cpu_per_fwd_ns: Some(3100.0),
                ..Default::default()
            }),
            raw: (target == "raw").then(|| RawPhase {
                cpu_per_fwd_ns: Some(2900.0),
                ..Default::default()
            }),
            ..Default::default()
        };
        Report {
            tool: "talkgroup-loadtest".into(),
            format: 1,
            scenario: "unit".into(),
            description: "unit test".into(),
            phases: vec![phase("A1", "talkgroup"), phase("B1", "raw")],
            summary: Summary {
                latency: lat,
                loss_pct: 0.0667,
                expected_deliveries: 15_000,
                delivered: 14_990,
                ..Default::default()
            },
            ceiling: Some(Ceiling {
                median_raw_ns: Some(2900.0),
                median_talkgroup_ns: Some(3100.0),
                ratio: Some(2900.0 / 3100.0),
                goal: 0.9,
                meets_goal: Some(true),
                rounds: vec![CeilingRound::default()],
                ..Default::default()
            }),
            knee: Some(Knee {
                loss_limit_pct: 0.1,
                p99_limit_us: 5000.0,
                knee: Some(KneeStep {
                    active_channels: 30,
                    pps_in: 1500.0,
                    pps_out: 4500.0,
                    p50_us: 90.0,
                    p99_us: 900.0,
                    pass: true,
                    ..Default::default()
                }),
                steps: (1..=4)
                    .map(|i| KneeStep {
                        active_channels: i * 10,
                        pps_in: i as f64 * 500.0,
                        pps_out: i as f64 * 1500.0,
                        p50_us: 30.0 * i as f64,
                        p99_us: 100.0 * (i * i) as f64,
                        loss_pct: 0.0,
                        server_cpu_per_fwd_ns: None,
                        pass: i < 4,
                    })
                    .collect(),
                found: true,
                note: "unit".into(),
            }),
            series: (0..10)
                .map(|i| SeriesPoint {
                    t_s: i as f64,
                    phase: "A1".into(),
                    target: "talkgroup".into(),
                    pps_in: 500.0,
                    pps_out: 1400.0 + i as f64 * 10.0,
                    p50_us: 40.0,
                    p99_us: 90.0 + i as f64,
                    max_us: 200.0,
                })
                .collect(),
            curves: Curves {
                forward: h.percentile_curve(),
                raw: h.percentile_curve(),
                grant: vec![(0.0, 300.0), (0.9, 500.0), (0.99, 900.0)],
                switch: vec![],
            },
            verdict: Verdict {
                pass: true,
                exit_code: 0,
                reasons: vec![],
            },
            ..Default::default()
        }
    }

    #[test]
    fn json_roundtrip_and_files() {
        let r = sample_report();
        let dir = std::env::temp_dir().join(format!("loadtest-report-{}", std::process::id()));
        let (json, svg) = r.write(&dir).expect("write");
        let back: Report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(back.phases.len(), 2);
        assert_eq!(back.summary.delivered, 14_990);
        let ratio = |r: &Report| r.ceiling.as_ref().and_then(|c| c.ratio).unwrap_or(0.0);
        assert!((ratio(&back) - ratio(&r)).abs() < 1e-12);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert!(v["summary"]["latency"]["p99_us"].as_f64().unwrap() > 0.0);
        assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn table_mentions_the_key_figures() {
        let t = sample_report().table();
        assert!(t.contains("A1") && t.contains("B1"));
        assert!(t.contains("ratio 0.935"), "{t}");
        assert!(t.contains("knee: 30 channels"), "{t}");
        assert!(t.contains("verdict: PASS"));
    }
}
