//! What crosses the boundary between the control thread and a shard: plain values over bounded flume
//! channels, never a handle on either side's state. Both the sans-IO [`super::engine`] and the
//! I/O loop use these types, so they live apart from both.

use std::net::SocketAddr;

use crate::channel::SpeakerChange;
use crate::ids::MemberKey;

use super::ShardStats;

/// Capacity of the command channel into a shard.
pub const COMMAND_QUEUE: usize = 8192;

/// Commands from the control thread.
#[derive(Debug)]
pub enum Command {
    /// A plain-RTP member: the shard adds it to the channel (created if new) and answers
    /// [`Event::MemberAdded`].
    AddMember {
        /// The channel to join.
        channel: String,
        /// The membership.
        key: MemberKey,
        /// The member's name (carried in relay packets when it speaks).
        name: String,
        /// Where it sends from and hears at (once latched).
        addr: SocketAddr,
        /// The SSRC of the stream it hears.
        ssrc: u32,
    },
    /// A WebRTC member: the shard builds its `Rtc`, registers it, and answers [`Event::PeerAnswered`].
    AddPeer {
        /// The channel to join.
        channel: String,
        /// The membership.
        key: MemberKey,
        /// The member's name.
        name: String,
        /// Its offer, already checked by [`crate::peer::offer`].
        offer: Box<str0m::change::SdpOffer>,
    },
    /// A member leaves (a WebRTC peer is closed with DTLS close_notify).
    RemoveMember {
        /// The channel it leaves.
        channel: String,
        /// The membership.
        key: MemberKey,
    },
    /// A grant or an idle, applied by the epoch rules and answered [`Event::Applied`].
    Speaker {
        /// The channel whose floor changed.
        channel: String,
        /// What changed.
        change: SpeakerChange,
    },
    /// Other nodes' relay addresses for the channel (this shard's index on each node).
    RelayTargets {
        /// The channel.
        channel: String,
        /// Where a local speaker's packets are relayed.
        targets: Vec<SocketAddr>,
    },
    /// Relay addresses of every registered node: the only accepted relay senders.
    RelayPeers {
        /// The registered nodes' relay addresses, each with its node id.
        peers: Vec<(SocketAddr, String)>,
    },
    /// Whether a member is sent the channel's audio (a token without the `listen` right: not). Sent right
    /// after its `AddMember`/`AddPeer`, before it can latch.
    SetListens {
        /// The channel.
        channel: String,
        /// The membership.
        key: MemberKey,
        /// Whether it hears the channel.
        listens: bool,
    },
    /// Record (or stop recording) the channel's local bursts.
    SetRecording {
        /// The channel.
        channel: String,
        /// Whether to record.
        on: bool,
    },
    /// A copy of the shard's counters, sent to `reply`.
    Stats {
        /// Where the copy goes (`try_send`: a gone asker is not waited for).
        reply: flume::Sender<ShardStats>,
    },
    /// Stop the shard's loop.
    Shutdown,
}

/// Events for the control thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A plain-RTP member is in its channel.
    MemberAdded {
        /// The membership.
        key: MemberKey,
    },
    /// A speaker change reached the shard; `applied` is false when the epoch rules discarded it.
    Applied {
        /// The channel.
        channel: String,
        /// The change's epoch.
        epoch: u64,
        /// Whether it changed the shard's cached speaker.
        applied: bool,
        /// The change was an idle: the shard no longer forwards the holder of `epoch` (whether or not it
        /// changed anything — a newer epoch already stopped it).
        idle: bool,
    },
    /// T1: no media from the holder of `epoch`.
    Silence {
        /// The channel.
        channel: String,
        /// The grant that went silent.
        epoch: u64,
    },
    /// The SDP answer for an `AddPeer` (the peer is registered and reachable), or why there is none.
    PeerAnswered {
        /// The membership.
        key: MemberKey,
        /// The answer's SDP text, or the refusal.
        answer: Result<String, PeerRefused>,
    },
    /// A local member's talk burst ended: the packets the shard forwarded for it (transmission log).
    BurstEnded {
        /// The channel.
        channel: String,
        /// The burst's epoch.
        epoch: u64,
        /// Audio packets forwarded.
        packets: u64,
    },
    /// A WebRTC peer completed ICE and DTLS: media flows (its handshake no longer counts as pending).
    PeerConnected {
        /// The channel.
        channel: String,
        /// The membership.
        key: MemberKey,
    },
    /// A WebRTC peer is gone (ICE timeout, DTLS close, never connected): run the leave path.
    PeerClosed {
        /// Its channel.
        channel: String,
        /// Its membership.
        key: MemberKey,
        /// Why, for the log and the leave reason.
        reason: &'static str,
    },
}

/// Why a shard built no peer for an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRefused {
    /// str0m refused the offer, or WebRTC is off (answered `bad_request`).
    Offer(String),
    /// Too many DTLS handshakes in progress on the shard (answered `unavailable`: try again).
    Busy,
}
