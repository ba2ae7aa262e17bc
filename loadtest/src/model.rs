//! The run's fixed tables, shared read-only (or through atomics) by the I/O threads and the async
//! controllers: who is who, where each member's media goes, and the per-channel switch bookkeeping.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

/// Member `m` is slot `m % members` of channel `m / members`: no lookup tables on the hot path.
#[derive(Debug, Clone)]
pub struct Member {
    pub channel: u32,
    pub slot: u16,
    /// Our socket's address (the `rtp_addr` sent in `join`).
    pub addr: SocketAddr,
    /// Where the server wants this member's RTP (`joined.rtp.server_addr`).
    pub server_addr: SocketAddr,
    /// The SSRC of the stream this member receives (`joined.rtp.ssrc`).
    pub ssrc: u32,
    pub payload_type: u8,
    /// A WebRTC member (str0m client in the WebRTC engine) rather than a plain-RTP one.
    pub webrtc: bool,
}

/// Per-channel state touched from several threads.
#[derive(Debug, Default)]
pub struct ChannelShared {
    /// Spurt number of the next speaker, when a switch is being timed.
    pub next_spurt: AtomicU32,
    /// When the previous speaker's `release` was written (ns), 0 when no switch is being timed. The first
    /// listener to see a packet of `next_spurt` swaps it to 0 and records the switch latency.
    pub switch_from_ns: AtomicU64,
    /// Slot of the member pressing or holding the floor (`u32::MAX`: none): the WebSocket tasks forward
    /// only that member's floor events to the controller, not every listener's `taken`/`idle`.
    pub speaker_slot: AtomicU32,
}

impl ChannelShared {
    pub fn new() -> Self {
        ChannelShared {
            speaker_slot: AtomicU32::new(u32::MAX),
            ..Default::default()
        }
    }
}

/// Where media and keep-alives go in the current phase: the talkgroup server, or the harness's raw
/// forwarder (ceiling runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Server,
    Raw(SocketAddr),
}

/// The current target as an atomic, for the receivers to tell stray packets (from the other target)
/// from samples.
#[derive(Debug)]
pub struct TargetCell {
    raw: Option<SocketAddr>,
    is_raw: AtomicU8,
}

impl TargetCell {
    pub fn new(raw: Option<SocketAddr>) -> Self {
        TargetCell {
            raw,
            is_raw: AtomicU8::new(0),
        }
    }

    pub fn set(&self, t: Target) {
        self.is_raw
            .store(matches!(t, Target::Raw(_)) as u8, Ordering::Release);
    }

    pub fn get(&self) -> Target {
        match (self.is_raw.load(Ordering::Acquire), self.raw) {
            (1, Some(a)) => Target::Raw(a),
            _ => Target::Server,
        }
    }
}

/// Protocol names for channel `c` and slot `s` (1–64 chars of `[A-Za-z0-9._-]`).
pub fn channel_name(prefix: &str, c: u32) -> String {
    format!("{prefix}-c{c}")
}

pub fn member_name(s: u16) -> String {
    format!("m{s}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_protocol_valid() {
        let ok = |s: &str| {
            (1..=64).contains(&s.len())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        assert!(ok(&channel_name("lt1a2b", 9_999)));
        assert!(ok(&member_name(1_999)));
    }

    #[test]
    fn target_cell_switches() {
        let raw: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let t = TargetCell::new(Some(raw));
        assert_eq!(t.get(), Target::Server);
        t.set(Target::Raw(raw));
        assert_eq!(t.get(), Target::Raw(raw));
        t.set(Target::Server);
        assert_eq!(t.get(), Target::Server);
    }
}
