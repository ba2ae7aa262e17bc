//! Session resume (protocol v1.1): a phone whose Wi-Fi drops for a few seconds keeps its place.
//!
//! Every connection is a session with an id and a secret resume token, both sent in `hello`. When a
//! connection drops without a WebSocket close — a network blip, not a goodbye — its memberships are kept
//! for the resume window: the shard goes on forwarding to its media legs, a floor it holds stays held
//! (T1 still applies: a holder whose media stops is revoked as ever), and nobody is told `left`. A new
//! connection whose first frame is `resume` with the id and token takes the session over: memberships move
//! to it and it is told `resumed` with each channel's floor. Frames missed while away are not replayed.
//! After the window the memberships leave as on any disconnect. Sessions live on the node that made
//! them: a node that stops ends them.

use std::cmp::Reverse;
use std::time::Instant;

use serde_json::Value;
use tracing::{debug, info};

use super::{HubCore, Output};
use crate::floor::FloorEvent;
use crate::ids::ConnId;
use crate::signal::protocol::{
    FloorMessage, Limits, Message, ResumedChannel, SignalError, Timers, MAX_FRAME,
};

impl HubCore {
    /// The first frame of a connection.
    pub(super) fn hello(&self, session: String, resume_token: String) -> Message {
        let floor = &self.config.floor;
        Message::Hello {
            protocol: 1,
            session,
            limits: Limits {
                max_frame: MAX_FRAME,
            },
            timers: Timers {
                t1_ms: floor.t1.as_millis() as u64,
                t2_ms: floor.t2.as_millis() as u64,
                t3_ms: floor.t3.as_millis() as u64,
            },
            ice_servers: vec![],
            auth: if self.config.auth.is_some() {
                "jwt"
            } else {
                "none"
            },
            resume_token,
        }
    }

    /// The connection dropped without a goodbye: its memberships wait for a `resume` until the window
    /// ends (a connection with none, or a window of zero, simply disconnects).
    pub(super) fn on_dropped(&mut self, conn: ConnId, now: Instant) {
        let window = self.config.resume_window;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        // A draining node keeps nothing for a resume: the client comes back elsewhere.
        if window.is_zero()
            || c.joined.is_empty()
            || c.detached_until.is_some()
            || self.drain.is_some()
        {
            return self.disconnect(conn, now);
        }
        let until = now + window;
        c.detached_until = Some(until);
        self.detached.push(Reverse((until, conn)));
        // The socket is gone: the runner drops its handle. The session stays.
        self.out.push_back(Output::Close { conn });
        debug!(conn, "connection dropped: memberships kept for a resume");
    }

    /// Sessions whose resume window ended leave their channels.
    pub(super) fn expire_detached(&mut self, now: Instant) {
        while let Some(Reverse((until, conn))) = self.detached.peek().copied() {
            if until > now {
                break;
            }
            self.detached.pop();
            if self
                .conns
                .get(&conn)
                .is_some_and(|c| c.detached_until == Some(until))
            {
                info!(conn, "resume window over: leaving");
                self.disconnect(conn, now);
            }
        }
    }

    /// `resume`: the new connection `conn` takes over the session, if the token is right and the session
    /// is still here. Its memberships, media legs and floors go on; only the WebSocket changed.
    pub(super) fn on_resume(
        &mut self,
        conn: ConnId,
        session: &str,
        token: &str,
        id: Option<Value>,
    ) -> Result<(), SignalError> {
        let refused = |why: &str| {
            SignalError::bad_request(format!(
                "cannot resume session '{session}': {why}; join afresh"
            ))
        };
        if self.conns.get(&conn).is_none_or(|c| !c.joined.is_empty()) {
            return Err(refused("resume must be the first request of a connection"));
        }
        let old = *self
            .sessions
            .get(session)
            .filter(|&&old| old != conn)
            .ok_or_else(|| refused("unknown or expired"))?;
        let Some(old_conn) = self.conns.get(&old) else {
            return Err(refused("unknown or expired"));
        };
        if !constant_time_eq(old_conn.token.as_bytes(), token.as_bytes()) {
            return Err(refused("wrong resume token"));
        }
        // The old connection may not have been noticed as dropped yet (a half-open TCP): take over.
        let attached = old_conn.detached_until.is_none();
        let Some(old_conn) = self.conns.remove(&old) else {
            return Err(refused("unknown or expired"));
        };
        if attached {
            self.out.push_back(Output::Close { conn: old });
        }
        if let Some(n) = self.ips.get_mut(&old_conn.ip) {
            n.conns = n.conns.saturating_sub(1);
            n.webrtc_pending = n.webrtc_pending.saturating_sub(old_conn.webrtc_pending);
        }
        // The new connection's own fresh session is replaced by the one it resumes.
        let Some(new_conn) = self.conns.get_mut(&conn) else {
            return Ok(());
        };
        self.sessions.remove(&new_conn.session);
        new_conn.session = old_conn.session.clone();
        new_conn.token = old_conn.token.clone();
        new_conn.joined = old_conn.joined.clone();
        new_conn.webrtc_pending = old_conn.webrtc_pending;
        let new_ip = new_conn.ip;
        if let Some(n) = self.ips.get_mut(&new_ip) {
            n.webrtc_pending += old_conn.webrtc_pending;
        }
        self.sessions.insert(old_conn.session.clone(), conn);
        for (channel, member) in &old_conn.joined {
            if let Some(m) = self
                .channels
                .get_mut(channel)
                .and_then(|ch| ch.members.get_mut(member))
            {
                m.conn = conn;
            }
        }
        for (owner, _) in self.media_addrs.values_mut() {
            if *owner == old {
                *owner = conn;
            }
        }
        let mut joined: Vec<(String, String)> = old_conn.joined.into_iter().collect();
        joined.sort();
        let channels = joined
            .iter()
            .filter_map(|(channel, _)| {
                let ch = self.channels.get(channel)?;
                Some(ResumedChannel {
                    channel: channel.clone(),
                    speaker: ch.floor.speaker().map(str::to_string),
                    epoch: ch.floor.epoch(),
                })
            })
            .collect();
        let resumed = Message::Resumed {
            session: session.to_string(),
            channels,
            id,
        };
        self.send(conn, &resumed);
        // The floor of each channel, said again as the frame the member would have seen.
        for (channel, member) in &joined {
            self.tell_floor(conn, channel, member);
        }
        info!(session, conn, "session resumed");
        Ok(())
    }

    /// The current floor of `channel` as `member` sees it: granted (it holds), taken, or idle.
    fn tell_floor(&mut self, conn: ConnId, channel: &str, member: &str) {
        let Some(ch) = self.channels.get(channel) else {
            return;
        };
        let epoch = ch.floor.epoch();
        let event = match ch.floor.speaker() {
            Some(speaker) if speaker == member => FloorEvent::Granted {
                speaker: speaker.to_string(),
                epoch,
                duration_ms: self.config.floor.t2.as_millis() as u64,
            },
            Some(speaker) => FloorEvent::Taken {
                speaker: speaker.to_string(),
                epoch,
            },
            None => FloorEvent::Idle { epoch },
        };
        let text = Message::Floor(FloorMessage::from_event(channel, &event)).to_json();
        self.send_text(conn, text);
    }
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
