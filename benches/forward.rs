//! Per-packet forwarding cost: the shard's whole user-space path (classify, find the member, floor check,
//! header rewrite per listener, batch) for 1–1000 listeners, and the same fan-out sent with `sendmmsg` to
//! real loopback sockets next to a raw `sendmmsg` loop that only copies a prebuilt header per listener —
//! the kernel ceiling the design compares against.
//!
//! Run: `cargo bench --bench forward`.

use std::hint::black_box;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rtpio::Sender;
use talkgroup::channel::SpeakerChange;
use talkgroup::forward::Batch;
use talkgroup::rtp;
use talkgroup::shard::udp;
use talkgroup::shard::{Command, ShardConfig, ShardCore, Verdict};

/// A shard with one channel of `listeners` latched listeners plus the speaker (member 0).
fn shard(listeners: usize, addrs: &[SocketAddr]) -> ShardCore {
    let now = Instant::now();
    let mut s = ShardCore::new(0, ShardConfig::default(), now);
    for (k, &addr) in addrs.iter().enumerate().take(listeners + 1) {
        s.handle_command(
            Command::AddMember {
                channel: "bench".into(),
                key: k as u64,
                name: format!("m{k}"),
                addr,
                ssrc: k as u32 + 1,
            },
            now,
        );
        s.handle_datagram(addr, &rtp::receiver_report(1), now, &mut Batch::default());
    }
    s.handle_command(
        Command::Speaker {
            channel: "bench".into(),
            change: SpeakerChange::Granted {
                speaker: Some(0),
                epoch: 1,
                until: None,
            },
        },
        now,
    );
    s
}

fn fake_addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| {
            SocketAddr::from((
                [127, 0, (i / 250) as u8, (i % 250) as u8 + 1],
                20_000 + i as u16,
            ))
        })
        .collect()
}

fn prepare(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout_prepare");
    for n in [1usize, 10, 100, 1000] {
        let addrs = fake_addrs(n + 1);
        let mut s = shard(n, &addrs);
        let payload = [0x55u8; 80];
        let mut batch = Batch::default();
        let mut seq = 0u16;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                seq = seq.wrapping_add(1);
                let p = rtp::build_packet(false, 111, seq, u32::from(seq) * 960, 7, &payload);
                batch.clear();
                let v = s.handle_datagram(addrs[0], &p, Instant::now(), &mut batch);
                debug_assert!(matches!(v, Verdict::Forward(_)));
                black_box(batch.len())
            })
        });
    }
    g.finish();
}

/// Real sends to `n` loopback sockets (nobody reads them: the kernel drops at the receiver, the sender's
/// cost is what is measured). Talkgroup's path versus a raw loop that only copies a prebuilt header.
fn send(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout_send");
    g.measurement_time(Duration::from_secs(4));
    for n in [10usize, 100] {
        let sinks: Vec<UdpSocket> = (0..n)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let speaker = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut addrs = vec![speaker.local_addr().unwrap()];
        addrs.extend(sinks.iter().map(|s| s.local_addr().unwrap()));
        let out = rtpio::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let fd = out.as_raw_fd();
        let mut s = shard(n, &addrs);
        let payload = [0x55u8; 80];
        let mut batch = Batch::default();
        let mut sender = Sender::default();
        let mut seq = 0u16;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("talkgroup", n), &n, |b, _| {
            b.iter(|| {
                seq = seq.wrapping_add(1);
                let p = rtp::build_packet(false, 111, seq, u32::from(seq) * 960, 7, &payload);
                batch.clear();
                if let Verdict::Forward(r) =
                    s.handle_datagram(addrs[0], &p, Instant::now(), &mut batch)
                {
                    black_box(udp::send_fanout(&mut sender, fd, &batch, &p[r]));
                }
            })
        });
        // The raw forwarder: same sockets, same sizes, a header copied per listener, one `sendmmsg`
        // made straight through libc on buffers set up once — nothing of talkgroup's (its batch, its
        // sender) on this side.
        let mut raw = RawFanout::new(&addrs[1..], payload.len());
        g.bench_with_input(BenchmarkId::new("raw_sendmmsg", n), &n, |b, _| {
            b.iter(|| {
                seq = seq.wrapping_add(1);
                let p = rtp::build_packet(false, 111, seq, u32::from(seq) * 960, 7, &payload);
                black_box(raw.send(fd, &p))
            })
        });
    }
    g.finish();
}

/// An IPv4 socket address as the kernel takes it.
fn sockaddr_in(a: std::net::SocketAddr) -> libc::sockaddr_in {
    let std::net::SocketAddr::V4(v4) = a else {
        panic!("the bench binds IPv4 loopback")
    };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// The least a forwarder can do: `sendmmsg` of a copied header plus one shared payload to each
/// destination, on message headers built once (they point into the boxed buffers, which never move).
struct RawFanout {
    headers: Box<[[u8; rtp::HEADER_LEN]]>,
    payload: Box<[u8]>,
    dests: Box<[libc::sockaddr_in]>,
    iov: Box<[[libc::iovec; 2]]>,
    msgs: Box<[libc::mmsghdr]>,
}

impl RawFanout {
    fn new(dests: &[std::net::SocketAddr], payload_len: usize) -> RawFanout {
        let mut f = RawFanout {
            headers: vec![[0u8; rtp::HEADER_LEN]; dests.len()].into(),
            payload: vec![0u8; payload_len].into(),
            dests: dests.iter().map(|a| sockaddr_in(*a)).collect(),
            iov: Vec::new().into(),
            msgs: Vec::new().into(),
        };
        let payload = f.payload.as_mut_ptr() as *mut libc::c_void;
        f.iov = f
            .headers
            .iter_mut()
            .map(|h| {
                [
                    libc::iovec {
                        iov_base: h.as_mut_ptr() as *mut libc::c_void,
                        iov_len: rtp::HEADER_LEN,
                    },
                    libc::iovec {
                        iov_base: payload,
                        iov_len: payload_len,
                    },
                ]
            })
            .collect();
        let mut msgs = Vec::with_capacity(dests.len());
        for (v, d) in f.iov.iter_mut().zip(f.dests.iter()) {
            // SAFETY: mmsghdr is plain data; all zeroes is a valid empty one.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = d as *const libc::sockaddr_in as *mut libc::c_void;
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = v.as_mut_ptr();
            m.msg_hdr.msg_iovlen = 2;
            msgs.push(m);
        }
        f.msgs = msgs.into();
        f
    }

    /// Sends `packet` (header copied per destination, payload once) with one `sendmmsg`.
    fn send(&mut self, fd: i32, packet: &[u8]) -> i32 {
        for h in self.headers.iter_mut() {
            h.copy_from_slice(&packet[..rtp::HEADER_LEN]);
        }
        self.payload.copy_from_slice(&packet[rtp::HEADER_LEN..]);
        // SAFETY: every message points into this struct's boxed buffers, alive and unmoved.
        unsafe { libc::sendmmsg(fd, self.msgs.as_mut_ptr(), self.msgs.len() as u32, 0) }
    }
}

criterion_group!(benches, prepare, send);
criterion_main!(benches);
