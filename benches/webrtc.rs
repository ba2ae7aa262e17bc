//! Per-packet WebRTC egress cost per listener: `StreamTx::write_rtp` + SRTP + `poll_output`, i.e. what the
//! shard spends on one WebRTC listener for one forwarded packet (design target ≤ 6 µs; Janus ≈ 30 µs).
//!
//! Each listener is a real [`WebRtcPeer`] (the server side, as built by the shard) connected in memory to a
//! str0m client over ICE + DTLS; then only the server side is measured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Input, Output, Rtc};
use talkgroup::forward::OutHeader;
use talkgroup::peer::webrtc::{PeerEvent, WebRtcConfig, WebRtcPeer};

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
    let (mut peer, answer) =
        WebRtcPeer::accept(config, offer, format!("benchufrag{n:06}"), now).unwrap();
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

fn egress(c: &mut Criterion) {
    let config = WebRtcConfig::generate(SERVER.parse().unwrap()).unwrap();
    let payload: Arc<[u8]> = Arc::from(vec![0xfcu8; 60]);
    let mut group = c.benchmark_group("webrtc_egress");
    for listeners in [1usize, 10, 50] {
        let mut peers: Vec<(WebRtcPeer, Rtc)> = (0..listeners)
            .map(|i| connected_peer(&config, i as u16))
            .collect();
        let (mut out, mut events) = (Vec::with_capacity(listeners), Vec::new());
        let mut seq = 1u16;
        let mut ts = 0u32;
        group.throughput(Throughput::Elements(listeners as u64));
        group.bench_with_input(
            BenchmarkId::new("write_srtp_poll", listeners),
            &listeners,
            |b, _| {
                b.iter(|| {
                    let now = Instant::now();
                    let h = OutHeader {
                        seq,
                        timestamp: ts,
                        marker: false,
                    };
                    seq = seq.wrapping_add(1);
                    ts = ts.wrapping_add(960);
                    for (peer, _) in peers.iter_mut() {
                        peer.write(h, payload.clone(), now, Some(-30));
                        peer.handle_timeout(now, &mut out, &mut events);
                    }
                    let n = out.len();
                    out.clear();
                    events.clear();
                    n
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, egress);
criterion_main!(benches);
