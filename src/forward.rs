//! Header rewriting: one continuous outbound stream per listener (a media-switching mixer, RFC 7667 §3.6.1,
//! RFC 3550 §7.3), and the batch that carries one fan-out to the socket.
//!
//! Work is split in two so that the per-listener part stays a handful of integer operations:
//! - [`Ingress`] runs once per received packet of the channel's speaker: it extends the 16-bit sequence
//!   number, decides where a talk spurt starts (new grant, new SSRC, a jump) and absorbs padding-only packets.
//! - [`OutStream`] runs once per listener: it maps the spurt onto the listener's own SSRC, sequence and
//!   timestamp space. Within a spurt the mapping is an offset, so the speaker's own gaps and reordering reach
//!   the listener's jitter buffer unchanged; at a spurt boundary the sequence continues at `last + 1` and the
//!   timestamp advances by the wall-clock gap, with the marker bit set (RFC 3551 §4.1).
//!
//! Nothing here reads a clock: `now` is passed in; nothing here touches a socket: [`Batch`] is what the
//! shard loop hands to `sendmmsg`.

#![warn(missing_docs)]

use std::ops::Range;
use std::time::{Duration, Instant};

use rtpio::RawAddr;

use crate::ids::PeerId;
use crate::rtp::{self, RtpView, HEADER_LEN};

/// RTP clock rate of Opus (RFC 7587 §4.1).
pub const OPUS_CLOCK: u64 = 48_000;
/// One 20 ms Opus frame in RTP timestamp units; the duration assumed before a spurt has two packets.
pub const DEFAULT_FRAME_TS: u32 = 960;

/// A jump of more than this many sequence numbers ahead starts a new spurt (RFC 3550 A.1 `MAX_DROPOUT`).
const MAX_DROPOUT: u64 = 3000;
/// A packet more than this many behind the highest seen starts a new spurt (RFC 3550 A.1 `MAX_MISORDER`).
const MAX_MISORDER: u64 = 100;

/// One speaker packet after ingress processing, ready to be mapped for every listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inbound {
    /// Identifies the talk spurt; listeners start a new mapping when it changes.
    pub spurt: u64,
    /// Extended sequence number, less the padding-only packets absorbed so far in this spurt.
    pub ext_seq: u64,
    /// The speaker's RTP timestamp, as sent.
    pub timestamp: u32,
    /// The speaker's marker bit.
    pub marker: bool,
    /// Timestamp units this packet lasts (the gap to the previous one in the spurt, or 20 ms).
    pub duration: u32,
}

/// Per-channel tracking of the current speaker's inbound stream.
#[derive(Debug, Default)]
pub struct Ingress {
    spurt: u64,
    epoch: u64,
    ssrc: Option<u32>,
    /// Highest extended sequence number seen in the spurt (unadjusted).
    max_ext: u64,
    first_ext: u64,
    absorbed: u64,
    last_ts: u32,
    duration: u32,
}

/// What [`Ingress::accept`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngressVerdict {
    /// Map it for every listener.
    Forward(Inbound),
    /// Older than the first packet of the spurt: the listener has moved past it.
    TooOld,
    /// No payload after padding removal; its sequence number is absorbed.
    PaddingOnly,
}

impl Ingress {
    /// Processes one packet of the floor holder, granted at `epoch`.
    pub fn accept(&mut self, epoch: u64, pkt: &RtpView<'_>) -> IngressVerdict {
        let new_spurt = match self.ssrc {
            None => true,
            Some(ssrc) if ssrc != pkt.ssrc || epoch != self.epoch => true,
            Some(_) => {
                let ext = extend(self.max_ext, pkt.seq);
                ext > self.max_ext + MAX_DROPOUT || ext + MAX_MISORDER < self.max_ext
            }
        };
        if new_spurt {
            self.spurt += 1;
            self.epoch = epoch;
            self.ssrc = Some(pkt.ssrc);
            // Start the extended space at 2^16 so that packets slightly older than the first still
            // extend to a number below `first_ext` instead of wrapping under zero.
            self.max_ext = (1 << 16) + u64::from(pkt.seq);
            self.first_ext = self.max_ext;
            self.absorbed = 0;
            self.last_ts = pkt.timestamp;
            self.duration = DEFAULT_FRAME_TS;
        }
        let ext = extend(self.max_ext, pkt.seq);
        if ext < self.first_ext {
            return IngressVerdict::TooOld;
        }
        let advances = ext > self.max_ext;
        if advances {
            let delta = pkt.timestamp.wrapping_sub(self.last_ts);
            // Only a plausible forward step (≤ 1 s) updates the frame duration.
            if delta > 0 && delta <= OPUS_CLOCK as u32 && ext == self.max_ext + 1 {
                self.duration = delta;
            }
            self.max_ext = ext;
            self.last_ts = pkt.timestamp;
        }
        if pkt.payload.is_empty() {
            // Only a padding packet that moved the sequence forward takes a number to absorb: a repeated
            // or late one must not (a sender repeating one padding packet would otherwise drive the
            // absorbed count past the numbers it advanced, and the subtraction below under the spurt).
            if advances {
                self.absorbed += 1;
            }
            return IngressVerdict::PaddingOnly;
        }
        IngressVerdict::Forward(Inbound {
            spurt: self.spurt,
            // `absorbed` never exceeds the numbers advanced since `first_ext`; saturating all the same.
            ext_seq: ext.saturating_sub(self.absorbed).max(self.first_ext),
            timestamp: pkt.timestamp,
            marker: pkt.marker,
            duration: self.duration,
        })
    }

    /// Forgets the speaker: the next packet starts a new spurt whatever its SSRC.
    pub fn reset(&mut self) {
        self.ssrc = None;
    }
}

/// Extends a 16-bit sequence number to the value nearest `reference` (RFC 3550 A.1).
pub fn extend(reference: u64, seq: u16) -> u64 {
    let cycle = reference & !0xffff;
    let candidate = cycle | u64::from(seq);
    if candidate + 0x8000 < reference {
        candidate + 0x1_0000
    } else if candidate > reference + 0x8000 && candidate >= 0x1_0000 {
        candidate - 0x1_0000
    } else {
        candidate
    }
}

/// A listener's outbound stream: its own SSRC, and the mapping of the current spurt onto it.
#[derive(Debug, Clone)]
pub struct OutStream {
    /// The listener's own SSRC: one stream whoever speaks.
    pub ssrc: u32,
    /// The listener leg's Opus payload type (Chrome 111, Firefox 109; 111 on plain RTP).
    pub payload_type: u8,
    spurt: u64,
    /// Extended sequence number (inbound space) of the first packet mapped in this spurt.
    map_first: u64,
    /// Highest inbound extended sequence number mapped in this spurt.
    map_max: u64,
    off_seq: u16,
    off_ts: u32,
    /// Highest outbound sequence number and its timestamp.
    last_seq: u16,
    last_ts: u32,
    last_duration: u32,
    last_sent: Option<Instant>,
    /// Packets sent, for sender reports (RFC 3550 §6.4.1: a wrap-around counter).
    pub packets: u32,
    /// Payload octets sent, for sender reports (wraps like `packets`).
    pub octets: u32,
}

/// A rewritten header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutHeader {
    /// Sequence number on the listener's stream.
    pub seq: u16,
    /// Timestamp on the listener's stream.
    pub timestamp: u32,
    /// Set on the first packet of a spurt (RFC 3551 §4.1) and wherever the speaker set it.
    pub marker: bool,
}

impl OutStream {
    /// `initial_seq` and `initial_ts` are where the stream starts (random, RFC 3550 §5.1).
    pub fn new(ssrc: u32, payload_type: u8, initial_seq: u16, initial_ts: u32) -> Self {
        OutStream {
            ssrc,
            payload_type,
            spurt: 0,
            map_first: 0,
            map_max: 0,
            off_seq: 0,
            off_ts: 0,
            last_seq: initial_seq.wrapping_sub(1),
            last_ts: initial_ts,
            last_duration: 0,
            last_sent: None,
            packets: 0,
            octets: 0,
        }
    }

    /// Maps one inbound packet onto this stream; `None` if it is older than what this listener has
    /// already been given in the spurt's mapping.
    #[inline]
    pub fn rewrite(&mut self, pkt: &Inbound, now: Instant) -> Option<OutHeader> {
        let mut marker = pkt.marker;
        if pkt.spurt != self.spurt {
            // New spurt: continue the sequence, advance the timestamp by the wall-clock gap.
            let gap = match self.last_sent {
                Some(t) => {
                    let wall = now.saturating_duration_since(t);
                    let wall_ts =
                        (wall.as_micros() as u64 * OPUS_CLOCK / 1_000_000).min(u32::MAX as u64 / 2);
                    (wall_ts as u32).max(self.last_duration)
                }
                None => 0,
            };
            let seq0 = self.last_seq.wrapping_add(1);
            let ts0 = self.last_ts.wrapping_add(gap);
            self.spurt = pkt.spurt;
            self.map_first = pkt.ext_seq;
            self.map_max = pkt.ext_seq;
            self.off_seq = seq0.wrapping_sub(pkt.ext_seq as u16);
            self.off_ts = ts0.wrapping_sub(pkt.timestamp);
            marker = true;
        } else if pkt.ext_seq < self.map_first {
            return None;
        }
        let seq = (pkt.ext_seq as u16).wrapping_add(self.off_seq);
        let timestamp = pkt.timestamp.wrapping_add(self.off_ts);
        if pkt.ext_seq >= self.map_max {
            self.map_max = pkt.ext_seq;
            self.last_seq = seq;
            self.last_ts = timestamp;
            self.last_sent = Some(now);
            self.last_duration = pkt.duration;
        }
        Some(OutHeader {
            seq,
            timestamp,
            marker,
        })
    }

    /// Counts one sent packet for the sender report.
    #[inline]
    pub fn count(&mut self, payload_len: usize) {
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(payload_len as u32);
    }

    /// True once anything was sent on this stream (sender reports only make sense then).
    pub fn has_sent(&self) -> bool {
        self.last_sent.is_some()
    }

    /// True when a packet went out on this stream within `window` before `now`.
    pub fn sent_within(&self, now: Instant, window: Duration) -> bool {
        self.last_sent
            .is_some_and(|t| now.saturating_duration_since(t) < window)
    }

    /// The RTP timestamp that corresponds to `now` on this stream (for sender reports).
    pub fn timestamp_at(&self, now: Instant) -> u32 {
        match self.last_sent {
            Some(t) => {
                let us = now.saturating_duration_since(t).as_micros() as u64;
                self.last_ts
                    .wrapping_add((us * OPUS_CLOCK / 1_000_000) as u32)
            }
            None => self.last_ts,
        }
    }
}

/// The datagrams of one fan-out (or of every fan-out of one `recvmmsg` drain): a header per plain-RTP
/// destination, all sharing one payload, the rewritten header for each WebRTC listener (the shard seals
/// them into `sealed`), and the relay copies for other nodes. The vectors keep their capacity between
/// packets, so steady-state forwarding allocates nothing.
#[derive(Default)]
pub struct Batch {
    /// One RTP header per plain-RTP destination; `headers[i]` goes to `dests[i]`.
    pub headers: Vec<[u8; HEADER_LEN]>,
    /// Where each header goes.
    pub dests: Vec<RawAddr>,
    /// WebRTC listeners and their headers; the shard seals them into `sealed`.
    pub peers: Vec<(PeerId, OutHeader)>,
    /// Whole SRTP datagrams for WebRTC listeners (each its own header, payload and tag), sent from the
    /// media socket with the plain fan-out.
    pub sealed: RelayCopies,
    /// Copies of local speakers' packets for the other nodes of their channels, sent from the relay
    /// socket: an output of the call that forwarded the packet, like the headers.
    pub relay: RelayCopies,
}

impl Batch {
    /// Empties the batch, keeping its capacity.
    pub fn clear(&mut self) {
        self.headers.clear();
        self.dests.clear();
        self.peers.clear();
        self.sealed.clear();
        self.relay.clear();
    }

    /// Plain-RTP datagrams in the batch.
    pub fn len(&self) -> usize {
        self.headers.len()
    }

    /// True when there is no plain-RTP datagram to send.
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
    }

    /// Appends one rewritten header for `dest`.
    #[inline]
    pub fn push(&mut self, stream: &OutStream, h: OutHeader, dest: &RawAddr) {
        let mut header = [0u8; HEADER_LEN];
        rtp::write_header(
            &mut header,
            h.marker,
            stream.payload_type,
            h.seq,
            h.timestamp,
            stream.ssrc,
        );
        self.headers.push(header);
        self.dests.push(*dest);
    }
}

/// Whole datagrams, each sent to several destinations (a relay packet goes once to every other node of
/// its channel). Stored flat — the bytes of every datagram in one buffer and one entry per (datagram,
/// destination) — so that one `sendmmsg` sends them all.
#[derive(Debug, Default)]
pub struct RelayCopies {
    data: Vec<u8>,
    sends: Vec<(Range<usize>, RawAddr)>,
}

impl RelayCopies {
    /// Appends a datagram written by `write` (which appends to the buffer it is given) for every
    /// destination in `dests`. Nothing is written when `dests` is empty.
    pub fn push(&mut self, dests: &[RawAddr], write: impl FnOnce(&mut Vec<u8>)) {
        if dests.is_empty() {
            return;
        }
        let start = self.data.len();
        write(&mut self.data);
        let range = start..self.data.len();
        self.sends.extend(dests.iter().map(|d| (range.clone(), *d)));
    }

    /// Moves every send of `other` to the end of this one.
    pub fn append(&mut self, other: &mut RelayCopies) {
        let base = self.data.len();
        self.data.append(&mut other.data);
        self.sends.extend(
            other
                .sends
                .drain(..)
                .map(|(r, d)| (r.start + base..r.end + base, d)),
        );
    }

    /// Send `i`: the datagram and its destination.
    pub fn get(&self, i: usize) -> (&[u8], &RawAddr) {
        let (range, dest) = &self.sends[i];
        (&self.data[range.clone()], dest)
    }

    /// Datagrams to send (a datagram with three destinations counts three).
    pub fn len(&self) -> usize {
        self.sends.len()
    }

    /// True when nothing is to be relayed.
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty()
    }

    /// Empties it, keeping its capacity.
    pub fn clear(&mut self) {
        self.data.clear();
        self.sends.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pkt(seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
        rtp::build_packet(false, 111, seq, ts, ssrc, payload)
    }

    fn accept(ing: &mut Ingress, epoch: u64, p: &[u8]) -> IngressVerdict {
        ing.accept(epoch, &RtpView::parse(p).unwrap())
    }

    #[test]
    fn extend_wraps_both_ways() {
        assert_eq!(extend(0x1_fffe, 1), 0x2_0001);
        assert_eq!(extend(0x2_0001, 0xfffe), 0x1_fffe);
        assert_eq!(extend(0x1_0005, 3), 0x1_0003);
    }

    #[test]
    fn spurt_changes_on_epoch_ssrc_and_jump() {
        let mut ing = Ingress::default();
        let spurt = |v| match v {
            IngressVerdict::Forward(i) => i.spurt,
            other => panic!("{other:?}"),
        };
        let a = spurt(accept(&mut ing, 1, &pkt(10, 0, 7, b"x")));
        assert_eq!(spurt(accept(&mut ing, 1, &pkt(11, 960, 7, b"x"))), a);
        let b = spurt(accept(&mut ing, 2, &pkt(12, 1920, 7, b"x")));
        assert_ne!(a, b);
        let c = spurt(accept(&mut ing, 2, &pkt(13, 1920, 8, b"x")));
        assert_ne!(b, c);
        let d = spurt(accept(&mut ing, 2, &pkt(13 + 5000, 1920, 8, b"x")));
        assert_ne!(c, d);
    }

    #[test]
    fn repeated_padding_only_packets_never_underflow_the_sequence() {
        let t = Instant::now();
        let mut ing = Ingress::default();
        let mut out = OutStream::new(1, 111, 100, 0);
        let first = match accept(&mut ing, 1, &pkt(10, 0, 7, b"x")) {
            IngressVerdict::Forward(p) => out.rewrite(&p, t).unwrap().seq,
            other => panic!("{other:?}"),
        };
        // A hostile holder repeats one padding-only packet 70,000 times, then sends more.
        let padding = pkt(11, 960, 7, b"");
        for _ in 0..70_000 {
            assert_eq!(accept(&mut ing, 1, &padding), IngressVerdict::PaddingOnly);
        }
        for _ in 0..70_000u32 {
            let _ = accept(&mut ing, 1, &pkt(10, 0, 7, b""));
        }
        match accept(&mut ing, 1, &pkt(12, 1920, 7, b"y")) {
            IngressVerdict::Forward(p) => {
                assert_eq!(
                    out.rewrite(&p, t).unwrap().seq,
                    first.wrapping_add(1),
                    "11 was absorbed once"
                );
            }
            other => panic!("{other:?}"),
        }
        // 70,000 advancing padding packets (more than 2^16) are absorbed one each.
        for i in 0..70_000u32 {
            let seq = (13 + i) as u16;
            assert_eq!(
                accept(&mut ing, 1, &pkt(seq, 0, 7, b"")),
                IngressVerdict::PaddingOnly
            );
        }
        let seq = (13 + 70_000u32) as u16;
        match accept(&mut ing, 1, &pkt(seq, 0, 7, b"z")) {
            IngressVerdict::Forward(p) => {
                assert_eq!(
                    out.rewrite(&p, t).unwrap().seq,
                    first.wrapping_add(2),
                    "continuous"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn older_than_spurt_start_is_dropped_and_padding_absorbed() {
        let mut ing = Ingress::default();
        assert!(matches!(
            accept(&mut ing, 1, &pkt(100, 0, 7, b"x")),
            IngressVerdict::Forward(_)
        ));
        assert_eq!(
            accept(&mut ing, 1, &pkt(99, 0, 7, b"x")),
            IngressVerdict::TooOld
        );
        assert_eq!(
            accept(&mut ing, 1, &pkt(101, 960, 7, b"")),
            IngressVerdict::PaddingOnly
        );
        match accept(&mut ing, 1, &pkt(102, 1920, 7, b"y")) {
            IngressVerdict::Forward(i) => assert_eq!(i.ext_seq, (1 << 16) + 101),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn speaker_change_continues_sequence_and_advances_timestamp() {
        let t0 = Instant::now();
        let mut ing = Ingress::default();
        let mut out = OutStream::new(0xabc, 111, 500, 10_000);
        let mut headers = vec![];
        for i in 0..3u16 {
            if let IngressVerdict::Forward(p) = accept(
                &mut ing,
                1,
                &pkt(1000 + i, 5000 + 960 * u32::from(i), 1, b"a"),
            ) {
                headers.push(
                    out.rewrite(&p, t0 + Duration::from_millis(20 * u64::from(i)))
                        .unwrap(),
                );
            }
        }
        // B speaks 1 s later with an unrelated seq/ts space.
        let t1 = t0 + Duration::from_millis(1040);
        if let IngressVerdict::Forward(p) = accept(&mut ing, 2, &pkt(40000, 7, 2, b"b")) {
            headers.push(out.rewrite(&p, t1).unwrap());
        }
        let seqs: Vec<u16> = headers.iter().map(|h| h.seq).collect();
        assert_eq!(seqs, vec![500, 501, 502, 503]);
        assert!(headers[0].marker && !headers[1].marker && headers[3].marker);
        assert_eq!(headers[0].timestamp, 10_000);
        assert_eq!(headers[2].timestamp, 10_000 + 1920);
        // 1000 ms of wall clock since the last packet = 48 000 timestamp units.
        assert_eq!(headers[3].timestamp, 10_000 + 1920 + 48_000);
    }

    #[test]
    fn gaps_and_reordering_within_a_spurt_are_preserved() {
        let t = Instant::now();
        let mut ing = Ingress::default();
        let mut out = OutStream::new(1, 111, 0, 0);
        let mut seqs = vec![];
        for s in [10u16, 11, 13, 12, 14] {
            if let IngressVerdict::Forward(p) =
                accept(&mut ing, 1, &pkt(s, u32::from(s) * 960, 1, b"a"))
            {
                seqs.push(out.rewrite(&p, t).unwrap().seq);
            }
        }
        assert_eq!(seqs, vec![0, 1, 3, 2, 4]);
    }

    #[test]
    fn sequence_wraps_inside_a_spurt() {
        let t = Instant::now();
        let mut ing = Ingress::default();
        let mut out = OutStream::new(1, 111, 65534, 0);
        let mut seqs = vec![];
        for s in [65534u16, 65535, 0, 1] {
            if let IngressVerdict::Forward(p) = accept(&mut ing, 1, &pkt(s, 0, 1, b"a")) {
                seqs.push(out.rewrite(&p, t).unwrap().seq);
            }
        }
        assert_eq!(seqs, vec![65534, 65535, 0, 1]);
    }
}
