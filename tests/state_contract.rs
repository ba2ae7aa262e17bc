//! The contract of the state stores, written once and run on both backends (`memory_backend::*` and
//! `redis_backend::*`), then the Redis-only cases: restarts, outages, pub/sub and two nodes racing.
//!
//! Each Redis test starts its own `redis-server` on 127.0.0.1 (see `rtpio::testing`); every wait
//! is a bounded loop or a timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtpio::testing::RedisServer;
use talkgroup::state::history::{Burst, History, MemoryHistory};
use talkgroup::state::memory::{MemoryFloorStore, MemorySessionStore};
use talkgroup::state::redis::{RedisConfig, RedisStore};
use talkgroup::state::{
    AcquireRequest, Acquired, FloorStore, Holder, Registry, SessionStore, StateError, StoreEvent,
};
use tokio::sync::mpsc;

const NODE: &str = "node-a";
const LEASE: Duration = Duration::from_secs(3);

/// One backend under test; `_server` keeps its Redis alive for the test.
struct Backend {
    floor: Arc<dyn FloorStore>,
    sessions: Arc<dyn SessionStore>,
    history: Arc<dyn History>,
    _server: Option<RedisServer>,
}

impl Backend {
    fn memory() -> Backend {
        Backend {
            floor: Arc::new(MemoryFloorStore::new(NODE)),
            sessions: Arc::new(MemorySessionStore::default()),
            history: Arc::new(MemoryHistory::default()),
            _server: None,
        }
    }

    async fn redis() -> Backend {
        let server = RedisServer::start();
        let store = connect(&server, NODE).await;
        Backend {
            floor: store.clone(),
            sessions: store.clone(),
            history: store,
            _server: Some(server),
        }
    }
}

fn config(server: &RedisServer, node: &str) -> RedisConfig {
    RedisConfig::new(server.url(), "test", node)
}

async fn connect(server: &RedisServer, node: &str) -> Arc<RedisStore> {
    Arc::new(
        RedisStore::connect(config(server, node))
            .await
            .expect("connect to the test redis-server"),
    )
}

fn press(channel: &str, member: &str, priority: u8, ttl: Duration) -> AcquireRequest {
    AcquireRequest {
        channel: channel.into(),
        member: member.into(),
        priority,
        ttl,
        emergency: false,
    }
}

async fn granted(floor: &dyn FloorStore, req: AcquireRequest) -> u64 {
    match floor.acquire(req).await {
        Ok(Acquired::Granted { epoch }) => epoch,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// Polls `probe` every 20 ms until it returns `Some`, for at most `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- the contract, for both backends ----

async fn grant_then_busy(b: &Backend) {
    let epoch = granted(&*b.floor, press("ops", "ann", 2, LEASE)).await;
    let expected = Holder {
        member: "ann".into(),
        node: NODE.into(),
        epoch,
        priority: 2,
        emergency: false,
    };
    match b.floor.acquire(press("ops", "bob", 1, LEASE)).await {
        Ok(Acquired::Busy(holder)) => assert_eq!(holder, expected),
        other => panic!("expected busy, got {other:?}"),
    }
    assert_eq!(b.floor.holder("ops").await, Ok(Some(expected)));
    // Another channel has its own lock.
    assert!(granted(&*b.floor, press("fire", "bob", 1, LEASE)).await > 0);
    assert_eq!(b.floor.holder("nobody-here").await, Ok(None));
}

async fn epochs_strictly_increase(b: &Backend) {
    let mut last = 0;
    for i in 0..100 {
        let epoch = granted(&*b.floor, press("ops", &format!("m{i}"), 0, LEASE)).await;
        assert!(epoch > last, "grant {i}: epoch {epoch} after {last}");
        assert_eq!(b.floor.release("ops", epoch).await, Ok(true));
        last = epoch;
    }
    assert!(
        last < 1 << 53,
        "epochs must stay exact as doubles (Lua, JSON)"
    );
}

async fn only_the_holders_epoch_renews_and_releases(b: &Backend) {
    let epoch = granted(&*b.floor, press("ops", "ann", 0, LEASE)).await;
    for wrong in [epoch - 1, epoch + 1, 0] {
        assert_eq!(b.floor.renew("ops", wrong, LEASE).await, Ok(false));
        assert_eq!(b.floor.release("ops", wrong).await, Ok(false));
    }
    assert_eq!(
        b.floor.holder("ops").await.map(|h| h.map(|h| h.epoch)),
        Ok(Some(epoch))
    );
    assert_eq!(b.floor.renew("ops", epoch, LEASE).await, Ok(true));
    assert_eq!(b.floor.release("ops", epoch).await, Ok(true));
    assert_eq!(
        b.floor.release("ops", epoch).await,
        Ok(false),
        "released twice"
    );
    assert_eq!(
        b.floor.renew("ops", epoch, LEASE).await,
        Ok(false),
        "renewed after release"
    );
    assert_eq!(b.floor.holder("ops").await, Ok(None));
    assert_eq!(b.floor.renew("never-held", epoch, LEASE).await, Ok(false));
}

async fn lease_expiry_frees_the_lock(b: &Backend) {
    let ttl = Duration::from_millis(200);
    let first = granted(&*b.floor, press("ops", "ann", 0, ttl)).await;
    assert!(matches!(
        b.floor.acquire(press("ops", "bob", 0, LEASE)).await,
        Ok(Acquired::Busy(_))
    ));
    let floor = &b.floor;
    eventually(Duration::from_secs(3), "lease expiry", || async move {
        (floor.holder("ops").await == Ok(None)).then_some(())
    })
    .await;
    assert_eq!(
        b.floor.renew("ops", first, LEASE).await,
        Ok(false),
        "renewed an expired lease"
    );
    assert_eq!(
        b.floor.release("ops", first).await,
        Ok(false),
        "released an expired lease"
    );
    let second = granted(&*b.floor, press("ops", "bob", 0, LEASE)).await;
    assert!(second > first);
}

async fn renew_extends_the_lease(b: &Backend) {
    let epoch = granted(
        &*b.floor,
        press("ops", "ann", 0, Duration::from_millis(600)),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        b.floor.renew("ops", epoch, Duration::from_secs(2)).await,
        Ok(true)
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        b.floor.holder("ops").await.map(|h| h.map(|h| h.epoch)),
        Ok(Some(epoch))
    );
}

async fn sessions_both_ways(b: &Backend) {
    let s = &b.sessions;
    s.join("ops", "bob", NODE).await.unwrap();
    s.join("ops", "ann", NODE).await.unwrap();
    s.join("fire", "ann", "node-b").await.unwrap();
    s.join("ops", "ann", NODE).await.unwrap(); // twice is once
    s.refresh("ops", "bob", NODE).await.unwrap();
    assert_eq!(s.members("ops").await.unwrap(), ["ann", "bob"]);
    assert_eq!(s.members("fire").await.unwrap(), ["ann"]);
    assert_eq!(s.channels_of("ann").await.unwrap(), ["fire", "ops"]);
    assert_eq!(s.channels_of("bob").await.unwrap(), ["ops"]);

    // A member is (channel, name): leaving one channel keeps the name in the other.
    s.leave("ops", "ann", NODE).await.unwrap();
    assert_eq!(s.members("ops").await.unwrap(), ["bob"]);
    assert_eq!(s.channels_of("ann").await.unwrap(), ["fire"]);
    s.leave("ops", "bob", NODE).await.unwrap();
    s.leave("ops", "bob", NODE).await.unwrap(); // idempotent
    s.leave("nowhere", "nobody", NODE).await.unwrap();
    assert!(s.members("ops").await.unwrap().is_empty());
    assert!(s.channels_of("bob").await.unwrap().is_empty());
    assert!(s.members("nowhere").await.unwrap().is_empty());
}

/// An emergency takes the lock from a normal holder at once (a newer epoch), but not from an emergency.
async fn an_emergency_takes_the_lock_from_a_normal_holder_only(b: &Backend) {
    let normal = granted(&*b.floor, press("ops", "chief", 255, LEASE)).await;
    let mut sos = press("ops", "eve", 0, LEASE);
    sos.emergency = true;
    let first = granted(&*b.floor, sos.clone()).await;
    assert!(first > normal);
    let holder = b.floor.holder("ops").await.unwrap().unwrap();
    assert_eq!((holder.member.as_str(), holder.emergency), ("eve", true));
    // The old holder can neither renew nor release any more.
    assert_eq!(b.floor.renew("ops", normal, LEASE).await, Ok(false));
    assert_eq!(b.floor.release("ops", normal).await, Ok(false));
    sos.member = "fay".into();
    match b.floor.acquire(sos).await {
        Ok(Acquired::Busy(h)) => assert_eq!((h.member.as_str(), h.emergency), ("eve", true)),
        other => panic!("an emergency does not take an emergency's lock: {other:?}"),
    }
}

/// The transmission log: newest first, bounded by `limit`, paged back by epoch, per channel.
async fn history_pages_back_newest_first(b: &Backend) {
    let burst = |channel: &str, epoch: u64| Burst {
        channel: channel.into(),
        member: format!("m{epoch}"),
        node: NODE.into(),
        epoch,
        start_ms: epoch * 10,
        end_ms: epoch * 10 + 5,
        end_reason: "released".into(),
        packets: epoch,
        emergency: epoch == 3,
        recording: None,
    };
    for e in 1..=5 {
        b.history.record(&burst("ops", e)).await.unwrap();
    }
    b.history.record(&burst("fire", 9)).await.unwrap();
    let epochs = |v: Vec<Burst>| v.iter().map(|b| b.epoch).collect::<Vec<_>>();
    assert_eq!(
        epochs(b.history.list("ops", 3, None).await.unwrap()),
        [5, 4, 3]
    );
    assert_eq!(
        epochs(b.history.list("ops", 3, Some(3)).await.unwrap()),
        [2, 1]
    );
    assert_eq!(
        b.history.list("ops", 1, Some(4)).await.unwrap(),
        vec![burst("ops", 3)]
    );
    assert!(b
        .history
        .list("nowhere", 10, None)
        .await
        .unwrap()
        .is_empty());
}

/// A name is claimed in a channel across nodes: joined from one node, it is refused to another until it
/// leaves; the same node may join it again (idempotent), and a refresh never takes it over.
async fn names_are_unique_across_nodes(b: &Backend) {
    let s = &b.sessions;
    assert_eq!(s.join("ops", "alice", NODE).await, Ok(true));
    assert_eq!(
        s.join("ops", "alice", "node-b").await,
        Ok(false),
        "held by node-a"
    );
    assert_eq!(
        s.join("ops", "alice", NODE).await,
        Ok(true),
        "its own node may again"
    );
    assert_eq!(
        s.join("fire", "alice", "node-b").await,
        Ok(true),
        "another channel is another name"
    );
    s.refresh("ops", "alice", "node-b").await.unwrap();
    assert_eq!(
        s.join("ops", "alice", "node-b").await,
        Ok(false),
        "a refresh took nothing over"
    );
    s.leave("ops", "alice", NODE).await.unwrap();
    assert_eq!(
        s.join("ops", "alice", "node-b").await,
        Ok(true),
        "free once it left"
    );
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod memory_backend {
            $(#[tokio::test] async fn $case() { super::$case(&super::Backend::memory()).await; })*
        }
        mod redis_backend {
            $(#[tokio::test] async fn $case() { super::$case(&super::Backend::redis().await).await; })*
        }
    };
}

contract!(
    grant_then_busy,
    epochs_strictly_increase,
    only_the_holders_epoch_renews_and_releases,
    lease_expiry_frees_the_lock,
    renew_extends_the_lease,
    sessions_both_ways,
    names_are_unique_across_nodes,
    an_emergency_takes_the_lock_from_a_normal_holder_only,
    history_pages_back_newest_first,
);

// ---- Redis only ----

/// Retries `acquire` until the store answers (after a restart), for at most 5 s.
async fn acquire_when_back(store: &RedisStore, req: AcquireRequest) -> Acquired {
    eventually(Duration::from_secs(5), "store back after restart", || {
        let req = req.clone();
        async move { store.acquire(req).await.ok() }
    })
    .await
}

/// The next event matching `want`, skipping others, within `limit`.
async fn next_event(
    rx: &mut mpsc::Receiver<StoreEvent>,
    limit: Duration,
    want: impl Fn(&StoreEvent) -> bool,
) -> StoreEvent {
    let deadline = tokio::time::Instant::now() + limit;
    let mut skipped = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) if want(&event) => return event,
            Ok(Some(event)) => skipped.push(event),
            Ok(None) => panic!("subscription closed; skipped {skipped:?}"),
            Err(_) => panic!("no matching event within {limit:?}; skipped {skipped:?}"),
        }
    }
}

#[tokio::test]
async fn redis_epoch_never_goes_back_after_restart() {
    let mut server = RedisServer::start();
    let store = connect(&server, NODE).await;
    let mut last = 0;
    for _ in 0..20 {
        last = granted(&*store, press("ops", "ann", 0, LEASE)).await;
        assert_eq!(store.release("ops", last).await, Ok(true));
    }
    server.kill();
    server.restart(); // empty: the stored epoch is gone
    match acquire_when_back(&store, press("ops", "ann", 0, LEASE)).await {
        Acquired::Granted { epoch } => assert!(epoch > last, "epoch {epoch} went back from {last}"),
        busy => panic!("the restarted redis should be empty, got {busy:?}"),
    }
}

#[tokio::test]
async fn redis_epoch_follows_the_stored_epoch_when_ahead_of_the_clock() {
    let server = RedisServer::start();
    let store = connect(&server, NODE).await;
    // As after a clock step backwards: the stored epoch is ahead of TIME. 16 digits, as real epochs have.
    let ahead: u64 = 5_000_000_000_000_000;
    let mut raw = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("SET")
        .arg("test:tg:{ops}:epoch")
        .arg(ahead)
        .query_async::<()>(&mut raw)
        .await
        .unwrap();
    let epoch = granted(&*store, press("ops", "ann", 0, LEASE)).await;
    assert_eq!(epoch, ahead + 1, "the epoch must be exact, not rounded");
    assert_eq!(
        store.holder("ops").await.unwrap().map(|h| h.epoch),
        Some(ahead + 1)
    );
    assert_eq!(store.release("ops", ahead + 1).await, Ok(true));
}

/// Asserts that `call` fails `Unavailable` within the response timeout plus scheduling slack.
async fn fails_fast<T: std::fmt::Debug>(
    what: &str,
    call: impl Future<Output = Result<T, StateError>>,
) {
    let bound = RedisConfig::DEFAULT_RESPONSE_TIMEOUT + Duration::from_millis(150);
    let started = Instant::now();
    let result = call.await;
    let took = started.elapsed();
    assert!(
        matches!(result, Err(StateError::Unavailable(_))),
        "{what}: {result:?}"
    );
    assert!(took <= bound, "{what} took {took:?}");
}

#[tokio::test]
async fn redis_calls_fail_fast_when_down() {
    let mut server = RedisServer::start();
    let store = connect(&server, NODE).await;
    let epoch = granted(&*store, press("ops", "ann", 0, LEASE)).await;
    server.kill();
    // Twice round: the first calls meet the dead connection, the later ones the reconnection in progress.
    for _ in 0..2 {
        fails_fast("acquire", store.acquire(press("ops", "bob", 0, LEASE))).await;
        fails_fast("renew", store.renew("ops", epoch, LEASE)).await;
        fails_fast("release", store.release("ops", epoch)).await;
        fails_fast("holder", store.holder("ops")).await;
        fails_fast("join", store.join("ops", "ann", NODE)).await;
        fails_fast("refresh", store.refresh("ops", "ann", NODE)).await;
        fails_fast("leave", store.leave("ops", "ann", NODE)).await;
        fails_fast("members", store.members("ops")).await;
        fails_fast("channels_of", store.channels_of("ann")).await;
        fails_fast("check_maxmemory_policy", store.check_maxmemory_policy()).await;
    }
}

#[tokio::test]
async fn redis_store_recovers_after_restart() {
    let mut server = RedisServer::start();
    let store = connect(&server, NODE).await;
    server.kill();
    assert!(store.holder("ops").await.is_err());
    tokio::time::sleep(Duration::from_millis(500)).await; // let the reconnection back off a little
    server.restart();
    let epoch = match acquire_when_back(&store, press("ops", "ann", 0, LEASE)).await {
        Acquired::Granted { epoch } => epoch,
        busy => panic!("expected a grant, got {busy:?}"),
    };
    assert_eq!(store.release("ops", epoch).await, Ok(true));
    store.join("ops", "ann", NODE).await.unwrap();
    assert_eq!(store.members("ops").await.unwrap(), ["ann"]);
}

#[tokio::test]
async fn redis_pubsub_delivers_floor_presence_and_resync() {
    let mut server = RedisServer::start();
    let a = connect(&server, NODE).await;
    let b = connect(&server, "node-b").await;
    let (own_watch, mut own) = a.subscribe();
    let (other_watch, mut other) = b.subscribe();
    let wait = Duration::from_secs(5);
    let resync = |e: &StoreEvent| *e == StoreEvent::Resync;
    next_event(&mut own, wait, resync).await;
    next_event(&mut other, wait, resync).await;
    // Each node hears only the channels it watches: "quiet" is nobody's here.
    let watching =
        |e: &StoreEvent| matches!(e, StoreEvent::Watching { channel } if channel == "ops");
    own_watch.watch("ops", true);
    other_watch.watch("ops", true);
    next_event(&mut own, wait, watching).await;
    next_event(&mut other, wait, watching).await;
    let quiet = granted(&*a, press("quiet", "ann", 0, LEASE)).await;
    assert_eq!(a.release("quiet", quiet).await, Ok(true));

    let epoch = granted(&*a, press("ops", "ann", 4, LEASE)).await;
    let holder = Holder {
        member: "ann".into(),
        node: NODE.into(),
        epoch,
        priority: 4,
        emergency: false,
    };
    let grant = StoreEvent::Floor {
        channel: "ops".into(),
        holder: Some(holder),
        epoch,
    };
    // Both nodes hear it, the granting one included.
    assert_eq!(
        next_event(&mut own, wait, |e| matches!(e, StoreEvent::Floor { .. })).await,
        grant
    );
    assert_eq!(
        next_event(&mut other, wait, |e| matches!(e, StoreEvent::Floor { .. })).await,
        grant
    );

    assert_eq!(a.release("ops", epoch).await, Ok(true));
    let idle = StoreEvent::Floor {
        channel: "ops".into(),
        holder: None,
        epoch,
    };
    assert_eq!(
        next_event(&mut other, wait, |e| matches!(e, StoreEvent::Floor { .. })).await,
        idle
    );

    a.join("ops", "ann", NODE).await.unwrap();
    a.leave("ops", "ann", NODE).await.unwrap();
    for joined in [true, false] {
        let presence = StoreEvent::Presence {
            channel: "ops".into(),
            member: "ann".into(),
            node: NODE.into(),
            joined,
        };
        assert_eq!(
            next_event(&mut other, wait, |e| matches!(
                e,
                StoreEvent::Presence { .. }
            ))
            .await,
            presence
        );
    }

    server.kill();
    next_event(&mut other, wait, |e| *e == StoreEvent::Down).await;
    server.restart();
    next_event(&mut other, wait, resync).await;
    // The new subscription carries events again.
    let Acquired::Granted { epoch } = acquire_when_back(&a, press("ops", "bob", 0, LEASE)).await
    else {
        panic!("the restarted redis should be empty");
    };
    let event = next_event(&mut other, wait, |e| matches!(e, StoreEvent::Floor { .. })).await;
    assert!(
        matches!(event, StoreEvent::Floor { epoch: e, holder: Some(_), .. } if e == epoch),
        "{event:?}"
    );
}

#[tokio::test]
async fn redis_subscription_stays_up_while_idle() {
    let server = RedisServer::start();
    let store = connect(&server, NODE).await;
    let (_watcher, mut rx) = store.subscribe();
    next_event(&mut rx, Duration::from_secs(5), |e| {
        *e == StoreEvent::Resync
    })
    .await;
    // Long enough for the subscriber's keep-alive pings: a ping it misreads would show as Down + Resync.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(rx.try_recv(), Err(mpsc::error::TryRecvError::Empty));
    drop(server);
}

#[tokio::test]
async fn redis_two_nodes_race_one_grant_per_round() {
    let server = RedisServer::start();
    let a = connect(&server, NODE).await;
    let b = connect(&server, "node-b").await;
    let mut last = 0;
    for round in 0..200 {
        let (ra, rb) = tokio::join!(
            a.acquire(press("ops", "ann", 0, LEASE)),
            b.acquire(press("ops", "bob", 0, LEASE)),
        );
        let (winner, epoch, busy): (&RedisStore, u64, Holder) = match (ra, rb) {
            (Ok(Acquired::Granted { epoch }), Ok(Acquired::Busy(h))) => (&a, epoch, h),
            (Ok(Acquired::Busy(h)), Ok(Acquired::Granted { epoch })) => (&b, epoch, h),
            other => panic!("round {round}: expected exactly one grant, got {other:?}"),
        };
        assert_eq!(
            busy.epoch, epoch,
            "round {round}: the loser sees the winner's epoch"
        );
        assert!(epoch > last, "round {round}: epoch went back");
        assert_eq!(
            winner.release("ops", epoch).await,
            Ok(true),
            "round {round}"
        );
        last = epoch;
    }
}

#[tokio::test]
async fn redis_sessions_expire_one_by_one() {
    let server = RedisServer::start();
    let mut cfg = config(&server, NODE);
    cfg.session_ttl = Duration::from_secs(1);
    let store = RedisStore::connect(cfg).await.unwrap();
    store.join("ops", "ann", NODE).await.unwrap();
    store.join("ops", "bob", NODE).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    store.refresh("ops", "ann", NODE).await.unwrap();
    let store = &store;
    // bob was not refreshed and drops out alone; ann stays until her own TTL runs out.
    eventually(Duration::from_secs(3), "bob expires", || async move {
        (store.members("ops").await.unwrap() == ["ann"]).then_some(())
    })
    .await;
    assert_eq!(store.channels_of("ann").await.unwrap(), ["ops"]);
    assert!(store.channels_of("bob").await.unwrap().is_empty());
    eventually(Duration::from_secs(3), "ann expires", || async move {
        store.members("ops").await.unwrap().is_empty().then_some(())
    })
    .await;
    assert!(store.channels_of("ann").await.unwrap().is_empty());
}

#[tokio::test]
async fn redis_warns_about_evicting_policies() {
    let server = RedisServer::start();
    let store = connect(&server, NODE).await;
    assert_eq!(store.check_maxmemory_policy().await, Ok(None));
    let mut raw = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory-policy", "volatile-lru"])
        .query_async::<()>(&mut raw)
        .await
        .unwrap();
    let warning = store
        .check_maxmemory_policy()
        .await
        .unwrap()
        .expect("a warning");
    assert!(warning.contains("volatile-lru"), "{warning}");
}

#[tokio::test]
async fn redis_nodes_agree_on_one_cluster_key() {
    let server = RedisServer::start();
    let (a, b) = (connect(&server, "a").await, connect(&server, "b").await);
    assert_eq!(a.cluster_key("key-of-a").await.unwrap(), "key-of-a");
    assert_eq!(
        b.cluster_key("key-of-b").await.unwrap(),
        "key-of-a",
        "the first node's key wins"
    );
    assert_eq!(a.cluster_key("key-of-a").await.unwrap(), "key-of-a");
}

/// The registry pushes what changes and reads the node table in one call: a node's arrival and
/// departure are published on the nodes' channel, a registration on the channel's own events (only to
/// its watchers), a dead node stays visible as dead, and placement keeps a usable home.
#[tokio::test]
async fn redis_registry_pushes_arrivals_registrations_and_departures() {
    use talkgroup::state::{NodeInfo, NodeLoad};
    let server = RedisServer::start();
    let a = connect(&server, "a").await;
    let b = connect(&server, "b").await;
    let (watch, mut rx) = a.subscribe();
    let wait = Duration::from_secs(5);
    next_event(&mut rx, wait, |e| *e == StoreEvent::Resync).await;
    watch.watch("ops", true);
    next_event(&mut rx, wait, |e| matches!(e, StoreEvent::Watching { .. })).await;

    let info = NodeInfo {
        node: "b".into(),
        relay: vec!["127.0.0.1:42000".parse().unwrap()],
        draining: false,
        url: Some("ws://127.0.0.1:9/ws".into()),
        load: NodeLoad {
            members: 7,
            pps: 100,
            cpu_permille: 30,
        },
    };
    b.announce(&info, Duration::from_millis(800)).await.unwrap();
    let arrived = StoreEvent::Node {
        node: "b".into(),
        live: true,
    };
    assert_eq!(
        next_event(&mut rx, wait, |e| matches!(e, StoreEvent::Node { .. })).await,
        arrived
    );
    // A renewal is not news.
    b.announce(&info, Duration::from_millis(800)).await.unwrap();
    let table = a.nodes().await.unwrap();
    assert_eq!(table.live, vec![info.clone()]);
    assert!(table.dead.is_empty());

    b.set_channel_node("ops", "b", true).await.unwrap();
    b.set_channel_node("elsewhere", "b", true).await.unwrap();
    assert_eq!(
        next_event(&mut rx, wait, |e| matches!(
            e,
            StoreEvent::ChannelNode { .. }
        ))
        .await,
        StoreEvent::ChannelNode {
            channel: "ops".into(),
            node: "b".into(),
            present: true
        }
    );
    assert_eq!(a.channel_nodes("ops").await.unwrap(), ["b"]);

    // b dies without a word: after its TTL the table shows it dead, to every reader, more than once.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for _ in 0..2 {
        let table = a.nodes().await.unwrap();
        assert!(table.live.is_empty(), "{table:?}");
        assert_eq!(table.dead, ["b"]);
    }
    assert_eq!(
        a.evict_node("ops", "b").await.unwrap(),
        Vec::<String>::new()
    );
    assert!(
        a.channel_nodes("ops").await.unwrap().is_empty(),
        "evicted from the channel"
    );

    // Placement: the first placement wins; a home that is no longer usable is replaced.
    let both = ["a".to_string(), "b".to_string()];
    assert_eq!(a.place("ops", "b", &both, LEASE).await.unwrap(), "b");
    assert_eq!(a.place("ops", "a", &both, LEASE).await.unwrap(), "b");
    assert_eq!(a.place("ops", "a", &both[..1], LEASE).await.unwrap(), "a");
    a.unplace("ops", "b").await.unwrap();
    assert_eq!(
        a.place("ops", "b", &both, LEASE).await.unwrap(),
        "a",
        "only the home unplaces"
    );
    a.unplace("ops", "a").await.unwrap();
    assert_eq!(a.place("ops", "b", &both, LEASE).await.unwrap(), "b");

    // A clean departure is published and dead at once.
    a.announce(
        &NodeInfo {
            node: "a".into(),
            ..info.clone()
        },
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    a.withdraw("a").await.unwrap();
    let gone = StoreEvent::Node {
        node: "a".into(),
        live: false,
    };
    next_event(&mut rx, wait, |e| *e == gone).await;
    assert!(a.nodes().await.unwrap().dead.contains(&"a".to_string()));
}
