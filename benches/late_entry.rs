//! Late entry (MCPTT KPI 4: < 350 ms): a member that joins while a talk burst is under way hears it. Measures,
//! for plain RTP and for WebRTC (ICE and DTLS included), the time from publishing the `join` to the
//! first audio packet received, with a speaker talking all along (20 ms Opus frames), over 127.0.0.1.
//!
//! `cargo bench --bench late_entry` prints p50 / p95 / max over 20 joins of each kind.

#[path = "../tests/support/client.rs"]
mod client;
#[path = "../tests/support/webrtc_client.rs"]
mod webrtc_client;

use std::time::{Duration, Instant};

use client::{RtpMember, Signal};
use serde_json::json;
use talkgroup::config::ServeArgs;
use talkgroup::server::Server;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;

const JOINS: usize = 20;

fn report(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let pick = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    println!(
        "late entry, {what}: join published -> first audio: p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms ({} joins)",
        pick(0.5),
        pick(0.95),
        ms[ms.len() - 1],
        ms.len()
    );
}

async fn run() {
    let srv = Server::start(ServeArgs::local_test()).expect("server starts");
    let mut ss = Signal::connect(srv.http_addr).await;
    let mut speaker = RtpMember::join(&mut ss, "late", "speaker").await;
    ss.press("late").await;
    ss.expect_floor("late", "granted").await;
    let frames = webrtc_client::opus_frames(50);
    let talking = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for i in 0.. {
            tick.tick().await;
            speaker.send_rtp(&frames[i % frames.len()]).await;
        }
    });

    let mut plain = Vec::new();
    for i in 0..JOINS {
        let mut s = Signal::connect(srv.http_addr).await;
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let name = format!("p{i}");
        let t0 = Instant::now();
        s.send(
            json!({"type":"join","channel":"late","member":name,"transport":"rtp",
                      "rtp_addr":sock.local_addr().unwrap().to_string()}),
        )
        .await;
        let joined = s.expect_type("joined").await;
        let server: std::net::SocketAddr = joined["rtp"]["server_addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        // Latch (an empty receiver report), as a plain-RTP listener does right after `joined`.
        sock.send_to(&[0x80, 201, 0, 1, 0, 0, 0, 1], server)
            .await
            .unwrap();
        let mut buf = [0u8; 2048];
        loop {
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
                .await
                .expect("no audio within 5 s")
                .unwrap();
            if talkgroup::rtp::classify(&buf[..n]) == talkgroup::rtp::Kind::Rtp {
                break;
            }
        }
        plain.push(t0.elapsed().as_secs_f64() * 1000.0);
        s.close().await;
    }
    report("plain RTP", plain);

    let mut web = Vec::new();
    for i in 0..JOINS {
        let mut s = Signal::connect(srv.http_addr).await;
        // The browser's offer is ready before it joins; the clock starts when the join goes out.
        let (pc, _track, mut heard, _state, sdp) = webrtc_client::offer(true).await;
        let t0 = Instant::now();
        s.send(json!({"type":"join","channel":"late","member":format!("w{i}"),"sdp":sdp}))
            .await;
        let joined = s.expect_type("joined").await;
        let answer =
            RTCSessionDescription::answer(joined["sdp"].as_str().unwrap().to_string()).unwrap();
        pc.set_remote_description(answer).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), heard.recv())
            .await
            .expect("no audio within 5 s");
        web.push(t0.elapsed().as_secs_f64() * 1000.0);
        let _ = pc.close().await;
        s.close().await;
    }
    report("WebRTC (ICE + DTLS included)", web);
    talking.abort();
    srv.shutdown();
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is ignored.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(run());
}
