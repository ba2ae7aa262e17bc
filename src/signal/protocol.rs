//! Signaling protocol v1 (`shared/protocol.md`): every JSON message in one file.
//!
//! Parsing goes through `serde_json::Value` first so that a bad request still yields its `id` and `type`
//! for the error reply, and the error names what was wrong ("missing field `channel`", "unknown message
//! type 'foo'") instead of serde's position-only message.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::floor::FloorEvent;

/// Largest accepted frame (`hello.limits.max_frame`).
pub const MAX_FRAME: usize = 64 * 1024;

/// Error codes of `{"type":"error"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// `bad_request`: the message could not be understood or broke a rule (names, SDP, a late resume).
    BadRequest,
    /// `not_joined`: the connection is not a member of the named channel.
    NotJoined,
    /// `already_joined`: the member name is already joined to the channel, on this node or another.
    AlreadyJoined,
    /// `unauthorized`: the token is missing, invalid, or does not grant the channel.
    Unauthorized,
    /// `unavailable`: something the request needs (the floor store, a shard) cannot be reached.
    Unavailable,
    /// `too_large`: the frame is larger than [`MAX_FRAME`]; the connection is closed.
    TooLarge,
    /// `rate_limited`: a limit (frames or joins per second, connections, memberships) was exceeded.
    RateLimited,
    /// `internal`: a fault of the server, not of the request.
    Internal,
}

impl ErrorCode {
    /// The code as written on the wire (`error.code`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A request that could not be served: the code and a message naming what was wrong.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{message}")]
pub struct SignalError {
    /// What kind of error (`error.code`).
    pub code: ErrorCode,
    /// What was wrong, in words (`error.message`).
    pub message: String,
}

impl SignalError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        SignalError {
            code,
            message: message.into(),
        }
    }

    /// A `bad_request` error with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

/// Client → server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// `{"type":"join", …}`: become a member of a channel.
    Join(Join),
    /// `{"type":"ptt", …}`: press or release the talk button.
    Ptt(Ptt),
    /// `{"type":"leave","channel":…}`: stop being a member of a channel.
    Leave {
        /// The channel to leave.
        channel: String,
    },
    /// `{"type":"ping"}`: answered with `pong` (echoing the frame's `id`).
    Ping {},
    /// v1.1: take over a session whose connection dropped (the first frame of the new connection).
    Resume {
        /// The session id from `hello`.
        session: String,
        /// The secret from `hello`.
        resume_token: String,
    },
}

/// `{"type":"join", …}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Join {
    /// The channel to join.
    pub channel: String,
    /// The member name (v1.1: may be left out when a token gives it as `sub`).
    #[serde(default)]
    pub member: Option<String>,
    /// A signed token (v1.1); required when the server checks tokens.
    #[serde(default)]
    pub token: Option<String>,
    /// `"rtp"` (plain RTP) or `"webrtc"` (the default).
    #[serde(default = "default_transport")]
    pub transport: String,
    /// Plain RTP: the `host:port` the member sends its RTP from and receives the channel's audio at.
    pub rtp_addr: Option<String>,
    /// WebRTC: the SDP offer (exactly one audio m-line offering Opus).
    pub sdp: Option<String>,
    /// Floor priority 0..=255 (default 0); only a strictly higher priority pre-empts.
    #[serde(default)]
    pub priority: u8,
    /// `false` turns off presence events for this member (default `true`).
    #[serde(default = "yes")]
    pub presence: bool,
}

fn default_transport() -> String {
    "webrtc".into()
}

fn yes() -> bool {
    true
}

/// `{"type":"ptt", …}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Ptt {
    /// The channel.
    pub channel: String,
    /// Press or release.
    pub action: PttAction,
    /// Extension: wait in the floor queue when busy instead of being denied.
    #[serde(default)]
    pub queue: bool,
    /// v1.1: an emergency press (pre-empts any holder; needs the `emergency` right with tokens).
    #[serde(default)]
    pub emergency: bool,
}

/// The `action` of a `ptt` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PttAction {
    /// `press`: ask for the floor.
    Press,
    /// `release`: give the floor up, or withdraw a queued or pending request.
    Release,
}

/// A parsed frame: the request and the `id` to echo.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// The request's `id` when it is a number or string, echoed in its reply.
    pub id: Option<Value>,
    /// The request itself.
    pub request: Request,
}

/// Parses one text frame. On error, returns the `id` (if one could be read) with the error.
pub fn parse(text: &str) -> Result<Frame, (Option<Value>, SignalError)> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        (
            None,
            SignalError::bad_request(format!("frame is not valid JSON: {e}")),
        )
    })?;
    let Value::Object(map) = &value else {
        return Err((None, SignalError::bad_request("frame is not a JSON object")));
    };
    let id = map
        .get("id")
        .filter(|v| v.is_number() || v.is_string())
        .cloned();
    let Some(ty) = map.get("type") else {
        return Err((id, SignalError::bad_request("missing field `type`")));
    };
    let Some(ty) = ty.as_str().map(str::to_string) else {
        return Err((
            id,
            SignalError::bad_request("field `type` must be a string"),
        ));
    };
    if !matches!(ty.as_str(), "join" | "ptt" | "leave" | "ping" | "resume") {
        return Err((
            id,
            SignalError::bad_request(format!("unknown message type '{ty}'")),
        ));
    }
    match serde_json::from_value::<Request>(value) {
        Ok(request) => Ok(Frame { id, request }),
        Err(e) => Err((
            id,
            SignalError::bad_request(format!("invalid '{ty}' message: {e}")),
        )),
    }
}

/// Channel and member names: 1–64 characters of `[A-Za-z0-9._-]`.
pub fn validate_name(what: &str, name: &str) -> Result<(), SignalError> {
    if name.is_empty() || name.len() > 64 {
        return Err(SignalError::bad_request(format!(
            "{what} name must be 1-64 characters, got {}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(SignalError::bad_request(format!(
            "{what} name has an invalid character {c:?}"
        )));
    }
    Ok(())
}

/// Server → client.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// The first frame of every connection.
    Hello {
        /// The protocol version: `1`.
        protocol: u32,
        /// This connection's session id (presented with `resume_token` in a `resume`).
        session: String,
        /// The limits the server enforces.
        limits: Limits,
        /// The floor timers T1, T2 and T3.
        timers: Timers,
        /// ICE servers for WebRTC clients; empty (the server is ICE-lite and offers its host candidate).
        ice_servers: Vec<Value>,
        /// v1.1: `"jwt"` when joins need a signed token, `"none"` when the server runs open.
        auth: &'static str,
        /// v1.1: presented with `session` in a `resume` after the connection drops.
        resume_token: String,
    },
    /// v1.1: the answer to `resume`: the session goes on, with each channel's current floor.
    Resumed {
        /// The resumed session's id.
        session: String,
        /// Each channel the session is a member of, with its current floor.
        channels: Vec<ResumedChannel>,
        /// The `resume`'s `id`.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    /// The answer to `join`: the member is in the channel; its floor now and where media goes.
    Joined {
        /// The channel joined.
        channel: String,
        /// The member's name (with tokens, the token's `sub`).
        member: String,
        /// The channel's other members.
        members: Vec<String>,
        /// Who holds the floor now, if anyone.
        speaker: Option<String>,
        /// The channel's current epoch (fencing number).
        epoch: u64,
        /// v1.1: the effective floor priority (the join's, capped by the token's `max_priority`).
        priority: u8,
        /// Plain RTP: where to send media and the stream the member receives.
        #[serde(skip_serializing_if = "Option::is_none")]
        rtp: Option<RtpInfo>,
        /// WebRTC: the SDP answer.
        #[serde(skip_serializing_if = "Option::is_none")]
        sdp: Option<String>,
        /// The `join`'s `id`.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    /// `{"type":"floor", …}`: a floor event.
    Floor(FloorMessage),
    /// `{"type":"presence", …}`: a member joined or left a channel.
    Presence {
        /// The channel.
        channel: String,
        /// The member who joined.
        #[serde(skip_serializing_if = "Option::is_none")]
        joined: Option<String>,
        /// The member who left.
        #[serde(skip_serializing_if = "Option::is_none")]
        left: Option<String>,
    },
    /// The answer to `leave`: the connection is no longer a member of the channel.
    Left {
        /// The channel left.
        channel: String,
        /// The `leave`'s `id`.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    /// The answer to `ping`.
    Pong {
        /// The `ping`'s `id`.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    /// A request that could not be served; the connection stays open (except after `too_large`).
    Error {
        /// What kind of error.
        code: ErrorCode,
        /// What was wrong, in words.
        message: String,
        /// The failed request's `id`, if it could be read.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    /// v1.1 (placement and draining): the channel lives on another node; the client joins there.
    Redirect {
        /// The channel.
        channel: String,
        /// The home node's WebSocket URL.
        url: String,
        /// The `join`'s `id`.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    /// v1.1 (placement and draining): the server is about to close this connection; the client
    /// reconnects — to any node — after `retry_after_ms` and joins again. `id` echoes a `join` the
    /// draining node refused (an optional field this server adds).
    Goaway {
        /// Why: `"draining"`.
        reason: &'static str,
        /// How long the client should wait before it reconnects.
        retry_after_ms: u64,
        /// The refused request's `id`, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
}

/// How long a client told `goaway` waits before it reconnects (protocol v1.1's example value: long
/// enough for the load balancer to see the node is not ready, short enough not to be noticed).
pub const GOAWAY_RETRY_AFTER_MS: u64 = 2000;

/// `hello.limits`: the limits the server enforces.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// The largest accepted frame, in bytes.
    pub max_frame: usize,
}

/// `hello.timers`: the floor timers, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Timers {
    /// T1: the floor is released after this long without media from the holder.
    pub t1_ms: u64,
    /// T2: the maximum talk time.
    pub t2_ms: u64,
    /// T3: how long a pre-empted holder stays forwarded (0: not at all).
    pub t3_ms: u64,
}

/// One channel of a `resumed` message.
#[derive(Debug, Clone, Serialize)]
pub struct ResumedChannel {
    /// The channel.
    pub channel: String,
    /// Who holds its floor now.
    pub speaker: Option<String>,
    /// Its epoch.
    pub epoch: u64,
}

/// `joined.rtp`: media details for a plain-RTP member.
#[derive(Debug, Clone, Serialize)]
pub struct RtpInfo {
    /// Where the member sends its RTP: the `host:port` of its channel's shard.
    pub server_addr: String,
    /// The SSRC of the one stream the member receives.
    pub ssrc: u32,
    /// The RTP payload type of Opus (111).
    pub payload_type: u8,
}

/// `{"type":"floor", …}`: fields present per state as in protocol v1.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FloorMessage {
    /// The channel.
    pub channel: String,
    /// `granted`, `taken`, `denied`, `queued`, `idle` or `revoked`.
    pub state: &'static str,
    /// The holder (`granted`, `taken`, `revoked`), or who holds the floor when `denied`, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speaker: Option<String>,
    /// The grant's epoch (`granted`, `taken`, `revoked`), or the ended burst's (`idle`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// `granted`: the maximum talk time (T2), in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// `denied` or `revoked`: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// `queued`: the place in line, counted from 1; 0 when about to pre-empt the holder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    /// `revoked`: how long the holder stays forwarded (T3 when pre-empted, else 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
    /// v1.1: every event of an emergency burst (`granted`, `taken`, `idle`) says so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emergency: Option<bool>,
    /// The `id` of a request this event answers; never set today, so never sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

impl FloorMessage {
    /// The `floor` message for `event` on `channel` (without `emergency` or `id`, which the caller sets).
    pub fn from_event(channel: &str, event: &FloorEvent) -> Self {
        let channel = channel.to_string();
        match event.clone() {
            FloorEvent::Granted {
                speaker,
                epoch,
                duration_ms,
            } => FloorMessage {
                channel,
                state: "granted",
                speaker: Some(speaker),
                epoch: Some(epoch),
                duration_ms: Some(duration_ms),
                ..Default::default()
            },
            FloorEvent::Taken { speaker, epoch } => FloorMessage {
                channel,
                state: "taken",
                speaker: Some(speaker),
                epoch: Some(epoch),
                ..Default::default()
            },
            FloorEvent::Denied { speaker, reason } => FloorMessage {
                channel,
                state: "denied",
                speaker,
                reason: Some(reason.as_str()),
                ..Default::default()
            },
            FloorEvent::Queued { position } => FloorMessage {
                channel,
                state: "queued",
                position: Some(position),
                ..Default::default()
            },
            FloorEvent::Idle { epoch } => FloorMessage {
                channel,
                state: "idle",
                epoch: Some(epoch),
                ..Default::default()
            },
            FloorEvent::Revoked {
                speaker,
                epoch,
                reason,
                grace_ms,
            } => FloorMessage {
                channel,
                state: "revoked",
                speaker: Some(speaker),
                epoch: Some(epoch),
                reason: Some(reason.as_str()),
                grace_ms: Some(grace_ms),
                ..Default::default()
            },
        }
    }
}

impl Message {
    /// An `error` message for `err`, echoing `id`.
    pub fn error(err: &SignalError, id: Option<Value>) -> Self {
        Message::Error {
            code: err.code,
            message: err.message.clone(),
            id,
        }
    }

    /// The message as the text of one WebSocket frame.
    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: no maps with non-string keys, no foreign Serialize impls.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"serialize"}"#.into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_with_ids() {
        let f = parse(r#"{"type":"join","channel":"ops-1","member":"alice","transport":"rtp","rtp_addr":"127.0.0.1:5","id":3}"#).unwrap();
        assert_eq!(f.id, Some(Value::from(3)));
        let Request::Join(j) = f.request else {
            panic!()
        };
        assert_eq!(
            (j.priority, j.presence, j.transport.as_str()),
            (0, true, "rtp")
        );
        assert_eq!(j.member.as_deref(), Some("alice"));
        let f = parse(r#"{"type":"ptt","channel":"c","action":"press","id":"x"}"#).unwrap();
        assert_eq!(
            f.request,
            Request::Ptt(Ptt {
                channel: "c".into(),
                action: PttAction::Press,
                queue: false,
                emergency: false,
            })
        );
        assert_eq!(
            parse(r#"{"type":"ping","id":7}"#).unwrap().request,
            Request::Ping {}
        );
        let f = parse(r#"{"type":"join","channel":"c","member":"m","extra":1}"#).unwrap();
        let Request::Join(j) = f.request else {
            panic!()
        };
        assert_eq!(
            j.transport, "webrtc",
            "transport defaults to webrtc; unknown fields ignored"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let msg = |t: &str| parse(t).unwrap_err().1.message;
        assert!(msg("not json").contains("not valid JSON"));
        assert!(msg("[1]").contains("not a JSON object"));
        assert!(msg(r#"{"id":1}"#).contains("missing field `type`"));
        assert!(msg(r#"{"type":"dance"}"#).contains("unknown message type 'dance'"));
        assert!(msg(r#"{"type":"ptt","channel":"c"}"#).contains("action"));
        assert!(msg(r#"{"type":"ptt","channel":"c","action":"hold"}"#).contains("hold"));
        assert_eq!(
            parse(r#"{"type":"dance","id":9}"#).unwrap_err().0,
            Some(Value::from(9))
        );
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("channel", "ops-1.a_b").is_ok());
        assert!(validate_name("channel", "").is_err());
        assert!(validate_name("channel", &"x".repeat(65)).is_err());
        let e = validate_name("channel", "a/b").unwrap_err();
        assert_eq!(e.message, "channel name has an invalid character '/'");
    }

    #[test]
    fn floor_messages_match_the_protocol() {
        let m = Message::Floor(FloorMessage::from_event(
            "ops-1",
            &FloorEvent::Denied {
                speaker: Some("bob".into()),
                reason: crate::floor::DenyReason::Busy,
            },
        ));
        assert_eq!(
            m.to_json(),
            r#"{"type":"floor","channel":"ops-1","state":"denied","speaker":"bob","reason":"busy"}"#
        );
        let m = Message::Floor(FloorMessage::from_event(
            "ops-1",
            &FloorEvent::Idle { epoch: 9 },
        ));
        assert_eq!(
            m.to_json(),
            r#"{"type":"floor","channel":"ops-1","state":"idle","epoch":9}"#
        );
    }
}
