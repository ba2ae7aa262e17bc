//! Identity, rights and limits end to end over 127.0.0.1: each attack of issue #11 is a test that fails
//! on a server without them. The server runs as operators run it (`talkgroup serve --auth-key …`), and
//! tokens are minted with `talkgroup token`, the command the README gives.

#[path = "support/client.rs"]
mod client;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use client::{
    http_get, http_get_with, http_post, http_post_with, metric, spawn_server, RtpMember, Signal,
};
use futures_util::SinkExt;
use rtpio::testing::RedisServer;
use serde_json::{json, Value};
use talkgroup::config::{ServeArgs, StoreKind};
use talkgroup::server::Server;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

const SECRET: &str = "an-operators-shared-secret";

/// `talkgroup token ARGS` with the test secret; the token it prints.
fn mint(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_talkgroup"))
        .arg("token")
        .args(args)
        .env("TALKGROUP_AUTH_KEY", SECRET)
        .output()
        .expect("run talkgroup token");
    assert!(
        out.status.success(),
        "talkgroup token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A join frame with a token (the member name comes from it).
fn join_frame(channel: &str, token: &str, port: u16) -> Value {
    json!({"type":"join","channel":channel,"transport":"rtp",
           "rtp_addr":format!("127.0.0.1:{port}"),"token":token})
}

async fn answer(s: &mut Signal) -> Value {
    s.expect("joined or error", |v| {
        v["type"] == "joined" || v["type"] == "error"
    })
    .await
}

#[tokio::test]
async fn joins_need_a_valid_token_when_a_key_is_configured() {
    let (_srv, http) = spawn_server(&["--auth-key", SECRET]);
    let mut s = Signal::connect(http).await;
    assert_eq!(s.hello["auth"], "jwt");

    s.send(json!({"type":"join","channel":"ops-1","member":"alice","transport":"rtp","rtp_addr":"127.0.0.1:9"}))
        .await;
    let e = answer(&mut s).await;
    assert_eq!(e["code"], "unauthorized");
    assert!(e["message"].as_str().unwrap().contains("token"), "{e}");

    let alice = mint(&[
        "--sub",
        "alice",
        "--channel",
        "ops-*",
        "--talk",
        "--ttl",
        "1h",
    ]);
    // A forged token: the payload of alice's with another signature.
    let mut parts: Vec<&str> = alice.split('.').collect();
    parts[2] = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let forged = parts.join(".");
    s.send(join_frame("ops-1", &forged, 9)).await;
    let e = answer(&mut s).await;
    assert!(e["message"].as_str().unwrap().contains("signature"), "{e}");
    s.send(join_frame("fire-1", &alice, 9)).await;
    let e = answer(&mut s).await;
    assert!(e["message"].as_str().unwrap().contains("fire-1"), "{e}");
    let mut bob_as_alice = join_frame("ops-1", &alice, 9);
    bob_as_alice["member"] = json!("bob");
    s.send(bob_as_alice).await;
    let e = answer(&mut s).await;
    assert!(e["message"].as_str().unwrap().contains("sub"), "{e}");

    s.send(join_frame("ops-1", &alice, 9)).await;
    let j = answer(&mut s).await;
    assert_eq!(
        (j["type"].clone(), j["member"].clone()),
        (json!("joined"), json!("alice"))
    );

    // A token without the talk right only listens; a priority above the token's is capped.
    let ears = mint(&["--sub", "ears", "--channel", "ops-1", "--max-priority", "2"]);
    let mut s2 = Signal::connect(http).await;
    let mut frame = join_frame("ops-1", &ears, 10);
    frame["priority"] = json!(200);
    s2.send(frame).await;
    assert_eq!(answer(&mut s2).await["priority"], 2);
    s2.press("ops-1").await;
    let d = s2.expect_floor("ops-1", "denied").await;
    assert_eq!(d["reason"], "listen_only");

    let (_open, open_http) = spawn_server(&[]);
    assert_eq!(Signal::connect(open_http).await.hello["auth"], "none");
}

#[tokio::test]
async fn admin_routes_need_an_admin_token_or_the_admin_address() {
    let (_srv, http) = spawn_server(&["--auth-key", SECRET]);
    let (status, body) = http_get(http, "/metrics").await;
    assert_eq!(status, 401, "{body}");
    let member = mint(&["--sub", "alice", "--channel", "ops"]);
    let bearer = format!("Bearer {member}");
    let (status, _) = http_get_with(http, "/api/channels", &[("Authorization", &bearer)]).await;
    assert_eq!(status, 403, "a member's token is not an operator's");
    let admin = mint(&["--sub", "ops-desk", "--admin"]);
    let bearer = format!("Bearer {admin}");
    let (status, body) = http_get_with(http, "/metrics", &[("Authorization", &bearer)]).await;
    assert_eq!(status, 200);
    assert!(body.contains("talkgroup_auth_failures_total"));
    let (status, _) = http_get(http, "/healthz").await;
    assert_eq!(status, 200, "health stays public");
    assert_eq!(http_get(http, "/readyz").await.0, 200, "readiness too");
    // Draining the node is an operator's act.
    assert_eq!(http_post(http, "/admin/drain").await.0, 401);
    let (status, _) = http_post_with(
        http,
        "/admin/drain",
        &[("Authorization", &format!("Bearer {member}"))],
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(http_get(http, "/readyz").await.0, 200, "still serving");
    assert_eq!(
        http_post(http, "/admin/fault/panic-shard?shard=0").await.0,
        404,
        "fault injection is off by default"
    );

    // With --admin-http the admin routes move there (no token) and leave the public address.
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_srv2, http2) = spawn_server(&[
        "--auth-key",
        SECRET,
        "--admin-http",
        &admin_port.to_string(),
    ]);
    assert_eq!(http_get(http2, "/metrics").await.0, 404);
    assert_eq!(http_post(http2, "/admin/drain").await.0, 404);
    let (status, _) = http_get(admin_port, "/metrics").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_browser_page_from_another_origin_cannot_open_the_websocket() {
    let (_srv, http) = spawn_server(&["--auth-key", SECRET]);
    let upgrade = |origin: &str| {
        let mut req = format!("ws://{http}/ws").into_client_request().unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        req
    };
    let evil = tokio_tungstenite::connect_async(upgrade("http://evil.example")).await;
    assert!(evil.is_err(), "a foreign origin is refused");
    let own = tokio_tungstenite::connect_async(upgrade(&format!("http://{http}"))).await;
    assert!(own.is_ok(), "the page's own origin is accepted");
}

fn local_server(edit: impl FnOnce(&mut ServeArgs)) -> Server {
    let mut args = ServeArgs::local_test();
    edit(&mut args);
    Server::start(args).expect("server starts")
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_within_seconds() {
    let srv = local_server(|a| {
        a.limits.max_queued_bytes = 256 * 1024;
        a.limits.send_timeout = Duration::from_secs(1);
    });
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", srv.http_addr))
        .await
        .unwrap();
    // Pongs echo the id: 60 KB each, and the client reads none of them.
    let id = "x".repeat(60_000);
    for _ in 0..200 {
        let ping = json!({"type":"ping","id":id}).to_string();
        if ws.send(Ws::Text(ping.into())).await.is_err() {
            break;
        }
    }
    let t0 = Instant::now();
    loop {
        let (_, body) = http_get(srv.http_addr, "/metrics").await;
        if metric(&body, "talkgroup_slow_clients_total") == 1
            && metric(&body, "talkgroup_connections ") == 0
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "still connected: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The socket is gone from the server's side too (its writer gave up): the client reads to the end.
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(drained.is_ok(), "the server closed the socket");
    srv.shutdown();
}

#[tokio::test]
async fn one_connection_cannot_hold_unlimited_memberships_and_presses_are_rate_limited() {
    let srv = local_server(|a| a.limits.max_presses_per_second = 5);
    let mut s = Signal::connect(srv.http_addr).await;
    for i in 0..10_000 {
        s.send(json!({"type":"join","channel":format!("c{i}"),"member":"disp","transport":"rtp","rtp_addr":"127.0.0.1:7","id":i}))
            .await;
    }
    let (mut joined, mut capped) = (0, 0);
    for _ in 0..10_000 {
        let v = answer(&mut s).await;
        match v["type"].as_str() {
            Some("joined") => joined += 1,
            _ => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                assert!(
                    v["message"].as_str().unwrap().contains("memberships"),
                    "{v}"
                );
                capped += 1;
            }
        }
    }
    assert_eq!((joined, capped), (256, 10_000 - 256));

    let mut t = Signal::connect(srv.http_addr).await;
    let _m = RtpMember::join(&mut t, "talk", "tom").await;
    for i in 0..1000 {
        if i % 2 == 0 {
            t.press("talk").await;
        } else {
            t.release("talk").await;
        }
    }
    let limited = t
        .expect("denied rate_limited", |v| {
            v["state"] == "denied" && v["reason"] == "rate_limited"
        })
        .await;
    assert_eq!(limited["channel"], "talk");
    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    assert!(
        metric(
            &body,
            "talkgroup_limited_total{limit=\"presses_per_second\"}"
        ) > 0
    );
    assert!(
        metric(
            &body,
            "talkgroup_limited_total{limit=\"memberships_per_connection\"}"
        ) > 0
    );
    srv.shutdown();
}

#[tokio::test]
async fn a_media_address_cannot_be_taken_over_by_another_client() {
    let srv = local_server(|_| {});
    let mut victim = Signal::connect(srv.http_addr).await;
    let v = RtpMember::join(&mut victim, "ops", "victim").await;
    let addr = v.sock.local_addr().unwrap();
    let mut mallory = Signal::connect(srv.http_addr).await;
    mallory
        .send(json!({"type":"join","channel":"ops","member":"mallory","transport":"rtp","rtp_addr":addr.to_string()}))
        .await;
    let e = answer(&mut mallory).await;
    assert_eq!(e["code"], "unauthorized");
    assert!(e["message"].as_str().unwrap().contains("in use"), "{e}");
    srv.shutdown();
}

fn redis_node(redis: &RedisServer, id: &str) -> Server {
    let mut a = ServeArgs::local_test();
    a.store = StoreKind::Redis;
    a.redis_url = Some(redis.url());
    a.node_id = Some(id.into());
    a.key_prefix = "sec".into();
    Server::start(a).expect("node starts")
}

#[tokio::test]
async fn one_name_is_one_member_across_nodes() {
    let redis = RedisServer::start();
    let (a, b) = (redis_node(&redis, "node-a"), redis_node(&redis, "node-b"));
    let mut sa = Signal::connect(a.http_addr).await;
    let _alice = RtpMember::join(&mut sa, "ops", "alice").await;
    let mut sb = Signal::connect(b.http_addr).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = sock.local_addr().unwrap();
    sb.send(json!({"type":"join","channel":"ops","member":"alice","transport":"rtp","rtp_addr":addr.to_string()}))
        .await;
    let e = answer(&mut sb).await;
    assert_eq!(e["code"], "already_joined", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("another node"),
        "{e}"
    );
    // Once alice left node A (the store hears of it a moment later), the name is free on node B.
    sa.send(json!({"type":"leave","channel":"ops"})).await;
    sa.expect_type("left").await;
    let t0 = Instant::now();
    loop {
        sb.send(json!({"type":"join","channel":"ops","member":"alice","transport":"rtp","rtp_addr":addr.to_string()}))
            .await;
        let v = answer(&mut sb).await;
        if v["type"] == "joined" {
            break;
        }
        assert_eq!(v["code"], "already_joined", "{v}");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the name stayed taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[path = "support/webrtc_client.rs"]
mod webrtc_client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_offers_that_never_connect_do_not_lock_out_other_clients() {
    // By default one connection may have 8 WebRTC joins waiting for ICE/DTLS.
    let srv = local_server(|_| {});
    let (_pc, _t, _h, _s, sdp) = webrtc_client::offer(false).await;
    let mut bot = Signal::connect(srv.http_addr).await;
    for i in 0..10 {
        bot.send(json!({"type":"join","channel":format!("c{i}"),"member":"bot","sdp":sdp}))
            .await;
    }
    let mut codes = Vec::new();
    for _ in 0..10 {
        let v = answer(&mut bot).await;
        codes.push(v["code"].as_str().unwrap_or("joined").to_string());
    }
    assert_eq!(
        codes.iter().filter(|c| *c == "joined").count(),
        8,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| *c == "rate_limited").count(),
        2,
        "{codes:?}"
    );
    srv.shutdown();

    // With the per-client limits lifted (e.g. many browsers behind one NAT), 100 offers that never
    // connect fill the shard's 64 handshake slots — and still another client's join gets through.
    let srv = local_server(|a| {
        a.limits.max_webrtc_pending_per_connection = 1000;
        a.limits.max_webrtc_pending_per_ip = 1000;
    });
    // Connect all first, then offer: the 100 WebSocket handshakes can take longer than the eviction
    // grace on a loaded machine, and an offer sent after the first one's grace may rightly evict it.
    let mut bots = Vec::new();
    for _ in 0..100 {
        bots.push(Signal::connect(srv.http_addr).await);
    }
    for (i, bot) in bots.iter_mut().enumerate() {
        bot.send(json!({"type":"join","channel":"ops","member":format!("bot{i}"),"sdp":sdp}))
            .await;
    }
    // The first 64 are answered; the rest are told to retry (`unavailable`): the oldest offers are
    // younger than the eviction grace, so their clients might still be on the way.
    let mut codes = Vec::new();
    for bot in &mut bots {
        let v = answer(bot).await;
        codes.push(v["code"].as_str().unwrap_or("joined").to_string());
    }
    let joined = codes.iter().filter(|c| *c == "joined").count();
    assert_eq!(joined, talkgroup::shard::MAX_HANDSHAKES, "{codes:?}");
    assert!(
        codes.iter().all(|c| c == "joined" || c == "unavailable"),
        "{codes:?}"
    );
    // Once the grace has passed, the unused offers make room for a real client.
    tokio::time::sleep(talkgroup::shard::EVICT_GRACE + Duration::from_millis(100)).await;
    let mut s = Signal::connect(srv.http_addr).await;
    let mut alice = webrtc_client::WebRtcMember::join(&mut s, "ops", "alice").await;
    alice
        .wait_state(
            webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState::Connected,
            Duration::from_secs(5),
        )
        .await;
    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    assert!(
        metric(&body, "talkgroup_webrtc_peers_evicted_total") >= 1,
        "unused offers made room: {body}"
    );
    srv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_node_that_does_not_hold_the_grant_cannot_inject_audio() {
    use talkgroup::relay::RelayKey;
    const SECRET: &str = "cluster-secret";
    let redis = RedisServer::start();
    let node = |id: &str| {
        let mut a = ServeArgs::local_test();
        a.store = StoreKind::Redis;
        a.redis_url = Some(redis.url());
        a.node_id = Some(id.into());
        a.key_prefix = "inj".into();
        a.cluster_secret = Some(SECRET.into());
        Server::start(a).expect("node starts")
    };
    let (a, b) = (node("node-a"), node("node-b"));
    let mut sa = Signal::connect(a.http_addr).await;
    let mut speaker = RtpMember::join(&mut sa, "ops", "alice").await;
    let mut sb = Signal::connect(b.http_addr).await;
    let listener = RtpMember::join(&mut sb, "ops", "lena").await;
    // A rogue process registers itself as node "mallory" serving "ops", with a relay address it owns:
    // every node then accepts relay packets from that address — as a node, not as the grant's holder.
    let rogue = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let rogue_addr = rogue.local_addr().unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("inj:tg:{nodes}:node:mallory")
        .arg(serde_json::json!({"relay":[rogue_addr, rogue_addr]}).to_string())
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let far = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 60_000;
    let _: () = redis::cmd("ZADD")
        .arg("inj:tg:{nodes}:live")
        .arg(far)
        .arg("mallory")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SADD")
        .arg("inj:tg:{ops}:nodes")
        .arg("mallory")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg("inj:tg:{ops}:events")
        .arg(r#"{"kind":"channel_node","channel":"ops","node":"mallory","present":true}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    // Alice holds the floor on node A; B forwards A's relayed stream to lena.
    let t0 = Instant::now();
    let epoch = loop {
        sa.press("ops").await;
        let v = client::floor_any(&mut sa, "ops", &["granted", "denied"]).await;
        if v["state"] == "granted" {
            break v["epoch"].as_u64().unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never granted: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let t0 = Instant::now();
    loop {
        speaker.send_rtp(b"real").await;
        if !listener
            .recv_rtp(1, Duration::from_millis(100))
            .await
            .is_empty()
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the relay never carried alice"
        );
    }
    let entry: String = redis::cmd("GET")
        .arg("inj:tg:{nodes}:node:node-b")
        .query_async(&mut conn)
        .await
        .unwrap();
    let entry: serde_json::Value = serde_json::from_str(&entry).unwrap();
    let addrs: Vec<SocketAddr> = serde_json::from_value(entry["relay"].clone()).unwrap();
    let b_relay = addrs[talkgroup::shard::shard_of("ops", addrs.len())];
    let key = RelayKey::new(SECRET.as_bytes());
    let mut buf = Vec::new();
    // Forged streams at the current epoch: as "mallory", and claiming to be node-a (the holder) from
    // mallory's address.
    for (claimed_node, i) in [("mallory", 0u16), ("node-a", 1)] {
        for n in 0..20u16 {
            let rtp = talkgroup::rtp::build_packet(false, 111, i * 100 + n, 0, 77, b"forged");
            key.encode(&mut buf, "ops", epoch, "alice", claimed_node, &rtp);
            rogue.send_to(&buf, b_relay).await.unwrap();
        }
    }
    let heard = listener.recv_rtp(40, Duration::from_millis(500)).await;
    assert!(
        heard.iter().all(|p| p.4 != b"forged"),
        "a forged stream reached a listener"
    );
    let (_, body) = http_get(b.http_addr, "/metrics").await;
    let dropped = |shard: u8| {
        metric(
            &body,
            &format!(
                "talkgroup_relay_dropped_total{{shard=\"{shard}\",reason=\"not_grant_holder\"}}"
            ),
        )
    };
    assert_eq!(dropped(0) + dropped(1), 40, "{body}");
}
