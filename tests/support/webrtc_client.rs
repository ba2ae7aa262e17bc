//! A WebRTC member built on the `webrtc` crate (webrtc-rs): an implementation independent of str0m, so
//! the server's SDP, ICE-lite, DTLS and SRTP are checked against someone else's reading of the RFCs.
//! Loopback candidates only; non-trickle (the offer carries its candidates), as protocol v1 says.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use webrtc::api::media_engine::{MediaEngine, MIME_TYPE_OPUS};
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::APIBuilder;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::rtp::header::Header;
use webrtc::rtp::packet::Packet;
use webrtc::rtp_transceiver::rtp_codec::{
    RTCRtpCodecCapability, RTCRtpCodecParameters, RTPCodecType,
};
use webrtc::rtp_transceiver::rtp_transceiver_direction::RTCRtpTransceiverDirection;
use webrtc::rtp_transceiver::RTCRtpTransceiverInit;
use webrtc::track::track_local::track_local_static_rtp::TrackLocalStaticRTP;
use webrtc::track::track_local::TrackLocalWriter;

use super::client::Signal;

fn opus() -> RTCRtpCodecCapability {
    RTCRtpCodecCapability {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

/// A WebRTC member: its peer connection, its microphone track and what it heard.
pub struct WebRtcMember {
    pub name: String,
    pub pc: Arc<RTCPeerConnection>,
    track: Option<Arc<TrackLocalStaticRTP>>,
    heard: mpsc::UnboundedReceiver<Packet>,
    state: watch::Receiver<RTCPeerConnectionState>,
    pub joined: Value,
    seq: u16,
    ts: u32,
}

/// A peer connection with one audio transceiver (`sendrecv`, or `recvonly` for a listen-only member),
/// and its complete offer.
pub async fn offer(
    listen_only: bool,
) -> (
    Arc<RTCPeerConnection>,
    Option<Arc<TrackLocalStaticRTP>>,
    mpsc::UnboundedReceiver<Packet>,
    watch::Receiver<RTCPeerConnectionState>,
    String,
) {
    let mut media = MediaEngine::default();
    media
        .register_codec(
            RTCRtpCodecParameters {
                capability: opus(),
                payload_type: 111,
                ..Default::default()
            },
            RTPCodecType::Audio,
        )
        .expect("register opus");
    let mut settings = SettingEngine::default();
    settings.set_include_loopback_candidate(true);
    settings.set_network_types(vec![NetworkType::Udp4]);
    settings.set_ip_filter(Box::new(|ip| ip.is_loopback()));
    settings.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
    let api = APIBuilder::new()
        .with_media_engine(media)
        .with_setting_engine(settings)
        .build();
    let pc = Arc::new(
        api.new_peer_connection(RTCConfiguration::default())
            .await
            .expect("peer connection"),
    );
    let track = if listen_only {
        let init = RTCRtpTransceiverInit {
            direction: RTCRtpTransceiverDirection::Recvonly,
            send_encodings: vec![],
        };
        pc.add_transceiver_from_kind(RTPCodecType::Audio, Some(init))
            .await
            .expect("transceiver");
        None
    } else {
        let track = Arc::new(TrackLocalStaticRTP::new(
            opus(),
            "mic".into(),
            "talkgroup-test".into(),
        ));
        let sender = pc.add_track(track.clone()).await.expect("add track");
        // Read RTCP so the sender's buffers drain (webrtc-rs wants it read).
        tokio::spawn(async move { while sender.read_rtcp().await.is_ok() {} });
        Some(track)
    };
    let (tx, heard) = mpsc::unbounded_channel();
    pc.on_track(Box::new(move |remote, _, _| {
        let tx = tx.clone();
        Box::pin(async move {
            tokio::spawn(async move {
                while let Ok((pkt, _)) = remote.read_rtp().await {
                    if tx.send(pkt).is_err() {
                        break;
                    }
                }
            });
        })
    }));
    let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
    pc.on_peer_connection_state_change(Box::new(move |s| {
        let _ = state_tx.send(s);
        Box::pin(async {})
    }));
    let local = pc.create_offer(None).await.expect("create offer");
    let mut gathered = pc.gathering_complete_promise().await;
    pc.set_local_description(local).await.expect("set local");
    let _ = gathered.recv().await;
    let sdp = pc.local_description().await.expect("local description").sdp;
    (pc, track, heard, state, sdp)
}

impl WebRtcMember {
    /// Joins over `sig` with an offer, applies the answer, and waits until ICE and DTLS are up.
    pub async fn join(sig: &mut Signal, channel: &str, name: &str) -> WebRtcMember {
        Self::join_with(sig, channel, name, false).await
    }

    pub async fn join_with(
        sig: &mut Signal,
        channel: &str,
        name: &str,
        listen_only: bool,
    ) -> WebRtcMember {
        let (pc, track, heard, state, sdp) = offer(listen_only).await;
        sig.send(
            json!({"type":"join","channel":channel,"member":name,"transport":"webrtc","sdp":sdp}),
        )
        .await;
        let (c, n) = (channel.to_string(), name.to_string());
        let joined = sig
            .expect("joined", move |v| {
                (v["type"] == "joined" && v["channel"] == c && v["member"] == n)
                    || v["type"] == "error"
            })
            .await;
        assert_eq!(joined["type"], "joined", "join refused: {joined}");
        let answer = joined["sdp"]
            .as_str()
            .expect("joined carries an SDP answer")
            .to_string();
        assert!(joined.get("rtp").is_none(), "no rtp block for WebRTC");
        pc.set_remote_description(RTCSessionDescription::answer(answer).expect("answer"))
            .await
            .expect("set remote");
        let mut m = WebRtcMember {
            name: name.into(),
            pc,
            track,
            heard,
            state,
            joined,
            seq: 3000,
            ts: 90_000,
        };
        m.wait_state(RTCPeerConnectionState::Connected, Duration::from_secs(10))
            .await;
        m
    }

    pub async fn wait_state(&mut self, want: RTCPeerConnectionState, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if *self.state.borrow() == want {
                return;
            }
            let Ok(Ok(())) = tokio::time::timeout_at(deadline, self.state.changed()).await else {
                panic!(
                    "{}: peer connection not {want} within {wait:?} (is {})",
                    self.name,
                    *self.state.borrow()
                );
            };
        }
    }

    /// Sends one Opus packet (20 ms) on the microphone track.
    pub async fn send_rtp(&mut self, payload: &[u8]) {
        let track = self
            .track
            .as_ref()
            .expect("a listen-only member has no track");
        let pkt = Packet {
            header: Header {
                version: 2,
                payload_type: 111,
                sequence_number: self.seq,
                timestamp: self.ts,
                ..Default::default()
            },
            payload: bytes::Bytes::copy_from_slice(payload),
        };
        self.seq = self.seq.wrapping_add(1);
        self.ts = self.ts.wrapping_add(960);
        track.write_rtp(&pkt).await.expect("write rtp");
    }

    /// Packets heard until `n` arrived or `wait` passed.
    pub async fn recv_rtp(&mut self, n: usize, wait: Duration) -> Vec<Packet> {
        let mut out = vec![];
        let deadline = tokio::time::Instant::now() + wait;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.heard.recv()).await {
                Ok(Some(p)) => out.push(p),
                _ => break,
            }
        }
        out
    }

    /// Drops what was heard so far.
    pub fn clear(&mut self) {
        while self.heard.try_recv().is_ok() {}
    }

    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}

/// Real Opus frames (shared/data/speech.opus20: `[u16 BE length][packet]`…), or synthetic ones when the
/// file is not there.
pub fn opus_frames(n: usize) -> Vec<Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/speech.opus20");
    let mut frames = vec![];
    if let Ok(data) = std::fs::read(path) {
        let mut at = 0;
        while at + 2 <= data.len() {
            let len = usize::from(u16::from_be_bytes([data[at], data[at + 1]]));
            let Some(p) = data.get(at + 2..at + 2 + len) else {
                break;
            };
            frames.push(p.to_vec());
            at += 2 + len;
        }
    }
    if frames.is_empty() {
        frames = (0..n)
            .map(|i| vec![0xfc, i as u8, 0x42, (i >> 8) as u8, 7])
            .collect();
    }
    frames.into_iter().cycle().take(n).collect()
}
