//! End-to-end over real sockets on 127.0.0.1: an in-process server, WebSocket signaling, plain-RTP members.

#[path = "support/client.rs"]
mod client;

use std::time::Duration;

use client::{http_get, metric, RtpMember, Signal};
use serde_json::json;
use talkgroup::config::ServeArgs;
use talkgroup::server::Server;
use talkgroup::shard::shard_of;

fn server() -> Server {
    Server::start(ServeArgs::local_test()).expect("server starts")
}

#[tokio::test]
async fn holder_is_forwarded_to_every_other_member_and_streams_stay_continuous() {
    let srv = server();
    let mut sa = Signal::connect(srv.http_addr).await;
    let mut sb = Signal::connect(srv.http_addr).await;
    let mut sc = Signal::connect(srv.http_addr).await;
    let mut sd = Signal::connect(srv.http_addr).await;
    let mut a = RtpMember::join(&mut sa, "ops", "alice").await;
    let mut b = RtpMember::join(&mut sb, "ops", "bob").await;
    let c = RtpMember::join(&mut sc, "ops", "carol").await;
    let mut d = RtpMember::join(&mut sd, "ops", "dave").await;
    assert_ne!(b.ssrc, c.ssrc);

    sa.press("ops").await;
    let g = sa.expect_floor("ops", "granted").await;
    assert_eq!(g["speaker"], "alice");
    let epoch1 = g["epoch"].as_u64().unwrap();
    for s in [&mut sb, &mut sc, &mut sd] {
        let t = s.expect_floor("ops", "taken").await;
        assert_eq!(
            (t["speaker"].as_str(), t["epoch"].as_u64()),
            (Some("alice"), Some(epoch1))
        );
    }

    // D does not hold the floor: its media goes nowhere.
    for i in 0..5u8 {
        d.send_rtp(&[0xdd, i]).await;
    }
    let payloads: Vec<Vec<u8>> = (0..100u8)
        .map(|i| vec![0xa0, i, i.wrapping_mul(3), 7])
        .collect();
    for p in &payloads {
        a.send_rtp(p).await;
        if p[1] % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await; // stay under the socket buffers
        }
    }
    let got_b = b.recv_rtp(100, Duration::from_secs(5)).await;
    let got_c = c.recv_rtp(100, Duration::from_secs(5)).await;
    for (got, who) in [(&got_b, &b), (&got_c, &c)] {
        assert_eq!(got.len(), 100, "{} got {} packets", who.name, got.len());
        assert_eq!(
            got.iter().map(|p| p.4.clone()).collect::<Vec<_>>(),
            payloads,
            "payloads intact and in order"
        );
        assert!(
            got.iter().all(|p| p.0 == who.ssrc),
            "the listener's own SSRC"
        );
        assert!(
            got.windows(2).all(|w| w[1].1 == w[0].1.wrapping_add(1)),
            "no sequence gap"
        );
        assert!(got[0].3, "marker on the first packet of the spurt");
    }
    assert!(
        a.recv_rtp(1, Duration::from_millis(200)).await.is_empty(),
        "never back to the holder"
    );

    sa.release("ops").await;
    for s in [&mut sa, &mut sb, &mut sc, &mut sd] {
        assert_eq!(
            s.expect_floor("ops", "idle").await["epoch"].as_u64(),
            Some(epoch1)
        );
    }

    sb.press("ops").await;
    let g2 = sb.expect_floor("ops", "granted").await;
    assert!(
        g2["epoch"].as_u64().unwrap() > epoch1,
        "epoch grows on every grant"
    );
    for i in 0..10u8 {
        b.send_rtp(&[0xb0, i]).await;
    }
    let got_c2 = c.recv_rtp(10, Duration::from_secs(5)).await;
    assert_eq!(got_c2.len(), 10);
    assert_eq!(
        got_c2[0].1,
        got_c.last().unwrap().1.wrapping_add(1),
        "sequence continues across the speaker change"
    );
    assert!(got_c2[0].3, "marker bit on the new speaker's first packet");
    assert!(
        got_c2[0].2.wrapping_sub(got_c.last().unwrap().2) < 1 << 30,
        "timestamp went forward"
    );
    assert_eq!(got_c2[0].0, c.ssrc, "same SSRC across speakers");
    let got_a = a.recv_rtp(10, Duration::from_secs(5)).await;
    assert_eq!(got_a.len(), 10, "the old speaker now listens");

    let (status, body) = http_get(srv.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metric(&body, "talkgroup_packets_dropped_total") >= 5);
    assert!(metric(&body, "talkgroup_packets_forwarded_total") >= 200 + 20 + 20);
    assert!(
        body.lines()
            .any(|l| l.contains("reason=\"not_holder\"") && !l.ends_with(" 0")),
        "{body}"
    );
    assert_eq!(metric(&body, "talkgroup_floor_grants_total"), 2);
    srv.shutdown();
}

#[tokio::test]
async fn two_channels_on_two_shards_at_once() {
    let srv = server();
    // Two channel names that hash to different shards.
    let names: Vec<String> = (0..50).map(|i| format!("ch{i}")).collect();
    let x = names.iter().find(|n| shard_of(n, 2) == 0).unwrap().clone();
    let y = names.iter().find(|n| shard_of(n, 2) == 1).unwrap().clone();
    let mut sig = Signal::connect(srv.http_addr).await;
    let mut sig2 = Signal::connect(srv.http_addr).await;
    let mut xs = RtpMember::join(&mut sig, &x, "speaker").await;
    let xl = RtpMember::join(&mut sig2, &x, "listener").await;
    let mut ys = RtpMember::join(&mut sig, &y, "speaker").await;
    let yl = RtpMember::join(&mut sig2, &y, "listener").await;
    assert_ne!(xs.server, ys.server, "each shard has its own media port");
    sig.press(&x).await;
    sig.press(&y).await;
    sig.expect_floor(&x, "granted").await;
    sig.expect_floor(&y, "granted").await;
    for i in 0..20u8 {
        xs.send_rtp(&[1, i]).await;
        ys.send_rtp(&[2, i]).await;
    }
    let gx = xl.recv_rtp(20, Duration::from_secs(5)).await;
    let gy = yl.recv_rtp(20, Duration::from_secs(5)).await;
    assert_eq!(gx.len(), 20);
    assert_eq!(gy.len(), 20);
    assert!(
        gx.iter().all(|p| p.4[0] == 1) && gy.iter().all(|p| p.4[0] == 2),
        "no cross-talk"
    );
    let (_, body) = http_get(srv.http_addr, "/api/channels").await;
    let rows: serde_json::Value = serde_json::from_str(&body).unwrap();
    let shards: Vec<u64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["shard"].as_u64().unwrap())
        .collect();
    assert_eq!(shards.len(), 2);
    assert_ne!(shards[0], shards[1]);
    assert!(rows
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["speaker"] == "speaker" && r["members"] == 2));
    srv.shutdown();
}

#[tokio::test]
async fn bad_requests_get_errors_naming_the_problem_and_the_connection_stays() {
    let srv = server();
    let mut s = Signal::connect(srv.http_addr).await;
    let cases: Vec<(String, &str, &str)> = vec![
        ("not json".into(), "bad_request", "not valid JSON"),
        (r#"{"type":"dance","id":4}"#.into(), "bad_request", "unknown message type 'dance'"),
        (json!({"type":"join","channel":"a/b","member":"x","transport":"rtp","rtp_addr":"127.0.0.1:9"}).to_string(), "bad_request", "invalid character '/'"),
        (json!({"type":"join","channel":"ok","member":"","transport":"rtp","rtp_addr":"127.0.0.1:9"}).to_string(), "bad_request", "member name"),
        (json!({"type":"join","channel":"ok","member":"m","transport":"rtp"}).to_string(), "bad_request", "rtp_addr"),
        (json!({"type":"join","channel":"ok","member":"m","transport":"rtp","rtp_addr":"8.8.8.8:9"}).to_string(), "unauthorized", "--rtp-allow"),
        (json!({"type":"ptt","channel":"ok","action":"press","id":"p1"}).to_string(), "not_joined", "not joined to channel 'ok'"),
        (json!({"type":"leave","channel":"ok"}).to_string(), "not_joined", "not joined"),
    ];
    for (frame, code, text) in cases {
        s.send_text(&frame).await;
        let e = s.expect_type("error").await;
        assert_eq!(e["code"], code, "{frame}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(text),
            "{frame}: {e}"
        );
    }
    s.send_text(r#"{"type":"dance","id":4}"#).await;
    assert_eq!(s.expect_type("error").await["id"], 4, "the id is echoed");
    s.send(json!({"type":"ping","id":7})).await;
    assert_eq!(s.expect_type("pong").await["id"], 7);

    // A second join under the same name, from another connection.
    let _m = RtpMember::join(&mut s, "ok", "m").await;
    let mut s2 = Signal::connect(srv.http_addr).await;
    s2.send(json!({"type":"join","channel":"ok","member":"m","transport":"rtp","rtp_addr":"127.0.0.1:9"})).await;
    let e = s2.expect_type("error").await;
    assert_eq!(e["code"], "already_joined");
    assert!(e["message"].as_str().unwrap().contains("'m'"));

    // Leave answers `left`, then the member is gone.
    s.send(json!({"type":"leave","channel":"ok","id":1})).await;
    assert_eq!(s.expect_type("left").await["id"], 1);

    // An oversized frame is refused and the connection closed; others are unaffected.
    s2.send_text(&format!(
        "{{\"type\":\"ping\",\"pad\":\"{}\"}}",
        "x".repeat(70_000)
    ))
    .await;
    assert_eq!(s2.expect_type("error").await["code"], "too_large");
    assert!(s2.closed().await);
    s.send(json!({"type":"ping","id":8})).await;
    assert_eq!(s.expect_type("pong").await["id"], 8);
    srv.shutdown();
}

#[tokio::test]
async fn garbage_on_the_media_port_is_counted_and_others_carry_on() {
    let srv = server();
    let mut sa = Signal::connect(srv.http_addr).await;
    let mut sb = Signal::connect(srv.http_addr).await;
    let mut a = RtpMember::join(&mut sa, "g", "a").await;
    let b = RtpMember::join(&mut sb, "g", "b").await;
    sa.press("g").await;
    sa.expect_floor("g", "granted").await;
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let garbage: Vec<Vec<u8>> = vec![
        vec![0x80, 111, 0],                                      // shorter than 12 bytes
        vec![0x40; 20],                                          // wrong version
        vec![0x80; 3000],                                        // oversized
        talkgroup::rtp::build_packet(false, 111, 1, 1, 1, b"x"), // unknown source (from the stranger)
        vec![22, 254, 253, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],       // DTLS-looking
    ];
    for (i, g) in garbage.iter().enumerate() {
        stranger.send_to(g, a.server).await.unwrap();
        if i != 3 {
            a.send_raw(g).await; // (packet 3 is valid RTP: from the holder it would be forwarded)
        }
    }
    a.send_rtp(b"still-here").await;
    let got = b.recv_rtp(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].4, b"still-here");
    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    for reason in [
        "too_short",
        "bad_version",
        "oversized",
        "unknown_source",
        "not_rtp",
    ] {
        let n = metric(
            &body,
            &format!("talkgroup_packets_dropped_total{{shard=\"0\",reason=\"{reason}\"}}"),
        ) + metric(
            &body,
            &format!("talkgroup_packets_dropped_total{{shard=\"1\",reason=\"{reason}\"}}"),
        );
        assert!(n >= 1, "{reason} not counted:\n{body}");
    }
    srv.shutdown();
}

#[tokio::test]
async fn silence_revokes_the_holder_and_members_see_idle() {
    let mut args = ServeArgs::local_test();
    args.t1_ms = 300;
    let srv = Server::start(args).unwrap();
    let mut sa = Signal::connect(srv.http_addr).await;
    let mut sb = Signal::connect(srv.http_addr).await;
    let _a = RtpMember::join(&mut sa, "quiet", "a").await;
    let _b = RtpMember::join(&mut sb, "quiet", "b").await;
    sa.press("quiet").await;
    sa.expect_floor("quiet", "granted").await;
    let granted = std::time::Instant::now();
    let r = sa.expect_floor("quiet", "revoked").await;
    assert_eq!(r["reason"], "silence");
    // Not before T1 (300 ms) of silence: the grant left the server before we read it, so allow 50 ms.
    let silent = granted.elapsed();
    assert!(
        silent >= Duration::from_millis(250),
        "revoked for silence after {silent:?}, T1 is 300 ms"
    );
    sb.expect_floor("quiet", "idle").await;
    srv.shutdown();
}

#[tokio::test]
async fn presence_and_joined_members() {
    let srv = server();
    let mut sa = Signal::connect(srv.http_addr).await;
    let mut sb = Signal::connect(srv.http_addr).await;
    let _a = RtpMember::join(&mut sa, "p", "a").await;
    let _b = RtpMember::join(&mut sb, "p", "b").await;
    let p = sa.expect_type("presence").await;
    assert_eq!(p["joined"], "b");
    // A goodbye (WebSocket close): b leaves at once. (A dropped connection waits for a resume; see
    // tests/dispatch.rs.)
    sb.close().await;
    let p = sa
        .expect("presence left", |v| {
            v["type"] == "presence" && v["left"] == "b"
        })
        .await;
    assert_eq!(p["channel"], "p");
    srv.shutdown();
}

#[tokio::test]
async fn shutdown_tells_members_idle_and_left() {
    let srv = server();
    let mut sa = Signal::connect(srv.http_addr).await;
    let mut sb = Signal::connect(srv.http_addr).await;
    let _a = RtpMember::join(&mut sa, "bye", "a").await;
    let _b = RtpMember::join(&mut sb, "bye", "b").await;
    sa.press("bye").await;
    sa.expect_floor("bye", "granted").await;
    let stopper = std::thread::spawn(move || srv.shutdown());
    sb.expect_floor("bye", "idle").await;
    sb.expect_type("left").await;
    assert!(sb.closed().await);
    stopper.join().unwrap();
}

#[test]
fn the_binary_exits_zero_on_sigterm() {
    let (mut guard, _) = client::spawn_server(&["--shards", "1"]);
    let child = &mut guard.0;
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
