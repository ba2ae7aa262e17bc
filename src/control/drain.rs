//! Draining: how a node leaves service without cutting anyone off mid-sentence (SIGTERM, `POST
//! /admin/drain`, or a shard that died).
//!
//! From [`Input::Drain`](super::Input::Drain) on, the node
//! - says so in the registry (its liveness entry carries `draining`, for placement to read) and in
//!   `/readyz` (the load balancer stops sending it clients);
//! - refuses new connections and joins with `goaway` (protocol v1.1), and new presses with `denied`
//!   `unavailable` (a new talk burst would only be cut when the node goes);
//! - lets the talk bursts in progress end: a connection is sent `goaway` and closed as soon as every
//!   channel it is in has an idle floor (no speaker, local or remote, nothing queued) — a listener hears
//!   the sentence to its end too;
//! - at the drain deadline (`--drain-timeout`) sends `goaway` to whoever is left and closes them.
//!
//! The drain is complete ([`HubCore::is_drained`]) when no connection is left; the runner then stops
//! the node the usual way ([`Input::Shutdown`](super::Input::Shutdown)).
//!
//! Only channels that were seen busy are watched (`busy`), so a step costs the number of channels still
//! talking, not the number of connections.

use std::collections::BTreeSet;
use std::time::Instant;

use serde_json::Value;
use tracing::{info, warn};

use super::HubCore;
use crate::ids::ConnId;
use crate::signal::protocol::{Message, GOAWAY_RETRY_AFTER_MS};

/// What `/healthz` and `/readyz` need from the control core.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Health {
    /// The node is draining: not ready for new clients.
    pub draining: bool,
    /// With a shared store: whether its subscription is up (floors can be decided). Always true on the
    /// embedded store.
    pub store_up: bool,
    /// Shards whose thread died, with the panic's message.
    pub dead_shards: Vec<(usize, String)>,
}

/// A drain in progress.
#[derive(Debug)]
pub(super) struct Drain {
    /// When whoever is left is closed anyway.
    pub(super) deadline: Instant,
    /// Channels whose floor was busy when one of their connections was looked at: when one goes idle,
    /// its connections are looked at again.
    busy: BTreeSet<String>,
}

impl HubCore {
    /// Whether the node is draining (it refuses joins and presses; `/readyz` says not ready).
    pub fn is_draining(&self) -> bool {
        self.drain.is_some()
    }

    /// Whether a drain is complete: no client is left. The runner then stops the node.
    pub fn is_drained(&self) -> bool {
        self.drain.is_some() && self.conns.is_empty()
    }

    /// What `/healthz` and `/readyz` report of the control core.
    pub fn health(&self) -> Health {
        Health {
            draining: self.drain.is_some(),
            store_up: self.store_up,
            dead_shards: self
                .dead_shards
                .iter()
                .map(|(s, r)| (*s, r.clone()))
                .collect(),
        }
    }

    /// A shard's thread died: its channels are lost (they count as idle from now on), and the node
    /// drains so that its process can be restarted.
    pub(super) fn on_shard_died(&mut self, shard: usize, reason: String, now: Instant) {
        tracing::error!(shard, reason, "shard died: draining the node");
        self.counters.shard_panics += 1;
        self.dead_shards.insert(shard, reason);
        self.start_drain(now);
        // Connections kept for a channel of that shard may be idle now.
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.close_if_idle(conn, now);
        }
    }

    /// Starts draining (once; later calls change nothing).
    pub(super) fn start_drain(&mut self, now: Instant) {
        if self.drain.is_some() {
            return;
        }
        let deadline = now + self.config.drain_timeout;
        info!(
            connections = self.conns.len(),
            timeout = ?self.config.drain_timeout,
            "draining: refusing joins, closing each client once its channels are idle"
        );
        self.drain = Some(Drain {
            deadline,
            busy: BTreeSet::new(),
        });
        // Tell the registry now rather than at the next renewal.
        self.periodic.announce = now;
        self.tick_registry(now);
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.close_if_idle(conn, now);
        }
    }

    /// A drain step after every input: the connections of channels that went idle are closed; at the
    /// deadline, everyone left is.
    pub(super) fn drain_step(&mut self, now: Instant) {
        let Some(drain) = &self.drain else {
            return;
        };
        if now >= drain.deadline {
            if self.conns.is_empty() {
                return;
            }
            warn!(
                connections = self.conns.len(),
                "drain timeout: closing the clients that are still talking"
            );
            let conns: Vec<ConnId> = self.conns.keys().copied().collect();
            for conn in conns {
                self.goaway(conn, None, now);
            }
            return;
        }
        let went_idle: Vec<String> = drain
            .busy
            .iter()
            .filter(|ch| !self.channel_busy(ch))
            .cloned()
            .collect();
        for channel in went_idle {
            if let Some(d) = &mut self.drain {
                d.busy.remove(&channel);
            }
            let conns: Vec<ConnId> = self
                .channels
                .get(&channel)
                .map(|ch| ch.members.values().map(|m| m.conn).collect())
                .unwrap_or_default();
            for conn in conns {
                self.close_if_idle(conn, now);
            }
        }
    }

    /// While draining: a join is refused with `goaway` (its `id` echoed), and the connection closed if
    /// nothing of it is still talking.
    pub(super) fn refuse_join_draining(&mut self, conn: ConnId, id: Option<Value>, now: Instant) {
        self.send_goaway(conn, id);
        self.counters.joins_refused_draining += 1;
        if !self.still_talking(conn) {
            self.disconnect(conn, now);
        }
    }

    /// Sends `goaway` and closes `conn` unless one of its channels is still talking.
    pub(super) fn close_if_idle(&mut self, conn: ConnId, now: Instant) {
        if !self.still_talking(conn) {
            self.goaway(conn, None, now);
        }
    }

    /// Whether a channel of `conn` is still talking; that channel is then watched, so that the
    /// connection is looked at again when it goes idle.
    fn still_talking(&mut self, conn: ConnId) -> bool {
        let Some(channel) = self.busy_channel_of(conn) else {
            return false;
        };
        if let Some(d) = &mut self.drain {
            d.busy.insert(channel);
        }
        true
    }

    /// `goaway`, then the connection is closed (its memberships end as on a disconnect).
    fn goaway(&mut self, conn: ConnId, id: Option<Value>, now: Instant) {
        self.send_goaway(conn, id);
        self.disconnect(conn, now);
    }

    fn send_goaway(&mut self, conn: ConnId, id: Option<Value>) {
        self.send(
            conn,
            &Message::Goaway {
                reason: "draining",
                retry_after_ms: GOAWAY_RETRY_AFTER_MS,
                id,
            },
        );
        self.counters.goaways += 1;
    }

    /// A channel of `conn` whose floor is not idle, if any.
    fn busy_channel_of(&self, conn: ConnId) -> Option<String> {
        let c = self.conns.get(&conn)?;
        c.joined
            .iter()
            .map(|(channel, _)| channel)
            .find(|channel| self.channel_busy(channel))
            .cloned()
    }

    /// Whether someone talks in `channel` (here or on another node), or is about to (a press being
    /// decided, a queue). A channel on a shard that died counts as idle: nobody hears it any more.
    fn channel_busy(&self, channel: &str) -> bool {
        self.channels.get(channel).is_some_and(|ch| {
            !self.dead_shards.contains_key(&ch.shard)
                && (ch.floor.speaker().is_some() || !ch.floor.is_quiet())
        })
    }
}
