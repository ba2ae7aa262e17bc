//! Peers of a shard that need more than an address: WebRTC members (str0m `Rtc`s).
//!
//! A plain-RTP member is only an address and an [`crate::forward::OutStream`]; a WebRTC member also has
//! ICE, DTLS and SRTP state. [`Peers`] keeps them in a slab and finds the one a datagram belongs to:
//! - by source address (a hash map), once the address is known;
//! - for STUN, by the server's ICE username fragment in `USERNAME` (`server:client`), whatever the source
//!   address — so the first check (which can beat the answer to the client) and a changed network path
//!   (mobile handover) find their peer, and the new address is learnt.
//!
//! str0m's own `Rtc::accepts` would need a linear scan over all peers for every datagram.
//!
//! Each peer keeps its next deadline ([`WebRtcPeer::deadline`]); the shard's timer heap, not this map,
//! decides when to drive it ([`Peers::deadline`] is what the heap checks its entries against).

#![warn(missing_docs)]

pub mod egress;
pub mod event;
pub mod gcm;
pub mod ingress;
pub mod keys;
pub mod offer;
pub mod rtc_config;
pub mod settled;
pub mod srtp;
pub mod webrtc;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use crate::ids::{MemberKey, PeerId};
use crate::rtp::Kind;

use self::webrtc::WebRtcPeer;

/// Source addresses remembered per peer; older ones are forgotten first (a peer that changes network
/// keeps working, a spoofer cannot grow the map without bound).
const ADDRS_PER_PEER: usize = 4;

/// One WebRTC member on the shard.
// `repr(C)` with the peer first: its hot fields ([`webrtc::HOT_LEN`]) open the slot, and a slot starts on
// a cache line, so they span three lines, not four. (rustc puts the `Option`'s niche in them too, today:
// the first word of the egress; were it elsewhere, `get_mut` would read one line more, nothing worse.)
#[repr(C, align(64))]
pub struct PeerSlot {
    /// The str0m side of the member.
    pub peer: WebRtcPeer,
    /// Slot of its channel in the shard.
    pub channel: usize,
    /// Its membership.
    pub key: MemberKey,
    addrs: Vec<SocketAddr>,
}

// What `Peers::prefetch_slot` relies on, checked when the crate builds: a slot starts on a cache line
// with its peer, whose hot fields fit in three lines.
const _: () = {
    assert!(std::mem::align_of::<PeerSlot>() == 64);
    assert!(std::mem::offset_of!(PeerSlot, peer) == 0);
    assert!(webrtc::HOT_LEN <= 3 * 64);
};

/// The shard's WebRTC peers and their lookup maps.
#[derive(Default)]
pub struct Peers {
    slots: Vec<Option<PeerSlot>>,
    free: Vec<PeerId>,
    by_addr: HashMap<SocketAddr, PeerId>,
    by_ufrag: HashMap<String, PeerId>,
    live: usize,
}

impl Peers {
    /// Peers in the map.
    pub fn len(&self) -> usize {
        self.live
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Peers still in ICE/DTLS set-up. A walk over the slab: called per join, never per packet.
    pub fn connecting(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .filter(|s| !s.peer.connected && !s.peer.closed)
            .count()
    }

    /// The oldest peer built no later than `before` that has not sent a valid connectivity check yet: the
    /// first to make room when the shard's handshake slots are full (an offer nobody uses must not keep
    /// real clients out).
    pub fn oldest_unverified(&self, before: Instant) -> Option<PeerId> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .filter(|(_, s)| !s.peer.verified && !s.peer.connected && !s.peer.closed)
            .filter(|(_, s)| s.peer.created <= before)
            .min_by_key(|(_, s)| s.peer.created)
            .map(|(i, _)| i)
    }

    /// True when a peer of the shard already answers to `ufrag` (they must be unique: STUN is routed by it).
    pub fn ufrag_taken(&self, ufrag: &str) -> bool {
        self.by_ufrag.contains_key(ufrag)
    }

    /// Registers a peer (its ufrag at once: the first STUN check may come before the answer is read).
    /// The caller queues its first deadline.
    pub fn insert(&mut self, peer: WebRtcPeer, channel: usize, key: MemberKey) -> PeerId {
        let ufrag = peer.ufrag.clone();
        let slot = PeerSlot {
            peer,
            channel,
            key,
            addrs: Vec::new(),
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id] = Some(slot);
                id
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.by_ufrag.insert(ufrag, id);
        self.live += 1;
        id
    }

    /// Takes a peer out of the map and forgets its ufrag and addresses.
    pub fn remove(&mut self, id: PeerId) -> Option<PeerSlot> {
        let slot = self.slots.get_mut(id)?.take()?;
        self.by_ufrag.remove(&slot.peer.ufrag);
        for a in &slot.addrs {
            if self.by_addr.get(a) == Some(&id) {
                self.by_addr.remove(a);
            }
        }
        self.free.push(id);
        self.live -= 1;
        Some(slot)
    }

    /// Starts loading the lines of slot `id` that a forwarded copy reads (a hint: nothing is read).
    #[inline]
    pub fn prefetch_slot(&self, id: PeerId) {
        if id < self.slots.len() {
            // Address arithmetic only, within the slab: `id` is in bounds.
            let slot = self.slots[id..].as_ptr().cast::<u8>();
            gcm::prefetch_lines(slot, webrtc::HOT_LEN);
        }
    }

    /// Starts loading the SRTP key of peer `id` (reads its slot: prefetch that first).
    #[inline]
    pub fn prefetch_key(&self, id: PeerId) {
        if let Some(Some(slot)) = self.slots.get(id) {
            slot.peer.prefetch_key();
        }
    }

    /// The peer `id`, if it is still there.
    pub fn get_mut(&mut self, id: PeerId) -> Option<&mut PeerSlot> {
        self.slots.get_mut(id).and_then(Option::as_mut)
    }

    /// The peer a datagram from `src` belongs to, if any. A STUN request found by ufrag teaches the map
    /// its source address.
    pub fn find(&mut self, src: SocketAddr, kind: Kind, data: &[u8]) -> Option<PeerId> {
        if let Some(&id) = self.by_addr.get(&src) {
            return Some(id);
        }
        if kind != Kind::Stun {
            return None;
        }
        let ufrag = stun_local_ufrag(data)?;
        let id = *self.by_ufrag.get(ufrag)?;
        let slot = self.slots.get_mut(id)?.as_mut()?;
        if slot.addrs.len() == ADDRS_PER_PEER {
            let old = slot.addrs.remove(0);
            if self.by_addr.get(&old) == Some(&id) {
                self.by_addr.remove(&old);
            }
        }
        slot.addrs.push(src);
        self.by_addr.insert(src, id);
        Some(id)
    }

    /// When peer `id` must next be driven: `None` once it is gone or closed (a timer entry for it is stale).
    pub fn deadline(&self, id: PeerId) -> Option<Instant> {
        self.slots
            .get(id)
            .and_then(Option::as_ref)
            .filter(|s| !s.peer.closed)
            .map(|s| s.peer.deadline)
    }

    /// Every open peer and its deadline (to rebuild the timer heap without its stale entries).
    pub fn deadlines(&self) -> impl Iterator<Item = (PeerId, Instant)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.as_ref()
                .filter(|s| !s.peer.closed)
                .map(|s| (i, s.peer.deadline))
        })
    }
}

/// The receiver's ufrag from a STUN binding request's `USERNAME` ("server:client", RFC 8445 §7.2.2).
/// Walks the attributes without allocating; `None` on anything malformed.
pub fn stun_local_ufrag(data: &[u8]) -> Option<&str> {
    const HEADER: usize = 20;
    const USERNAME: u16 = 0x0006;
    if data.len() < HEADER || data[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([data[2], data[3]]));
    let body = data.get(HEADER..HEADER + len)?;
    let mut at = 0;
    while at + 4 <= body.len() {
        let ty = u16::from_be_bytes([body[at], body[at + 1]]);
        let alen = usize::from(u16::from_be_bytes([body[at + 2], body[at + 3]]));
        let value = body.get(at + 4..at + 4 + alen)?;
        if ty == USERNAME {
            let name = std::str::from_utf8(value).ok()?;
            return name.split(':').next();
        }
        at += 4 + alen.div_ceil(4) * 4;
    }
    None
}

/// True when a STUN message carries `USE-CANDIDATE` (RFC 8445 §7.1.2: the controlling agent nominates
/// the path it came on). Walks the attributes like [`stun_local_ufrag`].
pub fn stun_use_candidate(data: &[u8]) -> bool {
    const HEADER: usize = 20;
    const USE_CANDIDATE: u16 = 0x0025;
    if data.len() < HEADER || data[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return false;
    }
    let len = usize::from(u16::from_be_bytes([data[2], data[3]]));
    let Some(body) = data.get(HEADER..HEADER + len) else {
        return false;
    };
    let mut at = 0;
    while at + 4 <= body.len() {
        let ty = u16::from_be_bytes([body[at], body[at + 1]]);
        let alen = usize::from(u16::from_be_bytes([body[at + 2], body[at + 3]]));
        if ty == USE_CANDIDATE {
            return true;
        }
        at += 4 + alen.div_ceil(4) * 4;
    }
    false
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod stun_tests {
    use super::*;

    #[test]
    fn username_of_a_binding_request() {
        let user = b"srvfrag1:cli";
        let mut p = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42];
        p.extend_from_slice(&[7; 12]);
        p.extend_from_slice(&[0x00, 0x06, 0, user.len() as u8]);
        p.extend_from_slice(user);
        let len = (p.len() - 20) as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(stun_local_ufrag(&p), Some("srvfrag1"));
        assert_eq!(stun_local_ufrag(&p[..30]), None, "truncated");
        assert_eq!(stun_local_ufrag(&[0u8; 20]), None, "no magic cookie");
    }
}
