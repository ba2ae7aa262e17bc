//! WebRTC members (`--transport webrtc|mixed`): one str0m `Rtc` per member as the *client* side of the
//! protocol (ICE controlling agent, DTLS client, SRTP), so the server sees exactly what a browser makes
//! it do: connectivity checks, a DTLS handshake per member, SRTP both ways, RTCP.
//!
//! - [`peer`]: which members use WebRTC, their peers and offers (built before joining), what the harness
//!   reads from an SDP answer;
//! - [`engine`]: the one thread that drives every peer once the answers arrive — ICE, DTLS, the WebRTC
//!   speakers' packets and the listeners' accounting.
//!
//! In a ceiling run's raw phases the same members speak plain RTP to the raw forwarder from the same
//! sockets: the raw forwarder does no SRTP, which is the point of the WebRTC ceiling ratio.

pub mod engine;
pub mod peer;
