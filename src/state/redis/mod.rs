//! The Redis backend: many nodes share one Redis. Same contract as [`super::memory`]; the rules that make it
//! safe across nodes live in Redis itself, as one Lua script per floor operation, so no node ever reads a
//! lock and writes it in two steps.
//!
//! # Keys
//!
//! `P` is [`RedisConfig::prefix`]. It stays outside the hash tag; the channel goes inside `{}` so that all
//! of a channel's keys hash to one Redis Cluster slot (a script may only touch keys of one slot).
//!
//! | key | type | expiry | holds |
//! |---|---|---|---|
//! | `P:tg:{ch}:floor` | hash `epoch member node priority` | the lease (`PEXPIRE`) | the floor lock; absent = free |
//! | `P:tg:{ch}:epoch` | string | none | the last epoch granted on `ch`, so the next one is greater |
//! | `P:tg:{ch}:members` | sorted set: member → expiry (Unix ms) | session TTL | who is in `ch`, expiring one by one |
//! | `P:tg:{ch}:member_nodes` | hash: member → node | session TTL | the node serving each member (for presence) |
//! | `P:tg:member:{name}:channels` | sorted set: channel → expiry (Unix ms) | session TTL | where a name is joined |
//! | `P:tg:{ch}:home` | string: node id | session TTL, refreshed by the home node | the node a channel is placed on (`--placement`) |
//! | `P:tg:cluster_key` | string | none | the relay key the nodes agreed on (when no cluster secret is configured) |
//! | `P:tg:{ch}:events`, `P:tg:{nodes}:events` | pub/sub channels | — | the events (see below) |
//!
//! The node registry's keys are in [`registry`].
//!
//! A member is `(channel, name)`: a name is unique only within a channel, so the reverse index is keyed by
//! name and lists every channel where that name is joined. Scores are expiry times, so one member that
//! stops refreshing drops out alone, while the key's own TTL (refreshed by every join or refresh) frees a
//! channel nobody touches any more. `member_nodes` may keep a name whose score has expired; the sorted set
//! is the truth.
//!
//! # Events
//!
//! Every change is published as one JSON object on its channel's own pub/sub channel `P:tg:{ch}:events`:
//! `{"kind":"grant","channel":..,"epoch":"..","member":..,"node":..,"priority":n}`,
//! `{"kind":"idle","channel":..,"epoch":".."}`, `{"kind":"join"|"leave","channel":..,"member":..,
//! "node":..}` and `{"kind":"channel_node","channel":..,"node":..,"present":bool}`; node arrivals and
//! departures go on `P:tg:{nodes}:events` as `{"kind":"node","node":..,"live":bool}`. Epochs travel as
//! decimal strings because Lua numbers print with 14 digits and an epoch has 16. A node subscribes to the
//! channels it serves only ([`crate::state::Watcher`]), so one busy channel's events reach only the nodes
//! that serve it, and a subscriber never reads the whole cluster's traffic.
//! On a Redis Cluster the events go by sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`,
//! [`RedisStore::publish_verb`]; the scripts take the verb as an argument): each events channel hashes to
//! its own slot — the talkgroup's, or `{nodes}` for the node events — so a script publishes only to a
//! channel of the slot it runs in.
//!
//! # Topologies
//!
//! [`RedisConfig::topology`]: one server, a master behind Sentinel, or a Cluster (see `conn.rs`). On a
//! Cluster no script, transaction or pipeline touches two slots: a channel's keys share its hash tag,
//! the registry's keys share `{nodes}`, and the member's reverse index (`member:{name}`) is always
//! written in a call of its own.
//!
//! # Failure
//!
//! Commands go through a connection that reconnects by itself (and behind Sentinel asks the sentinels
//! again, on a Cluster follows the slot map). Every call is bounded
//! by [`RedisConfig::response_timeout`]; an error or a timeout is [`StateError::Unavailable`], and the floor
//! denies the press. A grant whose reply times out may still have happened: its `grant` event names this
//! node, so the caller can release it by epoch (otherwise the lease runs out).
//!
//! With replicas (Sentinel, Cluster) a grant waits for one replica to acknowledge it (`WAIT 1`, 50 ms at
//! most) before it is answered; a master that dies in that window, or while no replica is connected, may
//! lose the grant, and its promoted replica grants the floor again with a greater epoch (see `floor.rs`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use redis::{RedisResult, Script};
use tokio::sync::mpsc;

mod conn;
mod events;
mod floor;
mod history;
mod link;
mod registry;
mod sentinel;
mod sessions;
mod timing;

pub use self::conn::Topology;
use self::conn::{Conn, Connector};
use self::events::{Wire, EVENT_QUEUE};
pub use self::link::Link;
use self::timing::LINK_TIMEOUT;
use super::{StateError, StoreEvent, Watcher};

/// Where and how to reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port/db`; with Sentinel or Cluster only its password, user and database
    /// are used.
    pub url: String,
    /// One server at `url`, a master behind Sentinel, or a Cluster.
    pub topology: Topology,
    /// Namespace of every key, so several deployments can share one Redis.
    pub prefix: String,
    /// This node's name, recorded in the locks it takes.
    pub node: String,
    /// Bound on every call; past it the call is `Unavailable`.
    pub response_timeout: Duration,
    /// A member not refreshed for this long drops out of its channel.
    pub session_ttl: Duration,
}

impl RedisConfig {
    /// Bound on a call unless configured: a press waits at most this for Redis.
    pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
    /// How long an unrefreshed member stays (heartbeats come every 5 minutes).
    pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(3600);

    /// A configuration with the default timeouts.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>, node: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            topology: Topology::Single,
            prefix: prefix.into(),
            node: node.into(),
            response_timeout: Self::DEFAULT_RESPONSE_TIMEOUT,
            session_ttl: Self::DEFAULT_SESSION_TTL,
        }
    }
}

/// The key layout of the module doc, in one place.
struct Keys {
    prefix: String,
}

impl Keys {
    fn channel(&self, channel: &str, what: &str) -> String {
        format!("{}:tg:{{{channel}}}:{what}", self.prefix)
    }

    fn floor(&self, channel: &str) -> String {
        self.channel(channel, "floor")
    }

    fn epoch(&self, channel: &str) -> String {
        self.channel(channel, "epoch")
    }

    fn members(&self, channel: &str) -> String {
        self.channel(channel, "members")
    }

    fn member_nodes(&self, channel: &str) -> String {
        self.channel(channel, "member_nodes")
    }

    fn member_channels(&self, member: &str) -> String {
        format!("{}:tg:member:{{{member}}}:channels", self.prefix)
    }

    /// A node's liveness value. Every node key shares the `{nodes}` hash tag with the live set, so one
    /// script reads the whole table on Redis Cluster too.
    fn node(&self, node: &str) -> String {
        format!("{}:tg:{{nodes}}:node:{node}", self.prefix)
    }

    /// Sorted set: node id → liveness expiry (Unix ms); expired entries are kept an hour so every node
    /// sees who died.
    fn live(&self) -> String {
        format!("{}:tg:{{nodes}}:live", self.prefix)
    }

    /// Node arrivals and departures.
    fn node_events(&self) -> String {
        format!("{}:tg:{{nodes}}:events", self.prefix)
    }

    /// The node a channel is placed on.
    fn home(&self, channel: &str) -> String {
        self.channel(channel, "home")
    }

    fn cluster_key(&self) -> String {
        format!("{}:tg:cluster_key", self.prefix)
    }

    fn channel_nodes(&self, channel: &str) -> String {
        self.channel(channel, "nodes")
    }

    /// One pub/sub channel per talkgroup, so a busy channel's events reach only the nodes that serve it
    /// (and, on Redis Cluster, stay in its slot's shard).
    fn events(&self, channel: &str) -> String {
        self.channel(channel, "events")
    }
}

/// Both stores on one Redis. Cheap to share behind an `Arc`; commands are multiplexed on one connection.
pub struct RedisStore {
    connector: Connector,
    conn: Conn,
    /// When the store was made, the base of `skip_wait_until`.
    started: Instant,
    /// Until when (ms after `started`) grants do not `WAIT` for a replica (see `floor.rs`).
    skip_wait_until: AtomicU64,
    /// The runtime `connect` ran on, where subscriber tasks are spawned.
    runtime: tokio::runtime::Handle,
    keys: Keys,
    node: String,
    response_timeout: Duration,
    session_ttl: Duration,
    acquire: Script,
    renew: Script,
    release: Script,
    claim: Script,
    announce: Script,
    nodes: Script,
    withdraw: Script,
    set_channel_node: Script,
    place: Script,
    unplace: Script,
}

impl RedisStore {
    /// Connects (bounded by 2 s) and fails if Redis cannot be reached now, so a wrong URL shows
    /// at start-up. Later outages are repaired in the background.
    pub async fn connect(config: RedisConfig) -> Result<RedisStore, StateError> {
        let connector = Connector::new(&config.url, &config.topology, config.response_timeout)?;
        let target = config.topology.describe(&config.url);
        let conn = match tokio::time::timeout(LINK_TIMEOUT, connector.command()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(StateError::Unavailable(format!("connect to {target}: {e}"))),
            Err(_) => {
                return Err(StateError::Unavailable(format!(
                    "connect to {target}: no answer within {LINK_TIMEOUT:?}"
                )))
            }
        };
        let keys = Keys {
            prefix: config.prefix,
        };
        Ok(RedisStore {
            connector,
            conn,
            started: Instant::now(),
            skip_wait_until: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
            keys,
            node: config.node,
            response_timeout: config.response_timeout,
            session_ttl: config.session_ttl,
            acquire: Script::new(floor::ACQUIRE),
            renew: Script::new(floor::RENEW),
            release: Script::new(floor::RELEASE),
            claim: Script::new(sessions::CLAIM),
            announce: Script::new(registry::ANNOUNCE),
            nodes: Script::new(registry::NODES),
            withdraw: Script::new(registry::WITHDRAW),
            set_channel_node: Script::new(registry::SET_CHANNEL_NODE),
            place: Script::new(registry::PLACE),
            unplace: Script::new(registry::UNPLACE),
        })
    }

    /// Starts a subscriber task with its own connection and returns its events: floor grants and releases
    /// (this node's too, the caller filters), presence and registrations of the channels the [`Watcher`]
    /// asks for, node arrivals and departures, `Resync` after every (re)connection and `Down` when the
    /// connection drops. The receiver starts in the down state: deny presses until the first `Resync`.
    /// The task reconnects by itself with backoff (subscribing to every watched channel again) and ends
    /// when the receiver is dropped.
    pub fn subscribe(&self) -> (Watcher, mpsc::Receiver<StoreEvent>) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let (watcher, watches) = Watcher::new();
        let prefix = self.keys.prefix.clone();
        let names = events::Names {
            nodes: self.keys.node_events(),
            channel: Box::new(move |ch| {
                Keys {
                    prefix: prefix.clone(),
                }
                .events(ch)
            }),
        };
        self.runtime.spawn(events::run_subscriber(
            self.connector.clone(),
            names,
            watches,
            tx,
        ));
        (watcher, rx)
    }

    /// Opens a pub/sub link of this store's topology (see [`Link`]).
    pub async fn open_link(&self) -> Result<Link, StateError> {
        Link::open(&self.connector).await
    }

    /// The verb that publishes an event: `PUBLISH`, or `SPUBLISH` (sharded pub/sub) on a Cluster.
    pub fn publish_verb(&self) -> &'static str {
        self.connector.publish_verb()
    }

    /// Where `channel`'s events are published: its own `P:tg:{ch}:events` (on a Cluster it hashes to the
    /// channel's slot, as sharded pub/sub needs).
    pub fn events_channel(&self, channel: &str) -> String {
        self.keys.events(channel)
    }

    /// A warning when Redis may evict keys that have a TTL (`volatile-*`, `allkeys-*`): an evicted lease is a
    /// floor granted twice. `None` when the policy is `noeviction` or when `CONFIG` is disabled (managed
    /// Redis often renames it), since then nothing can be checked.
    pub async fn check_maxmemory_policy(&self) -> Result<Option<String>, StateError> {
        let mut conn = self.conn.clone();
        let reply = tokio::time::timeout(
            self.response_timeout,
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .query_async::<HashMap<String, String>>(&mut conn),
        )
        .await;
        let policy = match reply {
            Ok(Ok(mut config)) => config.remove("maxmemory-policy"),
            Ok(Err(e)) if e.is_io_error() => return Err(unavailable("CONFIG GET", e)),
            Ok(Err(_)) => None,
            Err(_) => return Err(self.timed_out("CONFIG GET")),
        };
        Ok(policy.filter(|p| p != "noeviction").map(|p| {
            format!(
                "redis maxmemory-policy is {p:?}: it may evict floor leases under memory pressure; \
                 set `maxmemory-policy noeviction`"
            )
        }))
    }

    /// Runs one round trip under the response timeout; every failure is `Unavailable`.
    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StateError> {
        match tokio::time::timeout(self.response_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(what, e)),
            Err(_) => Err(self.timed_out(what)),
        }
    }

    fn timed_out(&self, what: &str) -> StateError {
        StateError::Unavailable(format!(
            "{what}: no answer within {:?}",
            self.response_timeout
        ))
    }
}

fn unavailable(what: &str, e: redis::RedisError) -> StateError {
    StateError::Unavailable(format!("{what}: {e}"))
}

/// Whole milliseconds, saturating (Redis takes expiry times as signed 64-bit).
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn encode(event: &Wire) -> Result<String, StateError> {
    serde_json::to_string(event).map_err(|e| StateError::Protocol(format!("encode event: {e}")))
}

fn parse_epoch(s: &str) -> Result<u64, StateError> {
    s.parse()
        .map_err(|_| StateError::Protocol(format!("epoch {s:?} is not a number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_put_the_channel_in_the_hash_tag() {
        let keys = Keys { prefix: "p".into() };
        assert_eq!(keys.floor("ops"), "p:tg:{ops}:floor");
        assert_eq!(keys.epoch("ops"), "p:tg:{ops}:epoch");
        assert_eq!(keys.members("ops"), "p:tg:{ops}:members");
        assert_eq!(keys.member_nodes("ops"), "p:tg:{ops}:member_nodes");
        assert_eq!(keys.member_channels("ann"), "p:tg:member:{ann}:channels");
        assert_eq!(keys.events("ops"), "p:tg:{ops}:events");
        assert_eq!(keys.node("n1"), "p:tg:{nodes}:node:n1");
        assert_eq!(keys.live(), "p:tg:{nodes}:live");
    }
}
