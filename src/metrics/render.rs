//! One scrape's values as Prometheus text, encoded by `prometheus-client` from a [`Snapshot`] (a
//! collector over copies: the live counters stay plain integers where they are kept).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::{
    Buckets, Snapshot, FORWARD_LATENCY_NS, JITTER_US, LOSS_PER_256, PRESS_TO_GRANT_US,
    WS_QUEUE_BYTES,
};
use crate::relay::relay_drop_names;
use crate::shard::{drop_reason_names, ShardStats};

/// The `Content-Type` of [`render`]'s text (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Renders one scrape.
pub fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

type Labels = Vec<(&'static str, String)>;

/// A sample's value: counts stay integers on the wire (`7`, not `7.0`), times are seconds.
#[derive(Debug, Clone, Copy)]
enum Num {
    U(u64),
    F(f64),
}

impl From<u64> for Num {
    fn from(v: u64) -> Self {
        Num::U(v)
    }
}

impl From<f64> for Num {
    fn from(v: f64) -> Self {
        Num::F(v)
    }
}

impl From<bool> for Num {
    fn from(v: bool) -> Self {
        Num::U(u64::from(v))
    }
}

/// Writes metric families one after the other.
struct Families<'a>(DescriptorEncoder<'a>);

impl Families<'_> {
    /// A family of samples, one per label set. Counters get `_total` appended, units `_seconds` or
    /// `_bytes` (before `_total`).
    fn family(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        samples: impl IntoIterator<Item = (Labels, Num)>,
        kind: MetricType,
    ) -> Result<(), std::fmt::Error> {
        let mut m = self.0.encode_descriptor(name, help, unit.as_ref(), kind)?;
        for (labels, v) in samples {
            let e = m.encode_family(&labels)?;
            match (kind, v) {
                (MetricType::Counter, Num::U(v)) => ConstCounter::new(v).encode(e)?,
                (MetricType::Counter, Num::F(v)) => ConstCounter::new(v).encode(e)?,
                (_, Num::U(v)) => ConstGauge::new(v).encode(e)?,
                (_, Num::F(v)) => ConstGauge::new(v).encode(e)?,
            }
        }
        Ok(())
    }

    fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, Num)>,
    ) -> Result<(), std::fmt::Error> {
        self.family(name, help, None, samples, MetricType::Counter)
    }

    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, Num)>,
    ) -> Result<(), std::fmt::Error> {
        self.family(name, help, None, samples, MetricType::Gauge)
    }

    /// A histogram without labels.
    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        unit: Unit,
        sum: f64,
        count: u64,
        buckets: &[(f64, u64)],
    ) -> Result<(), std::fmt::Error> {
        let mut m = self
            .0
            .encode_descriptor(name, help, Some(&unit), MetricType::Histogram)?;
        m.encode_histogram::<NoLabelSet>(sum, count, buckets, None)
    }
}

fn none() -> Labels {
    Vec::new()
}

fn shard(s: &ShardStats) -> Labels {
    vec![("shard", s.shard.to_string())]
}

/// Per-shard counters and gauges: name, help, counter or gauge, how to read it.
type ShardMetric = (
    &'static str,
    &'static str,
    MetricType,
    fn(&ShardStats) -> u64,
);

const COUNTER: MetricType = MetricType::Counter;
const GAUGE: MetricType = MetricType::Gauge;

const PER_SHARD: [ShardMetric; 19] = [
    (
        "talkgroup_packets_in",
        "Datagrams received on the media port",
        COUNTER,
        |s| s.packets_in,
    ),
    (
        "talkgroup_packets_forwarded",
        "Datagrams sent to listeners",
        COUNTER,
        |s| s.forwarded,
    ),
    (
        "talkgroup_media_forwarded",
        "RTP media datagrams sent to listeners, plain and WebRTC (no RTCP, STUN or DTLS)",
        COUNTER,
        |s| s.media_forwarded,
    ),
    (
        "talkgroup_listener_reports",
        "RTCP receiver reports from listeners (plain RTP; WebRTC summed by str0m every 5 s)",
        COUNTER,
        |s| s.rr_reports,
    ),
    (
        "talkgroup_rtcp_in",
        "RTCP packets received from members",
        COUNTER,
        |s| s.rtcp_in,
    ),
    (
        "talkgroup_send_errors",
        "Datagrams the kernel refused",
        COUNTER,
        |s| s.send_errors,
    ),
    (
        "talkgroup_send_would_block",
        "Datagrams that found the socket buffer full",
        COUNTER,
        |s| s.send_would_block,
    ),
    (
        "talkgroup_sender_reports",
        "RTCP sender reports sent",
        COUNTER,
        |s| s.sender_reports,
    ),
    (
        "talkgroup_stale_speaker_changes",
        "Speaker changes the epoch rules discarded",
        COUNTER,
        |s| s.stale_speaker_changes,
    ),
    (
        "talkgroup_events_lost",
        "Shard events lost to a full control queue",
        COUNTER,
        |s| s.events_lost,
    ),
    (
        "talkgroup_relay_sent",
        "Relay datagrams sent to other nodes",
        COUNTER,
        |s| s.relay_sent,
    ),
    (
        "talkgroup_relay_in",
        "Relay datagrams received from other nodes",
        COUNTER,
        |s| s.relay_in,
    ),
    (
        "talkgroup_shard_channels",
        "Channels on the shard",
        GAUGE,
        |s| s.channels,
    ),
    (
        "talkgroup_shard_members",
        "Members on the shard",
        GAUGE,
        |s| s.members,
    ),
    (
        "talkgroup_shard_webrtc_peers",
        "WebRTC peers on the shard",
        GAUGE,
        |s| s.peers,
    ),
    (
        "talkgroup_webrtc_peers_evicted",
        "WebRTC peers that never sent a connectivity check, closed to make room for new ones",
        COUNTER,
        |s| s.peers_evicted,
    ),
    (
        "talkgroup_record_dropped",
        "Recorded packets lost to the recorder's full queue (never slows forwarding)",
        COUNTER,
        |s| s.record_dropped,
    ),
    (
        "talkgroup_webrtc_peers_settled",
        "WebRTC peers served without their str0m Rtc after the handshake (consent, SRTP, reports)",
        COUNTER,
        |s| s.peers_settled,
    ),
    (
        "talkgroup_webrtc_peers_closed",
        "WebRTC peers that went away (ICE timeout, DTLS close)",
        COUNTER,
        |s| s.peers_closed,
    ),
];

impl Collector for Snapshot {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut f = Families(encoder);
        self.encode_node(&mut f)?;
        self.encode_shards(&mut f)?;
        self.encode_control(&mut f)?;
        self.encode_process(&mut f)
    }
}

impl Snapshot {
    /// Is it up, ready, which version.
    fn encode_node(&self, f: &mut Families) -> Result<(), std::fmt::Error> {
        let c = &self.control;
        f.gauge(
            "talkgroup_build_info",
            "The running version (always 1)",
            [(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                Num::U(1),
            )],
        )?;
        f.gauge(
            "talkgroup_draining",
            "1 while the node drains (no new clients; talk bursts in progress end)",
            [(none(), c.draining.into())],
        )?;
        f.gauge(
            "talkgroup_store_up",
            "1 when the floor store can decide presses (Redis: its subscription is up)",
            [(none(), c.store_up.into())],
        )?;
        let up = (0..self.shard_count).map(|i| {
            let answered = self.shards.iter().any(|s| s.shard == i);
            (vec![("shard", i.to_string())], answered.into())
        });
        f.gauge(
            "talkgroup_shard_up",
            "1 when the shard answered this scrape within a second",
            up,
        )
    }

    fn encode_shards(&self, f: &mut Families) -> Result<(), std::fmt::Error> {
        for (name, help, kind, get) in PER_SHARD {
            let samples = self.shards.iter().map(|s| (shard(s), get(s).into()));
            f.family(name, help, None, samples, kind)?;
        }
        // The shards' histograms, summed: one distribution for the node.
        let (mut latency, mut loss, mut jitter) = Default::default();
        for s in &self.shards {
            Buckets::merge(&mut latency, &s.forward_latency);
            Buckets::merge(&mut loss, &s.rr_loss);
            Buckets::merge(&mut jitter, &s.rr_jitter);
        }
        let latency: Buckets<11> = latency;
        f.histogram(
            "talkgroup_forward_latency",
            "In-server forwarding latency of sampled packets: from the wake-up that read the packet to \
             the end of the sendmmsg that sent its last copy",
            Unit::Seconds,
            latency.sum() as f64 / 1e9,
            latency.count(),
            &latency.cumulative(&FORWARD_LATENCY_NS, 1e9),
        )?;
        let loss: Buckets<8> = loss;
        f.histogram(
            "talkgroup_listener_loss",
            "Fraction of packets lost that listeners report (RTCP report blocks)",
            Unit::Ratios,
            loss.sum() as f64 / 256.0,
            loss.count(),
            &loss.cumulative(&LOSS_PER_256, 256.0),
        )?;
        let jitter: Buckets<9> = jitter;
        f.histogram(
            "talkgroup_listener_jitter",
            "Interarrival jitter that listeners report (RTCP report blocks)",
            Unit::Seconds,
            jitter.sum() as f64 / 1e6,
            jitter.count(),
            &jitter.cumulative(&JITTER_US, 1e6),
        )?;
        let dropped = self.shards.iter().flat_map(|s| {
            drop_reason_names()
                .into_iter()
                .zip(s.dropped)
                .map(move |(reason, n)| {
                    let mut l = shard(s);
                    l.push(("reason", reason.to_string()));
                    (l, n.into())
                })
        });
        f.counter(
            "talkgroup_packets_dropped",
            "Datagrams dropped, by reason",
            dropped,
        )?;
        let relay_dropped = self.shards.iter().flat_map(|s| {
            relay_drop_names()
                .into_iter()
                .zip(s.relay_dropped)
                .map(move |(reason, n)| {
                    let mut l = shard(s);
                    l.push(("reason", reason.to_string()));
                    (l, n.into())
                })
        });
        f.counter(
            "talkgroup_relay_dropped",
            "Relay datagrams dropped, by reason",
            relay_dropped,
        )
    }

    fn encode_control(&self, f: &mut Families) -> Result<(), std::fmt::Error> {
        let c = &self.control;
        for (name, help, v) in [
            (
                "talkgroup_connections",
                "Open WebSocket connections",
                c.connections,
            ),
            (
                "talkgroup_sessions_detached",
                "Sessions whose connection dropped, waiting for a resume",
                c.detached,
            ),
            (
                "talkgroup_channels",
                "Channels with members on this node",
                c.channels,
            ),
            ("talkgroup_members", "Memberships on this node", c.members),
        ] {
            f.gauge(name, help, [(none(), v.into())])?;
        }
        for (name, help, v) in [
            ("talkgroup_floor_grants", "Floor grants", c.floor_grants),
            (
                "talkgroup_store_errors",
                "Floor store calls that failed (presses denied unavailable)",
                c.store_errors,
            ),
            (
                "talkgroup_slow_clients",
                "Clients disconnected for not reading",
                c.slow_clients,
            ),
            (
                "talkgroup_shard_queue_full",
                "Commands lost to a full shard queue",
                c.shard_queue_full,
            ),
            (
                "talkgroup_bursts",
                "Talk bursts written to the transmission log",
                c.bursts,
            ),
            (
                "talkgroup_shard_panics",
                "Shard threads that died with a panic",
                c.shard_panics,
            ),
            (
                "talkgroup_goaways",
                "goaway frames sent (draining)",
                c.goaways,
            ),
            (
                "talkgroup_joins_refused_draining",
                "Joins refused with goaway because the node drains",
                c.joins_refused_draining,
            ),
            (
                "talkgroup_cluster_key_mismatch",
                "Times the relay key in the store was found not to be this node's",
                c.cluster_key_mismatch,
            ),
            (
                "talkgroup_orphan_locks_released",
                "Floor locks of this node that no floor held (a grant whose answer was lost), given back",
                c.orphan_locks_released,
            ),
            (
                "talkgroup_redirects",
                "Joins answered redirect to the channel's home node (--placement redirect)",
                c.redirects,
            ),
        ] {
            f.counter(name, help, [(none(), v.into())])?;
        }
        for (name, help, key, map) in [
            (
                "talkgroup_floor_denials",
                "Floor denials, by reason",
                "reason",
                &c.floor_denials,
            ),
            (
                "talkgroup_floor_revokes",
                "Floor revocations, by reason",
                "reason",
                &c.floor_revokes,
            ),
            (
                "talkgroup_signal_errors",
                "Error replies, by code",
                "code",
                &c.errors,
            ),
            (
                "talkgroup_limited",
                "Requests refused or clients dropped by a limit, by limit",
                "limit",
                &c.limited,
            ),
            (
                "talkgroup_auth_failures",
                "Joins refused for their token, by reason",
                "reason",
                &c.auth_failures,
            ),
        ] {
            let samples = map
                .iter()
                .map(|(label, v)| (vec![(key, label.to_string())], (*v).into()));
            f.counter(name, help, samples)?;
        }
        let p = &c.press_to_grant;
        f.histogram(
            "talkgroup_press_to_grant",
            "From a ptt press frame to its granted frame (presses granted without queueing)",
            Unit::Seconds,
            p.sum() as f64 / 1e6,
            p.count(),
            &p.cumulative(&PRESS_TO_GRANT_US, 1e6),
        )?;
        let q = &c.ws_queue_depth;
        f.histogram(
            "talkgroup_ws_send_queue",
            "Bytes in the client's send queue after each frame was queued",
            Unit::Bytes,
            q.sum() as f64,
            q.count(),
            &q.cumulative(&WS_QUEUE_BYTES, 1.0),
        )?;
        f.family(
            "talkgroup_ws_queued",
            "Bytes queued to all clients and not yet written",
            Some(Unit::Bytes),
            [(none(), c.ws_queued_bytes.into())],
            GAUGE,
        )?;
        f.family(
            "talkgroup_ws_queued_max",
            "The largest send queue of one client",
            Some(Unit::Bytes),
            [(none(), c.ws_queued_max_bytes.into())],
            GAUGE,
        )
    }

    fn encode_process(&self, f: &mut Families) -> Result<(), std::fmt::Error> {
        let p = &self.process;
        let shard_cpu = p
            .shard_cpu_seconds
            .iter()
            .map(|(i, s)| (vec![("shard", i.to_string())], (*s).into()));
        f.family(
            "talkgroup_shard_cpu",
            "CPU time of each shard's threads",
            Some(Unit::Seconds),
            shard_cpu,
            COUNTER,
        )?;
        f.family(
            "talkgroup_control_cpu",
            "CPU time of the control thread (signaling, floors, stores, metrics)",
            Some(Unit::Seconds),
            [(none(), p.control_cpu_seconds.into())],
            COUNTER,
        )?;
        // The standard process metrics, under their usual names (dashboards know them).
        f.family(
            "process_cpu",
            "Total user and system CPU time",
            Some(Unit::Seconds),
            [(none(), p.cpu_seconds.into())],
            COUNTER,
        )?;
        f.family(
            "process_resident_memory",
            "Resident memory size",
            Some(Unit::Bytes),
            [(none(), p.resident_bytes.into())],
            GAUGE,
        )?;
        f.gauge(
            "process_open_fds",
            "Open file descriptors",
            [(none(), p.open_fds.into())],
        )?;
        f.gauge(
            "process_max_fds",
            "Limit on open file descriptors",
            [(none(), p.max_fds.into())],
        )?;
        f.gauge(
            "process_threads",
            "Threads of the process",
            [(none(), p.threads.into())],
        )?;
        f.family(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Some(Unit::Seconds),
            [(none(), p.start_time_seconds.into())],
            GAUGE,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{ControlCounters, ProcessStats};

    #[test]
    fn names_follow_prometheus_conventions_and_every_family_is_typed() {
        let mut control = ControlCounters::default();
        control.press_to_grant.observe(&PRESS_TO_GRANT_US, 180);
        control.floor_denials.insert("busy", 2);
        let snapshot = Snapshot {
            control,
            shards: vec![ShardStats {
                shard: 1,
                packets_in: 7,
                ..Default::default()
            }],
            shard_count: 2,
            process: ProcessStats::read(),
        };
        let text = render(snapshot);
        for line in [
            "talkgroup_packets_in_total{shard=\"1\"} 7",
            "talkgroup_floor_denials_total{reason=\"busy\"} 2",
            "talkgroup_press_to_grant_seconds_bucket{le=\"0.00025\"} 1",
            "talkgroup_press_to_grant_seconds_count 1",
            "talkgroup_shard_up{shard=\"0\"} 0",
            "talkgroup_shard_up{shard=\"1\"} 1",
            "# TYPE talkgroup_shard_cpu_seconds_total counter",
            "# TYPE process_resident_memory_bytes gauge",
            "# TYPE talkgroup_ws_send_queue_bytes histogram",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {family} "))
                    || text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE line"
            );
        }
    }
}
