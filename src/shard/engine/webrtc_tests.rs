//! The shard's WebRTC path without sockets, in virtual time: a str0m client joins a channel next to a
//! plain-RTP member, through `ShardCore` only (`handle_command`, `handle_datagram`, `handle_timers`,
//! `poll_transmits`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event as RtcEvent, Input, Output, Rtc};

use super::*;
use crate::peer::webrtc::WebRtcConfig;

const SERVER: &str = "127.0.0.1:40000";
const CLIENT: &str = "127.0.0.9:5000";
const PLAIN: &str = "127.0.0.1:6001";

struct Harness {
    shard: ShardCore,
    client: Rtc,
    mid: Mid,
    now: Instant,
    heard: Vec<Vec<u8>>,
    /// Plain-RTP datagrams the shard sent: (payload, destination) from `Forward*` verdicts.
    plain: Vec<Vec<u8>>,
    /// The client finished DTLS too (the shard's peer finishes first).
    client_connected: bool,
}

impl Harness {
    fn new() -> Harness {
        let config = WebRtcConfig::generate(SERVER.parse().unwrap()).unwrap();
        let now = Instant::now();
        let mut client = Rtc::builder()
            .set_rtp_mode(true)
            .set_crypto_provider(config.crypto.clone())
            .build(now);
        client.add_local_candidate(Candidate::host(CLIENT.parse().unwrap(), "udp").unwrap());
        let mut api = client.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        let mut shard = ShardCore::new(
            0,
            ShardConfig {
                webrtc: Some(config),
                ..Default::default()
            },
            now,
        );
        let plain: SocketAddr = PLAIN.parse().unwrap();
        shard.handle_command(
            Command::AddMember {
                channel: "mix".into(),
                key: 1,
                name: "plain".into(),
                addr: plain,
                ssrc: 11,
            },
            now,
        );
        let rr = [0x80, 201, 0, 1, 0, 0, 0, 1];
        assert_eq!(
            shard.handle_datagram(plain, &rr, now, &mut Batch::default()),
            Verdict::Rtcp
        );
        let cmd = Command::AddPeer {
            channel: "mix".into(),
            key: 2,
            name: "web".into(),
            offer: Box::new(offer),
        };
        let Some(Event::PeerAnswered {
            key: 2,
            answer: Ok(answer),
        }) = shard.handle_command(cmd, now)
        else {
            panic!("no answer")
        };
        client
            .sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
            .unwrap();
        let mut h = Harness {
            shard,
            client,
            mid,
            now,
            heard: vec![],
            plain: vec![],
            client_connected: false,
        };
        for _ in 0..300 {
            h.step();
            if h.client_connected && h.shard.peers.get_mut(0).is_some_and(|s| s.peer.connected) {
                return h;
            }
        }
        panic!("the peer did not connect");
    }

    /// Feeds one datagram from `src` to the shard and records what it forwarded to plain members.
    fn datagram(&mut self, src: SocketAddr, data: &[u8]) -> Verdict {
        let mut batch = Batch::default();
        let v = self.shard.handle_datagram(src, data, self.now, &mut batch);
        // WebRTC listeners' packets are sealed by the shard and leave with the batch.
        let (server, client): (SocketAddr, SocketAddr) =
            (SERVER.parse().unwrap(), CLIENT.parse().unwrap());
        for i in 0..batch.sealed.len() {
            let (d, to) = batch.sealed.get(i);
            assert_eq!(to.to_socket_addr(), client);
            let r = Receive::new(Protocol::Udp, server, client, d).unwrap();
            self.client
                .handle_input(Input::Receive(self.now, r))
                .unwrap();
        }
        let payload: Vec<u8> = match &v {
            Verdict::Forward(r) => data[r.clone()].to_vec(),
            Verdict::ForwardShared(p) => p.to_vec(),
            _ => return v,
        };
        self.plain.extend(std::iter::repeat_n(payload, batch.len()));
        v
    }

    /// 10 ms of virtual time: client output to the shard, shard timers, shard output to the client.
    fn step(&mut self) {
        let (server, client): (SocketAddr, SocketAddr) =
            (SERVER.parse().unwrap(), CLIENT.parse().unwrap());
        self.now += Duration::from_millis(10);
        self.client.handle_input(Input::Timeout(self.now)).unwrap();
        let mut to_shard = vec![];
        while let Ok(o) = self.client.poll_output() {
            match o {
                Output::Timeout(_) => break,
                Output::Transmit(t) => to_shard.push(t.contents.to_vec()),
                Output::Event(RtcEvent::RtpPacket(p)) => self.heard.push(p.payload.to_vec()),
                Output::Event(RtcEvent::Connected) => self.client_connected = true,
                Output::Event(_) => {}
            }
        }
        for d in to_shard {
            self.datagram(client, &d);
        }
        self.shard.handle_timers(self.now);
        let mut out = vec![];
        self.shard.poll_transmits(&mut out);
        for (data, _) in out {
            let r = Receive::new(Protocol::Udp, server, client, &data).unwrap();
            let _ = self.client.handle_input(Input::Receive(self.now, r));
        }
    }

    fn grant(&mut self, key: MemberKey, epoch: u64) {
        let change = SpeakerChange::Granted {
            speaker: Some(key),
            epoch,
            until: None,
        };
        let ev = self.shard.handle_command(
            Command::Speaker {
                channel: "mix".into(),
                change,
            },
            self.now,
        );
        assert_eq!(
            ev,
            Some(Event::Applied {
                channel: "mix".into(),
                epoch,
                applied: true,
                idle: false,
            })
        );
    }
}

#[test]
fn plain_and_webrtc_members_hear_each_other_through_the_shard() {
    let mut h = Harness::new();
    let plain: SocketAddr = PLAIN.parse().unwrap();

    // The plain member speaks: the WebRTC client hears the same payloads.
    h.grant(1, 1);
    for i in 0..5u16 {
        let p = rtp::build_packet(
            false,
            OPUS_PT,
            100 + i,
            960 * u32::from(i),
            77,
            &[0xa0, i as u8],
        );
        assert!(matches!(h.datagram(plain, &p), Verdict::Forward(_)));
        h.step();
    }
    h.step();
    assert_eq!(h.heard, (0..5u8).map(|i| vec![0xa0, i]).collect::<Vec<_>>());

    // Garbage from the client's own address is refused by its peer and changes nothing.
    let client: SocketAddr = CLIENT.parse().unwrap();
    for g in [
        vec![23u8, 254, 253, 0, 1, 0, 0, 0, 0, 0, 9, 0, 3, 1, 2, 3],
        vec![0x80, 111, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 9],
    ] {
        assert!(matches!(
            h.datagram(client, &g),
            Verdict::Dropped(DropReason::PeerRefused) | Verdict::Peer
        ));
    }

    // The client does not hold the floor: its media is dropped after SRTP and counted.
    let pt = Pt::from(111);
    let write = |h: &mut Harness, seq: u64, payload: &[u8]| {
        let now = h.now;
        let mut api = h.client.direct_api();
        let tx = api
            .stream_tx_by_mid(h.mid, None)
            .expect("client send stream");
        tx.write_rtp(RtpWrite::new(
            pt,
            seq.into(),
            (seq * 960) as u32,
            now,
            payload.to_vec(),
        ));
        h.step();
    };
    write(&mut h, 1, b"early");
    assert!(h.plain.iter().all(|p| p != b"early"));
    assert!(h.shard.stats().dropped[DropReason::NotHolder as usize] >= 1);

    // Now it holds the floor: the plain member gets its payloads, shared from str0m's buffer.
    h.grant(2, 2);
    h.plain.clear();
    for i in 2..7u64 {
        write(&mut h, i, &[0xb0, i as u8]);
    }
    assert_eq!(h.plain, (2..7u8).map(|i| vec![0xb0, i]).collect::<Vec<_>>());
    assert_eq!(h.shard.stats().peers, 1);

    // Leaving closes the peer (DTLS close_notify goes out) and empties the maps.
    h.shard.handle_command(
        Command::RemoveMember {
            channel: "mix".into(),
            key: 2,
        },
        h.now,
    );
    let mut out = vec![];
    h.shard.poll_transmits(&mut out);
    assert!(!out.is_empty(), "close_notify / BYE sent");
    assert_eq!(h.shard.stats().peers, 0);
    assert!(matches!(
        h.datagram(client, &[22; 20]),
        Verdict::Dropped(DropReason::NotRtp)
    ));
}

#[test]
fn handshakes_in_progress_are_capped_per_shard() {
    let config = WebRtcConfig::generate(SERVER.parse().unwrap()).unwrap();
    let now = Instant::now();
    let mut client = Rtc::builder()
        .set_rtp_mode(true)
        .set_crypto_provider(config.crypto.clone())
        .build(now);
    client.add_local_candidate(Candidate::host(CLIENT.parse().unwrap(), "udp").unwrap());
    let mut api = client.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let offer = api.apply().unwrap().0.to_sdp_string();
    let mut shard = ShardCore::new(
        0,
        ShardConfig {
            webrtc: Some(config),
            ..Default::default()
        },
        now,
    );
    let join = |shard: &mut ShardCore, key: MemberKey| {
        let offer = Box::new(str0m::change::SdpOffer::from_sdp_string(&offer).unwrap());
        let cmd = Command::AddPeer {
            channel: "storm".into(),
            key,
            name: format!("m{key}"),
            offer,
        };
        match shard.handle_command(cmd, now) {
            Some(Event::PeerAnswered { answer, .. }) => answer,
            other => panic!("{other:?}"),
        }
    };
    for key in 0..super::webrtc::MAX_HANDSHAKES as u64 {
        assert!(join(&mut shard, key).is_ok());
    }
    // Every slot holds a client that sent its connectivity check (a real handshake in progress): only
    // then is a new join refused, rather than an unused offer evicted.
    for id in 0..super::webrtc::MAX_HANDSHAKES {
        if let Some(slot) = shard.peers.get_mut(id) {
            slot.peer.verified = true;
        }
    }
    assert_eq!(join(&mut shard, 999), Err(crate::shard::PeerRefused::Busy));
    shard.handle_command(
        Command::RemoveMember {
            channel: "storm".into(),
            key: 0,
        },
        now,
    );
    assert!(
        join(&mut shard, 1000).is_ok(),
        "room again once one is gone"
    );
}

/// An offer from a str0m client that will never use the answer.
fn unused_offer(config: &WebRtcConfig, now: Instant) -> str0m::change::SdpOffer {
    let mut client = Rtc::builder()
        .set_rtp_mode(true)
        .set_crypto_provider(config.crypto.clone())
        .build(now);
    let mut api = client.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    api.apply().unwrap().0
}

#[test]
fn offers_never_used_make_room_and_time_out_without_a_connectivity_check() {
    let config = WebRtcConfig::generate(SERVER.parse().unwrap()).unwrap();
    let t0 = Instant::now();
    let mut shard = ShardCore::new(
        0,
        ShardConfig {
            webrtc: Some(config.clone()),
            ..Default::default()
        },
        t0,
    );
    let add = |shard: &mut ShardCore, key: u64, now: Instant| {
        let cmd = Command::AddPeer {
            channel: "ops".into(),
            key,
            name: format!("p{key}"),
            offer: Box::new(unused_offer(&config, now)),
        };
        match shard.handle_command(cmd, now) {
            Some(Event::PeerAnswered { answer, .. }) => answer.is_ok(),
            other => panic!("{other:?}"),
        }
    };
    // An attacker fills every handshake slot with offers it never uses.
    for key in 0..MAX_HANDSHAKES as u64 {
        assert!(add(&mut shard, key, t0 + Duration::from_millis(key)));
    }
    // Within the grace of the oldest (a join storm: its client may be about to check), a new join is
    // refused and retried...
    let soon = t0 + Duration::from_millis(100);
    assert!(!add(&mut shard, 1000, soon), "refused within the grace");
    assert_eq!(shard.stats().peers_evicted, 0);
    // ...after it, another client's join still gets a peer: the oldest unused offer makes room.
    let later = t0 + super::webrtc::EVICT_GRACE;
    assert!(add(&mut shard, 1000, later), "a real client is not refused");
    let mut events = Vec::new();
    shard.poll_events(&mut events);
    assert!(
        events.contains(&Event::PeerClosed {
            channel: "ops".into(),
            key: 0,
            reason: "evicted"
        }),
        "{events:?}"
    );
    assert_eq!(shard.stats().peers_evicted, 1);
    // 5 s without a connectivity check: every unused offer is closed.
    shard.handle_timers(later + crate::peer::webrtc::VERIFY_TIMEOUT + Duration::from_millis(200));
    events.clear();
    shard.poll_events(&mut events);
    let closed = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::PeerClosed {
                    reason: "no_connectivity_check",
                    ..
                }
            )
        })
        .count();
    assert_eq!(closed, MAX_HANDSHAKES, "{events:?}");
}
