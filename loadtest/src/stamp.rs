//! What the harness puts on the wire: a minimal RTP header, and a stamp in the first bytes of the payload.
//!
//! The stamp carries the packet's *scheduled* send time, not the time the syscall happened: if the sender
//! falls behind, the delay is charged to the measured latency instead of silently thinning the samples
//! (coordinated omission). The server forwards payload bytes unchanged (protocol v1), so the stamp arrives
//! intact at every listener; the rest of the payload is filler of a realistic Opus size.

/// Marks a harness payload, so stray packets are recognised and not mistaken for samples.
pub const MAGIC: [u8; 4] = *b"TGLT";
/// Bytes of the stamp at the start of the payload.
pub const STAMP_LEN: usize = 28;
/// Length of a fixed RTP header without CSRCs or extensions.
pub const RTP_HEADER_LEN: usize = 12;
/// Opus payload type used by protocol v1 for plain RTP.
pub const PT_OPUS: u8 = 111;

/// The fields the harness stamps into each payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Channel index within the run.
    pub channel: u32,
    /// Member slot of the speaker within its channel (to spot a packet echoed back to its sender).
    pub speaker: u16,
    /// Talk-spurt number within the channel, +1 on every grant: a listener seeing a new one has seen the
    /// first packet of a new speaker (speaker-switch latency).
    pub spurt: u32,
    /// Packet number within the spurt.
    pub seq: u32,
    /// Scheduled send time, `CLOCK_MONOTONIC` ns.
    pub sched_ns: u64,
}

impl Stamp {
    /// Write the stamp into `buf[..STAMP_LEN]`.
    pub fn write(&self, buf: &mut [u8]) {
        buf[0..4].copy_from_slice(&MAGIC);
        buf[4..8].copy_from_slice(&self.channel.to_be_bytes());
        buf[8..10].copy_from_slice(&self.speaker.to_be_bytes());
        buf[10..12].copy_from_slice(&[0, 0]);
        buf[12..16].copy_from_slice(&self.spurt.to_be_bytes());
        buf[16..20].copy_from_slice(&self.seq.to_be_bytes());
        buf[20..28].copy_from_slice(&self.sched_ns.to_be_bytes());
    }

    /// Read a stamp from a payload; `None` when too short or not ours.
    pub fn parse(payload: &[u8]) -> Option<Stamp> {
        if payload.len() < STAMP_LEN || payload[0..4] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| {
            u32::from_be_bytes([payload[i], payload[i + 1], payload[i + 2], payload[i + 3]])
        };
        let mut ns = [0u8; 8];
        ns.copy_from_slice(&payload[20..28]);
        Some(Stamp {
            channel: u32_at(4),
            speaker: u16::from_be_bytes([payload[8], payload[9]]),
            spurt: u32_at(12),
            seq: u32_at(16),
            sched_ns: u64::from_be_bytes(ns),
        })
    }
}

/// The RTP header fields the harness reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    pub marker: bool,
    pub payload_type: u8,
    pub seq: u16,
    pub timestamp: u32,
    pub ssrc: u32,
}

impl RtpHeader {
    /// Write a 12-byte header (V=2, no padding, no extension, no CSRC).
    pub fn write(&self, buf: &mut [u8]) {
        buf[0] = 0x80;
        buf[1] = (self.payload_type & 0x7f) | if self.marker { 0x80 } else { 0 };
        buf[2..4].copy_from_slice(&self.seq.to_be_bytes());
        buf[4..8].copy_from_slice(&self.timestamp.to_be_bytes());
        buf[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
    }
}

/// What a received datagram is.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram<'a> {
    Rtp {
        header: RtpHeader,
        payload: &'a [u8],
    },
    /// RTCP (the server's sender reports): counted, never a sample.
    Rtcp,
    Other,
}

/// Classify and parse a datagram (RFC 7983 / RFC 5761 §4: version 2, second byte 192–223 is RTCP).
/// Handles CSRCs, a header extension and padding so that a server that forwards them is still measured.
pub fn parse_datagram(buf: &[u8]) -> Datagram<'_> {
    if buf.len() < RTP_HEADER_LEN || buf[0] >> 6 != 2 {
        return Datagram::Other;
    }
    if (192..=223).contains(&buf[1]) {
        return Datagram::Rtcp;
    }
    let cc = (buf[0] & 0x0f) as usize;
    let mut off = RTP_HEADER_LEN + 4 * cc;
    if buf[0] & 0x10 != 0 {
        if buf.len() < off + 4 {
            return Datagram::Other;
        }
        let words = u16::from_be_bytes([buf[off + 2], buf[off + 3]]) as usize;
        off += 4 + 4 * words;
    }
    let mut end = buf.len();
    if buf[0] & 0x20 != 0 {
        let pad = buf[end - 1] as usize;
        if pad == 0 || pad > end {
            return Datagram::Other;
        }
        end -= pad;
    }
    if off > end {
        return Datagram::Other;
    }
    Datagram::Rtp {
        header: RtpHeader {
            marker: buf[1] & 0x80 != 0,
            payload_type: buf[1] & 0x7f,
            seq: u16::from_be_bytes([buf[2], buf[3]]),
            timestamp: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            ssrc: u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
        },
        payload: &buf[off..end],
    }
}

/// An RTCP receiver report with no report blocks (8 bytes): what a listen-only member sends to latch its
/// address at the server (protocol v1 "Latching").
pub fn rtcp_keepalive(ssrc: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = 0x80; // V=2, RC=0
    b[1] = 201; // RR
    b[2..4].copy_from_slice(&1u16.to_be_bytes()); // length in words minus one
    b[4..8].copy_from_slice(&ssrc.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_roundtrip() {
        let s = Stamp {
            channel: 9_999,
            speaker: 1_999,
            spurt: 0xdead_beef,
            seq: 42,
            sched_ns: 0x0123_4567_89ab_cdef,
        };
        let mut buf = [0u8; 100];
        s.write(&mut buf);
        assert_eq!(Stamp::parse(&buf), Some(s));
        assert_eq!(Stamp::parse(&buf[..STAMP_LEN]), Some(s));
    }

    #[test]
    fn stamp_rejects_short_and_foreign() {
        let mut buf = [0u8; 64];
        Stamp {
            channel: 1,
            speaker: 0,
            spurt: 1,
            seq: 1,
            sched_ns: 1,
        }
        .write(&mut buf);
        assert!(Stamp::parse(&buf[..STAMP_LEN - 1]).is_none());
        buf[0] = b'X';
        assert!(Stamp::parse(&buf).is_none());
        assert!(Stamp::parse(&[]).is_none());
    }

    #[test]
    fn rtp_roundtrip_with_stamp() {
        let mut pkt = vec![0u8; RTP_HEADER_LEN + 80];
        let h = RtpHeader {
            marker: true,
            payload_type: PT_OPUS,
            seq: 65_535,
            timestamp: 960 * 7,
            ssrc: 0x1234_5678,
        };
        h.write(&mut pkt);
        let st = Stamp {
            channel: 3,
            speaker: 2,
            spurt: 5,
            seq: 6,
            sched_ns: 7,
        };
        st.write(&mut pkt[RTP_HEADER_LEN..]);
        match parse_datagram(&pkt) {
            Datagram::Rtp { header, payload } => {
                assert_eq!(header, h);
                assert_eq!(payload.len(), 80);
                assert_eq!(Stamp::parse(payload), Some(st));
            }
            other => panic!("not rtp: {other:?}"),
        }
    }

    #[test]
    fn rtp_with_csrc_extension_and_padding() {
        // V=2, P=1, X=1, CC=1
        let mut pkt = vec![0xb1, 111, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
        pkt.extend_from_slice(&[9, 9, 9, 9]); // CSRC
        pkt.extend_from_slice(&[0xbe, 0xde, 0, 1, 1, 2, 3, 4]); // extension, one word
        pkt.extend_from_slice(&[b'p'; 30]);
        pkt.extend_from_slice(&[0, 0, 3]); // 3 bytes padding
        match parse_datagram(&pkt) {
            Datagram::Rtp { payload, .. } => assert_eq!(payload, &[b'p'; 30][..]),
            other => panic!("not rtp: {other:?}"),
        }
    }

    #[test]
    fn rtcp_and_garbage_are_classified() {
        assert_eq!(parse_datagram(&rtcp_keepalive(7)), Datagram::Other); // 8 bytes < RTP header
        let mut sr = [0u8; 28];
        sr[0] = 0x80;
        sr[1] = 200;
        assert_eq!(parse_datagram(&sr), Datagram::Rtcp);
        assert_eq!(parse_datagram(&[0u8; 20]), Datagram::Other);
        // Padding longer than the packet.
        let mut bad = [0u8; 12];
        bad[0] = 0xa0;
        bad[11] = 200;
        assert_eq!(parse_datagram(&bad), Datagram::Other);
    }
}
