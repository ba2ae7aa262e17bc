//! Member endpoints. A plain-RTP member is known to the server by its source address, so every member
//! needs its own (IP, port) — but not necessarily its own socket:
//!
//! - **dedicated**: one socket per member on 127.0.0.1, 127.0.0.2, … (used while descriptors last);
//! - **shared**: `K` sockets bound to `0.0.0.0:port_k`; member `m` is `(127.0.x.y for m / K, port of
//!   socket m % K)`. Loopback delivers anything for 127.0.0.0/8 to a wildcard-bound socket, `IP_PKTINFO`
//!   tells which member a datagram was for, and the same option on `sendmsg` sets the member's source
//!   address. This is how 50,000 members fit under an RLIMIT_NOFILE that cannot be raised past 20,000
//!   (no CAP_SYS_RESOURCE in containers), with every datagram still on loopback.

use crate::mmsg::{to_sockaddr, CmsgBuf};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

/// The members' sockets and addresses.
pub struct Endpoints {
    pub socks: Vec<UdpSocket>,
    /// `addrs[m]`: member `m`'s address as the server sees it.
    pub addrs: Vec<SocketAddr>,
    pub shared: bool,
}

/// The `i`-th loopback address 127.0.0.(1+i) / 127.0.(i/254).x for large `i`.
pub fn loopback_ip(i: u32) -> Ipv4Addr {
    let host = i % 254 + 1;
    let mid = i / 254;
    Ipv4Addr::new(127, 0, (mid % 256) as u8, host as u8)
}

/// Inverse of [`loopback_ip`].
pub fn loopback_index(ip: Ipv4Addr) -> Option<u32> {
    let o = ip.octets();
    if o[0] != 127 || o[1] != 0 || o[3] == 0 || o[3] == 255 {
        return None;
    }
    Some(o[2] as u32 * 254 + o[3] as u32 - 1)
}

impl Endpoints {
    /// `n` members: dedicated sockets when `n <= fd_budget`, else `min(fd_budget, 4096)` shared ones
    /// (`force_shared` > 0 forces that many).
    pub fn bind(
        n: usize,
        per_ip: usize,
        fd_budget: usize,
        force_shared: usize,
    ) -> io::Result<Endpoints> {
        if force_shared == 0 && n <= fd_budget {
            return bind_dedicated(n, per_ip);
        }
        let k = if force_shared > 0 {
            force_shared
        } else {
            fd_budget.min(4096)
        };
        bind_shared(n, k.clamp(1, n.max(1)))
    }

    /// Socket index carrying member `m`.
    pub fn sock_of(&self, m: usize) -> usize {
        if self.shared {
            m % self.socks.len()
        } else {
            m
        }
    }

    /// Member that socket `k` received a datagram for (`dst`: its destination address, shared mode).
    pub fn member_of(&self, k: usize, dst: Option<Ipv4Addr>) -> Option<usize> {
        if !self.shared {
            return Some(k);
        }
        let j = loopback_index(dst?)? as usize;
        let m = j * self.socks.len() + k;
        (m < self.addrs.len()).then_some(m)
    }

    /// Send `buf` to `dest` from member `m`'s address.
    pub fn send_from(&self, m: usize, buf: &[u8], dest: SocketAddr) -> io::Result<usize> {
        let sock = &self.socks[self.sock_of(m)];
        if !self.shared {
            return sock.send_to(buf, dest);
        }
        let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (self.addrs[m], dest) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "IPv4 only"));
        };
        send_pktinfo(sock.as_raw_fd(), buf, dst, *src.ip())
    }

    pub fn loopback_addresses(&self) -> usize {
        let mut ips: Vec<_> = self.addrs.iter().map(|a| a.ip()).collect();
        ips.sort();
        ips.dedup();
        ips.len()
    }
}

fn bind_dedicated(n: usize, per_ip: usize) -> io::Result<Endpoints> {
    let mut socks = Vec::with_capacity(n);
    let mut addrs = Vec::with_capacity(n);
    let mut ip_idx = 0u32;
    let mut on_ip = 0usize;
    let mut failures_here = 0;
    while socks.len() < n {
        if on_ip >= per_ip.max(1) {
            ip_idx += 1;
            on_ip = 0;
        }
        match UdpSocket::bind(SocketAddrV4::new(loopback_ip(ip_idx), 0)) {
            Ok(sock) => {
                sock.set_nonblocking(true)?;
                addrs.push(sock.local_addr()?);
                socks.push(sock);
                on_ip += 1;
                failures_here = 0;
            }
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                // Ephemeral ports of this address exhausted: next address.
                failures_here += 1;
                if failures_here > 2 {
                    return Err(e);
                }
                ip_idx += 1;
                on_ip = 0;
            }
            Err(e)
                if e.raw_os_error() == Some(libc::EMFILE)
                    || e.raw_os_error() == Some(libc::ENFILE) =>
            {
                return Err(io::Error::new(
                    e.kind(),
                    format!("out of file descriptors after {} sockets: {e}", socks.len()),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Endpoints {
        socks,
        addrs,
        shared: false,
    })
}

fn bind_shared(n: usize, k: usize) -> io::Result<Endpoints> {
    let mut socks = Vec::with_capacity(k);
    for _ in 0..k {
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        sock.set_nonblocking(true)?;
        let one: libc::c_int = 1;
        // SAFETY: valid socket and option value.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        crate::sys::set_sock_buf(sock.as_raw_fd(), libc::SO_RCVBUF, 1 << 20);
        socks.push(sock);
    }
    let ports: Vec<u16> = socks
        .iter()
        .map(|s| s.local_addr().map(|a| a.port()))
        .collect::<io::Result<_>>()?;
    let addrs = (0..n)
        .map(|m| SocketAddr::V4(SocketAddrV4::new(loopback_ip((m / k) as u32), ports[m % k])))
        .collect();
    Ok(Endpoints {
        socks,
        addrs,
        shared: true,
    })
}

/// `sendmsg` with an `IP_PKTINFO` source address.
fn send_pktinfo(fd: i32, buf: &[u8], dst: SocketAddrV4, src: Ipv4Addr) -> io::Result<usize> {
    let mut sa = to_sockaddr(SocketAddr::V4(dst));
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call, and the control
    // buffer has room for CMSG_SPACE(in_pktinfo) (checked by the debug assertion).
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
        debug_assert!(space <= cbuf.0.len());
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = &mut sa as *mut _ as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::IPPROTO_IP;
        (*cmsg).cmsg_type = libc::IP_PKTINFO;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
        let pi = libc::CMSG_DATA(cmsg) as *mut libc::in_pktinfo;
        (*pi).ipi_ifindex = 0;
        (*pi).ipi_spec_dst.s_addr = u32::from(src).to_be();
        (*pi).ipi_addr.s_addr = 0;
        let n = libc::sendmsg(fd, &msg, 0);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn loopback_addresses_stay_in_127() {
        assert_eq!(loopback_ip(0), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(loopback_ip(253), Ipv4Addr::new(127, 0, 0, 254));
        assert_eq!(loopback_ip(254), Ipv4Addr::new(127, 0, 1, 1));
        assert!((0..2000).all(|i| loopback_ip(i).is_loopback()));
        assert!((0..2000).all(|i| loopback_index(loopback_ip(i)) == Some(i)));
        assert_eq!(loopback_index(Ipv4Addr::new(10, 0, 0, 1)), None);
    }

    #[test]
    fn dedicated_over_several_addresses() {
        let e = Endpoints::bind(5, 2, 100, 0).expect("bind");
        assert!(!e.shared);
        assert_eq!(e.socks.len(), 5);
        assert_eq!(e.addrs[0].ip(), e.addrs[1].ip());
        assert_ne!(e.addrs[1].ip(), e.addrs[2].ip());
        assert!(e.addrs.iter().all(|a| a.ip().is_loopback()));
        assert_eq!(e.member_of(3, None), Some(3));
    }

    /// Shared sockets: each member sends from, and receives at, its own address.
    #[test]
    fn shared_members_have_their_own_addresses() {
        let e = Endpoints::bind(6, 100, 2, 0).expect("bind");
        assert!(e.shared);
        assert_eq!(e.socks.len(), 2);
        assert_eq!(e.loopback_addresses(), 3);
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        for m in 0..6 {
            e.send_from(m, &[m as u8; 20], peer.local_addr().unwrap())
                .unwrap();
            let mut b = [0u8; 64];
            let (n, from) = peer.recv_from(&mut b).unwrap();
            assert_eq!((n, from), (20, e.addrs[m]), "member {m}");
            // And back: the wildcard socket gets it, IP_PKTINFO names the member.
            peer.send_to(&[1, 2, 3], e.addrs[m]).unwrap();
            let k = e.sock_of(m);
            let fd = e.socks[k].as_raw_fd();
            let mut batch = crate::mmsg::RecvBatch::new(1, true);
            let mut got = 0;
            for _ in 0..100 {
                got = batch.recv(fd, libc::MSG_DONTWAIT);
                if got > 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!((got, batch.datagram(0).0.len()), (1, 3));
            let dst = batch.destination(0);
            assert_eq!(e.member_of(k, dst), Some(m));
        }
    }
}
