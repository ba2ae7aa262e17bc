//! One WebRTC member: a str0m `Rtc` in ICE-lite, RTP mode, living on its channel's shard.
//!
//! str0m is sans-IO like the rest of the shard: datagrams and time go in, datagrams to send, events and
//! the next deadline come out. This wrapper fixes the choices of design.md "RTCP and SDP":
//! - ICE-lite (the server has one host candidate: the shard's own UDP port), DTLS passive, one certificate
//!   per process (building a cert per peer costs milliseconds of CPU).
//! - RTP mode: payloads go in and out as RTP packets, never depacketized, so the `Arc<[u8]>` str0m hands
//!   us from one speaker is the same allocation written to every listener.
//! - Only Opus (with `useinbandfec=1`), no NACK/RTX, no transport-cc or abs-send-time (they would make
//!   every listener send feedback every 50–100 ms for nothing); only the audio level extension.
//!
//! - The listener's audio does not go through the `Rtc`: the DTLS keys are captured on their way to
//!   str0m ([`super::keys`]) and the shard seals each forwarded packet itself ([`super::egress`]), so
//!   str0m is driven only by the client's datagrams and its own deadlines, never per forwarded packet.
//! - Once ICE and DTLS are up the `Rtc` is dropped altogether and the peer is served by
//!   [`super::settled`]: consent checks, inbound SRTP, reports — a few KB per member (mostly the kept
//!   DTLS instance and the ciphers) instead of str0m's ≈ 60 KB, and no str0m timers.
//!
//! Randomness (the ICE password) comes from the caller's generator, so a test can seed the shard and get
//! the same peer twice; the SSRC of the listener stream is str0m's own pick.

#![warn(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use rtpio::RawAddr;
use str0m::change::SdpOffer;
use str0m::format::Codec;
use str0m::media::Mid;
use str0m::net::{Protocol, Receive};
use str0m::rtp::Ssrc;
use str0m::{Candidate, Event as RtcEvent, IceConnectionState, Input, Output, Rtc};
use tracing::debug;

use super::egress::Egress;
pub use super::event::{Inbound, PeerEvent, Transmit};
use super::ingress::Ingress;
use super::keys::{build_with_slot, KeySlot};
use super::rtc_config::rtc_config;
pub use super::rtc_config::{PeerError, WebRtcConfig};
use super::settled::Settled;
use super::srtp::SrtpContext;
use crate::forward::{OutHeader, RelayCopies};
use crate::rtp::Kind;

/// A peer that has not completed ICE and DTLS by then is given up (the client never used the answer).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A peer that has not sent one valid STUN connectivity check by then is given up: a browser sends its
/// first check within milliseconds of reading the answer, so only an offer never used waits this long.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// Length of the server's ICE username fragment (unique per shard: STUN is routed by it).
pub const UFRAG_LEN: usize = 16;
/// Length of the server's ICE password. 24 letters a–z carry 112 bits; RFC 8445 §5.3 asks for 128 (28
/// letters). Kept at 24 by the architecture pass, which changes no behaviour: raise it on its own.
const PASS_LEN: usize = 24;

/// `len` random lowercase letters from `rng`: a valid ICE ufrag or password (RFC 8445 `ice-char`).
pub fn ice_token(rng: &mut impl Rng, len: usize) -> String {
    (0..len)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// One WebRTC member: its str0m side (ICE-lite, DTLS-SRTP, RTP mode) until it settles, then its
/// [`Settled`] state.
// `repr(C)`, the fields a forwarded copy reads first: the egress and the two flags `seal` checks sit in
// the slot's first cache lines, which the fan-out prefetches a few listeners ahead ([`HOT_LEN`]).
#[repr(C)]
pub struct WebRtcPeer {
    /// The listener stream's egress, once DTLS has produced keys (and the client can hear).
    egress: Option<Egress>,
    /// ICE and DTLS are up.
    pub connected: bool,
    /// The peer is finished (closed by either side, timed out, or failed); it is only drained now.
    pub closed: bool,
    /// str0m's side while the handshake may still need it; `None` once settled (boxed: it is large,
    /// and the slab slot must shrink when it goes).
    rtc: Option<Box<Rtc>>,
    /// The server's ICE password (handed to the settled state).
    pass: String,
    /// The CNAME str0m declared for the listener stream in the answer.
    cname: Option<String>,
    /// Opens the client's SRTP once keys are known (handed to the settled state).
    ingress: Option<Ingress>,
    /// The peer after its handshake, served without str0m.
    // Boxed, like the `Rtc`: it is read for the peer's own datagrams only, and inline (≈ 4.8 KB: a DTLS
    // instance, a STUN key) it would spread the slab slots that every forwarded copy reads
    // (`egress`, `connected`) a cache miss apart.
    settled: Option<Box<Settled>>,
    /// Where datagrams "arrive" for str0m: the host candidate, whatever address the socket is bound to.
    local: SocketAddr,
    /// The server's ICE username fragment for this peer (its key in the shard's ufrag map).
    pub ufrag: String,
    mid: Option<Mid>,
    /// The listener stream (`None` when the client offered sendonly: it cannot hear).
    tx: Option<Ssrc>,
    /// Opus payload type negotiated with this client (Chrome 111, Firefox 109).
    pub pt: u8,
    /// Where the DTLS instance leaves the keying material.
    keys: Arc<KeySlot>,
    /// Where str0m last sent a non-STUN datagram: its nominated address (the egress starts there).
    send_to: Option<RawAddr>,
    /// A connectivity check with this peer's credentials arrived: a client is really there. Until then
    /// the peer holds a handshake slot on the strength of an offer alone, so it gets only
    /// [`VERIFY_TIMEOUT`] and is the first evicted when the shard is full.
    pub verified: bool,
    /// When the peer was built (the oldest unverified one is evicted first).
    pub created: Instant,
    connect_deadline: Instant,
    /// The next instant this peer must be driven; the shard's timer heap holds it.
    pub deadline: Instant,
}

/// Octets from the start of a [`WebRtcPeer`] that [`WebRtcPeer::seal`] reads.
pub const HOT_LEN: usize = std::mem::offset_of!(WebRtcPeer, closed) + 1;

impl WebRtcPeer {
    /// Builds the `Rtc`, accepts the (already validated) offer and returns the peer with its SDP answer.
    /// `ufrag` must be unique on the shard: STUN checks are routed by it before the address is known.
    /// The ICE password is drawn from `rng`.
    pub fn accept(
        shared: &WebRtcConfig,
        offer: SdpOffer,
        ufrag: String,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Result<(Self, String), PeerError> {
        let pass = ice_token(rng, PASS_LEN);
        let keys = Arc::new(KeySlot::default());
        let mut rtc = build_with_slot(rtc_config(shared, &ufrag, pass.clone()), now, keys.clone());
        let candidate = Candidate::host(shared.candidate, "udp")
            .map_err(|e| PeerError::Candidate(e.to_string()))?;
        rtc.add_local_candidate(candidate);
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| PeerError::Offer(e.to_string()))?;
        let mut peer = WebRtcPeer {
            rtc: Some(Box::new(rtc)),
            pass,
            cname: None,
            ingress: None,
            settled: None,
            local: shared.candidate,
            ufrag,
            mid: None,
            tx: None,
            pt: 0,
            keys,
            egress: None,
            send_to: None,
            connected: false,
            closed: false,
            verified: false,
            created: now,
            connect_deadline: now + CONNECT_TIMEOUT,
            deadline: now,
        };
        let answer = answer.to_sdp_string();
        // The offer was checked to have exactly one m-line, so the answer has one mid.
        let mid: Mid = answer
            .lines()
            .find_map(|l| l.trim().strip_prefix("a=mid:"))
            .ok_or(PeerError::NoMid)?
            .into();
        peer.mid = Some(mid);
        let (mut out, mut events) = (Vec::new(), Vec::new());
        peer.drain(now, &mut out, &mut events);
        let rtc = peer.rtc.as_deref_mut().ok_or(PeerError::NoMid)?;
        let media = rtc.media(mid).ok_or(PeerError::NoMid)?;
        let remote = media.remote_pts().to_vec();
        let opus = rtc
            .codec_config()
            .find(|p| p.spec().codec == Codec::Opus && remote.contains(&p.pt()))
            .ok_or(PeerError::NoOpus)?;
        peer.pt = *opus.pt();
        peer.tx = rtc
            .direct_api()
            .stream_tx_by_mid(mid, None)
            .map(|s| s.ssrc());
        if let Some(ssrc) = peer.tx {
            let prefix = format!("a=ssrc:{} cname:", *ssrc);
            peer.cname = answer
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
                .map(str::to_string);
        }
        Ok((peer, answer))
    }

    /// The SSRC of the stream this peer hears (for the record; str0m owns it).
    pub fn listener_ssrc(&self) -> Option<u32> {
        self.tx.map(|s| *s)
    }

    /// One datagram from the client (STUN, DTLS, SRTP or SRTCP). Returns false if str0m refused it.
    pub fn handle_receive(
        &mut self,
        now: Instant,
        source: SocketAddr,
        data: &[u8],
        out: &mut Vec<Transmit>,
        events: &mut Vec<PeerEvent>,
    ) -> bool {
        if self.closed {
            return false;
        }
        let kind = crate::rtp::classify(data);
        if let (Some(s), Some(e)) = (self.settled.as_mut(), self.egress.as_mut()) {
            let accepted = s.handle_receive(now, source, data, e, out, events);
            if accepted && kind == Kind::Stun {
                self.verified = true;
            }
            self.deadline = s.deadline();
            if s.closed_by_client() {
                self.close_with(events, "dtls_closed", false);
            }
            return accepted;
        }
        let Ok(contents) = Receive::new(Protocol::Udp, source, self.local, data) else {
            return false;
        };
        let Some(rtc) = self.rtc.as_deref_mut() else {
            return false;
        };
        if let Err(e) = rtc.handle_input(Input::Receive(now, contents)) {
            debug!(ufrag = %self.ufrag, error = %e, "peer refused a datagram");
            return false;
        }
        if kind == Kind::Stun {
            // str0m took a STUN message routed here by our ufrag: a client holding the answer is there.
            self.verified = true;
            self.follow_nomination(source, data);
        }
        self.drain(now, out, events);
        true
    }

    /// Drives time: retransmits, RTCP reports, ICE consent, and packets queued by [`Self::write`].
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        out: &mut Vec<Transmit>,
        events: &mut Vec<PeerEvent>,
    ) {
        if self.closed {
            return;
        }
        if !self.connected && now >= self.connect_deadline {
            self.close_with(events, "connect_timeout", true);
            return;
        }
        if !self.verified && now >= self.created + VERIFY_TIMEOUT {
            self.close_with(events, "no_connectivity_check", true);
            return;
        }
        if let (Some(s), Some(e)) = (self.settled.as_mut(), self.egress.as_mut()) {
            let closed = s.handle_timeout(now, e, out);
            self.deadline = s.deadline();
            if let Some(why) = closed {
                self.close_with(events, why, false);
            }
            return;
        }
        let Some(rtc) = self.rtc.as_deref_mut() else {
            return;
        };
        if let Err(e) = rtc.handle_input(Input::Timeout(now)) {
            debug!(ufrag = %self.ufrag, error = %e, "peer timeout failed");
        }
        self.drain(now, out, events);
    }

    /// True once the peer is served without its `Rtc`.
    pub fn is_settled(&self) -> bool {
        self.settled.is_some()
    }

    /// Drops the `Rtc` once ICE and DTLS are up and the keys are known: from now on the peer is served
    /// by its [`Settled`] state, which keeps the DTLS instance (a client whose last handshake flight was
    /// lost retransmits its own, and the instance answers it again; a `close_notify` is read).
    /// A client that cannot hear (sendonly: no listener stream, no egress) stays with str0m.
    fn settle(&mut self, now: Instant) {
        if self.settled.is_some() || !self.connected || self.closed || self.egress.is_none() {
            return;
        }
        let Some(ingress) = self.ingress.take() else {
            return;
        };
        let mut settled = Settled::new(self.pass.clone(), ingress, self.cname.clone(), now);
        // Dropping the `Rtc` leaves its DTLS instance in the key slot.
        self.rtc = None;
        settled.keep_dtls(KeySlot::take_dtls(&mut self.keys));
        self.deadline = settled.deadline();
        self.settled = Some(Box::new(settled));
        debug!(ufrag = %self.ufrag, "peer settled: served without its Rtc");
    }

    /// Seals one listener packet (rewritten header, the speaker's payload) into `out`, addressed to the
    /// client. False when the peer cannot hear (not connected, closed, sendonly, no keys yet).
    #[inline]
    pub fn seal(
        &mut self,
        h: OutHeader,
        payload: &[u8],
        now: Instant,
        out: &mut RelayCopies,
    ) -> bool {
        match (&mut self.egress, self.connected, self.closed) {
            (Some(e), true, false) => e.seal(h, payload, now, out),
            _ => false,
        }
    }

    /// Starts loading the listener's SRTP key into the cache, for a [`Self::seal`] a few copies later.
    #[inline]
    pub fn prefetch_key(&self) {
        if let Some(e) = &self.egress {
            e.prefetch();
        }
    }

    /// The listener's egress context (tests read its sequence state).
    pub fn egress(&self) -> Option<&Egress> {
        self.egress.as_ref()
    }

    /// A STUN check that nominates a path other than the one media goes to: str0m may now send
    /// elsewhere (ICE re-nomination, a mobile handover). Its send address is private, so it is asked to
    /// send something — an empty application feedback packet, ignored by receivers — whose destination
    /// ([`Self::drain`]) then moves the egress at once rather than at the next RTCP report.
    fn follow_nomination(&mut self, source: SocketAddr, data: &[u8]) {
        let (Some(e), Some(ssrc), true) = (&self.egress, self.tx, self.connected) else {
            return;
        };
        if e.dest.is_some_and(|d| d.to_socket_addr() == source) || !super::stun_use_candidate(data)
        {
            return;
        }
        if let Some(rtc) = self.rtc.as_deref_mut() {
            rtc.direct_api()
                .send_app_specific_feedback(ssrc, ssrc, Vec::new());
        }
    }

    /// Builds (or re-keys) the egress once the DTLS instance has left new keying material in the slot.
    fn sync_keys(&mut self) {
        let Some(ssrc) = self.tx else { return };
        let Some((generation, c)) = self.keys.latest() else {
            return;
        };
        if self
            .egress
            .as_ref()
            .is_some_and(|e| e.generation == generation)
        {
            return;
        }
        // The client seals with the other half (RFC 5764 §4.2): what the settled peer opens with.
        match SrtpContext::from_material(c.profile, &c.material, !c.active) {
            Ok(srtp) => self.ingress = Some(Ingress::new(srtp)),
            Err(e) => debug!(ufrag = %self.ufrag, error = %e, "no ingress keys"),
        }
        match SrtpContext::from_material(c.profile, &c.material, c.active) {
            Ok(srtp) => match self.egress.as_mut() {
                Some(e) => e.rekey(srtp, generation),
                None => {
                    let mut e = Egress::new(srtp, generation, *ssrc, self.pt);
                    e.dest = self.send_to;
                    self.egress = Some(e);
                }
            },
            Err(e) => debug!(ufrag = %self.ufrag, error = %e, "no egress keys"),
        }
    }

    /// Starts a clean shutdown (RTCP BYE; DTLS close_notify while str0m still runs the peer) and
    /// drains what that sends.
    pub fn close(&mut self, out: &mut Vec<Transmit>) {
        if self.closed {
            return;
        }
        if let (Some(s), Some(e)) = (self.settled.as_mut(), self.egress.as_mut()) {
            s.close(Instant::now(), e, out);
        } else if let Some(rtc) = self.rtc.as_deref_mut() {
            let _ = rtc.close();
            let mut events = Vec::new();
            self.drain(Instant::now(), out, &mut events);
        }
        self.closed = true;
    }

    /// Reports the peer closed (once); `disconnect` also makes the `Rtc` inert at once.
    fn close_with(&mut self, events: &mut Vec<PeerEvent>, why: &'static str, disconnect: bool) {
        if let (true, Some(rtc)) = (disconnect, self.rtc.as_deref_mut()) {
            rtc.disconnect();
        }
        if !self.closed {
            self.closed = true;
            events.push(PeerEvent::Closed(why));
        }
    }

    /// The drain loop (str0m's `poll_output` until `Timeout`), documented once: transmits are queued for
    /// the shard's socket, events are reported, and the next deadline is kept for the timer heap.
    /// str0m's non-STUN datagrams go to its nominated address, which the egress follows; its SRTCP is
    /// re-sealed by the egress (see [`super::egress`]); STUN answers go where the check came from.
    fn drain(&mut self, now: Instant, out: &mut Vec<Transmit>, events: &mut Vec<PeerEvent>) {
        loop {
            let Some(rtc) = self.rtc.as_deref_mut() else {
                return;
            };
            if !rtc.is_alive() {
                self.close_with(events, "closed", false);
                return;
            }
            match rtc.poll_output() {
                Ok(Output::Timeout(at)) => {
                    self.deadline = match (self.connected, self.verified) {
                        (true, _) => at,
                        (false, true) => at.min(self.connect_deadline),
                        (false, false) => at
                            .min(self.connect_deadline)
                            .min(self.created + VERIFY_TIMEOUT),
                    };
                    // Everything str0m had to send (the last DTLS flight included) is out.
                    self.settle(now);
                    return;
                }
                Ok(Output::Transmit(t)) => {
                    let dest = RawAddr::new(t.destination);
                    let kind = crate::rtp::classify(&t.contents);
                    if kind == Kind::Stun {
                        out.push((t.contents.into(), dest));
                        continue;
                    }
                    self.send_to = Some(dest);
                    self.sync_keys();
                    match (kind, self.egress.as_mut()) {
                        (Kind::Rtcp, Some(e)) => {
                            e.dest = Some(dest);
                            match e.reseal_rtcp(&t.contents, now) {
                                Ok(p) => out.push((p, dest)),
                                // Never sent as str0m sealed it: its index is not ours.
                                Err(err) => {
                                    debug!(ufrag = %self.ufrag, error = %err, "RTCP dropped")
                                }
                            }
                        }
                        (_, e) => {
                            if let Some(e) = e {
                                e.dest = Some(dest);
                            }
                            out.push((t.contents.into(), dest));
                        }
                    }
                }
                Ok(Output::Event(e)) => match e {
                    RtcEvent::RtpPacket(p) => events.push(PeerEvent::Media(p.into())),
                    RtcEvent::Connected => {
                        self.sync_keys();
                        self.connected = true;
                        events.push(PeerEvent::Connected);
                    }
                    RtcEvent::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        self.close_with(events, "ice_disconnected", true);
                        return;
                    }
                    // The client closed DTLS: str0m still drains its own close_notify and BYE.
                    RtcEvent::Closed => self.close_with(events, "dtls_closed", false),
                    // `loss` is set only when receiver reports came since the last stats event.
                    RtcEvent::MediaEgressStats(stats) => {
                        if let (Some(loss), Some(remote)) = (stats.loss, stats.remote) {
                            events.push(PeerEvent::Report {
                                fraction_lost: (loss.clamp(0.0, 1.0) * 255.0) as u8,
                                jitter: remote.jitter,
                            });
                        }
                    }
                    _ => {}
                },
                Err(e) => {
                    debug!(ufrag = %self.ufrag, error = %e, "peer failed");
                    self.close_with(events, "error", true);
                    return;
                }
            }
        }
    }
}
