//! Batched sends with `sendmmsg(2)`: many datagrams, one system call, each datagram gathered from up to
//! two slices (a per-destination header and a payload shared by every destination).
//!
//! Why libc and not rustix: rustix has `sendmmsg`, but its `MMsgHdr<'a>` carries the borrow of the slices
//! and addresses, so the message array cannot be kept between calls — every send would allocate it anew
//! (or need the same `unsafe` this module has); each message also wants its own `&mut
//! SendAncillaryBuffer`, and destinations must be 128-byte `SocketAddrAny`s instead of 32-byte
//! [`RawAddr`]s, four times the cache footprint of a fan-out. rustix has no `recvmmsg` at all (see
//! [`crate::recv`]). So both keep the raw calls, each behind one documented `unsafe` block.

use std::io;
use std::os::fd::RawFd;

use crate::RawAddr;

/// `sendmmsg` takes at most `UIO_MAXIOV` messages per call.
pub const MAX_BATCH: usize = 1024;

/// Reusable `sendmmsg` scratch space: the vectors keep their capacity, so a send allocates nothing.
#[derive(Default)]
pub struct Sender {
    iov: Vec<[libc::iovec; 2]>,
    msgs: Vec<libc::mmsghdr>,
}

/// How a batch went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Datagrams the kernel took.
    pub sent: usize,
    /// Datagrams not sent because the socket buffer was full (EAGAIN); the caller decides.
    pub would_block: usize,
    /// Datagrams refused for themselves (an unreachable destination, …) and skipped.
    pub failed: usize,
}

impl Sender {
    /// Sends datagram `i` = `head ++ tail` to `dest` for every `i < n`, where `item(i)` gives
    /// `(head, tail, dest)`; `tail` may be empty. Calls `sendmmsg` with up to [`MAX_BATCH`] datagrams at a
    /// time, without waiting (`MSG_DONTWAIT`). A datagram refused for itself is skipped and counted
    /// `failed`; at the first EAGAIN it stops and reports the rest as `would_block`, in order, so the
    /// caller can send `n - would_block..n` once the socket is writable.
    pub fn send_gather<'a>(
        &mut self,
        fd: RawFd,
        n: usize,
        item: impl Fn(usize) -> (&'a [u8], &'a [u8], &'a RawAddr),
    ) -> Sent {
        let mut result = Sent::default();
        let mut start = 0;
        while start < n {
            let end = (start + MAX_BATCH).min(n);
            self.iov.clear();
            self.msgs.clear();
            for i in start..end {
                let (head, tail, _) = item(i);
                self.iov.push([
                    libc::iovec {
                        iov_base: head.as_ptr() as *mut _,
                        iov_len: head.len(),
                    },
                    libc::iovec {
                        iov_base: tail.as_ptr() as *mut _,
                        iov_len: tail.len(),
                    },
                ]);
            }
            for (k, i) in (start..end).enumerate() {
                let (_, tail, dest) = item(i);
                // SAFETY: mmsghdr is plain data; zero is valid.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                (m.msg_hdr.msg_name, m.msg_hdr.msg_namelen) = dest.as_msg_name();
                m.msg_hdr.msg_iov = self.iov[k].as_mut_ptr();
                m.msg_hdr.msg_iovlen = if tail.is_empty() { 1 } else { 2 };
                self.msgs.push(m);
            }
            let mut done = 0;
            let mut failed = 0;
            while done < self.msgs.len() {
                let remaining = &mut self.msgs[done..];
                // SAFETY: every pointer in `msgs` points into `iov` or into slices and addresses the
                // caller lent for `'a`, all alive and unmoved for the duration of the call.
                let rc = unsafe {
                    libc::sendmmsg(
                        fd,
                        remaining.as_mut_ptr(),
                        remaining.len() as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if rc > 0 {
                    done += rc as usize;
                    continue;
                }
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        result.sent += done - failed;
                        result.failed += failed;
                        result.would_block += n - (start + done);
                        return result;
                    }
                    _ => {
                        // One bad destination (e.g. unreachable) must not stop the others: skip it.
                        failed += 1;
                        done += 1;
                    }
                }
            }
            result.sent += done - failed;
            result.failed += failed;
            start = end;
        }
        result
    }

    /// Sends `headers[i] ++ payload` to `dests[i]` for every `i`: one fan-out, the payload shared by
    /// scatter/gather rather than copied per destination.
    pub fn send_fanout<H: AsRef<[u8]>>(
        &mut self,
        fd: RawFd,
        headers: &[H],
        dests: &[RawAddr],
        payload: &[u8],
    ) -> Sent {
        let n = headers.len().min(dests.len());
        self.send_gather(fd, n, |i| (headers[i].as_ref(), payload, &dests[i]))
    }

    /// Sends the same datagram to every destination (relay copies, one per other node).
    pub fn send_same(&mut self, fd: RawFd, data: &[u8], dests: &[RawAddr]) -> Sent {
        self.send_gather(fd, dests.len(), |i| (data, &[][..], &dests[i]))
    }

    /// Sends whole datagrams, each to its own destination.
    pub fn send_each<D: AsRef<[u8]>>(&mut self, fd: RawFd, datagrams: &[(D, RawAddr)]) -> Sent {
        self.send_gather(fd, datagrams.len(), |i| {
            (datagrams[i].0.as_ref(), &[][..], &datagrams[i].1)
        })
    }
}

/// Sends one datagram to `dest` from source address `src` with an `IP_PKTINFO` control message: one
/// wildcard-bound socket speaking for many loopback addresses (the load harness's shared-socket mode).
/// IPv4 only.
pub fn send_from(
    fd: RawFd,
    data: &[u8],
    dest: &RawAddr,
    src: std::net::Ipv4Addr,
) -> io::Result<usize> {
    #[repr(C, align(8))]
    struct Control([u8; 64]);
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below (address, iovec, control buffer) outlives
    // the sendmsg call, and the control buffer has room for CMSG_SPACE(in_pktinfo) (asserted).
    let n = unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
        assert!(space <= control.0.len());
        let mut msg: libc::msghdr = std::mem::zeroed();
        (msg.msg_name, msg.msg_namelen) = dest.as_msg_name();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::IPPROTO_IP;
        (*cmsg).cmsg_type = libc::IP_PKTINFO;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(src).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::in_pktinfo, info);
        libc::sendmsg(fd, &msg, 0)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_fanout_shares_the_payload_and_keeps_each_header() {
        let sinks: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let dests: Vec<RawAddr> = sinks
            .iter()
            .map(|s| RawAddr::new(s.local_addr().unwrap()))
            .collect();
        let out = crate::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let headers = [[1u8, 1], [2, 2], [3, 3]];
        let sent = Sender::default().send_fanout(out.as_raw_fd(), &headers, &dests, b"pay");
        assert_eq!(
            sent,
            Sent {
                sent: 3,
                ..Sent::default()
            }
        );
        for (k, s) in sinks.iter().enumerate() {
            let mut buf = [0u8; 16];
            let n = s.recv(&mut buf).unwrap();
            let k = k as u8 + 1;
            assert_eq!(&buf[..n], &[k, k, b'p', b'a', b'y']);
        }
    }

    #[test]
    fn send_from_sets_the_source_address() {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let out = UdpSocket::bind("0.0.0.0:0").unwrap();
        let dest = RawAddr::new(sink.local_addr().unwrap());
        let src = std::net::Ipv4Addr::new(127, 0, 0, 7);
        assert_eq!(send_from(out.as_raw_fd(), b"hi", &dest, src).unwrap(), 2);
        let mut buf = [0u8; 8];
        let (n, from) = sink.recv_from(&mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from.ip()),
            (&b"hi"[..], std::net::IpAddr::V4(src))
        );
    }
}
