//! The str0m configuration of a server peer: what every peer of a process shares ([`WebRtcConfig`]:
//! certificate, crypto provider, host candidate) and the per-peer `RtcConfig` built from it — the choices
//! [`super::webrtc`] documents (ICE-lite, RTP mode, Opus only with in-band FEC, no NACK, no
//! transport-cc, only the audio-level extension).

#![warn(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;

use str0m::config::{CryptoProvider, DtlsCert};
use str0m::format::{Codec, CodecConfig, CodecSpec, FormatParams, PayloadParams};
use str0m::media::{Frequency, Pt};
use str0m::rtp::Extension;
use str0m::{IceCreds, RtcConfig};

use super::keys::capturing_provider;
use thiserror::Error;

/// What every peer of a process shares. Cloned into each shard; the certificate is generated once.
#[derive(Clone)]
pub struct WebRtcConfig {
    /// The process's DTLS certificate (its fingerprint goes into every answer).
    pub cert: DtlsCert,
    /// str0m's crypto provider (aws-lc-rs, its DTLS wrapped to capture the SRTP keys), shared by every
    /// `Rtc` of the process.
    pub crypto: Arc<CryptoProvider>,
    /// The ICE host candidate of the shard: the announce address and the shard's UDP port.
    pub candidate: SocketAddr,
}

impl std::fmt::Debug for WebRtcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebRtcConfig")
            .field("candidate", &self.candidate)
            .finish_non_exhaustive()
    }
}

impl WebRtcConfig {
    /// Generates the process's DTLS certificate with the compiled-in crypto provider (aws-lc-rs).
    pub fn generate(candidate: SocketAddr) -> Result<Self, PeerError> {
        let crypto = capturing_provider();
        let cert = crypto
            .dtls_provider
            .generate_certificate()
            .ok_or(PeerError::Certificate)?;
        Ok(WebRtcConfig {
            cert,
            crypto: Arc::new(crypto),
            candidate,
        })
    }
}

/// How often str0m sums up a peer's receiver reports (one timer per peer per period: nothing per packet).
const STATS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Builds a str0m config for one peer from the shared parts.
pub(super) fn rtc_config(shared: &WebRtcConfig, ufrag: &str, pass: String) -> RtcConfig {
    let mut opus = PayloadParams::new(
        Pt::from(111),
        None,
        CodecSpec {
            codec: Codec::Opus,
            clock_rate: Frequency::FORTY_EIGHT_KHZ,
            channels: Some(2),
            format: FormatParams {
                min_p_time: Some(10),
                use_inband_fec: Some(true),
                ..Default::default()
            },
        },
    );
    opus.set_fb_transport_cc(false);
    opus.set_fb_nack(false);
    let mut config = RtcConfig::new()
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .set_dtls_cert(shared.cert.clone())
        .set_crypto_provider(shared.crypto.clone())
        .set_local_ice_credentials(IceCreds {
            ufrag: ufrag.to_string(),
            pass,
        })
        .clear_extension_map()
        .set_extension(1, Extension::AudioLevel)
        .set_stats_interval(Some(STATS_EVERY));
    *config.codec_config() = CodecConfig::new_from_payload_params(vec![opus]);
    config
}

/// Why no peer could be built.
#[derive(Debug, Error)]
pub enum PeerError {
    /// The crypto provider could not make a certificate (start-up only).
    #[error("cannot generate a DTLS certificate")]
    Certificate,
    /// str0m refused the shard's address as an ICE host candidate.
    #[error("bad host candidate: {0}")]
    Candidate(String),
    /// str0m refused the offer (after [`crate::peer::offer`] accepted it).
    #[error("the offer was refused: {0}")]
    Offer(String),
    /// The negotiation left no Opus payload type both sides know.
    #[error("the offer negotiated no Opus payload type")]
    NoOpus,
    /// The answer has no `a=mid` for the audio line.
    #[error("the answer has no audio media")]
    NoMid,
}
