//! Connections: frames in, frames out, errors that name what was wrong, and disconnecting a client —
//! whether it closed, sent a frame over the limit, or stopped reading.

use std::time::Instant;

use serde_json::Value;
use tracing::{debug, warn};

use super::{HubCore, Output};
use crate::ids::ConnId;
use crate::signal::protocol::{self, ErrorCode, Frame, Message, Request, SignalError};

impl HubCore {
    /// Queues a message for a client (nothing if the connection is gone).
    pub(super) fn send(&mut self, conn: ConnId, msg: &Message) {
        self.send_text(conn, msg.to_json());
    }

    pub(super) fn send_text(&mut self, conn: ConnId, text: String) {
        if self.conns.contains_key(&conn) {
            self.out.push_back(Output::Send { conn, text });
        }
    }

    pub(super) fn send_error(&mut self, conn: ConnId, e: &SignalError, id: Option<Value>) {
        *self.counters.errors.entry(e.code.as_str()).or_default() += 1;
        debug!(conn, code = e.code.as_str(), message = %e.message, "request refused");
        self.send(conn, &Message::error(e, id));
    }

    pub(super) fn on_frame(
        &mut self,
        conn: ConnId,
        frame: Result<Frame, (Option<Value>, SignalError)>,
        now: Instant,
    ) {
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
        if self.conns.contains_key(&conn) {
            warn!(conn, "client is not reading: disconnecting");
            self.counters.slow_clients += 1;
            self.disconnect(conn, now);
        }
    }

    /// Every membership of the connection leaves; the runner closes the socket after what is queued.
    pub(super) fn disconnect(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        for (channel, member) in c.joined {
            self.leave(conn, &channel, &member, now);
        }
        self.out.push_back(Output::Close { conn });
        debug!(conn, "disconnected");
    }
}
