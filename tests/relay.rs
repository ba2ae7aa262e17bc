//! Three node processes on one test-owned `redis-server`, members of one channel spread over all three:
//! a speaker on any node is heard on every other node through the relay (one relay packet per remote node
//! per media packet), streams stay continuous across speaker changes between nodes, a `kill -9` of one node
//! is survived, and forged relay packets change nothing.

#[path = "support/client.rs"]
mod client;
#[path = "support/webrtc_client.rs"]
mod webrtc_client;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use client::{floor_any, http_get, metric, spawn_server, ChildGuard, RtpMember, Signal};
use rtpio::testing::RedisServer;
use serde_json::Value;
use talkgroup::relay::RelayKey;

const SECRET: &str = "test-cluster-secret";

struct Node {
    _child: ChildGuard,
    http: SocketAddr,
}

fn spawn_node(redis: &RedisServer, id: &str) -> Node {
    let url = redis.url();
    let (child, http) = spawn_server(&[
        "--shards",
        "2",
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--key-prefix",
        "relay",
        "--node-id",
        id,
        "--cluster-secret",
        SECRET,
    ]);
    Node {
        _child: child,
        http,
    }
}

/// Presses until granted (the store subscription may still be coming up, or a lease running out).
async fn take_floor(s: &mut Signal, channel: &str, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        s.press(channel).await;
        let v = floor_any(s, channel, &["granted", "denied"]).await;
        if v["state"] == "granted" {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "not granted within {within:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn relay_sent(node: &Node) -> u64 {
    metric(
        &http_get(node.http, "/metrics").await.1,
        "talkgroup_relay_sent_total",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_channel() {
    let mut redis = RedisServer::start();
    let nodes = vec![
        spawn_node(&redis, "node-a"),
        spawn_node(&redis, "node-b"),
        spawn_node(&redis, "node-c"),
    ];
    let mut sigs = Vec::new();
    let mut members = Vec::new();
    for (i, name) in ["ann", "ben", "cat"].iter().enumerate() {
        let mut s = Signal::connect(nodes[i].http).await;
        members.push(RtpMember::join(&mut s, "ops", name).await);
        sigs.push(s);
    }
    // A second member on node A: a local listener next to the remote ones.
    let mut s_extra = Signal::connect(nodes[0].http).await;
    let extra = RtpMember::join(&mut s_extra, "ops", "amy").await;
    // And a WebRTC member on node B: relayed audio reaches WebRTC listeners too.
    let mut s_wes = Signal::connect(nodes[1].http).await;
    let mut wes = webrtc_client::WebRtcMember::join(&mut s_wes, "ops", "wes").await;

    // Warm-up: ann talks until ben and cat hear her (store subscriptions up, registry read, targets set).
    take_floor(&mut sigs[0], "ops", Duration::from_secs(10)).await;
    let mut heard: Vec<Vec<client::Received>> = vec![vec![]; 4];
    let start = Instant::now();
    loop {
        members[0].send_rtp(&[9, 9]).await;
        let b = members[1].recv_rtp(1, Duration::from_millis(20)).await;
        let c = members[2].recv_rtp(1, Duration::from_millis(20)).await;
        heard[1].extend(b);
        heard[2].extend(c);
        if !heard[1].is_empty() && !heard[2].is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "relay never started: ben {} cat {}",
            heard[1].len(),
            heard[2].len()
        );
    }
    // Drain what is still in flight, then release.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (i, m) in members.iter().enumerate().skip(1) {
        heard[i].extend(m.recv_rtp(10_000, Duration::from_millis(100)).await);
    }
    heard[3].extend(extra.recv_rtp(10_000, Duration::from_millis(100)).await);
    sigs[0].release("ops").await;
    for s in sigs.iter_mut() {
        floor_any(s, "ops", &["idle"]).await;
    }

    // A speaker on each node in turn; every other member hears exactly its packets.
    for round in 0..2 {
        for speaker in 0..3 {
            for s in sigs.iter_mut() {
                s.settle(Duration::from_millis(50)).await;
            }
            wes.clear();
            take_floor(&mut sigs[speaker], "ops", Duration::from_secs(5)).await;
            // Let the grant reach the other nodes (pub/sub) before talking: relayed packets of an epoch a
            // node has not seen yet are dropped by design.
            for (i, s) in sigs.iter_mut().enumerate() {
                if i != speaker {
                    floor_any(s, "ops", &["taken"]).await;
                }
            }
            let before = relay_sent(&nodes[speaker]).await;
            let payloads: Vec<Vec<u8>> = (0..50u8).map(|i| vec![speaker as u8, round, i]).collect();
            for p in &payloads {
                members[speaker].send_rtp(p).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            for (i, m) in members.iter().enumerate() {
                if i == speaker {
                    continue;
                }
                let got = m.recv_rtp(50, Duration::from_secs(5)).await;
                assert_eq!(
                    got.iter().map(|p| p.4.clone()).collect::<Vec<_>>(),
                    payloads,
                    "{} on round {round} speaker {speaker}",
                    m.name
                );
                heard[i].extend(got);
            }
            if speaker != 0 {
                let got = extra.recv_rtp(50, Duration::from_secs(5)).await;
                assert_eq!(got.len(), 50, "amy (node A) hears node {speaker}");
                heard[3].extend(got);
            } else {
                heard[3].extend(extra.recv_rtp(50, Duration::from_secs(5)).await);
            }
            let got = wes.recv_rtp(50, Duration::from_secs(5)).await;
            let got: Vec<Vec<u8>> = got.iter().map(|p| p.payload.to_vec()).collect();
            assert_eq!(
                got, payloads,
                "wes (WebRTC, node B) on round {round} speaker {speaker}"
            );
            let sent = relay_sent(&nodes[speaker]).await - before;
            assert_eq!(
                sent, 100,
                "exactly one relay packet per remote node (2) per media packet (50)"
            );
            sigs[speaker].release("ops").await;
            for s in sigs.iter_mut() {
                floor_any(s, "ops", &["idle"]).await;
            }
        }
    }
    // Every listener's stream is continuous across all speaker changes, on every node.
    for (i, h) in heard.iter().enumerate() {
        assert!(h.len() >= 100, "listener {i} heard {}", h.len());
        assert!(h.iter().all(|p| p.0 == h[0].0), "one SSRC per listener");
        for w in h.windows(2) {
            assert_eq!(
                w[1].1,
                w[0].1.wrapping_add(1),
                "listener {i}: sequence gap or repeat"
            );
            assert!(
                w[1].2.wrapping_sub(w[0].2) < 1 << 30,
                "listener {i}: timestamp went back"
            );
        }
        let markers = h.iter().filter(|p| p.3).count();
        assert!(
            markers >= 4,
            "listener {i}: a marker at each new speaker ({markers})"
        );
    }

    // Forged relay packets: wrong secret, unregistered sender, old epoch. Nothing reaches ben.
    let registry = redis::Client::open(redis.url()).unwrap();
    let mut conn = registry.get_multiplexed_async_connection().await.unwrap();
    let relay_b: String = redis::cmd("GET")
        .arg("relay:tg:{nodes}:node:node-b")
        .query_async(&mut conn)
        .await
        .unwrap();
    let relay_b: serde_json::Value = serde_json::from_str(&relay_b).unwrap();
    let relay_addrs: Vec<SocketAddr> = serde_json::from_value(relay_b["relay"].clone()).unwrap();
    let target = relay_addrs[talkgroup::shard::shard_of("ops", relay_addrs.len())];
    // (Counted as deltas: during warm-up a node may relay before the receiver has read its address.)
    let dropped_at = |body: &str, reason: &str| {
        metric(
            body,
            &format!("talkgroup_relay_dropped_total{{shard=\"0\",reason=\"{reason}\"}}"),
        ) + metric(
            body,
            &format!("talkgroup_relay_dropped_total{{shard=\"1\",reason=\"{reason}\"}}"),
        )
    };
    let before = http_get(nodes[1].http, "/metrics").await.1;
    let forger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let rtp = talkgroup::rtp::build_packet(false, 111, 1, 1, 1, b"forged");
    let mut buf = Vec::new();
    RelayKey::new(b"wrong secret").encode(&mut buf, "ops", u64::MAX / 4, "ann", "node-a", &rtp);
    forger.send_to(&buf, target).await.unwrap();
    RelayKey::new(SECRET.as_bytes()).encode(&mut buf, "ops", u64::MAX / 4, "ann", "node-x", &rtp);
    forger.send_to(&buf, target).await.unwrap();
    RelayKey::new(SECRET.as_bytes()).encode(&mut buf, "ops", 1, "ann", "node-a", &rtp);
    forger.send_to(&buf, target).await.unwrap();
    // The epoch check proper: the forger registers itself as a node (it has the key and can write the
    // registry, as a compromised node could), so its packets pass the sender checks and meet the
    // channel's epoch rule — an old epoch is dropped as stale.
    let forger_addr = forger.local_addr().unwrap();
    let far = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 60_000;
    let _: () = redis::cmd("SET")
        .arg("relay:tg:{nodes}:node:forger")
        .arg(serde_json::json!({"relay": [forger_addr, forger_addr]}).to_string())
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg("relay:tg:{nodes}:live")
        .arg(far)
        .arg("forger")
        .query_async(&mut conn)
        .await
        .unwrap();
    RelayKey::new(SECRET.as_bytes()).encode(&mut buf, "ops", 1, "ann", "forger", &rtp);
    let t0 = Instant::now();
    loop {
        // Until node B has read the forger into its node table (once a second).
        forger.send_to(&buf, target).await.unwrap();
        let (_, body) = http_get(nodes[1].http, "/metrics").await;
        if dropped_at(&body, "stale_epoch") > dropped_at(&before, "stale_epoch") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the registered forger's old epoch never reached the epoch check: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        members[1]
            .recv_rtp(1, Duration::from_millis(300))
            .await
            .is_empty(),
        "a forged packet was forwarded"
    );
    let (_, body) = http_get(nodes[1].http, "/metrics").await;
    let delta = |reason: &str| dropped_at(&body, reason) - dropped_at(&before, reason);
    assert_eq!(delta("bad_tag"), 1, "{body}");
    // node-x, node-a from an unregistered address, and the forger's tries before B read it in.
    assert!(delta("unknown_node") >= 2, "{body}");
    assert!(delta("stale_epoch") >= 1, "{body}");

    // kill -9 node C while cat holds the floor: the others keep talking, cat leaves presence, the floor frees.
    take_floor(&mut sigs[2], "ops", Duration::from_secs(5)).await;
    floor_any(&mut sigs[1], "ops", &["taken"]).await;
    let mut node_c = nodes.into_iter().collect::<Vec<_>>();
    let node_c_child = node_c.pop().unwrap();
    let killed = Instant::now();
    drop(node_c_child); // SIGKILL
    let g = take_floor(&mut sigs[1], "ops", Duration::from_secs(5)).await;
    let freed = killed.elapsed();
    assert_eq!(g["speaker"], "ben");
    // Node A learns of the grant through the store, not from ben's packets (an epoch a packet carries is
    // not a grant): once ann is told, A's shard has the grant queued before any of ben's packets can
    // reach it, and nothing may be lost.
    sigs[0]
        .expect_within("ann told ben talks", Duration::from_secs(5), |v| {
            v["type"] == "floor" && v["state"] == "taken" && v["speaker"] == "ben"
        })
        .await;
    for i in 0..20u8 {
        members[1].send_rtp(&[1, 7, i]).await;
    }
    let got = members[0].recv_rtp(20, Duration::from_secs(5)).await;
    assert_eq!(
        got.len(),
        20,
        "ann (node A) still hears ben (node B) after node C died"
    );
    let left = sigs[0]
        .expect_within("presence left cat", Duration::from_secs(16), |v| {
            v["type"] == "presence" && v["left"] == "cat"
        })
        .await;
    let gone = killed.elapsed();
    assert_eq!(left["channel"], "ops");
    assert!(
        gone < Duration::from_secs(16),
        "cat left presence after {gone:?}"
    );
    println!(
        "after kill -9 of node C: floor free in {freed:?}, cat gone from presence in {gone:?}"
    );

    sigs[1].release("ops").await; // (ben's floor from the kill step, if T1 has not ended it yet)
                                  // (After the kill, on the two surviving nodes.) Redis dies while ann talks: audio already flowing keeps crossing nodes (the relay needs no Redis per
                                  // packet) until the fail-safe lease revokes her; when Redis returns (empty), everything recovers.
    for s in sigs.iter_mut().take(2) {
        s.settle(Duration::from_millis(50)).await;
    }
    take_floor(&mut sigs[0], "ops", Duration::from_secs(5)).await;
    floor_any(&mut sigs[1], "ops", &["taken"]).await;
    redis.kill();
    for i in 0..20u8 {
        members[0].send_rtp(&[0, 0xee, i]).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for m in &members[1..2] {
        let got = m.recv_rtp(20, Duration::from_secs(2)).await;
        assert_eq!(
            got.len(),
            20,
            "{} stopped hearing ann when Redis died",
            m.name
        );
    }
    let r = floor_any(&mut sigs[0], "ops", &["revoked"]).await;
    assert_eq!(r["reason"], "lease_lost");
    redis.restart();
    let back = Instant::now();
    take_floor(&mut sigs[1], "ops", Duration::from_secs(20)).await;
    let start = Instant::now();
    let mut heard_again = [false];
    while heard_again != [true] {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "relay did not recover after Redis came back: {heard_again:?}"
        );
        members[1].send_rtp(&[1, 0xee]).await;
        for (k, i) in [0usize].iter().enumerate() {
            if !members[*i]
                .recv_rtp(1, Duration::from_millis(20))
                .await
                .is_empty()
            {
                heard_again[k] = true;
            }
        }
    }
    println!(
        "Redis restarted: ben granted and heard on node A {:?} after the restart",
        back.elapsed()
    );
    sigs[1].release("ops").await;
    for s in sigs.iter_mut().take(2) {
        floor_any(s, "ops", &["idle"]).await;
    }
}

/// A node that dies while Redis is down leaves nothing in the store to evict once Redis comes back empty:
/// the surviving node still tells its clients that node's members left, from its own view of who was on
/// which node (`src/signal/remote.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_during_a_redis_outage_leaves_presence() {
    let mut redis = RedisServer::start();
    let a = spawn_node(&redis, "node-a");
    let b = spawn_node(&redis, "node-b");
    let mut sa = Signal::connect(a.http).await;
    let _ann = RtpMember::join(&mut sa, "ops", "ann").await;
    let mut sb = Signal::connect(b.http).await;
    let _ben = RtpMember::join(&mut sb, "ops", "ben").await;
    sa.expect_within("presence joined ben", Duration::from_secs(10), |v| {
        v["type"] == "presence" && v["joined"] == "ben"
    })
    .await;
    // Node A re-reads the channel's nodes every second: let it see node B live.
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.kill();
    drop(b); // SIGKILL while Redis is down: node B never re-registers
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    let back = Instant::now();
    let left = sa
        .expect_within("presence left ben", Duration::from_secs(30), |v| {
            v["type"] == "presence" && v["left"] == "ben"
        })
        .await;
    assert_eq!(left["channel"], "ops");
    println!(
        "node B died during a Redis outage: ben left node A's presence {:?} after Redis came back",
        back.elapsed()
    );
}

/// Two nodes started as the README says, with no cluster secret: they agree on a relay key through Redis
/// and hear each other. (An explicit `--cluster-secret` still wins: `three_nodes_one_channel` signs
/// forged packets with `SECRET` and sees them refused for their sender, not their tag.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_without_a_secret_agree_on_a_key_and_hear_each_other() {
    let redis = RedisServer::start();
    let url = redis.url();
    let node = |id: &'static str| {
        spawn_server(&[
            "--shards",
            "2",
            "--store",
            "redis",
            "--redis-url",
            &url,
            "--key-prefix",
            "auto",
            "--node-id",
            id,
        ])
    };
    let (_a, http_a) = node("node-a");
    let (_b, http_b) = node("node-b");
    let mut sa = Signal::connect(http_a).await;
    let mut sb = Signal::connect(http_b).await;
    let mut ann = RtpMember::join(&mut sa, "ops", "ann").await;
    let ben = RtpMember::join(&mut sb, "ops", "ben").await;
    take_floor(&mut sa, "ops", Duration::from_secs(10)).await;
    floor_any(&mut sb, "ops", &["taken"]).await;
    // Until the nodes have read each other from the registry (≤ 1 s), the first packets go nowhere.
    let frames = client::speech_frames();
    let start = Instant::now();
    loop {
        ann.send_rtp(&frames[0]).await;
        if !ben.recv_rtp(1, Duration::from_millis(20)).await.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "ben never heard ann across nodes"
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    ben.recv_rtp(10_000, Duration::from_millis(100)).await;
    for frame in frames.iter().take(100) {
        ann.send_rtp(frame).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let heard = ben.recv_rtp(100, Duration::from_secs(5)).await;
    assert_eq!(heard.len(), 100, "every packet crossed the relay");
    assert!(heard
        .iter()
        .zip(frames.iter())
        .all(|(got, sent)| got.4 == *sent));

    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key: String = redis::cmd("GET")
        .arg("auto:tg:cluster_key")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(key.len(), 64, "256 random bits, hex");
}
