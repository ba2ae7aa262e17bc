//! A settled WebRTC peer ([`Settled`]: served without its str0m `Rtc`) fed any datagrams from its
//! client's address: STUN consent checks, SRTP, SRTCP, DTLS, garbage. The keys are fixed, so an input
//! that is a packet sealed with them (the corpus has some) reaches the paths behind authentication.
//!
//! Beyond "no panic": nothing unauthenticated comes out — a media event only for an RTP datagram that
//! opened, its payload no longer than the datagram; a report only on the listener's SSRC; an answer
//! only to the datagram's source.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use talkgroup::peer::egress::Egress;
use talkgroup::peer::ingress::Ingress;
use talkgroup::peer::settled::Settled;
use talkgroup::peer::srtp::{Profile, SrtpContext};
use talkgroup::peer::webrtc::PeerEvent;
use talkgroup::shard::udp::RawAddr;

const LISTENER_SSRC: u32 = 0x5e77_1ed0;

fuzz_target!(|data: &[u8]| {
    let material: Vec<u8> = (0..88u8).collect();
    let profile = match data.first().map(|b| b % 3) {
        Some(0) => Profile::Aes128CmSha1_80,
        Some(1) => Profile::AeadAes128Gcm,
        _ => Profile::AeadAes256Gcm,
    };
    let material = &material[..2 * (profile.key_len() + profile.salt_len())];
    let (Ok(rx), Ok(tx)) = (
        SrtpContext::from_material(profile, material, true),
        SrtpContext::from_material(profile, material, false),
    ) else {
        return;
    };
    let now = Instant::now();
    let src: SocketAddr = "127.0.0.1:5000".parse().expect("address");
    let mut egress = Egress::new(tx, 1, LISTENER_SSRC, 111);
    egress.dest = Some(RawAddr::new(src));
    let mut peer = Settled::new("fuzzfuzzfuzzfuzzfuzzfuzz".into(), Ingress::new(rx), None, now);
    let (mut out, mut events) = (Vec::new(), Vec::new());
    // The input, and its halves, as datagrams (a replay and a split are both interesting).
    let rest = data.get(1..).unwrap_or_default();
    let half = rest.len() / 2;
    for (i, datagram) in [rest, &rest[..half], &rest[half..], rest].into_iter().enumerate() {
        let at = now + Duration::from_millis(20 * i as u64);
        let before = events.len();
        let accepted = peer.handle_receive(at, src, datagram, &mut egress, &mut out, &mut events);
        for e in &events[before..] {
            assert!(accepted, "an event from a refused datagram");
            match e {
                PeerEvent::Media(m) => assert!(m.payload.len() <= datagram.len()),
                PeerEvent::Report { .. } | PeerEvent::Connected | PeerEvent::Closed(_) => {}
            }
        }
        for (_, to) in &out {
            assert_eq!(to.to_socket_addr(), src, "answers go back to the source");
        }
        out.clear();
        let _ = peer.handle_timeout(at + Duration::from_secs(2), &mut egress, &mut out);
        out.clear();
    }
});
