//! The cluster registry on Redis: node liveness and load, which nodes serve which channel, and where each
//! channel is placed — pushed over pub/sub, so a registry where nothing changes costs nothing per channel.
//!
//! | key | type | expiry | holds |
//! |---|---|---|---|
//! | `P:tg:{nodes}:node:ID` | string: JSON [`NodeInfo`] (relay address per shard, draining, URL, load) | liveness TTL (≈ 10 s), renewed | the node is alive |
//! | `P:tg:{nodes}:live` | sorted set: node id → liveness expiry (Unix ms) | none; entries dead for an hour are dropped | who is alive, and who died recently |
//! | `P:tg:{ch}:nodes` | set of node ids | session TTL, refreshed | nodes with members in `ch` |
//! | `P:tg:{ch}:home` | string: node id | session TTL, refreshed by the home | the node `ch` is placed on |
//!
//! Every node key shares the `{nodes}` hash tag with the live set, so one script reads the whole table (one
//! call per node every few seconds, whatever the number of channels). A node that arrives or withdraws
//! publishes `node` on `P:tg:{nodes}:events`; a node that joins or leaves a channel publishes
//! `channel_node` on the channel's events, which only the nodes serving it hear. A node that dies publishes
//! nothing: the others find its entry expired in the live set, which is kept for an hour so that every node
//! sees the death, not only the first reader.

use std::time::Duration;

use super::{encode, millis, RedisStore, Wire};
use crate::state::{NodeInfo, NodeTable, Registry, StateError, StoreFuture};

/// How long a dead node stays in the live set (as dead).
const DEAD_MEMORY_MS: i64 = 3_600_000;

/// Renews a node's liveness; publishes its arrival when it was not alive.
/// KEYS: node key, live set. ARGV: id, value, ttl ms, node events channel, forget-dead-after ms, publish
/// verb (`PUBLISH`, or `SPUBLISH` on a Cluster: the node events channel is in the `{nodes}` slot).
pub(super) const ANNOUNCE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local before = redis.call('ZSCORE', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[5]))
if not before or tonumber(before) <= now then
  redis.call(ARGV[6], ARGV[4], cjson.encode({kind = 'node', node = ARGV[1], live = true}))
end
return 1
";

/// The node table: `{id, value}` pairs, value `''` for a node whose liveness has expired.
/// KEYS: live set. ARGV: node key prefix (the id follows).
pub(super) const NODES: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {}
for i = 1, #all, 2 do
  local v = false
  if tonumber(all[i + 1]) > now then v = redis.call('GET', ARGV[1] .. all[i]) end
  out[#out + 1] = all[i]
  out[#out + 1] = v or ''
end
return out
";

/// A clean departure: the node is dead now for everyone.
/// KEYS: node key, live set. ARGV: id, node events channel, publish verb.
pub(super) const WITHDRAW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', KEYS[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call(ARGV[3], ARGV[2], cjson.encode({kind = 'node', node = ARGV[1], live = false}))
return 1
";

/// Registers a node in a channel (or not), refreshing the set's TTL; publishes only a change.
/// KEYS: channel's node set. ARGV: '1' present / '0', node, ttl ms, events channel, event JSON, publish
/// verb.
pub(super) const SET_CHANNEL_NODE: &str = r"
local changed
if ARGV[1] == '1' then
  changed = redis.call('SADD', KEYS[1], ARGV[2])
else
  changed = redis.call('SREM', KEYS[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if changed == 1 then redis.call(ARGV[6], ARGV[4], ARGV[5]) end
return changed
";

/// Places a channel: keeps a usable home (refreshing its TTL when the caller is the home), else takes
/// the candidate. KEYS: home. ARGV: candidate, ttl ms, usable ids...
pub(super) const PLACE: &str = r"
local h = redis.call('GET', KEYS[1])
if h then
  local usable = false
  for i = 3, #ARGV do if ARGV[i] == h then usable = true end end
  if usable then
    if h == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
    return h
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
";

/// Forgets a channel's home if it is the caller. KEYS: home. ARGV: node.
pub(super) const UNPLACE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// A node's liveness value; `None` when it is not one (a foreign writer).
fn parse_node(node: String, value: &str) -> Option<NodeInfo> {
    match serde_json::from_str::<NodeInfo>(value) {
        Ok(info) => Some(NodeInfo { node, ..info }),
        Err(e) => {
            tracing::warn!(node, error = %e, "ignoring an unreadable node entry");
            None
        }
    }
}

impl Registry for RedisStore {
    fn announce<'a>(&'a self, node: &'a NodeInfo, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let value = serde_json::to_string(node)
                .map_err(|e| StateError::Protocol(format!("encode node: {e}")))?;
            let mut conn = self.conn.clone();
            let mut invocation = self.announce.prepare_invoke();
            invocation
                .key(self.keys.node(&node.node))
                .key(self.keys.live())
                .arg(&node.node)
                .arg(value)
                .arg(millis(ttl).max(1))
                .arg(self.keys.node_events())
                .arg(DEAD_MEMORY_MS)
                .arg(self.publish_verb());
            self.call("announce", invocation.invoke_async::<()>(&mut conn))
                .await
        })
    }

    fn withdraw<'a>(&'a self, node: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut invocation = self.withdraw.prepare_invoke();
            invocation
                .key(self.keys.node(node))
                .key(self.keys.live())
                .arg(node)
                .arg(self.keys.node_events())
                .arg(self.publish_verb());
            self.call("withdraw", invocation.invoke_async::<()>(&mut conn))
                .await
        })
    }

    fn set_channel_node<'a>(
        &'a self,
        channel: &'a str,
        node: &'a str,
        present: bool,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let event = encode(&Wire::ChannelNode {
                channel: channel.into(),
                node: node.into(),
                present,
            })?;
            let mut conn = self.conn.clone();
            let mut invocation = self.set_channel_node.prepare_invoke();
            invocation
                .key(self.keys.channel_nodes(channel))
                .arg(if present { "1" } else { "0" })
                .arg(node)
                .arg(millis(self.session_ttl).max(1))
                .arg(self.events_channel(channel))
                .arg(event)
                .arg(self.publish_verb());
            self.call("set_channel_node", invocation.invoke_async::<()>(&mut conn))
                .await
        })
    }

    fn channel_nodes<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let cmd = redis::cmd("SMEMBERS")
                .arg(self.keys.channel_nodes(channel))
                .to_owned();
            self.call("SMEMBERS", cmd.query_async(&mut conn)).await
        })
    }

    fn nodes(&self) -> StoreFuture<'_, NodeTable> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let prefix = self.keys.node("");
            let mut invocation = self.nodes.prepare_invoke();
            invocation.key(self.keys.live()).arg(prefix);
            let flat: Vec<String> = self
                .call("nodes", invocation.invoke_async(&mut conn))
                .await?;
            let mut table = NodeTable::default();
            for pair in flat.chunks(2) {
                match pair {
                    [id, v] if v.is_empty() => table.dead.push(id.clone()),
                    [id, v] => table.live.extend(parse_node(id.clone(), v)),
                    _ => return Err(StateError::Protocol("nodes: odd reply".into())),
                }
            }
            Ok(table)
        })
    }

    fn place<'a>(
        &'a self,
        channel: &'a str,
        candidate: &'a str,
        usable: &'a [String],
        ttl: Duration,
    ) -> StoreFuture<'a, String> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut invocation = self.place.prepare_invoke();
            invocation
                .key(self.keys.home(channel))
                .arg(candidate)
                .arg(millis(ttl).max(1))
                .arg(usable);
            self.call("place", invocation.invoke_async(&mut conn)).await
        })
    }

    fn unplace<'a>(&'a self, channel: &'a str, node: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut invocation = self.unplace.prepare_invoke();
            invocation.key(self.keys.home(channel)).arg(node);
            self.call("unplace", invocation.invoke_async::<()>(&mut conn))
                .await
        })
    }

    fn evict_node<'a>(&'a self, channel: &'a str, node: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let nodes_key = self.keys.member_nodes(channel);
            let all: Vec<(String, String)> = self
                .call(
                    "HGETALL",
                    redis::cmd("HGETALL").arg(&nodes_key).query_async(&mut conn),
                )
                .await?;
            let gone: Vec<String> = all
                .into_iter()
                .filter(|(_, n)| n == node)
                .map(|(m, _)| m)
                .collect();
            if gone.is_empty() {
                let cmd = redis::cmd("SREM")
                    .arg(self.keys.channel_nodes(channel))
                    .arg(node)
                    .to_owned();
                self.call("SREM node", cmd.query_async::<()>(&mut conn))
                    .await?;
                return Ok(gone);
            }
            // The channel's keys and events in one transaction (one Cluster slot); each member's
            // reverse index is in a slot of its own, so it is cleaned after, one command per member.
            let mut pipe = redis::pipe();
            pipe.atomic();
            pipe.cmd("ZREM")
                .arg(self.keys.members(channel))
                .arg(&gone)
                .ignore();
            pipe.cmd("HDEL").arg(&nodes_key).arg(&gone).ignore();
            pipe.cmd("SREM")
                .arg(self.keys.channel_nodes(channel))
                .arg(node)
                .ignore();
            for m in &gone {
                let event = Wire::Leave {
                    channel: channel.to_string(),
                    member: m.clone(),
                    node: node.to_string(),
                };
                pipe.cmd(self.publish_verb())
                    .arg(self.events_channel(channel))
                    .arg(encode(&event)?)
                    .ignore();
            }
            self.call("evict node", pipe.query_async::<()>(&mut conn))
                .await?;
            for m in &gone {
                let cmd = redis::cmd("ZREM")
                    .arg(self.keys.member_channels(m))
                    .arg(channel)
                    .to_owned();
                self.call("evict node", cmd.query_async::<()>(&mut conn))
                    .await?;
            }
            Ok(gone)
        })
    }

    fn cluster_key<'a>(&'a self, proposed: &'a str) -> StoreFuture<'a, String> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let key = self.keys.cluster_key();
            // SET NX then GET: the first node's key stays; the value never changes once set, so the
            // two steps need no script.
            let set = redis::cmd("SET")
                .arg(&key)
                .arg(proposed)
                .arg("NX")
                .to_owned();
            self.call(
                "SET NX cluster key",
                set.query_async::<Option<String>>(&mut conn),
            )
            .await?;
            let stored: Option<String> = self
                .call(
                    "GET cluster key",
                    redis::cmd("GET").arg(&key).query_async(&mut conn),
                )
                .await?;
            stored
                .ok_or_else(|| StateError::Protocol("the cluster key vanished after SET NX".into()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_entry_reads_back_as_announced() {
        let info = NodeInfo {
            node: "a".into(),
            relay: vec!["127.0.0.1:41000".parse().unwrap()],
            draining: true,
            url: Some("ws://a:8080/ws".into()),
            load: crate::state::NodeLoad {
                members: 3,
                pps: 50,
                cpu_permille: 120,
            },
        };
        let value = serde_json::to_string(&info).unwrap();
        assert_eq!(parse_node("a".into(), &value), Some(info));
        assert_eq!(parse_node("a".into(), "127.0.0.1:41000"), None);
    }
}
