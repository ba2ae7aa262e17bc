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
    pub ttl: Duration,
    pub renew_every: Duration,
    /// The holder is revoked this long before the lease would run out, so it stops before anyone else can
    /// be granted.
    pub margin: Duration,
}

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
    Busy,
    Unavailable,
    NotJoined,
    ListenOnly,
    RateLimited,
}

impl DenyReason {
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
    MaxTalkTime,
    Preempted,
    Silence,
    LeaseLost,
    Left,
}

impl RevokeReason {
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
    Granted {
        speaker: String,
        epoch: u64,
        duration_ms: u64,
    },
    Taken {
        speaker: String,
        epoch: u64,
    },
    Denied {
        speaker: Option<String>,
        reason: DenyReason,
    },
    Queued {
        position: usize,
    },
    Idle {
        epoch: u64,
    },
    Revoked {
        speaker: String,
        epoch: u64,
        reason: RevokeReason,
        grace_ms: u64,
    },
}

/// Who an event is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    Member(String),
    AllExcept(String),
    All,
}

/// Inputs. Store answers carry the member they answer for, so a late answer for an abandoned request is
/// recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A press. `queue`: wait in the queue when busy instead of being denied.
    Request {
        member: String,
        priority: u8,
        queue: bool,
    },
    /// A release: by the holder, a queued member (withdraws) or a pending requester (cancels).
    Release {
        member: String,
    },
    /// The member left the channel.
    Leave {
        member: String,
    },
    StoreGranted {
        member: String,
        epoch: u64,
    },
    /// The store refused: `holder` is who holds it and since which epoch (`Busy`), or the store failed
    /// (`Unavailable`).
    StoreDenied {
        member: String,
        holder: Option<(String, u64)>,
        reason: DenyReason,
    },
    /// The store has released (or failed to release; the lease then runs out on its own).
    StoreReleased {
        epoch: u64,
    },
    /// The answer to the renewal sent at `sent_at`.
    Renewed {
        epoch: u64,
        sent_at: Instant,
        outcome: Renewal,
    },
    /// The shard forwards the speaker of `epoch` now.
    ShardApplied {
        epoch: u64,
    },
    /// The shard saw no media from the holder of `epoch` for T1.
    MediaSilence {
        epoch: u64,
    },
    /// Another node's member holds the floor at `epoch` (`Some`), or it was released (`None`).
    Remote {
        speaker: Option<String>,
        epoch: u64,
    },
    /// Run the timers due at `now` (same as [`Floor::handle_timeout`]).
    Tick,
}

/// How a lease renewal went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    /// The lock is no longer ours (it expired and someone else took it).
    Lost,
    /// The store did not answer; the lease runs out at its own time unless a later renewal succeeds.
    Failed,
}

/// Outputs, drained with [`Floor::poll_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Ask the store for the lock on behalf of `member`.
    Acquire {
        member: String,
        priority: u8,
    },
    /// Renew the lease of `epoch`.
    Renew {
        epoch: u64,
    },
    /// Release the lock of `epoch` in the store.
    Release {
        epoch: u64,
    },
    /// Tell the shard who to forward: the local member `speaker` of `epoch` (`None`: nobody).
    Apply {
        speaker: Option<String>,
        epoch: u64,
    },
    /// Tell the shard that a member of another node holds `epoch`: forward its relayed media, and no
    /// local member — even one with the same name.
    ApplyRemote {
        epoch: u64,
    },
    Notify {
        to: To,
        event: FloorEvent,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Idle,
    /// Waiting for the store. `cancelled`: released meanwhile; give the lock back when it comes.
    Acquiring {
        member: String,
        priority: u8,
        cancelled: bool,
    },
    /// Store granted; waiting for the shard to forward.
    Applying {
        member: String,
        priority: u8,
        epoch: u64,
    },
    Held(Held),
    /// The lock is being given back; then the queue's head is granted, or idle announced.
    Releasing {
        epoch: u64,
    },
    /// Held by a member of another node.
    Remote {
        speaker: String,
        epoch: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    member: String,
    priority: u8,
    epoch: u64,
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
    priority: u8,
    /// Last position told to the member, to send `queued` only on a change.
    told: usize,
}

/// One channel's floor.
#[derive(Debug)]
pub struct Floor {
    config: FloorConfig,
    state: State,
    queue: Vec<Queued>,
    /// The newest epoch this floor has seen (its own grants and remote ones).
    epoch: u64,
    out: VecDeque<Output>,
}

impl Floor {
    pub fn new(config: FloorConfig) -> Self {
        Floor {
            config,
            state: State::Idle,
            queue: Vec::new(),
            epoch: 0,
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
            State::Remote { speaker, epoch } => Some((speaker, *epoch)),
            _ => None,
        }
    }

    /// True when nothing is pending, held or queued: the channel needs no ticks.
    pub fn is_quiet(&self) -> bool {
        matches!(self.state, State::Idle | State::Remote { .. }) && self.queue.is_empty()
    }

    /// The next output to act on.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When the machine next needs [`Floor::handle_timeout`]: the earliest of T2, the end of a T3 grace,
    /// the next lease renewal and the instant the holder must be revoked because its lease is about to
    /// run out. `None` while nobody local holds the floor: nothing is then due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let State::Held(h) = &self.state else {
            return None;
        };
        let mut at = h.t2_at;
        if let Some(preempt) = h.preempt_at {
            at = at.min(preempt);
        }
        if let Some(lease) = self.config.lease {
            // `on_tick` revokes once `now + margin >= renewed_at + ttl`.
            let revoke = (h.renewed_at + lease.ttl)
                .checked_sub(lease.margin)
                .unwrap_or(h.renewed_at);
            at = at.min(revoke);
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
            } => self.on_request(member, priority, queue, now),
            Input::Release { member } => self.on_release(&member, None),
            Input::Leave { member } => self.on_release(&member, Some(RevokeReason::Left)),
            Input::StoreGranted { member, epoch } => self.on_store_granted(member, epoch),
            Input::StoreDenied {
                member,
                holder,
                reason,
            } => self.on_store_denied(member, holder, reason),
            Input::StoreReleased { epoch } => self.on_store_released(epoch),
            Input::Renewed {
                epoch,
                sent_at,
                outcome,
            } => self.on_renewed(epoch, sent_at, outcome),
            Input::ShardApplied { epoch } => self.on_applied(epoch, now),
            Input::MediaSilence { epoch } => {
                if matches!(&self.state, State::Held(h) if h.epoch == epoch) {
                    self.revoke(RevokeReason::Silence);
                }
            }
            Input::Remote { speaker, epoch } => self.on_remote(speaker, epoch),
            Input::Tick => self.on_tick(now),
        }
    }

    fn notify(&mut self, to: To, event: FloorEvent) {
        self.out.push_back(Output::Notify { to, event });
    }

    /// The member that holds or is about to hold the floor, with its priority.
    fn current(&self) -> Option<(&str, u8)> {
        match &self.state {
            State::Acquiring {
                member,
                priority,
                cancelled: false,
            } => Some((member, *priority)),
            State::Applying {
                member, priority, ..
            } => Some((member, *priority)),
            State::Held(h) => Some((&h.member, h.priority)),
            State::Remote { speaker, .. } => Some((speaker, 0)),
            _ => None,
        }
    }

    fn on_request(&mut self, member: String, priority: u8, queue: bool, now: Instant) {
        if let Some((holder, holder_priority)) = self.current() {
            if holder == member {
                // A repeated press by the holder: say again where it stands.
                if let State::Held(h) = &self.state {
                    let event = self.granted_event(h.member.clone(), h.epoch);
                    self.notify(To::Member(member), event);
                }
                return;
            }
            let holder = holder.to_string();
            let is_remote = matches!(self.state, State::Remote { .. });
            if is_remote && !queue {
                // Our view of another node's holder is a cache: its node may have died and its lease run
                // out without a word (an expiring key publishes nothing). The store decides.
                self.state = State::Acquiring {
                    member: member.clone(),
                    priority,
                    cancelled: false,
                };
                self.out.push_back(Output::Acquire { member, priority });
                return;
            }
            if priority > holder_priority && !is_remote {
                self.enqueue(member, priority);
                self.preempt(now);
                self.tell_queue_positions();
                return;
            }
            if queue {
                self.enqueue(member, priority);
                self.tell_queue_positions();
            } else {
                self.notify(
                    To::Member(member),
                    FloorEvent::Denied {
                        speaker: Some(holder),
                        reason: DenyReason::Busy,
                    },
                );
            }
            return;
        }
        match self.state {
            State::Idle => {
                self.state = State::Acquiring {
                    member: member.clone(),
                    priority,
                    cancelled: false,
                };
                self.out.push_back(Output::Acquire { member, priority });
            }
            // Acquiring-cancelled or Releasing: the floor is about to be free; wait in line.
            _ => {
                self.enqueue(member, priority);
                self.tell_queue_positions();
            }
        }
    }

    fn enqueue(&mut self, member: String, priority: u8) {
        if self.queue.iter().any(|q| q.member == member) {
            return;
        }
        let at = self
            .queue
            .iter()
            .position(|q| q.priority < priority)
            .unwrap_or(self.queue.len());
        self.queue.insert(
            at,
            Queued {
                member,
                priority,
                told: usize::MAX,
            },
        );
    }

    /// Queue positions are 1-based; a member whose pre-emption is under way is told 0.
    fn tell_queue_positions(&mut self) {
        let holder_priority = self.current().map(|(_, p)| p);
        let preempting = matches!(&self.state, State::Held(h) if h.preempt_at.is_some())
            || matches!(self.state, State::Releasing { .. });
        let mut events = Vec::new();
        for (i, q) in self.queue.iter_mut().enumerate() {
            let position =
                if i == 0 && (preempting || holder_priority.is_some_and(|p| q.priority > p)) {
                    0
                } else {
                    i + 1
                };
            if q.told != position {
                q.told = position;
                events.push((q.member.clone(), position));
            }
        }
        for (member, position) in events {
            self.notify(To::Member(member), FloorEvent::Queued { position });
        }
    }

    /// The queue's head outranks the holder: revoke now, or after T3 grace.
    fn preempt(&mut self, now: Instant) {
        let t3 = self.config.t3;
        let State::Held(h) = &mut self.state else {
            // Still acquiring or applying: pre-empt once held (see `on_applied`).
            return;
        };
        if h.preempt_at.is_some() {
            return;
        }
        if t3.is_zero() {
            self.revoke(RevokeReason::Preempted);
        } else {
            h.preempt_at = Some(now + t3);
            let event = FloorEvent::Revoked {
                speaker: h.member.clone(),
                epoch: h.epoch,
                reason: RevokeReason::Preempted,
                grace_ms: t3.as_millis() as u64,
            };
            let to = To::Member(h.member.clone());
            self.notify(to, event);
        }
    }

    fn granted_event(&self, speaker: String, epoch: u64) -> FloorEvent {
        FloorEvent::Granted {
            speaker,
            epoch,
            duration_ms: self.config.t2.as_millis() as u64,
        }
    }

    /// Takes the floor from the holder: it stops being forwarded at once, the lock is given back.
    fn revoke(&mut self, reason: RevokeReason) {
        let State::Held(h) = std::mem::replace(&mut self.state, State::Idle) else {
            return;
        };
        self.out.push_back(Output::Apply {
            speaker: None,
            epoch: h.epoch,
        });
        // With T3 grace the holder was already told; otherwise tell it now.
        if h.preempt_at.is_none() || reason != RevokeReason::Preempted {
            self.notify(
                To::Member(h.member.clone()),
                FloorEvent::Revoked {
                    speaker: h.member,
                    epoch: h.epoch,
                    reason,
                    grace_ms: 0,
                },
            );
        }
        self.state = State::Releasing { epoch: h.epoch };
        self.out.push_back(Output::Release { epoch: h.epoch });
    }

    fn on_release(&mut self, member: &str, leaving: Option<RevokeReason>) {
        let before = self.queue.len();
        self.queue.retain(|q| q.member != member);
        let dequeued = self.queue.len() != before;
        match &mut self.state {
            State::Held(h) if h.member == member => {
                if let Some(reason) = leaving {
                    self.revoke(reason);
                } else {
                    let epoch = h.epoch;
                    self.out.push_back(Output::Apply {
                        speaker: None,
                        epoch,
                    });
                    self.state = State::Releasing { epoch };
                    self.out.push_back(Output::Release { epoch });
                }
            }
            State::Acquiring {
                member: m,
                cancelled,
                ..
            } if m == member => *cancelled = true,
            State::Applying {
                member: m, epoch, ..
            } if m == member => {
                let epoch = *epoch;
                self.out.push_back(Output::Apply {
                    speaker: None,
                    epoch,
                });
                self.state = State::Releasing { epoch };
                self.out.push_back(Output::Release { epoch });
            }
            _ => {
                if dequeued {
                    self.tell_queue_positions();
                }
            }
        }
    }

    fn on_store_granted(&mut self, member: String, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
        match &self.state {
            State::Acquiring {
                member: m,
                priority,
                cancelled,
            } if *m == member => {
                if *cancelled {
                    self.state = State::Releasing { epoch };
                    self.out.push_back(Output::Release { epoch });
                } else {
                    self.state = State::Applying {
                        member: m.clone(),
                        priority: *priority,
                        epoch,
                    };
                    self.out.push_back(Output::Apply {
                        speaker: Some(member),
                        epoch,
                    });
                }
            }
            // Nobody is waiting for this grant any more: give it back.
            _ => self.out.push_back(Output::Release { epoch }),
        }
    }

    fn on_store_denied(
        &mut self,
        member: String,
        holder: Option<(String, u64)>,
        reason: DenyReason,
    ) {
        let State::Acquiring {
            member: m,
            cancelled,
            ..
        } = &self.state
        else {
            return;
        };
        if *m != member {
            return;
        }
        let cancelled = *cancelled;
        self.state = State::Idle;
        if !cancelled {
            let speaker = holder.as_ref().map(|(name, _)| name.clone());
            self.notify(To::Member(member), FloorEvent::Denied { speaker, reason });
        }
        // The store knows a holder we have not heard of yet (pub/sub lags or lost the message): adopt it,
        // so its release is recognised.
        if let Some((speaker, epoch)) = holder {
            if epoch > self.epoch {
                self.on_remote(Some(speaker), epoch);
            } else if epoch == self.epoch && self.remote().is_none() {
                self.state = State::Remote { speaker, epoch };
            }
        }
        // Queued members wait for the remote holder's release (a `Remote` input) or, on a store failure,
        // are denied too: never let a queue wait on a store that does not answer.
        if reason == DenyReason::Unavailable {
            for q in std::mem::take(&mut self.queue) {
                self.notify(
                    To::Member(q.member),
                    FloorEvent::Denied {
                        speaker: None,
                        reason,
                    },
                );
            }
        } else if !self.queue.is_empty() && cancelled {
            self.grant_next();
        }
    }

    fn on_applied(&mut self, epoch: u64, now: Instant) {
        let State::Applying {
            member,
            priority,
            epoch: e,
        } = &self.state
        else {
            return;
        };
        if *e != epoch {
            return;
        }
        let (member, priority) = (member.clone(), *priority);
        let renew_every = self
            .config
            .lease
            .map_or(Duration::MAX / 4, |l| l.renew_every);
        self.state = State::Held(Held {
            member: member.clone(),
            priority,
            epoch,
            t2_at: now + self.config.t2,
            preempt_at: None,
            renewed_at: now,
            renew_at: now + renew_every,
            renew_in_flight: false,
        });
        let granted = self.granted_event(member.clone(), epoch);
        self.notify(To::Member(member.clone()), granted);
        self.notify(
            To::AllExcept(member.clone()),
            FloorEvent::Taken {
                speaker: member,
                epoch,
            },
        );
        if self.queue.first().is_some_and(|q| q.priority > priority) {
            self.preempt(now);
        }
        self.tell_queue_positions();
    }

    fn on_store_released(&mut self, epoch: u64) {
        if self.state != (State::Releasing { epoch }) {
            return;
        }
        self.state = State::Idle;
        if self.queue.is_empty() {
            self.notify(To::All, FloorEvent::Idle { epoch });
        } else {
            self.grant_next();
        }
    }

    fn grant_next(&mut self) {
        let q = self.queue.remove(0);
        self.state = State::Acquiring {
            member: q.member.clone(),
            priority: q.priority,
            cancelled: false,
        };
        self.out.push_back(Output::Acquire {
            member: q.member,
            priority: q.priority,
        });
        self.tell_queue_positions();
    }

    fn on_renewed(&mut self, epoch: u64, sent_at: Instant, outcome: Renewal) {
        let State::Held(h) = &mut self.state else {
            return;
        };
        if h.epoch != epoch {
            return;
        }
        h.renew_in_flight = false;
        match outcome {
            Renewal::Renewed => h.renewed_at = h.renewed_at.max(sent_at),
            // The lock is someone else's already: stop forwarding now.
            Renewal::Lost => self.revoke(RevokeReason::LeaseLost),
            Renewal::Failed => {}
        }
    }

    fn on_remote(&mut self, speaker: Option<String>, epoch: u64) {
        match speaker {
            Some(speaker) if epoch > self.epoch => {
                self.epoch = epoch;
                match &self.state {
                    // A newer grant elsewhere: our own holder is stale.
                    State::Held(_) => self.revoke(RevokeReason::LeaseLost),
                    // Our grant is older than the remote one: it never reaches the member.
                    State::Applying {
                        member, epoch: e, ..
                    } => {
                        let (member, e) = (member.clone(), *e);
                        self.out.push_back(Output::Release { epoch: e });
                        self.notify(
                            To::Member(member),
                            FloorEvent::Denied {
                                speaker: Some(speaker.clone()),
                                reason: DenyReason::Busy,
                            },
                        );
                    }
                    _ => {}
                }
                self.out.push_back(Output::ApplyRemote { epoch });
                self.notify(
                    To::All,
                    FloorEvent::Taken {
                        speaker: speaker.clone(),
                        epoch,
                    },
                );
                // A store answer still on its way settles an acquisition; otherwise the remote holder is it.
                if !matches!(self.state, State::Acquiring { .. }) {
                    self.state = State::Remote { speaker, epoch };
                }
            }
            None if matches!(&self.state, State::Remote { epoch: e, .. } if *e == epoch) => {
                self.state = State::Idle;
                self.out.push_back(Output::Apply {
                    speaker: None,
                    epoch,
                });
                if self.queue.is_empty() {
                    self.notify(To::All, FloorEvent::Idle { epoch });
                } else {
                    self.grant_next();
                }
            }
            _ => {}
        }
    }

    fn on_tick(&mut self, now: Instant) {
        let lease = self.config.lease;
        let State::Held(h) = &mut self.state else {
            return;
        };
        if h.preempt_at.is_some_and(|at| now >= at) {
            self.revoke(RevokeReason::Preempted);
            return;
        }
        if now >= h.t2_at {
            self.revoke(RevokeReason::MaxTalkTime);
            return;
        }
        if let Some(lease) = lease {
            if now + lease.margin >= h.renewed_at + lease.ttl {
                self.revoke(RevokeReason::LeaseLost);
                return;
            }
            if now >= h.renew_at && !h.renew_in_flight {
                h.renew_at = now + lease.renew_every;
                h.renew_in_flight = true;
                let epoch = h.epoch;
                self.out.push_back(Output::Renew { epoch });
            }
        }
    }
}

#[cfg(test)]
mod tests;
