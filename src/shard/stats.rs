//! A shard's counters and the reasons it drops datagrams. Plain integers written by the shard alone; the
//! control thread gets copies (`Command::Stats`) for `/metrics`.

use crate::relay::RELAY_DROPS;
use crate::rtp::RtpError;

/// Number of drop reasons counted per shard.
pub const DROP_REASONS: usize = 11;

/// Why a datagram was dropped: the index of its counter in [`ShardStats::dropped`]. The order matches
/// [`drop_reason_names`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// Shorter than an RTP header.
    TooShort = 0,
    /// RTP version is not 2.
    BadVersion,
    /// CSRCs, extension or padding run past the end.
    Malformed,
    /// Larger than [`crate::rtp::MAX_DATAGRAM`].
    Oversized,
    /// From an address no member or peer of the shard has.
    UnknownSource,
    /// Media from a member that does not hold the floor.
    NotHolder,
    /// A payload type other than the leg's Opus.
    NotOpus,
    /// Older than its talk spurt, or padding only.
    Stale,
    /// STUN or DTLS from a plain-RTP address, or a relay datagram refused (see `relay_dropped`).
    NotRtp,
    /// A datagram of a WebRTC peer that str0m refused (bad DTLS, SRTP authentication, …).
    PeerRefused,
    /// Media from the holder after its lease ended: fenced by the shard on its own.
    LeaseExpired,
}

impl From<RtpError> for DropReason {
    fn from(e: RtpError) -> Self {
        match e {
            RtpError::TooShort => DropReason::TooShort,
            RtpError::BadVersion => DropReason::BadVersion,
            RtpError::BadHeader | RtpError::BadPadding => DropReason::Malformed,
        }
    }
}

/// Names of the drop reasons, in [`DropReason`] order, for metrics.
pub const fn drop_reason_names() -> [&'static str; DROP_REASONS] {
    [
        "too_short",
        "bad_version",
        "malformed",
        "oversized",
        "unknown_source",
        "not_holder",
        "not_opus",
        "stale",
        "not_rtp",
        "peer_refused",
        "lease_expired",
    ]
}

/// Counters of one shard (plain integers: only the shard writes them; the control thread gets copies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// The shard's index.
    pub shard: usize,
    /// Datagrams received on the media port.
    pub packets_in: u64,
    /// Datagrams sent to listeners (plain RTP and what WebRTC peers produced).
    pub forwarded: u64,
    /// Of `forwarded`, the media: listeners' RTP packets, plain and sealed WebRTC (no RTCP, STUN or DTLS).
    pub media_forwarded: u64,
    /// Datagrams dropped, by [`DropReason`].
    pub dropped: [u64; DROP_REASONS],
    /// RTCP packets from plain-RTP members (they latch; nothing is forwarded).
    pub rtcp_in: u64,
    /// Datagrams the kernel refused.
    pub send_errors: u64,
    /// Datagrams that met a full socket buffer (sent later, or counted in `send_errors`).
    pub send_would_block: u64,
    /// Sender reports sent on plain-RTP listener streams.
    pub sender_reports: u64,
    /// Speaker changes the epoch rules discarded.
    pub stale_speaker_changes: u64,
    /// Events lost because the control thread's queue was full.
    pub events_lost: u64,
    /// Relay datagrams sent to other nodes.
    pub relay_sent: u64,
    /// Datagrams received on the relay port.
    pub relay_in: u64,
    /// Relay datagrams refused, by [`crate::relay::RelayError`].
    pub relay_dropped: [u64; RELAY_DROPS],
    /// Channels on the shard (filled in by the copy).
    pub channels: u64,
    /// Members on the shard, plain and WebRTC (filled in by the copy).
    pub members: u64,
    /// WebRTC peers on the shard (filled in by the copy).
    pub peers: u64,
    /// WebRTC peers that closed (ICE timeout, DTLS close, never connected).
    pub peers_closed: u64,
    /// WebRTC peers that never sent a connectivity check, closed to make room for a new one.
    pub peers_evicted: u64,
    /// WebRTC peers that settled: served without their str0m `Rtc` after the handshake.
    pub peers_settled: u64,
    /// Recorded packets (or burst ends) lost to the recorder's full queue.
    pub record_dropped: u64,
    /// In-server forwarding latency of sampled packets, ns ([`crate::metrics::buckets::FORWARD_LATENCY_NS`]).
    pub forward_latency: crate::metrics::buckets::Buckets<11>,
    /// Receiver reports from listeners.
    pub rr_reports: u64,
    /// Their fraction lost × 256 ([`crate::metrics::buckets::LOSS_PER_256`]).
    pub rr_loss: crate::metrics::buckets::Buckets<8>,
    /// Their interarrival jitter, µs ([`crate::metrics::buckets::JITTER_US`]).
    pub rr_jitter: crate::metrics::buckets::Buckets<9>,
}
