//! The cluster registry and the relay: this node's liveness, which nodes serve which channel, where a
//! local speaker's packets are relayed (once per other node), which nodes' relay packets the shards
//! accept, and cleaning up after a dead node. All of it is off the packet path: the shards get values
//! ([`Command::RelayTargets`], [`Command::RelayPeers`]) when something changed.
//!
//! Everything here is active only with the relay on (`relay_addrs` configured).

use std::net::SocketAddr;
use std::time::Instant;

use tracing::warn;

use super::calls::{Purpose, StoreCall};
use super::{HubCore, ANNOUNCE_EVERY, NODE_TTL, RELAY_REFRESH, REREGISTER_RETRIES};
use crate::shard::{self, Command};
use crate::signal::protocol::Message;
use crate::state::NodeInfo;

impl HubCore {
    fn node_info(&self) -> Option<NodeInfo> {
        self.config.relay_addrs.as_ref().map(|relay| NodeInfo {
            node: self.config.node.clone(),
            relay: relay.clone(),
            draining: self.drain.is_some(),
        })
    }

    fn set_channel_node(&mut self, channel: &str, present: bool, retries: u32, now: Instant) {
        let call = StoreCall::SetChannelNode {
            channel: channel.to_string(),
            node: self.config.node.clone(),
            present,
        };
        let timeout = self.config.store_timeout;
        self.calls
            .start_with_retries(call, Purpose::None, now, timeout, retries);
    }

    /// This node now serves `channel`: other nodes relay its speakers here.
    pub(super) fn channel_opened(&mut self, channel: &str, now: Instant) {
        if self.config.relay_addrs.is_some() {
            self.set_channel_node(channel, true, 0, now);
        }
    }

    /// This node no longer serves `channel`.
    pub(super) fn channel_closed(&mut self, channel: &str, now: Instant) {
        if self.config.relay_addrs.is_some() {
            self.set_channel_node(channel, false, 0, now);
        }
    }

    /// After the liveness announce succeeded: the channels this node serves.
    pub(super) fn register_channels(&mut self, channels: Vec<String>, retries: u32, now: Instant) {
        for channel in channels {
            self.set_channel_node(&channel, true, retries, now);
        }
    }

    /// After a store reconnect (it may have come back empty): liveness, then channel registrations, and
    /// the sessions of every local member, each retried while the command connection comes back.
    pub(super) fn reregister(&mut self, now: Instant) {
        if let Some(key) = self.config.cluster_key.clone() {
            let timeout = self.config.store_timeout;
            self.calls.start_with_retries(
                StoreCall::ClusterKey { key },
                Purpose::ClusterKey,
                now,
                timeout,
                REREGISTER_RETRIES,
            );
        }
        if let Some(info) = self.node_info() {
            self.periodic.announce = now + ANNOUNCE_EVERY;
            let then_register = self.channels.keys().cloned().collect();
            let purpose = Purpose::Announce {
                then_register,
                retries: REREGISTER_RETRIES,
            };
            let call = StoreCall::Announce {
                info,
                ttl: NODE_TTL,
            };
            let timeout = self.config.store_timeout;
            self.calls
                .start_with_retries(call, purpose, now, timeout, REREGISTER_RETRIES);
        }
        self.refresh_sessions(now, REREGISTER_RETRIES);
    }

    /// Renews this node's liveness (then its channel registrations) and re-reads every channel's nodes.
    pub(super) fn tick_relay(&mut self, now: Instant) {
        let Some(info) = self.node_info() else {
            return;
        };
        if now >= self.periodic.announce {
            self.periodic.announce = now + ANNOUNCE_EVERY;
            // Liveness first, then the channels: a node registered in a channel without a liveness key
            // counts as dead for the others, so a registration must never land before the announce.
            let purpose = Purpose::Announce {
                then_register: self.channels.keys().cloned().collect(),
                retries: 0,
            };
            let call = StoreCall::Announce {
                info,
                ttl: NODE_TTL,
            };
            self.call(call, purpose, now);
        }
        if now >= self.periodic.relay_refresh {
            self.periodic.relay_refresh = now + RELAY_REFRESH;
            let channels: Vec<String> = self.channels.keys().cloned().collect();
            for channel in channels {
                let call = StoreCall::ChannelNodes {
                    channel: channel.clone(),
                };
                self.call(call, Purpose::Nodes { channel }, now);
            }
        }
    }

    /// The registry's view of a channel: relay to every other live node once, accept relay from every live
    /// node, and clean up after the dead ones.
    pub(super) fn on_nodes(
        &mut self,
        channel: &str,
        live: Vec<NodeInfo>,
        dead: Vec<String>,
        now: Instant,
    ) {
        let live_ids: Vec<&str> = live.iter().map(|n| n.node.as_str()).collect();
        let dead_ids: Vec<&str> = dead.iter().map(String::as_str).collect();
        let gone = self.remote.nodes(channel, &live_ids, &dead_ids, now);
        let mut gone_nodes: Vec<String> = Vec::new();
        for (member, node) in gone {
            warn!(
                node,
                channel, member, "member's node is gone: telling its channel"
            );
            let msg = Message::Presence {
                channel: channel.to_string(),
                joined: None,
                left: Some(member.clone()),
            };
            self.broadcast_presence(channel, &member, &msg);
            if !dead.contains(&node) && !gone_nodes.contains(&node) {
                gone_nodes.push(node);
            }
        }
        // Whatever the store still holds of a node found gone goes too (its liveness key expired long
        // ago); a dead node's members are removed, which publishes `leave` for each: every node's
        // presence follows.
        for node in gone_nodes.into_iter().chain(dead.iter().cloned()) {
            if dead.contains(&node) {
                warn!(node, channel, "node is gone: removing its members");
                self.known_nodes.remove(&node);
            }
            let call = StoreCall::EvictNode {
                channel: channel.to_string(),
                node,
            };
            self.call(call, Purpose::None, now);
        }
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        let mut targets = Vec::new();
        for info in live {
            if info.node == self.config.node || info.relay.is_empty() {
                continue;
            }
            // The channel lives on the same-named shard index on every node with that many shards.
            targets.push(info.relay[shard::shard_of(channel, info.relay.len())]);
            self.known_nodes.insert(info.node, info.relay);
        }
        targets.sort();
        if targets != ch.relay_targets {
            ch.relay_targets = targets.clone();
            let command = Command::RelayTargets {
                channel: channel.to_string(),
                targets,
            };
            let shard = ch.shard;
            self.shard_command(shard, command);
        }
        let mut peers: Vec<(SocketAddr, String)> = self
            .known_nodes
            .iter()
            .flat_map(|(node, addrs)| addrs.iter().map(move |a| (*a, node.clone())))
            .collect();
        peers.sort();
        peers.dedup();
        if peers != self.relay_peers {
            self.relay_peers = peers.clone();
            for shard in 0..self.config.media_ports.len() {
                let command = Command::RelayPeers {
                    peers: peers.clone(),
                };
                self.shard_command(shard, command);
            }
        }
    }

    /// The store's relay key after a reconnect: another key means a node started while the store had
    /// lost ours and made a new one — relay between it and this node fails until one of them restarts.
    pub(super) fn on_cluster_key(&mut self, stored: &str) {
        if self.config.cluster_key.as_deref() != Some(stored) {
            tracing::error!(
                "the relay key in the store is not this node's (the store lost it and another node made \
                 a new one): relay with nodes started since fails until this node restarts; set \
                 --cluster-secret on every node to avoid this"
            );
            self.counters.cluster_key_mismatch += 1;
        }
    }

    /// At shutdown: this node is gone now rather than when its liveness runs out, and serves nothing.
    pub(super) fn withdraw(&mut self, now: Instant) {
        if self.config.relay_addrs.is_none() {
            return;
        }
        let call = StoreCall::Withdraw {
            node: self.config.node.clone(),
        };
        self.call(call, Purpose::None, now);
        let channels: Vec<String> = self.channels.keys().cloned().collect();
        for channel in channels {
            self.set_channel_node(&channel, false, 0, now);
        }
    }
}
