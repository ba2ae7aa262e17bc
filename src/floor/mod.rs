//! The floor of one channel: who may speak, as a sans-IO state machine after 3GPP TS 24.380 (MCPTT floor
//! control), in the shape of str0m's `Rtc`: feed an [`Input`] with the time, then drain [`Output`]s.
//!
//! The machine never decides an epoch or talks to a store itself. It asks for the lock
//! ([`Output::Acquire`]) and waits for the store's answer, then asks the channel's shard to forward the new
//! speaker ([`Output::Apply`]) and sends `granted` only once the shard has acknowledged — so the first word
//! is never clipped. Timers (T1 silence is detected by the shard, T2 maximum talk time, T3 pre-emption
//! grace, lease renewal) are run by [`Floor::handle_timeout`] at the instant [`Floor::poll_timeout`] names,
//! so an idle floor costs nothing and a busy one is woken only when something is due.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Timer settings, per protocol v1 (`hello.timers`).
#[derive(Debug, Clone, Copy)]
pub struct FloorConfig {
    /// T1: release after this long without media from the holder (detected by the shard).
    pub t1: Duration,
    /// T2: maximum talk time.
    pub t2: Duration,
    /// T3: how long a pre-empted holder stays forwarded.
    pub t3: Duration,
    /// Lease of the store's lock, renewed while held; `None` for the embedded store, whose lock cannot be
    /// lost.
    pub lease: Option<Lease>,
}

/// Lease timing for a store whose lock expires (Redis).
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    /// How long the store keeps the lock without a renewal.
    pub ttl: Duration,
    /// How often the holder renews the lease.
    pub renew_every: Duration,
    /// The holder is revoked this long before the lease would run out, so it stops before anyone else can
    /// be granted.
    pub margin: Duration,
}

impl Lease {
    /// The last instant a holder whose lease was last confirmed at `from` may be forwarded: the TTL less
    /// the margin (which covers the clock drift between this node and the store), counted from when the
    /// request was *sent* — the store's TTL started later, so this end is never after the store's.
    pub fn end(&self, from: Instant) -> Instant {
        (from + self.ttl).checked_sub(self.margin).unwrap_or(from)
    }
}

/// A press's rank: its priority (0..=255), or [`EMERGENCY`] above all of them.
type Rank = u16;
/// The rank of an emergency press: it outranks every priority.
const EMERGENCY: Rank = 256;

/// Epochs stay below 2^53 (exact in JSON numbers and Lua doubles; the grant script refuses beyond). An
/// epoch at or above it in an event or a relay packet is not one any store granted: it is ignored, so a
/// forged or corrupted event cannot push a channel's epoch out of reach of every real grant.
pub const MAX_EPOCH: u64 = 1 << 53;

/// How long a grant waits for the shard's acknowledgement before it is given up (the member is denied
/// `unavailable` and the lock released): a shard that does not answer must not leave the floor busy.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(1);

impl Default for FloorConfig {
    fn default() -> Self {
        FloorConfig {
            t1: Duration::from_secs(4),
            t2: Duration::from_secs(30),
            t3: Duration::ZERO,
            lease: None,
        }
    }
}

/// Why a press was denied (protocol v1 `denied.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// `busy`: another member holds the floor.
    Busy,
    /// `unavailable`: the floor store cannot be reached, or the shard did not take the grant in time.
    Unavailable,
    /// `not_joined`: the presser is not a member of the channel.
    NotJoined,
    /// `listen_only`: the member may only listen (a `recvonly` offer, or a token without the `talk` right).
    ListenOnly,
    /// `rate_limited`: too many presses per second.
    RateLimited,
}

impl DenyReason {
    /// The reason as written on the wire (`denied.reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Busy => "busy",
            DenyReason::Unavailable => "unavailable",
            DenyReason::NotJoined => "not_joined",
            DenyReason::ListenOnly => "listen_only",
            DenyReason::RateLimited => "rate_limited",
        }
    }
}

/// Why a holder lost the floor (protocol v1 `revoked.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    /// `max_talk_time`: T2 ran out.
    MaxTalkTime,
    /// `preempted`: a higher-priority or emergency press took the floor.
    Preempted,
    /// `silence`: no media from the holder for T1.
    Silence,
    /// `lease_lost`: the lock was lost, or its lease was about to run out without a renewal.
    LeaseLost,
    /// `left`: the holder left the channel.
    Left,
}

impl RevokeReason {
    /// The reason as written on the wire (`revoked.reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::MaxTalkTime => "max_talk_time",
            RevokeReason::Preempted => "preempted",
            RevokeReason::Silence => "silence",
            RevokeReason::LeaseLost => "lease_lost",
            RevokeReason::Left => "left",
        }
    }
}

/// A floor event for clients (protocol v1 `{"type":"floor", …}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FloorEvent {
    /// The requester now holds the floor (sent to the requester).
    Granted {
        /// The new holder.
        speaker: String,
        /// The grant's epoch.
        epoch: u64,
        /// The maximum talk time (T2), in milliseconds.
        duration_ms: u64,
    },
    /// Someone else now holds the floor (sent to every other member).
    Taken {
        /// The new holder.
        speaker: String,
        /// The grant's epoch.
        epoch: u64,
    },
    /// A press was refused (sent to the presser).
    Denied {
        /// Who holds the floor, when known.
        speaker: Option<String>,
        /// Why.
        reason: DenyReason,
    },
    /// The press waits in line (sent to the waiting member, again on every change of its position).
    Queued {
        /// Its place, counted from 1; 0 when it is about to pre-empt the holder.
        position: usize,
    },
    /// The floor is free again (sent to all members).
    Idle {
        /// The epoch of the burst that ended.
        epoch: u64,
    },
    /// The holder lost the floor (sent to the holder only).
    Revoked {
        /// The holder that lost it.
        speaker: String,
        /// Its grant's epoch.
        epoch: u64,
        /// Why.
        reason: RevokeReason,
        /// How long it stays forwarded: T3 when pre-empted, else 0.
        grace_ms: u64,
    },
}

/// Who an event is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    /// Only this member.
    Member(String),
    /// Every member of the channel except this one.
    AllExcept(String),
    /// Every member of the channel.
    All,
}

/// Inputs. Store answers carry the member they answer for, so a late answer for an abandoned request is
/// recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A press. `queue`: wait in the queue when busy instead of being denied.
    Request {
        /// Who pressed.
        member: String,
        /// The press's priority (0..=255); only a strictly higher one pre-empts.
        priority: u8,
        /// Wait in the queue when busy instead of being denied.
        queue: bool,
    },
    /// A release: by the holder, a queued member (withdraws) or a pending requester (cancels).
    Release {
        /// Who released.
        member: String,
    },
    /// The member left the channel.
    Leave {
        /// Who left.
        member: String,
    },
    /// The store granted the lock asked for on behalf of `member`, at a new `epoch`.
    StoreGranted {
        /// Who the lock was asked for.
        member: String,
        /// The new epoch.
        epoch: u64,
    },
    /// The store refused: `holder` is who holds it and since which epoch (`Busy`), or the store failed
    /// (`Unavailable`).
    StoreDenied {
        /// Who the lock was asked for.
        member: String,
        /// The current holder and its epoch, when known.
        holder: Option<(String, u64)>,
        /// `Busy` or `Unavailable`.
        reason: DenyReason,
    },
    /// The store has released (or failed to release; the lease then runs out on its own).
    StoreReleased {
        /// The epoch whose lock was released.
        epoch: u64,
    },
    /// The answer to the renewal sent at `sent_at`.
    Renewed {
        /// The epoch whose lease the renewal was for.
        epoch: u64,
        /// When the renewal was sent (a successful one extends the lease from then).
        sent_at: Instant,
        /// How it went.
        outcome: Renewal,
    },
    /// The shard forwards the speaker of `epoch` now.
    ShardApplied {
        /// The epoch the shard now forwards.
        epoch: u64,
    },
    /// The shard no longer forwards the holder of `epoch` (it took the idle).
    ShardIdle {
        /// The epoch whose holder the shard stopped forwarding.
        epoch: u64,
    },
    /// The shard saw no media from the holder of `epoch` for T1.
    MediaSilence {
        /// The epoch of the silent holder.
        epoch: u64,
    },
    /// Another node's member holds the floor at `epoch` (`Some`), or it was released (`None`);
    /// `emergency`: the grant is an emergency burst (it pre-empted whoever held).
    Remote {
        /// The remote holder, or `None` when the floor was released.
        speaker: Option<String>,
        /// The epoch of that grant or release.
        epoch: u64,
        /// Whether the grant is an emergency burst.
        emergency: bool,
    },
    /// An emergency press (protocol v1.1): pre-empts any holder at once, whatever its priority, with no
    /// T3 grace; while an emergency burst holds, it is queued first in line.
    Emergency {
        /// Who pressed.
        member: String,
    },
    /// Run the timers due at `now` (same as [`Floor::handle_timeout`]).
    Tick,
}

/// How a lease renewal went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The lease was extended from the renewal's send time.
    Renewed,
    /// The lock is no longer ours (it expired and someone else took it).
    Lost,
    /// The store did not answer; the lease runs out at its own time unless a later renewal succeeds.
    Failed,
}

/// Outputs, drained with [`Floor::poll_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Ask the store for the lock on behalf of `member` (`emergency`: take it from any holder that is
    /// not itself in an emergency burst).
    Acquire {
        /// Who the lock is for.
        member: String,
        /// The press's priority.
        priority: u8,
        /// Whether this is an emergency press.
        emergency: bool,
    },
    /// Renew the lease of `epoch`.
    Renew {
        /// The epoch whose lease to renew.
        epoch: u64,
    },
    /// Release the lock of `epoch` in the store.
    Release {
        /// The epoch whose lock to release.
        epoch: u64,
    },
    /// Tell the shard who to forward: the local member `speaker` of `epoch` (`None`: nobody), and for a
    /// store with leases, no later than `until` — the shard stops forwarding it then on its own, so a
    /// holder whose lease runs out is fenced even if this machine's revocation is late or lost.
    Apply {
        /// The local member to forward, or `None` for nobody.
        speaker: Option<String>,
        /// The epoch of the grant, or of the burst being ended when `speaker` is `None`.
        epoch: u64,
        /// With a lease: the shard stops forwarding then unless extended; `None` without a lease.
        until: Option<Instant>,
    },
    /// A renewal succeeded: the shard may forward the holder of `epoch` until `until`.
    Extend {
        /// The epoch of the held grant.
        epoch: u64,
        /// The new instant up to which the holder may be forwarded.
        until: Instant,
    },
    /// Tell the shard that a member of another node holds `epoch`: forward its relayed media, and no
    /// local member — even one with the same name.
    ApplyRemote {
        /// The remote grant's epoch.
        epoch: u64,
    },
    /// Send a floor event to clients.
    Notify {
        /// Who to send it to.
        to: To,
        /// The event.
        event: FloorEvent,
    },
    /// A local member's talk burst ended (for the transmission log): granted at `started`, ended now for
    /// `reason` (`released`, or the revoke reason).
    BurstEnded {
        /// The member who spoke.
        member: String,
        /// The burst's epoch.
        epoch: u64,
        /// When the burst began (the grant took effect).
        started: Instant,
        /// `released`, or the revoke reason's wire name.
        reason: &'static str,
        /// Whether it was an emergency burst.
        emergency: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Idle,
    /// Waiting for the store. `cancelled`: released meanwhile; give the lock back when it comes.
    /// `asked_at`: when the lock was asked for — its lease is counted from then.
    Acquiring {
        member: String,
        priority: Rank,
        cancelled: bool,
        asked_at: Instant,
    },
    /// Store granted; waiting for the shard to forward, at most until `deadline`.
    Applying {
        member: String,
        priority: Rank,
        epoch: u64,
        asked_at: Instant,
        deadline: Instant,
    },
    Held(Held),
    /// The lock is being given back; then the queue's head is granted, or idle announced. With a lease,
    /// the lock is given back only once the shard has stopped forwarding the holder (`shard_stops_by`:
    /// its acknowledgement, or the lease's end, when the shard's own fence stops it): a lock freed while
    /// the shard still forwards could be granted to another node's member — two speakers.
    Releasing {
        epoch: u64,
        shard_stops_by: Option<Instant>,
    },
    /// Held by a member of another node (`priority` is [`EMERGENCY`] for an emergency burst, else 0:
    /// a remote holder's priority is not known).
    Remote {
        speaker: String,
        epoch: u64,
        priority: Rank,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    member: String,
    priority: Rank,
    epoch: u64,
    /// When the burst began (the shard forwards from then).
    started: Instant,
    t2_at: Instant,
    /// Pre-empted: forwarded until this instant (T3), then revoked.
    preempt_at: Option<Instant>,
    /// Lease bookkeeping: the send time of the last successful renewal, and when to renew next.
    renewed_at: Instant,
    renew_at: Instant,
    renew_in_flight: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Queued {
    member: String,
    priority: Rank,
    /// Last position told to the member, to send `queued` only on a change.
    told: usize,
}

/// One channel's floor.
#[derive(Debug)]
pub struct Floor {
    config: FloorConfig,
    state: State,
    queue: Vec<Queued>,
    /// Presses (without `queue`) made while the floor was changing hands (being released, or a cancelled
    /// acquisition finishing): nobody asked to wait, so they are not queued; when the change completes one
    /// of them is granted (if the floor is then free) and the others are denied `busy`.
    racing: Vec<Queued>,
    /// The newest epoch this floor has seen (its own grants and remote ones).
    epoch: u64,
    /// The epoch of the latest emergency burst: every event of that burst is flagged.
    emergency: Option<u64>,
    out: VecDeque<Output>,
}

impl Floor {
    /// An idle floor at epoch 0 with `config`.
    pub fn new(config: FloorConfig) -> Self {
        Floor {
            config,
            state: State::Idle,
            queue: Vec::new(),
            racing: Vec::new(),
            epoch: 0,
            emergency: None,
            out: VecDeque::new(),
        }
    }

    /// The newest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Who is forwarded now (local or remote), if anyone.
    pub fn speaker(&self) -> Option<&str> {
        match &self.state {
            State::Held(h) => Some(&h.member),
            State::Remote { speaker, .. } => Some(speaker),
            _ => None,
        }
    }

    /// The holder when it is a member of another node, with its epoch.
    pub fn remote(&self) -> Option<(&str, u64)> {
        match &self.state {
            State::Remote { speaker, epoch, .. } => Some((speaker, *epoch)),
            _ => None,
        }
    }

    /// Whether the burst of `epoch` is an emergency (its events are flagged `"emergency": true`).
    pub fn is_emergency(&self, epoch: u64) -> bool {
        self.emergency == Some(epoch)
    }

    /// Whether this machine knows the grant of `epoch` as its own: asked for (the store's answer is
    /// awaited), being applied, held, or being released. A lock of this node in the store that the
    /// machine does not own is an orphan — a grant whose answer was lost — and is given back.
    pub fn owns(&self, epoch: u64) -> bool {
        match &self.state {
            State::Acquiring { .. } => true,
            State::Applying { epoch: e, .. } | State::Releasing { epoch: e, .. } => *e == epoch,
            State::Held(h) => h.epoch == epoch,
            _ => false,
        }
    }

    /// True when nothing is pending, held or queued: the channel needs no ticks.
    pub fn is_quiet(&self) -> bool {
        matches!(self.state, State::Idle | State::Remote { .. })
            && self.queue.is_empty()
            && self.racing.is_empty()
    }

    /// The next output to act on.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When the machine next needs [`Floor::handle_timeout`]: the earliest of T2, the end of a T3 grace,
    /// the next lease renewal and the instant the holder must be revoked because its lease is about to
    /// run out. `None` while nobody local holds the floor: nothing is then due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let h = match &self.state {
            State::Held(h) => h,
            State::Applying { deadline, .. } => return Some(*deadline),
            State::Releasing {
                shard_stops_by: Some(at),
                ..
            } => return Some(*at),
            _ => return None,
        };
        let mut at = h.t2_at;
        if let Some(preempt) = h.preempt_at {
            at = at.min(preempt);
        }
        if let Some(lease) = self.config.lease {
            at = at.min(lease.end(h.renewed_at));
            if !h.renew_in_flight {
                at = at.min(h.renew_at);
            }
        }
        Some(at)
    }

    /// Runs whatever timer is due at `now` (see [`Floor::poll_timeout`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.on_tick(now);
    }

    /// Feeds one input at `now`.
    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Request {
                member,
                priority,
                queue,
            } => self.on_request(member, Rank::from(priority), queue, now),
            Input::Emergency { member } => self.on_request(member, EMERGENCY, true, now),
            Input::Release { member } => self.on_release(&member, None),
            Input::Leave { member } => self.on_release(&member, Some(RevokeReason::Left)),
            Input::StoreGranted { member, epoch } => self.on_store_granted(member, epoch, now),
            Input::StoreDenied {
                member,
                holder,
                reason,
            } => self.on_store_denied(member, holder, reason, now),
            Input::StoreReleased { epoch } => self.on_store_released(epoch, now),
            Input::Renewed {
                epoch,
                sent_at,
                outcome,
            } => self.on_renewed(epoch, sent_at, outcome),
            Input::ShardApplied { epoch } => self.on_applied(epoch, now),
            Input::ShardIdle { epoch } => self.on_shard_idle(epoch),
            Input::MediaSilence { epoch } => {
                if matches!(&self.state, State::Held(h) if h.epoch == epoch) {
                    self.revoke(RevokeReason::Silence);
                }
            }
            Input::Remote {
                speaker,
                epoch,
                emergency,
            } => self.on_remote(speaker, epoch, emergency, now),
            Input::Tick => self.on_tick(now),
        }
    }
}

mod machine;

#[cfg(test)]
mod tests;
