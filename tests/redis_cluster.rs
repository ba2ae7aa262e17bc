//! The Redis store on a real Redis Cluster that each test starts (three masters, one replica each; see
//! `rtpio::testing::RedisCluster`): the floor and presence through sharded pub/sub, two talkgroup nodes
//! acting as one, and a master killed with its replica promoted. Needs `redis-server` and `redis-cli` on
//! PATH (the suite says how to install them when they are missing).

#[path = "support/client.rs"]
mod client;
#[path = "support/replicated.rs"]
mod replicated;

use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{floor_any, RtpMember, Signal};
use replicated::{heard, is_floor, next_channel, next_event, press, take_floor, PREFIX};
use rtpio::testing::RedisCluster;
use talkgroup::config::{ServeArgs, StoreKind};
use talkgroup::server::{Server, LEASE};
use talkgroup::state::redis::{RedisConfig, RedisStore, Topology};
use talkgroup::state::{Acquired, FloorStore, NodeInfo, Registry, SessionStore, StoreEvent};

async fn store(cluster: &RedisCluster, node: &str) -> Arc<RedisStore> {
    let mut config = RedisConfig::new("redis://127.0.0.1/", PREFIX, node);
    config.topology = Topology::Cluster {
        nodes: cluster.seeds(),
    };
    Arc::new(
        RedisStore::connect(config)
            .await
            .expect("connect to the test cluster"),
    )
}

/// Ten channels spread over the three masters' slots: every script and event stays in its channel's
/// slot, and the member's reverse index (another slot) is written apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floor_and_presence_through_a_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("cluster thread");
    let (a, b) = (
        store(&cluster, "node-a").await,
        store(&cluster, "node-b").await,
    );
    assert_eq!(a.publish_verb(), "SPUBLISH");
    let channels: Vec<String> = (0..10).map(|i| format!("ch{i}")).collect();
    // Node B serves every channel: its subscriber follows them (SSUBSCRIBE per channel), each watch
    // confirmed once the cluster confirmed the subscription.
    let (watch, mut events) = b.subscribe();
    next_event(&mut events, Duration::from_secs(10), |e| {
        *e == StoreEvent::Resync
    })
    .await;
    for ch in &channels {
        b.set_channel_node(ch, "node-b", true)
            .await
            .expect("register");
        watch.watch(ch, true);
        next_event(
            &mut events,
            Duration::from_secs(5),
            |e| matches!(e, StoreEvent::Watching { channel } if channel == ch),
        )
        .await;
    }
    for ch in &channels {
        assert!(
            a.join(ch, "ann", "node-a").await.expect("join"),
            "join {ch}"
        );
        next_event(&mut events, Duration::from_secs(2), |e| {
            matches!(e, StoreEvent::Presence { channel, member, joined: true, .. }
                if channel == ch && member == "ann")
        })
        .await;
        let epoch = match a.acquire(press(ch, "ann")).await.expect("acquire") {
            Acquired::Granted { epoch } => epoch,
            other => panic!("{ch}: {other:?}"),
        };
        match b.acquire(press(ch, "bob")).await.expect("acquire") {
            Acquired::Busy(h) => assert_eq!((h.member.as_str(), h.epoch), ("ann", epoch)),
            other => panic!("{ch}: expected busy, got {other:?}"),
        }
        let got = next_event(&mut events, Duration::from_secs(2), is_floor(ch, true)).await;
        assert!(matches!(got, StoreEvent::Floor { epoch: e, .. } if e == epoch));
        assert!(a.renew(ch, epoch, LEASE.ttl).await.expect("renew"));
        assert!(a.release(ch, epoch).await.expect("release"));
        next_event(&mut events, Duration::from_secs(2), is_floor(ch, false)).await;
    }
    let mut joined = a.channels_of("ann").await.expect("channels_of");
    joined.sort();
    let mut want = channels.clone();
    want.sort();
    assert_eq!(joined, want, "the reverse index spans slots");
    a.leave(&channels[0], "ann", "node-a").await.expect("leave");
    next_event(&mut events, Duration::from_secs(2), |e| {
        matches!(e, StoreEvent::Presence { joined: false, .. })
    })
    .await;
    assert!(a.members(&channels[0]).await.expect("members").is_empty());
    // The registry: every node key shares the `{nodes}` slot with the live set, read in one script;
    // a channel's registrations are in the channel's slot.
    for (store, id, port) in [(&a, "node-a", 41000), (&b, "node-b", 42000)] {
        let info = NodeInfo {
            node: id.into(),
            relay: vec![([127, 0, 0, 1], port).into()],
            ..NodeInfo::default()
        };
        store.announce(&info, LEASE.ttl).await.expect("announce");
        store
            .set_channel_node(&channels[2], id, true)
            .await
            .expect("register");
    }
    let mut registered = a.channel_nodes(&channels[2]).await.expect("channel_nodes");
    registered.sort();
    assert_eq!(registered, ["node-a", "node-b"]);
    let table = a.nodes().await.expect("nodes");
    let mut ids: Vec<&str> = table.live.iter().map(|n| n.node.as_str()).collect();
    ids.sort();
    assert_eq!((ids, table.dead.len()), (vec!["node-a", "node-b"], 0));
    // A node's members evicted from a channel: the channel's keys in one transaction, the index apart.
    let gone = b.evict_node(&channels[1], "node-a").await.expect("evict");
    assert_eq!(gone, vec!["ann".to_string()]);
    assert!(!a
        .channels_of("ann")
        .await
        .expect("channels_of")
        .contains(&channels[1]));

    // The link the subscriber is built on: sharded subscriptions made and dropped while it delivers.
    let mut link = a.open_link().await.expect("link");
    let (c3, c4) = (&channels[3], &channels[4]);
    let (e3, e4) = (a.events_channel(c3), a.events_channel(c4));
    assert_eq!(e3, format!("{PREFIX}:tg:{{{c3}}}:events"));
    link.subscribe(&e3).await.expect("subscribe");
    link.subscribe(&e4).await.expect("subscribe");
    a.join(c3, "zed", "node-a").await.expect("join");
    assert_eq!(next_channel(&mut link).await, Some(e3.clone()));
    a.join(c4, "zed", "node-a").await.expect("join");
    assert_eq!(next_channel(&mut link).await, Some(e4.clone()));
    link.unsubscribe(&e3).await.expect("unsubscribe");
    a.leave(c3, "zed", "node-a").await.expect("leave");
    a.leave(c4, "zed", "node-a").await.expect("leave");
    assert_eq!(
        next_channel(&mut link).await,
        Some(e4),
        "nothing more from an unsubscribed channel"
    );
    link.ping().await.expect("ping every master");
}

/// Kills the master serving `key` on a blocking thread (the failover takes seconds, the runtime keeps
/// running); returns the cluster and the time the failover took.
async fn kill_master_of(cluster: RedisCluster, key: &str) -> (RedisCluster, Duration) {
    let key = key.to_string();
    let (cluster, killed) = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        let killed = cluster.kill_master_of(&key);
        (cluster, killed)
    })
    .await
    .expect("failover thread");
    let (_, took) = killed.unwrap_or_else(|e| panic!("failover: {e}"));
    (cluster, took)
}

/// A floor held when its master dies: the replica, promoted, has the lock (the grant waited for it);
/// once its lease runs out another member gets the floor with a greater epoch, and the subscriber
/// reports `Down` then `Resync` and delivers events again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_and_the_floor_works_again() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("cluster thread");
    let (a, b) = (
        store(&cluster, "node-a").await,
        store(&cluster, "node-b").await,
    );
    let (watch, mut events) = b.subscribe();
    next_event(&mut events, Duration::from_secs(10), |e| {
        *e == StoreEvent::Resync
    })
    .await;
    b.set_channel_node("ops", "node-b", true)
        .await
        .expect("register");
    watch.watch("ops", true);
    next_event(
        &mut events,
        Duration::from_secs(5),
        |e| matches!(e, StoreEvent::Watching { channel } if channel == "ops"),
    )
    .await;
    let first = loop {
        // Until the subscription to the channel is up, the grant may go unseen: release and retry.
        let epoch = match a.acquire(press("ops", "ann")).await.expect("acquire") {
            Acquired::Granted { epoch } => epoch,
            other => panic!("{other:?}"),
        };
        let seen = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(e) = events.recv().await {
                if matches!(e, StoreEvent::Floor { epoch: x, .. } if x == epoch) {
                    return;
                }
            }
        })
        .await;
        if seen.is_ok() {
            break epoch;
        }
        a.release("ops", epoch).await.expect("release");
    };
    let killed_at = Instant::now();
    let (cluster, failover) = kill_master_of(cluster, &format!("{PREFIX}:tg:{{ops}}:floor")).await;
    println!("failover took {failover:?} (2-core sandbox)");
    next_event(&mut events, Duration::from_secs(5), |e| {
        *e == StoreEvent::Down
    })
    .await;
    next_event(&mut events, Duration::from_secs(10), |e| {
        *e == StoreEvent::Resync
    })
    .await;
    // The subscriber reopened before the registration was replayed? It resubscribes what it follows.
    let bound = LEASE.ttl + failover + Duration::from_secs(2);
    let second = loop {
        match b.acquire(press("ops", "bob")).await {
            Ok(Acquired::Granted { epoch }) => break epoch,
            Ok(Acquired::Busy(h)) => assert_eq!(
                (h.member.as_str(), h.epoch),
                ("ann", first),
                "only ann's grant may still hold the floor"
            ),
            Err(_) => {} // the cluster is still failing over
        }
        assert!(
            killed_at.elapsed() < bound,
            "the floor did not work again within lease + failover ({bound:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "floor granted again {:?} after the master was killed (2-core sandbox)",
        killed_at.elapsed()
    );
    assert!(
        second > first,
        "epochs never go back: {second} after {first}"
    );
    let got = next_event(&mut events, Duration::from_secs(2), is_floor("ops", true)).await;
    assert!(matches!(got, StoreEvent::Floor { epoch, .. } if epoch == second));
    assert!(!a.renew("ops", first, LEASE.ttl).await.expect("renew"));
    drop(cluster);
}

fn node_args(cluster: &RedisCluster, name: &str) -> ServeArgs {
    let mut a = ServeArgs::local_test();
    a.store = StoreKind::Redis;
    a.redis_cluster_nodes = cluster.seeds();
    a.node_id = Some(name.into());
    a.key_prefix = PREFIX.into();
    a
}

/// Two talkgroup nodes on one cluster act as one: a press on A is seen on B and A's speaker is heard on
/// B; with the channel's master killed, the floor and the relay work again within lease + failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_a_cluster_act_as_one_across_a_failover() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("cluster thread");
    let na = Server::start(node_args(&cluster, "node-a")).expect("node a starts");
    let nb = Server::start(node_args(&cluster, "node-b")).expect("node b starts");
    let mut sa = Signal::connect(na.http_addr).await;
    let mut sb = Signal::connect(nb.http_addr).await;
    let mut ann = RtpMember::join(&mut sa, "ops", "ann").await;
    let bob = RtpMember::join(&mut sb, "ops", "bob").await;
    let g = take_floor(&mut sa, "ops", Duration::from_secs(10)).await;
    let t = floor_any(&mut sb, "ops", &["taken"]).await;
    assert_eq!((&t["speaker"], &t["epoch"]), (&g["speaker"], &g["epoch"]));
    heard(&mut ann, &bob, Duration::from_secs(10)).await;
    sa.release("ops").await;
    floor_any(&mut sb, "ops", &["idle"]).await;
    let before = g["epoch"].as_u64().expect("epoch");

    let killed_at = Instant::now();
    let (cluster, failover) = kill_master_of(cluster, &format!("{PREFIX}:tg:{{ops}}:floor")).await;
    sa.settle(Duration::from_millis(100)).await;
    sb.settle(Duration::from_millis(100)).await;
    let bound = LEASE.ttl + failover + Duration::from_secs(3);
    let g = take_floor(&mut sa, "ops", bound).await;
    let t = floor_any(&mut sb, "ops", &["taken"]).await;
    assert_eq!((&t["speaker"], &t["epoch"]), (&g["speaker"], &g["epoch"]));
    assert!(
        g["epoch"].as_u64().expect("epoch") > before,
        "epochs never go back"
    );
    heard(&mut ann, &bob, Duration::from_secs(10)).await;
    println!(
        "failover {failover:?}; press granted and heard on B {:?} after the kill (2-core sandbox)",
        killed_at.elapsed()
    );
    drop(cluster);
}
