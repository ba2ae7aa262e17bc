//! The kernel ceiling: a minimal fan-out forwarder doing only what no SFU can avoid — receive the
//! speaker's datagram, look its source up, write a 12-byte header per listener and hand everything to
//! `sendmmsg` with the payload shared by scatter/gather. Pinned to the server's core and fed the same
//! load, its CPU per forwarded packet is the floor that talkgroup's is compared with.

use crate::mmsg::{to_sockaddr, RecvBatch};
use crate::stamp::RTP_HEADER_LEN;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const RECV_BATCH: usize = 32;
const SEND_BATCH: usize = 256;

/// Counters the coordinator reads around each phase.
#[derive(Debug, Default)]
pub struct RawCounters {
    pub received: AtomicU64,
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    /// Kernel thread id of the forwarder, for its `schedstat`.
    pub tid: AtomicI32,
}

pub struct RawForwarder {
    pub addr: SocketAddr,
    pub counters: Arc<RawCounters>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

struct Leg {
    dest: libc::sockaddr_in,
    ssrc: u32,
    seq: u16,
}

fn key(sa: &libc::sockaddr_in) -> u64 {
    ((u32::from_be(sa.sin_addr.s_addr) as u64) << 16) | u16::from_be(sa.sin_port) as u64
}

impl RawForwarder {
    /// Start the forwarder for `channels[c]` = the member addresses of channel `c`; pinned to `cpu`.
    pub fn start(channels: Vec<Vec<SocketAddr>>, cpu: Option<usize>) -> io::Result<RawForwarder> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        crate::sys::set_sock_buf(sock.as_raw_fd(), libc::SO_RCVBUF, 4 << 20);
        crate::sys::set_sock_buf(sock.as_raw_fd(), libc::SO_SNDBUF, 4 << 20);
        let addr = sock.local_addr()?;
        let counters = Arc::new(RawCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, s2) = (counters.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("raw-forwarder".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = crate::sys::pin_current_thread(&[cpu]);
                }
                c2.tid.store(crate::sys::gettid(), Ordering::Release);
                let _ = ready_tx.send(());
                forward_loop(sock, channels, &c2, &s2);
            })?;
        let _ = ready_rx.recv_timeout(Duration::from_secs(2));
        Ok(RawForwarder {
            addr,
            counters,
            stop,
            handle: Some(handle),
        })
    }

    /// The forwarder thread's kernel id (to pin it, and for its `schedstat`).
    pub fn tid(&self) -> i32 {
        self.counters.tid.load(Ordering::Acquire)
    }

    /// CPU time the forwarder thread has used, ns.
    pub fn cpu_ns(&self) -> Option<u64> {
        crate::procfs::thread_cpu_ns(std::process::id() as i32, self.tid())
    }
}

impl Drop for RawForwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn forward_loop(
    sock: UdpSocket,
    channels: Vec<Vec<SocketAddr>>,
    c: &RawCounters,
    stop: &AtomicBool,
) {
    let fd = sock.as_raw_fd();
    // Routing: source → (channel, index in channel); legs per channel.
    let mut route: HashMap<u64, (u32, u32)> = HashMap::new();
    let mut legs: Vec<Vec<Leg>> = Vec::with_capacity(channels.len());
    for (ci, members) in channels.iter().enumerate() {
        let mut v = Vec::with_capacity(members.len());
        for (mi, &a) in members.iter().enumerate() {
            let sa = to_sockaddr(a);
            route.insert(key(&sa), (ci as u32, mi as u32));
            v.push(Leg {
                dest: sa,
                ssrc: 0x7a00_0000 | (ci as u32) << 8 ^ mi as u32,
                seq: 0,
            });
        }
        legs.push(v);
    }

    let mut batch = RecvBatch::new(RECV_BATCH, false);
    // SAFETY (all zeroed below): valid initial values for these C structs; pointers set before use.
    let mut headers = vec![[0u8; RTP_HEADER_LEN]; SEND_BATCH];
    let mut dests: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; SEND_BATCH];
    let mut siov: Vec<[libc::iovec; 2]> = vec![unsafe { std::mem::zeroed() }; SEND_BATCH];
    let mut smsg: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; SEND_BATCH];

    while !stop.load(Ordering::Acquire) {
        // Blocks for the first datagram (up to the 20 ms read timeout), then takes what is queued.
        let n = batch.recv(fd, libc::MSG_WAITFORONE);
        if n == 0 {
            continue;
        }
        c.received.fetch_add(n as u64, Ordering::Relaxed);
        let mut queued = 0usize;
        for i in 0..n {
            let b = batch.data(i);
            let len = b.len();
            // RTP only: RTCP keep-alives and anything else are dropped, as a server drops them.
            if len < RTP_HEADER_LEN || b[0] >> 6 != 2 || (192..=223).contains(&b[1]) {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(&(ch, from)) = route.get(&key(batch.source(i))) else {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let marker_pt = b[1];
            let ts = [b[4], b[5], b[6], b[7]];
            let payload = &b[RTP_HEADER_LEN..];
            for (li, leg) in legs[ch as usize].iter_mut().enumerate() {
                if li as u32 == from {
                    continue;
                }
                if queued == SEND_BATCH {
                    send_all(fd, &mut smsg[..queued], c);
                    queued = 0;
                }
                let h = &mut headers[queued];
                h[0] = 0x80;
                h[1] = marker_pt;
                h[2..4].copy_from_slice(&leg.seq.to_be_bytes());
                h[4..8].copy_from_slice(&ts);
                h[8..12].copy_from_slice(&leg.ssrc.to_be_bytes());
                leg.seq = leg.seq.wrapping_add(1);
                dests[queued] = leg.dest;
                siov[queued][0] = libc::iovec {
                    iov_base: h.as_mut_ptr() as *mut libc::c_void,
                    iov_len: RTP_HEADER_LEN,
                };
                siov[queued][1] = libc::iovec {
                    iov_base: payload.as_ptr() as *mut libc::c_void,
                    iov_len: payload.len(),
                };
                let m = &mut smsg[queued];
                m.msg_hdr.msg_name = &mut dests[queued] as *mut _ as *mut libc::c_void;
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                m.msg_hdr.msg_iov = siov[queued].as_mut_ptr();
                m.msg_hdr.msg_iovlen = 2;
                queued += 1;
            }
        }
        send_all(fd, &mut smsg[..queued], c);
    }
}

/// `sendmmsg` until every message is out; a failing message is counted as dropped and skipped.
fn send_all(fd: i32, msgs: &mut [libc::mmsghdr], c: &RawCounters) {
    let mut off = 0;
    while off < msgs.len() {
        // SAFETY: msgs[off..] are fully initialised message headers whose buffers are alive.
        let n =
            unsafe { libc::sendmmsg(fd, msgs[off..].as_mut_ptr(), (msgs.len() - off) as u32, 0) };
        if n > 0 {
            c.forwarded.fetch_add(n as u64, Ordering::Relaxed);
            off += n as usize;
        } else {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            c.dropped.fetch_add(1, Ordering::Relaxed);
            off += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stamp::{parse_datagram, rtcp_keepalive, Datagram, RtpHeader, Stamp};

    #[test]
    fn fans_out_with_a_header_per_listener() {
        let socks: Vec<UdpSocket> = (0..4)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for s in &socks {
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
        }
        let addrs: Vec<SocketAddr> = socks.iter().map(|s| s.local_addr().unwrap()).collect();
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        let fwd = RawForwarder::start(vec![addrs.clone(), vec![other.local_addr().unwrap()]], None)
            .unwrap();
        let mut pkt = vec![0u8; 12 + 80];
        for i in 0..5u16 {
            RtpHeader {
                marker: i == 0,
                payload_type: 111,
                seq: 1000 + i,
                timestamp: 960 * i as u32,
                ssrc: 5,
            }
            .write(&mut pkt);
            Stamp {
                channel: 0,
                speaker: 0,
                spurt: 1,
                seq: i as u32,
                sched_ns: 77,
            }
            .write(&mut pkt[12..]);
            socks[0].send_to(&pkt, fwd.addr).unwrap();
        }
        socks[1].send_to(&rtcp_keepalive(1), fwd.addr).unwrap(); // dropped
        let mut buf = [0u8; 2048];
        for s in &socks[1..] {
            let mut seqs = Vec::new();
            for _ in 0..5 {
                let (n, from) = s.recv_from(&mut buf).expect("forwarded packet");
                assert_eq!(from, fwd.addr);
                match parse_datagram(&buf[..n]) {
                    Datagram::Rtp { header, payload } => {
                        assert_eq!(payload.len(), 80);
                        assert_eq!(Stamp::parse(payload).map(|s| s.sched_ns), Some(77));
                        seqs.push(header.seq);
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
        }
        // Never back to the speaker, never to another channel.
        socks[0]
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        assert!(socks[0].recv_from(&mut buf).is_err());
        other
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        assert!(other.recv_from(&mut buf).is_err());
        assert_eq!(fwd.counters.forwarded.load(Ordering::Relaxed), 15);
        assert_eq!(fwd.counters.dropped.load(Ordering::Relaxed), 1);
        assert!(fwd.cpu_ns().is_some());
    }
}
