//! Connections: frames in, frames out, errors that name what was wrong, and disconnecting a client —
//! whether it closed, sent a frame over the limit, or stopped reading.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Instant;

use serde_json::Value;
use tracing::{debug, warn};

use rand::Rng;

use super::{Conn, HubCore, Output};
use crate::auth::TokenBucket;
use crate::ids::ConnId;
use crate::signal::protocol::{self, ErrorCode, Frame, Message, Request, SignalError};

impl HubCore {
    /// Queues a message for a client (nothing if the connection is gone).
    pub(super) fn send(&mut self, conn: ConnId, msg: &Message) {
        self.send_text(conn, msg.to_json());
    }

    pub(super) fn send_text(&mut self, conn: ConnId, text: String) {
        // A detached connection (dropped, waiting to be resumed) has no socket: what it misses is not
        // replayed (protocol v1.1).
        if self
            .conns
            .get(&conn)
            .is_some_and(|c| c.detached_until.is_none())
        {
            self.out.push_back(Output::Send { conn, text });
        }
    }

    pub(super) fn send_error(&mut self, conn: ConnId, e: &SignalError, id: Option<Value>) {
        *self.counters.errors.entry(e.code.as_str()).or_default() += 1;
        debug!(conn, code = e.code.as_str(), message = %e.message, "request refused");
        self.send(conn, &Message::error(e, id));
    }

    /// A new connection: it is greeted with `hello` (its session id and resume token), or refused
    /// (`rate_limited`, then closed) past the per-address limit.
    pub(super) fn on_connect(&mut self, conn: ConnId, ip: IpAddr, now: Instant) {
        let session = format!("s-{:016x}", self.rng.random::<u64>());
        let token = crate::peer::webrtc::ice_token(&mut self.rng, 32);
        let limits = &self.config.limits;
        let open = self.ips.entry(ip).or_default();
        let burst = 2.0 * f64::from(limits.frames_per_second);
        self.conns.insert(
            conn,
            Conn {
                ip,
                joined: HashSet::new(),
                frames: TokenBucket::new(burst, now),
                webrtc_pending: 0,
                session: session.clone(),
                token: token.clone(),
                detached_until: None,
            },
        );
        self.sessions.insert(session.clone(), conn);
        open.conns += 1;
        let over = open.conns > limits.connections_per_ip;
        let hello = self.hello(session, token);
        self.send(conn, &hello);
        if over {
            let e = SignalError::new(
                ErrorCode::RateLimited,
                format!(
                    "too many connections from {ip} (limit {} per address); closing",
                    self.config.limits.connections_per_ip
                ),
            );
            self.limit_hit("connections_per_ip");
            self.send_error(conn, &e, None);
            self.disconnect(conn, now);
        } else if self.drain.is_some() {
            // The load balancer has not seen `/readyz` yet: send the client on at once.
            self.close_if_idle(conn, now);
        }
    }

    /// Counts a limit that bit.
    pub(super) fn limit_hit(&mut self, limit: &'static str) {
        *self.counters.limited.entry(limit).or_default() += 1;
    }

    /// Takes one frame from the connection's budget: `frames_per_second`, plus `frames_per_membership`
    /// for each membership it holds, with a burst of two seconds' worth.
    fn frame_allowed(&mut self, conn: ConnId, now: Instant) -> bool {
        let limits = &self.config.limits;
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        let rate = f64::from(limits.frames_per_second)
            + f64::from(limits.frames_per_membership) * c.joined.len() as f64;
        c.frames.take(rate, 2.0 * rate, now)
    }

    pub(super) fn on_frame(
        &mut self,
        conn: ConnId,
        frame: Result<Frame, (Option<Value>, SignalError)>,
        now: Instant,
    ) {
        if !self.frame_allowed(conn, now) {
            if self.conns.contains_key(&conn) {
                let id = frame
                    .as_ref()
                    .map_or_else(|(id, _)| id.clone(), |f| f.id.clone());
                let e = SignalError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "too many frames: at most {}/s, plus {}/s per membership; this one was dropped",
                        self.config.limits.frames_per_second, self.config.limits.frames_per_membership
                    ),
                );
                self.limit_hit("frames_per_second");
                self.send_error(conn, &e, id);
            }
            return;
        }
        match frame {
            Ok(Frame { id, request }) => {
                if let Err(e) = self.on_request(conn, request, id.clone(), now) {
                    self.send_error(conn, &e, id);
                }
            }
            Err((id, e)) => self.send_error(conn, &e, id),
        }
    }

    fn on_request(
        &mut self,
        conn: ConnId,
        request: Request,
        id: Option<Value>,
        now: Instant,
    ) -> Result<(), SignalError> {
        match request {
            Request::Join(_) if self.drain.is_some() => {
                self.refuse_join_draining(conn, id, now);
                Ok(())
            }
            Request::Join(join) if self.needs_placement(&join) => {
                self.place_join(conn, join, id, now)
            }
            Request::Join(join) => self.on_join(conn, join, id, now),
            Request::Ptt(ptt) => self.on_ptt(conn, ptt, now),
            Request::Leave { channel } => {
                let member = self.member_of(conn, &channel)?;
                self.leave(conn, &channel, &member, now);
                self.send(conn, &Message::Left { channel, id });
                Ok(())
            }
            Request::Ping {} => {
                self.send(conn, &Message::Pong { id });
                Ok(())
            }
            Request::Resume {
                session,
                resume_token,
            } => self.on_resume(conn, &session, &resume_token, id),
        }
    }

    /// The member name this connection has in `channel` (once `joined` was sent).
    pub(super) fn member_of(&self, conn: ConnId, channel: &str) -> Result<String, SignalError> {
        let not_joined = || {
            SignalError::new(
                ErrorCode::NotJoined,
                format!("not joined to channel '{channel}'"),
            )
        };
        let c = self.conns.get(&conn).ok_or_else(not_joined)?;
        let (_, member) = c
            .joined
            .iter()
            .find(|(ch, _)| ch == channel)
            .ok_or_else(not_joined)?;
        let ready = self
            .channels
            .get(channel)
            .and_then(|ch| ch.members.get(member))
            .is_some_and(|m| m.ready);
        if !ready {
            return Err(not_joined());
        }
        Ok(member.clone())
    }

    pub(super) fn on_too_large(&mut self, conn: ConnId, now: Instant) {
        let e = SignalError::new(
            ErrorCode::TooLarge,
            format!("frame larger than {} bytes; closing", protocol::MAX_FRAME),
        );
        self.send_error(conn, &e, None);
        self.disconnect(conn, now);
    }

    /// A client that does not read its frames is disconnected, not buffered without bound.
    pub(super) fn on_unwritable(&mut self, conn: ConnId, now: Instant) {
        if self
            .conns
            .get(&conn)
            .is_some_and(|c| c.detached_until.is_none())
        {
            warn!(conn, "client is not reading: closing its connection");
            self.counters.slow_clients += 1;
            // Its socket goes; its memberships may be resumed on a new connection.
            self.on_dropped(conn, now);
        }
    }

    /// Every membership of the connection leaves; the runner closes the socket after what is queued.
    pub(super) fn disconnect(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if self.sessions.get(&c.session) == Some(&conn) {
            self.sessions.remove(&c.session);
        }
        // Leave first, while the connection still counts its pending WebRTC joins.
        let joined: Vec<(String, String)> = c.joined.iter().cloned().collect();
        for (channel, member) in joined {
            self.leave(conn, &channel, &member, now);
        }
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(n) = self.ips.get_mut(&c.ip) {
            n.conns = n.conns.saturating_sub(1);
            if n.conns == 0 {
                self.ips.remove(&c.ip);
            }
        }
        self.out.push_back(Output::Close { conn });
        debug!(conn, "disconnected");
    }
}
