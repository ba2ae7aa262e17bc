//! The control plane as a sans-IO state machine, in the shape of quinn-proto's `Endpoint` and str0m's
//! `Rtc`: [`HubCore`] owns every connection, channel membership and floor of this node, is fed
//! [`Input`]s with the time, and answers with [`Output`]s — frames for clients, store calls, shard
//! commands — and the next instant it must be woken ([`HubCore::poll_timeout`]). It never reads a clock,
//! awaits a store or touches a socket: [`runner`] does that, and tests drive the core in virtual time.
//!
//! Where things happen, by file:
//! - [`calls`]: store calls as values, their deadlines, retries and late answers;
//! - `members.rs`: a `join` becomes a shard member and then `joined`; leaving and disconnecting;
//! - `floors.rs`: a press becomes a store acquisition, then a shard speaker change, then `granted`
//!   (the floor machine itself is [`crate::floor`]); store replies and published floor events;
//! - `cluster.rs`: node liveness and the node table, which nodes serve a channel, relay targets,
//!   re-registration;
//! - `placement.rs`: which node a channel lives on (`--placement redirect`), this node's load;
//! - `sweep.rs`: re-reading floors and registrations that pub/sub may have lost, at a pace that costs
//!   nothing per idle channel;
//! - `presence.rs`: `presence` frames, and remote members whose node has gone;
//! - `drain.rs`: leaving service without cutting a talk burst (`goaway`, the drain deadline);
//! - [`runner`]: the tokio task that moves bytes and time in and out of the core.

pub mod calls;
mod cluster;
mod conns;
mod drain;

pub use self::drain::Health;
mod floors;
mod history;
pub mod load;
mod members;
mod placement;
mod presence;
pub mod runner;
mod sessions;
mod sweep;

pub use self::placement::Placement;

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;

use crate::auth::{Limits, Rights, TokenBucket, Verifier};
use crate::channel::SpeakerChange;
use crate::floor::{Floor, FloorConfig};
use crate::ids::{ConnId, MemberKey};
use crate::metrics::ControlCounters;
use crate::shard::{Command, Event};
use crate::signal::protocol::{Frame, SignalError};
use crate::state::StoreEvent;

use self::calls::{CallId, Calls, StoreCall, StoreReply};
use self::presence::RemotePresence;

/// An expiring key publishes nothing: the floors of channels held from another node are re-read this
/// often (the holder's node may have died; its lease then ran out in silence).
const RESYNC_EVERY: Duration = Duration::from_secs(5);
/// Session heartbeat of a channel's members, and the TTLs of its registration and home, renewed by the
/// sweep: a third of the store's idle TTL (1 h), so a member survives two lost heartbeats. One burst for
/// every member of the node at once would be a latency spike for grants; the sweep spreads them.
const REFRESH_EVERY: Duration = Duration::from_secs(1200);
/// Liveness of this node in the registry, and how often it is renewed (design: ≈ 10 s TTL).
const NODE_TTL: Duration = Duration::from_secs(10);
const ANNOUNCE_EVERY: Duration = Duration::from_secs(3);
/// Attempts of a re-registration call (liveness, channels, sessions) after the store came back, 250 ms
/// apart: the command connection may still be in its reconnect backoff while the subscription is up.
const REREGISTER_RETRIES: u32 = 11;
/// How soon a speaker change refused by a full shard queue is sent again.
const SPEAKER_RETRY: Duration = Duration::from_millis(10);
/// Bound on the session-store calls a join waits for before answering `joined`: a store that does not
/// answer costs the remote names only.
const SESSION_WAIT: Duration = Duration::from_millis(500);

/// Node settings the core needs.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// This node's id in the store.
    pub node: String,
    /// Timers of every channel's floor.
    pub floor: FloorConfig,
    /// TTL of a floor lock in the store (the lease; for the embedded store, a safety net only).
    pub lock_ttl: Duration,
    /// Address put in `joined.rtp.server_addr`.
    pub announce_ip: IpAddr,
    /// The UDP media port of each shard (index = shard).
    pub media_ports: Vec<u16>,
    /// Source networks allowed to join as plain RTP.
    pub rtp_allow: Vec<IpNet>,
    /// This node's relay address per shard, announced to the other nodes; `None`: relay off.
    pub relay_addrs: Option<Vec<SocketAddr>>,
    /// Whether floors are shared with other nodes (a store with pub/sub): presses are denied until the
    /// subscription is up, and floors are re-read periodically.
    pub shared: bool,
    /// How long the core waits for a store call before treating it as failed.
    pub store_timeout: Duration,
    /// Seed of the core's randomness (SSRCs), so tests are repeatable.
    pub seed: u64,
    /// The keys member tokens are checked with; `None`: the server runs open (development only).
    pub auth: Option<Verifier>,
    /// What one client may ask of the server.
    pub limits: Limits,
    /// Accept a plain-RTP `rtp_addr` whose IP is not the client's own (gateways whose media leaves
    /// another host). Off by default: media belongs to whoever signals for it.
    pub rtp_any_ip: bool,
    /// How long a dropped connection's memberships wait for a `resume` (zero: never).
    pub resume_window: Duration,
    /// Recording: `None` off (no recorder); `Some(true)` every channel; `Some(false)` the channels the
    /// admin API turns on.
    pub record_all: Option<bool>,
    /// How long a drain lets talk bursts in progress go on before it closes everyone left.
    pub drain_timeout: Duration,
    /// The relay key the nodes agreed on through the store (no cluster secret configured): put back
    /// when the store comes back empty, so nodes started later agree with this one.
    pub cluster_key: Option<String>,
    /// Where a channel's members are served: wherever they join (relay), or on the channel's home node
    /// (redirect).
    pub placement: Placement,
    /// The WebSocket URL other nodes redirect clients to (announced with this node's liveness).
    pub public_url: Option<String>,
}

/// Inputs of the core.
#[derive(Debug)]
pub enum Input {
    /// A WebSocket connection opened (its `hello` is already sent).
    Connect {
        /// The connection.
        conn: ConnId,
        /// The client's IP address (connection limits, plain-RTP address checks).
        ip: IpAddr,
    },
    /// A text frame, parsed (or the error naming what was wrong with it, and its `id` when readable).
    Frame {
        /// The connection.
        conn: ConnId,
        /// The parsed request.
        frame: Result<Frame, (Option<Value>, SignalError)>,
    },
    /// A frame over the size limit: answered `too_large`, then the connection is closed.
    TooLarge {
        /// The connection.
        conn: ConnId,
    },
    /// The client closed the connection (a WebSocket close: a goodbye).
    Disconnect {
        /// The connection.
        conn: ConnId,
    },
    /// The connection dropped without a goodbye (network lost, silent too long, not reading): its
    /// memberships wait for a `resume` for the resume window.
    Dropped {
        /// The connection.
        conn: ConnId,
    },
    /// The client does not read its frames (its outbound queue is full): it is disconnected.
    Unwritable {
        /// The connection.
        conn: ConnId,
    },
    /// An event from a shard.
    Shard(Event),
    /// A shard's command queue was full: the command handed back, not delivered.
    ShardFull {
        /// The shard.
        shard: usize,
        /// The command that was not delivered.
        command: Command,
    },
    /// The answer to a store call.
    Store {
        /// The call's id, as in [`Output::Store`].
        id: CallId,
        /// What the store answered.
        reply: StoreReply,
    },
    /// A change published by the store (other nodes' grants and releases, presence, resync/down).
    StoreEvent(StoreEvent),
    /// Stop: floors given back and announced idle, members told `left`, shards stopped.
    Shutdown,
    /// The admin API turns a channel's recording on or off.
    SetRecording {
        /// The channel.
        channel: String,
        /// Whether to record its local bursts.
        on: bool,
    },
    /// Leave service gracefully (see `drain.rs`): refuse joins, let talk bursts end, `goaway` to every
    /// client once its channels are idle, everyone closed at the drain deadline.
    Drain,
    /// A shard's thread ended with a panic: its channels are lost. The node drains (the other shards'
    /// talk bursts end) and reports it in `/healthz`.
    ShardDied {
        /// The shard.
        shard: usize,
        /// The panic's message.
        reason: String,
    },
    /// The node's load, measured by the runner (announced with its liveness, compared by placement).
    Load {
        /// Media packets forwarded per second, all shards.
        pps: u64,
        /// CPU of the process, per mille of one core.
        cpu_permille: u64,
    },
}

/// Outputs of the core, drained with [`HubCore::poll_output`].
#[derive(Debug)]
pub enum Output {
    /// A text frame for a client.
    Send {
        /// The connection.
        conn: ConnId,
        /// The JSON text.
        text: String,
    },
    /// Close the connection once the frames queued before this are written.
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// Perform a store call and feed its answer back as [`Input::Store`] (the core expires it at
    /// `deadline` on its own if no answer comes).
    Store {
        /// Echoed in the answer.
        id: CallId,
        /// What to do.
        call: StoreCall,
        /// When the core stops waiting.
        deadline: Instant,
    },
    /// A command for a shard; a full queue is reported back with [`Input::ShardFull`].
    Shard {
        /// The shard index.
        shard: usize,
        /// The command.
        command: Command,
    },
    /// Follow a channel's published events (`on`) or stop ([`crate::state::Watcher`]); a watch is
    /// confirmed by [`StoreEvent::Watching`].
    Watch {
        /// The channel.
        channel: String,
        /// Follow or stop.
        on: bool,
    },
}

/// One row of `/api/channels`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChannelInfo {
    /// The channel's name.
    pub channel: String,
    /// Members on this node.
    pub members: usize,
    /// Who is forwarded now, if anyone.
    pub speaker: Option<String>,
    /// The channel's fencing epoch.
    pub epoch: u64,
    /// The shard that owns the channel.
    pub shard: usize,
}

/// One WebSocket connection.
struct Conn {
    ip: IpAddr,
    /// (channel, member) pairs joined over this connection.
    joined: HashSet<(String, String)>,
    /// Frames per second (the rate grows with the memberships).
    frames: TokenBucket,
    /// WebRTC joins of this connection still in ICE/DTLS set-up.
    webrtc_pending: usize,
    /// Its session id and the secret that resumes it (`hello`).
    session: String,
    token: String,
    /// Dropped without a goodbye: its memberships wait for a `resume` until then.
    detached_until: Option<Instant>,
}

/// What is open from one client address.
#[derive(Default)]
struct AddressUse {
    conns: usize,
    webrtc_pending: usize,
}

/// One membership of a channel on this node.
struct MemberCtl {
    conn: ConnId,
    key: MemberKey,
    priority: u8,
    presence: bool,
    /// The shard has the member and the session store has been asked; until then it gets no channel
    /// events.
    ready: bool,
    ssrc: u32,
    join_id: Option<Value>,
    /// A WebRTC member that offered `recvonly`: its presses are denied `listen_only`.
    listen_only: bool,
    /// The shard's SDP answer, held until `joined` is sent.
    answer: Option<String>,
    /// What the member may do (from its token; everything on a server that runs open).
    rights: Rights,
    /// Presses per second.
    presses: TokenBucket,
    /// When its press now being decided arrived (for the press → granted histogram; `None` for a
    /// queued press, whose wait is another member's talk time).
    pressed_at: Option<Instant>,
    /// A WebRTC member whose ICE and DTLS are not done yet (counted against the pending limits).
    webrtc_pending: bool,
    /// A plain-RTP member's media address (owned by its connection while any membership uses it).
    rtp_addr: Option<SocketAddr>,
}

/// One channel with members on this node.
struct ChannelCtl {
    shard: usize,
    /// Relay targets last sent to the shard.
    relay_targets: Vec<SocketAddr>,
    members: BTreeMap<String, MemberCtl>,
    floor: Floor,
    /// The floor's deadline as queued in [`HubCore::floor_timers`].
    timer: Option<Instant>,
    /// The node and epoch of the remote holder last heard of (the shard accepts relay from it only).
    remote_holder: Option<(u64, String)>,
    /// The other nodes registered in the channel (its relay targets, where alive).
    nodes: std::collections::BTreeSet<String>,
    /// When its members' sessions, its registration and its home were last refreshed in the store.
    refreshed: Instant,
}

/// When the periodic work is next due.
struct Periodic {
    resync: Instant,
    announce: Instant,
    /// The next read of the node table.
    nodes: Instant,
    /// The next step of the sweep.
    sweep: Instant,
}

/// The control plane of one node, without I/O.
pub struct HubCore {
    config: HubConfig,
    conns: HashMap<ConnId, Conn>,
    channels: HashMap<String, ChannelCtl>,
    /// Member key → (channel, member) while the shard has not yet acknowledged the join.
    pending: HashMap<MemberKey, (String, String)>,
    next_key: MemberKey,
    counters: ControlCounters,
    /// False while the store's subscription is down: presses are denied `unavailable` (fail safe), since
    /// grants made elsewhere would go unseen.
    store_up: bool,
    calls: Calls,
    /// (deadline, channel) of floors that need waking; lazily cleaned against `ChannelCtl::timer`.
    floor_timers: BinaryHeap<Reverse<(Instant, String)>>,
    periodic: Periodic,
    /// The live nodes of the registry (not this one); the shards accept relay only from these.
    table: cluster::Table,
    /// Channels still to re-read in this round of the sweep.
    sweep: VecDeque<String>,
    /// Placement: the channels this node is the home of, and channels placed elsewhere since the
    /// node table was read (their load is not in the table yet).
    placement: placement::PlacementState,
    /// The runner's last measure of this node's load.
    load: (u64, u64),
    /// Remote members of our channels by node (see `presence.rs`).
    remote: RemotePresence,
    relay_peers: Vec<(SocketAddr, String)>,
    /// Speaker changes a full shard queue refused, by channel (only the latest matters), sent again at
    /// `speaker_retry_at`: a speaker change is never dropped.
    speaker_retries: HashMap<String, Vec<SpeakerChange>>,
    speaker_retry_at: Option<Instant>,
    /// Open connections and pending WebRTC joins per client IP.
    ips: HashMap<IpAddr, AddressUse>,
    /// Session id → the connection that carries it now.
    sessions: HashMap<String, ConnId>,
    /// (end of the resume window, connection) of dropped connections; lazily cleaned.
    detached: BinaryHeap<Reverse<(Instant, ConnId)>>,
    /// Channels whose recording the admin API turned on or off (over `record_all`).
    recorded: HashMap<String, bool>,
    /// Local bursts that ended, waiting for the rest of their record: (channel, epoch) → what is known.
    bursts: HashMap<(String, u64), history::PendingBurst>,
    /// Plain-RTP media addresses: the connection that owns each, and how many memberships use it.
    media_addrs: HashMap<SocketAddr, (ConnId, usize)>,
    /// The wall clock at an instant of the core's clock: tokens' `exp`/`nbf` are Unix times.
    wall: (Instant, Duration),
    /// Set once the node drains.
    drain: Option<drain::Drain>,
    /// Shards whose thread died, with the panic's message.
    dead_shards: BTreeMap<usize, String>,
    rng: StdRng,
    out: VecDeque<Output>,
}

impl HubCore {
    /// A core with no connections, started at `now`.
    pub fn new(config: HubConfig, now: Instant) -> Self {
        HubCore {
            store_up: !config.shared,
            rng: StdRng::seed_from_u64(config.seed),
            config,
            conns: HashMap::new(),
            channels: HashMap::new(),
            pending: HashMap::new(),
            next_key: 1,
            counters: ControlCounters::default(),
            calls: Calls::default(),
            floor_timers: BinaryHeap::new(),
            periodic: Periodic {
                resync: now + RESYNC_EVERY,
                announce: now,
                nodes: now,
                sweep: now + sweep::SWEEP_STEP,
            },
            table: cluster::Table::new(),
            sweep: VecDeque::new(),
            placement: Default::default(),
            load: (0, 0),
            remote: RemotePresence::default(),
            relay_peers: Vec::new(),
            speaker_retries: HashMap::new(),
            speaker_retry_at: None,
            ips: HashMap::new(),
            media_addrs: HashMap::new(),
            bursts: HashMap::new(),
            recorded: HashMap::new(),
            sessions: HashMap::new(),
            detached: BinaryHeap::new(),
            wall: (now, Duration::ZERO),
            drain: None,
            dead_shards: BTreeMap::new(),
            out: VecDeque::new(),
        }
    }

    /// Tells the core the wall-clock time (since the Unix epoch) at `now`. The runner calls it at start
    /// and now and then; tests set it once.
    pub fn set_wall_clock(&mut self, now: Instant, unix: Duration) {
        self.wall = (now, unix);
    }

    /// Unix seconds at `now`.
    fn unix_secs(&self, now: Instant) -> u64 {
        self.unix(now).as_secs()
    }

    /// Unix milliseconds at `now`.
    fn unix_ms(&self, now: Instant) -> u64 {
        u64::try_from(self.unix(now).as_millis()).unwrap_or(u64::MAX)
    }

    fn unix(&self, now: Instant) -> Duration {
        let (at, unix) = self.wall;
        if now >= at {
            unix + (now - at)
        } else {
            unix.saturating_sub(at - now)
        }
    }

    /// Feeds one input at `now`.
    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Connect { conn, ip } => self.on_connect(conn, ip, now),
            Input::Frame { conn, frame } => self.on_frame(conn, frame, now),
            Input::TooLarge { conn } => self.on_too_large(conn, now),
            Input::Disconnect { conn } => self.disconnect(conn, now),
            Input::Dropped { conn } => self.on_dropped(conn, now),
            Input::Unwritable { conn } => self.on_unwritable(conn, now),
            Input::Shard(event) => self.on_shard_event(event, now),
            Input::ShardFull { shard, command } => self.on_shard_full(shard, command, now),
            Input::Store { id, reply } => self.on_store_reply(id, reply, now),
            Input::StoreEvent(event) => self.on_store_event(event, now),
            Input::Shutdown => self.shutdown(now),
            Input::SetRecording { channel, on } => self.set_recording(channel, on),
            Input::Drain => self.start_drain(now),
            Input::ShardDied { shard, reason } => self.on_shard_died(shard, reason, now),
            Input::Load { pps, cpu_permille } => self.load = (pps, cpu_permille),
        }
        self.drain_step(now);
    }

    /// The next output to act on.
    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(out) = self.out.pop_front() {
            return Some(out);
        }
        // Store calls are queued in `calls` (a retry may start one from a timer): move them out last.
        let ready: Vec<_> = self.calls.take_ready().collect();
        for (id, call, deadline) in ready {
            self.out.push_back(Output::Store { id, call, deadline });
        }
        self.out.pop_front()
    }

    /// The next instant [`HubCore::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let p = &self.periodic;
        let (shared, registry) = (self.config.shared, self.uses_registry());
        let draining = self.drain.as_ref().filter(|_| !self.conns.is_empty());
        // `None`: nothing is due (an idle node on the embedded store is never woken).
        [
            Some(p.resync).filter(|_| shared),
            Some(p.sweep).filter(|_| shared),
            Some(p.announce).filter(|_| registry),
            Some(p.nodes).filter(|_| registry && self.store_up),
            self.floor_timers.peek().map(|Reverse((t, _))| *t),
            self.calls.poll_timeout(),
            self.speaker_retry_at,
            self.detached.peek().map(|Reverse((t, _))| *t),
            self.bursts_timeout(),
            draining.map(|d| d.deadline),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs whatever is due at `now`: floor timers, expired store calls and retries, periodic work.
    pub fn handle_timeout(&mut self, now: Instant) {
        for purpose in self.calls.handle_timeout(now, self.config.store_timeout) {
            self.on_call_failed(purpose, now);
        }
        self.run_floor_timers(now);
        self.retry_speaker_changes(now);
        self.expire_detached(now);
        self.flush_bursts(now);
        if self.config.shared {
            self.tick_sweep(now);
        }
        self.tick_registry(now);
        self.drain_step(now);
    }

    /// Every channel with members here, sorted by name.
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let mut rows: Vec<ChannelInfo> = self
            .channels
            .iter()
            .map(|(name, ch)| ChannelInfo {
                channel: name.clone(),
                members: ch.members.len(),
                speaker: ch.floor.speaker().map(str::to_string),
                epoch: ch.floor.epoch(),
                shard: ch.shard,
            })
            .collect();
        rows.sort_by(|a, b| a.channel.cmp(&b.channel));
        rows
    }

    /// The control plane's counters for `/metrics`.
    pub fn counters(&self) -> ControlCounters {
        let mut c = self.counters.clone();
        c.detached = self
            .conns
            .values()
            .filter(|c| c.detached_until.is_some())
            .count() as u64;
        c.connections = self.conns.len() as u64 - c.detached;
        c.draining = self.drain.is_some();
        c.store_up = self.store_up;
        c.channels = self.channels.len() as u64;
        c.members = self
            .channels
            .values()
            .map(|ch| ch.members.len() as u64)
            .sum();
        c
    }

    /// Store calls still waiting for an answer (the runner waits for them at shutdown).
    pub fn calls_in_flight(&self) -> usize {
        self.calls.in_flight()
    }

    /// Starts a store call bounded by the configured store timeout.
    fn call(&mut self, call: StoreCall, purpose: calls::Purpose, now: Instant) {
        let timeout = self.config.store_timeout;
        self.calls.start(call, purpose, now, timeout);
    }

    fn shard_command(&mut self, shard: usize, command: Command) {
        self.out.push_back(Output::Shard { shard, command });
    }

    /// (channel, member) of every joined local member.
    fn local_members(&self) -> Vec<(String, String)> {
        self.channels
            .iter()
            .flat_map(|(c, ch)| {
                ch.members
                    .iter()
                    .filter(|(_, m)| m.ready)
                    .map(move |(n, _)| (c.clone(), n.clone()))
            })
            .collect()
    }

    /// Heartbeats for the members of `channel` on this node (the sweep's, spread over its round).
    fn refresh_channel_sessions(&mut self, channel: &str, now: Instant) {
        let Some(ch) = self.channels.get(channel) else {
            return;
        };
        let members: Vec<String> = ch
            .members
            .iter()
            .filter(|(_, m)| m.ready)
            .map(|(n, _)| n.clone())
            .collect();
        for member in members {
            let call = StoreCall::Refresh {
                channel: channel.to_string(),
                member,
                node: self.config.node.clone(),
            };
            self.call(call, calls::Purpose::None, now);
        }
    }

    /// Heartbeats for every local member at once (after a store reconnect: it may have come back empty).
    fn refresh_sessions(&mut self, now: Instant, retries: u32) {
        let node = self.config.node.clone();
        let timeout = self.config.store_timeout;
        for (channel, member) in self.local_members() {
            let call = StoreCall::Refresh {
                channel,
                member,
                node: node.clone(),
            };
            self.calls
                .start_with_retries(call, calls::Purpose::None, now, timeout, retries);
        }
    }

    /// Clean stop: floors are given back and announced idle, every member is told `left`, the shards stop.
    fn shutdown(&mut self, now: Instant) {
        tracing::info!("shutting down: releasing floors and closing connections");
        self.withdraw(now);
        let names: Vec<String> = self.channels.keys().cloned().collect();
        for name in names {
            self.release_local_floor(&name, now);
            let Some(ch) = self.channels.get(&name) else {
                continue;
            };
            let members: Vec<(String, ConnId)> = ch
                .members
                .iter()
                .map(|(n, m)| (n.clone(), m.conn))
                .collect();
            for (member, conn) in members {
                self.send(
                    conn,
                    &crate::signal::protocol::Message::Left {
                        channel: name.clone(),
                        id: None,
                    },
                );
                let call = StoreCall::Leave {
                    channel: name.clone(),
                    member,
                    node: self.config.node.clone(),
                };
                self.call(call, calls::Purpose::None, now);
            }
        }
        let conns: Vec<ConnId> = self.conns.drain().map(|(c, _)| c).collect();
        for conn in conns {
            self.out.push_back(Output::Close { conn });
        }
        for shard in 0..self.config.media_ports.len() {
            self.shard_command(shard, Command::Shutdown);
        }
    }
}
