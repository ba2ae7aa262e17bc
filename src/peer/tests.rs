//! A server-side [`WebRtcPeer`] against an in-memory str0m client, in virtual time: no sockets, no sleeps.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::rtcp::Rtcp;
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Input, Output, Rtc};

use super::webrtc::{PeerEvent, WebRtcConfig, WebRtcPeer, CONNECT_TIMEOUT};
use super::Peers;
use crate::forward::{OutHeader, RelayCopies};
use crate::rtp::Kind;

const SERVER: &str = "127.0.0.1:40000";
const CLIENT: &str = "127.0.0.2:5000";

struct Pair {
    peer: WebRtcPeer,
    client: Rtc,
    now: Instant,
    events: Vec<PeerEvent>,
    heard: usize,
    /// Sender reports the client received on the listener stream: (packets, octets).
    reports: Vec<(u32, u32)>,
    /// The client finished DTLS too (the server finishes first: its last flight is still on the way).
    client_connected: bool,
    /// The client's ICE agent gave the server up (its consent checks went unanswered).
    client_disconnected: bool,
    mid: Mid,
}

impl Pair {
    fn new() -> Pair {
        let config = WebRtcConfig::generate(SERVER.parse().unwrap()).unwrap();
        let now = Instant::now();
        let mut client = Rtc::builder()
            .set_rtp_mode(true)
            .enable_raw_packets(true)
            .set_crypto_provider(config.crypto.clone())
            .build(now);
        client.add_local_candidate(Candidate::host(CLIENT.parse().unwrap(), "udp").unwrap());
        let mut api = client.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let (peer, answer) =
            WebRtcPeer::accept(&config, offer, "testufragtestufr".into(), now, &mut rng).unwrap();
        assert!(
            answer.contains("a=ice-lite") && answer.contains("useinbandfec=1"),
            "{answer}"
        );
        assert!(
            !answer.contains("transport-cc")
                && !answer.contains("nack")
                && !answer.contains("abs-send-time")
        );
        client
            .sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
            .unwrap();
        Pair {
            peer,
            client,
            now,
            events: vec![],
            heard: 0,
            reports: vec![],
            client_connected: false,
            client_disconnected: false,
            mid,
        }
    }

    /// Advances 10 ms; `link` false drops everything in both directions.
    fn step(&mut self, link: bool) {
        let server: SocketAddr = SERVER.parse().unwrap();
        self.now += Duration::from_millis(10);
        let mut out = vec![];
        self.client.handle_input(Input::Timeout(self.now)).unwrap();
        while let Ok(o) = self.client.poll_output() {
            match o {
                Output::Timeout(_) => break,
                Output::Transmit(t) if link => {
                    self.peer.handle_receive(
                        self.now,
                        t.source,
                        &t.contents,
                        &mut out,
                        &mut self.events,
                    );
                }
                Output::Event(str0m::Event::RtpPacket(_)) => self.heard += 1,
                Output::Event(str0m::Event::Connected) => self.client_connected = true,
                Output::Event(str0m::Event::IceConnectionStateChange(
                    str0m::IceConnectionState::Disconnected,
                )) => self.client_disconnected = true,
                Output::Event(str0m::Event::RawPacket(raw)) => {
                    if let str0m::rtp::RawPacket::RtcpRx(Rtcp::SenderReport(sr)) = *raw {
                        let i = sr.sender_info;
                        self.reports
                            .push((i.sender_packet_count, i.sender_octet_count));
                    }
                }
                _ => {}
            }
        }
        self.peer
            .handle_timeout(self.now, &mut out, &mut self.events);
        for (data, to) in out.drain(..) {
            if link {
                let r = Receive::new(Protocol::Udp, server, to.to_socket_addr(), &data).unwrap();
                let _ = self.client.handle_input(Input::Receive(self.now, r));
            }
        }
    }

    /// Seals one listener packet the way the shard does and hands it to the client.
    fn seal_and_deliver(&mut self, h: OutHeader, payload: &[u8]) {
        self.seal_and_deliver_to(h, payload, CLIENT.parse().unwrap());
    }

    /// The same, checking that it goes to `client` (the nominated address).
    fn seal_and_deliver_to(&mut self, h: OutHeader, payload: &[u8], client: SocketAddr) {
        let server: SocketAddr = SERVER.parse().unwrap();
        let mut sealed = RelayCopies::default();
        assert!(self.peer.seal(h, payload, self.now, &mut sealed));
        assert_eq!(sealed.len(), 1);
        let (data, to) = sealed.get(0);
        assert_eq!(to.to_socket_addr(), client, "sent to the nominated address");
        let r = Receive::new(Protocol::Udp, server, client, data).unwrap();
        self.client
            .handle_input(Input::Receive(self.now, r))
            .unwrap();
    }

    /// `steps` steps of 10 ms with the link up, a listener packet ("opus", from sequence number
    /// `first_seq`) sealed and delivered every other step: a talker at 20 ms.
    fn listen(&mut self, steps: u32, first_seq: u16) {
        for i in 0..steps {
            if i % 2 == 0 {
                let h = OutHeader {
                    seq: first_seq.wrapping_add((i / 2) as u16),
                    timestamp: 960 * (i / 2),
                    marker: i == 0,
                };
                self.seal_and_deliver(h, b"opus");
            }
            self.step(true);
        }
    }

    /// The client sends one Opus packet (sequence number `seq`) on its own stream.
    fn client_sends(&mut self, seq: u64, payload: &[u8]) {
        let now = self.now;
        let mut api = self.client.direct_api();
        let tx = api.stream_tx_by_mid(self.mid, None).expect("client stream");
        tx.write_rtp(RtpWrite::new(
            Pt::from(111),
            seq.into(),
            (seq * 960) as u32,
            now,
            payload.to_vec(),
        ));
    }

    fn connected() -> Pair {
        let mut p = Pair::new();
        for _ in 0..300 {
            p.step(true);
            if p.peer.connected && p.client_connected {
                return p;
            }
        }
        panic!("ICE + DTLS within 3 s of virtual time");
    }

    fn closed(&self) -> Option<&'static str> {
        self.events.iter().find_map(|e| match e {
            PeerEvent::Closed(why) => Some(*why),
            _ => None,
        })
    }
}

#[test]
fn connects_and_listener_packets_reach_the_client() {
    let p = &mut Pair::connected();
    assert!(p.events.iter().any(|e| matches!(e, PeerEvent::Connected)));
    for i in 0..10u16 {
        let h = OutHeader {
            seq: 100 + i,
            timestamp: 960 * u32::from(i),
            marker: i == 0,
        };
        p.seal_and_deliver(h, b"opus");
        p.step(true);
    }
    for _ in 0..5 {
        p.step(true);
    }
    assert_eq!(p.heard, 10);
}

#[test]
fn a_peer_whose_client_vanishes_is_closed_by_ice() {
    let mut p = Pair::new();
    while !p.peer.connected {
        p.step(true);
    }
    // ICE-lite keeps a pair alive 15 s after the last binding request (str0m/is RECENT_BINDING_REQUEST).
    for _ in 0..2000 {
        p.step(false);
        if p.closed().is_some() {
            break;
        }
    }
    assert_eq!(p.closed(), Some("ice_disconnected"));
}

#[test]
fn a_peer_that_never_connects_is_given_up_but_not_too_soon() {
    let mut p = Pair::new();
    let start = p.now;
    while p.closed().is_none() && p.now < start + CONNECT_TIMEOUT + Duration::from_secs(1) {
        p.step(false);
    }
    // No connectivity check ever came: given up when the check deadline passes (an unused offer must not
    // hold a handshake slot for the whole connect timeout), not before.
    assert_eq!(p.closed(), Some("no_connectivity_check"));
    let waited = p.now - start;
    assert!(
        waited >= crate::peer::webrtc::VERIFY_TIMEOUT,
        "the client must have time to use the answer: {waited:?}"
    );
    assert!(
        waited < crate::peer::webrtc::VERIFY_TIMEOUT + Duration::from_secs(1),
        "{waited:?}"
    );
}

#[test]
fn stun_finds_its_peer_by_ufrag_then_by_address() {
    let p = Pair::new();
    let mut peers = Peers::default();
    let id = peers.insert(p.peer, 0, 7);
    let src: SocketAddr = "10.0.0.9:1234".parse().unwrap();
    let user = b"testufragtestufr:cli1";
    let mut stun = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[1; 12]);
    stun.extend_from_slice(&[0x00, 0x06, 0, user.len() as u8]);
    stun.extend_from_slice(user);
    stun.extend_from_slice(&[0; 3]); // padding to 4 bytes
    let len = (stun.len() - 20) as u16;
    stun[2..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(
        peers.find(src, Kind::Dtls, &[22; 20]),
        None,
        "unknown address, not STUN"
    );
    assert_eq!(peers.find(src, Kind::Stun, &stun), Some(id));
    assert_eq!(
        peers.find(src, Kind::Dtls, &[22; 20]),
        Some(id),
        "address learnt"
    );
    assert!(peers.remove(id).is_some());
    assert_eq!(
        peers.find(src, Kind::Dtls, &[22; 20]),
        None,
        "forgotten with the peer"
    );
}

/// The listener stream wraps its 16-bit sequence number: the egress moves to ROC 1 and the client (str0m,
/// which tracks the ROC itself) decrypts every packet on both sides of the wrap.
#[test]
fn the_listener_stream_survives_a_sequence_wrap() {
    let mut p = Pair::connected();
    for i in 0..12u32 {
        let h = OutHeader {
            seq: 65530u16.wrapping_add(i as u16),
            timestamp: 960 * i,
            marker: i == 0,
        };
        p.seal_and_deliver(h, &[0x42, i as u8]);
        p.step(true);
    }
    for _ in 0..5 {
        p.step(true);
    }
    assert_eq!(p.heard, 12, "every packet across the wrap decrypted");
    assert_eq!(p.peer.egress().and_then(|e| e.ext_seq()), Some(0x1_0005));
}

/// The settled peer's sender reports (its own SRTCP index): the client decrypts them, and they count
/// what the shard really sent.
#[test]
fn sender_reports_reach_the_client_with_honest_counts() {
    let mut p = Pair::connected();
    p.listen(1200, 10);
    assert!(p.closed().is_none());
    assert_eq!(p.heard, 600);
    assert!(p.reports.len() >= 2, "a report every ~5 s: {:?}", p.reports);
    let &(packets, octets) = p.reports.last().unwrap();
    assert!((400..=600).contains(&packets), "{packets}");
    assert_eq!(octets, packets * 4, "4-octet payloads");
}

/// The client moves to another address (a network change) and nominates the new path: the settled peer
/// answers the checks there and its media follows the nomination at once. (Before it settles, str0m
/// keeps sending on the old, higher-priority pair until that pair expires, 15 s without a check, and the
/// egress follows str0m's own choice.)
#[test]
fn media_follows_ice_renomination() {
    let mut p = Pair::connected();
    assert!(p.peer.is_settled());
    let moved: SocketAddr = "127.0.0.3:6000".parse().unwrap();
    let old = Candidate::host(CLIENT.parse().unwrap(), "udp").unwrap();
    p.client
        .add_local_candidate(Candidate::host(moved, "udp").unwrap());
    p.client.direct_api().invalidate_candidate(&old);
    let dest = |p: &Pair| {
        p.peer
            .egress()
            .and_then(|e| e.dest)
            .map(|d| d.to_socket_addr())
    };
    let start = p.now;
    for _ in 0..3000 {
        p.step(true);
        if dest(&p) == Some(moved) {
            break;
        }
    }
    assert_eq!(dest(&p), Some(moved), "the egress followed the nomination");
    let after = p.now - start;
    assert!(after < Duration::from_secs(15), "{after:?}");
    assert!(p.closed().is_none() && !p.client_disconnected);
    let heard = p.heard;
    let h = OutHeader {
        seq: 7,
        timestamp: 0,
        marker: true,
    };
    p.seal_and_deliver_to(h, b"moved", moved);
    p.step(true);
    assert_eq!(p.heard, heard + 1);
}

/// Once ICE and DTLS are up the peer settles: its `Rtc` is dropped and the settled state opens the
/// client's packets, answers its consent checks for as long as it sends them (the client's ICE agent
/// keeps the pair), seals sender reports the client accepts, reads the client's receiver reports, and
/// closes the peer 15 s after the checks stop.
#[test]
fn a_connected_peer_lives_without_its_rtc() {
    let mut p = Pair::connected();
    assert!(p.peer.is_settled(), "settled when connected");
    p.client_sends(1, b"first");
    p.step(true);
    let media = |p: &Pair| {
        p.events
            .iter()
            .filter_map(|e| match e {
                PeerEvent::Media(m) => Some(m.payload.to_vec()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        media(&p),
        vec![b"first".to_vec()],
        "its first packet opened, once"
    );
    for i in 2..50u64 {
        p.client_sends(i, &[0xa0, i as u8]);
        p.step(true);
    }
    assert_eq!(
        media(&p).len(),
        49,
        "every packet opened by the settled peer"
    );
    // 40 s listening: the consent checks are answered by the settled peer, the client keeps the pair,
    // hears every packet, and gets sender reports that count them.
    p.listen(4000, 500);
    assert!(p.closed().is_none() && !p.client_disconnected);
    assert_eq!(p.heard, 2000);
    let &(packets, octets) = p.reports.last().expect("sender reports");
    // The last report came up to 5 s (250 packets) before the end.
    assert!((1700..=2000).contains(&packets), "{packets}");
    assert_eq!(octets, packets * 4);
    assert!(
        p.events
            .iter()
            .any(|e| matches!(e, PeerEvent::Report { .. })),
        "the client's receiver reports were read"
    );
    // The client vanishes: closed when its consent runs out, not before.
    let gone = p.now;
    while p.closed().is_none() && p.now < gone + Duration::from_secs(20) {
        p.step(false);
    }
    assert_eq!(p.closed(), Some("ice_disconnected"));
    let waited = p.now - gone;
    assert!(
        // The last check answered came up to a check interval before the link went.
        waited >= Duration::from_secs(12) && waited <= Duration::from_secs(16),
        "{waited:?}"
    );
}

/// A settled peer refuses forged SRTP and SRTCP, and a forged DTLS alert, without closing.
#[test]
fn forged_datagrams_do_not_hurt_a_settled_peer() {
    let mut p = Pair::connected();
    let client: SocketAddr = CLIENT.parse().unwrap();
    let (mut out, mut events) = (Vec::new(), Vec::new());
    let mut forged = vec![0x80, 111, 0, 9, 0, 0, 0, 1, 0, 0, 0, 2];
    forged.extend_from_slice(&[7; 40]);
    p.client_sends(1, b"real");
    p.step(true);
    assert!(p.peer.is_settled());
    for bad in [forged.clone(), vec![0x81, 201, 0, 1, 0, 0, 0, 1]] {
        assert!(!p
            .peer
            .handle_receive(p.now, client, &bad, &mut out, &mut events));
    }
    // A DTLS record that is no alert of the client's: read by the kept DTLS instance, nothing happens.
    p.peer.handle_receive(
        p.now,
        client,
        &[21, 254, 253, 0, 1, 0, 0, 0, 0, 0, 9, 0, 2, 1, 0],
        &mut out,
        &mut events,
    );
    assert!(events.is_empty() && out.is_empty());
    assert!(p.peer.is_settled() && !p.peer.closed);
    p.client_sends(2, b"still");
    p.step(true);
    assert!(p.closed().is_none());
}

/// The server's last DTLS flight is lost: the server has settled (its `Rtc` is gone) but the client
/// retransmits its own flight, the kept DTLS instance answers it again, and the client connects and hears.
#[test]
fn a_lost_last_handshake_flight_is_answered_after_settling() {
    let mut p = Pair::new();
    let server: SocketAddr = SERVER.parse().unwrap();
    let mut steps = 0;
    while !p.peer.connected {
        // Like `step`, but what the server sends in the step it connects is lost.
        p.now += Duration::from_millis(10);
        let mut out = vec![];
        p.client.handle_input(Input::Timeout(p.now)).unwrap();
        while let Ok(o) = p.client.poll_output() {
            match o {
                Output::Timeout(_) => break,
                Output::Transmit(t) => {
                    p.peer
                        .handle_receive(p.now, t.source, &t.contents, &mut out, &mut p.events);
                }
                _ => {}
            }
        }
        if !p.peer.connected {
            for (data, to) in out.drain(..) {
                let r = Receive::new(Protocol::Udp, server, to.to_socket_addr(), &data).unwrap();
                let _ = p.client.handle_input(Input::Receive(p.now, r));
            }
        }
        steps += 1;
        assert!(steps < 300, "the server connects");
    }
    assert!(p.peer.is_settled() && !p.client_connected);
    for _ in 0..500 {
        p.step(true);
        if p.client_connected {
            break;
        }
    }
    assert!(
        p.client_connected,
        "the client's retransmission was answered"
    );
    let h = OutHeader {
        seq: 1,
        timestamp: 0,
        marker: true,
    };
    p.seal_and_deliver(h, b"heard");
    p.step(true);
    assert_eq!(p.heard, 1);
}
