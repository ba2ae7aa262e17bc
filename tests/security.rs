//! Identity, rights and limits end to end over 127.0.0.1: each attack of issue #11 is a test that fails
//! on a server without them. The server runs as operators run it (`talkgroup serve --auth-key …`), and
//! tokens are minted with `talkgroup token`, the command the README gives.

#[path = "support/client.rs"]
mod client;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use client::{http_get, http_get_with, metric, spawn_server, RtpMember, Signal};
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
