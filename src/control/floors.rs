//! Where a press becomes a grant. A `ptt` request is fed to the channel's [`Floor`](crate::floor::Floor);
//! its outputs become store calls (acquire, renew, release), a speaker change for the channel's shard,
//! and `floor` frames. The store's answers, the shard's acknowledgement and other nodes' published floor
//! events come back as floor inputs. Each floor says when it next needs waking; nothing ticks.

use std::cmp::Reverse;
use std::time::Instant;

use tracing::{info, warn};

use super::calls::{Answered, CallId, Purpose, StoreCall, StoreReply};
use super::HubCore;
use crate::channel::SpeakerChange;
use crate::floor::{
    DenyReason, FloorEvent, Input as FloorInput, Output as FloorOutput, Renewal, To,
};
use crate::ids::ConnId;
use crate::shard::Command;
use crate::signal::protocol::{ErrorCode, FloorMessage, Message, Ptt, PttAction, SignalError};
use crate::state::{AcquireRequest, Acquired, StoreEvent};

impl HubCore {
    pub(super) fn on_ptt(
        &mut self,
        conn: ConnId,
        ptt: Ptt,
        now: Instant,
    ) -> Result<(), SignalError> {
        let member = self.member_of(conn, &ptt.channel)?;
        let presses = f64::from(self.config.limits.presses_per_second);
        let Some(ch) = self.channels.get_mut(&ptt.channel) else {
            return Ok(());
        };
        let Some(m) = ch.members.get_mut(&member) else {
            return Ok(());
        };
        if ptt.action == PttAction::Press && !m.presses.take(presses, 2.0 * presses, now) {
            self.limit_hit("presses_per_second");
            let event = FloorEvent::Denied {
                speaker: None,
                reason: DenyReason::RateLimited,
            };
            self.notify(&ptt.channel, To::Member(member), event);
            return Ok(());
        }
        let input = match ptt.action {
            // Draining: a new talk burst would only be cut when the node goes (the client is sent on
            // with `goaway` once its channels are idle).
            PttAction::Press if !self.store_up || self.drain.is_some() => {
                let event = FloorEvent::Denied {
                    speaker: None,
                    reason: DenyReason::Unavailable,
                };
                self.notify(&ptt.channel, To::Member(member), event);
                return Ok(());
            }
            // A recvonly WebRTC offer, or a token without the `talk` right.
            PttAction::Press if m.listen_only || !m.rights.talk => {
                let event = FloorEvent::Denied {
                    speaker: ch.floor.speaker().map(str::to_string),
                    reason: DenyReason::ListenOnly,
                };
                self.notify(&ptt.channel, To::Member(member), event);
                return Ok(());
            }
            PttAction::Press if ptt.emergency => {
                if !m.rights.emergency {
                    return Err(SignalError::new(
                        ErrorCode::Unauthorized,
                        "an emergency press needs the `emergency` right in the token",
                    ));
                }
                m.pressed_at = Some(now);
                FloorInput::Emergency { member }
            }
            PttAction::Press => {
                m.pressed_at = (!ptt.queue).then_some(now);
                FloorInput::Request {
                    priority: m.priority,
                    member,
                    queue: ptt.queue,
                }
            }
            PttAction::Release => FloorInput::Release { member },
        };
        self.floor_input(&ptt.channel, input, now);
        Ok(())
    }

    /// Feeds one input to a channel's floor and acts on what it asks for.
    pub(super) fn floor_input(&mut self, channel: &str, input: FloorInput, now: Instant) {
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        ch.floor.handle(input, now);
        self.drive(channel, now);
    }

    /// Drains the floor's outputs: store calls, speaker changes for the shard, events for the members
    /// they are for; then queues the floor's next deadline.
    fn drive(&mut self, channel: &str, now: Instant) {
        loop {
            let Some(ch) = self.channels.get_mut(channel) else {
                return;
            };
            let Some(out) = ch.floor.poll_output() else {
                let next = ch.floor.poll_timeout();
                if next != ch.timer {
                    ch.timer = next;
                    if let Some(at) = next {
                        self.floor_timers.push(Reverse((at, channel.to_string())));
                    }
                    self.prune_floor_timers();
                }
                return;
            };
            match out {
                FloorOutput::Acquire {
                    member,
                    priority,
                    emergency,
                } => {
                    let req = AcquireRequest {
                        channel: channel.to_string(),
                        member: member.clone(),
                        priority,
                        emergency,
                        ttl: self.config.lock_ttl,
                    };
                    let purpose = Purpose::Acquire {
                        channel: channel.to_string(),
                        member,
                    };
                    self.call(StoreCall::Acquire(req), purpose, now);
                }
                FloorOutput::Release { epoch } => {
                    let call = StoreCall::Release {
                        channel: channel.to_string(),
                        epoch,
                    };
                    let purpose = Purpose::Release {
                        channel: channel.to_string(),
                        epoch,
                    };
                    self.call(call, purpose, now);
                }
                FloorOutput::Renew { epoch } => {
                    let call = StoreCall::Renew {
                        channel: channel.to_string(),
                        epoch,
                        ttl: self.config.lock_ttl,
                    };
                    let purpose = Purpose::Renew {
                        channel: channel.to_string(),
                        epoch,
                        sent_at: now,
                    };
                    self.call(call, purpose, now);
                }
                FloorOutput::Apply {
                    speaker,
                    epoch,
                    until,
                } => {
                    let change = match speaker {
                        Some(name) => SpeakerChange::Granted {
                            speaker: ch.members.get(&name).map(|m| m.key),
                            epoch,
                            until,
                        },
                        None => SpeakerChange::Idle { epoch },
                    };
                    self.speaker_change(channel, change);
                }
                FloorOutput::Extend { epoch, until } => {
                    self.speaker_change(channel, SpeakerChange::Lease { epoch, until })
                }
                FloorOutput::ApplyRemote { epoch } => {
                    // The shard accepts the relayed media from the holder's node only, when it is known.
                    let change = match &ch.remote_holder {
                        Some((e, node)) if *e == epoch => SpeakerChange::Remote {
                            epoch,
                            node: node.clone(),
                        },
                        _ => SpeakerChange::Granted {
                            speaker: None,
                            epoch,
                            until: None,
                        },
                    };
                    self.speaker_change(channel, change);
                }
                FloorOutput::Notify { to, event } => {
                    self.time_press(channel, &to, &event, now);
                    self.notify(channel, to, event);
                }
                FloorOutput::BurstEnded {
                    member,
                    epoch,
                    started,
                    reason,
                    emergency,
                } => {
                    self.floor_burst_ended(channel, member, epoch, started, reason, emergency, now)
                }
            }
        }
    }

    /// Sends a speaker change to the channel's shard. A grant, remote grant or idle supersedes whatever of
    /// the channel still waits to be sent again (only the newest state matters); a lease extension waits
    /// behind a change still waiting, so the shard sees them in order.
    fn speaker_change(&mut self, channel: &str, change: SpeakerChange) {
        let Some(ch) = self.channels.get(channel) else {
            return;
        };
        let shard = ch.shard;
        if let Some(waiting) = self.speaker_retries.get_mut(channel) {
            if matches!(change, SpeakerChange::Lease { .. }) {
                waiting.push(change);
                return;
            }
            self.speaker_retries.remove(channel);
        }
        let command = Command::Speaker {
            channel: channel.to_string(),
            change,
        };
        self.shard_command(shard, command);
    }

    /// A speaker change the shard's full queue refused: sent again shortly, never dropped.
    pub(super) fn speaker_change_refused(
        &mut self,
        channel: String,
        change: SpeakerChange,
        now: Instant,
    ) {
        let waiting = self.speaker_retries.entry(channel).or_default();
        if !matches!(change, SpeakerChange::Lease { .. }) {
            waiting.retain(|c| c.epoch() > change.epoch());
        }
        waiting.insert(0, change);
        waiting.sort_by_key(|c| (c.epoch(), matches!(c, SpeakerChange::Lease { .. })));
        self.speaker_retry_at = Some(now + super::SPEAKER_RETRY);
    }

    /// Sends again the speaker changes a full shard queue refused, in order.
    pub(super) fn retry_speaker_changes(&mut self, now: Instant) {
        if self.speaker_retry_at.is_none_or(|at| now < at) {
            return;
        }
        self.speaker_retry_at = None;
        let retries: Vec<(String, Vec<SpeakerChange>)> = self.speaker_retries.drain().collect();
        for (channel, changes) in retries {
            let Some(shard) = self.channels.get(&channel).map(|ch| ch.shard) else {
                continue;
            };
            for change in changes {
                let command = Command::Speaker {
                    channel: channel.clone(),
                    change,
                };
                self.shard_command(shard, command);
            }
        }
    }

    /// Press → granted: observed when the press's `granted` leaves; a press answered otherwise, or that
    /// waits in the queue, is not timed.
    fn time_press(&mut self, channel: &str, to: &To, event: &FloorEvent, now: Instant) {
        let member = match (event, to) {
            (FloorEvent::Granted { speaker, .. }, _) => speaker,
            (FloorEvent::Denied { .. } | FloorEvent::Queued { .. }, To::Member(m)) => m,
            _ => return,
        };
        let Some(m) = self
            .channels
            .get_mut(channel)
            .and_then(|ch| ch.members.get_mut(member))
        else {
            return;
        };
        let pressed = m.pressed_at.take();
        if let (FloorEvent::Granted { .. }, Some(at)) = (event, pressed) {
            let us =
                u64::try_from(now.saturating_duration_since(at).as_micros()).unwrap_or(u64::MAX);
            self.counters
                .press_to_grant
                .observe(&crate::metrics::PRESS_TO_GRANT_US, us);
        }
    }

    /// Sends a floor event to the members it is for (only those whose join is complete).
    pub(super) fn notify(&mut self, channel: &str, to: To, event: FloorEvent) {
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
        let mut msg = FloorMessage::from_event(channel, &event);
        let burst = match &event {
            FloorEvent::Granted { epoch, .. }
            | FloorEvent::Taken { epoch, .. }
            | FloorEvent::Idle { epoch } => Some(*epoch),
            _ => None,
        };
        if burst.is_some_and(|e| ch.floor.is_emergency(e)) {
            msg.emergency = Some(true);
        }
        let text = Message::Floor(msg).to_json();
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

    /// Drops stale entries from the top of the floor timer heap, so the core's next deadline is a real
    /// one (a rescheduled floor leaves its old entry behind).
    fn prune_floor_timers(&mut self) {
        while let Some(Reverse((at, channel))) = self.floor_timers.peek() {
            let live = self
                .channels
                .get(channel)
                .is_some_and(|ch| ch.timer == Some(*at));
            if live {
                break;
            }
            self.floor_timers.pop();
        }
    }

    /// Wakes the floors whose deadline has come.
    pub(super) fn run_floor_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.floor_timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, channel))) = self.floor_timers.pop() else {
                break;
            };
            let Some(ch) = self.channels.get_mut(&channel) else {
                continue;
            };
            if ch.timer != Some(at) {
                continue; // rescheduled since: a stale entry
            }
            ch.timer = None;
            ch.floor.handle_timeout(now);
            self.drive(&channel, now);
            self.forget_if_empty(&channel, now);
        }
    }

    /// A store call's answer.
    pub(super) fn on_store_reply(&mut self, id: CallId, reply: StoreReply, now: Instant) {
        match self.calls.answer(id, reply, now) {
            Answered::Pending(purpose, reply) => self.on_answer(purpose, reply, now),
            Answered::Late(Purpose::Acquire { channel, .. }, StoreReply::Acquired(Ok(got))) => {
                // The press was already denied when this grant came back: nobody uses the lock, so give
                // it back now rather than let it block the channel until the lease runs out.
                if let Acquired::Granted { epoch } = got {
                    self.give_back_orphan(&channel, epoch, now);
                }
            }
            Answered::Late(..) | Answered::WillRetry | Answered::Unknown => {}
        }
    }

    /// What an answer means for the purpose it was asked for.
    fn on_answer(&mut self, purpose: Purpose, reply: StoreReply, now: Instant) {
        match (purpose, reply) {
            (Purpose::Acquire { channel, member }, StoreReply::Acquired(result)) => {
                let input = match result {
                    Ok(Acquired::Granted { epoch }) => FloorInput::StoreGranted { member, epoch },
                    Ok(Acquired::Busy(holder)) => {
                        if holder.node == self.config.node {
                            // A lock of this node that its floor does not hold (a press goes to the
                            // store only when nobody local holds): a grant whose answer was lost.
                            self.give_back_orphan(&channel, holder.epoch, now);
                        }
                        self.note_remote_holder(&channel, holder.epoch, &holder.node);
                        if holder.emergency {
                            // Its events are flagged here too (pub/sub may not have told us yet).
                            let remote = FloorInput::Remote {
                                speaker: Some(holder.member.clone()),
                                epoch: holder.epoch,
                                emergency: true,
                            };
                            self.floor_input(&channel, remote, now);
                        }
                        FloorInput::StoreDenied {
                            member,
                            holder: Some((holder.member, holder.epoch)),
                            reason: DenyReason::Busy,
                        }
                    }
                    Err(e) => {
                        warn!(channel, error = %e, "floor store failed: denying (fail safe)");
                        self.counters.store_errors += 1;
                        FloorInput::StoreDenied {
                            member,
                            holder: None,
                            reason: DenyReason::Unavailable,
                        }
                    }
                };
                self.floor_input(&channel, input, now);
                self.forget_if_empty(&channel, now);
            }
            (
                Purpose::Renew {
                    channel,
                    epoch,
                    sent_at,
                },
                StoreReply::Flag(result),
            ) => {
                let outcome = match result {
                    Ok(true) => Renewal::Renewed,
                    Ok(false) => Renewal::Lost,
                    Err(_) => Renewal::Failed,
                };
                let input = FloorInput::Renewed {
                    epoch,
                    sent_at,
                    outcome,
                };
                self.floor_input(&channel, input, now);
                self.forget_if_empty(&channel, now);
            }
            (Purpose::Release { channel, epoch }, _) => {
                // Released, or failed to: then the lease runs out on its own.
                self.floor_input(&channel, FloorInput::StoreReleased { epoch }, now);
                self.forget_if_empty(&channel, now);
            }
            (Purpose::Resync { channel }, StoreReply::Holder(result)) => {
                self.on_holder(&channel, result, now)
            }
            (
                Purpose::Join {
                    channel,
                    member,
                    key,
                },
                StoreReply::Joined(result),
            ) => match result {
                Ok(Some(members)) => self.member_ready(&channel, &member, key, members),
                Ok(None) => self.name_taken(&channel, &member, key, now),
                // The store could not say: join anyway (without the remote names) rather than refuse
                // everyone while Redis is away.
                Err(_) => self.member_ready(&channel, &member, key, Vec::new()),
            },
            (
                Purpose::Announce {
                    then_register,
                    retries,
                },
                StoreReply::Done(Ok(())),
            ) => self.register_channels(then_register, retries, now),
            (Purpose::Nodes { channel }, StoreReply::Nodes(Ok(ids))) => {
                self.on_channel_nodes(&channel, ids, now)
            }
            (Purpose::NodeTable, StoreReply::Table(Ok(table))) => self.on_table(table, now),
            (purpose @ Purpose::Place { .. }, StoreReply::Home(result)) => {
                self.on_placed(purpose, result, now)
            }
            (Purpose::ClusterKey, StoreReply::Key(Ok(stored))) => self.on_cluster_key(&stored),
            _ => {}
        }
    }

    /// A call that got no answer by its deadline: the same as a failure.
    pub(super) fn on_call_failed(&mut self, purpose: Purpose, now: Instant) {
        let failed = || crate::state::StateError::Unavailable("no answer in time".into());
        let reply = match &purpose {
            Purpose::Acquire { .. } => StoreReply::Acquired(Err(failed())),
            Purpose::Renew { .. } | Purpose::Release { .. } => StoreReply::Flag(Err(failed())),
            // `joined` goes out without the remote names.
            Purpose::Join { .. } => StoreReply::Joined(Err(failed())),
            // The join is served here.
            Purpose::Place { .. } => StoreReply::Home(Err(failed())),
            _ => return,
        };
        self.on_answer(purpose, reply, now);
    }

    /// The floor as the store has it, read on resync.
    fn on_holder(
        &mut self,
        channel: &str,
        result: Result<Option<crate::state::Holder>, crate::state::StateError>,
        now: Instant,
    ) {
        let Some(ch) = self.channels.get(channel) else {
            return;
        };
        let input = match result {
            Ok(Some(h)) if h.node == self.config.node && !ch.floor.owns(h.epoch) => {
                self.give_back_orphan(channel, h.epoch, now);
                return;
            }
            Ok(Some(h)) if h.node != self.config.node => {
                self.note_remote_holder(channel, h.epoch, &h.node);
                FloorInput::Remote {
                    speaker: Some(h.member),
                    epoch: h.epoch,
                    emergency: h.emergency,
                }
            }
            // The remote holder's lease ran out (an expiring key publishes nothing).
            Ok(None) => match ch.floor.remote() {
                Some((_, epoch)) => FloorInput::Remote {
                    speaker: None,
                    epoch,
                    emergency: false,
                },
                None => return,
            },
            _ => return,
        };
        self.floor_input(channel, input, now);
        self.forget_if_empty(channel, now);
    }

    /// Gives back a lock this node holds in the store but none of its floors owns — a grant whose answer
    /// came too late or never (the press was denied meanwhile). Releasing by epoch is safe whatever the
    /// lock's state: it frees nothing but that grant. Without this the channel would stay busy until
    /// the lease ran out.
    fn give_back_orphan(&mut self, channel: &str, epoch: u64, now: Instant) {
        warn!(
            channel,
            epoch, "a grant of this node that no floor holds: giving it back"
        );
        self.counters.orphan_locks_released += 1;
        let call = StoreCall::Release {
            channel: channel.to_string(),
            epoch,
        };
        self.call(call, Purpose::None, now);
    }

    /// Remembers which node holds a remote grant, for the shard's relay check.
    fn note_remote_holder(&mut self, channel: &str, epoch: u64, node: &str) {
        if let Some(ch) = self.channels.get_mut(channel) {
            if ch.remote_holder.as_ref().is_none_or(|(e, _)| *e <= epoch) {
                ch.remote_holder = Some((epoch, node.to_string()));
            }
        }
    }

    /// Re-reads one channel's floor from the store.
    pub(super) fn read_holder(&mut self, channel: &str, now: Instant) {
        let call = StoreCall::Holder {
            channel: channel.to_string(),
        };
        let purpose = Purpose::Resync {
            channel: channel.to_string(),
        };
        self.call(call, purpose, now);
    }

    /// Re-reads every local channel's floor from the store.
    pub(super) fn resync(&mut self, now: Instant) {
        let channels: Vec<String> = self.channels.keys().cloned().collect();
        for channel in channels {
            self.read_holder(&channel, now);
        }
    }

    /// Changes published by the store. Our own grants come back too and are ignored: the floor already
    /// knows them.
    pub(super) fn on_store_event(&mut self, event: StoreEvent, now: Instant) {
        match event {
            StoreEvent::Floor {
                channel,
                holder,
                epoch,
            } => {
                if holder.as_ref().is_some_and(|h| h.node == self.config.node) {
                    // Our own grants come back too. One the floor does not own is an orphan: the
                    // answer to its press was lost (a timeout), but Redis granted it.
                    let owned = self
                        .channels
                        .get(&channel)
                        .is_some_and(|ch| ch.floor.owns(epoch));
                    if !owned {
                        self.give_back_orphan(&channel, epoch, now);
                    }
                    return;
                }
                if epoch >= crate::floor::MAX_EPOCH {
                    warn!(
                        channel,
                        epoch, "ignoring a floor event with an epoch out of range"
                    );
                    return;
                }
                if let Some(h) = &holder {
                    self.note_remote_holder(&channel, epoch, &h.node);
                }
                let emergency = holder.as_ref().is_some_and(|h| h.emergency);
                let input = FloorInput::Remote {
                    speaker: holder.map(|h| h.member),
                    epoch,
                    emergency,
                };
                self.floor_input(&channel, input, now);
            }
            StoreEvent::Presence {
                channel,
                member,
                node,
                joined,
            } => self.on_remote_presence(&channel, &member, &node, joined),
            StoreEvent::Resync => {
                if !self.store_up {
                    info!("floor store subscription up: resynchronising");
                }
                self.store_up = true;
                self.remote.store_back(now);
                self.resync(now);
                // Redis may have come back empty: say again that this node is alive, then which channels
                // it serves, and refresh its members' sessions (a refresh re-adds a missing member).
                self.reregister(now);
            }
            StoreEvent::Down => {
                if self.store_up {
                    warn!("floor store subscription down: denying presses until it is back");
                }
                self.store_up = false;
            }
            StoreEvent::Watching { channel } => self.on_watching(&channel, now),
            StoreEvent::ChannelNode {
                channel,
                node,
                present,
            } => self.on_channel_node(&channel, &node, present, now),
            StoreEvent::Node { node, live } => self.on_node_event(&node, live, now),
        }
    }

    /// At shutdown: a floor held by a local member is given back and announced idle.
    pub(super) fn release_local_floor(&mut self, channel: &str, now: Instant) {
        let Some(ch) = self.channels.get(channel) else {
            return;
        };
        let Some(speaker) = ch.floor.speaker() else {
            return;
        };
        if !ch.members.contains_key(speaker) {
            return;
        }
        let epoch = ch.floor.epoch();
        let call = StoreCall::Release {
            channel: channel.to_string(),
            epoch,
        };
        self.call(call, Purpose::None, now);
        self.notify(channel, To::All, FloorEvent::Idle { epoch });
    }
}
