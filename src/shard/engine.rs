//! The shard's state without its socket (sans-IO): channels, the address map, the WebRTC peers and their
//! timers, counters. The I/O loop in `shard/runner.rs` feeds it datagrams, commands and ticks with the
//! time; each call answers with what it produced — a [`Verdict`] and the fan-out in the caller's
//! [`Batch`] (listener headers and relay copies alike), events for the control thread. Tests drive it
//! directly, without sockets or clocks, and seed its randomness ([`ShardConfig::seed`]).
//!
//! A datagram's walk through it goes down the layers only: classify ([`crate::rtp`]) → find the peer
//! ([`crate::peer::Peers`]) or the member (`by_addr`) → floor check and rewrite ([`Channel::forward`],
//! which uses [`crate::forward`]) → the batch.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rtpio::RawAddr;

use crate::channel::{Channel, ForwardDrop, Leg, Member, SpeakerChange};
use crate::forward::{Batch, OutStream};
use crate::ids::{MemberKey, PeerId};
use crate::peer::webrtc::{PeerEvent, Transmit};
use crate::peer::Peers;
use crate::record::RecordEvent;
use crate::rtp::{self, Kind, RtpView, MAX_DATAGRAM, SR_LEN};

use super::command::{Command, Event};
use super::stats::{DropReason, ShardStats};
use super::timers::Timers;

pub use self::relay::RelayState;

mod config;
mod relay;
mod webrtc;

pub use self::config::ShardConfig;
pub use self::webrtc::{EVICT_GRACE, MAX_HANDSHAKES};

/// Payload type of Opus on plain-RTP legs (protocol v1).
pub const OPUS_PT: u8 = 111;

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
    /// Dropped and counted.
    Dropped(DropReason),
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
    /// When each WebRTC peer must next be driven.
    timers: Timers<PeerId>,
    /// Datagrams the WebRTC peers produced, waiting for the socket.
    transmits: Vec<Transmit>,
    /// Events produced outside `handle_command` (a peer closed), waiting for the control thread.
    events: Vec<Event>,
    // Scratch space kept between calls so that the packet path does not allocate.
    peer_events: Vec<PeerEvent>,
    due: Vec<PeerId>,
    spill: Batch,
    /// Sender-report batches sent (which slice of the channels the next batch covers).
    sr_round: usize,
    /// When the next sender-report batch is due.
    next_sr: Instant,
    /// Channels whose floor is held ([`Channel::floor_held`]): kept at each change, so that the runner
    /// can ask per wake-up.
    floors_held: usize,
    /// A grant was applied since the shard's clock last asked: T1 may now be due before its heartbeat.
    retick: bool,
    relay: Option<RelayState>,
    /// A cryptographically strong generator (ChaCha): it draws ICE passwords as well as sequence starts,
    /// and a join costs milliseconds anyway.
    rng: StdRng,
}

impl ShardCore {
    /// A shard without relay.
    pub fn new(index: usize, config: ShardConfig, now: Instant) -> Self {
        Self::with_relay(index, config, None, now)
    }

    /// A shard that relays to and accepts from other nodes.
    pub fn with_relay(
        index: usize,
        config: ShardConfig,
        relay: Option<RelayState>,
        now: Instant,
    ) -> Self {
        let rng = match config.seed {
            // Shards of one seeded process still differ from each other.
            Some(seed) => {
                StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            }
            None => StdRng::from_os_rng(),
        };
        ShardCore {
            relay,
            rng,
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
            timers: Timers::default(),
            transmits: Vec::new(),
            events: Vec::new(),
            peer_events: Vec::new(),
            due: Vec::new(),
            spill: Batch::default(),
            sr_round: 0,
            next_sr: now,
            floors_held: 0,
            retick: false,
        }
    }

    /// The shard's settings.
    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    /// The shard's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// A copy of the counters, with the current channel, member and peer counts.
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

    /// Counts listeners' media datagrams (plain fan-out, sealed WebRTC) among the ones sent.
    pub fn count_media(&mut self, n: usize) {
        self.stats.media_forwarded += n as u64;
    }

    /// Counts datagrams that met a full socket buffer.
    pub fn count_would_block(&mut self, n: usize) {
        self.stats.send_would_block += n as u64;
    }

    /// Counts sender reports the socket layer sent.
    pub fn count_reports(&mut self, n: usize) {
        self.stats.sender_reports += n as u64;
    }

    /// Counts an event the control thread's full queue did not take.
    pub fn count_lost_event(&mut self) {
        self.stats.events_lost += 1;
    }

    /// The channel called `name`, if it has members on this shard.
    pub fn channel(&self, name: &str) -> Option<&Channel> {
        self.by_name
            .get(name)
            .and_then(|&i| self.channels[i].as_ref())
    }

    /// One sampled packet's time in the server, ns (the shard's I/O loop measures it).
    pub fn sample_forward_latency(&mut self, ns: u64) {
        self.stats
            .forward_latency
            .observe(&crate::metrics::buckets::FORWARD_LATENCY_NS, ns);
    }

    /// One report block from a listener (plain RTP or WebRTC): its loss and jitter, for `/metrics`.
    pub(crate) fn listener_report(&mut self, fraction_lost: u8, jitter: u32) {
        use crate::metrics::buckets::{JITTER_US, LOSS_PER_256};
        self.stats
            .rr_loss
            .observe(&LOSS_PER_256, u64::from(fraction_lost));
        // Opus's RTP clock is 48 kHz: 48 timestamp units are 1 ms.
        let jitter_us = u64::from(jitter) * 1000 / 48;
        self.stats.rr_jitter.observe(&JITTER_US, jitter_us);
    }

    /// One received datagram from the media port. On `Forward*`, `batch` gained a header per plain-RTP
    /// listener (its payload is the verdict's) and, for a local speaker of a channel with members on
    /// other nodes, the relay copies. `batch` may already hold the fan-outs of earlier datagrams of the
    /// same drain: entries are only appended.
    pub fn handle_datagram(
        &mut self,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
        batch: &mut Batch,
    ) -> Verdict {
        self.stats.packets_in += 1;
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
            return Verdict::Dropped(DropReason::Oversized);
        }
        let kind = rtp::classify(data);
        if let Some(peer) = self.peers.find(src, kind, data) {
            return self.handle_peer_datagram(peer, src, data, now, batch);
        }
        let Some(memberships) = self.by_addr.get(&src) else {
            return Verdict::Dropped(match kind {
                Kind::Rtp | Kind::Rtcp => DropReason::UnknownSource,
                _ if data.len() < rtp::HEADER_LEN => DropReason::TooShort,
                _ => DropReason::NotRtp,
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
                // A listener reports on the one stream it receives from us: a few blocks at most are
                // looked at (the array keeps the walk free of allocation).
                let mut blocks = [None; 4];
                let mut n = 0;
                self.stats.rr_reports += rtp::report_blocks(data, |b| {
                    if let Some(slot) = blocks.get_mut(n) {
                        *slot = Some(b);
                        n += 1;
                    }
                }) as u64;
                for b in blocks.into_iter().flatten() {
                    self.listener_report(b.fraction_lost, b.jitter);
                }
                return Verdict::Rtcp;
            }
            Kind::Rtp => {}
            Kind::Stun | Kind::Dtls => return Verdict::Dropped(DropReason::NotRtp),
            Kind::Unknown => {
                return Verdict::Dropped(match RtpView::parse(data) {
                    Err(e) => e.into(),
                    Ok(_) => DropReason::NotRtp,
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
            return Verdict::Dropped(DropReason::NotHolder);
        };
        if pkt.payload_type != OPUS_PT {
            return Verdict::Dropped(DropReason::NotOpus);
        }
        let Some(ch) = self.channels[slot].as_mut() else {
            return Verdict::Dropped(DropReason::UnknownSource);
        };
        match ch.forward(key, &pkt, now, batch) {
            Ok(()) => {
                if !batch.peers.is_empty() {
                    // WebRTC listeners: sealed by the shard, each into its own datagram.
                    self.write_peers(batch, pkt.payload, now);
                }
                let start = pkt.payload.as_ptr() as usize - data.as_ptr() as usize;
                self.record(slot, pkt.timestamp, pkt.payload);
                self.relay_copy(slot, data, batch);
                Verdict::Forward(start..start + pkt.payload.len())
            }
            Err(ForwardDrop::NotHolder | ForwardDrop::StaleEpoch | ForwardDrop::NotGrantHolder) => {
                Verdict::Dropped(DropReason::NotHolder)
            }
            Err(ForwardDrop::LeaseExpired) => Verdict::Dropped(DropReason::LeaseExpired),
            Err(ForwardDrop::TooOld | ForwardDrop::PaddingOnly) => {
                Verdict::Dropped(DropReason::Stale)
            }
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
                let out = self.out_stream(ssrc, OPUS_PT);
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
            Command::SetRecording { channel, on } => {
                let slot = *self.by_name.get(&channel)?;
                self.channels[slot].as_mut()?.recording = on && self.config.recorder.is_some();
                None
            }
            Command::SetListens {
                channel,
                key,
                listens,
            } => {
                let slot = *self.by_name.get(&channel)?;
                self.channels[slot].as_mut()?.set_listens(key, listens);
                None
            }
            Command::RemoveMember { channel, key } => {
                let slot = *self.by_name.get(&channel)?;
                let ch = self.channels[slot].as_mut()?;
                let held = ch.floor_held();
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
                // A holder that left, or a channel gone with its last member, holds nothing.
                let now_held = self.channels[slot]
                    .as_ref()
                    .is_some_and(Channel::floor_held);
                self.floor_changed(held, now_held);
                None
            }
            Command::Speaker { channel, change } => {
                let epoch = change.epoch();
                // A lease extension needs no acknowledgement: the floor does not wait for it.
                let lease = matches!(change, SpeakerChange::Lease { .. });
                let idle = matches!(change, SpeakerChange::Idle { .. });
                let applied = match self
                    .by_name
                    .get(&channel)
                    .and_then(|&s| self.channels[s].as_mut())
                {
                    Some(ch) => {
                        let held = ch.floor_held();
                        let applied = ch.apply(change, now);
                        let now_held = ch.floor_held();
                        if let Some((epoch, packets)) = ch.take_ended_burst() {
                            if ch.recording {
                                let end = RecordEvent::End {
                                    channel: channel.clone(),
                                    epoch,
                                };
                                if let Some(rec) = &self.config.recorder {
                                    if rec.try_send(end).is_err() {
                                        self.stats.record_dropped += 1;
                                    }
                                }
                            }
                            self.events.push(Event::BurstEnded {
                                channel: channel.clone(),
                                epoch,
                                packets,
                            });
                        }
                        self.floor_changed(held, now_held);
                        applied
                    }
                    None => false,
                };
                if !applied && !lease {
                    self.stats.stale_speaker_changes += 1;
                }
                self.retick |= applied && !idle;
                if lease {
                    return None;
                }
                Some(Event::Applied {
                    channel,
                    epoch,
                    applied,
                    idle,
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

    /// A listener stream starting at a random sequence number (below 2^15, so that the first extended
    /// number stays below 2^16 for SRTP, RFC 3711 §3.3.1) and a random timestamp (RFC 3550 §5.1).
    fn out_stream(&mut self, ssrc: u32, payload_type: u8) -> OutStream {
        let seq = self.rng.random::<u16>() & 0x7fff;
        let ts = self.rng.random();
        OutStream::new(ssrc, payload_type, seq, ts)
    }

    /// A forwarded packet of a local burst, copied once for the recorder when its channel is recorded.
    /// Never waits: a full queue is counted and the packet is missing from the file.
    pub(super) fn record(&mut self, slot: usize, timestamp: u32, payload: &[u8]) {
        let (Some(rec), Some(ch)) = (&self.config.recorder, self.channels[slot].as_ref()) else {
            return;
        };
        if !ch.recording {
            return;
        }
        let event = RecordEvent::Packet {
            channel: ch.name.clone(),
            epoch: ch.epoch(),
            timestamp,
            payload: payload.to_vec(),
        };
        if rec.try_send(event).is_err() {
            self.stats.record_dropped += 1;
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
    /// Returns when it is next due (`None`: nothing is, the shard may sleep until its heartbeat) — the
    /// shard's clock wakes for that and not on a fixed tick, so an idle shard costs nothing.
    ///
    /// Sender reports go out in batches [`SR_BATCH`] apart, each batch covering one slice of the channels
    /// (every channel once per `sr_interval`): one `sendmmsg` and one wake-up a second for all of them,
    /// rather than a report per stream whenever it falls due. A channel is visited for reports only while
    /// it carried media recently (RFC 3550 §6.4: reports from active senders).
    pub fn handle_tick(
        &mut self,
        now: Instant,
        unix: Duration,
        events: &mut Vec<Event>,
        reports: &mut Vec<([u8; SR_LEN], RawAddr)>,
    ) -> Option<Instant> {
        let batch = SR_BATCH.min(self.config.sr_interval);
        let slices =
            (self.config.sr_interval.as_millis() / batch.as_millis().max(1)).max(1) as usize;
        let report_now = now >= self.next_sr;
        let slice = self.sr_round % slices;
        if report_now {
            self.sr_round = self.sr_round.wrapping_add(1);
            self.next_sr = now + batch;
        }
        let ntp = rtp::ntp_from_unix(unix);
        let recent = self.config.sr_interval * 2;
        let t1 = self.config.t1;
        let mut due: Option<Instant> = None;
        let mut reporting = false;
        for (slot, ch) in self.channels.iter_mut().enumerate() {
            let Some(ch) = ch else { continue };
            if let Some(epoch) = ch.poll_silence(now, t1) {
                events.push(Event::Silence {
                    channel: ch.name.clone(),
                    epoch,
                });
            }
            if let Some(at) = ch.silence_due(t1) {
                due = Some(due.map_or(at, |d| d.min(at)));
            }
            if ch.media_within(now, recent) {
                reporting = true;
                if report_now && slot % slices == slice {
                    ch.sender_reports(now, recent, ntp, reports);
                }
            }
        }
        if reporting {
            due = Some(due.map_or(self.next_sr, |d| d.min(self.next_sr)));
        }
        due
    }
}

impl ShardCore {
    /// Whether any channel of this shard has its floor held (here or on another node): media may arrive
    /// that must be forwarded at once. When none has, what arrives (keep-alives, reports, consent
    /// checks, handshakes) can wait a little — the runner's quiet window.
    pub fn floor_held(&self) -> bool {
        self.floors_held > 0
    }

    fn floor_changed(&mut self, was: bool, is: bool) {
        self.floors_held = (self.floors_held + usize::from(is)).saturating_sub(usize::from(was));
    }

    /// True once after a grant was applied: the shard's clock should call [`Self::handle_tick`] now
    /// rather than at its heartbeat (T1 runs from the grant).
    pub fn take_retick(&mut self) -> bool {
        std::mem::take(&mut self.retick)
    }
}

/// Sender reports leave in batches this far apart (see [`ShardCore::handle_tick`]).
pub const SR_BATCH: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests;
#[cfg(test)]
mod webrtc_tests;
