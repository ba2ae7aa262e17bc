//! Batched receives with `recvmmsg(2)`: once a socket is readable, everything queued on it comes in with
//! one system call. rustix has no `recvmmsg` (it is in its `not_implemented` list), hence libc.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::RawFd;

/// Datagrams drained per `recvmmsg` by default.
pub const RECV_BATCH: usize = 32;
/// Receive buffer per datagram: larger than [`crate::rtp::MAX_DATAGRAM`], so an oversized datagram shows.
pub const RECV_BUF: usize = 2048;

/// Room for one `IP_PKTINFO` control message, aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; 64]);

/// Reusable `recvmmsg` buffers: up to `batch` datagrams per system call, each with its source address
/// and (with [`Receiver::with_pktinfo`]) its destination address.
pub struct Receiver {
    bufs: Vec<[u8; RECV_BUF]>,
    addrs: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    /// One control buffer per datagram when destinations are asked for; empty otherwise.
    control: Vec<Control>,
}

impl Default for Receiver {
    fn default() -> Self {
        Receiver::new(RECV_BATCH)
    }
}

impl Receiver {
    /// Buffers for `batch` datagrams per call (at least one).
    pub fn new(batch: usize) -> Self {
        let batch = batch.max(1);
        // SAFETY: sockaddr_storage is plain data; zero is valid.
        let zero_addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        Receiver {
            bufs: vec![[0u8; RECV_BUF]; batch],
            addrs: vec![zero_addr; batch],
            iov: Vec::with_capacity(batch),
            msgs: Vec::with_capacity(batch),
            control: Vec::new(),
        }
    }

    /// Also reads each datagram's destination address from `IP_PKTINFO` (the socket needs
    /// [`crate::enable_pktinfo`]); see [`Receiver::destination`].
    pub fn with_pktinfo(mut self) -> Self {
        self.control = vec![Control([0; 64]); self.bufs.len()];
        self
    }

    /// How many datagrams one call takes at most.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Receives what is queued, without waiting: the number of datagrams now in the buffers (0 when
    /// none is queued or on an error).
    pub fn drain(&mut self, fd: RawFd) -> usize {
        self.receive(fd, libc::MSG_DONTWAIT)
    }

    /// Waits for one datagram (as long as the socket's `SO_RCVTIMEO` allows, on a blocking socket), then
    /// takes whatever else is queued (`MSG_WAITFORONE`): for a thread that serves one socket, like the
    /// load harness's raw forwarder. Returns 0 on timeout or error.
    pub fn wait_and_drain(&mut self, fd: RawFd) -> usize {
        self.receive(fd, libc::MSG_WAITFORONE)
    }

    fn receive(&mut self, fd: RawFd, flags: libc::c_int) -> usize {
        let batch = self.bufs.len();
        self.iov.clear();
        self.msgs.clear();
        for buf in &mut self.bufs {
            self.iov.push(libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut _,
                iov_len: RECV_BUF,
            });
        }
        for i in 0..batch {
            // SAFETY: mmsghdr is plain data; zero is valid.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = &mut self.addrs[i] as *mut _ as *mut libc::c_void;
            m.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut self.iov[i];
            m.msg_hdr.msg_iovlen = 1;
            if let Some(c) = self.control.get_mut(i) {
                m.msg_hdr.msg_control = c.0.as_mut_ptr() as *mut libc::c_void;
                m.msg_hdr.msg_controllen = c.0.len();
            }
            self.msgs.push(m);
        }
        // SAFETY: every pointer in `msgs` points into `bufs`, `addrs`, `iov` or `control`, alive and
        // unmoved during the call.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                batch as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            self.msgs.clear();
            0
        } else {
            self.msgs.truncate(rc as usize);
            rc as usize
        }
    }

    /// Datagram `i` of the last [`Receiver::drain`] and its source.
    pub fn datagram(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let m = &self.msgs[i];
        let len = (m.msg_len as usize).min(RECV_BUF);
        // A datagram longer than the buffer is truncated; report it as longer than any accepted one.
        let len = if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            RECV_BUF
        } else {
            len
        };
        (
            &self.bufs[i][..len],
            crate::addr::from_storage(&self.addrs[i]),
        )
    }

    /// The IPv4 address datagram `i` was sent to, from its `IP_PKTINFO` control message; `None` without
    /// [`Receiver::with_pktinfo`] or when the kernel gave none.
    pub fn destination(&self, i: usize) -> Option<Ipv4Addr> {
        let msg = &self.msgs.get(i)?.msg_hdr;
        if self.control.is_empty() {
            return None;
        }
        // SAFETY: `msg` was filled in by the last `recvmmsg`; its control buffer (`self.control[i]`) is
        // alive, and the CMSG macros stay within `msg_controllen` as the kernel set it.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                    let pi =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::in_pktinfo);
                    return Some(Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr)));
                }
                cmsg = libc::CMSG_NXTHDR(msg, cmsg);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn drains_what_is_queued_with_sources_and_destinations() {
        let rx = UdpSocket::bind("0.0.0.0:0").unwrap();
        crate::enable_pktinfo(&rx).unwrap();
        let port = rx.local_addr().unwrap().port();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for k in 1..=3u8 {
            tx.send_to(&[k; 5], (Ipv4Addr::new(127, 0, 0, k), port))
                .unwrap();
        }
        // Loopback delivers within `send_to`: all three are queued now.
        let mut r = Receiver::new(8).with_pktinfo();
        let got = r.drain(rx.as_raw_fd());
        assert_eq!(got, 3);
        for i in 0..got {
            let (data, src) = r.datagram(i);
            assert_eq!(src, Some(tx.local_addr().unwrap()));
            assert_eq!(r.destination(i), Some(Ipv4Addr::new(127, 0, 0, data[0])));
        }
        assert_eq!(
            Receiver::default().drain(rx.as_raw_fd()),
            0,
            "nothing else queued"
        );
    }
}
