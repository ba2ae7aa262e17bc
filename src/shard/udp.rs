//! The shard's sockets: created by [`rtpio::bind`] (no `SO_REUSEPORT`, big buffers) and written with
//! [`rtpio::Sender`]'s batched `sendmmsg`, which glommio does not offer. What is talkgroup's own is here:
//! how a [`Batch`] maps onto the gathered datagrams, and the io_uring memory-lock check.

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

/// io_uring needs locked memory for its rings; an RLIMIT_MEMLOCK that is too low makes glommio fail at
/// start-up with an unhelpful error. Returns a message saying how to fix it.
pub fn check_memlock() -> Option<String> {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Memlock);
    let current = lim.current?; // `None` is unlimited
    (current < 512 * 1024).then(|| {
        format!(
            "RLIMIT_MEMLOCK is {} KiB; io_uring needs at least 512 KiB: run `ulimit -l 8192` (or set \
             LimitMEMLOCK= in the systemd unit) before starting talkgroup",
            current / 1024
        )
    })
}
