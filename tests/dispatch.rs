//! What dispatchers and operators expect of a PTT system, end to end over 127.0.0.1: the transmission
//! log (across two nodes on a test-owned Redis), emergency, and session resume.

#[path = "support/client.rs"]
mod client;

use std::time::{Duration, Instant};

use client::{floor_any, http_get, RtpMember, Signal};
use rtpio::testing::RedisServer;
use serde_json::{json, Value};
use talkgroup::config::{ServeArgs, StoreKind};
use talkgroup::server::Server;

fn redis_node(redis: &RedisServer, id: &str) -> Server {
    let mut a = ServeArgs::local_test();
    a.store = StoreKind::Redis;
    a.redis_url = Some(redis.url());
    a.node_id = Some(id.into());
    a.key_prefix = "dispatch".into();
    Server::start(a).expect("node starts")
}

/// Presses until granted (a Redis node denies `unavailable` until its subscription is up).
async fn take_floor(s: &mut Signal, channel: &str) -> Value {
    let t0 = Instant::now();
    loop {
        s.press(channel).await;
        let v = floor_any(s, channel, &["granted", "denied"]).await;
        if v["state"] == "granted" {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never granted: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_one_node_is_in_the_history_any_node_serves() {
    let redis = RedisServer::start();
    let (a, b) = (redis_node(&redis, "node-a"), redis_node(&redis, "node-b"));
    let mut sa = Signal::connect(a.http_addr).await;
    let mut alice = RtpMember::join(&mut sa, "ops", "alice").await;
    let g = take_floor(&mut sa, "ops").await;
    let epoch = g["epoch"].as_u64().unwrap();
    for _ in 0..25 {
        alice.send_rtp(b"opus").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sa.release("ops").await;
    floor_any(&mut sa, "ops", &["idle"]).await;
    // Node B answers for the cluster.
    let t0 = Instant::now();
    let rows = loop {
        let (status, body) = http_get(b.http_addr, "/api/channels/ops/history?limit=5").await;
        assert_eq!(status, 200, "{body}");
        let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
        if !rows.is_empty() {
            break rows;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no history on node B"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let r = &rows[0];
    assert_eq!(
        (r["member"].clone(), r["node"].clone(), r["epoch"].clone()),
        (json!("alice"), json!("node-a"), json!(epoch))
    );
    assert_eq!(r["end_reason"], "released");
    assert_eq!(r["packets"], 25, "{r}");
    assert_eq!(r["emergency"], false);
    assert_eq!(r["recording"], Value::Null);
    let length = r["end_ms"].as_u64().unwrap() - r["start_ms"].as_u64().unwrap();
    assert!((400..5000).contains(&length), "{length} ms");
    let (status, _) = http_get(b.http_addr, "/api/channels/bad%2Fname/history").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn an_emergency_preempts_a_priority_255_holder_at_once() {
    let srv = Server::start(ServeArgs::local_test()).unwrap();
    let mut sc = Signal::connect(srv.http_addr).await;
    let mut se = Signal::connect(srv.http_addr).await;
    let mut sl = Signal::connect(srv.http_addr).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sc.send(
        json!({"type":"join","channel":"ops","member":"chief","transport":"rtp",
                   "rtp_addr":sock.local_addr().unwrap().to_string(),"priority":255}),
    )
    .await;
    sc.expect_type("joined").await;
    let _e = RtpMember::join(&mut se, "ops", "eve").await;
    let _l = RtpMember::join(&mut sl, "ops", "lena").await;
    sc.press("ops").await;
    sc.expect_floor("ops", "granted").await;
    se.send(json!({"type":"ptt","channel":"ops","action":"press","emergency":true}))
        .await;
    let r = sc.expect_floor("ops", "revoked").await;
    assert_eq!(
        (r["reason"].clone(), r["grace_ms"].clone()),
        (json!("preempted"), json!(0))
    );
    let g = se.expect_floor("ops", "granted").await;
    assert_eq!(g["emergency"], true);
    let t = sl
        .expect("taken by eve", |v| {
            v["state"] == "taken" && v["speaker"] == "eve"
        })
        .await;
    assert_eq!(t["emergency"], true);
    se.release("ops").await;
    let idle = sl.expect_floor("ops", "idle").await;
    assert_eq!(idle["emergency"], true, "every event of the burst says so");
    // The log is written off the packet path, once the shard has counted the burst's packets.
    let t0 = Instant::now();
    let (rows, body) = loop {
        let (_, body) = http_get(srv.http_addr, "/api/channels/ops/history").await;
        let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
        if rows.len() >= 2 {
            break (rows, body);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "two bursts never logged: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rows[0]["emergency"], true, "{body}");
    assert_eq!(rows[1]["end_reason"], "preempted", "{body}");
    srv.shutdown();
}

#[tokio::test]
async fn a_speaker_whose_wifi_drops_keeps_its_place_and_the_stream_stays_continuous() {
    let mut args = ServeArgs::local_test();
    args.resume_window = Duration::from_secs(2);
    let srv = Server::start(args).unwrap();
    let mut sa = Signal::connect(srv.http_addr).await;
    let mut alice = RtpMember::join(&mut sa, "ops", "alice").await;
    let mut sb = Signal::connect(srv.http_addr).await;
    let bob = RtpMember::join(&mut sb, "ops", "bob").await;
    sa.expect_type("presence").await;
    sa.press("ops").await;
    let epoch = sa.expect_floor("ops", "granted").await["epoch"].clone();
    let (session, token) = (
        sa.hello["session"].clone(),
        sa.hello["resume_token"].clone(),
    );
    assert!(session.is_string() && token.as_str().is_some_and(|t| t.len() >= 32));
    // Alice's WebSocket drops (no close frame) while she keeps talking over RTP.
    drop(sa);
    for _ in 0..10 {
        alice.send_rtp(b"talk").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sa2 = Signal::connect(srv.http_addr).await;
    sa2.send(json!({"type":"resume","session":session,"resume_token":token,"id":"r"}))
        .await;
    let resumed = sa2.expect_type("resumed").await;
    assert_eq!(
        (resumed["id"].clone(), resumed["session"].clone()),
        (json!("r"), session.clone())
    );
    assert_eq!(
        resumed["channels"],
        json!([{"channel":"ops","speaker":"alice","epoch":epoch}])
    );
    assert_eq!(sa2.expect_floor("ops", "granted").await["epoch"], epoch);
    for _ in 0..10 {
        alice.send_rtp(b"talk").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let heard = bob.recv_rtp(20, Duration::from_secs(2)).await;
    assert_eq!(heard.len(), 20, "every packet reached bob across the drop");
    for w in heard.windows(2) {
        assert_eq!(
            w[1].1,
            w[0].1.wrapping_add(1),
            "sequence continuous: {:?}",
            w
        );
    }
    sb.settle(Duration::from_millis(300)).await;
    assert!(
        sb.backlog().iter().all(|v| v["type"] != "presence"),
        "bob saw no left/joined: {:?}",
        sb.backlog()
    );
    sa2.release("ops").await;
    sb.expect_floor("ops", "idle").await;

    // The session keeps its id and token. Dropped again, it is not resumed within the window: the member
    // leaves, and a resume after the window is refused.
    drop(sa2);
    let left = sb
        .expect_within("left alice", Duration::from_secs(5), |v| {
            v["type"] == "presence" && v["left"] == "alice"
        })
        .await;
    assert_eq!(left["channel"], "ops");
    let mut sa3 = Signal::connect(srv.http_addr).await;
    sa3.send(json!({"type":"resume","session":session,"resume_token":token}))
        .await;
    let e = sa3.expect_type("error").await;
    assert_eq!(e["code"], "bad_request");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("unknown or expired"),
        "{e}"
    );
    drop(alice);
    srv.shutdown();
}

/// The test speech (`shared/data/speech.opus20`): 20 ms Opus frames, `[u16 BE length][bytes]` each.
fn speech_frames() -> Vec<Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/speech.opus20");
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("test audio {path}: {e}"));
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 2 <= data.len() {
        let len = usize::from(u16::from_be_bytes([data[at], data[at + 1]]));
        frames.push(data[at + 2..at + 2 + len].to_vec());
        at += 2 + len;
    }
    frames
}

/// The source the frames were encoded from: 48 kHz mono s16 samples.
fn speech_pcm() -> Vec<i16> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/speech-48k-mono.wav"
    );
    let wav = std::fs::read(path).unwrap_or_else(|e| panic!("test audio {path}: {e}"));
    let data = wav
        .windows(4)
        .position(|w| w == b"data")
        .expect("a data chunk")
        + 8;
    wav[data..]
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Decodes an Ogg/Opus file with ffmpeg (a decoder nobody here wrote) to 48 kHz mono s16.
fn ffmpeg_decode(ogg: &[u8]) -> Vec<i16> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("burst.ogg");
    std::fs::write(&path, ogg).unwrap();
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&path)
        .args(["-f", "s16le", "-ac", "1", "-ar", "48000", "-"])
        .output()
        .unwrap_or_else(|e| {
            panic!("this test decodes recordings with ffmpeg: install it (apt-get install ffmpeg): {e}")
        });
    assert!(
        out.status.success(),
        "ffmpeg could not decode the recording: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// The best normalised correlation of `a` against `b` shifted by 0..`lags` samples.
fn best_correlation(a: &[i16], b: &[i16], lags: usize) -> f64 {
    (0..lags)
        .map(|lag| {
            let n = a.len().min(b.len().saturating_sub(lag));
            let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
            for i in 0..n {
                let (x, y) = (f64::from(a[i]), f64::from(b[i + lag]));
                ab += x * y;
                aa += x * x;
                bb += y * y;
            }
            ab / (aa.sqrt() * bb.sqrt()).max(1.0)
        })
        .fold(f64::MIN, f64::max)
}

#[tokio::test]
async fn a_recorded_burst_decodes_to_what_was_said() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = ServeArgs::local_test();
    args.record = Some(dir.path().to_path_buf());
    let srv = Server::start(args).unwrap();
    let mut sa = Signal::connect(srv.http_addr).await;
    let mut alice = RtpMember::join(&mut sa, "ops", "alice").await;
    let mut sb = Signal::connect(srv.http_addr).await;
    let _bob = RtpMember::join(&mut sb, "ops", "bob").await;
    sa.press("ops").await;
    let epoch = sa.expect_floor("ops", "granted").await["epoch"]
        .as_u64()
        .unwrap();
    // Two seconds of real speech, frames 20..120 of the test audio (past its leading silence), with
    // frames 60..65 lost on the way: the recording keeps time with silence there.
    let frames = speech_frames();
    let sent: Vec<usize> = (20..120).filter(|i| !(60..65).contains(i)).collect();
    let start = Instant::now();
    for (i, frame) in frames.iter().enumerate().take(120).skip(20) {
        if sent.contains(&i) {
            alice.send_rtp_at(frame, (i as u32) * 960).await;
        }
        let due = start + Duration::from_millis(20 * (i as u64 - 19));
        tokio::time::sleep_until(due.into()).await;
    }
    sa.release("ops").await;
    sa.expect_floor("ops", "idle").await;
    let t0 = Instant::now();
    let url = loop {
        let (_, body) = http_get(srv.http_addr, "/api/channels/ops/history").await;
        let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
        if let Some(url) = rows.first().and_then(|r| r["recording"].as_str()) {
            assert_eq!(rows[0]["epoch"], epoch);
            break url.to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no recording in the history: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(url, format!("/api/recordings/ops/{epoch}.ogg"));
    let ogg = loop {
        let (status, body) = client::http_get_bytes(srv.http_addr, &url).await;
        if status == 200 {
            break body;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "recording not served: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pcm = ffmpeg_decode(&ogg);
    let seconds = pcm.len() as f64 / 48_000.0;
    assert!(
        (1.95..=2.05).contains(&seconds),
        "decoded {seconds} s, sent 2 s (100 frames)"
    );
    // What was said: the source audio of frames 20..60 (before the loss), against the same stretch of
    // the recording; Opus is lossy and delays by its look-ahead, so a correlation over small lags.
    let source = speech_pcm();
    let said = &source[20 * 960..60 * 960];
    let heard = &pcm[..40 * 960];
    let c = best_correlation(said, heard, 2000);
    println!("correlation of the recording with the source: {c:.3}");
    assert!(
        c > 0.7,
        "the recording does not sound like what was said: correlation {c:.2}"
    );
    let silence = &pcm[41 * 960..44 * 960];
    let energy = silence.iter().map(|s| i64::from(*s).abs()).sum::<i64>() / silence.len() as i64;
    assert!(
        energy < 200,
        "the lost frames are silence (mean |s| {energy})"
    );
    srv.shutdown();
}
