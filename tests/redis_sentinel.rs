//! The Redis store behind Sentinel, on a topology each test starts (one master, one replica, three
//! sentinels; see `rtpio::testing::RedisSentinels`): the floor through the master the sentinels name, and
//! a failover while a member talks — the floor recovers within lease + failover time and no epoch ever
//! has two speakers. Needs `redis-server` and `redis-cli` on PATH (the suite says how to install them
//! when they are missing).

#[path = "support/client.rs"]
mod client;
#[path = "support/replicated.rs"]
mod replicated;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{floor_any, RtpMember, Signal};
use replicated::{heard, is_floor, next_channel, next_event, press, take_floor, PREFIX};
use rtpio::testing::RedisSentinels;
use serde_json::Value;
use talkgroup::config::{ServeArgs, StoreKind};
use talkgroup::server::{Server, LEASE};
use talkgroup::state::redis::{RedisConfig, RedisStore, Topology};
use talkgroup::state::{Acquired, FloorStore, StoreEvent};

fn topology(redis: &RedisSentinels) -> Topology {
    Topology::Sentinel {
        sentinels: redis.sentinels(),
        master: RedisSentinels::MASTER.into(),
    }
}

async fn store(redis: &RedisSentinels, node: &str) -> Arc<RedisStore> {
    let mut config = RedisConfig::new("redis://127.0.0.1/", PREFIX, node);
    config.topology = topology(redis);
    Arc::new(
        RedisStore::connect(config)
            .await
            .expect("connect through the test sentinels"),
    )
}

/// Kills the master on a blocking thread (the runtime keeps running) and waits until the sentinels
/// name the replica; returns the topology and the time the failover took.
async fn kill_master(redis: RedisSentinels) -> (RedisSentinels, Duration) {
    let (redis, killed) = tokio::task::spawn_blocking(move || {
        let mut redis = redis;
        let killed = redis.kill_master();
        (redis, killed)
    })
    .await
    .expect("failover thread");
    (redis, killed.unwrap_or_else(|e| panic!("failover: {e}")))
}

/// Grant, renew, release and their events through the master the sentinels name; after the master is
/// killed, the store finds the promoted replica by itself, and the floor works again within lease +
/// failover with a greater epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_follows_the_master_the_sentinels_name() {
    let redis = tokio::task::spawn_blocking(RedisSentinels::start)
        .await
        .expect("sentinel thread");
    let (a, b) = (store(&redis, "node-a").await, store(&redis, "node-b").await);
    assert_eq!(a.publish_verb(), "PUBLISH");
    let (watch, mut events) = b.subscribe();
    next_event(&mut events, Duration::from_secs(10), |e| {
        *e == StoreEvent::Resync
    })
    .await;
    watch.watch("ops", true);
    next_event(
        &mut events,
        Duration::from_secs(5),
        |e| matches!(e, StoreEvent::Watching { channel } if channel == "ops"),
    )
    .await;
    let first = match a.acquire(press("ops", "ann")).await.expect("acquire") {
        Acquired::Granted { epoch } => epoch,
        other => panic!("{other:?}"),
    };
    next_event(&mut events, Duration::from_secs(2), is_floor("ops", true)).await;
    assert!(a.renew("ops", first, LEASE.ttl).await.expect("renew"));
    assert!(a.release("ops", first).await.expect("release"));
    next_event(&mut events, Duration::from_secs(2), is_floor("ops", false)).await;
    // The link the subscriber is built on, on the master: it delivers, and ends with the master.
    let mut link = a.open_link().await.expect("link");
    let events_channel = a.events_channel("ops");
    link.subscribe(&events_channel).await.expect("subscribe");
    let first = match a.acquire(press("ops", "ann")).await.expect("acquire") {
        Acquired::Granted { epoch } => epoch,
        other => panic!("{other:?}"),
    };
    assert_eq!(next_channel(&mut link).await, Some(events_channel));
    link.ping().await.expect("ping the master");

    let killed_at = Instant::now();
    let (redis, failover) = kill_master(redis).await;
    println!("sentinel failover took {failover:?} (2-core sandbox)");
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        link.next().await.is_none() || link.ping().await.is_err()
    })
    .await;
    assert_eq!(ended, Ok(true), "the link ends with its master");
    next_event(&mut events, Duration::from_secs(5), |e| {
        *e == StoreEvent::Down
    })
    .await;
    next_event(&mut events, Duration::from_secs(10), |e| {
        *e == StoreEvent::Resync
    })
    .await;
    let bound = LEASE.ttl + failover + Duration::from_secs(2);
    let mut busy = 0;
    let second = loop {
        match b.acquire(press("ops", "bob")).await {
            Ok(Acquired::Granted { epoch }) => break epoch,
            Ok(Acquired::Busy(h)) => {
                // The grant waited for the replica, so the promoted replica still has ann's lock.
                assert_eq!((h.member.as_str(), h.epoch), ("ann", first));
                busy += 1;
            }
            Err(_) => {} // still failing over
        }
        assert!(
            killed_at.elapsed() < bound,
            "the floor did not work again within lease + failover ({bound:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "floor granted again {:?} after the master was killed; ann's replicated lock seen {busy} times \
         (2-core sandbox)",
        killed_at.elapsed()
    );
    assert!(
        second > first,
        "epochs never go back: {second} after {first}"
    );
    let got = next_event(&mut events, Duration::from_secs(2), is_floor("ops", true)).await;
    assert!(matches!(got, StoreEvent::Floor { epoch, .. } if epoch == second));
    assert!(!a.renew("ops", first, LEASE.ttl).await.expect("renew"));
    drop(redis);
}

/// The window `WAIT` narrows but cannot close: a grant the replica never got (here removed from the
/// replica by hand, epoch key included, as if the master died before replicating it). The promoted
/// replica grants the floor at once, with an epoch still greater than the lost one (the clock floor of
/// the grant script), and the lost grant's holder can no longer renew: its node revokes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_lost_in_a_failover_is_granted_again_with_a_greater_epoch() {
    let redis = tokio::task::spawn_blocking(RedisSentinels::start)
        .await
        .expect("sentinel thread");
    let (a, b) = (store(&redis, "node-a").await, store(&redis, "node-b").await);
    let lost = match a.acquire(press("ops", "ann")).await.expect("acquire") {
        Acquired::Granted { epoch } => epoch,
        other => panic!("{other:?}"),
    };
    let replica = redis.replica_port().expect("replica");
    let floor = format!("{PREFIX}:tg:{{ops}}:floor");
    let epoch_key = format!("{PREFIX}:tg:{{ops}}:epoch");
    for args in [
        &["CONFIG", "SET", "replica-read-only", "no"][..],
        &["DEL", &floor, &epoch_key][..],
    ] {
        rtpio::testing::redis_cli(replica, args).expect("edit the replica");
    }
    let killed_at = Instant::now();
    let (redis, failover) = kill_master(redis).await;
    let bound = failover + Duration::from_secs(2);
    let second = loop {
        match b.acquire(press("ops", "bob")).await {
            Ok(Acquired::Granted { epoch }) => break epoch,
            Ok(Acquired::Busy(h)) => panic!("the replica had no lock, yet {h:?} holds it"),
            Err(_) => {} // still failing over
        }
        assert!(
            killed_at.elapsed() < bound,
            "no grant within the failover ({bound:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(second > lost, "epochs never go back: {second} after {lost}");
    assert!(
        !a.renew("ops", lost, LEASE.ttl).await.expect("renew"),
        "the lost grant's holder must not renew"
    );
    drop(redis);
}

fn node_args(redis: &RedisSentinels, name: &str) -> ServeArgs {
    let mut a = ServeArgs::local_test();
    a.store = StoreKind::Redis;
    a.redis_sentinels = redis.sentinels();
    a.redis_sentinel_master = Some(RedisSentinels::MASTER.into());
    a.node_id = Some(name.into());
    a.key_prefix = PREFIX.into();
    a
}

/// Every floor message a signaling connection has received so far: (epoch, speaker) of each grant.
fn grants(frames: &[Value]) -> Vec<(u64, String)> {
    frames
        .iter()
        .filter(|v| {
            v["type"] == "floor" && matches!(v["state"].as_str(), Some("granted" | "taken"))
        })
        .filter_map(|v| Some((v["epoch"].as_u64()?, v["speaker"].as_str()?.to_string())))
        .collect()
}

/// Ann talks on node A, heard by bob on node B, when the master is killed. Within lease + failover time
/// the floor works again (carol on B gets it once ann lets go or her lease runs out); no epoch ever
/// names two speakers, and bob never hears ann once carol's audio has started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_while_a_member_talks_recovers_with_one_speaker_per_epoch() {
    let redis = tokio::task::spawn_blocking(RedisSentinels::start)
        .await
        .expect("sentinel thread");
    let na = Server::start(node_args(&redis, "node-a")).expect("node a starts");
    let nb = Server::start(node_args(&redis, "node-b")).expect("node b starts");
    let mut sa = Signal::connect(na.http_addr).await;
    let mut sb = Signal::connect(nb.http_addr).await;
    let mut sc = Signal::connect(nb.http_addr).await;
    let mut ann = RtpMember::join(&mut sa, "ops", "ann").await;
    let bob = RtpMember::join(&mut sb, "ops", "bob").await;
    let mut carol = RtpMember::join(&mut sc, "ops", "carol").await;
    let mut seen: Vec<Value> = Vec::new();
    seen.push(take_floor(&mut sa, "ops", Duration::from_secs(10)).await);
    seen.push(floor_any(&mut sb, "ops", &["taken"]).await);
    heard(&mut ann, &bob, Duration::from_secs(10)).await;

    // Ann talks (20 ms frames, her payload says who) through the failover, on a task of her own.
    let talking = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = talking.clone();
    let ann_task = tokio::spawn(async move {
        while flag.load(std::sync::atomic::Ordering::Relaxed) {
            ann.send_rtp(b"ann").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ann
    });
    let killed_at = Instant::now();
    let (redis, failover) = kill_master(redis).await;
    println!("sentinel failover took {failover:?} (2-core sandbox)");
    // Ann may still hold the floor (her lock reached the replica, her renewals resumed): she lets go
    // after talking a little longer, as a member would.
    tokio::time::sleep(Duration::from_millis(500)).await;
    talking.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ann = ann_task.await.expect("ann's task");
    sa.release("ops").await;
    let bound = LEASE.ttl + failover + Duration::from_secs(3);
    let granted = take_floor(&mut sc, "ops", bound.saturating_sub(killed_at.elapsed())).await;
    println!(
        "carol granted {:?} after the master was killed (2-core sandbox)",
        killed_at.elapsed()
    );
    let epoch = granted["epoch"].as_u64().expect("epoch");
    seen.push(granted);
    let taken = floor_any(&mut sb, "ops", &["taken"]).await;
    assert_eq!(taken["speaker"], "carol", "{taken}");
    seen.push(taken);
    for _ in 0..25 {
        carol.send_rtp(b"carol").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = bob.recv_rtp(10_000, Duration::from_millis(500)).await;
    let payloads: Vec<&[u8]> = got.iter().map(|p| p.4.as_slice()).collect();
    let first_carol = payloads
        .iter()
        .position(|p| *p == b"carol")
        .expect("bob hears carol after the failover");
    assert!(
        !payloads[first_carol..].contains(&&b"ann"[..]),
        "two speakers forwarded at once: {payloads:?}"
    );
    // One speaker per epoch, as every connection was told.
    let mut speakers: HashMap<u64, String> = HashMap::new();
    for sig in [&mut sa, &mut sb, &mut sc] {
        seen.extend(sig.drain(Duration::from_millis(200)).await);
    }
    for (e, who) in grants(&seen) {
        let first = speakers.entry(e).or_insert_with(|| who.clone());
        assert_eq!(*first, who, "epoch {e} has two speakers");
    }
    assert_eq!(speakers.get(&epoch).map(String::as_str), Some("carol"));
    drop(redis);
}
