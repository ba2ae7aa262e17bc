//! WebRTC members end to end: webrtc-rs clients (an independent implementation) and plain-RTP members in
//! one channel, through an in-process server on 127.0.0.1.

#[path = "support/client.rs"]
mod client;
#[path = "support/webrtc_client.rs"]
mod webrtc_client;

use std::time::Duration;

use client::{http_get, metric, RtpMember, Signal};
use serde_json::json;
use talkgroup::config::ServeArgs;
use talkgroup::server::Server;
use webrtc_client::{opus_frames, WebRtcMember};

const WAIT: Duration = Duration::from_secs(5);

fn server() -> Server {
    Server::start(ServeArgs::local_test()).expect("server starts")
}

fn dropped(body: &str, reason: &str) -> u64 {
    (0..2)
        .map(|s| {
            metric(
                body,
                &format!("talkgroup_packets_dropped_total{{shard=\"{s}\",reason=\"{reason}\"}}"),
            )
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_and_plain_rtp_members_hear_each_other_on_one_continuous_track() {
    let srv = server();
    let (mut sa, mut sb, mut sc) = (
        Signal::connect(srv.http_addr).await,
        Signal::connect(srv.http_addr).await,
        Signal::connect(srv.http_addr).await,
    );
    let mut alice = WebRtcMember::join(&mut sa, "mix", "alice").await;
    let mut bob = WebRtcMember::join(&mut sb, "mix", "bob").await;
    let carol = RtpMember::join(&mut sc, "mix", "carol").await;
    assert!(alice.joined["sdp"].as_str().unwrap().contains("a=ice-lite"));

    // Alice (WebRTC) speaks: Bob (WebRTC) and Carol (plain RTP) get the very same payloads.
    sa.press("mix").await;
    let epoch = sa.expect_floor("mix", "granted").await["epoch"]
        .as_u64()
        .unwrap();
    sb.expect_floor("mix", "taken").await;
    let frames = opus_frames(50);
    for f in &frames {
        alice.send_rtp(f).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let heard_b = bob.recv_rtp(50, WAIT).await;
    let heard_c = carol.recv_rtp(50, WAIT).await;
    assert_eq!(
        heard_b
            .iter()
            .map(|p| p.payload.to_vec())
            .collect::<Vec<_>>(),
        frames,
        "WebRTC listener: same payloads"
    );
    assert_eq!(
        heard_c.iter().map(|p| p.4.clone()).collect::<Vec<_>>(),
        frames,
        "plain listener: same payloads"
    );
    assert!(heard_b
        .windows(2)
        .all(|w| w[1].header.sequence_number == w[0].header.sequence_number.wrapping_add(1)));
    assert!(
        heard_b[0].header.marker,
        "marker on the first packet of the spurt"
    );
    assert!(
        alice
            .recv_rtp(1, Duration::from_millis(300))
            .await
            .is_empty(),
        "never back to the speaker"
    );

    // Bob does not hold the floor: his media is dropped after SRTP, nobody hears it.
    for f in frames.iter().take(5) {
        bob.send_rtp(f).await;
    }
    assert!(
        carol
            .recv_rtp(1, Duration::from_millis(300))
            .await
            .is_empty(),
        "a non-holder is never forwarded"
    );

    sa.release("mix").await;
    sc.expect_floor("mix", "idle").await;
    sb.expect_floor("mix", "idle").await;

    // Carol (plain RTP) speaks: both WebRTC members hear her, Bob on the same track, sequence continuing.
    let mut carol = carol;
    sc.press("mix").await;
    assert!(
        sc.expect_floor("mix", "granted").await["epoch"]
            .as_u64()
            .unwrap()
            > epoch
    );
    let frames2 = opus_frames(80).split_off(50);
    for f in &frames2 {
        carol.send_rtp(f).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let heard_b2 = bob.recv_rtp(30, WAIT).await;
    let heard_a2 = alice.recv_rtp(30, WAIT).await;
    assert_eq!(
        heard_b2
            .iter()
            .map(|p| p.payload.to_vec())
            .collect::<Vec<_>>(),
        frames2
    );
    assert_eq!(
        heard_a2
            .iter()
            .map(|p| p.payload.to_vec())
            .collect::<Vec<_>>(),
        frames2
    );
    let (last, first) = (
        heard_b.last().unwrap().header.clone(),
        heard_b2[0].header.clone(),
    );
    assert_eq!(
        first.ssrc, last.ssrc,
        "one track per listener across speakers"
    );
    assert_eq!(
        first.sequence_number,
        last.sequence_number.wrapping_add(1),
        "sequence continues"
    );
    assert!(first.marker, "marker bit at the speaker change");
    assert!(
        first.timestamp.wrapping_sub(last.timestamp) < 1 << 30,
        "timestamp goes forward"
    );

    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    assert!(dropped(&body, "not_holder") >= 5, "{body}");
    assert_eq!(metric(&body, "talkgroup_shard_webrtc_peers"), 2);
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_only_offers_are_denied_the_floor_and_a_closed_peer_leaves_and_releases_it() {
    let srv = server();
    let (mut sa, mut sb, mut sl) = (
        Signal::connect(srv.http_addr).await,
        Signal::connect(srv.http_addr).await,
        Signal::connect(srv.http_addr).await,
    );
    let mut alice = WebRtcMember::join(&mut sa, "lo", "alice").await;
    let bob = RtpMember::join(&mut sb, "lo", "bob").await;
    let mut lena = WebRtcMember::join_with(&mut sl, "lo", "lena", true).await;

    sl.press("lo").await;
    let d = sl.expect_floor("lo", "denied").await;
    assert_eq!(d["reason"], "listen_only");

    sa.press("lo").await;
    sa.expect_floor("lo", "granted").await;
    let frames = opus_frames(10);
    for f in &frames {
        alice.send_rtp(f).await;
    }
    assert_eq!(
        lena.recv_rtp(10, WAIT).await.len(),
        10,
        "a listen-only member hears"
    );
    assert_eq!(bob.recv_rtp(10, WAIT).await.len(), 10);

    // Alice's peer goes away (DTLS close_notify) while she holds the floor: she leaves, the floor is free.
    alice.close().await;
    let p = sb
        .expect("presence left alice", |v| {
            v["type"] == "presence" && v["left"] == "alice"
        })
        .await;
    assert_eq!(p["channel"], "lo");
    sb.expect_floor("lo", "idle").await;
    sa.expect_type("left").await;
    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    assert!(
        metric(&body, "talkgroup_webrtc_peers_closed_total") >= 1,
        "{body}"
    );
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_offers_are_refused_and_garbage_on_the_media_port_disturbs_nobody() {
    let srv = server();
    let mut s = Signal::connect(srv.http_addr).await;
    let (_pc, _t, _h, _st, good) = webrtc_client::offer(false).await;
    let no_audio = good.replace("m=audio", "m=video");
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            json!({"type":"join","channel":"bad","member":"m","transport":"webrtc","id":1}),
            "needs \"sdp\"",
        ),
        (
            json!({"type":"join","channel":"bad","member":"m","transport":"webrtc","sdp":"garbage"}),
            "not valid SDP",
        ),
        (
            json!({"type":"join","channel":"bad","member":"m","sdp":"v=0\r\nm=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"}),
            "Opus",
        ),
        (
            json!({"type":"join","channel":"bad","member":"m","transport":"webrtc","sdp":no_audio}),
            "not audio",
        ),
    ];
    for (frame, text) in cases {
        s.send(frame.clone()).await;
        let e = s.expect_type("error").await;
        assert_eq!(e["code"], "bad_request", "{frame}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(text),
            "{frame}: {e}"
        );
    }

    // A good pair of members on the same server, talking.
    let (mut sa, mut sb) = (
        Signal::connect(srv.http_addr).await,
        Signal::connect(srv.http_addr).await,
    );
    let mut alice = WebRtcMember::join(&mut sa, "ok", "alice").await;
    let mut bob = WebRtcMember::join(&mut sb, "ok", "bob").await;
    sa.press("ok").await;
    sa.expect_floor("ok", "granted").await;
    let media = srv.media_addrs.clone();
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut stun = vec![0x00, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[9; 12]);
    stun.extend_from_slice(&[0x00, 0x06, 0x00, 0x08]);
    stun.extend_from_slice(b"nope:abc");
    let garbage: Vec<Vec<u8>> = vec![
        stun,                                              // STUN for an unknown ufrag
        vec![0x00, 0x01, 0x00, 0x00],                      // truncated STUN
        vec![22, 254, 253, 0, 0, 0, 0, 0, 0, 0, 0, 0, 99], // DTLS-looking, unknown source
        vec![23; 60],                                      // DTLS application data, unknown source
    ];
    for g in &garbage {
        for m in &media {
            stranger.send_to(g, m).await.unwrap();
        }
    }
    let frames = opus_frames(20);
    for f in &frames {
        alice.send_rtp(f).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let heard = bob.recv_rtp(20, WAIT).await;
    assert_eq!(
        heard.iter().map(|p| p.payload.to_vec()).collect::<Vec<_>>(),
        frames,
        "nothing else disturbed"
    );
    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    assert!(
        dropped(&body, "not_rtp") >= 4,
        "STUN/DTLS from strangers counted:\n{body}"
    );
    srv.shutdown();
}
