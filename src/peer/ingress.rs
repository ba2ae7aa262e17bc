//! A WebRTC member's inbound SRTP outside str0m: what a settled peer ([`super::settled`]) needs to open
//! the packets its client sends — the client half of the DTLS keying material, the rollover counter of
//! the client's stream (RFC 3711 §3.3.1, Appendix A) and a replay window (§3.3.2).
//!
//! A client sends one audio stream (no RTX, no FEC stream: see [`super::webrtc`]); a packet on another
//! SSRC starts its index estimate afresh, so a client that restarts its track keeps being heard.

#![warn(missing_docs)]

use super::srtp::{SrtpContext, SrtpError};
use crate::rtp;

/// Packets behind the highest index still accepted once (RFC 3711 §3.3.2 asks for at least 64).
const REPLAY_WINDOW: u64 = 64;

/// The client's stream as the server has received it.
#[derive(Debug, Clone, Copy)]
struct StreamState {
    ssrc: u32,
    /// Highest SRTP index authenticated (ROC * 2^16 + sequence number).
    highest: u64,
    /// Bit `i` set: index `highest - i` was received.
    seen: u64,
}

/// Opens what one client sends: SRTP (with index estimation and replay protection) and SRTCP.
pub struct Ingress {
    srtp: SrtpContext,
    stream: Option<StreamState>,
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("srtp", &self.srtp)
            .field("stream", &self.stream)
            .finish()
    }
}

impl Ingress {
    /// A context for the client's half of the keys.
    pub fn new(srtp: SrtpContext) -> Self {
        Ingress { srtp, stream: None }
    }

    /// Opens one SRTP packet into `out` (the plain packet: header, payload). Refused when malformed,
    /// not authentic, or a replay of a packet already opened.
    pub fn open_rtp(&mut self, packet: &[u8], out: &mut Vec<u8>) -> Result<(), SrtpError> {
        let header_len = rtp::header_len(packet).map_err(|_| SrtpError::Rtp)?;
        let seq = u16::from_be_bytes([packet[2], packet[3]]);
        let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        let state = self.stream.filter(|s| s.ssrc == ssrc);
        let index = match state {
            Some(s) => estimate(s.highest, seq),
            None => u64::from(seq),
        };
        if let Some(s) = state {
            if index <= s.highest {
                let behind = s.highest - index;
                if behind >= REPLAY_WINDOW || s.seen & (1 << behind) != 0 {
                    return Err(SrtpError::Rtp);
                }
            }
        }
        self.srtp.open_rtp(packet, header_len, ssrc, index, out)?;
        // Only an authentic packet moves the window (a forgery must not shift it).
        self.stream = Some(match state {
            None => StreamState {
                ssrc,
                highest: index,
                seen: 1,
            },
            Some(s) if index > s.highest => {
                let shift = index - s.highest;
                StreamState {
                    ssrc,
                    highest: index,
                    seen: if shift >= 64 {
                        1
                    } else {
                        (s.seen << shift) | 1
                    },
                }
            }
            Some(s) => StreamState {
                seen: s.seen | (1 << (s.highest - index)),
                ..s
            },
        });
        Ok(())
    }

    /// Opens one SRTCP packet: the plain compound packet. SRTCP replays are not tracked: what a client's
    /// RTCP says only feeds the listener statistics, and a replayed report changes nothing else.
    pub fn open_rtcp(&self, packet: &[u8]) -> Result<Vec<u8>, SrtpError> {
        self.srtp.open_rtcp(packet)
    }

    /// The highest SRTP index opened so far on the client's stream (tests read its ROC).
    pub fn highest_index(&self) -> Option<u64> {
        self.stream.map(|s| s.highest)
    }
}

/// The index of a packet with sequence number `seq`, given the highest index received (RFC 3711 Appendix
/// A): the ROC of the highest, or one more or less when `seq` is more than half the space away.
fn estimate(highest: u64, seq: u16) -> u64 {
    let roc = highest >> 16;
    let s_l = highest as u16;
    let v = if s_l < 0x8000 {
        if seq > s_l && seq - s_l > 0x8000 {
            // A late packet from the previous ROC; before the first wrap there is none: ROC 0.
            roc.saturating_sub(1)
        } else {
            roc
        }
    } else if s_l - 0x8000 > seq {
        roc + 1
    } else {
        roc
    };
    ((v & 0xffff_ffff) << 16) | u64::from(seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::srtp::{master_half, Profile};
    use webrtc::srtp::context::Context;
    use webrtc::srtp::protection_profile::ProtectionProfile;

    fn material() -> Vec<u8> {
        (0..88u8)
            .map(|i| i.wrapping_mul(13).wrapping_add(5))
            .collect()
    }

    /// webrtc-rs seals as the client (client half), the ingress opens with the same half.
    fn pair(profile: Profile, wp: ProtectionProfile) -> (Context, Ingress) {
        let m: Vec<u8> = material()[..2 * (profile.key_len() + profile.salt_len())].to_vec();
        let (k, s) = master_half(profile, &m, true).unwrap();
        let client = Context::new(k, s, wp, None, None).unwrap();
        let ingress = Ingress::new(SrtpContext::from_material(profile, &m, true).unwrap());
        (client, ingress)
    }

    fn packet(seq: u16, ext: bool) -> Vec<u8> {
        let mut p = vec![0x80, 111];
        if ext {
            p[0] |= 0x10;
        }
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&(u32::from(seq) * 960).to_be_bytes());
        p.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        if ext {
            // One-byte header extension: audio level (id 1), padded to a word.
            p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x10, 0x7f, 0, 0]);
        }
        p.extend_from_slice(format!("opus frame {seq}").as_bytes());
        p
    }

    /// Every profile, across a sequence-number wrap (the ROC goes to 1), with an extension header.
    #[test]
    fn opens_what_webrtc_rs_seals_across_a_wrap() {
        for (profile, wp) in [
            (
                Profile::Aes128CmSha1_80,
                ProtectionProfile::Aes128CmHmacSha1_80,
            ),
            (Profile::AeadAes128Gcm, ProtectionProfile::AeadAes128Gcm),
            (Profile::AeadAes256Gcm, ProtectionProfile::AeadAes256Gcm),
        ] {
            let (mut client, mut ingress) = pair(profile, wp);
            let mut out = Vec::new();
            for i in 0..20u16 {
                let seq = 65_530u16.wrapping_add(i);
                let plain = packet(seq, i % 2 == 0);
                let sealed = client.encrypt_rtp(&plain).unwrap();
                ingress
                    .open_rtp(&sealed, &mut out)
                    .unwrap_or_else(|e| panic!("{profile:?} seq {seq}: {e}"));
                assert_eq!(out, plain, "{profile:?} seq {seq}");
            }
            assert_eq!(ingress.highest_index(), Some((1 << 16) + 13), "{profile:?}");
        }
    }

    /// A replay, a packet older than the window, and a tampered packet are refused; a late packet within
    /// the window is opened once.
    #[test]
    fn replays_old_and_forged_packets_are_refused() {
        let (mut client, mut ingress) =
            pair(Profile::AeadAes128Gcm, ProtectionProfile::AeadAes128Gcm);
        let mut out = Vec::new();
        let sealed: Vec<Vec<u8>> = (0..100u16)
            .map(|s| client.encrypt_rtp(&packet(s, false)).unwrap().to_vec())
            .collect();
        ingress.open_rtp(&sealed[0], &mut out).unwrap();
        ingress.open_rtp(&sealed[90], &mut out).unwrap();
        assert!(ingress.open_rtp(&sealed[90], &mut out).is_err(), "replay");
        assert!(
            ingress.open_rtp(&sealed[0], &mut out).is_err(),
            "old replay"
        );
        assert!(
            ingress.open_rtp(&sealed[10], &mut out).is_err(),
            "behind the window"
        );
        ingress.open_rtp(&sealed[40], &mut out).unwrap();
        assert!(
            ingress.open_rtp(&sealed[40], &mut out).is_err(),
            "late, then replayed"
        );
        let mut forged = sealed[95].clone();
        forged[14] ^= 1;
        assert!(ingress.open_rtp(&forged, &mut out).is_err(), "forged");
        ingress.open_rtp(&sealed[95], &mut out).unwrap();
        assert!(
            ingress.open_rtp(&[0x80, 1, 2], &mut out).is_err(),
            "too short"
        );
    }

    #[test]
    fn index_estimate_follows_rfc3711_appendix_a() {
        assert_eq!(estimate(5, 6), 6);
        assert_eq!(estimate(65_535, 0), 1 << 16);
        assert_eq!(
            estimate((1 << 16) + 2, 65_534),
            65_534,
            "late packet from before the wrap"
        );
        assert_eq!(
            estimate(100, 65_000),
            65_000,
            "no ROC -1 before the first wrap"
        );
        assert_eq!(rtp::header_len(&packet(1, true)), Ok(20));
        assert!(
            rtp::header_len(&[0x9f; 12]).is_err(),
            "15 CSRCs announced, none there"
        );
    }
}
