//! The thin tokio runner of [`HubCore`]: the only control-plane code that touches sockets, stores and the
//! clock. It feeds the core what arrives (WebSocket frames, shard events, store answers and published
//! events, timer expiries) with `Instant::now()`, and performs what the core asks: frames into each
//! connection's bounded queue, store calls as tasks of their own (so one slow Redis reply delays nobody),
//! and commands into the shards' bounded queues with `try_send`. What cannot be done (a client's queue is
//! full, a shard's queue is full) goes back into the core as an input, so the decision stays there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::calls::{CallId, StoreCall, StoreReply};
use super::{ChannelInfo, Health, HubCore, Input, Output};
use crate::ids::ConnId;
use crate::metrics::{self, ControlCounters};
use crate::shard::{Event, ShardHandle};
use crate::signal::protocol::{Frame, SignalError};
use crate::state::history::History;
use crate::state::{FloorStore, Registry, SessionStore, StoreEvent, Watcher};

/// How long after its deadline a store call may still answer: the core has already treated it as failed,
/// but a late grant must be seen to be given back.
const LATE_ANSWER: Duration = Duration::from_secs(5);
/// Longest wait for store calls at shutdown (floor releases, session leaves).
const SHUTDOWN_WAIT: Duration = Duration::from_millis(1500);
/// Longest wait at the end for the last frames (`goaway`, `left`) to reach the clients being closed.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// Messages to the runner from the WebSocket tasks and HTTP routes.
pub enum HubMsg {
    /// The node's load, sampled by [`super::load::sample_load`].
    Load {
        /// Media packets forwarded per second.
        pps: u64,
        /// Process CPU, per mille of one core.
        cpu_permille: u64,
    },
    /// A connection opened: where to queue its frames, and the handle whose drop closes it.
    Connect {
        /// The connection.
        conn: ConnId,
        /// The client's IP address.
        ip: std::net::IpAddr,
        /// Its outbound queue.
        out: Outbound,
        /// Dropped to close the connection (after the queued frames).
        close: oneshot::Sender<()>,
    },
    /// A text frame, parsed.
    Frame {
        /// The connection.
        conn: ConnId,
        /// The request, or what was wrong with it.
        frame: Result<Frame, (Option<serde_json::Value>, SignalError)>,
    },
    /// A frame over the size limit.
    TooLarge {
        /// The connection.
        conn: ConnId,
    },
    /// The connection closed.
    Disconnect {
        /// The connection.
        conn: ConnId,
        /// The client said goodbye (a WebSocket close); otherwise the connection dropped and its
        /// session may be resumed.
        clean: bool,
    },
    /// `/api/channels`.
    Channels {
        /// Where the rows go.
        reply: oneshot::Sender<Vec<ChannelInfo>>,
    },
    /// `/api/channels/{channel}/history`: read from the history store (any node answers for the cluster
    /// on Redis).
    History {
        /// The channel.
        channel: String,
        /// At most this many bursts.
        limit: usize,
        /// Only bursts with an epoch below this.
        before: Option<u64>,
        /// Where the bursts (or the store's error) go.
        reply: oneshot::Sender<Result<Vec<crate::state::history::Burst>, crate::state::StateError>>,
    },
    /// The admin API turns a channel's recording on or off.
    SetRecording {
        /// The channel.
        channel: String,
        /// Whether to record.
        on: bool,
    },
    /// `/metrics`.
    Counters {
        /// Where the counters go.
        reply: oneshot::Sender<ControlCounters>,
    },
    /// `/healthz`, `/readyz`.
    Health {
        /// Where the report goes.
        reply: oneshot::Sender<Health>,
    },
    /// Start draining (SIGTERM, `POST /admin/drain`); the runner stops the node when the drain is
    /// complete.
    Drain,
    /// A shard's thread died with a panic.
    ShardDied {
        /// The shard.
        shard: usize,
        /// The panic's message.
        reason: String,
    },
    /// Stop the node cleanly; `done` fires when it has.
    Shutdown {
        /// Fired once floors are released and members told.
        done: oneshot::Sender<()>,
    },
}

/// The sending side of a connection's outbound queue: frames, and the bytes queued and not yet written.
#[derive(Clone)]
pub struct Outbound {
    tx: mpsc::UnboundedSender<String>,
    #[allow(clippy::disallowed_types)]
    // control plane only: shared with this connection's writer task
    queued: Arc<AtomicUsize>,
}

impl Outbound {
    /// The queue `tx`, with `queued` counting the bytes sent into it and not yet written (the writer
    /// subtracts what it wrote).
    #[allow(clippy::disallowed_types)] // see the field
    pub fn new(tx: mpsc::UnboundedSender<String>, queued: Arc<AtomicUsize>) -> Self {
        Outbound { tx, queued }
    }

    /// Resolves once the connection's writer has ended (its last frames written, or given up).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Queues a frame unless that would put more than `limit` bytes in the queue: the bytes queued
    /// with it, or `None` when the client is not reading (or gone).
    pub fn try_send(&self, text: String, limit: usize) -> Option<usize> {
        let len = text.len();
        let before = self.queued.fetch_add(len, Ordering::Relaxed);
        if before + len > limit || self.tx.send(text).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return None;
        }
        Some(before + len)
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// The stores the runner performs calls on.
#[derive(Clone)]
pub struct Stores {
    /// Floor locks.
    pub floors: Arc<dyn FloorStore>,
    /// Membership and presence.
    pub sessions: Arc<dyn SessionStore>,
    /// Node liveness and channel registrations.
    pub registry: Arc<dyn Registry>,
    /// The transmission log.
    pub history: Arc<dyn History>,
    /// Which channels' events the store's subscriber follows (`None`: the store publishes nothing).
    pub watcher: Option<Watcher>,
}

struct ConnHandle {
    out: Outbound,
    /// Dropped to close the connection.
    _close: oneshot::Sender<()>,
}

/// The runner's I/O handles.
pub struct Runner {
    core: HubCore,
    stores: Stores,
    shards: Vec<ShardHandle>,
    conns: HashMap<ConnId, ConnHandle>,
    /// Bytes a client's queue may hold before it counts as not reading.
    queued_bytes: usize,
    replies_tx: mpsc::UnboundedSender<(CallId, StoreReply)>,
    replies: mpsc::UnboundedReceiver<(CallId, StoreReply)>,
    /// Connections closed while the node drains or stops: their last frames are waited for at the end.
    closing: Vec<Outbound>,
    /// The core was told to stop.
    stopping: bool,
    /// Bytes in a client's queue after each frame was queued (the queues are the runner's, so is this).
    ws_queue_depth: metrics::Buckets<8>,
}

impl Runner {
    /// A runner for `core`, performing store calls on `stores` and commands on `shards`.
    pub fn new(mut core: HubCore, stores: Stores, shards: Vec<ShardHandle>) -> Self {
        let (replies_tx, replies) = mpsc::unbounded_channel();
        set_wall_clock(&mut core);
        Runner {
            queued_bytes: core.config.limits.queued_bytes,
            core,
            stores,
            shards,
            conns: HashMap::new(),
            replies_tx,
            replies,
            closing: Vec::new(),
            stopping: false,
            ws_queue_depth: Default::default(),
        }
    }

    /// Runs until [`HubMsg::Shutdown`], or a drain is complete (or every sender of `inbox` is gone).
    pub async fn run(
        mut self,
        mut inbox: mpsc::Receiver<HubMsg>,
        shard_events: flume::Receiver<Event>,
        mut store_events: Option<mpsc::Receiver<StoreEvent>>,
    ) {
        let mut stopping: Option<(Instant, Option<oneshot::Sender<()>>)> = None;
        loop {
            self.perform_outputs();
            if stopping.is_none() && self.core.is_drained() {
                // Every client is gone: stop the usual way (floors, registry, shards).
                self.stopping = true;
                self.core.handle(Input::Shutdown, Instant::now());
                self.perform_outputs();
                stopping = Some((Instant::now() + SHUTDOWN_WAIT, None));
            }
            if let Some((until, _)) = &stopping {
                if self.core.calls_in_flight() == 0 || Instant::now() >= *until {
                    self.flush_closing().await;
                    if let Some((_, Some(done))) = stopping.take() {
                        let _ = done.send(());
                    }
                    return;
                }
            }
            let wake = self.core.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                msg = inbox.recv() => match msg {
                    Some(HubMsg::Shutdown { done }) => {
                        if stopping.is_none() {
                            self.stopping = true;
                            self.core.handle(Input::Shutdown, Instant::now());
                            stopping = Some((Instant::now() + SHUTDOWN_WAIT, Some(done)));
                        } else if let Some((_, waiting)) = &mut stopping {
                            // Already stopping (a drain completed): answer when that is done.
                            waiting.get_or_insert(done);
                        }
                    }
                    Some(msg) => self.on_msg(msg),
                    None => return,
                },
                Ok(event) = shard_events.recv_async() => {
                    self.core.handle(Input::Shard(event), Instant::now());
                }
                Some(event) = recv_store_event(&mut store_events) => {
                    self.core.handle(Input::StoreEvent(event), Instant::now());
                }
                Some((id, reply)) = self.replies.recv() => {
                    self.core.handle(Input::Store { id, reply }, Instant::now());
                }
                _ = sleep_until(wake) => {
                    set_wall_clock(&mut self.core);
                    self.core.handle_timeout(Instant::now());
                }
            }
        }
    }

    fn on_msg(&mut self, msg: HubMsg) {
        let now = Instant::now();
        match msg {
            HubMsg::Connect {
                conn,
                ip,
                out,
                close,
            } => {
                self.conns.insert(conn, ConnHandle { out, _close: close });
                self.core.handle(Input::Connect { conn, ip }, now);
            }
            HubMsg::Frame { conn, frame } => self.core.handle(Input::Frame { conn, frame }, now),
            HubMsg::Load { pps, cpu_permille } => {
                self.core.handle(Input::Load { pps, cpu_permille }, now)
            }
            HubMsg::TooLarge { conn } => self.core.handle(Input::TooLarge { conn }, now),
            HubMsg::Disconnect { conn, clean: true } => {
                self.core.handle(Input::Disconnect { conn }, now)
            }
            HubMsg::Disconnect { conn, clean: false } => {
                self.core.handle(Input::Dropped { conn }, now)
            }
            HubMsg::Channels { reply } => {
                let _ = reply.send(self.core.channels());
            }
            HubMsg::Counters { reply } => {
                let mut c = self.core.counters();
                c.ws_queue_depth = self.ws_queue_depth;
                for conn in self.conns.values() {
                    let q = conn.out.queued() as u64;
                    c.ws_queued_bytes += q;
                    c.ws_queued_max_bytes = c.ws_queued_max_bytes.max(q);
                }
                let _ = reply.send(c);
            }
            HubMsg::SetRecording { channel, on } => {
                self.core.handle(Input::SetRecording { channel, on }, now)
            }
            HubMsg::History {
                channel,
                limit,
                before,
                reply,
            } => {
                let history = self.stores.history.clone();
                tokio::spawn(async move {
                    let _ = reply.send(history.list(&channel, limit, before).await);
                });
            }
            HubMsg::Health { reply } => {
                let _ = reply.send(self.core.health());
            }
            HubMsg::Drain => self.core.handle(Input::Drain, now),
            HubMsg::ShardDied { shard, reason } => {
                self.core.handle(Input::ShardDied { shard, reason }, now)
            }
            HubMsg::Shutdown { .. } => {}
        }
    }

    /// Performs everything the core asked for; what fails goes back in as an input.
    fn perform_outputs(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Send { conn, text } => {
                    let Some(c) = self.conns.get(&conn) else {
                        continue;
                    };
                    match c.out.try_send(text, self.queued_bytes) {
                        Some(depth) => self
                            .ws_queue_depth
                            .observe(&metrics::WS_QUEUE_BYTES, depth as u64),
                        None => self.core.handle(Input::Unwritable { conn }, Instant::now()),
                    }
                }
                Output::Close { conn } => {
                    if let Some(c) = self.conns.remove(&conn) {
                        if self.core.is_draining() || self.stopping {
                            self.closing.push(c.out.clone());
                        }
                    }
                }
                Output::Store { id, call, deadline } => self.spawn_call(id, call, deadline),
                Output::Watch { channel, on } => {
                    if let Some(w) = &self.stores.watcher {
                        w.watch(&channel, on);
                    }
                }
                Output::Shard { shard, command } => {
                    let Some(handle) = self.shards.get(shard) else {
                        continue;
                    };
                    if let Err(flume::TrySendError::Full(command)) =
                        handle.commands.try_send(command)
                    {
                        self.core
                            .handle(Input::ShardFull { shard, command }, Instant::now());
                    }
                }
            }
        }
    }

    /// Waits (bounded) for the writers of the connections closed while draining or stopping, so their
    /// `goaway` and `left` reach the clients before the process ends.
    async fn flush_closing(&mut self) {
        let closing = std::mem::take(&mut self.closing);
        let all = futures_util::future::join_all(closing.iter().map(Outbound::closed));
        if tokio::time::timeout(FLUSH_WAIT, all).await.is_err() {
            debug!("some clients did not take their last frames in time");
        }
    }

    /// A store call as a task of its own; its answer comes back through `replies`.
    fn spawn_call(&self, id: CallId, call: StoreCall, deadline: Instant) {
        let stores = self.stores.clone();
        let tx = self.replies_tx.clone();
        let limit = tokio::time::Instant::from_std(deadline + LATE_ANSWER);
        tokio::spawn(async move {
            let what = call.name();
            match tokio::time::timeout_at(limit, perform(&stores, call)).await {
                Ok(reply) => {
                    let _ = tx.send((id, reply));
                }
                Err(_) => debug!(call = what, "store call abandoned"),
            }
        });
    }
}

/// Tells the core the wall-clock time (tokens carry Unix times).
fn set_wall_clock(core: &mut HubCore) {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    core.set_wall_clock(Instant::now(), unix);
}

/// Performs one store call.
pub async fn perform(stores: &Stores, call: StoreCall) -> StoreReply {
    match call {
        StoreCall::Acquire(req) => StoreReply::Acquired(stores.floors.acquire(req).await),
        StoreCall::Renew {
            channel,
            epoch,
            ttl,
        } => StoreReply::Flag(stores.floors.renew(&channel, epoch, ttl).await),
        StoreCall::Release { channel, epoch } => {
            StoreReply::Flag(stores.floors.release(&channel, epoch).await)
        }
        StoreCall::Holder { channel } => StoreReply::Holder(stores.floors.holder(&channel).await),
        StoreCall::Join {
            channel,
            member,
            node,
        } => {
            let reply = match stores.sessions.join(&channel, &member, &node).await {
                Ok(false) => Ok(None),
                // A failed join still lists who is there (the member joins without its claim).
                Ok(true) | Err(_) => stores.sessions.members(&channel).await.map(Some),
            };
            StoreReply::Joined(reply)
        }
        StoreCall::Leave {
            channel,
            member,
            node,
        } => StoreReply::Done(stores.sessions.leave(&channel, &member, &node).await),
        StoreCall::Refresh {
            channel,
            member,
            node,
        } => StoreReply::Done(stores.sessions.refresh(&channel, &member, &node).await),
        StoreCall::Announce { info, ttl } => {
            StoreReply::Done(stores.registry.announce(&info, ttl).await)
        }
        StoreCall::Withdraw { node } => StoreReply::Done(stores.registry.withdraw(&node).await),
        StoreCall::SetChannelNode {
            channel,
            node,
            present,
        } => StoreReply::Done(
            stores
                .registry
                .set_channel_node(&channel, &node, present)
                .await,
        ),
        StoreCall::ChannelNodes { channel } => {
            StoreReply::Nodes(stores.registry.channel_nodes(&channel).await)
        }
        StoreCall::Nodes => StoreReply::Table(stores.registry.nodes().await),
        StoreCall::Place {
            channel,
            candidate,
            usable,
            ttl,
        } => StoreReply::Home(
            stores
                .registry
                .place(&channel, &candidate, &usable, ttl)
                .await,
        ),
        StoreCall::Unplace { channel, node } => {
            StoreReply::Done(stores.registry.unplace(&channel, &node).await)
        }
        StoreCall::RecordBurst(burst) => StoreReply::Done(stores.history.record(&burst).await),
        StoreCall::EvictNode { channel, node } => {
            StoreReply::Evicted(stores.registry.evict_node(&channel, &node).await)
        }
        StoreCall::ClusterKey { key } => StoreReply::Key(stores.registry.cluster_key(&key).await),
    }
}

/// The next store event, or never when the store publishes nothing (the embedded one).
async fn recv_store_event(rx: &mut Option<mpsc::Receiver<StoreEvent>>) -> Option<StoreEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
