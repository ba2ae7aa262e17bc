//! Shared state behind traits: the floor lock ([`FloorStore`]) and membership/presence ([`SessionStore`]).
//!
//! Two backends implement both: [`memory`] (embedded, one node, the default) and [`redis`] (many nodes).
//! The control thread calls them; shards never do. Every call is bounded in time by the backend (the Redis
//! backend answers `StateError::Unavailable` after its response timeout), because the floor's rule is fail
//! safe: a press that cannot be decided is denied, never granted twice.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use thiserror::Error;

pub mod history;
pub mod memory;
pub mod redis;

/// A boxed future, so the traits stay object safe (`Arc<dyn FloorStore>`). Store calls are control-plane
/// work; one allocation per call is nothing next to a network round trip.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StateError>> + Send + 'a>>;

/// Errors of the state stores.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The store could not be reached or did not answer in time. Presses are denied `unavailable`.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The store answered something this code does not understand (a bug or a foreign writer).
    #[error("state store protocol error: {0}")]
    Protocol(String),
}

/// A request for a channel's floor lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireRequest {
    /// The channel.
    pub channel: String,
    /// The member pressing.
    pub member: String,
    /// Its priority (MCPTT: higher pre-empts; here it is recorded with the lock).
    pub priority: u8,
    /// An emergency press: the lock is taken from any holder not itself in an emergency burst.
    pub emergency: bool,
    /// How long the lock lives unless renewed.
    pub ttl: Duration,
}

/// Who holds a channel's floor, as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The member holding the floor.
    pub member: String,
    /// The node serving it.
    pub node: String,
    /// The grant's fencing epoch.
    pub epoch: u64,
    /// Its priority.
    pub priority: u8,
    /// The burst is an emergency.
    pub emergency: bool,
}

/// The answer to an acquisition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The lock is ours, at this fencing epoch (greater than every epoch before it on this channel).
    Granted {
        /// The grant's epoch.
        epoch: u64,
    },
    /// Someone holds it.
    Busy(Holder),
}

/// A change published by the store (pub/sub), turned by the control thread into floor inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// `channel`'s floor was granted (`holder: Some`) or released at `epoch` (`None`).
    Floor {
        /// The channel.
        channel: String,
        /// The new holder, or `None` when the floor went idle.
        holder: Option<Holder>,
        /// The epoch of the grant or of the release.
        epoch: u64,
    },
    /// A member joined or left a channel on some node.
    Presence {
        /// The channel.
        channel: String,
        /// The member.
        member: String,
        /// Its node.
        node: String,
        /// Joined (`true`) or left.
        joined: bool,
    },
    /// The subscription is up again after a (re)connect: resynchronise from the keys.
    Resync,
    /// The subscription to `channel`'s events is confirmed (after [`Watcher::watch`]): from now on
    /// nothing published about it is missed, so one read of its keys brings the node up to date.
    Watching {
        /// The channel.
        channel: String,
    },
    /// `node` started (`present`) or stopped serving `channel` (published on the channel's events).
    ChannelNode {
        /// The channel.
        channel: String,
        /// The node.
        node: String,
        /// Whether it serves the channel now.
        present: bool,
    },
    /// A node arrived (`live`) or left (published on the nodes' events): read the node table.
    Node {
        /// The node.
        node: String,
        /// Whether it is alive.
        live: bool,
    },
    /// The subscription is down: deny presses until `Resync`.
    Down,
}

/// The floor lock of every channel. Tokens are the epochs themselves: an epoch names exactly one grant.
pub trait FloorStore: Send + Sync + 'static {
    /// Takes the lock if it is free; the epoch is `max(last + 1, now in µs)` so that it never goes back,
    /// even when the store restarts empty.
    fn acquire(&self, req: AcquireRequest) -> StoreFuture<'_, Acquired>;
    /// Extends the lease; `false` when the lock is no longer held at `epoch`.
    fn renew<'a>(&'a self, channel: &'a str, epoch: u64, ttl: Duration) -> StoreFuture<'a, bool>;
    /// Gives the lock back if still held at `epoch`; `false` when it was not (expired, taken).
    fn release<'a>(&'a self, channel: &'a str, epoch: u64) -> StoreFuture<'a, bool>;
    /// The current holder, for resynchronisation after a reconnect.
    fn holder<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Option<Holder>>;
}

/// Membership both ways (member → channels, channel → members) and presence across nodes.
pub trait SessionStore: Send + Sync + 'static {
    /// Records `member` of `node` in `channel`, with an idle TTL refreshed by [`SessionStore::refresh`].
    /// `false`: the name is joined to the channel from another node (a name is unique in a channel
    /// across all nodes), and nothing is recorded.
    fn join<'a>(
        &'a self,
        channel: &'a str,
        member: &'a str,
        node: &'a str,
    ) -> StoreFuture<'a, bool>;
    /// Removes `member` of `node` from `channel` (publishes `leave`).
    fn leave<'a>(&'a self, channel: &'a str, member: &'a str, node: &'a str)
        -> StoreFuture<'a, ()>;
    /// Heartbeat: the member is still there.
    fn refresh<'a>(
        &'a self,
        channel: &'a str,
        member: &'a str,
        node: &'a str,
    ) -> StoreFuture<'a, ()>;
    /// Everyone in the channel, on every node.
    fn members<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Vec<String>>;
    /// The channels a member is in.
    fn channels_of<'a>(&'a self, member: &'a str) -> StoreFuture<'a, Vec<String>>;
}

/// A node as the cluster registry knows it: its id, one relay address per shard (index = shard),
/// whether it is draining (leaving service: it takes no new clients, so placement does not pick it), where
/// clients reach it, and its load (what placement compares).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    /// The node's id.
    #[serde(skip)]
    pub node: String,
    /// Its relay address per shard.
    pub relay: Vec<std::net::SocketAddr>,
    /// The node is draining.
    #[serde(default)]
    pub draining: bool,
    /// The WebSocket URL clients are redirected to (`None`: the node takes no redirected clients).
    #[serde(default)]
    pub url: Option<String>,
    /// Its load when it last announced.
    #[serde(default)]
    pub load: NodeLoad,
}

/// A node's load, announced with its liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeLoad {
    /// Members joined on the node.
    pub members: u64,
    /// Media packets forwarded per second (all shards).
    pub pps: u64,
    /// CPU used by the process, in per mille of one core.
    pub cpu_permille: u64,
}

/// The registry's node table: who is alive, and who was and has stopped announcing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeTable {
    /// Nodes whose liveness holds.
    pub live: Vec<NodeInfo>,
    /// Nodes whose liveness has expired or that withdrew (remembered for an hour).
    pub dead: Vec<String>,
}

/// Asks the store's subscriber to follow (or stop following) one channel's events. Cheap to clone; the
/// queue is unbounded but holds at most one entry per channel open or close, which the control thread
/// makes at human pace.
#[derive(Debug, Clone)]
pub struct Watcher {
    tx: tokio::sync::mpsc::UnboundedSender<(String, bool)>,
}

impl Watcher {
    /// A watcher and the queue its subscriber reads.
    pub fn new() -> (
        Watcher,
        tokio::sync::mpsc::UnboundedReceiver<(String, bool)>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Watcher { tx }, rx)
    }

    /// Follow `channel`'s events (`on`) or stop; [`StoreEvent::Watching`] confirms a watch. Ignored once
    /// the subscriber has ended.
    pub fn watch(&self, channel: &str, on: bool) {
        let _ = self.tx.send((channel.to_string(), on));
    }
}

/// Which nodes have members in which channel, and which nodes are alive — what the relay needs to send a
/// speaker's packets once per other node, and what lets the survivors clean up after a dead node.
pub trait Registry: Send + Sync + 'static {
    /// Announces (or renews) this node's liveness for `ttl`, with its relay addresses.
    fn announce<'a>(&'a self, node: &'a NodeInfo, ttl: Duration) -> StoreFuture<'a, ()>;
    /// Clean shutdown: the node is gone now rather than when its liveness runs out.
    fn withdraw<'a>(&'a self, node: &'a str) -> StoreFuture<'a, ()>;
    /// `node` has members in `channel` (`present`) or no longer has (`!present`).
    fn set_channel_node<'a>(
        &'a self,
        channel: &'a str,
        node: &'a str,
        present: bool,
    ) -> StoreFuture<'a, ()>;
    /// The ids of the nodes registered in `channel` (alive or not: the node table says which).
    fn channel_nodes<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Vec<String>>;
    /// The node table: every live node with its addresses and load, and the ids of nodes that have
    /// stopped announcing. One read for the whole cluster, whatever the number of channels.
    fn nodes(&self) -> StoreFuture<'_, NodeTable>;
    /// Chooses `channel`'s home node: the current home if it is in `usable` (alive, not draining, as the
    /// caller's node table has it), else `candidate`; atomic in the store, so two nodes placing one
    /// channel at once agree. The home lives `ttl` unless [`Registry::place`]d again by its node.
    fn place<'a>(
        &'a self,
        channel: &'a str,
        candidate: &'a str,
        usable: &'a [String],
        ttl: Duration,
    ) -> StoreFuture<'a, String>;
    /// `node` no longer serves `channel`: forget the home if it is `node`.
    fn unplace<'a>(&'a self, channel: &'a str, node: &'a str) -> StoreFuture<'a, ()>;
    /// Removes the session entries of a dead node's members in `channel` (publishing `leave` for each)
    /// and the node from the channel's registrations; returns their names.
    fn evict_node<'a>(&'a self, channel: &'a str, node: &'a str) -> StoreFuture<'a, Vec<String>>;
    /// The key that authenticates relay packets when no cluster secret is configured: `proposed` is
    /// stored unless a key already is (the first node makes it, every later one adopts it); returns the
    /// stored key. Whoever can read it could already write every floor and session in the store.
    fn cluster_key<'a>(&'a self, proposed: &'a str) -> StoreFuture<'a, String>;
}

/// Microseconds since the Unix epoch: the floor of every new epoch, so epochs survive a store restart.
pub fn wall_clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
