//! A channel as its shard sees it: the members with their outbound streams, the cached (speaker, epoch),
//! and who hears whom. Sans-IO: the shard loop passes `now` and a [`Batch`] to fill.
//!
//! Everyone but the speaker hears the speaker; a member hears nothing until it has sent us a packet
//! (latching, so a spoofed `rtp_addr` cannot turn the server into a reflector) and stops hearing after
//! [`LATCH_TIMEOUT`] without one.

#![warn(missing_docs)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rtpio::RawAddr;

use crate::forward::{Batch, Ingress, IngressVerdict, OutStream};
use crate::ids::{MemberKey, PeerId};
use crate::rtp::{RtpView, SR_LEN};

/// A member stops receiving after this long without a packet from its address (protocol v1 latching).
pub const LATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// How a member's audio reaches it.
#[derive(Debug, Clone, Copy)]
pub enum Leg {
    /// Plain RTP to a latched address: the shard writes the header, the payload is shared.
    Rtp {
        /// The address the member joined with (and must send from).
        addr: SocketAddr,
        /// The same address, ready for `sendmmsg`.
        dest: RawAddr,
    },
    /// A WebRTC peer of the shard: the shard seals the header and payload with its SRTP keys.
    WebRtc {
        /// The peer in the shard's slab.
        peer: PeerId,
    },
}

/// One member of a channel on this shard.
#[derive(Debug)]
pub struct Member {
    /// The membership this is.
    pub key: MemberKey,
    /// The member's name (the relay prefix carries the speaker's).
    pub name: String,
    /// How its audio reaches it.
    pub leg: Leg,
    /// Its outbound stream: one continuous SSRC/seq/ts space whoever speaks.
    pub out: OutStream,
    /// False for a member whose token does not grant `listen`: it is sent nothing.
    pub listens: bool,
    last_heard: Option<Instant>,
}

impl Member {
    /// A plain-RTP member at `addr`.
    pub fn new(key: MemberKey, name: String, addr: SocketAddr, out: OutStream) -> Self {
        Member {
            key,
            name,
            leg: Leg::Rtp {
                addr,
                dest: RawAddr::new(addr),
            },
            out,
            listens: true,
            last_heard: None,
        }
    }

    /// A WebRTC member. It counts as latched once its peer is connected and while it keeps sending
    /// (STUN consent checks, RTCP): the shard calls [`Channel::heard`] for both.
    pub fn webrtc(key: MemberKey, name: String, peer: PeerId, out: OutStream) -> Self {
        Member {
            key,
            name,
            leg: Leg::WebRtc { peer },
            out,
            listens: true,
            last_heard: None,
        }
    }

    #[inline]
    fn latched(&self, now: Instant) -> bool {
        self.last_heard
            .is_some_and(|t| now.saturating_duration_since(t) < LATCH_TIMEOUT)
    }
}

/// A change of the speaker, as sent by the control thread. Epoch rules (design "Floor control"): a grant
/// applies only when its epoch is newer than the cached one, an idle only when it names the cached epoch —
/// so events that arrive late or twice change nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpeakerChange {
    /// The floor was granted at `epoch`; `speaker` is the local member to forward, or `None` when the
    /// holder is not on this shard (its media does not arrive here).
    Granted {
        /// The local holder, if it is local.
        speaker: Option<MemberKey>,
        /// The grant's epoch.
        epoch: u64,
        /// The end of the holder's lease (a store with leases): the shard stops forwarding it then on its
        /// own, even if the control thread's revocation is late or lost. Extended by [`Self::Lease`].
        until: Option<Instant>,
    },
    /// A member of another node holds `epoch`: its media arrives by relay, and is accepted from that
    /// node only.
    Remote {
        /// The grant's epoch.
        epoch: u64,
        /// The holder's node id (relay packets carry it; the sender's address must be that node's).
        node: String,
    },
    /// The holder of `epoch` may be forwarded until `until` — its renewed lease, less the margin for clock
    /// drift (see `Granted::until`).
    Lease {
        /// The grant's epoch.
        epoch: u64,
        /// The end of the lease.
        until: Instant,
    },
    /// The floor of `epoch` is free.
    Idle {
        /// The epoch of the grant that ended.
        epoch: u64,
    },
}

impl SpeakerChange {
    /// The epoch the change is about.
    pub fn epoch(&self) -> u64 {
        match self {
            SpeakerChange::Granted { epoch, .. }
            | SpeakerChange::Remote { epoch, .. }
            | SpeakerChange::Lease { epoch, .. }
            | SpeakerChange::Idle { epoch } => *epoch,
        }
    }
}

/// Why a speaker packet was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardDrop {
    /// The sender does not hold the floor (the server enforces it, not the client).
    NotHolder,
    /// A relayed packet whose epoch is not the channel's current remote grant.
    StaleEpoch,
    /// Older than the first packet of the spurt ([`IngressVerdict::TooOld`]).
    TooOld,
    /// Nothing left after padding removal ([`IngressVerdict::PaddingOnly`]).
    PaddingOnly,
    /// The holder's lease ended: the shard fenced it on its own.
    LeaseExpired,
    /// A relayed packet from a node that does not hold the channel's current grant.
    NotGrantHolder,
}

/// One channel on its shard.
#[derive(Debug)]
pub struct Channel {
    /// The channel's name (unique on the node; the shard finds it by name).
    pub name: String,
    members: Vec<Member>,
    /// `members[i].key` at `i`: a member is looked up by key for every packet it sends (keep-alives,
    /// reports, media), and eight keys share a cache line where eight members take twenty-four.
    keys: Vec<MemberKey>,
    speaker: Option<MemberKey>,
    /// The floor is held at `epoch` by a member of another node: its media arrives by relay.
    remote: bool,
    /// Name of the local speaker, for the relay prefix.
    speaker_name: String,
    epoch: u64,
    ingress: Ingress,
    /// Other nodes' relay addresses for this channel: each local speaker packet goes once to each.
    relay_targets: Vec<RawAddr>,
    /// The node holding the current remote grant (relay is accepted from it only), when known.
    remote_node: Option<String>,
    /// The end of the local holder's lease: not forwarded at or after it.
    until: Option<Instant>,
    last_media: Instant,
    silence_reported: bool,
    /// The local burst in progress: its epoch and the packets forwarded (for the transmission log).
    burst: Option<(u64, u64)>,
    /// Local bursts are recorded (the shard hands their packets to the recorder).
    pub recording: bool,
}

impl Channel {
    /// An empty channel; `now` starts the silence clock.
    pub fn new(name: String, now: Instant) -> Self {
        Channel {
            name,
            members: Vec::new(),
            keys: Vec::new(),
            speaker: None,
            remote: false,
            speaker_name: String::new(),
            epoch: 0,
            ingress: Ingress::default(),
            relay_targets: Vec::new(),
            remote_node: None,
            until: None,
            last_media: now,
            silence_reported: false,
            burst: None,
            recording: false,
        }
    }

    /// The members on this shard.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The local member whose media is forwarded, if any.
    pub fn speaker(&self) -> Option<MemberKey> {
        self.speaker
    }

    /// Whether the floor is held, here or on another node: media may arrive to be forwarded.
    pub fn floor_held(&self) -> bool {
        self.speaker.is_some() || self.remote
    }

    /// The epoch of the last grant applied (the epoch rules compare against it).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// True when no member is left (the shard then forgets the channel).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    fn index_of(&self, key: MemberKey) -> Option<usize> {
        self.keys.iter().position(|&k| k == key)
    }

    /// Adds a member; it hears nothing until it is heard from (latching).
    pub fn add(&mut self, member: Member) {
        self.keys.push(member.key);
        self.members.push(member);
    }

    /// Removes a member; a speaker that leaves stops being forwarded at once.
    pub fn remove(&mut self, key: MemberKey) -> Option<Member> {
        let i = self.index_of(key)?;
        if self.speaker == Some(key) {
            self.speaker = None;
        }
        self.keys.swap_remove(i);
        Some(self.members.swap_remove(i))
    }

    /// Applies a speaker change by the epoch rules; returns whether it changed anything.
    pub fn apply(&mut self, change: SpeakerChange, now: Instant) -> bool {
        match change {
            SpeakerChange::Granted {
                speaker,
                epoch,
                until,
            } if epoch > self.epoch => {
                self.grant(speaker, epoch, now);
                self.until = until.filter(|_| speaker.is_some());
                true
            }
            SpeakerChange::Remote { epoch, node } if epoch > self.epoch => {
                self.grant(None, epoch, now);
                self.remote_node = Some(node);
                true
            }
            SpeakerChange::Lease { epoch, until }
                if epoch == self.epoch && self.speaker.is_some() =>
            {
                self.until = Some(self.until.map_or(until, |u| u.max(until)));
                true
            }
            SpeakerChange::Idle { epoch } if epoch == self.epoch => {
                self.speaker = None;
                self.remote = false;
                self.remote_node = None;
                self.until = None;
                true
            }
            _ => false,
        }
    }

    fn grant(&mut self, speaker: Option<MemberKey>, epoch: u64, now: Instant) {
        self.epoch = epoch;
        if speaker.is_some() {
            self.burst = Some((epoch, 0));
        }
        self.speaker = speaker;
        self.remote = speaker.is_none();
        self.remote_node = None;
        self.until = None;
        self.speaker_name.clear();
        if let Some(m) = speaker
            .and_then(|k| self.index_of(k))
            .map(|i| &self.members[i])
        {
            self.speaker_name.push_str(&m.name);
        }
        self.ingress.reset();
        self.last_media = now;
        self.silence_reported = false;
    }

    /// Whether member `key` is sent the channel's audio (a token without the `listen` right: not).
    pub fn set_listens(&mut self, key: MemberKey, listens: bool) {
        if let Some(m) = self.index_of(key).map(|i| &mut self.members[i]) {
            m.listens = listens;
        }
    }

    /// A packet (RTP or RTCP) arrived from member `key`: it is alive and may be sent to.
    pub fn heard(&mut self, key: MemberKey, now: Instant) {
        if let Some(m) = self.index_of(key).map(|i| &mut self.members[i]) {
            m.last_heard = Some(now);
        }
    }

    /// Media from member `key`: forwarded to every other latched member if `key` holds the floor.
    /// Fills `batch` with one header per listener; the payload is `pkt.payload`, shared by all.
    pub fn forward(
        &mut self,
        key: MemberKey,
        pkt: &RtpView<'_>,
        now: Instant,
        batch: &mut Batch,
    ) -> Result<(), ForwardDrop> {
        if self.speaker != Some(key) {
            return Err(ForwardDrop::NotHolder);
        }
        if self.until.is_some_and(|until| now >= until) {
            // The lease ran out: whatever the control thread says (or failed to say), this holder is no
            // longer forwarded — another node may hold the floor by now.
            return Err(ForwardDrop::LeaseExpired);
        }
        self.fan_out(Some(key), pkt, now, batch)
    }

    /// A packet relayed from `node`, whose member holds `epoch`: fanned out to every latched local member
    /// if that is the channel's current remote grant and `node` holds it (when the control thread named
    /// the node). A newer epoch than this shard knows fences a local holder at once — another node was
    /// granted the floor, so ours is stale — but its media waits until the grant is confirmed through the
    /// store: an epoch carried by a packet is not a grant.
    pub fn forward_remote(
        &mut self,
        epoch: u64,
        node: &str,
        pkt: &RtpView<'_>,
        now: Instant,
        batch: &mut Batch,
    ) -> Result<(), ForwardDrop> {
        if epoch >= crate::floor::MAX_EPOCH {
            return Err(ForwardDrop::StaleEpoch);
        }
        if epoch > self.epoch {
            if self.speaker.take().is_some() {
                self.speaker_name.clear();
                self.until = None;
            }
            return Err(ForwardDrop::StaleEpoch);
        }
        if !self.remote || epoch != self.epoch {
            return Err(ForwardDrop::StaleEpoch);
        }
        if self.remote_node.as_deref().is_some_and(|n| n != node) {
            return Err(ForwardDrop::NotGrantHolder);
        }
        self.fan_out(None, pkt, now, batch)
    }

    /// The local burst that is over (the floor moved on, or nobody local speaks any more): its epoch and
    /// the packets forwarded, once.
    pub fn take_ended_burst(&mut self) -> Option<(u64, u64)> {
        let (epoch, _) = self.burst?;
        if epoch == self.epoch && self.speaker.is_some() {
            return None;
        }
        self.burst.take()
    }

    /// Where to relay a local speaker's packets.
    pub fn relay_targets(&self) -> &[RawAddr] {
        &self.relay_targets
    }

    /// Replaces the other nodes' relay addresses (pushed by the control thread from the registry).
    pub fn set_relay_targets(&mut self, targets: Vec<RawAddr>) {
        self.relay_targets = targets;
    }

    /// The local speaker's name, for the relay prefix (empty when the holder is remote or gone).
    pub fn speaker_name(&self) -> &str {
        &self.speaker_name
    }

    fn fan_out(
        &mut self,
        from: Option<MemberKey>,
        pkt: &RtpView<'_>,
        now: Instant,
        batch: &mut Batch,
    ) -> Result<(), ForwardDrop> {
        let inbound = match self.ingress.accept(self.epoch, pkt) {
            IngressVerdict::Forward(inbound) => inbound,
            IngressVerdict::TooOld => return Err(ForwardDrop::TooOld),
            IngressVerdict::PaddingOnly => {
                self.last_media = now;
                return Err(ForwardDrop::PaddingOnly);
            }
        };
        self.last_media = now;
        if let Some((_, packets)) = self.burst.as_mut().filter(|_| from.is_some()) {
            *packets += 1;
        }
        let payload_len = pkt.payload.len();
        for m in self.members.iter_mut() {
            if Some(m.key) == from {
                m.last_heard = Some(now);
                continue;
            }
            if !m.latched(now) || !m.listens {
                continue;
            }
            if let Some(h) = m.out.rewrite(&inbound, now) {
                m.out.count(payload_len);
                match &m.leg {
                    Leg::Rtp { dest, .. } => batch.push(&m.out, h, dest),
                    Leg::WebRtc { peer } => batch.peers.push((*peer, h)),
                }
            }
        }
        Ok(())
    }

    /// T1: the speaker of the current epoch has sent nothing for `t1`. Reported once per grant.
    pub fn poll_silence(&mut self, now: Instant, t1: Duration) -> Option<u64> {
        if self.speaker.is_some()
            && !self.silence_reported
            && now.saturating_duration_since(self.last_media) >= t1
        {
            self.silence_reported = true;
            return Some(self.epoch);
        }
        None
    }

    /// When [`Self::poll_silence`] next has something to say: T1 after the last media of a local holder
    /// not yet reported silent.
    pub fn silence_due(&self, t1: Duration) -> Option<Instant> {
        (self.speaker.is_some() && !self.silence_reported).then(|| self.last_media + t1)
    }

    /// True when the channel forwarded media within `window` before `now` (its listener streams may
    /// need sender reports).
    pub fn media_within(&self, now: Instant, window: Duration) -> bool {
        now.saturating_duration_since(self.last_media) < window
    }

    /// Sender reports for every latched listener stream that has carried media (RFC 3550 §6.4.1).
    /// Only streams that carried media within `recent` get one: an idle stream has nothing to report
    /// (RFC 3550 §6.4: SR from active senders).
    pub fn sender_reports(
        &self,
        now: Instant,
        recent: Duration,
        ntp: u64,
        out: &mut Vec<([u8; SR_LEN], RawAddr)>,
    ) {
        for m in &self.members {
            // WebRTC legs get their sender reports from str0m.
            let Leg::Rtp { dest, .. } = m.leg else {
                continue;
            };
            if m.latched(now) && m.out.sent_within(now, recent) {
                let mut sr = [0u8; SR_LEN];
                crate::rtp::write_sender_report(
                    &mut sr,
                    m.out.ssrc,
                    ntp,
                    m.out.timestamp_at(now),
                    m.out.packets,
                    m.out.octets,
                );
                out.push((sr, dest));
            }
        }
    }
}

#[cfg(test)]
mod tests;
