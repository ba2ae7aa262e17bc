//! A WebRTC listener's egress context: what the shard needs to send it a forwarded packet without its
//! `Rtc` — destination, SSRC, payload type, extended sequence number (its ROC), the sender-report
//! counters, and the SRTP cipher built once from the DTLS keys.
//!
//! The listener's stream is sealed here and only here: str0m is never given a packet on that SSRC, so
//! the SRTP key never meets the same (SSRC, index) twice. Once the peer has settled
//! ([`super::settled`]) its RTCP is ours too ([`Egress::own_rtcp`]); until then str0m produces it —
//! receiver reports on the client's stream, and every ~5 s a sender report and SDES for the declared
//! listener stream — sealed with its own SRTCP index, which is private. Sending both its SRTCP and ours
//! would let the two index spaces collide under one key, and dropping its RTCP would lose the receiver
//! reports and the BYE. So every SRTCP packet str0m produces is opened with the same (server-half) key,
//! its sender report for the listener stream is corrected to what was really sent (packet and octet
//! counts, the RTP timestamp matching its NTP time — str0m's say zero), and it is sealed again with the
//! index kept here. On the wire there is one SRTCP index space per key, and the browser's remote-outbound
//! statistics and lip-sync mapping are honest.

#![warn(missing_docs)]

use std::time::Instant;

use rtpio::RawAddr;

use super::srtp::{SrtpContext, SrtpError};
use crate::forward::{extend, OutHeader, RelayCopies, OPUS_CLOCK};
use crate::rtp::{self, HEADER_LEN};

/// RTCP packet type of a sender report (RFC 3550 §6.4.1).
const RTCP_SR: u8 = 200;
/// Octets of an SR up to the end of the sender info.
const SR_SENDER_INFO_END: usize = 28;

/// One listener's sending state outside str0m.
pub struct Egress {
    srtp: SrtpContext,
    /// The key slot generation the cipher was built from (a newer one re-keys).
    pub generation: u64,
    /// Where the listener's media goes: str0m's nominated send address, learnt from its own transmits.
    pub dest: Option<RawAddr>,
    ssrc: u32,
    pt: u8,
    /// Highest extended sequence number sealed: the SRTP index (ROC * 2^16 + sequence number).
    ext_seq: Option<u64>,
    packets: u32,
    octets: u32,
    last_ts: u32,
    last_sent: Option<Instant>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("ssrc", &self.ssrc)
            .field("dest", &self.dest.map(|d| d.to_socket_addr()))
            .field("ext_seq", &self.ext_seq)
            .field("srtp", &self.srtp)
            .finish_non_exhaustive()
    }
}

impl Egress {
    /// A context for the listener stream `ssrc` with payload type `pt`.
    pub fn new(srtp: SrtpContext, generation: u64, ssrc: u32, pt: u8) -> Self {
        Egress {
            srtp,
            generation,
            dest: None,
            ssrc,
            pt,
            ext_seq: None,
            packets: 0,
            octets: 0,
            last_ts: 0,
            last_sent: None,
        }
    }

    /// New keys from a new DTLS handshake: the stream (SSRC, sequence, counters) goes on, under the new
    /// key, with a fresh SRTCP index.
    pub fn rekey(&mut self, srtp: SrtpContext, generation: u64) {
        self.srtp = srtp;
        self.generation = generation;
    }

    /// Starts loading the SRTP key into the cache ([`SrtpContext::prefetch`]).
    #[inline]
    pub fn prefetch(&self) {
        self.srtp.prefetch();
    }

    /// The extended sequence number of the last packet sealed (its ROC is `>> 16`).
    pub fn ext_seq(&self) -> Option<u64> {
        self.ext_seq
    }

    /// Seals one listener packet (rewritten header `h`, the speaker's payload) into `out`, addressed to
    /// the listener. False when there is no destination yet.
    #[inline]
    pub fn seal(
        &mut self,
        h: OutHeader,
        payload: &[u8],
        now: Instant,
        out: &mut RelayCopies,
    ) -> bool {
        let Some(dest) = self.dest else {
            return false;
        };
        let ext = match self.ext_seq {
            None => u64::from(h.seq),
            Some(prev) => extend(prev, h.seq),
        };
        if self.ext_seq.is_none_or(|prev| ext > prev) {
            self.ext_seq = Some(ext);
            self.last_ts = h.timestamp;
            self.last_sent = Some(now);
        }
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(payload.len() as u32);
        let (srtp, ssrc, pt) = (&self.srtp, self.ssrc, self.pt);
        out.push(std::slice::from_ref(&dest), |buf| {
            let start = buf.len();
            let mut header = [0u8; HEADER_LEN];
            rtp::write_header(&mut header, h.marker, pt, h.seq, h.timestamp, ssrc);
            buf.extend_from_slice(&header);
            buf.extend_from_slice(payload);
            srtp.seal_rtp(buf, start, HEADER_LEN, ssrc, ext);
        });
        true
    }

    /// str0m's SRTCP packet, re-sealed with this context's index after its sender report for the
    /// listener stream was made honest (see the module documentation).
    pub fn reseal_rtcp(&mut self, packet: &[u8], now: Instant) -> Result<Vec<u8>, SrtpError> {
        let mut plain = self.srtp.open_rtcp(packet)?;
        self.patch_sender_report(&mut plain, now);
        self.srtp.seal_rtcp(&plain)
    }

    /// The listener stream's SSRC.
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// The RTCP a settled peer's server sends on the listener stream, sealed: a sender report (once
    /// something was sent; RFC 3550 §6.4.1), an SDES CNAME when the answer named one, and a BYE when
    /// `bye`. `None` when there is nothing to say.
    pub fn own_rtcp(&mut self, now: Instant, cname: Option<&str>, bye: bool) -> Option<Vec<u8>> {
        let mut plain = Vec::with_capacity(96);
        if self.packets > 0 {
            let mut sr = [0u8; rtp::SR_LEN];
            rtp::write_sender_report(
                &mut sr,
                self.ssrc,
                ntp_at(now),
                self.timestamp_at(now),
                self.packets,
                self.octets,
            );
            plain.extend_from_slice(&sr);
        } else if bye {
            // A BYE must follow a report (RFC 3550 §6.1): an empty receiver report.
            plain.extend_from_slice(&rtp::receiver_report(self.ssrc));
        } else {
            return None;
        }
        if let Some(cname) = cname.filter(|c| c.len() <= 255) {
            // One chunk: SSRC, CNAME item, end of list, padded to a word.
            let items = 2 + cname.len() + 1;
            let chunk = 4 + items.div_ceil(4) * 4;
            let words = (4 + chunk) / 4 - 1;
            plain.extend_from_slice(&[0x81, 202]);
            plain.extend_from_slice(&(words as u16).to_be_bytes());
            plain.extend_from_slice(&self.ssrc.to_be_bytes());
            plain.extend_from_slice(&[1, cname.len() as u8]);
            plain.extend_from_slice(cname.as_bytes());
            plain.resize(plain.len() + (chunk - 4 - 2 - cname.len()), 0);
        }
        if bye {
            plain.extend_from_slice(&[0x81, 203, 0, 1]);
            plain.extend_from_slice(&self.ssrc.to_be_bytes());
        }
        self.srtp.seal_rtcp(&plain).ok()
    }

    /// Walks a compound RTCP packet and rewrites the sender info of the SR on the listener's SSRC.
    fn patch_sender_report(&self, compound: &mut [u8], now: Instant) {
        let mut at = 0;
        while at + 8 <= compound.len() {
            let len =
                (usize::from(u16::from_be_bytes([compound[at + 2], compound[at + 3]])) + 1) * 4;
            let Some(p) = compound.get_mut(at..at + len) else {
                return;
            };
            if p[1] == RTCP_SR
                && p.len() >= SR_SENDER_INFO_END
                && u32::from_be_bytes([p[4], p[5], p[6], p[7]]) == self.ssrc
            {
                p[16..20].copy_from_slice(&self.timestamp_at(now).to_be_bytes());
                p[20..24].copy_from_slice(&self.packets.to_be_bytes());
                p[24..28].copy_from_slice(&self.octets.to_be_bytes());
            }
            at += len;
        }
    }

    /// The stream's RTP timestamp at `now` (the last packet's, advanced by the time since).
    fn timestamp_at(&self, now: Instant) -> u32 {
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

/// The NTP time (RFC 5905) of `now`: the wall clock is read once per process and advanced by the
/// monotonic clock, so the core stays fed by `Instant`s and its reports by one time base.
fn ntp_at(now: Instant) -> u64 {
    static ANCHOR: std::sync::OnceLock<(Instant, std::time::Duration)> = std::sync::OnceLock::new();
    let (at, unix) = *ANCHOR.get_or_init(|| {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (Instant::now(), unix)
    });
    let since = if now >= at {
        unix + (now - at)
    } else {
        unix.saturating_sub(at - now)
    };
    rtp::ntp_from_unix(since)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::srtp::{master_half, Profile};
    use webrtc::srtp::context::Context;
    use webrtc::srtp::protection_profile::ProtectionProfile;

    fn material(seed: u8) -> Vec<u8> {
        (0..88u8)
            .map(|i| i.wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn context(material: &[u8]) -> Context {
        let (k, s) = master_half(Profile::AeadAes256Gcm, material, false).unwrap();
        Context::new(k, s, ProtectionProfile::AeadAes256Gcm, None, None).unwrap()
    }

    fn egress(material: &[u8]) -> Egress {
        let srtp = SrtpContext::from_material(Profile::AeadAes256Gcm, material, false).unwrap();
        let mut e = Egress::new(srtp, 1, 0xabcd, 111);
        e.dest = Some(RawAddr::new("127.0.0.1:9".parse().unwrap()));
        e
    }

    fn seal_one(e: &mut Egress, seq: u16, now: Instant) -> Vec<u8> {
        let mut out = RelayCopies::default();
        let h = OutHeader {
            seq,
            timestamp: u32::from(seq) * 960,
            marker: false,
        };
        assert!(e.seal(h, b"opus!", now, &mut out));
        out.get(0).0.to_vec()
    }

    /// A new DTLS handshake re-keys: what follows is sealed with the new key, the stream goes on.
    #[test]
    fn a_new_handshake_rekeys_and_the_stream_goes_on() {
        let (a, b) = (material(1), material(2));
        let now = Instant::now();
        let mut e = egress(&a);
        let (mut rx_a, mut rx_b) = (context(&a), context(&b));
        assert!(rx_a.decrypt_rtp(&seal_one(&mut e, 10, now)).is_ok());
        e.rekey(
            SrtpContext::from_material(Profile::AeadAes256Gcm, &b, false).unwrap(),
            2,
        );
        let p = seal_one(&mut e, 11, now);
        assert!(
            rx_a.decrypt_rtp(&p).is_err(),
            "the old key no longer opens it"
        );
        assert_eq!(rx_b.decrypt_rtp(&p).unwrap()[12..], b"opus!"[..]);
        assert_eq!(e.ext_seq(), Some(11));
    }

    /// str0m's SRTCP (its own index 5) comes out under the egress's index, its SR on the listener's SSRC
    /// counting what was sealed, everything else untouched.
    #[test]
    fn str0m_rtcp_is_resealed_with_an_honest_sender_report() {
        let m = material(3);
        let t0 = Instant::now();
        let mut e = egress(&m);
        for seq in 0..7 {
            seal_one(&mut e, seq, t0);
        }
        // SR (ssrc 0xabcd, NTP, RTP ts 0, counts 0) + SDES, as str0m writes it.
        let mut plain = vec![0x80, 200, 0, 6, 0, 0, 0xab, 0xcd];
        plain.extend_from_slice(&[0x11; 8]);
        plain.extend_from_slice(&[0; 12]);
        plain.extend_from_slice(&[0x81, 202, 0, 2, 0, 0, 0xab, 0xcd, 1, 2, b'x', 0]);
        let mut str0m = SrtpContext::from_material(Profile::AeadAes256Gcm, &m, false).unwrap();
        for _ in 0..5 {
            str0m.seal_rtcp(&plain).unwrap();
        }
        let theirs = str0m.seal_rtcp(&plain).unwrap();
        let ours = e
            .reseal_rtcp(&theirs, t0 + std::time::Duration::from_millis(100))
            .unwrap();
        assert_eq!(
            ours[ours.len() - 4..],
            [0x80, 0, 0, 0],
            "our index 0, encrypted"
        );
        let opened = context(&m).decrypt_rtcp(&ours).unwrap();
        assert_eq!(opened[..16], plain[..16], "header, SSRC and NTP kept");
        let word = |i: usize| u32::from_be_bytes(opened[i..i + 4].try_into().unwrap());
        assert_eq!(
            word(16),
            6 * 960 + 4800,
            "the timestamp of the last packet + 100 ms"
        );
        assert_eq!((word(20), word(24)), (7, 35), "7 packets of 5 octets");
        assert_eq!(opened[28..], plain[28..], "SDES untouched");
    }

    /// A settled peer's own RTCP: SR (honest counts) + SDES CNAME, and + BYE on leave; it opens with the
    /// listener's key and parses as valid compound RTCP (webrtc-rs), under one SRTCP index space.
    #[test]
    fn own_rtcp_is_a_valid_compound_packet() {
        let m = material(4);
        let t0 = Instant::now();
        let mut e = egress(&m);
        assert!(
            e.own_rtcp(t0, Some("x"), false).is_none(),
            "nothing sent yet"
        );
        for seq in 0..3 {
            seal_one(&mut e, seq, t0);
        }
        let mut rx = context(&m);
        for (i, bye) in [false, true].into_iter().enumerate() {
            let sealed = e.own_rtcp(t0, Some("cname-1234"), bye).unwrap();
            assert_eq!(
                sealed[sealed.len() - 4..],
                [0x80, 0, 0, i as u8],
                "index {i}"
            );
            let plain = rx.decrypt_rtcp(&sealed).unwrap();
            let packets = webrtc::rtcp::packet::unmarshal(&mut plain.clone()).unwrap();
            let types: Vec<_> = packets
                .iter()
                .map(|p| p.header().packet_type as u8)
                .collect();
            assert_eq!(
                types,
                if bye {
                    vec![200, 202, 203]
                } else {
                    vec![200, 202]
                }
            );
            let word = |i: usize| u32::from_be_bytes(plain[i..i + 4].try_into().unwrap());
            assert_eq!((word(20), word(24)), (3, 15), "3 packets of 5 octets");
        }
    }
}
