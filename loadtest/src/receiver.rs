//! Receiver threads: every plain-RTP member's socket in one epoll set per thread, `recvmmsg` on each
//! ready socket, the receive time read right after the syscall, and each datagram handed to the thread's
//! [`Tally`] for accounting.

use crate::mmsg::RecvBatch;
use crate::sockets::Endpoints;
use crate::sys::{mono_ns, Epoll};
use crate::tally::{RecvReport, RecvShared, Tally};
use std::os::fd::AsRawFd;
use std::sync::mpsc::Sender;
use std::sync::Arc;

const BATCH: usize = 16;
/// Receive on the endpoint sockets `socks` (indices into `eps.socks`) until `stop`. Sockets of WebRTC
/// members are the WebRTC engine's, not ours.
pub fn run(
    thread: usize,
    socks: std::ops::Range<usize>,
    eps: Arc<Endpoints>,
    shared: Arc<RecvShared>,
    out: Sender<RecvReport>,
) {
    crate::sys::tight_timer_slack();
    let mut ep = match Epoll::new() {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("receiver {thread}: epoll_create1 failed: {e}");
            return;
        }
    };
    for k in socks {
        if !eps.shared && shared.members.get(k).is_some_and(|m| m.webrtc) {
            continue;
        }
        ep.add(eps.socks[k].as_raw_fd(), k as u64);
    }
    let mut batch = RecvBatch::new(BATCH, eps.shared);
    let mut tally = Tally::new(shared, out);

    loop {
        let ready = ep.wait(5);
        if tally.poll_phase() {
            break;
        }
        for r in 0..ready {
            let k = ep.token(r) as usize;
            let got = batch.recv(eps.socks[k].as_raw_fd(), libc::MSG_DONTWAIT);
            if got == 0 {
                continue;
            }
            let now = mono_ns();
            for i in 0..got {
                let (data, src) = batch.datagram(i);
                match eps.member_of(k, batch.destination(i)) {
                    Some(m) => tally.datagram(m, src, data, now),
                    None => tally.foreign(),
                }
            }
        }
        tally.tick();
    }
}
