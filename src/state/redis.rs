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
//!
//! A member is `(channel, name)`: a name is unique only within a channel, so the reverse index is keyed by
//! name and lists every channel where that name is joined. Scores are expiry times, so one member that
//! stops refreshing drops out alone, while the key's own TTL (refreshed by every join or refresh) frees a
//! channel nobody touches any more. `member_nodes` may keep a name whose score has expired; the sorted set
//! is the truth.
//!
//! # Events
//!
//! Every change is published as one JSON object on the single pub/sub channel `P:tg:events`:
//! `{"kind":"grant","channel":..,"epoch":"..","member":..,"node":..,"priority":n}`,
//! `{"kind":"idle","channel":..,"epoch":".."}`, and `{"kind":"join"|"leave","channel":..,"member":..,
//! "node":..}`. Epochs travel as decimal strings because Lua numbers print with 14 digits and an epoch has
//! 16. One channel for everything keeps the subscriber to one `SUBSCRIBE`; on Redis Cluster, sharded pub/sub
//! would need one channel per talkgroup (`P:tg:{ch}:events`) instead.
//!
//! # Failure
//!
//! Commands go through the crate's [`ConnectionManager`], which reconnects by itself. Every call is bounded
//! by [`RedisConfig::response_timeout`]; an error or a timeout is [`StateError::Unavailable`], and the floor
//! denies the press. A grant whose reply times out may still have happened: its `grant` event names this
//! node, so the caller can release it by epoch (otherwise the lease runs out).

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use redis::{Client, RedisResult, Script};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

mod registry;

use super::{
    wall_clock_us, AcquireRequest, Acquired, FloorStore, Holder, SessionStore, StateError,
    StoreEvent, StoreFuture,
};

/// Takes the floor if free. The epoch is `max(last + 1, TIME in µs)`: `last + 1` orders grants on a running
/// Redis, the clock keeps epochs going up when Redis restarts empty (an `INCR` counter would restart at 1
/// and every shard would ignore the new grants as stale). `%d` prints the epoch exactly (a Lua number
/// printed plainly keeps 14 digits); 2^53 bounds it, beyond which the double would round.
const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  local h = redis.call('HMGET', KEYS[1], 'epoch', 'member', 'node', 'priority')
  return {'busy', h[1], h[2], h[3], h[4]}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local e = math.max((tonumber(redis.call('GET', KEYS[2])) or 0) + 1, now)
if e >= 9007199254740992 then return redis.error_reply('epoch beyond 2^53') end
local es = string.format('%d', e)
redis.call('HSET', KEYS[1], 'epoch', es, 'member', ARGV[2], 'node', ARGV[3], 'priority', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], es)
redis.call('PUBLISH', ARGV[6], cjson.encode({kind = 'grant', channel = ARGV[1], epoch = es,
  member = ARGV[2], node = ARGV[3], priority = tonumber(ARGV[4])}))
return {'granted', es}
";

/// Extends the lease only while the lock is held at the caller's epoch (the epoch is the token).
const RENEW: &str = r"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Frees the lock only at the caller's epoch and announces `idle` with that epoch, which shards compare
/// with the epoch they cached.
const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[3], cjson.encode({kind = 'idle', channel = ARGV[2], epoch = ARGV[1]}))
  return 1
end
return 0
";

/// Events a subscriber may queue before its task stops reading; Redis then buffers, and past its pub/sub
/// output limit drops the connection, which the task reports as `Down` and repairs with `Resync`.
const EVENT_QUEUE: usize = 1024;
/// Reconnection backoff of the subscriber, doubled per failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A quiet subscription is pinged this often, so a connection that died without a reset is noticed.
const PING_EVERY: Duration = Duration::from_secs(1);
/// How long a ping or a (re)connection may take; longer than a command's timeout, because a busy but
/// healthy Redis must not make the subscription flap.
const LINK_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how to reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
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
    pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
    pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(3600);

    /// A configuration with the default timeouts.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>, node: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: prefix.into(),
            node: node.into(),
            response_timeout: Self::DEFAULT_RESPONSE_TIMEOUT,
            session_ttl: Self::DEFAULT_SESSION_TTL,
        }
    }
}

/// A pub/sub message, as the scripts and [`SessionStore`] publish it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Wire {
    Grant {
        channel: String,
        epoch: String,
        member: String,
        node: String,
        priority: u8,
    },
    Idle {
        channel: String,
        epoch: String,
    },
    Join {
        channel: String,
        member: String,
        node: String,
    },
    Leave {
        channel: String,
        member: String,
        node: String,
    },
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

    fn node(&self, node: &str) -> String {
        format!("{}:tg:node:{node}", self.prefix)
    }

    fn channel_nodes(&self, channel: &str) -> String {
        self.channel(channel, "nodes")
    }

    fn events(&self) -> String {
        format!("{}:tg:events", self.prefix)
    }
}

/// Both stores on one Redis. Cheap to share behind an `Arc`; commands are multiplexed on one connection.
pub struct RedisStore {
    client: Client,
    conn: ConnectionManager,
    /// The runtime `connect` ran on, where subscriber tasks are spawned.
    runtime: tokio::runtime::Handle,
    keys: Keys,
    node: String,
    response_timeout: Duration,
    session_ttl: Duration,
    acquire: Script,
    renew: Script,
    release: Script,
}

impl RedisStore {
    /// Connects (bounded by 2 s) and fails if Redis cannot be reached now, so a wrong URL shows
    /// at start-up. Later outages are repaired in the background.
    pub async fn connect(config: RedisConfig) -> Result<RedisStore, StateError> {
        let client = Client::open(config.url.as_str())
            .map_err(|e| StateError::Unavailable(format!("bad redis url {:?}: {e}", config.url)))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_min_delay(BACKOFF_MIN)
            .set_max_delay(BACKOFF_MAX)
            .set_connection_timeout(Some(LINK_TIMEOUT))
            .set_response_timeout(Some(config.response_timeout));
        let conn = match tokio::time::timeout(
            LINK_TIMEOUT,
            ConnectionManager::new_with_config(client.clone(), manager_config),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                return Err(StateError::Unavailable(format!(
                    "connect to {}: {e}",
                    config.url
                )))
            }
            Err(_) => {
                return Err(StateError::Unavailable(format!(
                    "connect to {}: no answer within {LINK_TIMEOUT:?}",
                    config.url
                )))
            }
        };
        Ok(RedisStore {
            client,
            conn,
            runtime: tokio::runtime::Handle::current(),
            keys: Keys {
                prefix: config.prefix,
            },
            node: config.node,
            response_timeout: config.response_timeout,
            session_ttl: config.session_ttl,
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        })
    }

    /// Starts a subscriber task with its own connection and returns its events: floor grants and releases
    /// (this node's too, the caller filters), presence, `Resync` after every (re)connection and `Down` when
    /// the connection drops. The receiver starts in the down state: deny presses until the first `Resync`.
    /// The task reconnects by itself with backoff and ends when the receiver is dropped.
    pub fn subscribe(&self) -> mpsc::Receiver<StoreEvent> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        self.runtime
            .spawn(run_subscriber(self.client.clone(), self.keys.events(), tx));
        rx
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

    /// Join and refresh: (re)writes both directions with a new expiry and drops expired entries on the way.
    /// A refresh re-adds a member that is missing, so a Redis restarted empty fills up again within one
    /// heartbeat. Keys of two slots: fine on one Redis (`MULTI`); on Cluster this would be two transactions.
    async fn upsert(
        &self,
        channel: &str,
        member: &str,
        node: &str,
        publish: bool,
    ) -> Result<(), StateError> {
        let now_ms = millis(Duration::from_micros(wall_clock_us()));
        let ttl_ms = millis(self.session_ttl).max(1);
        let expiry = now_ms.saturating_add(ttl_ms);
        let members = self.keys.members(channel);
        let nodes = self.keys.member_nodes(channel);
        let channels = self.keys.member_channels(member);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrembyscore(&members, "-inf", now_ms)
            .ignore()
            .zadd(&members, member, expiry)
            .ignore()
            .hset(&nodes, member, node)
            .ignore()
            .pexpire(&members, ttl_ms)
            .ignore()
            .pexpire(&nodes, ttl_ms)
            .ignore()
            .zrembyscore(&channels, "-inf", now_ms)
            .ignore()
            .zadd(&channels, channel, expiry)
            .ignore()
            .pexpire(&channels, ttl_ms)
            .ignore();
        if publish {
            let event = Wire::Join {
                channel: channel.into(),
                member: member.into(),
                node: node.into(),
            };
            pipe.publish(self.keys.events(), encode(&event)?).ignore();
        }
        let mut conn = self.conn.clone();
        let what = if publish { "join" } else { "refresh" };
        self.call(what, pipe.query_async::<()>(&mut conn)).await
    }

    /// The live entries of a sorted set whose scores are expiry times, sorted by name.
    async fn live(&self, what: &str, key: String) -> Result<Vec<String>, StateError> {
        let now_ms = millis(Duration::from_micros(wall_clock_us()));
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = self
            .call(
                what,
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg(format!("({now_ms}"))
                    .arg("+inf")
                    .query_async(&mut conn),
            )
            .await?;
        names.sort();
        Ok(names)
    }
}

impl FloorStore for RedisStore {
    fn acquire(&self, req: AcquireRequest) -> StoreFuture<'_, Acquired> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut invocation = self.acquire.prepare_invoke();
            invocation
                .key(self.keys.floor(&req.channel))
                .key(self.keys.epoch(&req.channel))
                .arg(&req.channel)
                .arg(&req.member)
                .arg(&self.node)
                .arg(req.priority)
                .arg(millis(req.ttl).max(1))
                .arg(self.keys.events());
            let reply: Vec<Option<String>> = self
                .call("acquire", invocation.invoke_async(&mut conn))
                .await?;
            match reply.as_slice() {
                [Some(tag), Some(epoch)] if tag == "granted" => Ok(Acquired::Granted {
                    epoch: parse_epoch(epoch)?,
                }),
                [Some(tag), epoch, member, node, priority] if tag == "busy" => {
                    holder_from(epoch, member, node, priority)?
                        .map(Acquired::Busy)
                        .ok_or_else(|| {
                            StateError::Protocol("acquire: busy lock without fields".into())
                        })
                }
                _ => Err(StateError::Protocol(format!(
                    "acquire: unexpected reply {reply:?}"
                ))),
            }
        })
    }

    fn renew<'a>(&'a self, channel: &'a str, epoch: u64, ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut invocation = self.renew.prepare_invoke();
            invocation
                .key(self.keys.floor(channel))
                .arg(epoch)
                .arg(millis(ttl).max(1));
            let matched: i64 = self
                .call("renew", invocation.invoke_async(&mut conn))
                .await?;
            Ok(matched == 1)
        })
    }

    fn release<'a>(&'a self, channel: &'a str, epoch: u64) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut invocation = self.release.prepare_invoke();
            invocation
                .key(self.keys.floor(channel))
                .arg(epoch)
                .arg(channel)
                .arg(self.keys.events());
            let matched: i64 = self
                .call("release", invocation.invoke_async(&mut conn))
                .await?;
            Ok(matched == 1)
        })
    }

    fn holder<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Option<Holder>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let fields: Vec<Option<String>> = self
                .call(
                    "holder",
                    redis::cmd("HMGET")
                        .arg(self.keys.floor(channel))
                        .arg(&["epoch", "member", "node", "priority"])
                        .query_async(&mut conn),
                )
                .await?;
            match fields.as_slice() {
                [epoch, member, node, priority] => holder_from(epoch, member, node, priority),
                _ => Err(StateError::Protocol(format!(
                    "holder: unexpected reply {fields:?}"
                ))),
            }
        })
    }
}

impl SessionStore for RedisStore {
    fn join<'a>(&'a self, channel: &'a str, member: &'a str, node: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(self.upsert(channel, member, node, true))
    }

    /// Idempotent; publishes `leave` even when the member was not there.
    fn leave<'a>(
        &'a self,
        channel: &'a str,
        member: &'a str,
        node: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let event = Wire::Leave {
                channel: channel.into(),
                member: member.into(),
                node: node.into(),
            };
            let mut pipe = redis::pipe();
            pipe.atomic()
                .zrem(self.keys.members(channel), member)
                .ignore()
                .hdel(self.keys.member_nodes(channel), member)
                .ignore()
                .zrem(self.keys.member_channels(member), channel)
                .ignore()
                .publish(self.keys.events(), encode(&event)?)
                .ignore();
            let mut conn = self.conn.clone();
            self.call("leave", pipe.query_async::<()>(&mut conn)).await
        })
    }

    fn refresh<'a>(
        &'a self,
        channel: &'a str,
        member: &'a str,
        node: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.upsert(channel, member, node, false))
    }

    fn members<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(self.live("members", self.keys.members(channel)))
    }

    fn channels_of<'a>(&'a self, member: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(self.live("channels_of", self.keys.member_channels(member)))
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

/// A holder from the lock's fields: `None` when the lock is absent (all fields missing), an error when only
/// some are there (a foreign writer).
fn holder_from(
    epoch: &Option<String>,
    member: &Option<String>,
    node: &Option<String>,
    priority: &Option<String>,
) -> Result<Option<Holder>, StateError> {
    match (epoch, member, node, priority) {
        (None, None, None, None) => Ok(None),
        (Some(epoch), Some(member), Some(node), Some(priority)) => Ok(Some(Holder {
            member: member.clone(),
            node: node.clone(),
            epoch: parse_epoch(epoch)?,
            priority: priority
                .parse()
                .map_err(|_| StateError::Protocol(format!("priority {priority:?} is not a u8")))?,
        })),
        _ => Err(StateError::Protocol(
            "floor lock with missing fields".into(),
        )),
    }
}

/// Turns a published message into an event; `None` (and a warning) for anything it does not understand.
fn decode(payload: &[u8]) -> Option<StoreEvent> {
    let wire: Wire = match serde_json::from_slice(payload) {
        Ok(wire) => wire,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable store event");
            return None;
        }
    };
    let epoch = |s: &str| match s.parse::<u64>() {
        Ok(e) => Some(e),
        Err(_) => {
            tracing::warn!(epoch = s, "ignoring a store event with a bad epoch");
            None
        }
    };
    Some(match wire {
        Wire::Grant {
            channel,
            epoch: e,
            member,
            node,
            priority,
        } => {
            let epoch = epoch(&e)?;
            let holder = Holder {
                member,
                node,
                epoch,
                priority,
            };
            StoreEvent::Floor {
                channel,
                holder: Some(holder),
                epoch,
            }
        }
        Wire::Idle { channel, epoch: e } => StoreEvent::Floor {
            channel,
            holder: None,
            epoch: epoch(&e)?,
        },
        Wire::Join {
            channel,
            member,
            node,
        } => StoreEvent::Presence {
            channel,
            member,
            node,
            joined: true,
        },
        Wire::Leave {
            channel,
            member,
            node,
        } => StoreEvent::Presence {
            channel,
            member,
            node,
            joined: false,
        },
    })
}

/// The subscriber: connect, `Resync`, forward messages, `Down` when the link drops, back off, again.
async fn run_subscriber(client: Client, events_channel: String, tx: mpsc::Sender<StoreEvent>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let opened = tokio::select! {
            _ = tx.closed() => return,
            opened = tokio::time::timeout(LINK_TIMEOUT, open_subscription(&client, &events_channel)) => opened,
        };
        match opened {
            Ok(Ok((sink, stream))) => {
                backoff = BACKOFF_MIN;
                if tx.send(StoreEvent::Resync).await.is_err() {
                    return;
                }
                if !forward(sink, stream, &tx).await {
                    return;
                }
                tracing::warn!("redis subscription lost; reconnecting");
                if tx.send(StoreEvent::Down).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "redis subscription: connect failed"),
            Err(_) => tracing::debug!("redis subscription: connect timed out"),
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A dedicated connection subscribed to the events channel (`subscribe` returns once Redis confirmed it).
async fn open_subscription(
    client: &Client,
    channel: &str,
) -> RedisResult<(PubSubSink, PubSubStream)> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub.split())
}

/// Forwards messages until the link drops (`true`) or the receiver is gone (`false`).
async fn forward(
    mut sink: PubSubSink,
    mut stream: PubSubStream,
    tx: &mpsc::Sender<StoreEvent>,
) -> bool {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            _ = tx.closed() => return false,
            msg = stream.next() => match msg {
                None => return true,
                Some(msg) => {
                    if let Some(event) = decode(msg.get_payload_bytes()) {
                        if tx.send(event).await.is_err() {
                            return false;
                        }
                    }
                }
            },
            _ = ping.tick() => {
                let pong = tokio::time::timeout(LINK_TIMEOUT, sink.ping::<redis::Value>()).await;
                if !matches!(pong, Ok(Ok(_))) {
                    return true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_scripts_publish() {
        let grant = br#"{"kind":"grant","channel":"c","epoch":"1700000000000001","member":"m","node":"n","priority":3}"#;
        let holder = Holder {
            member: "m".into(),
            node: "n".into(),
            epoch: 1_700_000_000_000_001,
            priority: 3,
        };
        assert_eq!(
            decode(grant),
            Some(StoreEvent::Floor {
                channel: "c".into(),
                holder: Some(holder),
                epoch: 1_700_000_000_000_001
            })
        );
        let idle = br#"{"kind":"idle","channel":"c","epoch":"7"}"#;
        assert_eq!(
            decode(idle),
            Some(StoreEvent::Floor {
                channel: "c".into(),
                holder: None,
                epoch: 7
            })
        );
        assert_eq!(decode(b"not json"), None);
        assert_eq!(
            decode(br#"{"kind":"idle","channel":"c","epoch":"x"}"#),
            None
        );
    }

    #[test]
    fn keys_put_the_channel_in_the_hash_tag() {
        let keys = Keys { prefix: "p".into() };
        assert_eq!(keys.floor("ops"), "p:tg:{ops}:floor");
        assert_eq!(keys.epoch("ops"), "p:tg:{ops}:epoch");
        assert_eq!(keys.members("ops"), "p:tg:{ops}:members");
        assert_eq!(keys.member_nodes("ops"), "p:tg:{ops}:member_nodes");
        assert_eq!(keys.member_channels("ann"), "p:tg:member:{ann}:channels");
        assert_eq!(keys.events(), "p:tg:events");
    }
}
