//! [`RawAddr`]: a socket address in the form the kernel takes, converted once when a member joins (or a
//! datagram arrives) instead of once per `sendmmsg` entry.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// A `sockaddr_in` or `sockaddr_in6`: which one is told by the length next to it.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) union Sockaddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

/// A socket address that can be handed to `sendmmsg` without conversion. Large enough for IPv6, small
/// enough (32 bytes) that a fan-out batch of a thousand destinations stays in L1/L2.
#[derive(Clone, Copy)]
pub struct RawAddr {
    addr: Sockaddr,
    len: libc::socklen_t,
}

impl RawAddr {
    /// The kernel form of `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(a) => RawAddr {
                addr: Sockaddr {
                    v4: libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: a.port().to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from(*a.ip()).to_be(),
                        },
                        sin_zero: [0; 8],
                    },
                },
                len: std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            },
            SocketAddr::V6(a) => RawAddr {
                addr: Sockaddr {
                    v6: libc::sockaddr_in6 {
                        sin6_family: libc::AF_INET6 as libc::sa_family_t,
                        sin6_port: a.port().to_be(),
                        sin6_flowinfo: a.flowinfo(),
                        sin6_addr: libc::in6_addr {
                            s6_addr: a.ip().octets(),
                        },
                        sin6_scope_id: a.scope_id(),
                    },
                },
                len: std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            },
        }
    }

    /// The address as std knows it (for the slow path: a send that waits for room in the socket buffer).
    pub fn to_socket_addr(&self) -> SocketAddr {
        if self.len as usize == std::mem::size_of::<libc::sockaddr_in>() {
            // SAFETY: `new` writes the `v4` field exactly when it sets this length.
            let a = unsafe { self.addr.v4 };
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ))
        } else {
            // SAFETY: any other length is the one `new` sets with the `v6` field.
            let a = unsafe { self.addr.v6 };
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            ))
        }
    }

    /// Pointer and length for `msghdr::msg_name`.
    pub(crate) fn as_msg_name(&self) -> (*mut libc::c_void, libc::socklen_t) {
        (&self.addr as *const Sockaddr as *mut libc::c_void, self.len)
    }
}

impl From<SocketAddr> for RawAddr {
    fn from(addr: SocketAddr) -> Self {
        RawAddr::new(addr)
    }
}

impl PartialEq for RawAddr {
    fn eq(&self, other: &Self) -> bool {
        self.to_socket_addr() == other.to_socket_addr()
    }
}

impl Eq for RawAddr {}

impl std::fmt::Debug for RawAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawAddr({})", self.to_socket_addr())
    }
}

/// The source address `recvmmsg` wrote into a `sockaddr_storage`; `None` for a family other than IPv4/6.
pub(crate) fn from_storage(sa: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(sa.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in (smaller than the storage, and the
            // storage is aligned for every sockaddr type).
            let a = unsafe { &*(sa as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6; same size and alignment argument.
            let a = unsafe { &*(sa as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for a in ["127.0.0.1:4000", "[::1]:5000", "10.1.2.3:65535"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(RawAddr::new(a).to_socket_addr(), a);
        }
        assert_eq!(std::mem::size_of::<RawAddr>(), 32);
    }
}
