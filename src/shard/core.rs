//! The shard's state without its socket: channels, the address map, counters. The glommio loop in
//! `shard/mod.rs` feeds it datagrams, commands and ticks with the time; it answers with a batch to send and
//! events for the control thread. Tests drive it directly, without sockets or clocks.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::channel::{Channel, ForwardDrop, Leg, Member, MemberKey, SpeakerChange};
use crate::forward::{Batch, OutStream, RawAddr};
use crate::peer::webrtc::{PeerEvent, Transmit, WebRtcConfig};
use crate::peer::{PeerId, Peers};
use crate::relay::{RelayError, RelayKey};
use crate::rtp::{self, Kind, RtpError, RtpView, MAX_DATAGRAM, SR_LEN};

use super::{Command, Event, ShardStats, DROP_REASONS};

/// Payload type of Opus on plain-RTP legs (protocol v1).
pub const OPUS_PT: u8 = 111;

/// Why a datagram was dropped. The order matches [`DROP_REASONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Drop {
    TooShort = 0,
    BadVersion,
    Malformed,
    Oversized,
    UnknownSource,
    NotHolder,
    NotOpus,
    Stale,
    NotRtp,
    /// A datagram of a WebRTC peer that str0m refused (bad DTLS, SRTP authentication, …).
    PeerRefused,
}

impl From<RtpError> for Drop {
    fn from(e: RtpError) -> Self {
        match e {
            RtpError::TooShort => Drop::TooShort,
            RtpError::BadVersion => Drop::BadVersion,
            RtpError::BadHeader | RtpError::BadPadding => Drop::Malformed,
        }
    }
}

/// What to do with a received datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send the batch with this range of the datagram as the shared payload.
    Forward(Range<usize>),
    /// Send the batch with this payload (a WebRTC speaker's packet, already decrypted by str0m).
    ForwardShared(Arc<[u8]>),
    /// Taken by a WebRTC peer (STUN, DTLS, SRTCP, or media that went only to WebRTC listeners); what it
    /// produced waits in [`ShardCore::poll_transmits`].
    Peer,
    /// An RTCP packet from a member (it latches; nothing is forwarded).
    Rtcp,
    Dropped(Drop),
}

/// Timer settings the shard needs.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub t1: Duration,
    /// Interval of the server's sender reports on each listener stream.
    pub sr_interval: Duration,
    /// WebRTC members are refused when `None` (the shard then has no certificate).
    pub webrtc: Option<WebRtcConfig>,
    /// How often the shard loop calls [`ShardCore::handle_tick`].
    pub tick: Duration,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            t1: Duration::from_secs(4),
            sr_interval: Duration::from_secs(5),
            webrtc: None,
            tick: Duration::from_millis(50),
        }
    }
}

/// A shard's channels and peers.
pub struct ShardCore {
    index: usize,
    config: ShardConfig,
    channels: Vec<Option<Channel>>,
    free_slots: Vec<usize>,
    by_name: HashMap<String, usize>,
    /// Source address → the memberships it carries (a dispatcher may use one address in several channels).
    by_addr: HashMap<SocketAddr, Vec<(usize, MemberKey)>>,
    stats: ShardStats,
    peers: Peers,
    /// Datagrams the WebRTC peers produced, waiting for the socket.
    transmits: Vec<Transmit>,
    /// Events produced outside `handle_command` (a peer closed), waiting for the control thread.
    events: Vec<Event>,
    // Scratch space kept between calls so that the packet path does not allocate.
    peer_events: Vec<PeerEvent>,
    listener_events: Vec<PeerEvent>,
    due: Vec<PeerId>,
    spill: Batch,
    tick_count: usize,
    relay: Option<RelayState>,
    relay_out: RelayOut,
}

/// The relay settings of a shard: the cluster key, this node's id, and the relay addresses of the
/// registered nodes (the only senders accepted).
#[derive(Debug, Clone)]
pub struct RelayState {
    pub key: RelayKey,
    pub node: String,
    pub peers: HashSet<SocketAddr>,
}

/// One relay datagram and its destinations; reused between packets.
#[derive(Debug, Default)]
pub struct RelayOut {
    pub data: Vec<u8>,
    pub dests: Vec<RawAddr>,
}

impl ShardCore {
    pub fn new(index: usize, config: ShardConfig, now: Instant) -> Self {
        Self::with_relay(index, config, None, now)
    }

    /// A shard that relays to and accepts from other nodes.
    pub fn with_relay(
        index: usize,
        config: ShardConfig,
        relay: Option<RelayState>,
        _now: Instant,
    ) -> Self {
        ShardCore {
            relay,
            relay_out: RelayOut::default(),
            index,
            config,
            channels: Vec::new(),
            free_slots: Vec::new(),
            by_name: HashMap::new(),
            by_addr: HashMap::new(),
            stats: ShardStats {
                shard: index,
                ..Default::default()
            },
            peers: Peers::default(),
            transmits: Vec::new(),
            events: Vec::new(),
            peer_events: Vec::new(),
            listener_events: Vec::new(),
            due: Vec::new(),
            spill: Batch::default(),
            tick_count: 0,
        }
    }

    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn stats(&self) -> ShardStats {
        let mut s = self.stats.clone();
        s.channels = self.by_name.len() as u64;
        s.members =
            self.by_addr.values().map(|v| v.len() as u64).sum::<u64>() + self.peers.len() as u64;
        s.peers = self.peers.len() as u64;
        s
    }

    /// Counts datagrams the socket layer actually sent (or failed to).
    pub fn count_sent(&mut self, sent: usize, failed: usize) {
        self.stats.forwarded += sent as u64;
        self.stats.send_errors += failed as u64;
    }

    pub fn count_would_block(&mut self, n: usize) {
        self.stats.send_would_block += n as u64;
    }

    pub fn count_reports(&mut self, n: usize) {
        self.stats.sender_reports += n as u64;
    }

    pub fn count_lost_event(&mut self) {
        self.stats.events_lost += 1;
    }

    pub fn channel(&self, name: &str) -> Option<&Channel> {
        self.by_name
            .get(name)
            .and_then(|&i| self.channels[i].as_ref())
    }

    /// One received datagram. On `Forward`, `batch` holds a header per listener.
    pub fn handle_datagram(
        &mut self,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
        batch: &mut Batch,
    ) -> Verdict {
        self.stats.packets_in += 1;
        // Only a packet forwarded now fills it again: a stale copy must never be relayed twice.
        self.relay_out.dests.clear();
        let verdict = self.classify_and_forward(src, data, now, batch);
        if let Verdict::Dropped(d) = verdict {
            self.stats.dropped[d as usize] += 1;
        }
        verdict
    }

    fn classify_and_forward(
        &mut self,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
        batch: &mut Batch,
    ) -> Verdict {
        if data.len() > MAX_DATAGRAM {
            return Verdict::Dropped(Drop::Oversized);
        }
        let kind = rtp::classify(data);
        if let Some(peer) = self.peers.find(src, kind, data) {
            return self.handle_peer_datagram(peer, src, data, now, batch);
        }
        let Some(memberships) = self.by_addr.get(&src) else {
            return Verdict::Dropped(match kind {
                Kind::Rtp | Kind::Rtcp => Drop::UnknownSource,
                _ if data.len() < rtp::HEADER_LEN => Drop::TooShort,
                _ => Drop::NotRtp,
            });
        };
        match kind {
            Kind::Rtcp => {
                for &(slot, key) in memberships {
                    if let Some(ch) = self.channels[slot].as_mut() {
                        ch.heard(key, now);
                    }
                }
                self.stats.rtcp_in += 1;
                return Verdict::Rtcp;
            }
            Kind::Rtp => {}
            Kind::Stun | Kind::Dtls => return Verdict::Dropped(Drop::NotRtp),
            Kind::Unknown => {
                return Verdict::Dropped(match RtpView::parse(data) {
                    Err(e) => e.into(),
                    Ok(_) => Drop::NotRtp,
                })
            }
        }
        let pkt = match RtpView::parse(data) {
            Ok(p) => p,
            Err(e) => return Verdict::Dropped(e.into()),
        };
        // Whoever the address is, it is alive: latch every membership it carries.
        let mut holder = None;
        for &(slot, key) in memberships {
            if let Some(ch) = self.channels[slot].as_mut() {
                if ch.speaker() == Some(key) {
                    holder = Some((slot, key));
                } else {
                    ch.heard(key, now);
                }
            }
        }
        let Some((slot, key)) = holder else {
            return Verdict::Dropped(Drop::NotHolder);
        };
        if pkt.payload_type != OPUS_PT {
            return Verdict::Dropped(Drop::NotOpus);
        }
        let Some(ch) = self.channels[slot].as_mut() else {
            return Verdict::Dropped(Drop::UnknownSource);
        };
        match ch.forward(key, &pkt, now, batch) {
            Ok(()) => {
                if !batch.peers.is_empty() {
                    // WebRTC listeners: one copy of the payload into an `Arc`, shared by their `Rtc`s.
                    self.write_peers(batch, Arc::from(pkt.payload), now, None);
                }
                let start = pkt.payload.as_ptr() as usize - data.as_ptr() as usize;
                self.prepare_relay(slot, data);
                Verdict::Forward(start..start + pkt.payload.len())
            }
            Err(ForwardDrop::NotHolder | ForwardDrop::StaleEpoch) => {
                Verdict::Dropped(Drop::NotHolder)
            }
            Err(ForwardDrop::TooOld | ForwardDrop::PaddingOnly) => Verdict::Dropped(Drop::Stale),
        }
    }

    /// Prepares the relay copy of a local speaker's packet (once for every other node of the channel);
    /// the shard loop sends [`ShardCore::relay_out`] from the relay socket.
    pub(super) fn prepare_relay(&mut self, slot: usize, data: &[u8]) {
        self.relay_out.dests.clear();
        let (Some(relay), Some(ch)) = (self.relay.as_ref(), self.channels[slot].as_ref()) else {
            return;
        };
        if ch.relay_targets().is_empty() {
            return;
        }
        relay.key.encode(
            &mut self.relay_out.data,
            &ch.name,
            ch.epoch(),
            ch.speaker_name(),
            &relay.node,
            data,
        );
        self.relay_out.dests.extend_from_slice(ch.relay_targets());
    }

    /// The relay datagram to send after the last `handle_datagram`, and where (empty: nothing to relay).
    pub fn relay_out(&self) -> &RelayOut {
        &self.relay_out
    }

    /// Counts relay datagrams the socket layer sent.
    pub fn count_relayed(&mut self, n: usize) {
        self.stats.relay_sent += n as u64;
    }

    /// A datagram on the relay port: authenticated, from a registered node, for the current remote grant.
    pub fn handle_relay_datagram(
        &mut self,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
        batch: &mut Batch,
    ) -> Verdict {
        self.stats.relay_in += 1;
        let result = self.relay_forward(src, data, now, batch);
        match result {
            Ok(range) => Verdict::Forward(range),
            Err(e) => {
                self.stats.relay_dropped[e as usize] += 1;
                Verdict::Dropped(Drop::NotRtp)
            }
        }
    }

    fn relay_forward(
        &mut self,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
        batch: &mut Batch,
    ) -> Result<Range<usize>, RelayError> {
        let relay = self.relay.as_ref().ok_or(RelayError::UnknownNode)?;
        let pkt = relay.key.decode(data)?;
        if !relay.peers.contains(&src) {
            return Err(RelayError::UnknownNode);
        }
        let slot = *self
            .by_name
            .get(pkt.channel)
            .ok_or(RelayError::UnknownChannel)?;
        let ch = self.channels[slot]
            .as_mut()
            .ok_or(RelayError::UnknownChannel)?;
        let rtp = RtpView::parse(pkt.rtp).map_err(|_| RelayError::Malformed)?;
        match ch.forward_remote(pkt.epoch, &rtp, now, batch) {
            Ok(()) => {
                let start = rtp.payload.as_ptr() as usize - data.as_ptr() as usize;
                if !batch.peers.is_empty() {
                    // Local WebRTC listeners of a remote speaker.
                    self.write_peers(batch, Arc::from(rtp.payload), now, None);
                }
                Ok(start..start + rtp.payload.len())
            }
            Err(ForwardDrop::StaleEpoch | ForwardDrop::NotHolder) => Err(RelayError::StaleEpoch),
            Err(_) => Err(RelayError::Malformed),
        }
    }

    /// A command from the control thread; the answer, if any, is for the control thread.
    pub fn handle_command(&mut self, cmd: Command, now: Instant) -> Option<Event> {
        match cmd {
            Command::AddMember {
                channel,
                key,
                name,
                addr,
                ssrc,
            } => {
                let slot = self.channel_slot(&channel, now);
                let out = OutStream::new(
                    ssrc,
                    OPUS_PT,
                    rand::random::<u16>() & 0x7fff,
                    rand::random(),
                );
                if let Some(ch) = self.channels[slot].as_mut() {
                    ch.add(Member::new(key, name, addr, out));
                }
                self.by_addr.entry(addr).or_default().push((slot, key));
                Some(Event::MemberAdded { key })
            }
            Command::AddPeer {
                channel,
                key,
                name,
                offer,
            } => Some(self.add_peer(channel, key, name, *offer, now)),
            Command::RemoveMember { channel, key } => {
                let slot = *self.by_name.get(&channel)?;
                let ch = self.channels[slot].as_mut()?;
                let member = ch.remove(key)?;
                match member.leg {
                    Leg::Rtp { addr, .. } => {
                        if let Some(v) = self.by_addr.get_mut(&addr) {
                            v.retain(|&(s, k)| !(s == slot && k == key));
                            if v.is_empty() {
                                self.by_addr.remove(&addr);
                            }
                        }
                    }
                    Leg::WebRtc { peer } => self.remove_peer(peer),
                }
                let ch = self.channels[slot].as_mut()?;
                if ch.is_empty() {
                    self.channels[slot] = None;
                    self.by_name.remove(&channel);
                    self.free_slots.push(slot);
                }
                None
            }
            Command::Speaker { channel, change } => {
                let applied = match self
                    .by_name
                    .get(&channel)
                    .and_then(|&s| self.channels[s].as_mut())
                {
                    Some(ch) => ch.apply(change, now),
                    None => false,
                };
                if !applied {
                    self.stats.stale_speaker_changes += 1;
                }
                let epoch = match change {
                    SpeakerChange::Granted { epoch, .. } | SpeakerChange::Idle { epoch } => epoch,
                };
                Some(Event::Applied {
                    channel,
                    epoch,
                    applied,
                })
            }
            Command::RelayTargets { channel, targets } => {
                let slot = *self.by_name.get(&channel)?;
                let ch = self.channels[slot].as_mut()?;
                ch.set_relay_targets(targets.into_iter().map(RawAddr::new).collect());
                None
            }
            Command::RelayPeers { peers } => {
                if let Some(relay) = self.relay.as_mut() {
                    relay.peers = peers.into_iter().collect();
                }
                None
            }
            Command::Stats { reply } => {
                let _ = reply.try_send(self.stats());
                None
            }
            Command::Shutdown => None,
        }
    }

    /// The slot of `channel`, created if new.
    fn channel_slot(&mut self, channel: &str, now: Instant) -> usize {
        if let Some(&slot) = self.by_name.get(channel) {
            return slot;
        }
        let ch = Channel::new(channel.to_string(), now);
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.channels[s] = Some(ch);
                s
            }
            None => {
                self.channels.push(Some(ch));
                self.channels.len() - 1
            }
        };
        self.by_name.insert(channel.to_string(), slot);
        slot
    }

    /// Periodic work: T1 silence detection and sender reports. `unix` is the wall-clock time for NTP.
    pub fn handle_tick(
        &mut self,
        now: Instant,
        unix: Duration,
        events: &mut Vec<Event>,
        reports: &mut Vec<([u8; SR_LEN], RawAddr)>,
    ) {
        // Sender reports are spread over the interval: each tick covers the channels whose slot falls in
        // this slice of it, so 50,000 streams do not burst out at once every 5 s.
        let slices = (self.config.sr_interval.as_millis() / self.config.tick.as_millis().max(1))
            .max(1) as usize;
        let slice = self.tick_count % slices;
        self.tick_count = self.tick_count.wrapping_add(1);
        let ntp = rtp::ntp_from_unix(unix);
        let recent = self.config.sr_interval * 2;
        for (slot, ch) in self.channels.iter_mut().enumerate() {
            let Some(ch) = ch else { continue };
            if let Some(epoch) = ch.poll_silence(now, self.config.t1) {
                events.push(Event::Silence {
                    channel: ch.name.clone(),
                    epoch,
                });
            }
            if slot % slices == slice {
                ch.sender_reports(now, recent, ntp, reports);
            }
        }
    }
}

/// Names of the drop reasons, in [`Drop`] order, for metrics.
pub const fn drop_reason_names() -> [&'static str; DROP_REASONS] {
    [
        "too_short",
        "bad_version",
        "malformed",
        "oversized",
        "unknown_source",
        "not_holder",
        "not_opus",
        "stale",
        "not_rtp",
        "peer_refused",
    ]
}

mod webrtc;
/// Names of the relay drop reasons, in [`RelayError`] order, for metrics.
pub const fn relay_drop_names() -> [&'static str; RELAY_DROPS] {
    [
        "malformed",
        "bad_tag",
        "unknown_node",
        "stale_epoch",
        "unknown_channel",
    ]
}

/// Number of relay drop reasons.
pub const RELAY_DROPS: usize = 5;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod webrtc_tests;
