//! Creating a UDP socket the way a media server wants it: no `SO_REUSEPORT`, large kernel buffers,
//! non-blocking.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size asked for; the kernel caps it at `net.core.{r,w}mem_max` unless we may force it.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Binds a non-blocking UDP socket with [`SOCKET_BUFFER`]-sized buffers. Unlike glommio's and tokio's own
/// `bind`, it does not set `SO_REUSEPORT`, which would let a second instance on the same port silently
/// take half the flows: this one fails loudly instead.
pub fn bind(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    set_buffers(&socket, SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Asks for `bytes` of receive and send buffer: forced past `net.core.{r,w}mem_max` when the process has
/// CAP_NET_ADMIN, else the capped request. Best effort: a smaller buffer only means earlier drops. Any
/// socket type (socket2, std, tokio) will do.
pub fn set_buffers(socket: &impl AsFd, bytes: usize) {
    use rustix::net::sockopt;
    if sockopt::set_socket_recv_buffer_size_force(socket, bytes).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(socket, bytes);
    }
    if sockopt::set_socket_send_buffer_size_force(socket, bytes).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(socket, bytes);
    }
}

/// Turns on `IP_PKTINFO` on an IPv4 socket, so that [`crate::Receiver::with_pktinfo`] learns each
/// datagram's destination address (one wildcard-bound socket serving many loopback addresses, as the load
/// harness does). Neither rustix nor socket2 has this option, hence libc.
pub fn enable_pktinfo(fd: &impl AsRawFd) -> io::Result<()> {
    let fd: RawFd = fd.as_raw_fd();
    let one: libc::c_int = 1;
    // SAFETY: a pointer to a c_int of the size passed, valid for the call; a bad fd is an error, not UB.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
