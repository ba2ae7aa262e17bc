//! Presence: `presence` frames to a channel's members when someone joins or leaves, here or on another
//! node, and this node's own view of which remote member is on which node.
//!
//! [`RemotePresence`]: who this node believes is in its channels on other nodes, and which of those nodes have gone.
//!
//! Presence of remote members normally follows the store's `join`/`leave` events, and a dead node's members
//! are removed from the store (which publishes their `leave`) once its liveness key has expired. That needs
//! the store to still know them: a node that dies while Redis is down, or before it has re-registered after
//! Redis came back empty, leaves nothing in the store to evict — and its members would stay in everyone's
//! presence for good. So each node also keeps its own view, fed by the events it relays to its clients, and
//! reports a remote member gone when its node has not been seen live in the registry for [`GONE_AFTER`] of
//! store uptime (the clocks restart whenever the store comes back, so an outage is never mistaken for
//! absence). Sans-IO: time is passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::HubCore;
use crate::ids::ConnId;
use crate::signal::protocol::Message;

impl HubCore {
    /// Sends `msg` to every member of `channel` that wants presence, except `except`.
    pub(super) fn broadcast_presence(&mut self, channel: &str, except: &str, msg: &Message) {
        let Some(ch) = self.channels.get(channel) else {
            return;
        };
        let text = msg.to_json();
        let to: Vec<ConnId> = ch
            .members
            .iter()
            .filter(|(n, m)| *n != except && m.ready && m.presence)
            .map(|(_, m)| m.conn)
            .collect();
        for conn in to {
            self.send_text(conn, text.clone());
        }
    }

    /// A member joined or left a channel on another node (a store event).
    pub(super) fn on_remote_presence(
        &mut self,
        channel: &str,
        member: &str,
        node: &str,
        joined: bool,
    ) {
        if node == self.config.node || !self.channels.contains_key(channel) {
            return;
        }
        if joined {
            self.remote.joined(channel, member, node);
        } else if !self.remote.left(channel, member) {
            return; // already told when its node was found gone
        }
        let msg = Message::Presence {
            channel: channel.to_string(),
            joined: joined.then(|| member.to_string()),
            left: (!joined).then(|| member.to_string()),
        };
        self.broadcast_presence(channel, member, &msg);
    }
}

/// A node not seen live for this long while the store is up is gone: longer than the liveness TTL (10 s)
/// plus the announce period, so a live node that is re-registering is never taken for dead.
pub const GONE_AFTER: Duration = Duration::from_secs(12);

/// How long a member reported gone stays remembered, so the store's own `leave` for it (published when the
/// store still knew the member) is not told twice.
const EVICTED_MEMORY: Duration = Duration::from_secs(60);

/// Remote members of this node's channels, by node, and when each node was last seen live.
#[derive(Debug, Default)]
pub struct RemotePresence {
    /// channel → member → node.
    members: HashMap<String, HashMap<String, String>>,
    /// (channel, member) reported gone, and when.
    evicted: HashMap<(String, String), Instant>,
    /// node → when it was last seen live in the registry (or the store last came back). A node never seen
    /// live there (relay off on it) is never taken for gone by absence, only by an expired liveness key.
    seen: HashMap<String, Instant>,
}

impl RemotePresence {
    /// A `join` event for `member` of `channel` on `node`.
    pub fn joined(&mut self, channel: &str, member: &str, node: &str) {
        self.members
            .entry(channel.to_string())
            .or_default()
            .insert(member.to_string(), node.to_string());
        self.evicted
            .remove(&(channel.to_string(), member.to_string()));
    }

    /// A `leave` event. `false`: this node already reported the member gone; do not tell clients again.
    pub fn left(&mut self, channel: &str, member: &str) -> bool {
        let known = self
            .members
            .get_mut(channel)
            .and_then(|m| m.remove(member))
            .is_some();
        known
            || self
                .evicted
                .remove(&(channel.to_string(), member.to_string()))
                .is_none()
    }

    /// The store (re)connected: absence is only counted from now on.
    pub fn store_back(&mut self, now: Instant) {
        for t in self.seen.values_mut() {
            *t = now;
        }
    }

    /// The registry's view of `channel`: `live` nodes, and `dead` ones (registered, liveness expired).
    /// Returns the remote members to report gone, with their node.
    pub fn nodes(
        &mut self,
        channel: &str,
        live: &[&str],
        dead: &[&str],
        now: Instant,
    ) -> Vec<(String, String)> {
        for node in live {
            self.seen.insert(node.to_string(), now);
        }
        self.evicted
            .retain(|_, at| now.duration_since(*at) < EVICTED_MEMORY);
        let Some(members) = self.members.get_mut(channel) else {
            return Vec::new();
        };
        let seen = &self.seen;
        let gone_node = |node: &str| {
            dead.contains(&node)
                || (!live.contains(&node)
                    && seen
                        .get(node)
                        .is_some_and(|t| now.duration_since(*t) >= GONE_AFTER))
        };
        let gone: Vec<(String, String)> = members
            .iter()
            .filter(|(_, node)| gone_node(node))
            .map(|(m, n)| (m.clone(), n.clone()))
            .collect();
        for (m, _) in &gone {
            members.remove(m);
            self.evicted.insert((channel.to_string(), m.clone()), now);
        }
        gone
    }

    /// No local member is left in `channel`: its remote view is not needed any more.
    pub fn forget_channel(&mut self, channel: &str) {
        self.members.remove(channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_not_seen_for_a_while_is_gone() {
        let t0 = Instant::now();
        let mut r = RemotePresence::default();
        r.joined("ops", "ben", "b");
        r.joined("ops", "cat", "c");
        assert!(r
            .nodes("ops", &["b", "c"], &[], t0 + Duration::from_secs(1))
            .is_empty());
        // c stops appearing; b goes on.
        let t = t0 + Duration::from_secs(1) + GONE_AFTER - Duration::from_millis(1);
        assert!(r.nodes("ops", &["b"], &[], t).is_empty());
        let gone = r.nodes("ops", &["b"], &[], t + Duration::from_millis(2));
        assert_eq!(gone, vec![("cat".to_string(), "c".to_string())]);
        // Reported once; the store's own leave for cat is not told again, ben's is.
        assert!(r
            .nodes("ops", &["b"], &[], t + Duration::from_secs(1))
            .is_empty());
        assert!(!r.left("ops", "cat"));
        assert!(r.left("ops", "ben"));
        // A member nobody attributed (joined before us): its leave is told.
        assert!(r.left("ops", "dan"));
    }

    #[test]
    fn a_node_never_seen_live_is_not_gone_by_absence() {
        let t0 = Instant::now();
        let mut r = RemotePresence::default();
        r.joined("ops", "ben", "b");
        assert!(r.nodes("ops", &[], &[], t0 + GONE_AFTER * 2).is_empty());
    }

    #[test]
    fn a_dead_node_is_gone_at_once() {
        let t0 = Instant::now();
        let mut r = RemotePresence::default();
        r.joined("ops", "ben", "b");
        let gone = r.nodes("ops", &[], &["b"], t0);
        assert_eq!(gone.len(), 1);
    }

    #[test]
    fn a_store_outage_is_not_absence() {
        let t0 = Instant::now();
        let mut r = RemotePresence::default();
        r.joined("ops", "ben", "b");
        assert!(r.nodes("ops", &["b"], &[], t0).is_empty());
        // No registry reads for a minute (the store was down), then it comes back.
        let back = t0 + Duration::from_secs(60);
        r.store_back(back);
        assert!(r.nodes("ops", &[], &[], back).is_empty());
        assert!(r.nodes("ops", &[], &[], back + GONE_AFTER / 2).is_empty());
        // b re-registers in time: never gone.
        assert!(r
            .nodes(
                "ops",
                &["b"],
                &[],
                back + GONE_AFTER - Duration::from_millis(1)
            )
            .is_empty());
        assert!(r
            .nodes("ops", &["b"], &[], back + GONE_AFTER * 3)
            .is_empty());
    }

    #[test]
    fn a_rejoin_is_tracked_again() {
        let t0 = Instant::now();
        let mut r = RemotePresence::default();
        r.joined("ops", "ben", "b");
        assert_eq!(
            r.nodes("ops", &[], &["b"], t0),
            [("ben".to_string(), "b".to_string())]
        );
        // Reported gone; he joins again through b2: he is tracked there, and b's death is old news.
        r.joined("ops", "ben", "b2");
        assert!(
            r.nodes("ops", &["b2"], &["b"], t0).is_empty(),
            "ben is on b2"
        );
        assert_eq!(
            r.nodes("ops", &[], &["b2"], t0),
            [("ben".to_string(), "b2".to_string())],
            "and goes with b2"
        );
        // His `leave` after being reported gone is not told twice.
        assert!(!r.left("ops", "ben"));
    }
}
