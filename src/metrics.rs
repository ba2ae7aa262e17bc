//! Prometheus text exposition of the shards' and the control thread's counters.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::relay::relay_drop_names;
use crate::shard::drop_reason_names;
use crate::shard::ShardStats;

/// Counters of the control plane (connections, floors, errors), filled by [`crate::control::HubCore`].
#[derive(Debug, Clone, Default)]
pub struct ControlCounters {
    /// Open WebSocket connections.
    pub connections: u64,
    /// Sessions whose connection dropped, waiting for a `resume`.
    pub detached: u64,
    /// Channels with members on this node.
    pub channels: u64,
    /// Memberships on this node.
    pub members: u64,
    /// Floor grants.
    pub floor_grants: u64,
    /// Floor denials by reason.
    pub floor_denials: BTreeMap<&'static str, u64>,
    /// Floor revocations by reason.
    pub floor_revokes: BTreeMap<&'static str, u64>,
    /// Error replies by code.
    pub errors: BTreeMap<&'static str, u64>,
    /// Floor store calls that failed.
    pub store_errors: u64,
    /// Clients disconnected for not reading.
    pub slow_clients: u64,
    /// Commands a full shard queue refused.
    pub shard_queue_full: u64,
    /// Talk bursts written to the transmission log.
    pub bursts: u64,
    /// Requests refused or clients dropped by a limit, by limit.
    pub limited: BTreeMap<&'static str, u64>,
    /// Joins refused for their token, by reason.
    pub auth_failures: BTreeMap<&'static str, u64>,
    /// `goaway` frames sent (draining).
    pub goaways: u64,
    /// Joins refused because the node drains.
    pub joins_refused_draining: u64,
    /// Shard threads that died with a panic.
    pub shard_panics: u64,
}

/// A per-shard metric: name, help text, how to read it.
type ShardMetric = (&'static str, &'static str, fn(&ShardStats) -> u64);

/// Renders all metrics (text format 0.0.4).
pub fn render(hub: &ControlCounters, shards: &[ShardStats]) -> String {
    let mut out = String::with_capacity(4096);
    let per_shard: [ShardMetric; 15] = [
        (
            "packets_in_total",
            "Datagrams received on the media port",
            |s| s.packets_in,
        ),
        (
            "packets_forwarded_total",
            "Datagrams sent to listeners",
            |s| s.forwarded,
        ),
        ("rtcp_in_total", "RTCP packets received from members", |s| {
            s.rtcp_in
        }),
        ("send_errors_total", "Datagrams the kernel refused", |s| {
            s.send_errors
        }),
        (
            "send_would_block_total",
            "Datagrams that found the socket buffer full",
            |s| s.send_would_block,
        ),
        ("sender_reports_total", "RTCP sender reports sent", |s| {
            s.sender_reports
        }),
        (
            "events_lost_total",
            "Shard events lost to a full control queue",
            |s| s.events_lost,
        ),
        (
            "relay_sent_total",
            "Relay datagrams sent to other nodes",
            |s| s.relay_sent,
        ),
        (
            "relay_in_total",
            "Relay datagrams received from other nodes",
            |s| s.relay_in,
        ),
        ("shard_channels", "Channels on the shard", |s| s.channels),
        ("shard_members", "Members on the shard", |s| s.members),
        ("shard_webrtc_peers", "WebRTC peers on the shard", |s| {
            s.peers
        }),
        (
            "webrtc_peers_evicted_total",
            "WebRTC peers that never sent a connectivity check, closed to make room for new ones",
            |s| s.peers_evicted,
        ),
        (
            "record_dropped_total",
            "Recorded packets lost to the recorder's full queue (never slows forwarding)",
            |s| s.record_dropped,
        ),
        (
            "webrtc_peers_closed_total",
            "WebRTC peers that went away (ICE timeout, DTLS close)",
            |s| s.peers_closed,
        ),
    ];
    for (name, help, get) in per_shard {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(
            out,
            "# HELP talkgroup_{name} {help}\n# TYPE talkgroup_{name} {kind}"
        );
        for s in shards {
            let _ = writeln!(out, "talkgroup_{name}{{shard=\"{}\"}} {}", s.shard, get(s));
        }
    }
    let _ = writeln!(out, "# HELP talkgroup_packets_dropped_total Datagrams dropped, by reason\n# TYPE talkgroup_packets_dropped_total counter");
    for s in shards {
        for (reason, n) in drop_reason_names().iter().zip(s.dropped.iter()) {
            let _ = writeln!(
                out,
                "talkgroup_packets_dropped_total{{shard=\"{}\",reason=\"{reason}\"}} {n}",
                s.shard
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP talkgroup_relay_dropped_total Relay datagrams dropped, by reason\n# TYPE talkgroup_relay_dropped_total counter"
    );
    for s in shards {
        for (reason, n) in relay_drop_names().iter().zip(s.relay_dropped.iter()) {
            let _ = writeln!(
                out,
                "talkgroup_relay_dropped_total{{shard=\"{}\",reason=\"{reason}\"}} {n}",
                s.shard
            );
        }
    }
    let gauges = [
        ("connections", "Open WebSocket connections", hub.connections),
        (
            "sessions_detached",
            "Sessions whose connection dropped, waiting for a resume",
            hub.detached,
        ),
        (
            "channels",
            "Channels with members on this node",
            hub.channels,
        ),
        ("members", "Memberships on this node", hub.members),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(
            out,
            "# HELP talkgroup_{name} {help}\n# TYPE talkgroup_{name} gauge\ntalkgroup_{name} {v}"
        );
    }
    let counters = [
        ("floor_grants_total", "Floor grants", hub.floor_grants),
        (
            "store_errors_total",
            "Floor store calls that failed (presses denied unavailable)",
            hub.store_errors,
        ),
        (
            "slow_clients_total",
            "Clients disconnected for not reading",
            hub.slow_clients,
        ),
        (
            "bursts_total",
            "Talk bursts written to the transmission log",
            hub.bursts,
        ),
        (
            "shard_queue_full_total",
            "Commands lost to a full shard queue",
            hub.shard_queue_full,
        ),
        (
            "shard_panics_total",
            "Shard threads that died with a panic",
            hub.shard_panics,
        ),
        (
            "goaways_total",
            "goaway frames sent (draining)",
            hub.goaways,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP talkgroup_{name} {help}\n# TYPE talkgroup_{name} counter\ntalkgroup_{name} {v}"
        );
    }
    let labelled = [
        (
            "floor_denials_total",
            "Floor denials, by reason",
            &hub.floor_denials,
        ),
        (
            "floor_revokes_total",
            "Floor revocations, by reason",
            &hub.floor_revokes,
        ),
        ("signal_errors_total", "Error replies, by code", &hub.errors),
        (
            "limited_total",
            "Requests refused or clients dropped by a limit, by limit",
            &hub.limited,
        ),
        (
            "auth_failures_total",
            "Joins refused for their token, by reason",
            &hub.auth_failures,
        ),
    ];
    for (name, help, map) in labelled {
        let _ = writeln!(
            out,
            "# HELP talkgroup_{name} {help}\n# TYPE talkgroup_{name} counter"
        );
        for (label, v) in map.iter() {
            let key = match name {
                "signal_errors_total" => "code",
                "limited_total" => "limit",
                _ => "reason",
            };
            let _ = writeln!(out, "talkgroup_{name}{{{key}=\"{label}\"}} {v}");
        }
    }
    out
}
