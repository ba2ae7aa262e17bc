//! Metrics that answer an operator's questions: is the node up and ready, how loaded is each shard (packets,
//! CPU, members), how long does a press take to be granted, are clients keeping up with their frames, what
//! is dropped and why.
//!
//! Nothing here is on the packet path. The shards keep plain integer counters ([`ShardStats`]) and hand
//! copies to the control thread on `Command::Stats`; the control core keeps its own
//! ([`ControlCounters`], including [`Buckets`] histograms, plain integers too); at each scrape the values
//! are encoded with `prometheus-client` ([`render`]) together with per-thread CPU from `/proc`
//! ([`ProcessStats`]). Names follow Prometheus conventions: `talkgroup_` prefix, `_total` counters, base
//! units (seconds, bytes).
//!
//! # Metrics the shard does not report yet
//!
//! Two questions need the shard's packet path: how long a packet spends in the server, and what listeners
//! report back. The shards fill these [`ShardStats`] fields (plain integers, copied like the others) and a
//! scrape sums them over the shards:
//!
//! | metric | type | `ShardStats` field | how the shard fills it |
//! |---|---|---|---|
//! | `talkgroup_forward_latency_seconds` | histogram, [`FORWARD_LATENCY_NS`] | `forward_latency` (ns) | about 1 packet in [`FORWARD_LATENCY_SAMPLE`]: from the wake-up that read its batch to the end of the `sendmmsg` that sent its last copy |
//! | `talkgroup_listener_reports_total{shard}` | counter | `rr_reports` | RTCP receiver reports from listeners (plain RTP: their RTCP; WebRTC: str0m's stats of the listener's stream) |
//! | `talkgroup_listener_loss_ratios` | histogram, [`LOSS_PER_256`] | `rr_loss` (fraction lost × 256, as in the RR) | one observation per report |
//! | `talkgroup_listener_jitter_seconds` | histogram, [`JITTER_US`] | `rr_jitter` (µs: interarrival jitter ÷ 48 kHz) | one observation per report |

pub mod buckets;
mod process;
mod render;

use std::collections::BTreeMap;

pub use self::buckets::{
    Buckets, FORWARD_LATENCY_NS, FORWARD_LATENCY_SAMPLE, JITTER_US, LOSS_PER_256,
    PRESS_TO_GRANT_US, WS_QUEUE_BYTES,
};
pub use self::process::ProcessStats;
pub use self::render::{render, CONTENT_TYPE};
use crate::shard::ShardStats;

/// Counters and histograms of the control plane, filled by [`crate::control::HubCore`] (and, for the
/// WebSocket queues, by its runner at scrape time).
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
    /// The store's relay key was found not to be this node's (see `cluster.rs`).
    pub cluster_key_mismatch: u64,
    /// Locks of this node in the store that no floor held (grants whose answer was lost), given back.
    pub orphan_locks_released: u64,
    /// Joins answered `redirect` (placement).
    pub redirects: u64,
    /// The node is draining.
    pub draining: bool,
    /// The floor store can decide presses (Redis: its subscription is up).
    pub store_up: bool,
    /// Press → granted (µs, [`PRESS_TO_GRANT_US`]): from the `ptt` frame to the `granted` frame, for
    /// presses granted without waiting in the queue.
    pub press_to_grant: Buckets<12>,
    /// Bytes in the client's send queue after each frame was queued ([`WS_QUEUE_BYTES`]).
    pub ws_queue_depth: Buckets<8>,
    /// Bytes queued to all clients and not yet written, at the scrape.
    pub ws_queued_bytes: u64,
    /// The largest send queue of one client, at the scrape.
    pub ws_queued_max_bytes: u64,
}

/// Every value one scrape reports.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The control plane's.
    pub control: ControlCounters,
    /// Each shard's that answered (a shard that did not is `talkgroup_shard_up 0`).
    pub shards: Vec<ShardStats>,
    /// How many shards the node runs.
    pub shard_count: usize,
    /// The process's and its threads' CPU and memory.
    pub process: ProcessStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_count_where_values_fall_and_expose_cumulative_counts() {
        let bounds = [10, 100, 1000];
        let mut b = Buckets::<3>::default();
        for v in [0, 10, 11, 100, 5000] {
            b.observe(&bounds, v);
        }
        assert_eq!(b.count(), 5);
        assert_eq!(b.sum(), 5121);
        assert_eq!(
            b.cumulative(&bounds, 1000.0),
            vec![(0.01, 2), (0.1, 4), (1.0, 4), (f64::INFINITY, 5)]
        );
    }
}
