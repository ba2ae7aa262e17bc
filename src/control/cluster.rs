//! The cluster registry and the relay: this node's liveness and load, the node table, which nodes serve
//! each channel, where a local speaker's packets are relayed (once per other node), which nodes' relay
//! packets the shards accept, and cleaning up after a dead node. All of it is off the packet path: the
//! shards get values ([`Command::RelayTargets`], [`Command::RelayPeers`]) when something changed.
//!
//! Nothing here polls per channel. Registrations come as [`StoreEvent::ChannelNode`] on the channel's own
//! events (which this node follows while it serves the channel), arrivals and departures as
//! [`StoreEvent::Node`]; the node table — one read for the whole cluster — is read every
//! [`NODES_EVERY`], which is also how a node that died without a word is found. A channel's nodes are read
//! once when its subscription is confirmed, after a store reconnect, and by the slow sweep
//! (`sweep.rs`) that repairs whatever pub/sub lost.
//!
//! Everything here is active only with the relay on (`relay_addrs` configured).
//!
//! [`StoreEvent::ChannelNode`]: crate::state::StoreEvent::ChannelNode
//! [`StoreEvent::Node`]: crate::state::StoreEvent::Node

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::warn;

use super::calls::{Purpose, StoreCall};
use super::{HubCore, ANNOUNCE_EVERY, NODE_TTL, REREGISTER_RETRIES};
use crate::shard::{self, Command};
use crate::signal::protocol::Message;
use crate::state::{NodeInfo, NodeTable};

/// How often the node table is read: how soon a node that died without withdrawing is found once its
/// liveness (≈ 10 s) has run out. One call per node per period, whatever the number of channels.
pub(super) const NODES_EVERY: Duration = Duration::from_secs(1);

impl HubCore {
    /// Whether this node keeps a node table (relay on, or placement by redirect).
    pub(super) fn uses_registry(&self) -> bool {
        self.config.relay_addrs.is_some()
    }

    pub(super) fn node_info(&self) -> Option<NodeInfo> {
        self.config.relay_addrs.as_ref().map(|relay| NodeInfo {
            node: self.config.node.clone(),
            relay: relay.clone(),
            draining: self.drain.is_some(),
            url: self.config.public_url.clone(),
            load: self.load(),
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

    /// Keeps this node's registration in `channel` (and its TTL) in the store.
    pub(super) fn refresh_registration(&mut self, channel: &str, now: Instant) {
        self.set_channel_node(channel, true, 0, now);
    }

    /// This node now serves `channel`: follow its events, and other nodes relay its speakers here.
    pub(super) fn channel_opened(&mut self, channel: &str, now: Instant) {
        if self.config.shared {
            self.out.push_back(super::Output::Watch {
                channel: channel.to_string(),
                on: true,
            });
        }
        if self.uses_registry() {
            self.set_channel_node(channel, true, 0, now);
        }
    }

    /// This node no longer serves `channel`.
    pub(super) fn channel_closed(&mut self, channel: &str, now: Instant) {
        if self.config.shared {
            self.out.push_back(super::Output::Watch {
                channel: channel.to_string(),
                on: false,
            });
        }
        if self.uses_registry() {
            self.set_channel_node(channel, false, 0, now);
        }
        self.unplace(channel, now);
    }

    /// The subscription to `channel`'s events is confirmed: read what may have been published before it.
    pub(super) fn on_watching(&mut self, channel: &str, now: Instant) {
        if !self.channels.contains_key(channel) {
            return;
        }
        self.read_holder(channel, now);
        if self.uses_registry() {
            self.read_channel_nodes(channel, now);
        }
    }

    pub(super) fn read_channel_nodes(&mut self, channel: &str, now: Instant) {
        let call = StoreCall::ChannelNodes {
            channel: channel.to_string(),
        };
        let purpose = Purpose::Nodes {
            channel: channel.to_string(),
        };
        self.call(call, purpose, now);
    }

    /// After the liveness announce succeeded: the channels this node serves.
    pub(super) fn register_channels(&mut self, channels: Vec<String>, retries: u32, now: Instant) {
        for channel in channels {
            self.set_channel_node(&channel, true, retries, now);
            if retries > 0 {
                // Re-registration after a reconnect: who else serves the channel may have changed.
                self.read_channel_nodes(&channel, now);
            }
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
            self.periodic.nodes = now;
        }
        self.refresh_sessions(now, REREGISTER_RETRIES);
    }

    /// Renews this node's liveness and reads the node table, each when due.
    pub(super) fn tick_registry(&mut self, now: Instant) {
        let Some(info) = self.node_info() else {
            return;
        };
        if now >= self.periodic.announce {
            self.periodic.announce = now + ANNOUNCE_EVERY;
            let purpose = Purpose::Announce {
                then_register: Vec::new(),
                retries: 0,
            };
            let call = StoreCall::Announce {
                info,
                ttl: NODE_TTL,
            };
            self.call(call, purpose, now);
        }
        if now >= self.periodic.nodes && self.store_up {
            self.periodic.nodes = now + NODES_EVERY;
            self.call(StoreCall::Nodes, Purpose::NodeTable, now);
        }
    }

    /// A node arrived (read the table now, for its addresses) or withdrew (it is gone now).
    pub(super) fn on_node_event(&mut self, node: &str, live: bool, now: Instant) {
        if node == self.config.node || !self.uses_registry() {
            return;
        }
        if live {
            self.periodic.nodes = now;
            return;
        }
        let table = NodeTable {
            live: self
                .table
                .values()
                .filter(|n| n.node != node)
                .cloned()
                .collect(),
            dead: vec![node.to_string()],
        };
        self.on_table(table, now);
    }

    /// `node` started or stopped serving `channel`.
    pub(super) fn on_channel_node(
        &mut self,
        channel: &str,
        node: &str,
        present: bool,
        now: Instant,
    ) {
        if node == self.config.node || !self.uses_registry() {
            return;
        }
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        if present {
            ch.nodes.insert(node.to_string());
            if !self.table.contains_key(node) {
                // Its addresses are not known yet: read the table now.
                self.periodic.nodes = now;
            }
        } else {
            ch.nodes.remove(node);
        }
        self.update_relay(channel);
    }

    /// The ids registered in `channel`, read from the store.
    pub(super) fn on_channel_nodes(&mut self, channel: &str, ids: Vec<String>, now: Instant) {
        let me = self.config.node.clone();
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        ch.nodes = ids.into_iter().filter(|n| *n != me).collect();
        let unknown = ch.nodes.iter().any(|n| !self.table.contains_key(n));
        if unknown {
            self.periodic.nodes = now;
        }
        self.update_relay(channel);
    }

    /// The node table, read from the store (or a departure): relay targets and peers follow it, remote
    /// members of nodes that are gone are told gone, and the store's entries of dead nodes are removed.
    pub(super) fn on_table(&mut self, table: NodeTable, now: Instant) {
        self.placed_seen();
        let table_live: Table = table
            .live
            .into_iter()
            .filter(|n| n.node != self.config.node)
            .map(|n| (n.node.clone(), n))
            .collect();
        // Relay targets depend on the nodes' addresses only; a read that changed nothing but loads (every
        // announce) must not walk every channel's targets again.
        let relays_changed = table_live.len() != self.table.len()
            || table_live
                .iter()
                .any(|(id, n)| self.table.get(id).is_none_or(|old| old.relay != n.relay));
        self.table = table_live;
        let live_ids: Vec<&str> = self.table.keys().map(String::as_str).collect();
        let dead_ids: Vec<&str> = table.dead.iter().map(String::as_str).collect();
        let mut evict: Vec<(String, String)> = Vec::new();
        let mut told: Vec<(String, String, String)> = Vec::new();
        for (name, ch) in self.channels.iter_mut() {
            for (member, node) in self.remote.nodes(name, &live_ids, &dead_ids, now) {
                told.push((name.clone(), member, node));
            }
            let dead_here: Vec<String> = ch
                .nodes
                .iter()
                .filter(|n| dead_ids.contains(&n.as_str()))
                .cloned()
                .collect();
            for node in dead_here {
                ch.nodes.remove(&node);
                evict.push((name.clone(), node));
            }
        }
        for (channel, member, node) in told {
            warn!(
                node,
                channel, member, "member's node is gone: telling its channel"
            );
            let msg = Message::Presence {
                channel: channel.clone(),
                joined: None,
                left: Some(member.clone()),
            };
            self.broadcast_presence(&channel, &member, &msg);
            if !evict.contains(&(channel.clone(), node.clone())) {
                evict.push((channel, node));
            }
        }
        // A dead node's members are removed from the store, which publishes `leave` for each: every
        // node's presence follows.
        let evicted = !evict.is_empty();
        for (channel, node) in evict {
            warn!(node, channel, "node is gone: removing its members");
            self.call(StoreCall::EvictNode { channel, node }, Purpose::None, now);
        }
        if relays_changed || evicted {
            let names: Vec<String> = self.channels.keys().cloned().collect();
            for name in names {
                self.update_relay(&name);
            }
            self.update_relay_peers();
        }
    }

    /// Sends `channel`'s shard its relay targets when they changed: one address per other live node
    /// serving it.
    fn update_relay(&mut self, channel: &str) {
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        let mut targets: Vec<SocketAddr> = ch
            .nodes
            .iter()
            .filter_map(|n| self.table.get(n))
            .filter(|info| !info.relay.is_empty())
            // The channel lives on the same-named shard index on every node with that many shards.
            .map(|info| info.relay[shard::shard_of(channel, info.relay.len())])
            .collect();
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
    }

    /// Every shard accepts relay packets from the live nodes' addresses only.
    fn update_relay_peers(&mut self) {
        let mut peers: Vec<(SocketAddr, String)> = self
            .table
            .values()
            .flat_map(|info| info.relay.iter().map(move |a| (*a, info.node.clone())))
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
        if !self.uses_registry() {
            return;
        }
        let call = StoreCall::Withdraw {
            node: self.config.node.clone(),
        };
        self.call(call, Purpose::None, now);
        let channels: Vec<String> = self.channels.keys().cloned().collect();
        for channel in channels {
            self.set_channel_node(&channel, false, 0, now);
            self.unplace(&channel, now);
        }
    }
}

/// The live nodes of the table, by id (this node excluded).
pub(super) type Table = HashMap<String, NodeInfo>;
