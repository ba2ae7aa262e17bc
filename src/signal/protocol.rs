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
    BadRequest,
    NotJoined,
    AlreadyJoined,
    Unauthorized,
    Unavailable,
    TooLarge,
    RateLimited,
    Internal,
}

impl ErrorCode {
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
    pub code: ErrorCode,
    pub message: String,
}

impl SignalError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        SignalError {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

/// Client → server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Join(Join),
    Ptt(Ptt),
    Leave {
        channel: String,
    },
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
    #[serde(default = "default_transport")]
    pub transport: String,
    pub rtp_addr: Option<String>,
    pub sdp: Option<String>,
    #[serde(default)]
    pub priority: u8,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PttAction {
    Press,
    Release,
}

/// A parsed frame: the request and the `id` to echo.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub id: Option<Value>,
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
    Hello {
        protocol: u32,
        session: String,
        limits: Limits,
        timers: Timers,
        ice_servers: Vec<Value>,
        /// v1.1: `"jwt"` when joins need a signed token, `"none"` when the server runs open.
        auth: &'static str,
        /// v1.1: presented with `session` in a `resume` after the connection drops.
        resume_token: String,
    },
    /// v1.1: the answer to `resume`: the session goes on, with each channel's current floor.
    Resumed {
        session: String,
        channels: Vec<ResumedChannel>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    Joined {
        channel: String,
        member: String,
        members: Vec<String>,
        speaker: Option<String>,
        epoch: u64,
        /// v1.1: the effective floor priority (the join's, capped by the token's `max_priority`).
        priority: u8,
        #[serde(skip_serializing_if = "Option::is_none")]
        rtp: Option<RtpInfo>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sdp: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    Floor(FloorMessage),
    Presence {
        channel: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        joined: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        left: Option<String>,
    },
    Left {
        channel: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    Error {
        code: ErrorCode,
        message: String,
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

#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub max_frame: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timers {
    pub t1_ms: u64,
    pub t2_ms: u64,
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

#[derive(Debug, Clone, Serialize)]
pub struct RtpInfo {
    pub server_addr: String,
    pub ssrc: u32,
    pub payload_type: u8,
}

/// `{"type":"floor", …}`: fields present per state as in protocol v1.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FloorMessage {
    pub channel: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speaker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
    /// v1.1: every event of an emergency burst (`granted`, `taken`, `idle`) says so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emergency: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

impl FloorMessage {
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
    pub fn error(err: &SignalError, id: Option<Value>) -> Self {
        Message::Error {
            code: err.code,
            message: err.message.clone(),
            id,
        }
    }

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
