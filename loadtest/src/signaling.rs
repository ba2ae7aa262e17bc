//! Protocol v1 signaling: one task per WebSocket connection, each joining up to `members_per_ws` members
//! (one per channel: a connection is one member of each channel it joins), then carrying `ptt` presses
//! and releases and routing floor events back to the channel controllers.
//!
//! Press and release are timestamped right before the frame is written, so press→granted is the server's
//! round trip plus the socket, not queueing inside the harness.

use crate::model::{channel_name, member_name, ChannelShared};
use crate::sys::mono_ns;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio_tungstenite::tungstenite::Message;

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

/// Everything a connection task needs.
pub struct ConnCtx {
    /// One WebSocket URL per node; slot `s` of every channel joins node `s % urls.len()`.
    pub urls: Vec<String>,
    pub prefix: String,
    pub presence: bool,
    pub channels: Arc<Vec<ChannelShared>>,
    pub to_ctrl: Arc<Vec<UnboundedSender<FloorMsg>>>,
    pub notes: UnboundedSender<ConnNote>,
    /// Connections joining at once: thousands of simultaneous handshakes would only measure the backlog.
    pub join_limit: Arc<tokio::sync::Semaphore>,
    /// Frames received after joining, by kind: what the signaling costs.
    pub frames: FrameCounts,
    /// The WebRTC engine, which takes the SDP answers.
    pub webrtc: Option<std::sync::mpsc::Sender<crate::webrtc::EngineCmd>>,
}

/// Counts of received frames by kind (atomics: the connection tasks share nothing else).
#[derive(Debug, Default)]
pub struct FrameCounts {
    kinds: [std::sync::atomic::AtomicU64; FRAME_KINDS.len()],
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

/// tungstenite zero-fills its whole read buffer (128 KiB by default) before every read, even one that
/// finds nothing: with hundreds of connections that memset was a third of the harness's signaling CPU.
/// Frames here are small, so 4 KiB reads lose nothing.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> Result<Value, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map_err(|e| format!("bad JSON from server: {e}: {t}"))
            }
            Some(Ok(Message::Close(f))) => return Err(format!("closed by server: {f:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("websocket: {e}")),
            None => return Err("websocket closed".into()),
        }
    }
}

/// Connect, join `specs`, then serve commands until `Close`.
pub async fn run_conn(
    ctx: Arc<ConnCtx>,
    specs: Vec<JoinSpec>,
    mut cmds: UnboundedReceiver<ConnCmd>,
) {
    let permit = ctx.join_limit.clone().acquire_owned().await;
    let setup_result = setup(&ctx, &specs).await;
    drop(permit);
    let mut ws = match setup_result {
        Ok((ws, joined, timers)) => {
            let _ = ctx.notes.send(ConnNote::Joined(joined, timers));
            ws
        }
        Err(e) => {
            let _ = ctx.notes.send(ConnNote::Failed(e));
            return;
        }
    };
    // channel name → (channel index, slot)
    let by_name: HashMap<String, (u32, u16)> = specs
        .iter()
        .map(|s| (channel_name(&ctx.prefix, s.channel), (s.channel, s.slot)))
        .collect();
    let mut pressed_at: HashMap<u32, u64> = HashMap::new();
    let mut released_at: HashMap<u32, u64> = HashMap::new();
    loop {
        tokio::select! {
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { break };
                let (frame, ch) = match cmd {
                    ConnCmd::Press { channel } => {
                        (ptt_frame(&ctx.prefix, channel, true), Some((channel, true, false)))
                    }
                    ConnCmd::Release { channel, time_switch } => {
                        (ptt_frame(&ctx.prefix, channel, false), Some((channel, false, time_switch)))
                    }
                    ConnCmd::Close => {
                        let _ = ws.close(None).await;
                        return;
                    }
                };
                if let Some((channel, press, time_switch)) = ch {
                    let now = mono_ns();
                    if press {
                        pressed_at.insert(channel, now);
                    } else {
                        released_at.insert(channel, now);
                        if time_switch {
                            if let Some(c) = ctx.channels.get(channel as usize) {
                                c.switch_from_ns.store(now, Ordering::Release);
                            }
                        }
                    }
                }
                if let Err(e) = ws.send(Message::text(frame)).await {
                    let _ = ctx.notes.send(ConnNote::Lost(format!("websocket send: {e}")));
                    return;
                }
            }
            msg = ws.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(f))) => {
                        let _ = ctx.notes.send(ConnNote::Lost(format!("closed by server: {f:?}")));
                        return;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        let _ = ctx.notes.send(ConnNote::Lost(format!("websocket: {e}")));
                        return;
                    }
                    None => {
                        let _ = ctx.notes.send(ConnNote::Lost("websocket closed".into()));
                        return;
                    }
                };
                let now = mono_ns();
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                    let _ = ctx.notes.send(ConnNote::ServerError(format!("bad JSON: {text}")));
                    continue;
                };
                ctx.frames.count(&v);
                match v.get("type").and_then(Value::as_str) {
                    Some("floor") => {
                        let Some(&(channel, slot)) = v.get("channel").and_then(Value::as_str).and_then(|n| by_name.get(n)) else {
                            continue;
                        };
                        let Some(mut ev) = parse_floor(&v) else { continue };
                        // Only the member the controller is driving matters; listeners' copies are noise.
                        let driving = ctx.channels.get(channel as usize).map(|c| c.speaker_slot.load(Ordering::Acquire));
                        if driving != Some(slot as u32) {
                            continue;
                        }
                        match &mut ev {
                            FloorEv::Granted { press_ns } => *press_ns = pressed_at.remove(&channel).map(|t| now.saturating_sub(t)),
                            FloorEv::Idle { release_ns } => *release_ns = released_at.remove(&channel).map(|t| now.saturating_sub(t)),
                            _ => {}
                        }
                        if let Some(tx) = ctx.to_ctrl.get(channel as usize) {
                            let _ = tx.send(FloorMsg { slot, ev });
                        }
                    }
                    Some("error") => {
                        let _ = ctx.notes.send(ConnNote::ServerError(text.to_string()));
                    }
                    _ => {}
                }
            }
        }
    }
}

async fn setup(ctx: &ConnCtx, specs: &[JoinSpec]) -> Result<(Ws, Vec<JoinedRtp>, Timers), String> {
    // A connection carries one slot of several channels, so all its members are on one node.
    let slot = specs.first().map(|s| s.slot).unwrap_or(0);
    let url = &ctx.urls[crate::cluster::node_of(slot as u32, ctx.urls.len() as u32) as usize];
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true),
    )
    .await
    .map_err(|_| format!("connect {url}: timed out"))?
    .map_err(|e| format!("connect {url}: {e}"))?;
    let hello = tokio::time::timeout(Duration::from_secs(5), next_json(&mut ws))
        .await
        .map_err(|_| "no hello frame within 5 s".to_string())??;
    if hello.get("type").and_then(Value::as_str) != Some("hello") {
        return Err(format!("first frame is not hello: {hello}"));
    }
    if hello.get("protocol").and_then(Value::as_u64) != Some(1) {
        return Err(format!(
            "server speaks protocol {:?}, the harness speaks 1",
            hello.get("protocol")
        ));
    }
    let timers = Timers {
        t1_ms: hello
            .pointer("/timers/t1_ms")
            .and_then(Value::as_u64)
            .unwrap_or(4000),
        t2_ms: hello
            .pointer("/timers/t2_ms")
            .and_then(Value::as_u64)
            .unwrap_or(30_000),
    };
    for (i, s) in specs.iter().enumerate() {
        ws.send(Message::text(join_frame(&ctx.prefix, s, ctx.presence, i)))
            .await
            .map_err(|e| format!("send join: {e}"))?;
    }
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (i, s) in specs.iter().enumerate() {
        by_name.insert(channel_name(&ctx.prefix, s.channel), i);
    }
    let mut joined: Vec<Option<JoinedRtp>> = vec![None; specs.len()];
    let mut left = specs.len();
    // WebRTC joins wait for the shard's handshake slots: more time, and `unavailable` is retried.
    let webrtc = specs.iter().filter(|s| s.offer.is_some()).count() as u64;
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(20) + Duration::from_millis(200 * webrtc);
    let mut retries: Vec<(tokio::time::Instant, usize)> = Vec::new();
    while left > 0 {
        let now = tokio::time::Instant::now();
        let mut k = 0;
        while k < retries.len() {
            if retries[k].0 <= now {
                let (_, i) = retries.swap_remove(k);
                ws.send(Message::text(join_frame(
                    &ctx.prefix,
                    &specs[i],
                    ctx.presence,
                    i,
                )))
                .await
                .map_err(|e| format!("send join: {e}"))?;
            } else {
                k += 1;
            }
        }
        let wake = retries
            .iter()
            .map(|r| r.0)
            .min()
            .unwrap_or(deadline)
            .min(deadline);
        let v = match tokio::time::timeout_at(wake, next_json(&mut ws)).await {
            Ok(v) => v?,
            Err(_) if wake < deadline => continue,
            Err(_) => {
                return Err(format!(
                    "{left} of {} joins unanswered after {:.0} s",
                    specs.len(),
                    (deadline - now).as_secs_f64()
                ))
            }
        };
        match v.get("type").and_then(Value::as_str) {
            Some("joined") => {
                let Some(&i) = v
                    .get("channel")
                    .and_then(Value::as_str)
                    .and_then(|n| by_name.get(n))
                else {
                    return Err(format!("joined for a channel not asked for: {v}"));
                };
                let j = match v.get("sdp").and_then(Value::as_str) {
                    Some(sdp) => {
                        let a = crate::webrtc::parse_answer(sdp)?;
                        if let Some(engine) = &ctx.webrtc {
                            let _ = engine.send(crate::webrtc::EngineCmd::Answer {
                                member: specs[i].member,
                                sdp: sdp.to_string(),
                            });
                        }
                        (a.server_addr, a.ssrc, a.payload_type)
                    }
                    None => parse_joined_rtp(&v)?,
                };
                if joined[i].is_none() {
                    left -= 1;
                }
                joined[i] = Some(JoinedRtp {
                    member: specs[i].member,
                    server_addr: j.0,
                    ssrc: j.1,
                    payload_type: j.2,
                });
            }
            Some("error") => {
                // The shard has too many DTLS handshakes in progress: ask again shortly.
                let id = v.get("id").and_then(Value::as_u64).map(|i| i as usize);
                match id {
                    Some(i)
                        if i < specs.len()
                            && specs[i].offer.is_some()
                            && v.get("code").and_then(Value::as_str) == Some("unavailable") =>
                    {
                        let backoff = Duration::from_millis(50 + (i as u64 * 37) % 200);
                        retries.push((tokio::time::Instant::now() + backoff, i));
                    }
                    _ => return Err(format!("join refused: {v}")),
                }
            }
            _ => {}
        }
    }
    Ok((ws, joined.into_iter().flatten().collect(), timers))
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
