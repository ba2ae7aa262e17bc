//! The floor across nodes, model-checked: two or three control cores on one model store, each with its
//! channel's shard played by the real `channel::Channel` (epoch rules, lease fence), and everything between
//! them delayed, lost or failing at random — store answers (slow, failing, never coming), pub/sub messages
//! (late or lost), shard commands (late, refused by a full queue) and their acknowledgements. After every
//! step in virtual time:
//! - at most one member is forwarded by the shards of all nodes together (never two speakers);
//! - a member forwarded holds the store's current lock, and its lease has not run out (nothing forwarded
//!   after its lease deadline).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use serde_json::json;

use super::{config, ModelStore};
use crate::channel::{Channel, Member, SpeakerChange};
use crate::control::calls::{CallId, StoreCall, StoreReply};
use crate::control::{HubCore, Input, Output};
use crate::forward::{Batch, OutStream};
use crate::ids::MemberKey;
use crate::rtp::{self, RtpView};
use crate::shard::{Command, Event};
use crate::signal::protocol;
use crate::state::StoreEvent;

const CHANNEL: &str = "ops";
const MEMBERS_PER_NODE: usize = 2;

/// Something on its way, due at an instant.
enum Pending {
    /// A store call reaches the store (and its answer comes back `back` later, unless it hangs).
    Call {
        node: usize,
        id: CallId,
        call: StoreCall,
        back: Option<Duration>,
    },
    /// A store answer reaches its node.
    Answer {
        node: usize,
        id: CallId,
        reply: StoreReply,
    },
    /// A published event reaches a node.
    Publish { node: usize, event: StoreEvent },
    /// A command reaches a node's shard.
    Command { node: usize, command: Command },
    /// A shard's event reaches its node's control core.
    Event { node: usize, event: Event },
}

/// How the network and the store behave for one node, changed by the operations.
#[derive(Clone, Copy)]
struct Weather {
    /// Store round trip (each way half of it).
    store_rtt: Duration,
    /// Store calls fail while set.
    store_down: bool,
    /// Store calls are never answered while set (a blackhole).
    store_hangs: bool,
    /// Delay of commands into the shard and of its events back.
    shard_delay: Duration,
    /// The next this-many commands are refused by a full queue.
    shard_full: u32,
}

struct Node {
    core: HubCore,
    shard: Channel,
    /// Connection and membership key of each local member, by index.
    members: Vec<(u64, MemberKey)>,
    weather: Weather,
    /// When the last command to the shard, and the last event from it, are delivered: both ways are
    /// FIFO queues (flume channels), so a shorter delay set later never overtakes what is in flight.
    command_tail: Instant,
    event_tail: Instant,
}

/// How long after `now` an item sent with `delay` on a FIFO queue whose last item arrives at `tail` is
/// delivered: never before that last item. Moves `tail` to it.
fn fifo(tail: &mut Instant, now: Instant, delay: Duration) -> Duration {
    *tail = (now + delay).max(*tail);
    *tail - now
}

struct Model {
    t0: Instant,
    now: Instant,
    nodes: Vec<Node>,
    store: ModelStore,
    queue: Vec<(Instant, u64, Pending)>,
    seq: u64,
    /// Published events not yet handed out (each is delivered to every node, or lost).
    lose_next_publish: u32,
    publish_delay: Duration,
}

#[derive(Debug, Clone)]
enum Op {
    Press(usize, usize),
    Release(usize, usize),
    Advance(u64),
    StoreRtt(usize, u64),
    StoreDown(usize, bool),
    StoreHangs(usize, bool),
    ShardDelay(usize, u64),
    ShardFull(usize, u32),
    LosePublish(u32),
    PublishDelay(u64),
}

fn op(nodes: usize) -> impl Strategy<Value = Op> {
    let n = 0..nodes;
    prop_oneof![
        4 => (n.clone(), 0..MEMBERS_PER_NODE).prop_map(|(a, b)| Op::Press(a, b)),
        3 => (n.clone(), 0..MEMBERS_PER_NODE).prop_map(|(a, b)| Op::Release(a, b)),
        6 => (0..1500u64).prop_map(Op::Advance),
        1 => (n.clone(), 0..400u64).prop_map(|(a, b)| Op::StoreRtt(a, b)),
        1 => (n.clone(), any::<bool>()).prop_map(|(a, b)| Op::StoreDown(a, b)),
        1 => (n.clone(), any::<bool>()).prop_map(|(a, b)| Op::StoreHangs(a, b)),
        1 => (n.clone(), 0..300u64).prop_map(|(a, b)| Op::ShardDelay(a, b)),
        1 => (n, 0..4u32).prop_map(|(a, b)| Op::ShardFull(a, b)),
        1 => (0..3u32).prop_map(Op::LosePublish),
        1 => (0..500u64).prop_map(Op::PublishDelay),
    ]
}

impl Model {
    fn new(nodes: usize) -> Model {
        let t0 = Instant::now();
        let mut m = Model {
            t0,
            now: t0,
            nodes: Vec::new(),
            store: ModelStore::default(),
            queue: Vec::new(),
            seq: 0,
            lose_next_publish: 0,
            publish_delay: Duration::from_millis(1),
        };
        for i in 0..nodes {
            let core = HubCore::new(config(&format!("n{i}"), true), t0);
            m.nodes.push(Node {
                core,
                shard: Channel::new(CHANNEL.into(), t0),
                members: Vec::new(),
                weather: Weather {
                    store_rtt: Duration::from_millis(2),
                    store_down: false,
                    store_hangs: false,
                    shard_delay: Duration::ZERO,
                    shard_full: 0,
                },
                command_tail: t0,
                event_tail: t0,
            });
            m.input(i, Input::StoreEvent(StoreEvent::Resync));
            for k in 0..MEMBERS_PER_NODE {
                let conn = (k + 1) as u64;
                m.input(
                    i,
                    Input::Connect {
                        conn,
                        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    },
                );
                let frame = json!({"type":"join","channel":CHANNEL,"member":format!("n{i}m{k}"),
                    "transport":"rtp","rtp_addr":format!("127.0.0.1:{}", 5000 + conn)});
                let frame = protocol::parse(&frame.to_string());
                m.input(i, Input::Frame { conn, frame });
            }
        }
        m.settle(Duration::from_millis(100)).expect("joins settle");
        for node in &m.nodes {
            assert_eq!(node.members.len(), MEMBERS_PER_NODE, "everyone joined");
        }
        m
    }

    fn schedule(&mut self, after: Duration, p: Pending) {
        self.seq += 1;
        self.queue.push((self.now + after, self.seq, p));
    }

    fn input(&mut self, node: usize, input: Input) {
        let now = self.now;
        self.nodes[node].core.handle(input, now);
        self.drain(node);
    }

    /// Performs what node `node`'s core asked for.
    fn drain(&mut self, node: usize) {
        while let Some(out) = self.nodes[node].core.poll_output() {
            let w = self.nodes[node].weather;
            match out {
                // Every published event reaches every node here, watched or not.
                Output::Send { .. } | Output::Close { .. } | Output::Watch { .. } => {}
                Output::Store { id, call, .. } => {
                    let back = (!w.store_hangs).then_some(w.store_rtt / 2);
                    self.schedule(
                        w.store_rtt / 2,
                        Pending::Call {
                            node,
                            id,
                            call,
                            back,
                        },
                    );
                }
                Output::Shard { shard: _, command } => {
                    if self.nodes[node].weather.shard_full > 0 {
                        self.nodes[node].weather.shard_full -= 1;
                        let now = self.now;
                        self.nodes[node]
                            .core
                            .handle(Input::ShardFull { shard: 0, command }, now);
                    } else {
                        let after =
                            fifo(&mut self.nodes[node].command_tail, self.now, w.shard_delay);
                        self.schedule(after, Pending::Command { node, command });
                    }
                }
            }
        }
    }

    /// One shard command, as a shard handles it.
    fn shard(&mut self, node: usize, command: Command) {
        let now = self.now;
        let n = &mut self.nodes[node];
        let event = match command {
            Command::AddMember {
                key,
                name,
                addr,
                ssrc,
                ..
            } => {
                n.shard.add(Member::new(
                    key,
                    name,
                    addr,
                    OutStream::new(ssrc, 111, 0, 0),
                ));
                n.shard.heard(key, now);
                n.members.push((n.members.len() as u64 + 1, key));
                Some(Event::MemberAdded { key })
            }
            Command::Speaker { channel, change } => {
                let lease = matches!(change, SpeakerChange::Lease { .. });
                let idle = matches!(change, SpeakerChange::Idle { .. });
                let epoch = change.epoch();
                let applied = n.shard.apply(change, now);
                (!lease).then_some(Event::Applied {
                    channel,
                    epoch,
                    applied,
                    idle,
                })
            }
            _ => None,
        };
        if let Some(event) = event {
            let delay = self.nodes[node].weather.shard_delay;
            let after = fifo(&mut self.nodes[node].event_tail, self.now, delay);
            self.schedule(after, Pending::Event { node, event });
        }
    }

    fn deliver(&mut self, p: Pending) {
        match p {
            Pending::Call {
                node,
                id,
                call,
                back,
            } => {
                let w = self.nodes[node].weather;
                let name = format!("n{node}");
                let reply = if w.store_down {
                    super::failure(&call)
                } else {
                    self.store.answer(&call, &name, self.now, self.t0)
                };
                for event in std::mem::take(&mut self.store.published) {
                    if self.lose_next_publish > 0 {
                        self.lose_next_publish -= 1;
                        continue;
                    }
                    for target in 0..self.nodes.len() {
                        let event = event.clone();
                        let delay = self.publish_delay;
                        self.schedule(
                            delay,
                            Pending::Publish {
                                node: target,
                                event,
                            },
                        );
                    }
                }
                if let Some(back) = back {
                    self.schedule(back, Pending::Answer { node, id, reply });
                }
            }
            Pending::Answer { node, id, reply } => self.input(node, Input::Store { id, reply }),
            Pending::Publish { node, event } => self.input(node, Input::StoreEvent(event)),
            Pending::Command { node, command } => self.shard(node, command),
            Pending::Event { node, event } => self.input(node, Input::Shard(event)),
        }
    }

    /// Moves virtual time forward by `d`, delivering what comes due and waking the cores at their
    /// deadlines, checking the invariants at every step.
    fn settle(&mut self, d: Duration) -> Result<(), TestCaseError> {
        let end = self.now + d;
        loop {
            let next_item =
                (0..self.queue.len()).min_by_key(|&i| (self.queue[i].0, self.queue[i].1));
            let next_timer = self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| n.core.poll_timeout().map(|t| (t, i)))
                .min();
            let item_at = next_item.map(|i| self.queue[i].0);
            match (item_at, next_timer) {
                (Some(at), timer) if at <= end && timer.is_none_or(|(t, _)| at <= t) => {
                    self.now = self.now.max(at);
                    let (_, _, p) = self.queue.remove(next_item.unwrap_or_default());
                    self.deliver(p);
                }
                (_, Some((at, node))) if at <= end => {
                    self.now = self.now.max(at);
                    let now = self.now;
                    self.nodes[node].core.handle_timeout(now);
                    self.drain(node);
                }
                _ => break,
            }
            self.check()?;
        }
        self.now = end;
        self.check()
    }

    /// The invariants, at `now`.
    fn check(&mut self) -> Result<(), TestCaseError> {
        let now = self.now;
        let mut forwarded = Vec::new();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            for &(_, key) in &n.members {
                let p = rtp::build_packet(false, 111, 1, 960, 7, b"x");
                let view = RtpView::parse(&p).map_err(|e| TestCaseError::fail(e.to_string()))?;
                if n.shard.speaker() == Some(key)
                    && n.shard
                        .forward(key, &view, now, &mut Batch::default())
                        .is_ok()
                {
                    forwarded.push((i, key, n.shard.epoch()));
                }
            }
        }
        prop_assert!(
            forwarded.len() <= 1,
            "two speakers forwarded at once at {:?}: {forwarded:?}",
            now - self.t0
        );
        if let Some((node, _, epoch)) = forwarded.first() {
            let lock = self.store.locks.get(CHANNEL);
            prop_assert!(
                lock.is_some_and(|(h, exp)| h.epoch == *epoch && *exp > now),
                "node {node} forwards epoch {epoch} at {:?} but the store has {lock:?}",
                now - self.t0
            );
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let ms = Duration::from_millis;
        match *op {
            Op::Press(node, member) | Op::Release(node, member) => {
                let conn = (member + 1) as u64;
                let action = if matches!(op, Op::Press(..)) {
                    "press"
                } else {
                    "release"
                };
                let frame = json!({"type":"ptt","channel":CHANNEL,"action":action});
                let frame = protocol::parse(&frame.to_string());
                self.input(node, Input::Frame { conn, frame });
            }
            Op::Advance(d) => self.settle(ms(d))?,
            Op::StoreRtt(node, d) => self.nodes[node].weather.store_rtt = ms(d),
            Op::StoreDown(node, on) => self.nodes[node].weather.store_down = on,
            Op::StoreHangs(node, on) => self.nodes[node].weather.store_hangs = on,
            Op::ShardDelay(node, d) => self.nodes[node].weather.shard_delay = ms(d),
            Op::ShardFull(node, n) => self.nodes[node].weather.shard_full = n,
            Op::LosePublish(n) => self.lose_next_publish = n,
            Op::PublishDelay(d) => self.publish_delay = ms(d),
        }
        self.check()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Never two speakers, and nothing forwarded past its lease, whatever the store, pub/sub and the
    /// shard queues do.
    #[test]
    fn never_two_speakers_across_nodes(nodes in 2..=3usize, ops in proptest::collection::vec(op(3), 1..120)) {
        let mut m = Model::new(nodes);
        for op in &ops {
            let op = match op.clone() {
                // Operations on a node index this run does not have go to the last node.
                Op::Press(n, k) => Op::Press(n.min(nodes - 1), k),
                Op::Release(n, k) => Op::Release(n.min(nodes - 1), k),
                Op::StoreRtt(n, d) => Op::StoreRtt(n.min(nodes - 1), d),
                Op::StoreDown(n, b) => Op::StoreDown(n.min(nodes - 1), b),
                Op::StoreHangs(n, b) => Op::StoreHangs(n.min(nodes - 1), b),
                Op::ShardDelay(n, d) => Op::ShardDelay(n.min(nodes - 1), d),
                Op::ShardFull(n, k) => Op::ShardFull(n.min(nodes - 1), k),
                other => other,
            };
            m.apply(&op)?;
        }
        // Everything calms down: the floor ends up free or held by one, and the invariants still hold.
        for n in &mut m.nodes {
            n.weather = Weather {
                store_rtt: Duration::from_millis(2),
                store_down: false,
                store_hangs: false,
                shard_delay: Duration::ZERO,
                shard_full: 0,
            };
        }
        m.settle(Duration::from_secs(40))?;
    }
}
