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
    /// A WebRTC peer of the shard: the header goes to its `Rtc`, which encrypts and sends.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpeakerChange {
    /// The floor was granted at `epoch`; `speaker` is the local member to forward, or `None` when the
    /// holder is not on this shard (its media does not arrive here).
    Granted {
        /// The local holder, if it is local.
        speaker: Option<MemberKey>,
        /// The grant's epoch.
        epoch: u64,
    },
    /// The floor of `epoch` is free.
    Idle {
        /// The epoch of the grant that ended.
        epoch: u64,
    },
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
}

/// One channel on its shard.
#[derive(Debug)]
pub struct Channel {
    /// The channel's name (unique on the node; the shard finds it by name).
    pub name: String,
    members: Vec<Member>,
    speaker: Option<MemberKey>,
    /// The floor is held at `epoch` by a member of another node: its media arrives by relay.
    remote: bool,
    /// Name of the local speaker, for the relay prefix.
    speaker_name: String,
    epoch: u64,
    ingress: Ingress,
    /// Other nodes' relay addresses for this channel: each local speaker packet goes once to each.
    relay_targets: Vec<RawAddr>,
    last_media: Instant,
    silence_reported: bool,
}

impl Channel {
    /// An empty channel; `now` starts the silence clock.
    pub fn new(name: String, now: Instant) -> Self {
        Channel {
            name,
            members: Vec::new(),
            speaker: None,
            remote: false,
            speaker_name: String::new(),
            epoch: 0,
            ingress: Ingress::default(),
            relay_targets: Vec::new(),
            last_media: now,
            silence_reported: false,
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

    /// The epoch of the last grant applied (the epoch rules compare against it).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// True when no member is left (the shard then forgets the channel).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Adds a member; it hears nothing until it is heard from (latching).
    pub fn add(&mut self, member: Member) {
        self.members.push(member);
    }

    /// Removes a member; a speaker that leaves stops being forwarded at once.
    pub fn remove(&mut self, key: MemberKey) -> Option<Member> {
        let i = self.members.iter().position(|m| m.key == key)?;
        if self.speaker == Some(key) {
            self.speaker = None;
        }
        Some(self.members.swap_remove(i))
    }

    /// Applies a speaker change by the epoch rules; returns whether it changed anything.
    pub fn apply(&mut self, change: SpeakerChange, now: Instant) -> bool {
        match change {
            SpeakerChange::Granted { speaker, epoch } if epoch > self.epoch => {
                self.epoch = epoch;
                self.speaker = speaker;
                self.remote = speaker.is_none();
                self.speaker_name.clear();
                if let Some(m) = self.members.iter().find(|m| Some(m.key) == speaker) {
                    self.speaker_name.push_str(&m.name);
                }
                self.ingress.reset();
                self.last_media = now;
                self.silence_reported = false;
                true
            }
            SpeakerChange::Idle { epoch } if epoch == self.epoch => {
                self.speaker = None;
                self.remote = false;
                true
            }
            _ => false,
        }
    }

    /// A packet (RTP or RTCP) arrived from member `key`: it is alive and may be sent to.
    pub fn heard(&mut self, key: MemberKey, now: Instant) {
        if let Some(m) = self.members.iter_mut().find(|m| m.key == key) {
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
        self.fan_out(Some(key), pkt, now, batch)
    }

    /// A packet relayed from the node of the remote holder of `epoch`: fanned out to every latched local
    /// member, by the same epoch rule as local media.
    pub fn forward_remote(
        &mut self,
        epoch: u64,
        pkt: &RtpView<'_>,
        now: Instant,
        batch: &mut Batch,
    ) -> Result<(), ForwardDrop> {
        if epoch > self.epoch && self.speaker.is_none() {
            // The relay can beat pub/sub: the speaker's node forwards from the moment its grant is
            // acknowledged, while our control thread hears of the grant a little later. An authenticated
            // packet from a registered node at a newer epoch is that grant: adopt it, so the first words of
            // the burst are not lost. (Never over a local speaker: the control thread settles that case.)
            self.epoch = epoch;
            self.remote = true;
            self.ingress.reset();
        }
        if !self.remote || epoch != self.epoch {
            return Err(ForwardDrop::StaleEpoch);
        }
        self.fan_out(None, pkt, now, batch)
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
        let payload_len = pkt.payload.len();
        for m in self.members.iter_mut() {
            if Some(m.key) == from {
                m.last_heard = Some(now);
                continue;
            }
            if !m.latched(now) {
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
