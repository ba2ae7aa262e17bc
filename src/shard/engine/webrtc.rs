//! The shard's WebRTC side: adding and removing peers, their datagrams and timers, and sealing a fan-out
//! for the listeners (outside their `Rtc`s). Still sans-IO: what the peers want sent waits in `transmits`, events for
//! the control thread in `events`; the shard loop collects both after every call (str0m's own output is
//! produced by every call that drives a peer, timers included, so it is queued rather than returned).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;

use super::{ShardCore, Verdict, OPUS_PT};
use crate::channel::{ForwardDrop, Member};
use crate::forward::Batch;
use crate::ids::{MemberKey, PeerId};
use crate::peer::webrtc::{ice_token, Inbound, PeerEvent, Transmit, WebRtcPeer, UFRAG_LEN};
use crate::rtp::RtpView;
use crate::shard::command::{Event, PeerRefused};
use crate::shard::stats::DropReason;

/// How many listeners ahead of the copy being sealed its slot is prefetched ([`ShardCore::write_peers`]).
const SLOT_AHEAD: usize = 4;
/// How many listeners ahead its SRTP key is prefetched (after its slot, whose lines hold the key's
/// address, had a head start).
const KEY_AHEAD: usize = 2;

/// Peers being set up (ICE + DTLS not done) at once per shard. A DTLS handshake costs the shard a few
/// milliseconds of CPU (key exchange, certificate signature); a join storm must not stall the media of
/// everyone else on the core, so beyond this joins are refused `unavailable` and retried by clients.
pub const MAX_HANDSHAKES: usize = 64;

/// How long an answered offer may wait for its first connectivity check before a newer join may evict
/// it. A browser checks within milliseconds of reading its answer, but in a join storm (a thousand
/// clients reconnecting at once) answers and checks queue up: evicting at once would close peers whose
/// clients are about to connect, and the storm would feed on itself (1,600 harness clients: 103
/// connected after 16 s). Within the grace a full shard answers `unavailable` and the client retries.
pub const EVICT_GRACE: Duration = Duration::from_secs(1);

impl ShardCore {
    /// Builds the peer, accepts its offer, and registers it (ufrag at once, so the first STUN check finds
    /// it) *before* the answer goes back to the control thread and on to the client.
    pub(super) fn add_peer(
        &mut self,
        channel: String,
        key: MemberKey,
        name: String,
        offer: SdpOffer,
        now: Instant,
    ) -> Event {
        if self.peers.connecting() >= MAX_HANDSHAKES {
            // Full: the oldest peer that never sent a connectivity check makes room (it leaves its
            // channel like any closed peer) once it has had its grace; otherwise the join is refused
            // and retried by the client.
            let graced = now.checked_sub(EVICT_GRACE);
            match graced.and_then(|before| self.peers.oldest_unverified(before)) {
                Some(victim) => self.evict_peer(victim),
                None => {
                    return Event::PeerAnswered {
                        key,
                        answer: Err(PeerRefused::Busy),
                    }
                }
            }
        }
        let ufrag = loop {
            let u = ice_token(&mut self.rng, UFRAG_LEN);
            if !self.peers.ufrag_taken(&u) {
                break u;
            }
        };
        let Some(config) = self.config.webrtc.as_ref() else {
            return Event::PeerAnswered {
                key,
                answer: Err(PeerRefused::Offer(
                    "WebRTC is not enabled on this server".into(),
                )),
            };
        };
        let (peer, answer) = match WebRtcPeer::accept(config, offer, ufrag, now, &mut self.rng) {
            Ok(r) => r,
            Err(e) => {
                return Event::PeerAnswered {
                    key,
                    answer: Err(PeerRefused::Offer(e.to_string())),
                }
            }
        };
        let slot = self.channel_slot(&channel, now);
        let out = self.out_stream(peer.listener_ssrc().unwrap_or(0), peer.pt);
        let deadline = peer.deadline;
        let id = self.peers.insert(peer, slot, key);
        self.timers.schedule(id, deadline, now);
        if let Some(ch) = self.channels[slot].as_mut() {
            ch.add(Member::webrtc(key, name, id, out));
        }
        Event::PeerAnswered {
            key,
            answer: Ok(answer),
        }
    }

    /// Closes a peer to make room for a new one. Its slot stays taken (closed) until its membership leaves
    /// through the control thread (`RemoveMember`), like any closed peer: freeing it now would let a new
    /// peer reuse the id that the channel's member still names.
    fn evict_peer(&mut self, id: PeerId) {
        let Some(slot) = self.peers.get_mut(id) else {
            return;
        };
        let (channel, key) = (slot.channel, slot.key);
        slot.peer.close(&mut self.transmits);
        self.stats.peers_evicted += 1;
        self.peer_closed(channel, key, "evicted");
    }

    /// Closes a peer that left (DTLS close_notify goes out with the next transmits).
    pub(super) fn remove_peer(&mut self, id: PeerId) {
        if let Some(mut slot) = self.peers.remove(id) {
            slot.peer.close(&mut self.transmits);
        }
    }

    pub(super) fn handle_peer_datagram(
        &mut self,
        id: PeerId,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
        batch: &mut Batch,
    ) -> Verdict {
        let mut events = std::mem::take(&mut self.peer_events);
        let Some(slot) = self.peers.get_mut(id) else {
            return Verdict::Dropped(DropReason::UnknownSource);
        };
        let before = slot.peer.deadline;
        let was_settled = slot.peer.is_settled();
        let accepted = slot
            .peer
            .handle_receive(now, src, data, &mut self.transmits, &mut events);
        let (channel, key, connected) = (slot.channel, slot.key, slot.peer.connected);
        if !was_settled && slot.peer.is_settled() {
            self.stats.peers_settled += 1;
        }
        self.reschedule(id, before, now);
        if connected {
            // Consent checks and RTCP keep a WebRTC listener latched like a plain one.
            if let Some(ch) = self.channels[channel].as_mut() {
                ch.heard(key, now);
            }
        }
        let verdict = if accepted {
            self.handle_peer_events(id, &mut events, now, Some(batch))
        } else {
            Verdict::Dropped(DropReason::PeerRefused)
        };
        events.clear();
        self.peer_events = events;
        verdict
    }

    /// What a peer reported. The first media packet's plain-RTP fan-out goes into `batch` (sent with
    /// `sendmmsg` and the payload shared); any further one in the same call, or one with no batch (timer
    /// path), is spilled into owned datagrams — str0m releases several packets at once only after
    /// reordering, which is rare.
    fn handle_peer_events(
        &mut self,
        id: PeerId,
        events: &mut Vec<PeerEvent>,
        now: Instant,
        mut batch: Option<&mut Batch>,
    ) -> Verdict {
        let mut verdict = Verdict::Peer;
        // The shard loop may already hold other datagrams' fan-outs in `batch` (one `recvmmsg` drain):
        // this call owns only the entries from `base` on.
        let base = batch.as_ref().map_or(0, |b| b.len());
        for event in events.drain(..) {
            let Some(slot) = self.peers.get_mut(id) else {
                break;
            };
            let (channel, key) = (slot.channel, slot.key);
            match event {
                PeerEvent::Connected => {
                    if let Some(ch) = self.channels[channel].as_mut() {
                        ch.heard(key, now);
                        let channel = ch.name.clone();
                        self.events.push(Event::PeerConnected { channel, key });
                    }
                }
                PeerEvent::Closed(reason) => self.peer_closed(channel, key, reason),
                PeerEvent::Report {
                    fraction_lost,
                    jitter,
                } => {
                    self.stats.rr_reports += 1;
                    self.listener_report(fraction_lost, jitter);
                }
                PeerEvent::Media(pkt) => match batch.take() {
                    Some(b) if b.len() == base => {
                        // A refused packet adds no entries (the channel checks before fanning out).
                        match self.peer_media(id, &pkt, now, b) {
                            Ok(()) if b.len() > base => {
                                verdict = Verdict::ForwardShared(pkt.payload.clone())
                            }
                            Ok(()) => {}
                            Err(d) => verdict = dropped_unless_forwarded(verdict, d),
                        }
                        batch = Some(b);
                    }
                    other => {
                        batch = other;
                        let mut spill = std::mem::take(&mut self.spill);
                        match self.peer_media(id, &pkt, now, &mut spill) {
                            Ok(()) => {
                                for (h, d) in spill.headers.iter().zip(&spill.dests) {
                                    let mut datagram =
                                        Vec::with_capacity(h.len() + pkt.payload.len());
                                    datagram.extend_from_slice(h);
                                    datagram.extend_from_slice(&pkt.payload);
                                    self.transmits.push((datagram, *d));
                                }
                                for i in 0..spill.sealed.len() {
                                    let (data, d) = spill.sealed.get(i);
                                    self.transmits.push((data.to_vec(), *d));
                                }
                                // Relay copies leave with the caller's batch; on the timer path there
                                // is none, and (as before) they are not relayed.
                                if let Some(b) = batch.as_deref_mut() {
                                    b.relay.append(&mut spill.relay);
                                }
                            }
                            Err(d) => verdict = dropped_unless_forwarded(verdict, d),
                        }
                        spill.clear();
                        self.spill = spill;
                    }
                },
            }
        }
        verdict
    }

    /// A WebRTC member's RTP packet, after SRTP: forwarded only if it holds the floor.
    fn peer_media(
        &mut self,
        id: PeerId,
        pkt: &Inbound,
        now: Instant,
        batch: &mut Batch,
    ) -> Result<(), DropReason> {
        let slot = self.peers.get_mut(id).ok_or(DropReason::UnknownSource)?;
        let (channel, key) = (slot.channel, slot.key);
        if pkt.payload_type != slot.peer.pt {
            return Err(DropReason::NotOpus);
        }
        let view = RtpView {
            marker: pkt.marker,
            payload_type: pkt.payload_type,
            seq: pkt.seq,
            timestamp: pkt.timestamp,
            ssrc: pkt.ssrc,
            payload: &pkt.payload,
        };
        let ch = self.channels[channel]
            .as_mut()
            .ok_or(DropReason::UnknownSource)?;
        match ch.forward(key, &view, now, batch) {
            Ok(()) => {}
            Err(ForwardDrop::NotHolder | ForwardDrop::StaleEpoch | ForwardDrop::NotGrantHolder) => {
                return Err(DropReason::NotHolder)
            }
            Err(ForwardDrop::LeaseExpired) => return Err(DropReason::LeaseExpired),
            Err(ForwardDrop::TooOld | ForwardDrop::PaddingOnly) => return Err(DropReason::Stale),
        }
        self.record(channel, view.timestamp, view.payload);
        if self.relays(channel) {
            // Other nodes take plain RTP inside the relay envelope: rebuild the packet with the plain
            // legs' Opus payload type (header extensions and CSRCs are never forwarded anyway).
            let rtp = crate::rtp::build_packet(
                view.marker,
                OPUS_PT,
                view.seq,
                view.timestamp,
                view.ssrc,
                view.payload,
            );
            self.relay_copy(channel, &rtp, batch);
        }
        if !batch.peers.is_empty() {
            self.write_peers(batch, &pkt.payload, now);
        }
        Ok(())
    }

    /// Seals one fan-out for every WebRTC listener into `batch.sealed` (sent with the plain fan-out).
    /// The listeners' `Rtc`s are not touched: str0m runs on their own datagrams and deadlines only.
    pub(super) fn write_peers(&mut self, batch: &mut Batch, payload: &[u8], now: Instant) {
        let Batch { peers, sealed, .. } = batch;
        for (i, &(id, h)) in peers.iter().enumerate() {
            // Each listener's slot and key are read once per 20 ms, long evicted by then: ask for them
            // ahead (slot first, as the key's address is in it) so the copy does not wait on memory.
            if let Some(&(ahead, _)) = peers.get(i + SLOT_AHEAD) {
                self.peers.prefetch_slot(ahead);
            }
            if let Some(&(ahead, _)) = peers.get(i + KEY_AHEAD) {
                self.peers.prefetch_key(ahead);
            }
            // A peer not connected yet (or closing) hears nothing, like an unlatched plain member.
            if let Some(slot) = self.peers.get_mut(id) {
                slot.peer.seal(h, payload, now, sealed);
            }
        }
        peers.clear();
    }

    fn peer_closed(&mut self, channel: usize, key: MemberKey, reason: &'static str) {
        self.stats.peers_closed += 1;
        if let Some(ch) = self.channels[channel].as_ref() {
            tracing::info!(channel = %ch.name, key, reason, "WebRTC peer closed");
            self.events.push(Event::PeerClosed {
                channel: ch.name.clone(),
                key,
                reason,
            });
        }
    }

    /// Queues the peer's current deadline after it was driven (if it moved), and drops the heap's stale
    /// entries when they outnumber the live ones.
    fn reschedule(&mut self, id: PeerId, before: Instant, now: Instant) {
        if let Some(deadline) = self.peers.deadline(id).filter(|&d| d != before) {
            self.timers.schedule(id, deadline, now);
        }
        if self.timers.len() > 4 * self.peers.len() + 1024 {
            self.timers.compact(self.peers.deadlines(), now);
        }
    }

    /// Drives every peer whose deadline has come.
    pub fn handle_timers(&mut self, now: Instant) {
        let mut due = std::mem::take(&mut self.due);
        let mut events = std::mem::take(&mut self.peer_events);
        let peers = &self.peers;
        self.timers.expired(now, |id| peers.deadline(id), &mut due);
        for &id in &due {
            let Some(slot) = self.peers.get_mut(id) else {
                continue;
            };
            let before = slot.peer.deadline;
            slot.peer
                .handle_timeout(now, &mut self.transmits, &mut events);
            self.reschedule(id, before, now);
            self.handle_peer_events(id, &mut events, now, None);
        }
        due.clear();
        self.due = due;
        self.peer_events = events;
    }

    /// The earliest instant a peer must be driven (possibly a stale entry: waking early is harmless).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// Moves the datagrams the peers produced into `out` (for the socket).
    pub fn poll_transmits(&mut self, out: &mut Vec<Transmit>) {
        out.append(&mut self.transmits);
    }

    /// Moves pending events for the control thread into `out`.
    pub fn poll_events(&mut self, out: &mut Vec<Event>) {
        out.append(&mut self.events);
    }
}

/// A drop is reported only when nothing of the call was forwarded.
fn dropped_unless_forwarded(verdict: Verdict, d: DropReason) -> Verdict {
    match verdict {
        Verdict::Peer => Verdict::Dropped(d),
        other => other,
    }
}
