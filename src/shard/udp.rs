//! The shard's sockets: created by [`rtpio::bind`] (no `SO_REUSEPORT`, big buffers) and written with
//! [`rtpio::Sender`]'s batched `sendmmsg`. What is talkgroup's own is here: how a [`Batch`] maps onto the
//! gathered datagrams.

#![warn(missing_docs)]

use std::os::fd::RawFd;

use crate::forward::{Batch, RelayCopies};
use crate::rtp::HEADER_LEN;

pub use rtpio::{bind, RawAddr, Receiver, Sender, Sent, RECV_BATCH, RECV_BUF};

/// Sends one fan-out: `batch.headers[i] ++ payload` to `batch.dests[i]` for every `i`, the payload shared
/// by scatter/gather. Stops at the first EAGAIN and reports the rest as `would_block`.
pub fn send_fanout(sender: &mut Sender, fd: RawFd, batch: &Batch, payload: &[u8]) -> Sent {
    sender.send_fanout(fd, &batch.headers, &batch.dests, payload)
}

/// Sends the fan-outs of several received datagrams in one go: entry `i` of `batch` carries the payload
/// `payloads[segment[i]]`.
pub fn send_fanouts(
    sender: &mut Sender,
    fd: RawFd,
    batch: &Batch,
    segment: &[u32],
    payloads: &[&[u8]],
) -> Sent {
    sender.send_gather(fd, batch.len(), |i| {
        (
            &batch.headers[i][..HEADER_LEN],
            payloads[segment[i] as usize],
            &batch.dests[i],
        )
    })
}

/// Sends every relay copy of a drain (each datagram once per other node of its channel).
pub fn send_relay(sender: &mut Sender, fd: RawFd, relay: &RelayCopies) -> Sent {
    sender.send_gather(fd, relay.len(), |i| {
        let (data, dest) = relay.get(i);
        (data, &[][..], dest)
    })
}

/// Sends the WebRTC listeners' sealed datagrams of a drain (whole datagrams, one destination each).
pub fn send_sealed(sender: &mut Sender, fd: RawFd, sealed: &RelayCopies) -> Sent {
    send_relay(sender, fd, sealed)
}
