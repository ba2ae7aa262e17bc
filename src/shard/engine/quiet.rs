//! When the shard may stop waking for every datagram.
//!
//! Each wake-up of a shard costs far more than the datagram that caused it: on this project's 2-core VM
//! ≈ 70–90 µs of a core for the context switch and glommio's reactor (≈ 9 `io_uring_enter` per cycle),
//! against a few µs to read an RTCP report. An idle PTT shard receives nothing but such keep-alive
//! traffic — receiver reports from plain-RTP members every few seconds, consent checks and RTCP from
//! browsers — one datagram per wake-up: 4,000 idle plain members kept a shard 6.4 % busy, 1,600 idle
//! browsers 4–6 %. None of it needs an answer within milliseconds (consent allows seconds, RTCP is
//! statistics), so a *quiet* shard reads its socket on a grid (every [`POLL_EVERY`]) instead of waiting
//! on it, and handles what queued in one batch.
//!
//! The shard is *hot* — waits on its socket and forwards at once, as always — for [`HOT_FOR`] after
//! anything that may be followed by media or a handshake: a command from the control thread (a grant,
//! a join, a floor change from another node all arrive that way, before the client is told), a
//! forwarded packet (a burst keeps it hot), a WebRTC peer's DTLS or media, or any datagram of a peer
//! still setting up. A speaker's first packet follows its grant, so it finds the shard hot; only a
//! holder that stays silent longer than [`HOT_FOR`] after its grant may wait up to [`POLL_EVERY`] for
//! its first packet to be read.

use std::time::{Duration, Instant};

use super::ShardCore;

/// How long the shard stays hot after the last sign of media or set-up.
pub const HOT_FOR: Duration = Duration::from_secs(2);

/// How often a quiet shard reads what queued on its sockets.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

impl ShardCore {
    /// Something happened that media or a handshake may follow: wait on the socket for a while.
    pub(super) fn warm(&mut self, now: Instant) {
        let until = now + HOT_FOR;
        if until > self.hot_until {
            self.hot_until = until;
        }
    }

    /// True when nothing needs the socket read at once: the I/O loop may read it every [`POLL_EVERY`]
    /// rather than wait on it.
    pub fn quiet(&self, now: Instant) -> bool {
        now >= self.hot_until
    }
}
