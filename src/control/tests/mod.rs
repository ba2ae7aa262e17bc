//! The control core in virtual time: [`TestHub`] plays the WebSocket clients, the shards (acknowledging
//! every command at once unless told otherwise) and the stores ([`ModelStore`], answering every call at
//! once with the same rules as the real backends, unless told to fail or hang), and steps a virtual
//! clock from one deadline of the core to the next. No sleeps, no sockets.

mod auth_tests;
mod cluster_tests;
mod drain_tests;
mod floor_tests;
mod member_tests;
mod metrics_tests;
mod model_tests;
mod placement_tests;
mod session_tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::calls::{CallId, StoreCall, StoreReply};
use super::{HubConfig, HubCore, Input, Output};
use crate::floor::{FloorConfig, Lease};
use crate::ids::ConnId;
use crate::shard::{Command, Event};
use crate::signal::protocol;
use crate::state::{Acquired, Holder, NodeInfo, StateError, StoreEvent};

/// How the model store answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// Answers at once.
    Up,
    /// Answers every call with an error at once.
    Failing,
    /// Never answers (a blackhole): calls are kept in [`TestHub::hanging`].
    Hanging,
}

/// The stores, in memory, in virtual time.
#[derive(Default)]
pub struct ModelStore {
    locks: HashMap<String, (Holder, Instant)>,
    last_epoch: HashMap<String, u64>,
    members: BTreeMap<String, BTreeSet<String>>,
    /// Node → (what it announced, liveness expiry); dead nodes stay, expired.
    pub nodes: HashMap<String, (NodeInfo, Instant)>,
    pub channel_nodes: BTreeMap<String, BTreeSet<String>>,
    /// Channel → home node (placement).
    pub homes: HashMap<String, String>,
    /// The agreed relay key.
    pub cluster_key: Option<String>,
    /// Which node each session belongs to: `(channel, member)` → node.
    member_node: HashMap<(String, String), String>,
    /// The transmission log, in write order.
    pub history: Vec<crate::state::history::Burst>,
    /// What the store published (grants and releases), in order, for a harness to deliver.
    pub published: Vec<StoreEvent>,
}

impl ModelStore {
    pub(super) fn answer(
        &mut self,
        call: &StoreCall,
        node: &str,
        now: Instant,
        t0: Instant,
    ) -> StoreReply {
        match call {
            StoreCall::Acquire(req) => {
                let held = self.locks.get(&req.channel).filter(|(_, exp)| *exp > now);
                if let Some((h, _)) = held.filter(|(h, _)| !req.emergency || h.emergency) {
                    return StoreReply::Acquired(Ok(Acquired::Busy(h.clone())));
                }
                let clock = 1_000_000 + now.duration_since(t0).as_micros() as u64;
                let last = self.last_epoch.get(&req.channel).copied().unwrap_or(0);
                let epoch = (last + 1).max(clock);
                self.last_epoch.insert(req.channel.clone(), epoch);
                let holder = Holder {
                    member: req.member.clone(),
                    node: node.to_string(),
                    epoch,
                    priority: req.priority,
                    emergency: req.emergency,
                };
                self.locks
                    .insert(req.channel.clone(), (holder.clone(), now + req.ttl));
                self.published.push(StoreEvent::Floor {
                    channel: req.channel.clone(),
                    holder: Some(holder),
                    epoch,
                });
                StoreReply::Acquired(Ok(Acquired::Granted { epoch }))
            }
            StoreCall::Renew {
                channel,
                epoch,
                ttl,
            } => {
                let ok = match self.locks.get_mut(channel) {
                    Some((h, exp)) if h.epoch == *epoch && *exp > now => {
                        *exp = now + *ttl;
                        true
                    }
                    _ => false,
                };
                StoreReply::Flag(Ok(ok))
            }
            StoreCall::Release { channel, epoch } => {
                let ok = self
                    .locks
                    .get(channel)
                    .is_some_and(|(h, _)| h.epoch == *epoch);
                if ok {
                    self.locks.remove(channel);
                    self.published.push(StoreEvent::Floor {
                        channel: channel.clone(),
                        holder: None,
                        epoch: *epoch,
                    });
                }
                StoreReply::Flag(Ok(ok))
            }
            StoreCall::Holder { channel } => StoreReply::Holder(Ok(self
                .locks
                .get(channel)
                .filter(|(_, exp)| *exp > now)
                .map(|(h, _)| h.clone()))),
            StoreCall::Join {
                channel,
                member,
                node,
            } => {
                let key = (channel.clone(), member.clone());
                if self.member_node.get(&key).is_some_and(|n| n != node) {
                    return StoreReply::Joined(Ok(None));
                }
                self.add_member(channel, member, node);
                let m = self.members[channel].iter().cloned().collect();
                StoreReply::Joined(Ok(Some(m)))
            }
            StoreCall::Refresh {
                channel,
                member,
                node,
            } => {
                self.add_member(channel, member, node);
                StoreReply::Done(Ok(()))
            }
            StoreCall::Leave {
                channel, member, ..
            } => {
                if let Some(m) = self.members.get_mut(channel) {
                    m.remove(member);
                }
                self.member_node.remove(&(channel.clone(), member.clone()));
                StoreReply::Done(Ok(()))
            }
            StoreCall::Announce { info, ttl } => {
                let was_live = self.nodes.get(&info.node).is_some_and(|(_, e)| *e > now);
                self.nodes
                    .insert(info.node.clone(), (info.clone(), now + *ttl));
                if !was_live {
                    self.published.push(StoreEvent::Node {
                        node: info.node.clone(),
                        live: true,
                    });
                }
                StoreReply::Done(Ok(()))
            }
            StoreCall::Withdraw { node } => {
                if let Some((_, exp)) = self.nodes.get_mut(node) {
                    *exp = now;
                }
                self.published.push(StoreEvent::Node {
                    node: node.clone(),
                    live: false,
                });
                StoreReply::Done(Ok(()))
            }
            StoreCall::Nodes => {
                let mut table = crate::state::NodeTable::default();
                for (id, (info, exp)) in &self.nodes {
                    if *exp > now {
                        table.live.push(info.clone());
                    } else {
                        table.dead.push(id.clone());
                    }
                }
                table.live.sort_by(|a, b| a.node.cmp(&b.node));
                table.dead.sort();
                StoreReply::Table(Ok(table))
            }
            StoreCall::Place {
                channel,
                candidate,
                usable,
                ..
            } => {
                let home = match self.homes.get(channel) {
                    Some(h) if usable.contains(h) => h.clone(),
                    _ => candidate.clone(),
                };
                self.homes.insert(channel.clone(), home.clone());
                StoreReply::Home(Ok(home))
            }
            StoreCall::Unplace { channel, node } => {
                if self.homes.get(channel) == Some(node) {
                    self.homes.remove(channel);
                }
                StoreReply::Done(Ok(()))
            }
            StoreCall::SetChannelNode {
                channel,
                node,
                present,
            } => {
                let set = self.channel_nodes.entry(channel.clone()).or_default();
                let changed = if *present {
                    set.insert(node.clone())
                } else {
                    set.remove(node)
                };
                if changed {
                    self.published.push(StoreEvent::ChannelNode {
                        channel: channel.clone(),
                        node: node.clone(),
                        present: *present,
                    });
                }
                StoreReply::Done(Ok(()))
            }
            StoreCall::ChannelNodes { channel } => {
                let ids = self.channel_nodes.get(channel).cloned().unwrap_or_default();
                StoreReply::Nodes(Ok(ids.into_iter().collect()))
            }
            StoreCall::RecordBurst(burst) => {
                self.history.push((**burst).clone());
                StoreReply::Done(Ok(()))
            }
            StoreCall::ClusterKey { key } => {
                StoreReply::Key(Ok(self.cluster_key.get_or_insert(key.clone()).clone()))
            }
            StoreCall::EvictNode { channel, node } => {
                if let Some(set) = self.channel_nodes.get_mut(channel) {
                    set.remove(node);
                }
                let gone: Vec<String> = self
                    .member_node
                    .iter()
                    .filter(|((c, _), n)| c == channel && *n == node)
                    .map(|((_, m), _)| m.clone())
                    .collect();
                for m in &gone {
                    self.member_node.remove(&(channel.clone(), m.clone()));
                    if let Some(set) = self.members.get_mut(channel) {
                        set.remove(m);
                    }
                }
                StoreReply::Evicted(Ok(gone))
            }
        }
    }

    fn add_member(&mut self, channel: &str, member: &str, node: &str) {
        self.members
            .entry(channel.to_string())
            .or_default()
            .insert(member.to_string());
        self.member_node
            .insert((channel.to_string(), member.to_string()), node.to_string());
    }

    /// Forgets everything, as a Redis restarted without persistence.
    pub fn wipe(&mut self) {
        *self = ModelStore::default();
    }
}

/// A control core with its clients, shards and stores played in virtual time.
pub struct TestHub {
    pub core: HubCore,
    pub t0: Instant,
    pub now: Instant,
    pub node: String,
    pub store: ModelStore,
    pub mode: StoreMode,
    /// When false, shard commands are only recorded.
    pub auto_shard: bool,
    /// Frames sent to each connection, in order.
    pub frames: HashMap<ConnId, Vec<Value>>,
    pub closed: Vec<ConnId>,
    /// Every store call made, in order.
    pub calls: Vec<StoreCall>,
    /// Calls the store did not answer (mode `Hanging`).
    pub hanging: Vec<(CallId, StoreCall)>,
    /// Every shard command, in order (index, short description).
    pub commands: Vec<(usize, Command)>,
    /// The `hello` each connection got.
    pub hellos: HashMap<ConnId, Value>,
    next_conn: ConnId,
}

/// A configuration for one node of a test: 2 shards, the default floor timers.
pub fn config(node: &str, shared: bool) -> HubConfig {
    HubConfig {
        node: node.to_string(),
        floor: FloorConfig {
            lease: shared.then_some(Lease {
                ttl: Duration::from_secs(3),
                renew_every: Duration::from_secs(1),
                margin: Duration::from_millis(250),
            }),
            ..FloorConfig::default()
        },
        lock_ttl: if shared {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(40)
        },
        announce_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        media_ports: vec![40000, 40001],
        rtp_allow: vec!["127.0.0.0/8".parse().expect("literal")],
        relay_addrs: None,
        shared,
        store_timeout: Duration::from_secs(1),
        seed: 7,
        auth: None,
        limits: crate::auth::Limits::default(),
        rtp_any_ip: false,
        resume_window: Duration::from_secs(30),
        record_all: None,
        drain_timeout: Duration::from_secs(30),
        cluster_key: None,
        placement: crate::control::Placement::Relay,
        public_url: Some(format!("ws://{node}.test/ws")),
    }
}

impl TestHub {
    /// One node on the embedded-store rules (not shared, no relay).
    pub fn new() -> Self {
        Self::with_config(config("a", false))
    }

    pub fn with_config(config: HubConfig) -> Self {
        let t0 = Instant::now();
        let node = config.node.clone();
        TestHub {
            core: HubCore::new(config, t0),
            t0,
            now: t0,
            node,
            store: ModelStore::default(),
            mode: StoreMode::Up,
            auto_shard: true,
            frames: HashMap::new(),
            closed: vec![],
            calls: vec![],
            hanging: vec![],
            commands: vec![],
            hellos: HashMap::new(),
            next_conn: 1,
        }
    }

    /// Feeds one input at the current virtual time and performs what comes out.
    pub fn input(&mut self, input: Input) {
        self.core.handle(input, self.now);
        self.pump();
    }

    /// Performs the core's outputs until there are none: frames are recorded, store calls answered by
    /// the model store (per `mode`), shard commands acknowledged as a shard would.
    pub fn pump(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Send { conn, text } => {
                    let v: Value = serde_json::from_str(&text).expect("the core sends JSON");
                    self.frames.entry(conn).or_default().push(v);
                }
                Output::Close { conn } => self.closed.push(conn),
                Output::Store { id, call, .. } => {
                    self.calls.push(call.clone());
                    match self.mode {
                        StoreMode::Up => {
                            let reply = self.store.answer(&call, &self.node, self.now, self.t0);
                            self.core.handle(Input::Store { id, reply }, self.now);
                        }
                        StoreMode::Failing => {
                            let reply = failure(&call);
                            self.core.handle(Input::Store { id, reply }, self.now);
                        }
                        StoreMode::Hanging => self.hanging.push((id, call)),
                    }
                }
                Output::Watch { channel, on } => {
                    // A subscriber confirms a watch once Redis has: here, at once.
                    if on {
                        let event = StoreEvent::Watching { channel };
                        self.core.handle(Input::StoreEvent(event), self.now);
                    }
                }
                Output::Shard { shard, command } => {
                    if let Some(event) = self.auto_shard.then(|| ack(&command)).flatten() {
                        self.core.handle(Input::Shard(event), self.now);
                    }
                    self.commands.push((shard, command));
                }
            }
        }
    }

    /// Moves the virtual clock forward by `d`, waking the core at each of its deadlines on the way.
    pub fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        while let Some(at) = self.core.poll_timeout().filter(|at| *at <= target) {
            self.now = self.now.max(at);
            self.core.handle_timeout(self.now);
            self.pump();
        }
        self.now = target;
    }

    /// Opens a WebSocket connection.
    pub fn connect(&mut self) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.input(Input::Connect {
            conn,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        });
        let hello = self.expect(conn, |v| v["type"] == "hello");
        self.hellos.insert(conn, hello);
        conn
    }

    /// Sends a JSON frame from a client.
    pub fn send(&mut self, conn: ConnId, frame: Value) {
        let frame = protocol::parse(&frame.to_string());
        self.input(Input::Frame { conn, frame });
    }

    /// Joins a plain-RTP member and returns its `joined` frame.
    pub fn join(&mut self, conn: ConnId, channel: &str, member: &str) -> Value {
        self.join_with(conn, channel, member, json!({}))
    }

    /// Joins with extra fields (e.g. `priority`).
    pub fn join_with(&mut self, conn: ConnId, channel: &str, member: &str, extra: Value) -> Value {
        let mut frame = json!({"type":"join","channel":channel,"member":member,
            "transport":"rtp","rtp_addr":format!("127.0.0.1:{}", 50000 + conn)});
        if let (Some(f), Some(e)) = (frame.as_object_mut(), extra.as_object()) {
            f.extend(e.clone());
        }
        self.send(conn, frame);
        self.expect(conn, |v| v["type"] == "joined" || v["type"] == "error")
    }

    pub fn press(&mut self, conn: ConnId, channel: &str) {
        self.send(
            conn,
            json!({"type":"ptt","channel":channel,"action":"press"}),
        );
    }

    pub fn release(&mut self, conn: ConnId, channel: &str) {
        self.send(
            conn,
            json!({"type":"ptt","channel":channel,"action":"release"}),
        );
    }

    /// Takes the first frame to `conn` that matches, panicking with what there was if none does.
    pub fn expect(&mut self, conn: ConnId, pred: impl Fn(&Value) -> bool) -> Value {
        let frames = self.frames.entry(conn).or_default();
        match frames.iter().position(&pred) {
            Some(i) => frames.remove(i),
            None => panic!("no such frame for conn {conn}; it has {frames:?}"),
        }
    }

    /// Takes the first `floor` frame to `conn` in `state`.
    pub fn floor(&mut self, conn: ConnId, state: &str) -> Value {
        self.expect(conn, |v| v["type"] == "floor" && v["state"] == state)
    }

    /// The `floor` states sent to `conn` so far (and forgets them).
    pub fn floor_states(&mut self, conn: ConnId) -> Vec<String> {
        let frames = self.frames.remove(&conn).unwrap_or_default();
        frames
            .iter()
            .filter(|v| v["type"] == "floor")
            .map(|v| v["state"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Every frame of `conn` so far (and forgets them).
    pub fn take(&mut self, conn: ConnId) -> Vec<Value> {
        self.frames.remove(&conn).unwrap_or_default()
    }

    /// Store calls made so far, by name (and forgets them).
    pub fn call_names(&mut self) -> Vec<&'static str> {
        self.calls.drain(..).map(|c| c.name()).collect()
    }

    /// Answers the hanging calls the way `reply` says (`None`: leave it hanging).
    pub fn answer_hanging(&mut self, reply: impl Fn(&StoreCall) -> Option<StoreReply>) {
        let hanging = std::mem::take(&mut self.hanging);
        for (id, call) in hanging {
            match reply(&call) {
                Some(r) => self.input(Input::Store { id, reply: r }),
                None => self.hanging.push((id, call)),
            }
        }
    }

    /// A published store event.
    pub fn store_event(&mut self, event: StoreEvent) {
        self.input(Input::StoreEvent(event));
    }
}

/// What a shard answers to a command (nothing for most).
fn ack(command: &Command) -> Option<Event> {
    match command {
        Command::AddMember { key, .. } => Some(Event::MemberAdded { key: *key }),
        Command::AddPeer { key, .. } => Some(Event::PeerAnswered {
            key: *key,
            answer: Ok("v=0 (answer)".into()),
        }),
        Command::Speaker { channel, change } => {
            if matches!(change, crate::channel::SpeakerChange::Lease { .. }) {
                return None; // no acknowledgement, as the shard
            }
            let epoch = change.epoch();
            Some(Event::Applied {
                channel: channel.clone(),
                epoch,
                applied: true,
                idle: matches!(change, crate::channel::SpeakerChange::Idle { .. }),
            })
        }
        _ => None,
    }
}

/// A store error of the right type for `call`.
pub fn failure(call: &StoreCall) -> StoreReply {
    let e = StateError::Unavailable("injected".into());
    match call {
        StoreCall::Acquire(_) => StoreReply::Acquired(Err(e)),
        StoreCall::Renew { .. } | StoreCall::Release { .. } => StoreReply::Flag(Err(e)),
        StoreCall::Holder { .. } => StoreReply::Holder(Err(e)),
        StoreCall::Join { .. } => StoreReply::Joined(Err(e)),
        StoreCall::ChannelNodes { .. } => StoreReply::Nodes(Err(e)),
        StoreCall::EvictNode { .. } => StoreReply::Evicted(Err(e)),
        StoreCall::ClusterKey { .. } => StoreReply::Key(Err(e)),
        _ => StoreReply::Done(Err(e)),
    }
}
