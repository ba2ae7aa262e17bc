//! A WebRTC member after its handshake, served without its str0m `Rtc`.
//!
//! Once ICE and DTLS are done, an audio-only ICE-lite peer needs four things, all small: answer the
//! client's consent checks (RFC 7675: one HMAC-SHA1 each), open its SRTP and SRTCP (the client half of
//! the captured keys, [`super::ingress`]), seal what it hears ([`super::egress`], unchanged), and send a
//! sender report now and then. str0m does these too, but keeps ≈ 60 KB per peer for streams, queues,
//! RTX caches, BWE and SCTP an audio listener never uses, and wakes per peer for its timers. So the
//! `Rtc` is dropped as soon as ICE and DTLS are up and the peer goes on as a [`Settled`]. Until then
//! str0m runs the handshake and every datagram goes to it.
//!
//! The DTLS instance (≈ 4 KB) is kept, taken from the dropped `Rtc`: a client whose copy of the
//! server's last handshake flight was lost retransmits its own, and the instance answers it again; a
//! client that closes its peer connection sends an authenticated `close_notify`, and the peer closes at
//! once (`dtls_closed`), as it did under str0m; a client that vanishes is noticed when its consent checks stop ([`CONSENT_TIMEOUT`],
//! the same 15 s str0m's ICE-lite allows).
//!
//! What is given up, by design: a DTLS re-handshake (browsers do not re-handshake without an ICE
//! restart, which needs a new offer), and the server's own receiver reports on the client's stream (the
//! browser's `remote-inbound-rtp` statistics for its microphone stay empty; its inbound-rtp statistics,
//! the listener's, do not).

#![warn(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use is::stun::StunMessage;
use rtpio::RawAddr;

use super::egress::Egress;
use super::event::{Inbound, PeerEvent, Transmit};
use super::ingress::Ingress;
use crate::rtp::{self, Kind, RtpView};

/// A settled peer whose client sent no valid consent check for this long is closed
/// (`ice_disconnected`): str0m's ICE-lite keeps a pair alive 15 s after the last binding request.
pub const CONSENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the server reports on the listener stream (str0m's interval for audio).
pub const REPORT_EVERY: Duration = Duration::from_secs(5);
/// The first report after the peer settled.
const FIRST_REPORT: Duration = Duration::from_secs(1);
/// Room for a binding success response: header, XOR-MAPPED-ADDRESS (IPv6), MESSAGE-INTEGRITY,
/// FINGERPRINT.
const STUN_REPLY_MAX: usize = 20 + 24 + 24 + 8;

/// What a settled peer keeps.
pub struct Settled {
    /// The server's ICE password: the key of every consent check and its answer.
    pass: String,
    stun_key: hmac::Key,
    ingress: Ingress,
    /// The CNAME the answer declared for the listener stream (its SDES says the same).
    cname: Option<String>,
    last_check: Instant,
    next_report: Instant,
    /// Where an opened packet is written before its payload is shared with the channel.
    plain: Vec<u8>,
    /// The handshake's DTLS instance, to read the client's alerts.
    dtls: Option<dimpl::Dtls>,
    /// The client closed DTLS (`close_notify`).
    closed_by_client: bool,
}

impl std::fmt::Debug for Settled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settled")
            .field("ingress", &self.ingress)
            .field("last_check", &self.last_check)
            .field("next_report", &self.next_report)
            .finish_non_exhaustive()
    }
}

impl Settled {
    /// The settled state of a peer whose ICE password is `pass`, opening with `ingress`, at `now`.
    pub fn new(pass: String, ingress: Ingress, cname: Option<String>, now: Instant) -> Self {
        let stun_key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, pass.as_bytes());
        Settled {
            pass,
            stun_key,
            ingress,
            cname,
            last_check: now,
            // The first report soon (the browser's remote-outbound statistics start with it), then
            // every REPORT_EVERY.
            next_report: now + FIRST_REPORT,
            plain: Vec::with_capacity(rtp::MAX_DATAGRAM),
            dtls: None,
            closed_by_client: false,
        }
    }

    /// Keeps the handshake's DTLS instance (once the `Rtc` that owned it is gone).
    pub fn keep_dtls(&mut self, dtls: Option<dimpl::Dtls>) {
        self.dtls = dtls;
    }

    /// True once the client closed DTLS: the peer must close.
    pub fn closed_by_client(&self) -> bool {
        self.closed_by_client
    }

    /// When the peer must next be driven: its next report, or the end of its consent.
    pub fn deadline(&self) -> Instant {
        self.next_report.min(self.last_check + CONSENT_TIMEOUT)
    }

    /// One datagram from the client. False when it was refused (malformed, not authentic, a replay, a
    /// DTLS record the kept instance did not take).
    pub fn handle_receive(
        &mut self,
        now: Instant,
        src: SocketAddr,
        data: &[u8],
        egress: &mut Egress,
        out: &mut Vec<Transmit>,
        events: &mut Vec<PeerEvent>,
    ) -> bool {
        match rtp::classify(data) {
            Kind::Stun => self.consent_check(now, src, data, egress, out),
            Kind::Rtp => {
                if self.ingress.open_rtp(data, &mut self.plain).is_err() {
                    return false;
                }
                let Ok(view) = RtpView::parse(&self.plain) else {
                    return false;
                };
                events.push(PeerEvent::Media(Inbound {
                    marker: view.marker,
                    payload_type: view.payload_type,
                    seq: view.seq,
                    timestamp: view.timestamp,
                    ssrc: view.ssrc,
                    payload: Arc::from(view.payload),
                }));
                true
            }
            Kind::Rtcp => {
                let Ok(plain) = self.ingress.open_rtcp(data) else {
                    return false;
                };
                let ssrc = egress.ssrc();
                rtp::report_blocks(&plain, |b| {
                    if b.ssrc == ssrc {
                        events.push(PeerEvent::Report {
                            fraction_lost: b.fraction_lost,
                            jitter: b.jitter,
                        });
                    }
                });
                true
            }
            Kind::Dtls => self.dtls_record(src, data, out),
            Kind::Unknown => false,
        }
    }

    /// A DTLS record after the handshake: an alert (`close_notify` closes the peer); whatever the
    /// instance answers goes back to the client.
    fn dtls_record(&mut self, src: SocketAddr, data: &[u8], out: &mut Vec<Transmit>) -> bool {
        let Some(dtls) = self.dtls.as_mut() else {
            return false;
        };
        if dtls.handle_packet(data).is_err() {
            return false;
        }
        let mut buf = [0u8; rtp::MAX_DATAGRAM];
        // The instance ends every poll cycle with a timeout; the bound only guards against a surprise.
        for _ in 0..16 {
            match dtls.poll_output(&mut buf) {
                dimpl::Output::Packet(p) => out.push((p.to_vec(), RawAddr::new(src))),
                dimpl::Output::CloseNotify => self.closed_by_client = true,
                dimpl::Output::Timeout(_) | dimpl::Output::BufferTooSmall { .. } => break,
                _ => {}
            }
        }
        if dtls.is_closed() {
            self.closed_by_client = true;
        }
        true
    }

    /// Answers a binding request signed with the server's password (RFC 8445 §7.3, RFC 7675). A check
    /// that nominates another path (`USE-CANDIDATE` from a new address: ICE re-nomination, a network
    /// handover) moves the listener's media there at once.
    fn consent_check(
        &mut self,
        now: Instant,
        src: SocketAddr,
        data: &[u8],
        egress: &mut Egress,
        out: &mut Vec<Transmit>,
    ) -> bool {
        let Ok(msg) = StunMessage::parse(data) else {
            return false;
        };
        let sign = |_: &[u8], parts: &[&[u8]]| {
            let mut mac = hmac::Context::with_key(&self.stun_key);
            for p in parts {
                mac.update(p);
            }
            let mut tag = [0u8; 20];
            tag.copy_from_slice(mac.sign().as_ref());
            tag
        };
        if !msg.is_binding_request() || !msg.verify(self.pass.as_bytes(), sign) {
            return false;
        }
        let mut reply = [0u8; STUN_REPLY_MAX];
        let Ok(len) = StunMessage::binding_reply(msg.trans_id(), src).to_bytes(
            Some(self.pass.as_bytes()),
            &mut reply,
            sign,
        ) else {
            return false;
        };
        out.push((reply[..len].to_vec(), RawAddr::new(src)));
        self.last_check = now;
        if msg.use_candidate() && egress.dest.is_none_or(|d| d.to_socket_addr() != src) {
            egress.dest = Some(RawAddr::new(src));
        }
        true
    }

    /// Drives time: a sender report when one is due; `Some(reason)` when the peer must close because
    /// its consent expired.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        egress: &mut Egress,
        out: &mut Vec<Transmit>,
    ) -> Option<&'static str> {
        if now >= self.last_check + CONSENT_TIMEOUT {
            return Some("ice_disconnected");
        }
        if now >= self.next_report {
            self.next_report = now + REPORT_EVERY;
            if let (Some(p), Some(dest)) = (
                egress.own_rtcp(now, self.cname.as_deref(), false),
                egress.dest,
            ) {
                out.push((p, dest));
            }
        }
        None
    }

    /// The last word on the listener stream: a report and a BYE.
    pub fn close(&mut self, now: Instant, egress: &mut Egress, out: &mut Vec<Transmit>) {
        if let (Some(p), Some(dest)) = (
            egress.own_rtcp(now, self.cname.as_deref(), true),
            egress.dest,
        ) {
            out.push((p, dest));
        }
    }
}
