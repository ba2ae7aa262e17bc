//! Protocol v1 signalling as the harness speaks it: the frames it writes (`join`, `ptt`), what it reads
//! from the frames it gets (`joined.rtp`, `floor`), and the messages between a connection task, the
//! channel controllers and the coordinator. No I/O here: `connection.rs` moves the bytes.

use crate::model::{channel_name, member_name};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// One member to join on a connection.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    pub channel: u32,
    pub slot: u16,
    pub member: u32,
    pub rtp_addr: SocketAddr,
    /// A WebRTC member's SDP offer (`None`: plain RTP at `rtp_addr`).
    pub offer: Option<String>,
}

/// What the server answered to a join (`joined.rtp`).
#[derive(Debug, Clone, PartialEq)]
pub struct JoinedRtp {
    pub member: u32,
    pub server_addr: SocketAddr,
    pub ssrc: u32,
    pub payload_type: u8,
}

/// The first frame's timers (ms), to keep bursts under T2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub t1_ms: u64,
    pub t2_ms: u64,
}

/// Commands from a controller to the connection that carries its member.
#[derive(Debug)]
pub enum ConnCmd {
    Press {
        channel: u32,
    },
    /// `time_switch`: stamp `switch_from_ns` of the channel when the frame is written.
    Release {
        channel: u32,
        time_switch: bool,
    },
    Close,
}

/// A floor event for a channel's controller.
#[derive(Debug, Clone, PartialEq)]
pub enum FloorEv {
    /// `press_ns`: press→granted measured on this connection.
    Granted {
        press_ns: Option<u64>,
    },
    Denied {
        reason: String,
    },
    Queued,
    Revoked {
        reason: String,
    },
    /// `release_ns`: release→idle measured on this connection.
    Idle {
        release_ns: Option<u64>,
    },
}

#[derive(Debug, Clone)]
pub struct FloorMsg {
    pub slot: u16,
    pub ev: FloorEv,
}

/// Something the coordinator must know about a connection.
#[derive(Debug)]
pub enum ConnNote {
    Joined(Vec<JoinedRtp>, Timers),
    Failed(String),
    /// The connection closed or failed after joining.
    Lost(String),
    /// An `error` frame after joining (e.g. a `ptt` refused).
    ServerError(String),
}

/// Build a `join` request.
pub fn join_frame(prefix: &str, spec: &JoinSpec, presence: bool, id: usize) -> String {
    let mut v = json!({
        "type": "join",
        "id": id,
        "channel": channel_name(prefix, spec.channel),
        "member": member_name(spec.slot),
    });
    match &spec.offer {
        Some(sdp) => {
            v["transport"] = json!("webrtc");
            v["sdp"] = json!(sdp);
        }
        None => {
            v["transport"] = json!("rtp");
            v["rtp_addr"] = json!(spec.rtp_addr.to_string());
        }
    }
    if !presence {
        v["presence"] = json!(false);
    }
    v.to_string()
}

pub fn ptt_frame(prefix: &str, channel: u32, press: bool) -> String {
    json!({"type": "ptt", "channel": channel_name(prefix, channel), "action": if press { "press" } else { "release" }})
        .to_string()
}

/// Parse the `rtp` object of a `joined` frame.
pub fn parse_joined_rtp(v: &Value) -> Result<(SocketAddr, u32, u8), String> {
    let rtp = v.get("rtp").ok_or("joined without an rtp object")?;
    let addr: SocketAddr = rtp
        .get("server_addr")
        .and_then(Value::as_str)
        .ok_or("joined.rtp without server_addr")?
        .parse()
        .map_err(|e| format!("joined.rtp.server_addr: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "the server announced media address {addr}, not loopback; the harness only sends to 127.0.0.0/8 \
             (start the server with --announce-ip 127.0.0.1 or bind its media to 127.0.0.1)"
        ));
    }
    let ssrc = rtp
        .get("ssrc")
        .and_then(Value::as_u64)
        .filter(|&s| s <= u32::MAX as u64)
        .ok_or("joined.rtp.ssrc missing or not a 32-bit number")? as u32;
    let pt = rtp
        .get("payload_type")
        .and_then(Value::as_u64)
        .filter(|&p| p < 128)
        .unwrap_or(111) as u8;
    Ok((addr, ssrc, pt))
}

/// Parse a `floor` frame into (state, event). `None` for states the controllers do not need (`taken`).
pub fn parse_floor(v: &Value) -> Option<FloorEv> {
    let reason = || {
        v.get("reason")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    match v.get("state")?.as_str()? {
        "granted" => Some(FloorEv::Granted { press_ns: None }),
        "denied" => Some(FloorEv::Denied { reason: reason() }),
        "queued" => Some(FloorEv::Queued),
        "revoked" => Some(FloorEv::Revoked { reason: reason() }),
        "idle" => Some(FloorEv::Idle { release_ns: None }),
        _ => None,
    }
}

/// Counts of received frames by kind (atomics: the connection tasks share nothing else).
#[derive(Debug, Default)]
pub struct FrameCounts {
    kinds: [AtomicU64; FRAME_KINDS.len()],
}

const FRAME_KINDS: [&str; 10] = [
    "floor/granted",
    "floor/taken",
    "floor/idle",
    "floor/denied",
    "floor/queued",
    "floor/revoked",
    "presence",
    "error",
    "pong",
    "other",
];

impl FrameCounts {
    pub fn count(&self, v: &Value) {
        let kind = match (
            v.get("type").and_then(Value::as_str),
            v.get("state").and_then(Value::as_str),
        ) {
            (Some("floor"), Some(s)) => format!("floor/{s}"),
            (Some(t), _) => t.to_string(),
            _ => String::new(),
        };
        let i = FRAME_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(FRAME_KINDS.len() - 1);
        self.kinds[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        FRAME_KINDS
            .iter()
            .zip(&self.kinds)
            .map(|(k, n)| (k.to_string(), n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_follow_protocol_v1() {
        let spec = JoinSpec {
            channel: 7,
            slot: 3,
            member: 31,
            rtp_addr: "127.0.0.2:5000".parse().unwrap(),
            offer: None,
        };
        let v: Value = serde_json::from_str(&join_frame("lt", &spec, false, 4)).unwrap();
        assert_eq!(v["type"], "join");
        assert_eq!(v["channel"], "lt-c7");
        assert_eq!(v["member"], "m3");
        assert_eq!(v["transport"], "rtp");
        assert_eq!(v["rtp_addr"], "127.0.0.2:5000");
        assert_eq!(v["presence"], false);
        assert_eq!(v["id"], 4);
        let v: Value = serde_json::from_str(&join_frame("lt", &spec, true, 4)).unwrap();
        assert!(v.get("presence").is_none());
        let p: Value = serde_json::from_str(&ptt_frame("lt", 7, true)).unwrap();
        assert_eq!(p, json!({"type":"ptt","channel":"lt-c7","action":"press"}));
        let r: Value = serde_json::from_str(&ptt_frame("lt", 7, false)).unwrap();
        assert_eq!(r["action"], "release");
        let w = JoinSpec {
            offer: Some("v=0\r\n".into()),
            ..spec
        };
        let v: Value = serde_json::from_str(&join_frame("lt", &w, true, 5)).unwrap();
        assert_eq!(v["transport"], "webrtc");
        assert_eq!(v["sdp"], "v=0\r\n");
        assert!(v.get("rtp_addr").is_none());
    }

    #[test]
    fn joined_rtp_is_parsed_and_checked() {
        let v: Value = serde_json::from_str(
            r#"{"type":"joined","channel":"ops-1","member":"alice","members":["bob"],"speaker":null,"epoch":7,
               "rtp":{"server_addr":"127.0.0.1:40000","ssrc":305419896,"payload_type":111}}"#,
        )
        .unwrap();
        assert_eq!(
            parse_joined_rtp(&v).unwrap(),
            ("127.0.0.1:40000".parse().unwrap(), 305_419_896, 111)
        );
        let far = json!({"rtp":{"server_addr":"10.0.0.1:40000","ssrc":1}});
        assert!(parse_joined_rtp(&far).unwrap_err().contains("loopback"));
        assert!(parse_joined_rtp(&json!({"rtp":{"server_addr":"127.0.0.1:1","ssrc":-1}})).is_err());
        assert!(parse_joined_rtp(&json!({})).is_err());
    }

    #[test]
    fn frames_are_counted_by_kind() {
        let f = FrameCounts::default();
        for t in [
            r#"{"type":"floor","state":"taken"}"#,
            r#"{"type":"floor","state":"taken"}"#,
            r#"{"type":"presence","joined":"x"}"#,
            r#"{"type":"brand-new"}"#,
        ] {
            f.count(&serde_json::from_str(t).unwrap());
        }
        let s = f.snapshot();
        assert_eq!(s["floor/taken"], 2);
        assert_eq!(s["presence"], 1);
        assert_eq!(s["other"], 1);
        assert!(!s.contains_key("error"));
    }

    #[test]
    fn floor_events() {
        let f = |s: &str| parse_floor(&serde_json::from_str(s).unwrap());
        assert_eq!(
            f(
                r#"{"type":"floor","channel":"c","state":"granted","speaker":"a","epoch":9,"duration_ms":30000}"#
            ),
            Some(FloorEv::Granted { press_ns: None })
        );
        assert_eq!(
            f(r#"{"type":"floor","channel":"c","state":"denied","speaker":"b","reason":"busy"}"#),
            Some(FloorEv::Denied {
                reason: "busy".into()
            })
        );
        assert_eq!(
            f(r#"{"type":"floor","channel":"c","state":"taken","speaker":"a","epoch":9}"#),
            None
        );
        assert_eq!(
            f(
                r#"{"type":"floor","channel":"c","state":"revoked","speaker":"a","epoch":9,"reason":"silence","grace_ms":0}"#
            ),
            Some(FloorEv::Revoked {
                reason: "silence".into()
            })
        );
        assert_eq!(
            f(r#"{"type":"floor","channel":"c","state":"idle","epoch":9}"#),
            Some(FloorEv::Idle { release_ns: None })
        );
        assert_eq!(
            f(r#"{"type":"floor","channel":"c","state":"queued","position":1}"#),
            Some(FloorEv::Queued)
        );
    }
}
