//! The run's results as data: one serialisable [`Report`], written as JSON and rendered as an SVG and a
//! table by `output.rs` (with `svg.rs`, `table.rs`). Numbers are in µs for latency, ns for CPU per packet,
//! % for loss. Nothing here computes: the figures are made in `run/`, the relay attribution in
//! `relaycost.rs`.

use crate::controller::FloorCounts;
use crate::seq::SeqTotals;
use crate::stats::Percentiles;
use crate::tally::RecvCounters;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The report's format: 2 since CPU per packet is per delivered media packet and the ceiling ratio
/// compares packet paths (`cpu_per_fwd_ns` and `ratio_shard_thread` of format 1 are gone, not renamed:
/// they measured something else).
pub const FORMAT: u32 = 2;

/// The phase of a multi-node run with speakers on node 0 only (the relay's send and receive sides apart).
pub const SPLIT_PHASE: &str = "from-node0";

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
    pub relay_cost: Option<RelayCost>,
    /// The same from the shard threads' CPU alone.
    pub relay_cost_shards: Option<RelayCost>,
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
    /// Commands per second the nodes sent the run's Redis over 10 s after the run, everyone joined and
    /// silent (`--nodes > 1`): what an idle cluster costs the store.
    #[serde(default)]
    pub redis_idle_commands_per_s: Option<f64>,
    /// … over the whole run after set-up (talking, and the tail of the joins' store work, included).
    #[serde(default)]
    pub redis_run_commands_per_s: Option<f64>,
}

/// The server over one phase. CPU per packet is per **delivered media packet** — what the harness's
/// listeners received, first copies only (see `run/cost.rs`) — for talkgroup and the raw forwarder alike.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerPhase {
    /// From `/metrics` (None when the server does not export it): packets in, and
    /// `talkgroup_packets_forwarded_total` — every datagram it sent (RTCP, and STUN and DTLS on WebRTC
    /// legs, as well as media): context, not the yardstick.
    pub packets_in: Option<f64>,
    pub metrics_forwarded: Option<f64>,
    pub dropped: BTreeMap<String, f64>,
    /// Σ per-thread schedstat run time over the phase, ns (the `/metrics` scrapes left out).
    pub cpu_ns: Option<u64>,
    /// … of the shard threads (`shard-N`): the packet path.
    pub shard_cpu_ns: Option<u64>,
    /// … of every other thread: the control plane (signalling, floor, HTTP, store).
    pub control_cpu_ns: Option<u64>,
    /// Whole-process utime+stime over the phase (tick resolution), ns.
    pub cpu_ns_stat: Option<u64>,
    /// `cpu_ns` ÷ delivered media packets.
    pub cpu_per_delivered_ns: Option<f64>,
    /// The same less the idle CPU (`setup.server_idle_cpu_pct`) over the phase: the per-packet cost proper.
    pub cpu_per_delivered_marginal_ns: Option<f64>,
    /// `shard_cpu_ns` ÷ delivered media packets: the packet path alone, what the ceiling ratio compares.
    pub shard_cpu_per_delivered_ns: Option<f64>,
    pub busiest_thread: Option<String>,
    pub busiest_thread_cpu_ns: Option<u64>,
    /// The busiest threads (at most 16), busiest first.
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

/// The raw forwarder over a phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RawPhase {
    pub received: u64,
    /// Its own `sendmmsg` count (context: the yardstick is what was delivered).
    pub forwarded: u64,
    pub dropped: u64,
    pub cpu_ns: Option<u64>,
    /// `cpu_ns` ÷ delivered media packets, as for talkgroup.
    pub cpu_per_delivered_ns: Option<f64>,
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
    /// Media packets the harness failed to send (their listeners are in `expected_deliveries`).
    pub send_errors: u64,
    /// Keep-alives the harness failed to send.
    pub keepalive_errors: u64,
    /// Σ listeners of every media packet the harness tried to send.
    pub expected_deliveries: u64,
    /// First copies received by the right listeners (`recv.delivered`).
    pub delivered: u64,
    /// (expected − delivered) ÷ expected: negative would mean more deliveries than sends, a books error
    /// (repeats are `recv.duplicates`, never deliveries).
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
    /// Repeats of a packet a listener already had (by speaker and stamp).
    pub duplicates: u64,
    /// RTP sequence accounting of the listeners' streams (the server's numbering).
    pub seq_duplicates: u64,
    pub reordered: u64,
    pub seq_gap_events: u64,
    pub seq_lost: u64,
    pub protocol_violations: u64,
    pub send_errors: u64,
    pub keepalive_errors: u64,
    pub pps_in: f64,
    pub pps_out: f64,
    /// Server CPU (whole process) per delivered media packet.
    pub server_cpu_per_delivered_ns: Option<f64>,
    /// Its shard threads' CPU per delivered media packet.
    pub server_shard_cpu_per_delivered_ns: Option<f64>,
}

/// One A/B round of a ceiling run: CPU per delivered media packet on both sides.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CeilingRound {
    /// Talkgroup's shard threads (the packet path).
    pub talkgroup_shard_ns: Option<f64>,
    /// Talkgroup's whole process (control plane included).
    pub talkgroup_process_ns: Option<f64>,
    pub raw_ns: Option<f64>,
    /// raw ÷ talkgroup shard threads.
    pub ratio: Option<f64>,
}

/// The ceiling comparison (see `run/cost.rs` for the yardstick).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ceiling {
    /// Where the raw forwarder ran (the server's shard core).
    pub cpu: Option<usize>,
    pub rounds: Vec<CeilingRound>,
    pub median_raw_ns: Option<f64>,
    pub median_talkgroup_shard_ns: Option<f64>,
    pub median_talkgroup_process_ns: Option<f64>,
    /// raw ÷ talkgroup, packet path against packet path (medians): 1.0 = as cheap as the kernel allows.
    /// Neither side's figure holds signalling; this is the ratio the goal applies to.
    pub ratio: Option<f64>,
    /// raw ÷ talkgroup's whole process: its control plane (signalling, floor, HTTP) has no counterpart
    /// in the raw phases, so this is the lower bound.
    pub ratio_process: Option<f64>,
    pub goal: f64,
    pub meets_goal: Option<bool>,
    /// What was divided by what, in words.
    pub yardstick: String,
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
    pub server_cpu_per_delivered_ns: Option<f64>,
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

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
/// CPU per relayed packet against a local forward (`--nodes N`), as attributed by `relaycost.rs`.
pub struct RelayCost {
    /// Reference: busy CPU per locally forwarded packet (ns) — "a local forward".
    pub local_ns_per_fwd: f64,
    /// Reference: busy CPU per datagram handled, in or out (ns).
    pub local_ns_per_datagram: f64,
    /// Reference: listeners per speaker packet.
    pub local_fanout: f64,
    /// All nodes talking: busy CPU per packet delivered to a listener, summed over nodes (ns).
    pub all_ns_per_fwd: Option<f64>,
    /// All nodes talking: relay datagrams per second (sent, over all nodes).
    pub all_relay_pps: Option<f64>,
    /// All nodes talking: CPU beyond the local model per relay datagram, send and receive together (ns).
    pub all_extra_ns_per_relay: Option<f64>,
    /// Split: CPU per relay datagram sent, at the speaker's node, beyond its local work (ns).
    pub send_ns_per_relay: Option<f64>,
    /// Split: busy CPU at a receiving node per relay datagram received, fan-out included (ns).
    pub recv_ns_per_relay: Option<f64>,
    /// Split: listeners per relay datagram at the receiving nodes.
    pub recv_fanout: Option<f64>,
    /// Split: the same less the fan-out at the local per-datagram cost (ns): compare with
    /// `local_ns_per_datagram`, a local speaker's packet received.
    pub recv_extra_ns_per_relay: Option<f64>,
    /// Split: what a local speaker packet with the same fan-out costs by the reference (ns).
    pub recv_local_equiv_ns: Option<f64>,
    pub method: String,
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
                cpu_per_delivered_ns: Some(3600.0),
                shard_cpu_per_delivered_ns: Some(3100.0),
                ..Default::default()
            }),
            raw: (target == "raw").then(|| RawPhase {
                cpu_per_delivered_ns: Some(2900.0),
                ..Default::default()
            }),
            ..Default::default()
        };
        Report {
            tool: "talkgroup-loadtest".into(),
            format: FORMAT,
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
                median_talkgroup_shard_ns: Some(3100.0),
                median_talkgroup_process_ns: Some(3600.0),
                ratio: Some(2900.0 / 3100.0),
                ratio_process: Some(2900.0 / 3600.0),
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
                        server_cpu_per_delivered_ns: None,
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
}
