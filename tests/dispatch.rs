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
    let (_, body) = http_get(srv.http_addr, "/api/channels/ops/history").await;
    let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
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
