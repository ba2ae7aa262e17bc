//! The floor machine's transitions: what each input does in each state. The types and the public
//! surface are in `mod.rs`; this file is the MCPTT floor logic itself (TS 24.380 §6.3: granted, taken,
//! denied, queued, idle, revoked; priority pre-emption with T3 grace; T2; lease).

use std::time::{Duration, Instant};

use super::{
    DenyReason, Floor, FloorEvent, Held, Output, Queued, Rank, Renewal, RevokeReason, State, To,
    APPLY_TIMEOUT, EMERGENCY,
};

impl Floor {
    pub(super) fn notify(&mut self, to: To, event: FloorEvent) {
        self.out.push_back(Output::Notify { to, event });
    }

    /// The transmission log's record of a burst that ends now.
    fn burst_ended(&mut self, h: &Held, reason: &'static str) {
        self.out.push_back(Output::BurstEnded {
            member: h.member.clone(),
            epoch: h.epoch,
            started: h.started,
            reason,
            emergency: self.emergency == Some(h.epoch),
        });
    }

    /// The member that holds or is about to hold the floor, with its priority.
    pub(super) fn current(&self) -> Option<(&str, Rank)> {
        match &self.state {
            State::Acquiring {
                member,
                priority,
                cancelled: false,
                ..
            } => Some((member, *priority)),
            State::Applying {
                member, priority, ..
            } => Some((member, *priority)),
            State::Held(h) => Some((&h.member, h.priority)),
            State::Remote {
                speaker, priority, ..
            } => Some((speaker, *priority)),
            _ => None,
        }
    }

    pub(super) fn on_request(&mut self, member: String, priority: Rank, queue: bool, now: Instant) {
        let emergency = priority == EMERGENCY;
        if let Some((holder, holder_priority)) = self.current() {
            let orphan = holder == member && matches!(self.state, State::Remote { .. });
            if holder == member && !orphan {
                // A repeated press by the holder: say again where it stands (while applying, the
                // answer to the first press is on its way).
                if let State::Held(h) = &self.state {
                    let event = self.granted_event(h.member.clone(), h.epoch);
                    self.notify(To::Member(member), event);
                }
                return;
            }
            // A "remote" holder with this member's name is a lock in the store that this node took for
            // the member but never learned it got (its answer was lost): the store decides, and the
            // control core gives that lock back (a name is one member per channel across nodes).
            let holder = holder.to_string();
            let is_remote = matches!(self.state, State::Remote { .. });
            // An emergency press against a remote holder asks the store, which takes the lock from any
            // holder not itself in an emergency; against a remote emergency it waits first in line.
            let ask_store = if emergency {
                holder_priority < EMERGENCY
            } else {
                !queue
            };
            if is_remote && ask_store {
                // Our view of another node's holder is a cache: its node may have died and its lease run
                // out without a word (an expiring key publishes nothing). The store decides.
                self.acquire(member, priority, now);
                return;
            }
            if priority > holder_priority && !is_remote {
                self.enqueue(member, priority);
                self.preempt(now);
                self.tell_queue_positions();
                return;
            }
            if queue || emergency {
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
            State::Idle => self.acquire(member, priority, now),
            // Acquiring-cancelled or Releasing: the floor is about to change hands. A member that asked to
            // queue (or an emergency) waits in line; the others race, and are settled once the change is
            // done.
            _ if queue || emergency => {
                self.enqueue(member, priority);
                self.tell_queue_positions();
            }
            _ => {
                if !self.racing.iter().any(|r| r.member == member) {
                    self.racing.push(Queued {
                        member,
                        priority,
                        told: usize::MAX,
                    });
                }
            }
        }
    }

    /// Asks the store for the lock on behalf of `member`.
    fn acquire(&mut self, member: String, priority: Rank, now: Instant) {
        self.state = State::Acquiring {
            member: member.clone(),
            priority,
            cancelled: false,
            asked_at: now,
        };
        self.out.push_back(Output::Acquire {
            member,
            priority: u8::try_from(priority).unwrap_or(u8::MAX),
            emergency: priority == EMERGENCY,
        });
    }

    /// After the floor changed hands: presses that raced the change are answered. If the floor is free,
    /// the highest-priority (then the earliest) of them is asked for; every other is denied `busy`,
    /// naming who holds or is about to hold the floor.
    pub(super) fn settle_racing(&mut self, now: Instant) {
        if self.racing.is_empty() {
            return;
        }
        let mut racing = std::mem::take(&mut self.racing);
        if self.state == State::Idle {
            let best = (0..racing.len())
                .max_by_key(|&i| (racing[i].priority, std::cmp::Reverse(i)))
                .unwrap_or(0);
            let winner = racing.remove(best);
            self.acquire(winner.member, winner.priority, now);
        }
        let speaker = self.current().map(|(m, _)| m.to_string());
        for r in racing {
            self.notify(
                To::Member(r.member),
                FloorEvent::Denied {
                    speaker: speaker.clone(),
                    reason: DenyReason::Busy,
                },
            );
        }
    }

    pub(super) fn enqueue(&mut self, member: String, priority: Rank) {
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
    pub(super) fn tell_queue_positions(&mut self) {
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
    pub(super) fn preempt(&mut self, now: Instant) {
        // An emergency pre-empts at once: no T3 grace.
        let emergency = self.queue.first().is_some_and(|q| q.priority == EMERGENCY);
        let t3 = if emergency {
            Duration::ZERO
        } else {
            self.config.t3
        };
        let State::Held(h) = &mut self.state else {
            // Still acquiring or applying: pre-empt once held (see `on_applied`).
            return;
        };
        if h.preempt_at.is_some() && !emergency {
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

    pub(super) fn granted_event(&self, speaker: String, epoch: u64) -> FloorEvent {
        FloorEvent::Granted {
            speaker,
            epoch,
            duration_ms: self.config.t2.as_millis() as u64,
        }
    }

    /// Takes the floor from the holder: it stops being forwarded at once, the lock is given back.
    pub(super) fn revoke(&mut self, reason: RevokeReason) {
        let State::Held(h) = std::mem::replace(&mut self.state, State::Idle) else {
            return;
        };
        self.burst_ended(&h, reason.as_str());
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
        self.release_after_shard(h.epoch, h.renewed_at);
    }

    /// The shard is told nobody speaks; the lock is given back at once without a lease (one node: the
    /// shard takes commands in order, so no later grant can overtake the idle), or, with one, once the
    /// shard has stopped forwarding — its acknowledgement, or the end of the lease confirmed at
    /// `lease_from` (the shard's own fence stops it then).
    fn release_after_shard(&mut self, epoch: u64, lease_from: Instant) {
        self.out.push_back(Output::Apply {
            speaker: None,
            epoch,
            until: None,
        });
        match self.config.lease {
            Some(lease) => {
                self.state = State::Releasing {
                    epoch,
                    shard_stops_by: Some(lease.end(lease_from)),
                };
            }
            None => {
                self.state = State::Releasing {
                    epoch,
                    shard_stops_by: None,
                };
                self.out.push_back(Output::Release { epoch });
            }
        }
    }

    /// The shard took the idle of `epoch`: the lock may go back now.
    pub(super) fn on_shard_idle(&mut self, epoch: u64) {
        if let State::Releasing {
            epoch: e,
            shard_stops_by: waiting @ Some(_),
        } = &mut self.state
        {
            if *e == epoch {
                *waiting = None;
                self.out.push_back(Output::Release { epoch });
            }
        }
    }

    pub(super) fn on_release(&mut self, member: &str, leaving: Option<RevokeReason>) {
        self.racing.retain(|r| r.member != member);
        let before = self.queue.len();
        self.queue.retain(|q| q.member != member);
        let dequeued = self.queue.len() != before;
        match &mut self.state {
            State::Held(h) if h.member == member => {
                if let Some(reason) = leaving {
                    self.revoke(reason);
                } else {
                    let h = h.clone();
                    self.burst_ended(&h, "released");
                    self.release_after_shard(h.epoch, h.renewed_at);
                }
            }
            State::Acquiring {
                member: m,
                cancelled,
                ..
            } if m == member => *cancelled = true,
            State::Applying {
                member: m,
                epoch,
                asked_at,
                ..
            } if m == member => {
                let (epoch, asked_at) = (*epoch, *asked_at);
                self.release_after_shard(epoch, asked_at);
            }
            _ => {
                if dequeued {
                    self.tell_queue_positions();
                }
            }
        }
    }

    pub(super) fn on_store_granted(&mut self, member: String, epoch: u64, now: Instant) {
        self.epoch = self.epoch.max(epoch);
        match &self.state {
            State::Acquiring {
                member: m,
                priority,
                cancelled,
                asked_at,
            } if *m == member => {
                if *cancelled {
                    // Never applied: nothing to stop in the shard.
                    self.state = State::Releasing {
                        epoch,
                        shard_stops_by: None,
                    };
                    self.out.push_back(Output::Release { epoch });
                } else {
                    let asked_at = *asked_at;
                    if *priority == EMERGENCY {
                        self.emergency = Some(epoch);
                    }
                    self.state = State::Applying {
                        member: m.clone(),
                        priority: *priority,
                        epoch,
                        asked_at,
                        deadline: now + APPLY_TIMEOUT,
                    };
                    let until = self.config.lease.map(|l| l.end(asked_at));
                    self.out.push_back(Output::Apply {
                        speaker: Some(member),
                        epoch,
                        until,
                    });
                }
            }
            // Nobody is waiting for this grant any more: give it back.
            _ => self.out.push_back(Output::Release { epoch }),
        }
    }

    pub(super) fn on_store_denied(
        &mut self,
        member: String,
        holder: Option<(String, u64)>,
        reason: DenyReason,
        now: Instant,
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
                self.on_remote(Some(speaker), epoch, false, now);
            } else if epoch == self.epoch && self.remote().is_none() {
                self.state = State::Remote {
                    speaker,
                    epoch,
                    priority: 0,
                };
            }
        }
        // Queued members wait for the remote holder's release (a `Remote` input) or, on a store failure,
        // are denied too: never let a queue wait on a store that does not answer.
        if reason == DenyReason::Unavailable {
            let waiting = std::mem::take(&mut self.queue);
            let racing = std::mem::take(&mut self.racing);
            for q in waiting.into_iter().chain(racing) {
                self.notify(
                    To::Member(q.member),
                    FloorEvent::Denied {
                        speaker: None,
                        reason,
                    },
                );
            }
        } else if !self.queue.is_empty() && cancelled {
            self.grant_next(now);
        }
        self.settle_racing(now);
    }

    pub(super) fn on_applied(&mut self, epoch: u64, now: Instant) {
        let State::Applying {
            member,
            priority,
            epoch: e,
            asked_at,
            ..
        } = &self.state
        else {
            return;
        };
        if *e != epoch {
            return;
        }
        let (member, priority, asked_at) = (member.clone(), *priority, *asked_at);
        let renew_every = self
            .config
            .lease
            .map_or(Duration::MAX / 4, |l| l.renew_every);
        self.state = State::Held(Held {
            member: member.clone(),
            priority,
            epoch,
            started: now,
            t2_at: now + self.config.t2,
            preempt_at: None,
            // The lease runs from when the lock was asked for, not from now: the store started its TTL
            // before this acknowledgement came back.
            renewed_at: asked_at,
            renew_at: asked_at + renew_every,
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

    pub(super) fn on_store_released(&mut self, epoch: u64, now: Instant) {
        if !matches!(self.state, State::Releasing { epoch: e, shard_stops_by: None } if e == epoch)
        {
            return;
        }
        self.state = State::Idle;
        if !self.queue.is_empty() {
            self.grant_next(now);
        } else if self.racing.is_empty() {
            self.notify(To::All, FloorEvent::Idle { epoch });
        }
        self.settle_racing(now);
    }

    pub(super) fn grant_next(&mut self, now: Instant) {
        let q = self.queue.remove(0);
        self.acquire(q.member, q.priority, now);
        self.tell_queue_positions();
    }

    pub(super) fn on_renewed(&mut self, epoch: u64, sent_at: Instant, outcome: Renewal) {
        let State::Held(h) = &mut self.state else {
            return;
        };
        if h.epoch != epoch {
            return;
        }
        h.renew_in_flight = false;
        match outcome {
            Renewal::Renewed => {
                h.renewed_at = h.renewed_at.max(sent_at);
                if let Some(lease) = self.config.lease {
                    let until = lease.end(h.renewed_at);
                    let epoch = h.epoch;
                    self.out.push_back(Output::Extend { epoch, until });
                }
            }
            // The lock is someone else's already: stop forwarding now.
            Renewal::Lost => self.revoke(RevokeReason::LeaseLost),
            Renewal::Failed => {}
        }
    }

    pub(super) fn on_remote(
        &mut self,
        speaker: Option<String>,
        epoch: u64,
        emergency: bool,
        now: Instant,
    ) {
        match speaker {
            Some(speaker) if epoch > self.epoch => {
                self.epoch = epoch;
                if emergency {
                    self.emergency = Some(epoch);
                }
                match &self.state {
                    // A newer grant elsewhere: our own holder is stale — pre-empted by an emergency, or its
                    // lease was lost.
                    State::Held(_) if emergency => self.revoke(RevokeReason::Preempted),
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
                    let priority = if emergency { EMERGENCY } else { 0 };
                    self.state = State::Remote {
                        speaker,
                        epoch,
                        priority,
                    };
                    self.settle_racing(now);
                }
            }
            None if matches!(&self.state, State::Remote { epoch: e, .. } if *e == epoch) => {
                self.state = State::Idle;
                self.out.push_back(Output::Apply {
                    speaker: None,
                    epoch,
                    until: None,
                });
                if self.queue.is_empty() {
                    self.notify(To::All, FloorEvent::Idle { epoch });
                } else {
                    self.grant_next(now);
                }
            }
            _ => {}
        }
    }

    pub(super) fn on_tick(&mut self, now: Instant) {
        let lease = self.config.lease;
        if let State::Releasing {
            epoch,
            shard_stops_by: Some(at),
        } = &self.state
        {
            if now >= *at {
                // No acknowledgement, but the lease is over: the shard's own fence has stopped the holder.
                let epoch = *epoch;
                self.on_shard_idle(epoch);
            }
            return;
        }
        if let State::Applying {
            member,
            epoch,
            deadline,
            asked_at,
            ..
        } = &self.state
        {
            if now >= *deadline {
                // The shard never acknowledged: the member is told it did not get the floor (nothing was
                // forwarded), the shard is told again that nobody speaks, and the lock goes back.
                let (member, epoch, asked_at) = (member.clone(), *epoch, *asked_at);
                tracing::warn!(epoch, "the shard did not acknowledge a grant: giving it up");
                self.notify(
                    To::Member(member),
                    FloorEvent::Denied {
                        speaker: None,
                        reason: DenyReason::Unavailable,
                    },
                );
                self.release_after_shard(epoch, asked_at);
            }
            return;
        }
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
            if now >= lease.end(h.renewed_at) {
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
