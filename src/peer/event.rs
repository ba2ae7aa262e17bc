//! What a WebRTC peer hands its shard, whichever side serves it (str0m's `Rtc` during the handshake,
//! [`super::settled`] after): events, the client's opened RTP packets, and datagrams to send.

#![warn(missing_docs)]

use std::sync::Arc;

use rtpio::RawAddr;
use str0m::rtp::RtpPacket;

/// An RTP packet from the client, SRTP removed: the header fields the shard reads and the payload,
/// shared with every listener it is forwarded to.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The marker bit.
    pub marker: bool,
    /// The payload type.
    pub payload_type: u8,
    /// The sequence number, as sent.
    pub seq: u16,
    /// The RTP timestamp, as sent.
    pub timestamp: u32,
    /// The client's SSRC.
    pub ssrc: u32,
    /// The payload (no header, extension or padding).
    pub payload: Arc<[u8]>,
}

impl From<RtpPacket> for Inbound {
    fn from(p: RtpPacket) -> Self {
        Inbound {
            marker: p.header.marker,
            payload_type: *p.header.payload_type,
            seq: p.header.sequence_number,
            timestamp: p.header.timestamp,
            ssrc: *p.header.ssrc,
            payload: p.payload,
        }
    }
}

/// What a peer reports to its shard.
#[derive(Debug)]
pub enum PeerEvent {
    /// ICE and DTLS are up: media may flow.
    Connected,
    /// An RTP packet from the client, SRTP already removed.
    Media(Inbound),
    /// ICE timed out, DTLS closed, or the peer never connected: it must leave its channel.
    Closed(&'static str),
    /// What the browser's receiver reports said of the stream it listens to, since the last one.
    Report {
        /// Fraction lost × 256, as in an RTCP report block.
        fraction_lost: u8,
        /// Interarrival jitter, RTP timestamp units.
        jitter: u32,
    },
}

/// A datagram str0m wants sent: contents and destination.
pub type Transmit = (Vec<u8>, RawAddr);
