//! The control actor: one task on the control thread that owns every connection, channel membership and
//! floor of this node. WebSocket tasks, shards and store calls all reach it by message, so its state needs
//! no lock; it never awaits anything but its inbox (store calls run as their own tasks and answer by
//! message), so one slow Redis reply delays nobody else.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::channel::SpeakerChange;
use crate::floor::{DenyReason, Floor, FloorConfig, FloorEvent, Input, Output, Renewal, To};
use crate::ids::MemberKey;
use crate::shard::{self, Command, Event, PeerRefused, ShardHandle};
use crate::state::{
    AcquireRequest, Acquired, FloorStore, Holder, NodeInfo, Registry, SessionStore, StateError,
    StoreEvent,
};

use super::protocol::{
    self, ErrorCode, FloorMessage, Frame, Join, Message, PttAction, Request, RtpInfo, SignalError,
};
use super::remote::RemotePresence;

/// Identifies one WebSocket connection.
pub type ConnId = u64;

/// Frames queued for one client before it counts as not reading (protocol v1: disconnected rather than
/// buffered without bound).
pub const OUTBOUND_QUEUE: usize = 1024;

/// How often non-idle floors are ticked (T2, T3, lease renewal).
const TICK: Duration = Duration::from_millis(25);
/// Pub/sub is at-most-once and an expiring key publishes nothing: re-read the floors this often.
const RESYNC_EVERY: Duration = Duration::from_secs(5);
/// Session heartbeat: well inside the store's idle TTL (1 h).
const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// Liveness of this node in the registry, and how often it is renewed (design: ≈ 10 s TTL).
const NODE_TTL: Duration = Duration::from_secs(10);
const ANNOUNCE_EVERY: Duration = Duration::from_secs(3);
/// How often the relay targets of each channel are re-read (off the packet path).
const RELAY_REFRESH: Duration = Duration::from_secs(1);
/// Attempts per member of a session heartbeat (250 ms apart).
const REFRESH_RETRIES: usize = 12;
/// Bound on the session-store calls a join waits for before answering `joined`.
const SESSION_WAIT: Duration = Duration::from_millis(500);

/// Node settings the hub needs.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub node: String,
    pub floor: FloorConfig,
    /// TTL of a floor lock in the store (the lease; for the embedded store, a safety net only).
    pub lock_ttl: Duration,
    pub announce_ip: IpAddr,
    /// Source networks allowed to join as plain RTP.
    pub rtp_allow: Vec<(IpAddr, u8)>,
    /// This node's relay address per shard, announced to the other nodes; `None`: relay off.
    pub relay_addrs: Option<Vec<SocketAddr>>,
}

/// Messages to the hub.
pub enum HubMsg {
    Connect {
        conn: ConnId,
        tx: mpsc::Sender<String>,
        close: oneshot::Sender<()>,
    },
    Frame {
        conn: ConnId,
        frame: Result<Frame, (Option<Value>, SignalError)>,
    },
    /// A frame over the size limit: answered `too_large`, then the connection is closed.
    TooLarge {
        conn: ConnId,
    },
    Disconnect {
        conn: ConnId,
    },
    Shard(Event),
    Store(StoreDone),
    /// A change published by the store (other nodes' grants, releases, presence; resync/down).
    StoreEvent(StoreEvent),
    Channels {
        reply: oneshot::Sender<Vec<ChannelInfo>>,
    },
    Counters {
        reply: oneshot::Sender<HubCounters>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// A finished store call.
pub enum StoreDone {
    Acquired {
        channel: String,
        member: String,
        result: Result<Acquired, StateError>,
    },
    Released {
        channel: String,
        epoch: u64,
    },
    Renewed {
        channel: String,
        epoch: u64,
        sent_at: Instant,
        outcome: Renewal,
    },
    /// The floor as the store has it, read on resync.
    Holder {
        channel: String,
        result: Result<Option<Holder>, StateError>,
    },
    /// The session store recorded a join and listed the channel's members on every node.
    Joined {
        channel: String,
        member: String,
        key: MemberKey,
        members: Vec<String>,
    },
    /// The registry's live nodes in a channel (and the dead ones it found).
    Nodes {
        channel: String,
        live: Vec<NodeInfo>,
        dead: Vec<String>,
    },
}

/// One row of `/api/channels`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelInfo {
    pub channel: String,
    pub members: usize,
    pub speaker: Option<String>,
    pub epoch: u64,
    pub shard: usize,
}

/// Control-plane counters for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct HubCounters {
    pub connections: u64,
    pub channels: u64,
    pub members: u64,
    pub floor_grants: u64,
    pub floor_denials: BTreeMap<&'static str, u64>,
    pub floor_revokes: BTreeMap<&'static str, u64>,
    pub errors: BTreeMap<&'static str, u64>,
    pub store_errors: u64,
    pub slow_clients: u64,
    pub shard_queue_full: u64,
}

struct Conn {
    tx: mpsc::Sender<String>,
    /// Dropped to close the connection.
    _close: oneshot::Sender<()>,
    /// (channel, member) pairs joined over this connection.
    joined: HashSet<(String, String)>,
}

struct MemberCtl {
    conn: ConnId,
    key: MemberKey,
    priority: u8,
    presence: bool,
    /// The shard has the member; until then it gets no channel events.
    ready: bool,
    ssrc: u32,
    join_id: Option<Value>,
    /// A WebRTC member that offered `recvonly`: its presses are denied `listen_only`.
    listen_only: bool,
    /// The shard's SDP answer, held until `joined` is sent.
    answer: Option<String>,
}

struct ChannelCtl {
    shard: usize,
    /// Relay targets last sent to the shard.
    relay_targets: Vec<SocketAddr>,
    members: BTreeMap<String, MemberCtl>,
    floor: Floor,
}

/// The control actor's state.
pub struct Hub {
    config: HubConfig,
    shards: Vec<ShardHandle>,
    floors: Arc<dyn FloorStore>,
    sessions: Arc<dyn SessionStore>,
    me: mpsc::Sender<HubMsg>,
    conns: HashMap<ConnId, Conn>,
    channels: HashMap<String, ChannelCtl>,
    /// Member key → (channel, member) while the shard has not yet acknowledged the join.
    pending: HashMap<MemberKey, (String, String)>,
    /// Channels whose floor is not quiet and must be ticked.
    ticking: HashSet<String>,
    next_key: MemberKey,
    counters: HubCounters,
    /// False while the store's subscription is down: presses are denied `unavailable` (fail safe), since
    /// grants made elsewhere would go unseen.
    store_up: bool,
    /// Whether floors are shared with other nodes (a store with pub/sub).
    shared: bool,
    next_resync: Instant,
    next_refresh: Instant,
    registry: Arc<dyn Registry>,
    /// Relay addresses of the live nodes seen in the registry; the shards accept relay only from these.
    known_nodes: HashMap<String, Vec<SocketAddr>>,
    /// Remote members of our channels by node, to tell clients when a node is gone even if the store
    /// no longer knows its members (see `remote.rs`).
    remote: RemotePresence,
    relay_peers: Vec<SocketAddr>,
    next_announce: Instant,
    next_relay_refresh: Instant,
}

impl Hub {
    pub fn new(
        config: HubConfig,
        shards: Vec<ShardHandle>,
        floors: Arc<dyn FloorStore>,
        sessions: Arc<dyn SessionStore>,
        registry: Arc<dyn Registry>,
        me: mpsc::Sender<HubMsg>,
        shared: bool,
    ) -> Self {
        let now = Instant::now();
        Hub {
            config,
            shards,
            floors,
            sessions,
            me,
            conns: HashMap::new(),
            channels: HashMap::new(),
            pending: HashMap::new(),
            ticking: HashSet::new(),
            next_key: 1,
            counters: HubCounters::default(),
            store_up: !shared,
            shared,
            next_resync: now + RESYNC_EVERY,
            next_refresh: now + REFRESH_EVERY,
            registry,
            known_nodes: HashMap::new(),
            remote: RemotePresence::default(),
            relay_peers: Vec::new(),
            next_announce: now,
            next_relay_refresh: now,
        }
    }

    /// Runs until `Shutdown`.
    pub async fn run(
        mut self,
        mut inbox: mpsc::Receiver<HubMsg>,
        shard_events: flume::Receiver<Event>,
        mut store_events: Option<mpsc::Receiver<StoreEvent>>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = inbox.recv() => match msg {
                    Some(HubMsg::Shutdown { done }) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(msg) => self.handle(msg),
                    None => return,
                },
                Ok(event) = shard_events.recv_async() => self.handle(HubMsg::Shard(event)),
                Some(event) = recv_store_event(&mut store_events) => self.on_store_event(event),
                _ = tick.tick() => self.tick(),
            }
        }
    }

    fn handle(&mut self, msg: HubMsg) {
        match msg {
            HubMsg::Connect { conn, tx, close } => {
                self.conns.insert(
                    conn,
                    Conn {
                        tx,
                        _close: close,
                        joined: HashSet::new(),
                    },
                );
            }
            HubMsg::Frame { conn, frame } => match frame {
                Ok(Frame { id, request }) => {
                    if let Err(e) = self.on_request(conn, request, id.clone()) {
                        self.send_error(conn, &e, id);
                    }
                }
                Err((id, e)) => self.send_error(conn, &e, id),
            },
            HubMsg::TooLarge { conn } => {
                let e = SignalError::new(
                    ErrorCode::TooLarge,
                    format!("frame larger than {} bytes; closing", protocol::MAX_FRAME),
                );
                self.send_error(conn, &e, None);
                self.disconnect(conn);
            }
            HubMsg::Disconnect { conn } => self.disconnect(conn),
            HubMsg::Shard(event) => self.on_shard_event(event),
            HubMsg::Store(done) => self.on_store(done),
            HubMsg::StoreEvent(event) => self.on_store_event(event),
            HubMsg::Channels { reply } => {
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
                let _ = reply.send(rows);
            }
            HubMsg::Counters { reply } => {
                let mut c = self.counters.clone();
                c.connections = self.conns.len() as u64;
                c.channels = self.channels.len() as u64;
                c.members = self
                    .channels
                    .values()
                    .map(|ch| ch.members.len() as u64)
                    .sum();
                let _ = reply.send(c);
            }
            HubMsg::Shutdown { .. } => {}
        }
    }

    fn send(&mut self, conn: ConnId, msg: &Message) {
        let text = msg.to_json();
        self.send_text(conn, text);
    }

    fn send_text(&mut self, conn: ConnId, text: String) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = c.tx.try_send(text) {
            // A client that does not read its frames is disconnected, not buffered without bound.
            warn!(conn, "client is not reading: disconnecting");
            self.counters.slow_clients += 1;
            self.disconnect(conn);
        }
    }

    fn send_error(&mut self, conn: ConnId, e: &SignalError, id: Option<Value>) {
        *self.counters.errors.entry(e.code.as_str()).or_default() += 1;
        debug!(conn, code = e.code.as_str(), message = %e.message, "request refused");
        self.send(conn, &Message::error(e, id));
    }

    fn on_request(
        &mut self,
        conn: ConnId,
        request: Request,
        id: Option<Value>,
    ) -> Result<(), SignalError> {
        match request {
            Request::Join(join) => self.on_join(conn, join, id),
            Request::Ptt(ptt) => {
                let member = self.member_of(conn, &ptt.channel)?;
                let ch = self
                    .channels
                    .get_mut(&ptt.channel)
                    .expect("member_of found the channel");
                let input = match ptt.action {
                    PttAction::Press if !self.store_up => {
                        let event = FloorEvent::Denied {
                            speaker: None,
                            reason: DenyReason::Unavailable,
                        };
                        self.notify(&ptt.channel, To::Member(member), event);
                        return Ok(());
                    }
                    PttAction::Press if ch.members[&member].listen_only => {
                        let event = FloorEvent::Denied {
                            speaker: ch.floor.speaker().map(str::to_string),
                            reason: DenyReason::ListenOnly,
                        };
                        self.notify(&ptt.channel, To::Member(member), event);
                        return Ok(());
                    }
                    PttAction::Press => {
                        let priority = ch.members[&member].priority;
                        Input::Request {
                            member,
                            priority,
                            queue: ptt.queue,
                        }
                    }
                    PttAction::Release => Input::Release { member },
                };
                ch.floor.handle(input, Instant::now());
                self.drive(&ptt.channel);
                Ok(())
            }
            Request::Leave { channel } => {
                let member = self.member_of(conn, &channel)?;
                self.leave(conn, &channel, &member);
                self.send(conn, &Message::Left { channel, id });
                Ok(())
            }
            Request::Ping {} => {
                self.send(conn, &Message::Pong { id });
                Ok(())
            }
        }
    }

    /// The member name this connection has in `channel`.
    fn member_of(&self, conn: ConnId, channel: &str) -> Result<String, SignalError> {
        let not_joined = || {
            SignalError::new(
                ErrorCode::NotJoined,
                format!("not joined to channel '{channel}'"),
            )
        };
        let c = self.conns.get(&conn).ok_or_else(not_joined)?;
        let (_, member) = c
            .joined
            .iter()
            .find(|(ch, _)| ch == channel)
            .ok_or_else(not_joined)?;
        let ready = self
            .channels
            .get(channel)
            .and_then(|ch| ch.members.get(member))
            .is_some_and(|m| m.ready);
        if !ready {
            return Err(not_joined());
        }
        Ok(member.clone())
    }

    fn on_join(&mut self, conn: ConnId, join: Join, id: Option<Value>) -> Result<(), SignalError> {
        protocol::validate_name("channel", &join.channel)?;
        protocol::validate_name("member", &join.member)?;
        let leg = match join.transport.as_str() {
            "rtp" => JoinLeg::Rtp(self.rtp_addr(&join)?),
            "webrtc" => JoinLeg::WebRtc(webrtc_offer(&join)?),
            other => {
                return Err(SignalError::bad_request(format!(
                    "unknown transport '{other}' (rtp or webrtc)"
                )))
            }
        };
        if let Some(c) = self.conns.get(&conn) {
            if c.joined.iter().any(|(ch, _)| *ch == join.channel) {
                return Err(SignalError::new(
                    ErrorCode::AlreadyJoined,
                    format!("this connection already joined channel '{}'", join.channel),
                ));
            }
        } else {
            return Ok(()); // the connection is gone
        }
        if !self.channels.contains_key(&join.channel) && self.config.relay_addrs.is_some() {
            // This node now serves the channel: other nodes relay its speakers here.
            let (registry, channel, node) = (
                self.registry.clone(),
                join.channel.clone(),
                self.config.node.clone(),
            );
            tokio::spawn(async move {
                let _ = registry.set_channel_node(&channel, &node, true).await;
            });
        }
        let shards = self.shards.len();
        let floor_config = self.config.floor;
        let ch = self
            .channels
            .entry(join.channel.clone())
            .or_insert_with(|| ChannelCtl {
                shard: shard::shard_of(&join.channel, shards),
                relay_targets: Vec::new(),
                members: BTreeMap::new(),
                floor: Floor::new(floor_config),
            });

        if ch.members.contains_key(&join.member) {
            return Err(SignalError::new(
                ErrorCode::AlreadyJoined,
                format!(
                    "member '{}' is already joined to channel '{}'",
                    join.member, join.channel
                ),
            ));
        }
        let key = self.next_key;
        self.next_key += 1;
        let ssrc = rand::random::<u32>().max(1);
        let (channel, name) = (join.channel.clone(), join.member.clone());
        let (cmd, listen_only) = match leg {
            JoinLeg::Rtp(addr) => (
                Command::AddMember {
                    channel,
                    key,
                    name,
                    addr,
                    ssrc,
                },
                false,
            ),
            JoinLeg::WebRtc(offer) => (
                Command::AddPeer {
                    channel,
                    key,
                    name,
                    offer: Box::new(offer.sdp),
                },
                offer.listen_only,
            ),
        };
        if self.shards[ch.shard].commands.try_send(cmd).is_err() {
            self.counters.shard_queue_full += 1;
            return Err(SignalError::new(
                ErrorCode::Unavailable,
                "media shard is overloaded; try again",
            ));
        }
        ch.members.insert(
            join.member.clone(),
            MemberCtl {
                conn,
                key,
                priority: join.priority,
                presence: join.presence,
                ready: false,
                ssrc,
                join_id: id,
                listen_only,
                answer: None,
            },
        );
        self.pending
            .insert(key, (join.channel.clone(), join.member.clone()));
        if let Some(c) = self.conns.get_mut(&conn) {
            c.joined.insert((join.channel, join.member));
        }
        Ok(())
    }

    fn rtp_addr(&self, join: &Join) -> Result<SocketAddr, SignalError> {
        let text = join.rtp_addr.as_deref().ok_or_else(|| {
            SignalError::bad_request("transport 'rtp' needs \"rtp_addr\":\"ip:port\"")
        })?;
        let addr: SocketAddr = text.parse().map_err(|_| {
            SignalError::bad_request(format!("rtp_addr '{text}' is not an ip:port address"))
        })?;
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(SignalError::bad_request(format!(
                "rtp_addr '{text}' is not a usable address"
            )));
        }
        if !self
            .config
            .rtp_allow
            .iter()
            .any(|&(net, bits)| in_network(addr.ip(), net, bits))
        {
            return Err(SignalError::new(
                ErrorCode::Unauthorized,
                format!("rtp_addr '{text}' is outside the networks allowed by --rtp-allow"),
            ));
        }
        Ok(addr)
    }

    fn on_shard_event(&mut self, event: Event) {
        match event {
            Event::MemberAdded { key } => {
                let Some((channel, member)) = self.pending.remove(&key) else {
                    return;
                };
                self.session_join(channel, member, key);
            }
            Event::PeerAnswered { key, answer } => self.on_peer_answered(key, answer),
            Event::PeerClosed {
                channel,
                key,
                reason,
            } => self.on_peer_closed(&channel, key, reason),
            Event::Applied {
                channel,
                epoch,
                applied,
            } => {
                if let Some(ch) = self.channels.get_mut(&channel) {
                    if applied {
                        ch.floor
                            .handle(Input::ShardApplied { epoch }, Instant::now());
                        self.drive(&channel);
                    }
                }
            }
            Event::Silence { channel, epoch } => {
                if let Some(ch) = self.channels.get_mut(&channel) {
                    ch.floor
                        .handle(Input::MediaSilence { epoch }, Instant::now());
                    self.drive(&channel);
                }
            }
        }
    }

    /// The shard built a WebRTC member's peer: `joined` carries the answer. If it could not (str0m refused
    /// the offer), the membership is undone and the join answered with an error.
    fn on_peer_answered(&mut self, key: MemberKey, answer: Result<String, PeerRefused>) {
        let Some((channel, member)) = self.pending.remove(&key) else {
            return;
        };
        let refused = match answer {
            Ok(sdp) => {
                if let Some(m) = self
                    .channels
                    .get_mut(&channel)
                    .and_then(|ch| ch.members.get_mut(&member))
                {
                    m.answer = Some(sdp);
                }
                return self.session_join(channel, member, key);
            }
            Err(PeerRefused::Offer(message)) => SignalError::bad_request(message),
            Err(PeerRefused::Busy) => SignalError::new(
                ErrorCode::Unavailable,
                "too many WebRTC connections are being set up on this server; try again",
            ),
        };
        let Some(m) = self
            .channels
            .get(&channel)
            .and_then(|ch| ch.members.get(&member))
        else {
            return;
        };
        let (conn, id) = (m.conn, m.join_id.clone());
        self.leave(conn, &channel, &member);
        self.send_error(conn, &refused, id);
    }

    /// A WebRTC peer went away (ICE timeout, DTLS close): the normal leave path, so a holder's floor is
    /// released, and the client is told `left`.
    fn on_peer_closed(&mut self, channel: &str, key: MemberKey, reason: &str) {
        let Some(ch) = self.channels.get(channel) else {
            return;
        };
        let Some((member, m)) = ch.members.iter().find(|(_, m)| m.key == key) else {
            return;
        };
        let (member, conn) = (member.clone(), m.conn);
        info!(channel, member, reason, "WebRTC peer closed: leaving");
        self.leave(conn, channel, &member);
        self.send(
            conn,
            &Message::Left {
                channel: channel.to_string(),
                id: None,
            },
        );
    }

    /// Records the member in the session store and lists who is in the channel on every node, then
    /// answers `joined` (via `StoreDone::Joined`). Bounded: a store that does not answer costs the remote
    /// names only.
    fn session_join(&mut self, channel: String, member: String, key: MemberKey) {
        let (sessions, node, me) = (
            self.sessions.clone(),
            self.config.node.clone(),
            self.me.clone(),
        );
        tokio::spawn(async move {
            let members = tokio::time::timeout(SESSION_WAIT, async {
                let _ = sessions.join(&channel, &member, &node).await;
                sessions.members(&channel).await
            })
            .await;
            let members = match members {
                Ok(Ok(m)) => m,
                _ => Vec::new(),
            };
            let _ = me
                .send(HubMsg::Store(StoreDone::Joined {
                    channel,
                    member,
                    key,
                    members,
                }))
                .await;
        });
    }

    fn member_ready(
        &mut self,
        channel: &str,
        member: &str,
        key: MemberKey,
        elsewhere: Vec<String>,
    ) {
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        let Some(m) = ch.members.get_mut(member) else {
            return;
        };
        if m.key != key {
            return;
        }
        m.ready = true;
        let (conn, ssrc, id) = (m.conn, m.ssrc, m.join_id.take());
        // A WebRTC member's SDP answer; plain-RTP members get the `rtp` block instead.
        let sdp = m.answer.take();
        let mut others: Vec<String> = ch
            .members
            .iter()
            .filter(|(n, m)| *n != member && m.ready)
            .map(|(n, _)| n.clone())
            .collect();
        // Members on other nodes, as the session store lists them.
        for name in elsewhere {
            if name != member && !ch.members.contains_key(&name) {
                others.push(name);
            }
        }
        others.sort();
        others.dedup();
        let server_addr = SocketAddr::new(
            self.config.announce_ip,
            self.shards[ch.shard].media_addr.port(),
        );
        let joined = Message::Joined {
            channel: channel.to_string(),
            member: member.to_string(),
            members: others,
            speaker: ch.floor.speaker().map(str::to_string),
            epoch: ch.floor.epoch(),
            rtp: sdp.is_none().then(|| RtpInfo {
                server_addr: server_addr.to_string(),
                ssrc,
                payload_type: shard::OPUS_PT,
            }),
            sdp,
            id,
        };
        debug!(channel, member, conn, "joined");
        self.send(conn, &joined);
        let presence = Message::Presence {
            channel: channel.to_string(),
            joined: Some(member.to_string()),
            left: None,
        };
        self.broadcast_presence(channel, member, &presence);
    }

    fn broadcast_presence(&mut self, channel: &str, except: &str, msg: &Message) {
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

    /// Removes a membership: the floor learns the member left, the shard drops it, others see presence.
    fn leave(&mut self, conn: ConnId, channel: &str, member: &str) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.joined.remove(&(channel.to_string(), member.to_string()));
        }
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        let Some(m) = ch.members.remove(member) else {
            return;
        };
        self.pending.remove(&m.key);
        let _ = self.shards[ch.shard]
            .commands
            .try_send(Command::RemoveMember {
                channel: channel.to_string(),
                key: m.key,
            });
        ch.floor.handle(
            Input::Leave {
                member: member.to_string(),
            },
            Instant::now(),
        );
        self.drive(channel);
        if m.ready {
            let presence = Message::Presence {
                channel: channel.to_string(),
                joined: None,
                left: Some(member.to_string()),
            };
            self.broadcast_presence(channel, member, &presence);
            let (sessions, node, channel, member) = (
                self.sessions.clone(),
                self.config.node.clone(),
                channel.to_string(),
                member.to_string(),
            );
            tokio::spawn(async move {
                let _ = sessions.leave(&channel, &member, &node).await;
            });
        }
        self.forget_if_empty(channel);
    }

    fn forget_if_empty(&mut self, channel: &str) {
        if self
            .channels
            .get(channel)
            .is_some_and(|ch| ch.members.is_empty() && ch.floor.is_quiet())
        {
            self.channels.remove(channel);
            self.remote.forget_channel(channel);
            self.ticking.remove(channel);
            if self.config.relay_addrs.is_some() {
                let (registry, channel, node) = (
                    self.registry.clone(),
                    channel.to_string(),
                    self.config.node.clone(),
                );
                tokio::spawn(async move {
                    let _ = registry.set_channel_node(&channel, &node, false).await;
                });
            }
        }
    }

    fn disconnect(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        for (channel, member) in c.joined {
            self.leave(conn, &channel, &member);
        }
        debug!(conn, "disconnected");
    }

    fn on_store(&mut self, done: StoreDone) {
        let now = Instant::now();
        let channel = match done {
            StoreDone::Acquired {
                channel,
                member,
                result,
            } => {
                let input = match result {
                    Ok(Acquired::Granted { epoch }) => Input::StoreGranted { member, epoch },
                    Ok(Acquired::Busy(holder)) => Input::StoreDenied {
                        member,
                        holder: Some((holder.member, holder.epoch)),
                        reason: DenyReason::Busy,
                    },
                    Err(e) => {
                        warn!(channel, error = %e, "floor store failed: denying (fail safe)");
                        self.counters.store_errors += 1;
                        Input::StoreDenied {
                            member,
                            holder: None,
                            reason: DenyReason::Unavailable,
                        }
                    }
                };
                if let Some(ch) = self.channels.get_mut(&channel) {
                    ch.floor.handle(input, now);
                }
                channel
            }
            StoreDone::Released { channel, epoch } => {
                if let Some(ch) = self.channels.get_mut(&channel) {
                    ch.floor.handle(Input::StoreReleased { epoch }, now);
                }
                channel
            }
            StoreDone::Renewed {
                channel,
                epoch,
                sent_at,
                outcome,
            } => {
                if let Some(ch) = self.channels.get_mut(&channel) {
                    ch.floor.handle(
                        Input::Renewed {
                            epoch,
                            sent_at,
                            outcome,
                        },
                        now,
                    );
                }
                channel
            }
            StoreDone::Holder { channel, result } => {
                let Some(ch) = self.channels.get_mut(&channel) else {
                    return;
                };
                match result {
                    Ok(Some(h)) if h.node != self.config.node => ch.floor.handle(
                        Input::Remote {
                            speaker: Some(h.member),
                            epoch: h.epoch,
                        },
                        now,
                    ),
                    Ok(None) => {
                        // The remote holder's lease ran out (an expiring key publishes nothing).
                        if let Some((_, epoch)) = ch.floor.remote() {
                            ch.floor.handle(
                                Input::Remote {
                                    speaker: None,
                                    epoch,
                                },
                                now,
                            );
                        }
                    }
                    _ => {}
                }
                channel
            }
            StoreDone::Joined {
                channel,
                member,
                key,
                members,
            } => {
                self.member_ready(&channel, &member, key, members);
                channel
            }
            StoreDone::Nodes {
                channel,
                live,
                dead,
            } => {
                self.on_nodes(&channel, live, dead);
                return;
            }
        };
        self.drive(&channel);
        self.forget_if_empty(&channel);
    }

    /// Drains the floor's outputs: store calls become tasks, speaker changes go to the shard, events go
    /// to the members they are for.
    fn drive(&mut self, channel: &str) {
        loop {
            let Some(ch) = self.channels.get_mut(channel) else {
                return;
            };
            let Some(out) = ch.floor.poll_output() else {
                if ch.floor.is_quiet() {
                    self.ticking.remove(channel);
                } else {
                    self.ticking.insert(channel.to_string());
                }
                return;
            };
            match out {
                Output::Acquire { member, priority } => {
                    let req = AcquireRequest {
                        channel: channel.to_string(),
                        member: member.clone(),
                        priority,
                        ttl: self.config.lock_ttl,
                    };
                    let (store, me, channel) =
                        (self.floors.clone(), self.me.clone(), channel.to_string());
                    tokio::spawn(async move {
                        let result = store.acquire(req).await;
                        let _ = me
                            .send(HubMsg::Store(StoreDone::Acquired {
                                channel,
                                member,
                                result,
                            }))
                            .await;
                    });
                }
                Output::Release { epoch } => {
                    let (store, me, channel) =
                        (self.floors.clone(), self.me.clone(), channel.to_string());
                    tokio::spawn(async move {
                        if let Err(e) = store.release(&channel, epoch).await {
                            // The lease runs out on its own.
                            debug!(channel, error = %e, "floor release failed");
                        }
                        let _ = me
                            .send(HubMsg::Store(StoreDone::Released { channel, epoch }))
                            .await;
                    });
                }
                Output::Renew { epoch } => {
                    let ttl = self.config.lock_ttl;
                    let (store, me, channel) =
                        (self.floors.clone(), self.me.clone(), channel.to_string());
                    let sent_at = Instant::now();
                    tokio::spawn(async move {
                        let outcome = match store.renew(&channel, epoch, ttl).await {
                            Ok(true) => Renewal::Renewed,
                            Ok(false) => Renewal::Lost,
                            Err(_) => Renewal::Failed,
                        };
                        let _ = me
                            .send(HubMsg::Store(StoreDone::Renewed {
                                channel,
                                epoch,
                                sent_at,
                                outcome,
                            }))
                            .await;
                    });
                }
                Output::Apply { speaker, epoch } => {
                    let change = match speaker {
                        Some(name) => SpeakerChange::Granted {
                            speaker: ch.members.get(&name).map(|m| m.key),
                            epoch,
                        },
                        None => SpeakerChange::Idle { epoch },
                    };
                    let cmd = Command::Speaker {
                        channel: channel.to_string(),
                        change,
                    };
                    if self.shards[ch.shard].commands.try_send(cmd).is_err() {
                        // The grant is never acknowledged, so never announced: the requester times out
                        // rather than talking into a shard that does not forward it.
                        self.counters.shard_queue_full += 1;
                        warn!(channel, "shard command queue full: speaker change lost");
                    }
                }
                Output::Notify { to, event } => self.notify(channel, to, event),
            }
        }
    }

    fn notify(&mut self, channel: &str, to: To, event: FloorEvent) {
        match &event {
            FloorEvent::Granted { .. } => self.counters.floor_grants += 1,
            FloorEvent::Denied { reason, .. } => {
                *self
                    .counters
                    .floor_denials
                    .entry(reason.as_str())
                    .or_default() += 1
            }
            FloorEvent::Revoked { reason, .. } => {
                *self
                    .counters
                    .floor_revokes
                    .entry(reason.as_str())
                    .or_default() += 1
            }
            _ => {}
        }
        let Some(ch) = self.channels.get(channel) else {
            return;
        };
        let text = Message::Floor(FloorMessage::from_event(channel, &event)).to_json();
        let conns: Vec<ConnId> = ch
            .members
            .iter()
            .filter(|(name, m)| {
                m.ready
                    && match &to {
                        To::Member(x) => *name == x,
                        To::AllExcept(x) => *name != x,
                        To::All => true,
                    }
            })
            .map(|(_, m)| m.conn)
            .collect();
        for conn in conns {
            self.send_text(conn, text.clone());
        }
    }

    /// Changes published by the store. Our own grants come back too and are ignored: the floor already
    /// knows them.
    fn on_store_event(&mut self, event: StoreEvent) {
        let now = Instant::now();
        match event {
            StoreEvent::Floor {
                channel,
                holder,
                epoch,
            } => {
                let Some(ch) = self.channels.get_mut(&channel) else {
                    return;
                };
                match holder {
                    Some(h) if h.node == self.config.node => return,
                    Some(h) => ch.floor.handle(
                        Input::Remote {
                            speaker: Some(h.member),
                            epoch,
                        },
                        now,
                    ),
                    None => ch.floor.handle(
                        Input::Remote {
                            speaker: None,
                            epoch,
                        },
                        now,
                    ),
                }
                self.drive(&channel);
            }
            StoreEvent::Presence {
                channel,
                member,
                node,
                joined,
            } => {
                if node == self.config.node || !self.channels.contains_key(&channel) {
                    return;
                }
                if joined {
                    self.remote.joined(&channel, &member, &node);
                } else if !self.remote.left(&channel, &member) {
                    return; // already told when its node was found gone
                }
                let msg = if joined {
                    Message::Presence {
                        channel: channel.clone(),
                        joined: Some(member.clone()),
                        left: None,
                    }
                } else {
                    Message::Presence {
                        channel: channel.clone(),
                        joined: None,
                        left: Some(member.clone()),
                    }
                };
                self.broadcast_presence(&channel, &member, &msg);
            }
            StoreEvent::Resync => {
                if !self.store_up {
                    info!("floor store subscription up: resynchronising");
                }
                self.store_up = true;
                self.remote.store_back(now);
                self.resync();
                // Redis may have come back empty: say again that this node is alive, then which channels
                // it serves (in that order: a registered node without liveness counts as dead), then its
                // members' sessions (a refresh re-adds a missing member).
                self.reregister();
            }
            StoreEvent::Down => {
                if self.store_up {
                    warn!("floor store subscription down: denying presses until it is back");
                }
                self.store_up = false;
            }
        }
    }

    /// The registry's view of a channel: relay to every other live node once, accept relay from every live
    /// node, and clean up after the dead ones.
    fn on_nodes(&mut self, channel: &str, live: Vec<NodeInfo>, dead: Vec<String>) {
        let now = Instant::now();
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
        for node in gone_nodes {
            // Whatever the store still holds of it goes too (its liveness key expired long ago).
            let (registry, channel) = (self.registry.clone(), channel.to_string());
            tokio::spawn(async move {
                let _ = registry.evict_node(&channel, &node).await;
            });
        }
        for node in &dead {
            warn!(node, channel, "node is gone: removing its members");
            self.known_nodes.remove(node);
            let (registry, channel, node) =
                (self.registry.clone(), channel.to_string(), node.clone());
            tokio::spawn(async move {
                // Publishes `leave` for each of its members: every node's presence follows.
                let _ = registry.evict_node(&channel, &node).await;
            });
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
            let cmd = Command::RelayTargets {
                channel: channel.to_string(),
                targets,
            };
            let _ = self.shards[ch.shard].commands.try_send(cmd);
        }
        let mut peers: Vec<SocketAddr> = self.known_nodes.values().flatten().copied().collect();
        peers.sort();
        peers.dedup();
        if peers != self.relay_peers {
            self.relay_peers = peers.clone();
            for s in &self.shards {
                let _ = s.commands.try_send(Command::RelayPeers {
                    peers: peers.clone(),
                });
            }
        }
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

    /// After a store reconnect: liveness, then channel registrations, then sessions, each retried while
    /// the command connection comes back.
    fn reregister(&mut self) {
        let relay = self.config.relay_addrs.clone();
        let channels: Vec<String> = self.channels.keys().cloned().collect();
        let members = self.local_members();
        let (registry, sessions, node) = (
            self.registry.clone(),
            self.sessions.clone(),
            self.config.node.clone(),
        );
        self.next_announce = Instant::now() + ANNOUNCE_EVERY;
        tokio::spawn(async move {
            if let Some(relay) = relay {
                let info = NodeInfo {
                    node: node.clone(),
                    relay,
                };
                // Never a registration without liveness: the others would take this node for dead.
                let alive = retry(|| registry.announce(&info, NODE_TTL)).await;
                for channel in channels.iter().filter(|_| alive) {
                    let _ = retry(|| registry.set_channel_node(channel, &node, true)).await;
                }
            }
            for (channel, member) in &members {
                let _ = retry(|| sessions.refresh(channel, member, &node)).await;
            }
        });
    }

    /// Renews this node's liveness and re-reads every channel's nodes (relay on only).
    fn tick_relay(&mut self, now: Instant) {
        let Some(relay) = self.config.relay_addrs.clone() else {
            return;
        };
        if now >= self.next_announce {
            self.next_announce = now + ANNOUNCE_EVERY;
            // Liveness first, then the channels: a node registered in a channel without a liveness key
            // counts as dead for the others, so a registration must never land before the announce.
            let channels: Vec<String> = self.channels.keys().cloned().collect();
            let (registry, info) = (
                self.registry.clone(),
                NodeInfo {
                    node: self.config.node.clone(),
                    relay,
                },
            );
            tokio::spawn(async move {
                if let Err(e) = registry.announce(&info, NODE_TTL).await {
                    debug!(error = %e, "node announce failed");
                    return;
                }
                for channel in channels {
                    let _ = registry.set_channel_node(&channel, &info.node, true).await;
                }
            });
        }
        if now >= self.next_relay_refresh {
            self.next_relay_refresh = now + RELAY_REFRESH;
            for channel in self.channels.keys() {
                let (registry, me, channel) =
                    (self.registry.clone(), self.me.clone(), channel.clone());
                tokio::spawn(async move {
                    if let Ok((live, dead)) = registry.channel_nodes(&channel).await {
                        let _ = me
                            .send(HubMsg::Store(StoreDone::Nodes {
                                channel,
                                live,
                                dead,
                            }))
                            .await;
                    }
                });
            }
        }
    }

    /// Re-reads every local channel's floor from the store.
    fn resync(&mut self) {
        for channel in self.channels.keys() {
            let (store, me, channel) = (self.floors.clone(), self.me.clone(), channel.clone());
            tokio::spawn(async move {
                let result = store.holder(&channel).await;
                let _ = me
                    .send(HubMsg::Store(StoreDone::Holder { channel, result }))
                    .await;
            });
        }
    }

    /// Heartbeats for every local member, so the session store's idle TTL only removes the dead.
    fn refresh_sessions(&self) {
        let members = self.local_members();
        let (sessions, node) = (self.sessions.clone(), self.config.node.clone());
        tokio::spawn(async move {
            for (channel, member) in &members {
                // Right after a reconnect the command connection may still be in its backoff while the
                // subscription is already up: retry briefly rather than wait for the next heartbeat.
                let _ = retry(|| sessions.refresh(channel, member, &node)).await;
            }
        });
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if self.shared && now >= self.next_resync {
            self.next_resync = now + RESYNC_EVERY;
            if self.store_up {
                self.resync();
            }
        }
        if now >= self.next_refresh {
            self.next_refresh = now + REFRESH_EVERY;
            self.refresh_sessions();
        }
        self.tick_relay(now);
        let names: Vec<String> = self.ticking.iter().cloned().collect();
        for name in names {
            if let Some(ch) = self.channels.get_mut(&name) {
                ch.floor.handle(Input::Tick, now);
            }
            self.drive(&name);
            self.forget_if_empty(&name);
        }
    }

    /// Clean stop: floors are given back and announced idle, every member is told `left`, the shards stop.
    async fn shutdown(&mut self) {
        info!("shutting down: releasing floors and closing connections");
        if self.config.relay_addrs.is_some() {
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                self.registry.withdraw(&self.config.node),
            )
            .await;
            for channel in self.channels.keys() {
                let set = self
                    .registry
                    .set_channel_node(channel, &self.config.node, false);
                let _ = tokio::time::timeout(Duration::from_millis(200), set).await;
            }
        }
        let channels: Vec<String> = self.channels.keys().cloned().collect();
        for name in channels {
            let Some(ch) = self.channels.get(&name) else {
                continue;
            };
            if let Some(speaker) = ch.floor.speaker() {
                let epoch = ch.floor.epoch();
                let local = ch.members.contains_key(speaker);
                if local {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        self.floors.release(&name, epoch),
                    )
                    .await;
                    self.notify(&name, To::All, FloorEvent::Idle { epoch });
                }
            }
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
                    &Message::Left {
                        channel: name.clone(),
                        id: None,
                    },
                );
                let _ = tokio::time::timeout(
                    Duration::from_millis(500),
                    self.sessions.leave(&name, &member, &self.config.node),
                )
                .await;
            }
        }
        self.conns.clear();
        for s in &self.shards {
            let _ = s.commands.try_send(Command::Shutdown);
        }
    }
}

/// How a joining member's media will flow.
enum JoinLeg {
    Rtp(SocketAddr),
    WebRtc(crate::peer::offer::Offer),
}

/// The checked SDP offer of a WebRTC join (before anything is built for it).
fn webrtc_offer(join: &Join) -> Result<crate::peer::offer::Offer, SignalError> {
    let sdp = join.sdp.as_deref().ok_or_else(|| {
        SignalError::bad_request("transport 'webrtc' needs \"sdp\" with an SDP offer")
    })?;
    crate::peer::offer::parse_offer(sdp).map_err(|e| SignalError::bad_request(e.to_string()))
}

/// Runs a store call until it succeeds, at most [`REFRESH_RETRIES`] times 250 ms apart; whether it did.
async fn retry<F: std::future::Future<Output = Result<(), StateError>>>(
    mut call: impl FnMut() -> F,
) -> bool {
    for attempt in 0..REFRESH_RETRIES {
        if call().await.is_ok() {
            return true;
        }
        if attempt + 1 < REFRESH_RETRIES {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    false
}

/// The next store event, or never when the store publishes nothing (the embedded one).
async fn recv_store_event(rx: &mut Option<mpsc::Receiver<StoreEvent>>) -> Option<StoreEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Whether `ip` is inside `net/bits`.
pub fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(bits.min(32)))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(bits.min(128)))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Parses `CIDR,CIDR,…` (e.g. `127.0.0.0/8,10.0.0.0/8`).
pub fn parse_networks(text: &str) -> Result<Vec<(IpAddr, u8)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (ip, bits) = s
                .split_once('/')
                .unwrap_or((s, if s.contains(':') { "128" } else { "32" }));
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("'{s}' is not an IP network"))?;
            let bits: u8 = bits
                .parse()
                .map_err(|_| format!("'{s}' has a bad prefix length"))?;
            Ok((ip, bits))
        })
        .collect()
}

/// Loopback and private ranges: the default of `--rtp-allow`.
pub const DEFAULT_RTP_ALLOW: &str =
    "127.0.0.0/8,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,::1/128,fc00::/7";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let nets = parse_networks(DEFAULT_RTP_ALLOW).unwrap();
        let allowed = |ip: &str| {
            nets.iter()
                .any(|&(n, b)| in_network(ip.parse().unwrap(), n, b))
        };
        assert!(allowed("127.0.0.1"));
        assert!(allowed("192.168.3.4"));
        assert!(allowed("::1"));
        assert!(!allowed("8.8.8.8"));
        assert!(parse_networks("10.0.0.0/x").is_err());
    }
}
