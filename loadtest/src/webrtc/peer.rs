//! The client side of a WebRTC member, before and outside the engine: which members use WebRTC, their
//! str0m peers and SDP offers (built before joining), and what the harness reads from the server's SDP
//! answer. One DTLS certificate serves every peer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::change::SdpPendingOffer;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::{Candidate, Rtc};

/// Which members use WebRTC: all (`webrtc`), every odd slot (`mixed`: both kinds in every channel, both
/// kinds speak), or none (`rtp`).
pub fn is_webrtc(transport: &str, slot: u16) -> bool {
    match transport {
        "webrtc" => true,
        "mixed" => slot % 2 == 1,
        _ => false,
    }
}

/// One client peer, built before joining.
pub struct ClientPeer {
    pub(super) member: u32,
    pub(super) rtc: Rtc,
    /// The offer waiting for the server's answer.
    pub(super) pending: Option<SdpPendingOffer>,
    pub(super) mid: Mid,
    pub(super) local: SocketAddr,
    /// The payload type the answer chose for Opus.
    pub(super) pt: Pt,
    /// str0m's next timeout for this peer.
    pub(super) deadline: Instant,
    pub(super) connected: bool,
    pub(super) failed: bool,
    /// The rollover counter of the schedule's extended sequence number when this peer first sent to the
    /// server. The schedule numbers a member's packets across every phase, raw ones included, but SRTP
    /// starts at ROC 0 and the receiver learns later ROCs only by seeing the wrap (RFC 3711 §3.3.1): a
    /// member whose numbers wrapped while it talked to the raw forwarder would otherwise start with
    /// ROC 1 and every packet of its burst would fail to decrypt.
    pub(super) roc_base: Option<u64>,
}

impl ClientPeer {
    /// The SRTP index for the schedule's extended sequence number `ext`: the same sequence number,
    /// counted from the rollover the peer started in.
    pub(super) fn srtp_seq(&mut self, ext: u64) -> u64 {
        srtp_seq(&mut self.roc_base, ext)
    }
}

/// [`ClientPeer::srtp_seq`] on its own: the first call fixes the rollover base.
fn srtp_seq(base: &mut Option<u64>, ext: u64) -> u64 {
    let base = *base.get_or_insert(ext & !0xffff);
    ext.saturating_sub(base)
}

/// Builds client peers for `members` (index, local address) and their SDP offers. One DTLS certificate
/// serves all of them: generating one per peer would cost the harness seconds for thousands of members.
pub fn prepare(members: &[(u32, SocketAddr)]) -> Result<(Vec<ClientPeer>, Vec<String>), String> {
    let crypto = Arc::new(str0m::crypto::from_feature_flags());
    let cert = crypto
        .dtls_provider
        .generate_certificate()
        .ok_or("cannot generate a DTLS certificate for the WebRTC members")?;
    let now = Instant::now();
    let mut peers = Vec::with_capacity(members.len());
    let mut offers = Vec::with_capacity(members.len());
    for &(member, local) in members {
        let mut rtc = Rtc::builder()
            .set_rtp_mode(true)
            .set_dtls_cert(cert.clone())
            .set_crypto_provider(crypto.clone())
            .clear_codecs()
            .enable_opus(true, false)
            .build(now);
        let cand = Candidate::host(local, "udp").map_err(|e| format!("candidate {local}: {e}"))?;
        rtc.add_local_candidate(cand);
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, pending) = api.apply().ok_or("str0m made no offer")?;
        offers.push(offer.to_sdp_string());
        peers.push(ClientPeer {
            member,
            rtc,
            pending: Some(pending),
            mid,
            local,
            pt: Pt::from(crate::stamp::PT_OPUS),
            deadline: now,
            connected: false,
            failed: false,
            roc_base: None,
        });
    }
    Ok((peers, offers))
}

/// What the harness needs from an SDP answer: the server's candidate, the SSRC and payload type of the
/// stream the member will hear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerInfo {
    pub server_addr: SocketAddr,
    pub ssrc: u32,
    pub payload_type: u8,
}

/// Reads [`AnswerInfo`] from an SDP answer (a UDP host candidate, the first `a=ssrc`, Opus's `rtpmap`).
pub fn parse_answer(sdp: &str) -> Result<AnswerInfo, String> {
    let mut server_addr = None;
    let mut ssrc = None;
    let mut payload_type = None;
    for line in sdp.lines().map(str::trim) {
        if let Some(c) = line.strip_prefix("a=candidate:") {
            // foundation component transport priority address port typ host
            let f: Vec<&str> = c.split_whitespace().collect();
            if server_addr.is_none() && f.len() >= 8 && f[2].eq_ignore_ascii_case("udp") {
                server_addr = format!("{}:{}", f[4], f[5]).parse::<SocketAddr>().ok();
            }
        } else if let Some(rest) = line.strip_prefix("a=ssrc:") {
            if ssrc.is_none() {
                ssrc = rest.split_whitespace().next().and_then(|s| s.parse().ok());
            }
        } else if let Some(rest) = line.strip_prefix("a=rtpmap:") {
            let mut it = rest.split_whitespace();
            if let (Some(pt), Some(codec)) = (it.next(), it.next()) {
                if payload_type.is_none() && codec.to_ascii_lowercase().starts_with("opus/") {
                    payload_type = pt.parse().ok();
                }
            }
        }
    }
    let server_addr = server_addr.ok_or("SDP answer without a UDP candidate")?;
    if !server_addr.ip().is_loopback() {
        return Err(format!(
            "the server's candidate is {server_addr}, not loopback; the harness only sends to 127.0.0.0/8 \
             (start the server with --announce-ip 127.0.0.1)"
        ));
    }
    Ok(AnswerInfo {
        server_addr,
        ssrc: ssrc.ok_or("SDP answer without a=ssrc for the member's stream")?,
        payload_type: payload_type.ok_or("SDP answer without Opus")?,
    })
}

/// How long to wait for every WebRTC member to connect, for `n` members.
pub fn connect_timeout(n: usize) -> Duration {
    Duration::from_secs(30 + n as u64 / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=ice-lite\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendrecv\r\n\
        a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n\
        a=ssrc:305419896 cname:x\r\n\
        a=candidate:1 1 udp 2130706431 127.0.0.1 40001 typ host\r\na=end-of-candidates\r\n";

    #[test]
    fn answers_are_read() {
        let a = parse_answer(ANSWER).unwrap();
        assert_eq!(a.server_addr, "127.0.0.1:40001".parse().unwrap());
        assert_eq!(a.ssrc, 305_419_896);
        assert_eq!(a.payload_type, 111);
        let remote = ANSWER.replace("127.0.0.1", "10.0.0.5");
        assert!(parse_answer(&remote).unwrap_err().contains("loopback"));
        let no_ssrc = ANSWER.replace("a=ssrc:305419896 cname:x\r\n", "");
        assert!(parse_answer(&no_ssrc).unwrap_err().contains("a=ssrc"));
    }

    #[test]
    fn transports_pick_members() {
        assert!(!is_webrtc("rtp", 1));
        assert!(is_webrtc("webrtc", 0));
        assert!(!is_webrtc("mixed", 0) && is_webrtc("mixed", 1));
    }

    #[test]
    fn offers_are_one_opus_audio_line_with_our_candidate() {
        let local: SocketAddr = "127.0.0.3:5000".parse().unwrap();
        let (peers, offers) = prepare(&[(7, local)]).unwrap();
        assert_eq!(peers.len(), 1);
        let o = &offers[0];
        assert_eq!(o.matches("m=audio").count(), 1, "{o}");
        assert!(!o.contains("m=video"), "{o}");
        assert!(o.to_ascii_lowercase().contains("opus/48000"), "{o}");
        assert!(o.contains("127.0.0.3 5000 typ host"), "{o}");
    }

    #[test]
    fn a_peer_starts_at_roc_zero_whatever_the_schedule_counted_before() {
        // The schedule wrapped (65,535 -> 65,536) while the member talked to the raw forwarder.
        let mut base = None;
        assert_eq!(super::srtp_seq(&mut base, 65_536 + 40), 40);
        assert_eq!(super::srtp_seq(&mut base, 65_536 + 41), 41);
        // Its own wrap later is carried on as ROC 1, as the receiver will see it.
        assert_eq!(super::srtp_seq(&mut base, 2 * 65_536 + 3), 65_536 + 3);
        // A member that starts below the wrap keeps its numbers.
        let mut base = None;
        assert_eq!(super::srtp_seq(&mut base, 65_500), 65_500);
        assert_eq!(super::srtp_seq(&mut base, 65_537), 65_537);
    }
}
