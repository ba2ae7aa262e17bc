//! Store calls as values: what the control core asks of the floor store, session store and registry, and
//! what comes back.
//!
//! The core never awaits a store. It emits an [`Output::Store`](super::Output::Store) with a [`CallId`] and
//! a deadline; the runner performs the call and feeds the answer back as
//! [`Input::Store`](super::Input::Store) with the same id. The core keeps each call's *purpose* (why it
//! was made: which channel, which member, when it was sent) in [`Calls`], so an answer is interpreted in
//! the context that asked for it. A call that has not been answered by its deadline is expired by the
//! core itself — in virtual time in tests — with the same effect as a store error: a press is denied
//! (fail safe), a renewal counts as failed. An answer that comes after that is a *late* answer; for a
//! grant, the only late answer that matters, the core gives the lock back by epoch.
//!
//! Some calls are retried (re-registration after the store came back, session heartbeats): the retry is
//! a timer in [`Calls`] too, so nothing sleeps.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use crate::ids::MemberKey;
use crate::state::{AcquireRequest, Acquired, Holder, NodeInfo, NodeTable, StateError};

/// Identifies one store call, to match its answer.
pub type CallId = u64;

/// A call to one of the stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreCall {
    /// Take a channel's floor lock ([`crate::state::FloorStore::acquire`]).
    Acquire(AcquireRequest),
    /// Extend the lease of `epoch`.
    Renew {
        /// The channel.
        channel: String,
        /// The holder's epoch (the lock's token).
        epoch: u64,
        /// New lease length.
        ttl: Duration,
    },
    /// Give the lock of `epoch` back.
    Release {
        /// The channel.
        channel: String,
        /// The holder's epoch.
        epoch: u64,
    },
    /// Read who holds the floor (resynchronisation).
    Holder {
        /// The channel.
        channel: String,
    },
    /// Record a member in the session store, then list everyone in the channel on every node.
    Join {
        /// The channel.
        channel: String,
        /// The member's name.
        member: String,
        /// This node.
        node: String,
    },
    /// Remove a member from the session store (publishes `leave`).
    Leave {
        /// The channel.
        channel: String,
        /// The member's name.
        member: String,
        /// This node.
        node: String,
    },
    /// Session heartbeat: the member is still there (re-adds it when missing).
    Refresh {
        /// The channel.
        channel: String,
        /// The member's name.
        member: String,
        /// This node.
        node: String,
    },
    /// Announce (or renew) this node's liveness with its relay addresses.
    Announce {
        /// This node and its relay address per shard.
        info: NodeInfo,
        /// Liveness TTL.
        ttl: Duration,
    },
    /// This node is going away: remove its liveness key now.
    Withdraw {
        /// This node.
        node: String,
    },
    /// This node serves `channel` (`present`) or no longer does.
    SetChannelNode {
        /// The channel.
        channel: String,
        /// This node.
        node: String,
        /// Whether the node has members in the channel.
        present: bool,
    },
    /// The ids of the nodes registered in `channel`.
    ChannelNodes {
        /// The channel.
        channel: String,
    },
    /// The node table (every live node, and the dead ones remembered).
    Nodes,
    /// Choose `channel`'s home node ([`crate::state::Registry::place`]).
    Place {
        /// The channel.
        channel: String,
        /// The node to place it on if its home is missing or not usable.
        candidate: String,
        /// The nodes that may stay its home.
        usable: Vec<String>,
        /// How long the home lives unless placed again.
        ttl: Duration,
    },
    /// Forget `channel`'s home if it is `node`.
    Unplace {
        /// The channel.
        channel: String,
        /// This node.
        node: String,
    },
    /// Append a finished talk burst to its channel's history.
    RecordBurst(Box<crate::state::history::Burst>),
    /// Remove a dead node's members from `channel` (publishes `leave` for each).
    EvictNode {
        /// The channel.
        channel: String,
        /// The dead node.
        node: String,
    },
    /// Put this node's relay key back if the store lost it (it came back empty); answers the stored one.
    ClusterKey {
        /// The key this node's shards use.
        key: String,
    },
}

impl StoreCall {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            StoreCall::Acquire(_) => "acquire",
            StoreCall::Renew { .. } => "renew",
            StoreCall::Release { .. } => "release",
            StoreCall::Holder { .. } => "holder",
            StoreCall::Join { .. } => "join",
            StoreCall::Leave { .. } => "leave",
            StoreCall::Refresh { .. } => "refresh",
            StoreCall::Announce { .. } => "announce",
            StoreCall::Withdraw { .. } => "withdraw",
            StoreCall::SetChannelNode { .. } => "set_channel_node",
            StoreCall::ChannelNodes { .. } => "channel_nodes",
            StoreCall::Nodes => "nodes",
            StoreCall::Place { .. } => "place",
            StoreCall::Unplace { .. } => "unplace",
            StoreCall::EvictNode { .. } => "evict_node",
            StoreCall::RecordBurst(_) => "record_burst",
            StoreCall::ClusterKey { .. } => "cluster_key",
        }
    }
}

/// The answer to a [`StoreCall`], one variant per result type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreReply {
    /// [`StoreCall::Acquire`].
    Acquired(Result<Acquired, StateError>),
    /// [`StoreCall::Renew`] and [`StoreCall::Release`]: whether the lock was still held at the epoch.
    Flag(Result<bool, StateError>),
    /// [`StoreCall::Holder`].
    Holder(Result<Option<Holder>, StateError>),
    /// [`StoreCall::Join`]: everyone in the channel, or `None` when the name is joined there from
    /// another node.
    Joined(Result<Option<Vec<String>>, StateError>),
    /// [`StoreCall::ChannelNodes`]: the ids registered in the channel.
    Nodes(Result<Vec<String>, StateError>),
    /// [`StoreCall::Nodes`]: the node table.
    Table(Result<NodeTable, StateError>),
    /// [`StoreCall::Place`]: the channel's home node.
    Home(Result<String, StateError>),
    /// [`StoreCall::EvictNode`]: the members removed.
    Evicted(Result<Vec<String>, StateError>),
    /// [`StoreCall::ClusterKey`]: the key in the store.
    Key(Result<String, StateError>),
    /// The calls that return nothing.
    Done(Result<(), StateError>),
}

impl StoreReply {
    /// Whether the call failed (an error, whatever its kind).
    pub fn is_err(&self) -> bool {
        match self {
            StoreReply::Acquired(r) => r.is_err(),
            StoreReply::Flag(r) => r.is_err(),
            StoreReply::Holder(r) => r.is_err(),
            StoreReply::Joined(r) => r.is_err(),
            StoreReply::Nodes(r) => r.is_err(),
            StoreReply::Table(r) => r.is_err(),
            StoreReply::Home(r) => r.is_err(),
            StoreReply::Evicted(r) => r.is_err(),
            StoreReply::Key(r) => r.is_err(),
            StoreReply::Done(r) => r.is_err(),
        }
    }
}

/// Why a call was made: what the core does with its answer (or its expiry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// A press: the answer goes to the channel's floor.
    Acquire {
        /// The channel.
        channel: String,
        /// The member the lock is asked for.
        member: String,
    },
    /// A lease renewal sent at `sent_at` (the lease is counted from then, not from the answer).
    Renew {
        /// The channel.
        channel: String,
        /// The epoch renewed.
        epoch: u64,
        /// When the renewal was sent.
        sent_at: Instant,
    },
    /// A release: the floor moves on when it is done (or failed: the lease then runs out).
    Release {
        /// The channel.
        channel: String,
        /// The epoch released.
        epoch: u64,
    },
    /// A resynchronisation read of the floor.
    Resync {
        /// The channel.
        channel: String,
    },
    /// A join waiting for the session store before `joined` is sent.
    Join {
        /// The channel.
        channel: String,
        /// The member.
        member: String,
        /// Its membership key (a newer join under the same name is a different membership).
        key: MemberKey,
    },
    /// The liveness announce; on success, register these channels (liveness must come first: a node
    /// registered in a channel without a liveness key counts as dead for the others).
    Announce {
        /// Channels to register once the node is known alive.
        then_register: Vec<String>,
        /// Retries of each registration.
        retries: u32,
    },
    /// The registry's view of a channel.
    Nodes {
        /// The channel.
        channel: String,
    },
    /// The node table.
    NodeTable,
    /// A join waiting for its channel's placement.
    Place {
        /// The connection.
        conn: crate::ids::ConnId,
        /// The join.
        join: Box<crate::signal::protocol::Join>,
        /// Its request id.
        id: Option<serde_json::Value>,
    },
    /// The relay key put back after the store came back: the answer says whether it is still ours.
    ClusterKey,
    /// Nothing depends on the answer.
    None,
}

struct Pending {
    purpose: Purpose,
    call: StoreCall,
    deadline: Instant,
    /// Attempts left after this one when the call fails (0: no retry).
    retries: u32,
}

/// A call to send again after a failure.
struct Retry {
    call: StoreCall,
    purpose: Purpose,
    retries: u32,
}

/// What [`Calls::answer`] found.
#[derive(Debug)]
pub enum Answered {
    /// The answer to a pending call, with its purpose.
    Pending(Purpose, StoreReply),
    /// The answer to a call that had already expired (or was retried): only a grant matters.
    Late(Purpose, StoreReply),
    /// A failed call that will be sent again after [`RETRY_AFTER`].
    WillRetry,
    /// An id the core never issued or already forgot.
    Unknown,
}

/// Spacing of retries.
pub const RETRY_AFTER: Duration = Duration::from_millis(250);
/// How long an expired call's purpose is remembered for its late answer.
const LATE_MEMORY: Duration = Duration::from_secs(60);

/// The calls in flight, their deadlines, retries waiting for their time, and recently expired calls.
#[derive(Default)]
pub struct Calls {
    next_id: CallId,
    pending: HashMap<CallId, Pending>,
    /// (deadline, id), lazily cleaned: an entry whose call was answered is skipped.
    deadlines: BinaryHeap<Reverse<(Instant, CallId)>>,
    retries: Vec<(Instant, Retry)>,
    /// Expired calls by id, with when they expired, for late answers.
    expired: HashMap<CallId, (Instant, Purpose)>,
    /// Calls ready to leave, drained by the core into outputs.
    ready: Vec<(CallId, StoreCall, Instant)>,
}

impl Calls {
    /// Starts a call. `timeout` bounds how long the core waits for the answer.
    pub fn start(&mut self, call: StoreCall, purpose: Purpose, now: Instant, timeout: Duration) {
        self.start_with_retries(call, purpose, now, timeout, 0);
    }

    /// Starts a call that is sent again up to `retries` times, [`RETRY_AFTER`] apart, while it fails.
    pub fn start_with_retries(
        &mut self,
        call: StoreCall,
        purpose: Purpose,
        now: Instant,
        timeout: Duration,
        retries: u32,
    ) {
        self.next_id += 1;
        let id = self.next_id;
        let deadline = now + timeout;
        self.deadlines.push(Reverse((deadline, id)));
        self.ready.push((id, call.clone(), deadline));
        self.pending.insert(
            id,
            Pending {
                purpose,
                call,
                deadline,
                retries,
            },
        );
    }

    /// Calls to send now: (id, call, deadline).
    pub fn take_ready(&mut self) -> std::vec::Drain<'_, (CallId, StoreCall, Instant)> {
        self.ready.drain(..)
    }

    /// Number of calls waiting for an answer.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Matches an answer to its call. A failed call with retries left is scheduled again.
    pub fn answer(&mut self, id: CallId, reply: StoreReply, now: Instant) -> Answered {
        let answered = self.answer_inner(id, reply, now);
        self.prune();
        answered
    }

    /// Drops answered calls from the top of the deadline heap, so [`Calls::poll_timeout`] names a real
    /// deadline (the core is not woken for calls long answered).
    fn prune(&mut self) {
        while let Some(Reverse((at, id))) = self.deadlines.peek() {
            match self.pending.get(id) {
                Some(p) if p.deadline == *at => break,
                _ => {
                    self.deadlines.pop();
                }
            }
        }
    }

    fn answer_inner(&mut self, id: CallId, reply: StoreReply, now: Instant) -> Answered {
        if let Some(p) = self.pending.remove(&id) {
            if reply.is_err() && p.retries > 0 {
                self.retry(p, now);
                return Answered::WillRetry;
            }
            return Answered::Pending(p.purpose, reply);
        }
        match self.expired.remove(&id) {
            Some((_, purpose)) => Answered::Late(purpose, reply),
            None => Answered::Unknown,
        }
    }

    fn retry(&mut self, p: Pending, now: Instant) {
        let retry = Retry {
            call: p.call,
            purpose: p.purpose,
            retries: p.retries - 1,
        };
        self.retries.push((now + RETRY_AFTER, retry));
    }

    /// The earliest instant something is due: a call's deadline or a retry.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let deadline = self.deadlines.peek().map(|Reverse((at, _))| *at);
        let retry = self.retries.iter().map(|(at, _)| *at).min();
        match (deadline, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sends due retries again and expires calls past their deadline; returns the purposes of the
    /// expired calls that had no retry left (their effect is a failure).
    pub fn handle_timeout(&mut self, now: Instant, timeout: Duration) -> Vec<Purpose> {
        let due: Vec<Retry> = {
            let (due, later): (Vec<_>, Vec<_>) =
                self.retries.drain(..).partition(|(at, _)| *at <= now);
            self.retries = later;
            due.into_iter().map(|(_, r)| r).collect()
        };
        for r in due {
            self.start_with_retries(r.call, r.purpose, now, timeout, r.retries);
        }
        let mut failed = Vec::new();
        while let Some(Reverse((at, id))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(p) = self.pending.get(&id) else {
                continue; // answered already
            };
            if p.deadline != at {
                continue;
            }
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            self.expired.insert(id, (now, p.purpose.clone()));
            if p.retries > 0 {
                self.retry(p, now);
            } else {
                failed.push(p.purpose);
            }
        }
        self.expired
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < LATE_MEMORY);
        self.prune();
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leave() -> StoreCall {
        StoreCall::Leave {
            channel: "c".into(),
            member: "m".into(),
            node: "n".into(),
        }
    }

    #[test]
    fn a_call_answered_in_time_is_pending_and_one_past_its_deadline_is_late() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut calls = Calls::default();
        let timeout = Duration::from_millis(100);
        calls.start(leave(), Purpose::None, t0, timeout);
        calls.start(leave(), Purpose::None, t0, timeout);
        let ids: Vec<CallId> = calls.take_ready().map(|(id, _, _)| id).collect();
        assert_eq!(calls.poll_timeout(), Some(ms(100)));
        assert!(matches!(
            calls.answer(ids[0], StoreReply::Done(Ok(())), ms(50)),
            Answered::Pending(Purpose::None, _)
        ));
        assert!(calls.handle_timeout(ms(99), timeout).is_empty());
        assert_eq!(calls.handle_timeout(ms(100), timeout), vec![Purpose::None]);
        assert!(matches!(
            calls.answer(ids[1], StoreReply::Done(Ok(())), ms(120)),
            Answered::Late(Purpose::None, _)
        ));
        assert!(matches!(
            calls.answer(ids[1], StoreReply::Done(Ok(())), ms(130)),
            Answered::Unknown
        ));
        assert_eq!(calls.in_flight(), 0);
    }

    #[test]
    fn a_failed_call_is_sent_again_until_its_retries_run_out() {
        let t0 = Instant::now();
        let mut calls = Calls::default();
        let timeout = Duration::from_millis(100);
        calls.start_with_retries(leave(), Purpose::None, t0, timeout, 1);
        let (id, _, _) = calls.take_ready().next().unwrap();
        let err = StoreReply::Done(Err(StateError::Unavailable("down".into())));
        assert!(matches!(
            calls.answer(id, err.clone(), t0),
            Answered::WillRetry
        ));
        assert_eq!(calls.poll_timeout(), Some(t0 + RETRY_AFTER));
        calls.handle_timeout(t0 + RETRY_AFTER, timeout);
        let (id2, call, _) = calls.take_ready().next().unwrap();
        assert_ne!(id, id2);
        assert_eq!(call, leave());
        assert!(matches!(
            calls.answer(id2, err, t0 + RETRY_AFTER),
            Answered::Pending(Purpose::None, r) if r.is_err()
        ));
    }
}
