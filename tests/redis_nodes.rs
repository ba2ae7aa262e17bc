//! Two talkgroup nodes sharing one test-owned `redis-server`: one floor per channel across nodes, fail-safe
//! denial when Redis goes away, recovery without restarting the nodes, and a killed node's lease running
//! out. Needs `redis-server` on PATH (the suite says how to install it when it is missing).

#[path = "support/client.rs"]
mod client;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use client::{floor_any, http_get, RtpMember, Signal};
use rtpio::testing::RedisServer;
use serde_json::{json, Value};
use talkgroup::config::{ServeArgs, StoreKind};
use talkgroup::server::Server;

fn node_args(redis: &RedisServer, name: &str) -> ServeArgs {
    let mut a = ServeArgs::local_test();
    a.store = StoreKind::Redis;
    a.redis_url = Some(redis.url());
    a.node_id = Some(name.into());
    a.key_prefix = "test".into();
    a
}

fn node(redis: &RedisServer, name: &str) -> Server {
    Server::start(node_args(redis, name)).expect("node starts")
}

/// Until the store subscription is up, presses are denied `unavailable`: press until granted or busy.
async fn wait_until_store_up(s: &mut Signal, channel: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        s.press(channel).await;
        let v = floor_any(s, channel, &["granted", "denied"]).await;
        if v["state"] == "granted" {
            s.release(channel).await;
            floor_any(s, channel, &["idle"]).await;
            return;
        }
        assert!(Instant::now() < deadline, "store never came up: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn simultaneous_presses_on_two_nodes_grant_exactly_one() {
    let redis = RedisServer::start();
    let (na, nb) = (node(&redis, "node-a"), node(&redis, "node-b"));
    let mut sa = Signal::connect(na.http_addr).await;
    let mut sb = Signal::connect(nb.http_addr).await;
    let _a = RtpMember::join(&mut sa, "race", "alice").await;
    let _b = RtpMember::join(&mut sb, "race", "bob").await;
    wait_until_store_up(&mut sa, "race").await;
    wait_until_store_up(&mut sb, "race").await;
    sa.settle(Duration::from_millis(300)).await;
    sb.settle(Duration::from_millis(300)).await;
    let mut last_epoch = 0u64;
    let (mut wins_a, mut wins_b) = (0, 0);
    for round in 0..1000 {
        // Both presses in flight at once, each node's first half the time.
        if round % 2 == 0 {
            tokio::join!(sa.press("race"), sb.press("race"));
        } else {
            tokio::join!(sb.press("race"), sa.press("race"));
        }
        let ra = floor_any(&mut sa, "race", &["granted", "denied"]).await;
        let rb = floor_any(&mut sb, "race", &["granted", "denied"]).await;
        let (winner, loser, wsig, lname) = match (ra["state"].as_str(), rb["state"].as_str()) {
            (Some("granted"), Some("denied")) => (&ra, &rb, &mut sa, "bob"),
            (Some("denied"), Some("granted")) => (&rb, &ra, &mut sb, "alice"),
            other => panic!("round {round}: not exactly one grant: {other:?} {ra} {rb}"),
        };
        let epoch = winner["epoch"].as_u64().unwrap();
        assert!(
            epoch > last_epoch,
            "round {round}: epoch {epoch} after {last_epoch}"
        );
        last_epoch = epoch;
        assert_eq!(loser["reason"], "busy", "round {round}: {loser}");
        let winner_name = winner["speaker"].as_str().unwrap();
        assert_ne!(winner_name, lname);
        assert_eq!(loser["speaker"], winner_name, "the loser is told who won");
        if winner_name == "alice" {
            wins_a += 1
        } else {
            wins_b += 1
        }
        wsig.release("race").await;
        // Both nodes see the floor free again before the next round.
        floor_any(&mut sa, "race", &["idle"]).await;
        floor_any(&mut sb, "race", &["idle"]).await;
    }
    println!("1000 rounds: alice won {wins_a}, bob won {wins_b}");
    assert_eq!(wins_a + wins_b, 1000);
    // Presses that really race are won by either node: one that always won would be serialising them.
    assert!(
        wins_a >= 10 && wins_b >= 10,
        "alice won {wins_a}, bob {wins_b}"
    );
}

#[tokio::test]
async fn a_grant_on_one_node_reaches_members_on_the_other() {
    let redis = RedisServer::start();
    let (na, nb) = (node(&redis, "node-a"), node(&redis, "node-b"));
    let mut sa = Signal::connect(na.http_addr).await;
    let mut sb = Signal::connect(nb.http_addr).await;
    let _a = RtpMember::join(&mut sa, "x", "alice").await;
    let _b = RtpMember::join(&mut sb, "x", "bob").await;
    wait_until_store_up(&mut sa, "x").await;
    wait_until_store_up(&mut sb, "x").await;
    // Forget the floor traffic of the set-up (each saw the other's test grant).
    sa.settle(Duration::from_millis(300)).await;
    sb.settle(Duration::from_millis(300)).await;
    let mut delays = vec![];
    for _ in 0..20 {
        let t0 = Instant::now();
        sa.press("x").await;
        let g = floor_any(&mut sa, "x", &["granted"]).await;
        let t = floor_any(&mut sb, "x", &["taken"]).await;
        delays.push(t0.elapsed());
        assert_eq!(
            (t["speaker"].clone(), t["epoch"].clone()),
            (g["speaker"].clone(), g["epoch"].clone())
        );
        sa.release("x").await;
        floor_any(&mut sb, "x", &["idle"]).await;
        floor_any(&mut sa, "x", &["idle"]).await;
    }
    delays.sort();
    println!(
        "press on A -> taken on B: median {:?}, max {:?}",
        delays[10], delays[19]
    );
    // A third member joining on B is told alice is in the channel (joined.members spans nodes).
    let mut sc = Signal::connect(nb.http_addr).await;
    sc.send(serde_json::json!({"type":"join","channel":"x","member":"carol","transport":"rtp","rtp_addr":"127.0.0.1:9"})).await;
    let j = sc.expect_type("joined").await;
    let members: Vec<&str> = j["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        members.contains(&"alice") && members.contains(&"bob"),
        "{j}"
    );
    // Presence across nodes: alice, on node A, is told carol joined on node B.
    let p = sa
        .expect("presence of carol", |v| {
            v["type"] == "presence" && v["joined"] == "carol"
        })
        .await;
    assert_eq!(p["channel"], "x");
}

#[tokio::test]
async fn redis_outage_denies_presses_revokes_by_lease_and_recovers() {
    let mut redis = RedisServer::start();
    let na = node(&redis, "node-a");
    let mut sa = Signal::connect(na.http_addr).await;
    let mut sb = Signal::connect(na.http_addr).await;
    let mut a = RtpMember::join(&mut sa, "o", "alice").await;
    let b = RtpMember::join(&mut sb, "o", "bob").await;
    wait_until_store_up(&mut sa, "o").await;
    sa.press("o").await;
    floor_any(&mut sa, "o", &["granted"]).await;
    // Alice keeps talking while Redis dies.
    let talker = tokio::spawn(async move {
        for i in 0..400u32 {
            a.send_rtp(&i.to_be_bytes()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let killed = Instant::now();
    redis.kill();
    sb.press("o").await;
    let d = floor_any(&mut sb, "o", &["denied"]).await;
    assert!(d["reason"] == "unavailable" || d["reason"] == "busy", "{d}");
    let r = floor_any(&mut sa, "o", &["revoked"]).await;
    assert_eq!(r["reason"], "lease_lost");
    let lost_after = killed.elapsed();
    assert!(
        lost_after <= Duration::from_secs(3),
        "revoked after {lost_after:?}, lease TTL is 3 s"
    );
    // Revoked means no longer heard: alice still sends, bob receives nothing from her (what was in
    // flight at the revocation is let through first).
    let _ = b.recv_rtp(1000, Duration::from_millis(200)).await;
    let after = b.recv_rtp(1, Duration::from_secs(1)).await;
    assert!(
        after.is_empty(),
        "alice is still forwarded after lease_lost: {} packets",
        after.len()
    );
    // While Redis is down every press is denied unavailable (fail safe: never two speakers).
    sb.press("o").await;
    assert_eq!(
        floor_any(&mut sb, "o", &["denied"]).await["reason"],
        "unavailable"
    );
    redis.restart();
    let back = Instant::now();
    loop {
        sb.press("o").await;
        let v = floor_any(&mut sb, "o", &["granted", "denied"]).await;
        if v["state"] == "granted" {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "no grant {:?} after Redis came back: {v}",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "lease_lost {lost_after:?} after the kill; granted again {:?} after the restart",
        back.elapsed()
    );
    talker.abort();
}

#[tokio::test]
async fn a_killed_nodes_floor_frees_within_the_lease() {
    let redis = RedisServer::start();
    let nb = node(&redis, "node-b");
    let url = redis.url();
    let (mut child, http) = client::spawn_server(&[
        "--shards",
        "1",
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--key-prefix",
        "test",
        "--node-id",
        "node-a",
    ]);
    let mut sa = Signal::connect(http).await;
    let mut sb = Signal::connect(nb.http_addr).await;
    let _a = RtpMember::join(&mut sa, "k", "alice").await;
    let _b = RtpMember::join(&mut sb, "k", "bob").await;
    wait_until_store_up(&mut sb, "k").await;
    wait_until_store_up(&mut sa, "k").await;
    sa.press("k").await;
    floor_any(&mut sa, "k", &["granted"]).await;
    floor_any(&mut sb, "k", &["taken"]).await;
    child.0.kill().expect("kill -9");
    let _ = child.0.wait();
    let killed = Instant::now();
    loop {
        sb.press("k").await;
        let v = floor_any(&mut sb, "k", &["granted", "denied"]).await;
        if v["state"] == "granted" {
            break;
        }
        assert_eq!(v["reason"], "busy");
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "floor still held {:?} after the kill",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "floor of the killed node free after {:?} (lease TTL 3 s)",
        killed.elapsed()
    );
    assert!(killed.elapsed() <= Duration::from_millis(3500));
}

#[tokio::test]
async fn a_stale_event_changes_nothing() {
    let redis = RedisServer::start();
    let nb = node(&redis, "node-b");
    let mut sb = Signal::connect(nb.http_addr).await;
    let _b = RtpMember::join(&mut sb, "s", "bob").await;
    wait_until_store_up(&mut sb, "s").await;
    let publish = |msg: String| {
        let url = redis.url();
        async move {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let _: i64 = redis::cmd("PUBLISH")
                .arg("test:tg:{s}:events")
                .arg(msg)
                .query_async(&mut c)
                .await
                .unwrap();
        }
    };
    let grant = |epoch: u64, member: &str| {
        format!(
            r#"{{"kind":"grant","channel":"s","epoch":"{epoch}","member":"{member}","node":"node-z","priority":0}}"#
        )
    };
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let newer = now_us + 10_000_000;
    publish(grant(newer, "zed")).await;
    let t = floor_any(&mut sb, "s", &["taken"]).await;
    assert_eq!(
        (t["speaker"].as_str(), t["epoch"].as_u64()),
        (Some("zed"), Some(newer))
    );
    // Older grant and an idle for another epoch, delivered late: nothing changes.
    publish(grant(newer - 1, "old")).await;
    publish(format!(
        r#"{{"kind":"idle","channel":"s","epoch":"{}"}}"#,
        newer - 1
    ))
    .await;
    sb.send(serde_json::json!({"type":"ping","id":1})).await;
    sb.expect_type("pong").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sb.send(serde_json::json!({"type":"ping","id":2})).await;
    sb.expect_type("pong").await;
    assert!(
        !sb.backlog().iter().any(|v| v["type"] == "floor"),
        "a stale event reached the member: {:?}",
        sb.backlog()
    );
    let (_, body) = client::http_get(nb.http_addr, "/api/channels").await;
    let rows: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(rows[0]["speaker"], "zed");
    assert_eq!(rows[0]["epoch"].as_u64(), Some(newer));
}

/// `--placement redirect`: a channel is placed on the less-loaded node at its first join; a join on the
/// other node is answered `redirect` with the home's URL, and members who follow it hear each other.
#[tokio::test]
async fn joins_are_redirected_to_the_channels_home_node_and_members_there_hear_each_other() {
    let redis = RedisServer::start();
    let args = |name: &str| {
        let mut a = node_args(&redis, name);
        a.placement = talkgroup::control::Placement::Redirect;
        a
    };
    let na = Server::start(args("node-a")).expect("node starts");
    // Alone, node-a is the home of "busy" and carries its member: it is the busier node from now on.
    let mut sa = Signal::connect(na.http_addr).await;
    let _busy = RtpMember::join(&mut sa, "busy", "x").await;
    let nb = Server::start(args("node-b")).expect("node starts");
    // node-a reads the node table every second; node-b announces at start.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let follow = |v: &serde_json::Value| -> SocketAddr {
        assert_eq!(v["type"], "redirect", "{v}");
        let url = v["url"].as_str().expect("url");
        let host = url
            .strip_prefix("ws://")
            .and_then(|u| u.strip_suffix("/ws"))
            .expect("ws://HOST:PORT/ws");
        host.parse().expect("an address")
    };
    let mut members = Vec::new();
    for name in ["ann", "bob"] {
        let mut s = Signal::connect(na.http_addr).await;
        s.send(
            json!({"type":"join","channel":"p","member":name,"transport":"rtp",
            "rtp_addr":"127.0.0.1:9","id":1}),
        )
        .await;
        let v = s
            .expect("redirect", |v| {
                v["type"] == "redirect" || v["type"] == "joined"
            })
            .await;
        assert_eq!(v["id"], 1, "{v}");
        let home = follow(&v);
        assert_eq!(home, nb.http_addr, "placed on the idle node");
        let mut s = Signal::connect(home).await;
        let m = RtpMember::join(&mut s, "p", name).await;
        members.push((s, m));
    }
    let (mut s_ann, mut ann) = members.remove(0);
    let (_s_bob, bob) = members.remove(0);
    wait_until_store_up(&mut s_ann, "p").await;
    s_ann.press("p").await;
    floor_any(&mut s_ann, "p", &["granted"]).await;
    let t0 = Instant::now();
    loop {
        ann.send_rtp(b"home").await;
        if !bob.recv_rtp(1, Duration::from_millis(100)).await.is_empty() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "bob never heard ann");
    }
    let metrics = http_get(na.http_addr, "/metrics").await.1;
    assert!(
        metrics.contains("talkgroup_redirects_total 2"),
        "two joins redirected: {}",
        metrics
            .lines()
            .filter(|l| l.contains("redirect"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
