//! Membership: a `join` is checked, handed to the channel's shard, recorded in the session store, and
//! answered `joined`; a member leaves by request, by disconnecting, or when its WebRTC peer closes.
//!
//! The order matters: the shard must have the member (and, for WebRTC, its ICE username registered)
//! before `joined` leaves, or the first packet could beat the registration; the session store is asked
//! who else is in the channel on other nodes, bounded by [`SESSION_WAIT`](super::SESSION_WAIT).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use rand::Rng;
use serde_json::Value;
use tracing::{debug, info};

use super::calls::{Purpose, StoreCall};
use super::{ChannelCtl, HubCore, MemberCtl, SESSION_WAIT};
use crate::auth::{Rights, TokenError};
use crate::floor::{Floor, Input as FloorInput};
use crate::ids::{ConnId, MemberKey};
use crate::peer::offer::{parse_offer, Offer};
use crate::shard::{self, Command, Event, PeerRefused};
use crate::signal::protocol::{self, ErrorCode, Join, Message, RtpInfo, SignalError};

/// How a joining member's media will flow.
enum JoinLeg {
    Rtp(SocketAddr),
    WebRtc(Offer),
}

impl HubCore {
    pub(super) fn on_join(
        &mut self,
        conn: ConnId,
        join: Join,
        id: Option<Value>,
        now: Instant,
    ) -> Result<(), SignalError> {
        let Some(c) = self.conns.get(&conn) else {
            return Ok(()); // the connection is gone
        };
        let (peer_ip, memberships) = (c.ip, c.joined.len());
        protocol::validate_name("channel", &join.channel)?;
        let (member, rights) = self.authorize(&join, now)?;
        protocol::validate_name("member", &member)?;
        let limits = &self.config.limits;
        if memberships >= limits.memberships_per_connection {
            let max = limits.memberships_per_connection;
            self.limit_hit("memberships_per_connection");
            return Err(SignalError::new(
                ErrorCode::RateLimited,
                format!(
                    "this connection already holds {max} memberships (the limit per connection)"
                ),
            ));
        }
        let leg = match join.transport.as_str() {
            "rtp" => JoinLeg::Rtp(self.rtp_addr(&join, conn, peer_ip)?),
            "webrtc" => {
                self.check_webrtc_pending(conn, peer_ip)?;
                JoinLeg::WebRtc(webrtc_offer(&join)?)
            }
            other => {
                return Err(SignalError::bad_request(format!(
                    "unknown transport '{other}' (rtp or webrtc)"
                )))
            }
        };
        let Some(c) = self.conns.get(&conn) else {
            return Ok(());
        };
        if c.joined.iter().any(|(ch, _)| *ch == join.channel) {
            return Err(SignalError::new(
                ErrorCode::AlreadyJoined,
                format!("this connection already joined channel '{}'", join.channel),
            ));
        }
        if self
            .channels
            .get(&join.channel)
            .is_some_and(|ch| ch.members.contains_key(&member))
        {
            return Err(SignalError::new(
                ErrorCode::AlreadyJoined,
                format!(
                    "member '{}' is already joined to channel '{}'",
                    member, join.channel
                ),
            ));
        }
        if !self.channels.contains_key(&join.channel) {
            self.channel_opened(&join.channel, now);
        }
        let shards = self.config.media_ports.len();
        let floor_config = self.config.floor;
        let key = self.next_key;
        self.next_key += 1;
        let ssrc = self.rng.random::<u32>().max(1);
        let priority = join.priority.min(rights.max_priority);
        let listens = rights.listen;
        let press_burst = 2.0 * f64::from(self.config.limits.presses_per_second);
        let webrtc_pending = matches!(leg, JoinLeg::WebRtc(_));
        let rtp_addr = match &leg {
            JoinLeg::Rtp(addr) => Some(*addr),
            JoinLeg::WebRtc(_) => None,
        };
        if let Some(addr) = rtp_addr {
            self.media_addrs.entry(addr).or_insert((conn, 0)).1 += 1;
        }
        if webrtc_pending {
            self.count_webrtc_pending(conn, 1);
        }
        let (channel, name) = (join.channel.clone(), member.clone());
        let (command, listen_only) = match leg {
            JoinLeg::Rtp(addr) => (
                Command::AddMember {
                    channel,
                    key,
                    name,
                    addr,
                    ssrc,
                },
                false,
            ),
            JoinLeg::WebRtc(offer) => (
                Command::AddPeer {
                    channel,
                    key,
                    name,
                    offer: Box::new(offer.sdp),
                },
                offer.listen_only,
            ),
        };
        let ch = self
            .channels
            .entry(join.channel.clone())
            .or_insert_with(|| ChannelCtl {
                shard: shard::shard_of(&join.channel, shards),
                relay_targets: Vec::new(),
                members: BTreeMap::new(),
                floor: Floor::new(floor_config),
                timer: None,
                remote_holder: None,
                nodes: Default::default(),
                refreshed: now,
            });
        ch.members.insert(
            member.clone(),
            MemberCtl {
                conn,
                key,
                priority,
                presence: join.presence,
                ready: false,
                ssrc,
                join_id: id,
                listen_only,
                answer: None,
                rights,
                presses: crate::auth::TokenBucket::new(press_burst, now),
                pressed_at: None,
                webrtc_pending,
                rtp_addr,
            },
        );
        let shard = ch.shard;
        let first = ch.members.len() == 1;
        self.shard_command(shard, command);
        if first && self.is_recorded(&join.channel) {
            // The shard made the channel with this member: say it is recorded.
            let command = Command::SetRecording {
                channel: join.channel.clone(),
                on: true,
            };
            self.shard_command(shard, command);
        }
        if !listens {
            let command = Command::SetListens {
                channel: join.channel.clone(),
                key,
                listens,
            };
            self.shard_command(shard, command);
        }
        self.pending
            .insert(key, (join.channel.clone(), member.clone()));
        if let Some(c) = self.conns.get_mut(&conn) {
            c.joined.insert((join.channel, member));
        }
        Ok(())
    }

    /// The join's member name and rights: from its token when the server checks tokens (the name then
    /// comes from `sub`), the name given and every right when the server runs open.
    pub(super) fn authorize(
        &mut self,
        join: &Join,
        now: Instant,
    ) -> Result<(String, Rights), SignalError> {
        let Some(verifier) = self.config.auth.clone() else {
            let member = join.member.clone().ok_or_else(|| {
                SignalError::bad_request("invalid 'join' message: missing field `member`")
            })?;
            return Ok((member, Rights::open()));
        };
        let checked = join
            .token
            .as_deref()
            .ok_or(TokenError::Missing)
            .and_then(|token| verifier.verify(token, self.unix_secs(now)))
            .and_then(|claims| {
                if let Some(member) = join.member.as_ref().filter(|m| **m != claims.sub) {
                    return Err(TokenError::WrongMember {
                        member: member.clone(),
                        sub: claims.sub,
                    });
                }
                if !claims.tg.allows(&join.channel) {
                    return Err(TokenError::WrongChannel(join.channel.clone()));
                }
                Ok(claims)
            });
        match checked {
            Ok(claims) => Ok((claims.sub, claims.tg)),
            Err(e) => {
                *self.counters.auth_failures.entry(e.reason()).or_default() += 1;
                Err(SignalError::new(ErrorCode::Unauthorized, e.to_string()))
            }
        }
    }

    /// WebRTC joins still in ICE/DTLS set-up are bounded per connection and per client address, so one
    /// client's never-connecting offers cannot fill the shard's handshake slots.
    fn check_webrtc_pending(
        &mut self,
        conn: ConnId,
        ip: std::net::IpAddr,
    ) -> Result<(), SignalError> {
        let per_conn = self.conns.get(&conn).map_or(0, |c| c.webrtc_pending);
        let per_ip = self.ips.get(&ip).map_or(0, |n| n.webrtc_pending);
        let limits = &self.config.limits;
        let (limit, name, max) = if per_conn >= limits.webrtc_pending_per_connection {
            (
                "webrtc_pending_per_connection",
                "this connection",
                limits.webrtc_pending_per_connection,
            )
        } else if per_ip >= limits.webrtc_pending_per_ip {
            (
                "webrtc_pending_per_ip",
                "this address",
                limits.webrtc_pending_per_ip,
            )
        } else {
            return Ok(());
        };
        self.limit_hit(limit);
        Err(SignalError::new(
            ErrorCode::RateLimited,
            format!(
                "{name} already has {max} WebRTC joins waiting for ICE/DTLS (the limit); try again"
            ),
        ))
    }

    /// Adds `delta` to the WebRTC joins pending on `conn` and on its client address.
    fn count_webrtc_pending(&mut self, conn: ConnId, delta: isize) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return; // disconnected: its address's count went with it
        };
        c.webrtc_pending = c.webrtc_pending.saturating_add_signed(delta);
        if let Some(n) = self.ips.get_mut(&c.ip) {
            n.webrtc_pending = n.webrtc_pending.saturating_add_signed(delta);
        }
    }

    fn rtp_addr(
        &self,
        join: &Join,
        conn: ConnId,
        peer_ip: std::net::IpAddr,
    ) -> Result<SocketAddr, SignalError> {
        let text = join.rtp_addr.as_deref().ok_or_else(|| {
            SignalError::bad_request("transport 'rtp' needs \"rtp_addr\":\"ip:port\"")
        })?;
        let addr: SocketAddr = text.parse().map_err(|_| {
            SignalError::bad_request(format!("rtp_addr '{text}' is not an ip:port address"))
        })?;
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(SignalError::bad_request(format!(
                "rtp_addr '{text}' is not a usable address"
            )));
        }
        if !self
            .config
            .rtp_allow
            .iter()
            .any(|net| net.contains(&addr.ip()))
        {
            return Err(SignalError::new(
                ErrorCode::Unauthorized,
                format!("rtp_addr '{text}' is outside the networks allowed by --rtp-allow"),
            ));
        }
        // Media belongs to whoever signals for it: the address must be the client's own (loopback counts
        // as one host), unless the operator allows any (gateways whose media leaves another host).
        let same_host = addr.ip() == peer_ip || (addr.ip().is_loopback() && peer_ip.is_loopback());
        if !same_host && !self.config.rtp_any_ip {
            return Err(SignalError::new(
                ErrorCode::Unauthorized,
                format!(
                    "rtp_addr '{text}' is not this client's address ({peer_ip}); see --rtp-any-ip"
                ),
            ));
        }
        if self
            .media_addrs
            .get(&addr)
            .is_some_and(|(owner, _)| *owner != conn)
        {
            return Err(SignalError::new(
                ErrorCode::Unauthorized,
                format!("rtp_addr '{text}' is in use by another connection"),
            ));
        }
        Ok(addr)
    }

    pub(super) fn on_shard_event(&mut self, event: Event, now: Instant) {
        match event {
            Event::MemberAdded { key } => {
                if let Some((channel, member)) = self.pending.remove(&key) {
                    self.session_join(channel, member, key, now);
                }
            }
            Event::PeerAnswered { key, answer } => self.on_peer_answered(key, answer, now),
            Event::PeerConnected { channel, key } => {
                let member = self
                    .channels
                    .get_mut(&channel)
                    .and_then(|ch| ch.members.values_mut().find(|m| m.key == key));
                if let Some(m) = member.filter(|m| m.webrtc_pending) {
                    m.webrtc_pending = false;
                    let conn = m.conn;
                    self.count_webrtc_pending(conn, -1);
                }
            }
            Event::PeerClosed {
                channel,
                key,
                reason,
            } => self.on_peer_closed(&channel, key, reason, now),
            Event::Applied {
                channel,
                epoch,
                idle: true,
                ..
            } => self.floor_input(&channel, FloorInput::ShardIdle { epoch }, now),
            Event::Applied {
                channel,
                epoch,
                applied,
                idle: false,
            } => {
                if applied {
                    self.floor_input(&channel, FloorInput::ShardApplied { epoch }, now);
                }
            }
            Event::BurstEnded {
                channel,
                epoch,
                packets,
            } => self.shard_burst_ended(&channel, epoch, packets, now),
            Event::Silence { channel, epoch } => {
                self.floor_input(&channel, FloorInput::MediaSilence { epoch }, now);
            }
        }
    }

    /// A command the shard's full queue refused. A join is undone and answered `unavailable`; a speaker
    /// change is sent again (coalesced per channel) until the shard takes it — until then it is not
    /// acknowledged, so a grant is not announced for a shard that does not forward it.
    pub(super) fn on_shard_full(&mut self, shard: usize, command: Command, now: Instant) {
        self.counters.shard_queue_full += 1;
        match command {
            Command::AddMember { key, .. } | Command::AddPeer { key, .. } => {
                let refused = SignalError::new(
                    ErrorCode::Unavailable,
                    "media shard is overloaded; try again",
                );
                self.refuse_join(key, refused, now);
            }
            Command::Speaker { channel, change } => {
                // Sent again shortly (only the channel's latest change matters): never dropped.
                tracing::warn!(
                    shard,
                    channel,
                    "shard command queue full: speaker change retried"
                );
                self.speaker_change_refused(channel, change, now);
            }
            _ => tracing::warn!(shard, "shard command queue full: command lost"),
        }
    }

    /// The shard built a WebRTC member's peer: `joined` carries the answer. If it could not (str0m refused
    /// the offer), the membership is undone and the join answered with an error.
    fn on_peer_answered(
        &mut self,
        key: MemberKey,
        answer: Result<String, PeerRefused>,
        now: Instant,
    ) {
        let refused = match answer {
            Ok(sdp) => {
                let Some((channel, member)) = self.pending.remove(&key) else {
                    return;
                };
                if let Some(m) = self
                    .channels
                    .get_mut(&channel)
                    .and_then(|ch| ch.members.get_mut(&member))
                {
                    m.answer = Some(sdp);
                }
                return self.session_join(channel, member, key, now);
            }
            Err(PeerRefused::Offer(message)) => SignalError::bad_request(message),
            Err(PeerRefused::Busy) => SignalError::new(
                ErrorCode::Unavailable,
                "too many WebRTC connections are being set up on this server; try again",
            ),
        };
        self.refuse_join(key, refused, now);
    }

    /// Undoes a join the shard did not take, and answers it with `refused`.
    fn refuse_join(&mut self, key: MemberKey, refused: SignalError, now: Instant) {
        let Some((channel, member)) = self.pending.remove(&key) else {
            return;
        };
        let Some(m) = self
            .channels
            .get(&channel)
            .and_then(|ch| ch.members.get(&member))
        else {
            return;
        };
        let (conn, id) = (m.conn, m.join_id.clone());
        self.leave(conn, &channel, &member, now);
        self.send_error(conn, &refused, id);
    }

    /// A WebRTC peer went away (ICE timeout, DTLS close): the normal leave path, so a holder's floor is
    /// released, and the client is told `left`.
    fn on_peer_closed(&mut self, channel: &str, key: MemberKey, reason: &str, now: Instant) {
        let Some(ch) = self.channels.get(channel) else {
            return;
        };
        let Some((member, m)) = ch.members.iter().find(|(_, m)| m.key == key) else {
            return;
        };
        let (member, conn) = (member.clone(), m.conn);
        info!(channel, member, reason, "WebRTC peer closed: leaving");
        self.leave(conn, channel, &member, now);
        self.send(
            conn,
            &Message::Left {
                channel: channel.to_string(),
                id: None,
            },
        );
    }

    /// Records the member in the session store and lists who is in the channel on every node; `joined`
    /// follows the answer (or the deadline: a store that does not answer costs the remote names only).
    fn session_join(&mut self, channel: String, member: String, key: MemberKey, now: Instant) {
        let call = StoreCall::Join {
            channel: channel.clone(),
            member: member.clone(),
            node: self.config.node.clone(),
        };
        let purpose = Purpose::Join {
            channel,
            member,
            key,
        };
        self.calls.start(call, purpose, now, SESSION_WAIT);
    }

    /// The session store refused the name: it is joined to the channel from another node.
    pub(super) fn name_taken(&mut self, channel: &str, member: &str, key: MemberKey, now: Instant) {
        let Some(m) = self
            .channels
            .get(channel)
            .and_then(|ch| ch.members.get(member))
            .filter(|m| m.key == key)
        else {
            return;
        };
        let (conn, id) = (m.conn, m.join_id.clone());
        self.leave(conn, channel, member, now);
        let e = SignalError::new(
            ErrorCode::AlreadyJoined,
            format!("member '{member}' is already joined to channel '{channel}' on another node"),
        );
        self.send_error(conn, &e, id);
    }

    /// The member is in: `joined` to it, `presence` to the others.
    pub(super) fn member_ready(
        &mut self,
        channel: &str,
        member: &str,
        key: MemberKey,
        elsewhere: Vec<String>,
    ) {
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        let Some(m) = ch.members.get_mut(member) else {
            return;
        };
        if m.key != key {
            return;
        }
        m.ready = true;
        let (conn, ssrc, id, priority) = (m.conn, m.ssrc, m.join_id.take(), m.priority);
        // A WebRTC member's SDP answer; plain-RTP members get the `rtp` block instead.
        let sdp = m.answer.take();
        let mut others: Vec<String> = ch
            .members
            .iter()
            .filter(|(n, m)| *n != member && m.ready)
            .map(|(n, _)| n.clone())
            .collect();
        // Members on other nodes, as the session store lists them.
        for name in elsewhere {
            if name != member && !ch.members.contains_key(&name) {
                others.push(name);
            }
        }
        others.sort();
        others.dedup();
        let server_addr =
            SocketAddr::new(self.config.announce_ip, self.config.media_ports[ch.shard]);
        let joined = Message::Joined {
            channel: channel.to_string(),
            member: member.to_string(),
            members: others,
            speaker: ch.floor.speaker().map(str::to_string),
            epoch: ch.floor.epoch(),
            priority,
            rtp: sdp.is_none().then(|| RtpInfo {
                server_addr: server_addr.to_string(),
                ssrc,
                payload_type: shard::OPUS_PT,
            }),
            sdp,
            id,
        };
        debug!(channel, member, conn, "joined");
        self.send(conn, &joined);
        let presence = Message::Presence {
            channel: channel.to_string(),
            joined: Some(member.to_string()),
            left: None,
        };
        self.broadcast_presence(channel, member, &presence);
    }

    /// Removes a membership: the floor learns the member left, the shard drops it, others see presence.
    pub(super) fn leave(&mut self, conn: ConnId, channel: &str, member: &str, now: Instant) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.joined.remove(&(channel.to_string(), member.to_string()));
        }
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        let Some(m) = ch.members.remove(member) else {
            return;
        };
        let shard = ch.shard;
        self.pending.remove(&m.key);
        if m.webrtc_pending {
            self.count_webrtc_pending(m.conn, -1);
        }
        if let Some(addr) = m.rtp_addr {
            if let Some((_, n)) = self.media_addrs.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    self.media_addrs.remove(&addr);
                }
            }
        }
        self.shard_command(
            shard,
            Command::RemoveMember {
                channel: channel.to_string(),
                key: m.key,
            },
        );
        let input = FloorInput::Leave {
            member: member.to_string(),
        };
        self.floor_input(channel, input, now);
        if m.ready {
            let presence = Message::Presence {
                channel: channel.to_string(),
                joined: None,
                left: Some(member.to_string()),
            };
            self.broadcast_presence(channel, member, &presence);
            let call = StoreCall::Leave {
                channel: channel.to_string(),
                member: member.to_string(),
                node: self.config.node.clone(),
            };
            self.call(call, Purpose::None, now);
        }
        self.forget_if_empty(channel, now);
    }

    /// A channel with no member and a quiet floor is forgotten (and this node stops serving it).
    pub(super) fn forget_if_empty(&mut self, channel: &str, now: Instant) {
        if self
            .channels
            .get(channel)
            .is_some_and(|ch| ch.members.is_empty() && ch.floor.is_quiet())
        {
            self.channels.remove(channel);
            self.remote.forget_channel(channel);
            self.channel_closed(channel, now);
        }
    }
}

/// The checked SDP offer of a WebRTC join (before anything is built for it).
fn webrtc_offer(join: &Join) -> Result<Offer, SignalError> {
    let sdp = join.sdp.as_deref().ok_or_else(|| {
        SignalError::bad_request("transport 'webrtc' needs \"sdp\" with an SDP offer")
    })?;
    parse_offer(sdp).map_err(|e| SignalError::bad_request(e.to_string()))
}
