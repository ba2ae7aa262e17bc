//! Placement: which node a channel lives on. With `--placement redirect`, a channel's first join anywhere
//! chooses its home — the least-loaded live node that is not draining, decided atomically in the store so
//! two nodes placing one channel at once agree — and joins on other nodes are answered `redirect` (protocol
//! v1.1) with the home's WebSocket URL. A channel already open here is joined here whatever its home (a
//! channel that outgrew its node spans nodes by relay); a home that is dead, draining or unknown is
//! replaced on the next join, and a join whose placement cannot be decided (store away, home without a
//! URL) is served here: redirect is an optimisation of relay, never a reason to refuse a member.
//!
//! With `--placement relay` (the default) every node serves whoever joins it, as before.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::calls::{Purpose, StoreCall};
use super::HubCore;
use crate::ids::ConnId;
use crate::signal::protocol::{self, Join, Message, SignalError};
use crate::state::{NodeLoad, StateError};

/// How long a home lives unless its node places the channel again (the sweep does, well within it).
pub(super) const HOME_TTL: Duration = Duration::from_secs(3600);
/// How much a channel placed on a node since the node table was read weighs, in members: the table's
/// load is up to one read old, and a burst of new channels must not all land on the node that looked
/// idlest.
const PLACED_WEIGHT: u64 = 8;

/// Where a channel's members are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Wherever they join; nodes relay to each other (one copy per node).
    #[default]
    Relay,
    /// On the channel's home node; other nodes answer `redirect`.
    Redirect,
}

impl FromStr for Placement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "relay" => Ok(Placement::Relay),
            "redirect" => Ok(Placement::Redirect),
            other => Err(format!("unknown placement {other:?} (relay or redirect)")),
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placement::Relay => "relay",
            Placement::Redirect => "redirect",
        })
    }
}

/// What placement remembers.
#[derive(Debug, Default)]
pub(super) struct PlacementState {
    /// Channels whose home is this node.
    homes: HashSet<String>,
    /// Channels placed on each node since the node table was last read.
    placed: HashMap<String, u64>,
}

impl HubCore {
    /// This node's load, as announced.
    pub(super) fn load(&self) -> NodeLoad {
        NodeLoad {
            members: self.channels.values().map(|c| c.members.len() as u64).sum(),
            pps: self.load.0,
            cpu_permille: self.load.1,
        }
    }

    /// Whether a join must learn its channel's home before it is served.
    pub(super) fn needs_placement(&self, join: &Join) -> bool {
        self.config.placement == Placement::Redirect
            && self.uses_registry()
            && self.store_up
            && !self.channels.contains_key(&join.channel)
    }

    /// Asks the store for the channel's home; the join goes on in [`HubCore::on_placed`].
    pub(super) fn place_join(
        &mut self,
        conn: ConnId,
        join: Join,
        id: Option<Value>,
        now: Instant,
    ) -> Result<(), SignalError> {
        // What this node can check, it checks before sending the client elsewhere.
        protocol::validate_name("channel", &join.channel)?;
        self.authorize(&join, now)?;
        let (candidate, usable) = self.candidates();
        let call = StoreCall::Place {
            channel: join.channel.clone(),
            candidate,
            usable,
            ttl: HOME_TTL,
        };
        let purpose = Purpose::Place {
            conn,
            join: Box::new(join),
            id,
        };
        self.call(call, purpose, now);
        Ok(())
    }

    /// The least-loaded usable node (by members, then CPU), and every node that may stay a home: live,
    /// not draining, reachable by URL — this one included.
    fn candidates(&self) -> (String, Vec<String>) {
        let me = self.config.node.clone();
        let mine = self.load();
        let mut options: Vec<(u64, u64, String)> = vec![(mine.members, mine.cpu_permille, me)];
        for (id, info) in &self.table {
            if info.draining || info.url.is_none() {
                continue;
            }
            let placed = self.placement.placed.get(id).copied().unwrap_or(0);
            let members = info.load.members + placed * PLACED_WEIGHT;
            options.push((members, info.load.cpu_permille, id.clone()));
        }
        options.sort();
        let usable = options.iter().map(|(_, _, id)| id.clone()).collect();
        (options[0].2.clone(), usable)
    }

    /// The channel's home is known (or could not be): redirect the client there, or serve it here.
    pub(super) fn on_placed(
        &mut self,
        purpose: Purpose,
        result: Result<String, StateError>,
        now: Instant,
    ) {
        let Purpose::Place { conn, join, id } = purpose else {
            return;
        };
        if !self.conns.contains_key(&conn) {
            return;
        }
        match result {
            Ok(home) if home == self.config.node => {
                self.placement.homes.insert(join.channel.clone());
            }
            Ok(home) => {
                if let Some(url) = self.table.get(&home).and_then(|n| n.url.clone()) {
                    *self.placement.placed.entry(home).or_default() += 1;
                    self.counters.redirects += 1;
                    let msg = Message::Redirect {
                        channel: join.channel.clone(),
                        url,
                        id,
                    };
                    self.send(conn, &msg);
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "placement failed: serving the join here"),
        }
        if let Err(e) = self.on_join(conn, *join, id.clone(), now) {
            self.send_error(conn, &e, id);
        }
    }

    /// The node table was read: its loads include what was placed since.
    pub(super) fn placed_seen(&mut self) {
        self.placement.placed.clear();
    }

    /// Keeps this node's homes alive (the sweep calls it once per round per channel).
    pub(super) fn refresh_home(&mut self, channel: &str, now: Instant) {
        if self.placement.homes.contains(channel) {
            let me = self.config.node.clone();
            let call = StoreCall::Place {
                channel: channel.to_string(),
                candidate: me.clone(),
                usable: vec![me],
                ttl: HOME_TTL,
            };
            self.call(call, Purpose::None, now);
        }
    }

    /// `channel` closed here: if this node was its home, the next join places it afresh.
    pub(super) fn unplace(&mut self, channel: &str, now: Instant) {
        if self.placement.homes.remove(channel) {
            let call = StoreCall::Unplace {
                channel: channel.to_string(),
                node: self.config.node.clone(),
            };
            self.call(call, Purpose::None, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_reads_back_as_written() {
        for p in [Placement::Relay, Placement::Redirect] {
            assert_eq!(p.to_string().parse::<Placement>(), Ok(p));
        }
        assert!("anywhere".parse::<Placement>().is_err());
    }
}
