//! `recvmmsg` batches and the `sockaddr_in` conversions around them: the plain-RTP receivers, the WebRTC
//! engine and the raw forwarder all read datagrams the same way, a batch per syscall with the receive time
//! taken right after it, so the buffers, their pointers and the `IP_PKTINFO` reading live here once.
//!
//! The pointers inside the message headers are set again before every call: the arrays are never moved
//! after construction, but setting a few dozen pointers costs nothing next to the syscall and keeps the
//! struct free of self-references.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// Largest datagram read (the harness's packets are well under it).
pub const BUF: usize = 2048;

/// Control-message buffer big enough for one `in_pktinfo`, suitably aligned.
#[repr(C, align(8))]
pub struct CmsgBuf(pub [u8; 64]);

/// A batch of receive buffers for one `recvmmsg` call.
pub struct RecvBatch {
    bufs: Vec<[u8; BUF]>,
    names: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    /// Control buffers, only when the destination address is wanted (`IP_PKTINFO` on shared sockets).
    cbufs: Vec<CmsgBuf>,
}

impl RecvBatch {
    /// Room for `n` datagrams; `pktinfo`: also read each datagram's destination address.
    pub fn new(n: usize, pktinfo: bool) -> RecvBatch {
        RecvBatch {
            bufs: vec![[0u8; BUF]; n],
            // SAFETY: all-zero sockaddr_in / iovec / mmsghdr are valid values; pointers are set in `recv`.
            names: vec![unsafe { std::mem::zeroed() }; n],
            iovs: vec![unsafe { std::mem::zeroed() }; n],
            msgs: vec![unsafe { std::mem::zeroed() }; n],
            cbufs: if pktinfo {
                (0..n).map(|_| CmsgBuf([0; 64])).collect()
            } else {
                Vec::new()
            },
        }
    }

    /// One `recvmmsg` on `fd` with `flags`; the number of datagrams read (0 on nothing or an error).
    pub fn recv(&mut self, fd: i32, flags: libc::c_int) -> usize {
        let n = self.bufs.len();
        for i in 0..n {
            self.iovs[i].iov_base = self.bufs[i].as_mut_ptr() as *mut libc::c_void;
            self.iovs[i].iov_len = BUF;
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_name = &mut self.names[i] as *mut libc::sockaddr_in as *mut libc::c_void;
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            if let Some(c) = self.cbufs.get_mut(i) {
                h.msg_control = c.0.as_mut_ptr() as *mut libc::c_void;
                h.msg_controllen = c.0.len();
            }
            self.msgs[i].msg_len = 0;
        }
        // SAFETY: the message headers point into buffers owned by `self`, alive and unmoved for the call.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                n as u32,
                flags,
                std::ptr::null_mut(),
            )
        };
        got.max(0) as usize
    }

    /// Datagram `i` of the last `recv` and its source address.
    pub fn datagram(&self, i: usize) -> (&[u8], SocketAddr) {
        (self.data(i), sockaddr_to(&self.names[i]))
    }

    /// Datagram `i` of the last `recv`.
    pub fn data(&self, i: usize) -> &[u8] {
        let len = (self.msgs[i].msg_len as usize).min(BUF);
        &self.bufs[i][..len]
    }

    /// Datagram `i`'s source as the raw `sockaddr_in` (the raw forwarder keys its routes on it).
    pub fn source(&self, i: usize) -> &libc::sockaddr_in {
        &self.names[i]
    }

    /// Datagram `i`'s destination address (`IP_PKTINFO`), when the batch was made to read it.
    pub fn destination(&self, i: usize) -> Option<Ipv4Addr> {
        if self.cbufs.is_empty() {
            return None;
        }
        // SAFETY: filled in by the last recvmmsg; its control buffer lives in `self`.
        unsafe { pktinfo_dst(&self.msgs[i].msg_hdr) }
    }
}

pub fn sockaddr_to(sa: &libc::sockaddr_in) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

pub fn to_sockaddr(a: SocketAddr) -> libc::sockaddr_in {
    // SAFETY: all-zero sockaddr_in is valid.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    if let SocketAddr::V4(v4) = a {
        sa.sin_port = v4.port().to_be();
        sa.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
    }
    sa
}

/// The destination address in a received message's `IP_PKTINFO` control data.
///
/// # Safety
/// `msg` must be a message header filled in by `recvmsg`/`recvmmsg` whose control buffer is still alive.
pub unsafe fn pktinfo_dst(msg: &libc::msghdr) -> Option<Ipv4Addr> {
    let mut cmsg = libc::CMSG_FIRSTHDR(msg);
    while !cmsg.is_null() {
        if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
            let pi = libc::CMSG_DATA(cmsg) as *const libc::in_pktinfo;
            let a = std::ptr::read_unaligned(pi);
            return Some(Ipv4Addr::from(u32::from_be(a.ipi_addr.s_addr)));
        }
        cmsg = libc::CMSG_NXTHDR(msg, cmsg);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_reads_datagrams_and_their_sources() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..3u8 {
            tx.send_to(&[i; 10], rx.local_addr().unwrap()).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut b = RecvBatch::new(8, false);
        use std::os::fd::AsRawFd;
        let n = b.recv(rx.as_raw_fd(), libc::MSG_DONTWAIT);
        assert_eq!(n, 3);
        for i in 0..n {
            let (d, src) = b.datagram(i);
            assert_eq!(d, &[i as u8; 10]);
            assert_eq!(src, tx.local_addr().unwrap());
        }
        assert_eq!(b.destination(0), None);
        let a: SocketAddr = "127.0.0.7:4242".parse().unwrap();
        assert_eq!(sockaddr_to(&to_sockaddr(a)), a);
    }
}
