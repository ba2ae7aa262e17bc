//! The shard's side of the node-to-node relay ([`crate::relay`]): the copy of a local speaker's packet
//! for the other nodes of its channel, and the packets other nodes relay here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

use crate::channel::ForwardDrop;
use crate::forward::Batch;
use crate::relay::{RelayError, RelayKey};
use crate::rtp::RtpView;
use crate::shard::stats::DropReason;

use super::{ShardCore, Verdict};

/// The relay settings of a shard: the cluster key, this node's id, and the relay addresses of the
/// registered nodes (the only senders accepted).
#[derive(Debug, Clone)]
pub struct RelayState {
    /// The cluster secret's HMAC key.
    pub key: RelayKey,
    /// This node's id, carried in every relay packet.
    pub node: String,
    /// Relay address → node id, for every registered node: the only senders accepted, and each may
    /// speak only for itself.
    pub peers: HashMap<SocketAddr, String>,
}

impl ShardCore {
    /// Adds the relay copy of a local speaker's packet `rtp` (of the channel in `slot`) to `batch`: once
    /// for every other node of the channel, sent by the loop from the relay socket. Nothing without
    /// relay or other nodes.
    pub(super) fn relay_copy(&mut self, slot: usize, rtp: &[u8], batch: &mut Batch) {
        let (Some(relay), Some(ch)) = (self.relay.as_ref(), self.channels[slot].as_ref()) else {
            return;
        };
        batch.relay.push(ch.relay_targets(), |out| {
            relay.key.append(
                out,
                &ch.name,
                ch.epoch(),
                ch.speaker_name(),
                &relay.node,
                rtp,
            )
        });
    }

    /// True when a packet of the channel in `slot` would be relayed (to skip building it otherwise).
    pub(super) fn relays(&self, slot: usize) -> bool {
        self.relay.is_some()
            && self.channels[slot]
                .as_ref()
                .is_some_and(|ch| !ch.relay_targets().is_empty())
    }

    /// Counts relay datagrams the socket layer sent.
    pub fn count_relayed(&mut self, n: usize) {
        self.stats.relay_sent += n as u64;
    }

    /// A datagram on the relay port: authenticated, from a registered node, for the current remote grant.
    /// On `Forward`, `batch` gained a header per local plain-RTP listener, as for local media.
    pub fn handle_relay_datagram(
        &mut self,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
        batch: &mut Batch,
    ) -> Verdict {
        self.stats.relay_in += 1;
        match self.relay_forward(src, data, now, batch) {
            Ok(range) => Verdict::Forward(range),
            Err(e) => {
                self.stats.relay_dropped[e as usize] += 1;
                Verdict::Dropped(DropReason::NotRtp)
            }
        }
    }

    fn relay_forward(
        &mut self,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
        batch: &mut Batch,
    ) -> Result<Range<usize>, RelayError> {
        let relay = self.relay.as_ref().ok_or(RelayError::UnknownNode)?;
        let pkt = relay.key.decode(data)?;
        match relay.peers.get(&src) {
            None => return Err(RelayError::UnknownNode),
            Some(node) if node != pkt.node => return Err(RelayError::NotGrantHolder),
            Some(_) => {}
        }
        let slot = *self
            .by_name
            .get(pkt.channel)
            .ok_or(RelayError::UnknownChannel)?;
        let ch = self.channels[slot]
            .as_mut()
            .ok_or(RelayError::UnknownChannel)?;
        let rtp = RtpView::parse(pkt.rtp).map_err(|_| RelayError::Malformed)?;
        match ch.forward_remote(pkt.epoch, pkt.node, &rtp, now, batch) {
            Ok(()) => {
                let start = rtp.payload.as_ptr() as usize - data.as_ptr() as usize;
                if !batch.peers.is_empty() {
                    // Local WebRTC listeners of a remote speaker.
                    self.write_peers(batch, rtp.payload, now);
                }
                Ok(start..start + rtp.payload.len())
            }
            Err(ForwardDrop::StaleEpoch | ForwardDrop::NotHolder) => Err(RelayError::StaleEpoch),
            Err(ForwardDrop::NotGrantHolder) => Err(RelayError::NotGrantHolder),
            Err(_) => Err(RelayError::Malformed),
        }
    }
}
