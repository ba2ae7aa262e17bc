//! The cluster registry on Redis: node liveness and which nodes serve which channel.
//!
//! | key | type | expiry | holds |
//! |---|---|---|---|
//! | `P:tg:node:ID` | string `addr,addr,…[,draining]` (relay address per shard) | liveness TTL (≈ 10 s), renewed | the node is alive (and draining, when the last item says so) |
//! | `P:tg:{ch}:nodes` | set of node ids | none | nodes with members in `ch` |
//!
//! `draining` is one more comma-separated item rather than a key of its own: one `MGET` still reads every
//! node, and a node of an older version, which skips items that are not addresses, reads the value as
//! before. A node that dies stops renewing its key; the next node that reads the channel's set finds the key gone,
//! removes the id, and cleans up the dead node's members (`evict_node`).

use std::net::SocketAddr;
use std::time::Duration;

use super::{encode, millis, RedisStore, Wire};
use crate::state::{NodeInfo, Registry, StateError, StoreFuture};

/// The item of a node's liveness value that says it is draining.
const DRAINING: &str = "draining";

/// A node's liveness value: its relay addresses, and whether it drains.
fn parse_node(node: String, value: &str) -> NodeInfo {
    let items = value.split(',');
    NodeInfo {
        node,
        draining: items.clone().any(|i| i == DRAINING),
        relay: items.filter_map(|a| a.parse().ok()).collect(),
    }
}

impl Registry for RedisStore {
    fn announce<'a>(&'a self, node: &'a NodeInfo, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut value: Vec<String> = node.relay.iter().map(SocketAddr::to_string).collect();
            if node.draining {
                value.push(DRAINING.to_string());
            }
            let mut conn = self.conn.clone();
            let cmd = redis::cmd("SET")
                .arg(self.keys.node(&node.node))
                .arg(value.join(","))
                .arg("PX")
                .arg(millis(ttl))
                .to_owned();
            self.call("SET node", cmd.query_async::<()>(&mut conn))
                .await
        })
    }

    fn withdraw<'a>(&'a self, node: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let cmd = redis::cmd("DEL").arg(self.keys.node(node)).to_owned();
            self.call("DEL node", cmd.query_async::<()>(&mut conn))
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
            let mut conn = self.conn.clone();
            self.watch(channel, node, present);
            let verb = if present { "SADD" } else { "SREM" };
            let cmd = redis::cmd(verb)
                .arg(self.keys.channel_nodes(channel))
                .arg(node)
                .to_owned();
            self.call(verb, cmd.query_async::<()>(&mut conn)).await
        })
    }

    fn channel_nodes<'a>(
        &'a self,
        channel: &'a str,
    ) -> StoreFuture<'a, (Vec<NodeInfo>, Vec<String>)> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let set = self.keys.channel_nodes(channel);
            let ids: Vec<String> = self
                .call(
                    "SMEMBERS",
                    redis::cmd("SMEMBERS").arg(&set).query_async(&mut conn),
                )
                .await?;
            if ids.is_empty() {
                return Ok((Vec::new(), Vec::new()));
            }
            let keys: Vec<String> = ids.iter().map(|id| self.keys.node(id)).collect();
            let values: Vec<Option<String>> = self
                .call(
                    "MGET nodes",
                    redis::cmd("MGET").arg(&keys).query_async(&mut conn),
                )
                .await?;
            let (mut live, mut dead) = (Vec::new(), Vec::new());
            for (id, value) in ids.into_iter().zip(values) {
                match value {
                    Some(v) => live.push(parse_node(id, &v)),
                    None => dead.push(id),
                }
            }
            if !dead.is_empty() {
                let cmd = redis::cmd("SREM").arg(&set).arg(&dead).to_owned();
                self.call("SREM dead", cmd.query_async::<()>(&mut conn))
                    .await?;
            }
            Ok((live, dead))
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
    fn a_draining_node_reads_back_as_draining_and_its_addresses_are_kept() {
        let n = parse_node("a".into(), "127.0.0.1:41000,127.0.0.1:41001,draining");
        assert!(n.draining);
        assert_eq!(n.relay.len(), 2);
        let n = parse_node("a".into(), "127.0.0.1:41000");
        assert!(!n.draining);
        assert_eq!(n.relay.len(), 1);
    }
}
