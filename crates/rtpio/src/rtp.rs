//! The one RTP/RTCP header codec: classify a datagram (RFC 7983), view an RTP packet without copying,
//! write a fixed header, an RTCP sender report or an empty receiver report.
//!
//! We parse by hand rather than with the `rtp` crate: its `Packet::unmarshal` copies the payload into a
//! fresh `Bytes` and collects header extensions into a `Vec` for every packet, and the forwarder needs
//! neither — it only needs the fixed header fields, the payload's range and the padding length, all of which
//! are offsets into the receive buffer.

use thiserror::Error;

/// Size of the fixed RTP header (RFC 3550 §5.1). Outbound headers are exactly this long: no CSRCs, no
/// extensions.
pub const HEADER_LEN: usize = 12;

/// Largest datagram the server accepts: an Ethernet MTU less IPv4 and UDP headers. Opus frames are far
/// smaller; anything larger is a misbehaving or hostile sender.
pub const MAX_DATAGRAM: usize = 1472;

/// What a datagram is, by its first bytes (RFC 7983 §7, RFC 5761 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// First byte 0–3: a STUN message (ICE connectivity check or consent).
    Stun,
    /// First byte 20–63: a DTLS record.
    Dtls,
    /// First byte 128–191 and a second byte outside 192–223: RTP (or SRTP).
    Rtp,
    /// First byte 128–191 and a second byte of 192–223: RTCP (RFC 5761 §4).
    Rtcp,
    /// Anything else, including an empty or one-byte RTP/RTCP datagram.
    Unknown,
}

/// Classifies a datagram without parsing it.
pub fn classify(data: &[u8]) -> Kind {
    match data.first() {
        Some(0..=3) => Kind::Stun,
        Some(20..=63) => Kind::Dtls,
        Some(128..=191) => match data.get(1) {
            Some(192..=223) => Kind::Rtcp,
            Some(_) => Kind::Rtp,
            None => Kind::Unknown,
        },
        _ => Kind::Unknown,
    }
}

/// Why an RTP packet was rejected. Each maps to a `dropped{reason}` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RtpError {
    /// Fewer bytes than the fixed header.
    #[error("shorter than the 12-byte RTP header")]
    TooShort,
    /// The two top bits are not `10`.
    #[error("RTP version is not 2")]
    BadVersion,
    /// The CSRC count or the extension length points past the datagram.
    #[error("CSRC list or header extension runs past the end")]
    BadHeader,
    /// The padding count is zero or longer than what follows the header.
    #[error("padding length is larger than the payload")]
    BadPadding,
}

/// A parsed RTP packet borrowing the receive buffer.
#[derive(Debug, Clone, Copy)]
pub struct RtpView<'a> {
    /// The marker bit (first packet of a talk spurt for audio, RFC 3551 §4.1).
    pub marker: bool,
    /// The 7-bit payload type.
    pub payload_type: u8,
    /// The 16-bit sequence number, as sent.
    pub seq: u16,
    /// The RTP timestamp, as sent.
    pub timestamp: u32,
    /// The synchronisation source.
    pub ssrc: u32,
    /// The payload with CSRCs, header extension and padding removed.
    pub payload: &'a [u8],
}

impl<'a> RtpView<'a> {
    /// Parses the fixed header, skips CSRCs and the extension, strips padding.
    pub fn parse(data: &'a [u8]) -> Result<Self, RtpError> {
        let offset = header_len(data)?;
        let mut end = data.len();
        if data[0] & 0x20 != 0 {
            let pad = usize::from(data[end - 1]);
            if pad == 0 || pad > end - offset {
                return Err(RtpError::BadPadding);
            }
            end -= pad;
        }
        Ok(RtpView {
            marker: data[1] & 0x80 != 0,
            payload_type: data[1] & 0x7f,
            seq: u16::from_be_bytes([data[2], data[3]]),
            timestamp: u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
            ssrc: u32::from_be_bytes([data[8], data[9], data[10], data[11]]),
            payload: &data[offset..end],
        })
    }
}

/// Length of an RTP header with its CSRCs and extension: where the payload starts (and what SRTP leaves
/// in the clear). Reads only the header, so it works on an encrypted packet too.
pub fn header_len(data: &[u8]) -> Result<usize, RtpError> {
    if data.len() < HEADER_LEN {
        return Err(RtpError::TooShort);
    }
    let b0 = data[0];
    if b0 >> 6 != 2 {
        return Err(RtpError::BadVersion);
    }
    let mut offset = HEADER_LEN + 4 * usize::from(b0 & 0x0f);
    if b0 & 0x10 != 0 {
        let ext = data.get(offset..offset + 4).ok_or(RtpError::BadHeader)?;
        offset += 4 + 4 * usize::from(u16::from_be_bytes([ext[2], ext[3]]));
    }
    if offset > data.len() {
        return Err(RtpError::BadHeader);
    }
    Ok(offset)
}

/// The fixed-header fields a forwarder or a load generator reads and writes, as a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    /// The marker bit.
    pub marker: bool,
    /// The 7-bit payload type.
    pub payload_type: u8,
    /// The sequence number.
    pub seq: u16,
    /// The RTP timestamp.
    pub timestamp: u32,
    /// The synchronisation source.
    pub ssrc: u32,
}

impl RtpHeader {
    /// Writes it as a 12-byte header (V=2, no padding, no extension, no CSRC).
    #[inline]
    pub fn write(&self, out: &mut [u8; HEADER_LEN]) {
        write_header(
            out,
            self.marker,
            self.payload_type,
            self.seq,
            self.timestamp,
            self.ssrc,
        );
    }
}

impl RtpView<'_> {
    /// The fixed-header fields as a value.
    pub fn header(&self) -> RtpHeader {
        RtpHeader {
            marker: self.marker,
            payload_type: self.payload_type,
            seq: self.seq,
            timestamp: self.timestamp,
            ssrc: self.ssrc,
        }
    }
}

/// Writes a 12-byte RTP header (V=2, no padding, no extension, no CSRC).
#[inline]
pub fn write_header(
    out: &mut [u8; HEADER_LEN],
    marker: bool,
    pt: u8,
    seq: u16,
    ts: u32,
    ssrc: u32,
) {
    out[0] = 0x80;
    out[1] = (u8::from(marker) << 7) | (pt & 0x7f);
    out[2..4].copy_from_slice(&seq.to_be_bytes());
    out[4..8].copy_from_slice(&ts.to_be_bytes());
    out[8..12].copy_from_slice(&ssrc.to_be_bytes());
}

/// Builds a packet: a header plus a payload. Allocates: for tests, the harness, the benchmarks and rare
/// paths (the relay copy of a WebRTC speaker's packet), never for the per-listener fan-out.
pub fn build_packet(marker: bool, pt: u8, seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut header = [0u8; HEADER_LEN];
    write_header(&mut header, marker, pt, seq, ts, ssrc);
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&header);
    v.extend_from_slice(payload);
    v
}

/// Length of an RTCP sender report with no report blocks (RFC 3550 §6.4.1).
pub const SR_LEN: usize = 28;

/// Writes a sender report for one outbound stream: `ntp` and `rtp_ts` name the same instant, `packets` and
/// `octets` are the stream's wrap-around counters (RFC 3550 §6.4.1).
pub fn write_sender_report(
    out: &mut [u8; SR_LEN],
    ssrc: u32,
    ntp: u64,
    rtp_ts: u32,
    packets: u32,
    octets: u32,
) {
    out[0] = 0x80; // V=2, P=0, RC=0
    out[1] = 200; // SR
    out[2..4].copy_from_slice(&6u16.to_be_bytes()); // length in 32-bit words minus one
    out[4..8].copy_from_slice(&ssrc.to_be_bytes());
    out[8..16].copy_from_slice(&ntp.to_be_bytes());
    out[16..20].copy_from_slice(&rtp_ts.to_be_bytes());
    out[20..24].copy_from_slice(&packets.to_be_bytes());
    out[24..28].copy_from_slice(&octets.to_be_bytes());
}

/// Length of an RTCP receiver report with no report blocks (RFC 3550 §6.4.2).
pub const RR_LEN: usize = 8;

/// An RTCP receiver report with no report blocks: the smallest valid RTCP packet. A listen-only plain-RTP
/// member sends it so that the server latches its address (protocol v1 "Latching").
pub fn receiver_report(ssrc: u32) -> [u8; RR_LEN] {
    let mut out = [0u8; RR_LEN];
    out[0] = 0x80; // V=2, P=0, RC=0
    out[1] = 201; // RR
    out[2..4].copy_from_slice(&1u16.to_be_bytes()); // length in 32-bit words minus one
    out[4..8].copy_from_slice(&ssrc.to_be_bytes());
    out
}

/// One report block of an RTCP sender or receiver report (RFC 3550 §6.4.1): what a receiver says of a
/// stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportBlock {
    /// The stream reported on.
    pub ssrc: u32,
    /// Fraction of its packets lost since the previous report, × 256.
    pub fraction_lost: u8,
    /// Interarrival jitter, in RTP timestamp units.
    pub jitter: u32,
}

/// Walks a (compound) RTCP packet and hands every report block of its SRs and RRs to `block`; returns
/// how many SRs and RRs it held. Peer input: lengths are checked, and malformed input ends the walk
/// (what came before it is kept) — never a panic.
pub fn report_blocks(data: &[u8], mut block: impl FnMut(ReportBlock)) -> usize {
    let mut reports = 0;
    let mut rest = data;
    while rest.len() >= 4 {
        if rest[0] >> 6 != 2 {
            break;
        }
        let count = usize::from(rest[0] & 0x1f);
        let pt = rest[1];
        let len = (usize::from(u16::from_be_bytes([rest[2], rest[3]])) + 1) * 4;
        let Some(packet) = rest.get(..len) else {
            break;
        };
        // Report blocks start after the header and the reporter's SSRC (RR), plus the sender info (SR).
        let first = match pt {
            200 => Some(28),
            201 => Some(8),
            _ => None,
        };
        if let Some(first) = first {
            reports += 1;
            for i in 0..count {
                let at = first + i * 24;
                let Some(b) = packet.get(at..at + 24) else {
                    break;
                };
                block(ReportBlock {
                    ssrc: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                    fraction_lost: b[4],
                    jitter: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
                });
            }
        }
        rest = &rest[len..];
    }
    reports
}

/// NTP timestamp (RFC 5905 64-bit format) for a Unix time.
pub fn ntp_from_unix(since_epoch: std::time::Duration) -> u64 {
    const NTP_UNIX_OFFSET: u64 = 2_208_988_800;
    let secs = since_epoch.as_secs() + NTP_UNIX_OFFSET;
    let frac = (u64::from(since_epoch.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

#[cfg(test)]
mod report_tests {
    use super::*;

    #[test]
    fn report_blocks_are_read_from_compound_rtcp_and_bad_lengths_end_the_walk() {
        // An RR with one block (fraction lost 64/256, jitter 480), then an SDES, then an RR with none.
        let mut rr = vec![0x81, 201, 0, 7, 0, 0, 0, 1];
        rr.extend_from_slice(&[
            0, 0, 0, 9, 64, 0, 0, 3, 0, 0, 1, 0, 0, 0, 1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        let sdes = [0x81, 202, 0, 1, 0, 0, 0, 1];
        let mut compound = rr.clone();
        compound.extend_from_slice(&sdes);
        compound.extend_from_slice(&receiver_report(5));
        let mut blocks = Vec::new();
        assert_eq!(report_blocks(&compound, |b| blocks.push(b)), 2);
        assert_eq!(
            blocks,
            [ReportBlock {
                ssrc: 9,
                fraction_lost: 64,
                jitter: 480
            }]
        );
        // A length past the end, a block count past the packet, garbage: no panic, nothing invented.
        let mut short = rr.clone();
        short[3] = 200;
        assert_eq!(report_blocks(&short, |_| panic!("no block")), 0);
        let mut overcount = rr[..8].to_vec();
        overcount[0] = 0x9f;
        overcount[3] = 1;
        assert_eq!(report_blocks(&overcount, |_| panic!("no block")), 1);
        assert_eq!(report_blocks(&[0xff; 3], |_| panic!("no block")), 0);
        assert_eq!(report_blocks(&[0x80, 201, 0, 0], |_| {}), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_by_first_bytes() {
        assert_eq!(classify(&[0, 1]), Kind::Stun);
        assert_eq!(classify(&[22, 254]), Kind::Dtls);
        assert_eq!(classify(&[0x80, 111]), Kind::Rtp);
        assert_eq!(classify(&[0x80, 111 | 0x80]), Kind::Rtp);
        assert_eq!(classify(&[0x81, 201]), Kind::Rtcp);
        assert_eq!(classify(&[0x80]), Kind::Unknown);
        assert_eq!(classify(&[]), Kind::Unknown);
        assert_eq!(classify(&[200, 1]), Kind::Unknown);
    }

    #[test]
    fn parse_round_trip() {
        let p = build_packet(true, 111, 65535, 0xdead_beef, 42, b"opus");
        let v = RtpView::parse(&p).unwrap();
        assert!(v.marker);
        assert_eq!(
            (v.payload_type, v.seq, v.timestamp, v.ssrc),
            (111, 65535, 0xdead_beef, 42)
        );
        assert_eq!(v.payload, b"opus");
        let mut again = [0u8; HEADER_LEN];
        v.header().write(&mut again);
        assert_eq!(again, p[..HEADER_LEN]);
    }

    #[test]
    fn parse_skips_csrc_extension_and_padding() {
        let mut p = vec![0x80 | 0x20 | 0x10 | 0x01, 111, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
        p.extend_from_slice(&[9, 9, 9, 9]); // one CSRC
        p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x10, 0xff, 0, 0]); // one-byte ext, 1 word
        p.extend_from_slice(b"abc");
        p.extend_from_slice(&[0, 0, 3]); // 3 bytes padding
        let v = RtpView::parse(&p).unwrap();
        assert_eq!(v.payload, b"abc");
    }

    #[test]
    fn parse_rejects_bad_input() {
        assert_eq!(RtpView::parse(&[0x80; 11]).unwrap_err(), RtpError::TooShort);
        let mut p = build_packet(false, 111, 1, 1, 1, b"x");
        p[0] = 0x40;
        assert_eq!(RtpView::parse(&p).unwrap_err(), RtpError::BadVersion);
        let mut p = build_packet(false, 111, 1, 1, 1, b"");
        p[0] |= 0x0f; // 15 CSRCs that are not there
        assert_eq!(RtpView::parse(&p).unwrap_err(), RtpError::BadHeader);
        let mut p = build_packet(false, 111, 1, 1, 1, b"ab");
        p[0] |= 0x20;
        *p.last_mut().unwrap() = 200;
        assert_eq!(RtpView::parse(&p).unwrap_err(), RtpError::BadPadding);
    }

    #[test]
    fn receiver_report_is_rtcp() {
        let rr = receiver_report(1);
        assert_eq!(rr, [0x80, 201, 0, 1, 0, 0, 0, 1]);
        assert_eq!(classify(&rr), Kind::Rtcp);
    }

    #[test]
    fn ntp_conversion() {
        let n = ntp_from_unix(std::time::Duration::from_millis(1500));
        assert_eq!(n >> 32, 2_208_988_801);
        assert_eq!((n & 0xffff_ffff) >> 31, 1);
    }
}
