//! Per-packet WebRTC egress cost per listener: the rewritten header and the shared payload copied into
//! the send buffer and sealed in place with the listener's SRTP key (outside str0m), i.e. what the shard
//! spends on one WebRTC listener for one forwarded packet (design target ≤ 6 µs; Janus ≈ 30 µs). Before
//! issue #13 this was `StreamTx::write_rtp` + `handle_input(Timeout)` + `poll_output` per listener.
//!
//! Each listener is a real [`WebRtcPeer`] (the server side, as built by the shard) connected in memory to a
//! str0m client over ICE + DTLS; then only the server side is measured.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::SeedableRng;
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Input, Output, Rtc};
use talkgroup::forward::{OutHeader, RelayCopies};
use talkgroup::peer::gcm::prefetch_lines;
use talkgroup::peer::webrtc::{PeerEvent, WebRtcConfig, WebRtcPeer, HOT_LEN};

const SERVER: &str = "127.0.0.1:40000";

/// A server-side peer connected to an in-memory str0m client.
fn connected_peer(config: &WebRtcConfig, n: u16) -> (WebRtcPeer, Rtc) {
    let server: SocketAddr = SERVER.parse().unwrap();
    let client_addr: SocketAddr = format!("127.0.0.2:{}", 5000 + n).parse().unwrap();
    let now = Instant::now();
    let mut client = Rtc::builder()
        .set_rtp_mode(true)
        .set_crypto_provider(config.crypto.clone())
        .build(now);
    client.add_local_candidate(Candidate::host(client_addr, "udp").unwrap());
    let mut api = client.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, pending) = api.apply().unwrap();
    let (mut peer, answer) = WebRtcPeer::accept(
        config,
        offer,
        format!("benchufrag{n:06}"),
        now,
        &mut StdRng::seed_from_u64(u64::from(n)),
    )
    .unwrap();
    client
        .sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
        .unwrap();
    let (mut out, mut events) = (Vec::new(), Vec::new());
    let mut client_connected = false;
    let mut t = now;
    for _ in 0..2000 {
        t += Duration::from_millis(5);
        client.handle_input(Input::Timeout(t)).unwrap();
        loop {
            match client.poll_output().unwrap() {
                Output::Timeout(_) => break,
                Output::Transmit(tx) => {
                    peer.handle_receive(t, client_addr, &tx.contents, &mut out, &mut events);
                }
                Output::Event(str0m::Event::Connected) => client_connected = true,
                Output::Event(_) => {}
            }
        }
        peer.handle_timeout(t, &mut out, &mut events);
        for (data, _) in out.drain(..) {
            let recv = Receive::new(Protocol::Udp, server, client_addr, &data).unwrap();
            client.handle_input(Input::Receive(t, recv)).unwrap();
        }
        events.retain(|e| !matches!(e, PeerEvent::Media(_)));
        if peer.connected && client_connected {
            return (peer, client);
        }
    }
    panic!("peer {n} did not connect");
}

/// The next header of one speaker's stream: 20 ms Opus frames.
fn next_header(seq: &mut u16, ts: &mut u32) -> OutHeader {
    let h = OutHeader {
        seq: *seq,
        timestamp: *ts,
        marker: false,
    };
    *seq = seq.wrapping_add(1);
    *ts = ts.wrapping_add(960);
    h
}

/// `n` connected pairs.
fn connected_peers(config: &WebRtcConfig, n: usize) -> Vec<(WebRtcPeer, Rtc)> {
    (0..n).map(|i| connected_peer(config, i as u16)).collect()
}

/// What the shard does per forwarded packet for each WebRTC listener: seal it into the send buffer,
/// with the peer's hot lines and its key asked for a few listeners ahead, as `write_peers` does.
fn write_all(
    peers: &mut [(WebRtcPeer, Rtc)],
    h: OutHeader,
    payload: &[u8],
    now: Instant,
    sealed: &mut RelayCopies,
) {
    for i in 0..peers.len() {
        if let Some((ahead, _)) = peers.get(i + 4) {
            prefetch_lines((ahead as *const WebRtcPeer).cast(), HOT_LEN);
        }
        if let Some((ahead, _)) = peers.get(i + 2) {
            ahead.prefetch_key();
        }
        peers[i].0.seal(h, payload, now, sealed);
    }
}

fn egress(c: &mut Criterion) {
    let config = WebRtcConfig::generate(SERVER.parse().unwrap()).unwrap();
    let payload = vec![0xfcu8; 60];
    let mut group = c.benchmark_group("webrtc_egress");
    for listeners in [1usize, 10, 50] {
        let mut peers: Vec<(WebRtcPeer, Rtc)> = connected_peers(&config, listeners);
        let mut sealed = RelayCopies::default();
        let mut seq = 1u16;
        let mut ts = 0u32;
        group.throughput(Throughput::Elements(listeners as u64));
        let (mut sent, mut written) = (0usize, 0usize);
        group.bench_with_input(BenchmarkId::new("seal", listeners), &listeners, |b, _| {
            b.iter(|| {
                let now = Instant::now();
                let h = next_header(&mut seq, &mut ts);
                write_all(&mut peers, h, &payload, now, &mut sealed);
                let n = sealed.len();
                (sent, written) = (sent + n, written + listeners);
                sealed.clear();
                n
            })
        });
        assert!(
            sent == written,
            "only {sent} SRTP packets for {written} listener writes"
        );
    }
    group.finish();
}

/// The same work at the live pace: each listener is written once every 20 ms (a 50 packets/s speaker), so
/// str0m's per-peer state is as cold and its clocks as far apart as in the shard. Only the writes are timed.
fn egress_paced(c: &mut Criterion) {
    let config = WebRtcConfig::generate(SERVER.parse().unwrap()).unwrap();
    let payload = vec![0xfcu8; 60];
    let mut group = c.benchmark_group("webrtc_egress_paced_20ms");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_millis(500));
    for listeners in [50usize, 200] {
        let mut peers: Vec<(WebRtcPeer, Rtc)> = connected_peers(&config, listeners);
        let mut sealed = RelayCopies::default();
        let mut seq = 1u16;
        let mut ts = 0u32;
        group.throughput(Throughput::Elements(listeners as u64));
        group.bench_with_input(BenchmarkId::new("seal", listeners), &listeners, |b, _| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    std::thread::sleep(Duration::from_millis(20));
                    let start = Instant::now();
                    let h = next_header(&mut seq, &mut ts);
                    write_all(&mut peers, h, &payload, start, &mut sealed);
                    spent += start.elapsed();
                    assert_eq!(sealed.len(), listeners, "an SRTP packet per listener");
                    sealed.clear();
                }
                spent
            })
        });
    }
    group.finish();
}

/// Keeps a pair alive in virtual time: the client's timers (ICE consent, RTCP) and everything the server
/// side sent are exchanged, untimed.
fn pump(
    peer: &mut WebRtcPeer,
    client: &mut Rtc,
    n: u16,
    now: Instant,
    out: &mut Vec<talkgroup::peer::webrtc::Transmit>,
    events: &mut Vec<PeerEvent>,
) {
    let server: SocketAddr = SERVER.parse().unwrap();
    let client_addr: SocketAddr = format!("127.0.0.2:{}", 5000 + n).parse().unwrap();
    let _ = client.handle_input(Input::Timeout(now));
    peer.handle_timeout(now, out, events);
    for _ in 0..3 {
        for (data, _) in out.drain(..) {
            if let Ok(recv) = Receive::new(Protocol::Udp, server, client_addr, &data) {
                let _ = client.handle_input(Input::Receive(now, recv));
            }
        }
        while let Ok(o) = client.poll_output() {
            match o {
                Output::Timeout(_) => break,
                Output::Transmit(tx) => {
                    peer.handle_receive(now, client_addr, &tx.contents, out, events);
                }
                Output::Event(_) => {}
            }
        }
    }
    out.clear();
    events.clear();
}

/// The same 20 ms between packets in virtual time, with each pair's timers and consent checks exchanged
/// (untimed) just before the timed writes: the clock moves as in the paced group but the peers' state is
/// warm. Against `webrtc_egress_paced_20ms` this tells str0m's time-driven work (none: same cost as the hot
/// loop) apart from the cost of reaching each peer's state cold from memory (all of the difference).
fn egress_virtual(c: &mut Criterion) {
    let config = WebRtcConfig::generate(SERVER.parse().unwrap()).unwrap();
    let payload = vec![0xfcu8; 60];
    let mut group = c.benchmark_group("webrtc_egress_virtual_20ms");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    let listeners = 50usize;
    let mut peers: Vec<(WebRtcPeer, Rtc)> = connected_peers(&config, listeners);
    let (mut out, mut events) = (Vec::with_capacity(listeners), Vec::new());
    let mut sealed = RelayCopies::default();
    let mut seq = 1u16;
    let mut ts = 0u32;
    let mut now = Instant::now() + Duration::from_secs(1);
    group.throughput(Throughput::Elements(listeners as u64));
    group.bench_with_input(BenchmarkId::new("seal", listeners), &listeners, |b, _| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                now += Duration::from_millis(20);
                for (i, (peer, client)) in peers.iter_mut().enumerate() {
                    pump(peer, client, i as u16, now, &mut out, &mut events);
                }
                let start = Instant::now();
                let h = next_header(&mut seq, &mut ts);
                write_all(&mut peers, h, &payload, now, &mut sealed);
                spent += start.elapsed();
                assert_eq!(sealed.len(), listeners, "an SRTP packet per listener");
                sealed.clear();
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, egress, egress_paced, egress_virtual);
criterion_main!(benches);
