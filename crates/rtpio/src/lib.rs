//! What talkgroup's server, its tests, its benchmarks and its load harness all need from the wire, in
//! one place instead of one copy each:
//!
//! - [`rtp`]: the RTP/RTCP header codec (RFC 3550, RFC 7983 classification), zero-copy.
//! - [`RawAddr`], [`bind`], [`Sender`], [`Receiver`]: UDP sockets the way a media server wants them, and
//!   batched I/O — `sendmmsg` with a header and a shared payload gathered per datagram, `recvmmsg` with
//!   source (and optionally destination) addresses. Buffers are reused: steady-state I/O allocates
//!   nothing.
//! - `testing::RedisServer` (feature `testing`): a throwaway `redis-server` for tests and load runs, and
//!   `testing::proxy::FaultProxy`, a TCP proxy that injects latency, blackholes and pub/sub cuts.
//!
//! Linux only (`sendmmsg`, `recvmmsg`, `IP_PKTINFO`).

#![deny(missing_docs)]

pub mod addr;
pub mod recv;
pub mod rtp;
pub mod send;
pub mod socket;
#[cfg(feature = "testing")]
pub mod testing;

pub use addr::RawAddr;
pub use recv::{Receiver, RECV_BATCH, RECV_BUF};
pub use send::{send_from, Sender, Sent, MAX_BATCH};
pub use socket::{bind, enable_pktinfo, set_buffers, SOCKET_BUFFER};
