//! The media socket: created with socket2 (no SO_REUSEPORT, big buffers) and batched sends with
//! `sendmmsg(2)`, which glommio does not offer.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::forward::{Batch, RawAddr};
use crate::rtp::HEADER_LEN;

/// Socket buffer size asked for; the kernel caps it at `net.core.{r,w}mem_max` unless we may force it.
const SOCKET_BUFFER: usize = 4 << 20;
/// `sendmmsg` takes at most `UIO_MAXIOV` messages per call.
const MAX_BATCH: usize = 1024;

/// Binds a UDP socket for a shard. glommio's own `bind` sets SO_REUSEPORT, which would let a second
/// instance on the same port silently take half the flows; this one fails loudly instead.
pub fn bind(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    for (force, normal) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // Forcing needs CAP_NET_ADMIN; fall back to the capped request.
        if set_int(&socket, force, SOCKET_BUFFER as libc::c_int).is_err() {
            let _ = set_int(&socket, normal, SOCKET_BUFFER as libc::c_int);
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn set_int(socket: &Socket, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid fd and a pointer to a c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &value as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reusable `sendmmsg` scratch space: the vectors keep their capacity, so a send allocates nothing.
#[derive(Default)]
pub struct Sender {
    iov: Vec<[libc::iovec; 2]>,
    msgs: Vec<libc::mmsghdr>,
}

/// How a batch went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub sent: usize,
    /// Datagrams not sent because the socket buffer was full (EAGAIN); the caller decides.
    pub would_block: usize,
    pub failed: usize,
}

impl Sender {
    /// Sends `batch.headers[i] + payload` to `batch.dests[i]` for every i, in `sendmmsg` calls of up to
    /// 1024 datagrams. Stops at the first EAGAIN and reports the rest as `would_block`.
    pub fn send_fanout(&mut self, fd: RawFd, batch: &Batch, payload: &[u8]) -> Sent {
        self.send_with(fd, batch.len(), |i| {
            (&batch.headers[i][..HEADER_LEN], payload, &batch.dests[i])
        })
    }

    /// Sends the same datagram to every destination (relay copies, one per other node).
    pub fn send_same(&mut self, fd: RawFd, data: &[u8], dests: &[RawAddr]) -> Sent {
        self.send_with(fd, dests.len(), |i| (data, &[][..], &dests[i]))
    }

    /// Sends whole datagrams (sender reports, what the WebRTC peers produced).
    pub fn send_each<D: AsRef<[u8]>>(&mut self, fd: RawFd, datagrams: &[(D, RawAddr)]) -> Sent {
        self.send_with(fd, datagrams.len(), |i| {
            (datagrams[i].0.as_ref(), &[][..], &datagrams[i].1)
        })
    }

    /// Sends the fan-outs of several received datagrams in one go: entry `i` of `batch` carries the
    /// payload `payloads[segment[i]]`.
    pub fn send_fanouts(
        &mut self,
        fd: RawFd,
        batch: &Batch,
        segment: &[u32],
        payloads: &[&[u8]],
    ) -> Sent {
        self.send_with(fd, batch.len(), |i| {
            (
                &batch.headers[i][..HEADER_LEN],
                payloads[segment[i] as usize],
                &batch.dests[i],
            )
        })
    }

    fn send_with<'a>(
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
                let (head, payload, _) = item(i);
                self.iov.push([
                    libc::iovec {
                        iov_base: head.as_ptr() as *mut _,
                        iov_len: head.len(),
                    },
                    libc::iovec {
                        iov_base: payload.as_ptr() as *mut _,
                        iov_len: payload.len(),
                    },
                ]);
            }
            for (k, i) in (start..end).enumerate() {
                let (_, payload, dest) = item(i);
                // SAFETY: mmsghdr is plain data; zero is valid.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = &dest.storage as *const _ as *mut libc::c_void;
                m.msg_hdr.msg_namelen = dest.len;
                m.msg_hdr.msg_iov = self.iov[k].as_mut_ptr();
                m.msg_hdr.msg_iovlen = if payload.is_empty() { 1 } else { 2 };
                self.msgs.push(m);
            }
            let mut done = 0;
            let mut failed = 0;
            while done < self.msgs.len() {
                let remaining = &mut self.msgs[done..];
                // SAFETY: every pointer in `msgs` points into `iov`, the batch or `datagrams`, all alive
                // and unmoved for the duration of the call.
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
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
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
}

/// Datagrams drained per `recvmmsg` once the socket is readable.
pub const RECV_BATCH: usize = 32;
/// Receive buffer per datagram: larger than [`crate::rtp::MAX_DATAGRAM`], so an oversized datagram shows.
pub const RECV_BUF: usize = 2048;

/// Reusable `recvmmsg` buffers: up to [`RECV_BATCH`] datagrams per system call.
pub struct Receiver {
    bufs: Vec<[u8; RECV_BUF]>,
    addrs: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl Default for Receiver {
    fn default() -> Self {
        // SAFETY: sockaddr_storage and mmsghdr are plain data; zero is valid.
        let zero_addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        Receiver {
            bufs: vec![[0u8; RECV_BUF]; RECV_BATCH],
            addrs: vec![zero_addr; RECV_BATCH],
            iov: Vec::with_capacity(RECV_BATCH),
            msgs: Vec::with_capacity(RECV_BATCH),
        }
    }
}

impl Receiver {
    /// Receives what is queued, without waiting: the number of datagrams now in the buffers (0 when
    /// none is queued or on an error).
    pub fn drain(&mut self, fd: RawFd) -> usize {
        self.iov.clear();
        self.msgs.clear();
        for i in 0..RECV_BATCH {
            self.iov.push(libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr() as *mut _,
                iov_len: RECV_BUF,
            });
        }
        for i in 0..RECV_BATCH {
            // SAFETY: mmsghdr is plain data; zero is valid.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = &mut self.addrs[i] as *mut _ as *mut libc::c_void;
            m.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut self.iov[i];
            m.msg_hdr.msg_iovlen = 1;
            self.msgs.push(m);
        }
        // SAFETY: every pointer in `msgs` points into `bufs`, `addrs` or `iov`, alive and unmoved during the
        // call.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                RECV_BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            0
        } else {
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
        (&self.bufs[i][..len], sockaddr_to_std(&self.addrs[i]))
    }
}

fn sockaddr_to_std(sa: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(sa.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(sa as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::from((
                u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(sa as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::from((
                a.sin6_addr.s6_addr,
                u16::from_be(a.sin6_port),
            )))
        }
        _ => None,
    }
}

/// io_uring needs locked memory for its rings; an RLIMIT_MEMLOCK that is too low makes glommio fail at
/// start-up with an unhelpful error. Returns a message saying how to fix it.
pub fn check_memlock() -> Option<String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return None;
    }
    (lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < 512 * 1024).then(|| {
        format!(
            "RLIMIT_MEMLOCK is {} KiB; io_uring needs at least 512 KiB: run `ulimit -l 8192` (or set \
             LimitMEMLOCK= in the systemd unit) before starting talkgroup",
            lim.rlim_cur / 1024
        )
    })
}
