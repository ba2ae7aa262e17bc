//! The sender thread: every active speaker's 20 ms packets, and every member's latching keep-alive, from
//! one thread with a deadline heap.
//!
//! Each packet is stamped with the time it was *scheduled* for; if this thread falls behind, the lag
//! lands in the measured latency (no coordinated omission) and separately in `lag`, so a slow harness is
//! visible as such. Speakers start at random phases, so load is smooth rather than a 20 ms pulse.

use crate::model::{Member, Target};
use crate::scenario::PayloadModel;
use crate::sockets::Endpoints;
use crate::stamp::{rtcp_keepalive, RtpHeader, Stamp, RTP_HEADER_LEN};
use crate::stats::LatencyHist;
use crate::sys::mono_ns;
use crate::webrtc::EngineCmd;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

/// How close to a deadline the sender stops sleeping and spins.
pub const SPIN_NS: u64 = 200_000;

/// Wait until `due` (mono ns): sleep most of the way, spin the rest.
pub fn wait_until(due: u64) {
    let now = mono_ns();
    if due > now + SPIN_NS {
        std::thread::sleep(Duration::from_nanos(due - now - SPIN_NS));
    }
    while mono_ns() < due {
        std::thread::yield_now();
    }
}

/// Commands from the controllers and the coordinator.
#[derive(Debug)]
pub enum SendCmd {
    /// `member` (slot `slot` of `channel`) holds the floor: send spurt `spurt` until `Stop`.
    Start {
        channel: u32,
        member: u32,
        spurt: u32,
        listeners: u32,
    },
    Stop {
        channel: u32,
    },
    /// Switch where media and keep-alives go.
    Target(Target),
    /// Send a keep-alive from every member now (latch them at a new target).
    Relatch,
    /// Hand over the lag histogram and start a new one.
    TakeLag(Sender<LatencyHist>),
    Shutdown,
}

/// Counters read by the coordinator at phase boundaries and for progress.
#[derive(Debug, Default)]
pub struct SenderCounters {
    pub media: AtomicU64,
    /// Σ listeners of each media packet sent: what should arrive if nothing is lost.
    pub expected: AtomicU64,
    pub keepalives: AtomicU64,
    pub errors: AtomicU64,
    pub bytes: AtomicU64,
    /// CPU time spent spinning (yielding) just before deadlines, ns.
    pub spin_ns: AtomicU64,
}

struct Active {
    member: u32,
    spurt: u32,
    pkt: u32,
    listeners: u32,
    gen: u32,
}

/// Per-member RTP state: a speaker's own stream continues across its spurts, as a real client's would.
/// `seq` is extended (str0m wants the 64-bit counter; the wire carries its low 16 bits).
struct Uplink {
    seq: u64,
    ts: u32,
    ssrc: u32,
}

pub struct SenderConfig {
    pub rate: u32,
    pub payload: PayloadModel,
    pub keepalive: Duration,
    pub seed: u64,
    /// Spin (yielding) this close to a deadline instead of sleeping through it.
    pub spin_ns: u64,
}

/// One packet that is due, already written (RTP header + stamp + padding) into the caller's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Due {
    pub member: usize,
    pub len: usize,
    /// Listeners that should receive it.
    pub listeners: u32,
    /// When it was scheduled (the stamp), mono ns.
    pub due: u64,
    pub header: RtpHeader,
    /// `header.seq` extended to 64 bits.
    pub ext_seq: u64,
}

/// The talk schedule: which member of each channel is sending, and a deadline heap of their next
/// packets. Shared by the plain-RTP sender and the WebRTC engine, so both send the same streams.
pub struct Schedule {
    interval: u64,
    ts_step: u32,
    payload: PayloadModel,
    rng: SmallRng,
    uplinks: Vec<Uplink>,
    active: Vec<Option<Active>>,
    gen: u32,
    heap: BinaryHeap<Reverse<(u64, u32, u32)>>,
}

impl Schedule {
    pub fn new(cfg: &SenderConfig, members: &[Member], salt: u64) -> Schedule {
        let mut rng = SmallRng::seed_from_u64(cfg.seed ^ 0x5e4d ^ salt);
        let uplinks = (0..members.len())
            .map(|_| Uplink {
                seq: u64::from(rng.random::<u16>()),
                ts: rng.random(),
                ssrc: rng.random(),
            })
            .collect();
        let n_channels = members.last().map(|m| m.channel as usize + 1).unwrap_or(0);
        Schedule {
            interval: 1_000_000_000 / cfg.rate.max(1) as u64,
            ts_step: 48_000 / cfg.rate.max(1),
            payload: cfg.payload.clone(),
            rng,
            uplinks,
            active: (0..n_channels).map(|_| None).collect(),
            gen: 0,
            heap: BinaryHeap::new(),
        }
    }

    /// `member` starts spurt `spurt` on `channel` now.
    pub fn start(&mut self, channel: u32, member: u32, spurt: u32, listeners: u32) {
        if let Some(slot) = self.active.get_mut(channel as usize) {
            self.gen = self.gen.wrapping_add(1);
            *slot = Some(Active {
                member,
                spurt,
                pkt: 0,
                listeners,
                gen: self.gen,
            });
            self.heap.push(Reverse((mono_ns(), channel, self.gen)));
        }
    }

    pub fn stop(&mut self, channel: u32) {
        if let Some(slot) = self.active.get_mut(channel as usize) {
            *slot = None;
        }
    }

    /// The next deadline, mono ns.
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((d, _, _))| *d)
    }

    /// The SSRC member `m` sends with.
    pub fn ssrc(&self, m: usize) -> u32 {
        self.uplinks[m].ssrc
    }

    /// Pops the next packet due at or before `now` and writes it into `buf`.
    pub fn pop_due(&mut self, now: u64, buf: &mut [u8], members: &[Member]) -> Option<Due> {
        while let Some(&Reverse((due, ch, g))) = self.heap.peek() {
            if due > now {
                return None;
            }
            self.heap.pop();
            let Some(a) = self.active.get_mut(ch as usize).and_then(|s| s.as_mut()) else {
                continue;
            };
            if a.gen != g {
                continue; // a stale deadline of a stopped spurt
            }
            let m = a.member as usize;
            let up = &mut self.uplinks[m];
            let size = self
                .payload
                .size(a.pkt as u64 + ch as u64, self.rng.random());
            let header = RtpHeader {
                marker: a.pkt == 0,
                payload_type: crate::stamp::PT_OPUS,
                seq: up.seq as u16,
                timestamp: up.ts,
                ssrc: up.ssrc,
            };
            header.write(buf);
            Stamp {
                channel: ch,
                speaker: members[m].slot,
                spurt: a.spurt,
                seq: a.pkt,
                sched_ns: due,
            }
            .write(&mut buf[RTP_HEADER_LEN..]);
            let out = Due {
                member: m,
                len: RTP_HEADER_LEN + size,
                listeners: a.listeners,
                due,
                header,
                ext_seq: up.seq,
            };
            up.seq += 1;
            up.ts = up.ts.wrapping_add(self.ts_step);
            a.pkt += 1;
            self.heap.push(Reverse((due + self.interval, ch, g)));
            return Some(out);
        }
        None
    }
}

/// Run the sender loop on the calling thread until `Shutdown`. Commands about WebRTC members go on to
/// the WebRTC engine (`webrtc`), which sends their media itself.
pub fn run(
    cfg: SenderConfig,
    members: Arc<Vec<Member>>,
    socks: Arc<Endpoints>,
    cmds: Receiver<SendCmd>,
    counters: Arc<SenderCounters>,
    webrtc: Option<Sender<EngineCmd>>,
) {
    crate::sys::tight_timer_slack();
    let mut sched = Schedule::new(&cfg, &members, 0);
    let mut target = Target::Server;
    let mut lag = LatencyHist::new();
    let mut buf = [0u8; 1500];
    let to_engine = |c: SendCmd| {
        if let Some(w) = &webrtc {
            let _ = w.send(EngineCmd::Send(c));
        }
    };

    // Keep-alives spread evenly over the period: one member every `ka_step` ns. WebRTC members need none
    // (their ICE consent checks keep them alive).
    let ka_step = (cfg.keepalive.as_nanos() as u64 / members.len().max(1) as u64).max(1);
    let mut ka_due = mono_ns() + ka_step;
    let mut ka_cursor = 0usize;

    let dest_of = |m: usize, target: Target| -> SocketAddr {
        match target {
            Target::Server => members[m].server_addr,
            Target::Raw(a) => a,
        }
    };
    let send_keepalive = |m: usize, target: Target, sched: &Schedule| {
        if members[m].webrtc {
            return;
        }
        let pkt = rtcp_keepalive(sched.ssrc(m));
        match socks.send_from(m, &pkt, dest_of(m, target)) {
            Ok(_) => counters.keepalives.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
        };
    };

    loop {
        // Wait for the next deadline or a command.
        let now = mono_ns();
        let next = sched.next_due().unwrap_or(u64::MAX).min(ka_due);
        let wait = next.saturating_sub(now).min(5_000_000);
        let cmd = if wait <= cfg.spin_ns {
            // Timer wake-ups overshoot by 50–150 µs on a VM: sleep to just short of the deadline, then
            // spin, so stamps (the scheduled times) match the real send times.
            // The spin yields, so the receiver and signaling threads sharing the harness's core still run
            // at once; its time is counted so it is not mistaken for harness load.
            let cmd = cmds.try_recv().ok();
            if cmd.is_none() && next > now {
                // CPU time, not wall time: while other threads run, the spin costs nothing.
                let t0 = crate::sys::thread_cpu_ns();
                while mono_ns() < next {
                    std::thread::yield_now();
                }
                counters.spin_ns.fetch_add(
                    crate::sys::thread_cpu_ns().saturating_sub(t0),
                    Ordering::Relaxed,
                );
            }
            cmd
        } else {
            let wait = wait - cfg.spin_ns;
            match cmds.recv_timeout(Duration::from_nanos(wait)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        if let Some(cmd) = cmd {
            match cmd {
                SendCmd::Start {
                    channel,
                    member,
                    spurt,
                    listeners,
                } => {
                    if members.get(member as usize).is_some_and(|m| m.webrtc) {
                        sched.stop(channel);
                        to_engine(SendCmd::Start {
                            channel,
                            member,
                            spurt,
                            listeners,
                        });
                    } else {
                        to_engine(SendCmd::Stop { channel });
                        sched.start(channel, member, spurt, listeners);
                    }
                }
                SendCmd::Stop { channel } => {
                    sched.stop(channel);
                    to_engine(SendCmd::Stop { channel });
                }
                SendCmd::Target(t) => {
                    target = t;
                    to_engine(SendCmd::Target(t));
                }
                SendCmd::Relatch => {
                    // Paced (256 per ms): a burst of thousands would overflow the server's receive
                    // buffer and leave members unlatched until their next periodic keep-alive.
                    for m in 0..members.len() {
                        send_keepalive(m, target, &sched);
                        if m % 256 == 255 {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                SendCmd::TakeLag(tx) => {
                    let mut all = std::mem::take(&mut lag);
                    if let Some(w) = &webrtc {
                        let (etx, erx) = std::sync::mpsc::channel();
                        if w.send(EngineCmd::Send(SendCmd::TakeLag(etx))).is_ok() {
                            if let Ok(h) = erx.recv_timeout(Duration::from_millis(500)) {
                                all.merge(&h);
                            }
                        }
                    }
                    let _ = tx.send(all);
                }
                SendCmd::Shutdown => {
                    to_engine(SendCmd::Shutdown);
                    return;
                }
            }
            continue;
        }

        let now = mono_ns();
        while ka_due <= now && !members.is_empty() {
            send_keepalive(ka_cursor, target, &sched);
            ka_cursor = (ka_cursor + 1) % members.len();
            ka_due += ka_step;
        }
        while let Some(d) = sched.pop_due(now, &mut buf, &members) {
            let sent_at = mono_ns();
            match socks.send_from(d.member, &buf[..d.len], dest_of(d.member, target)) {
                Ok(_) => counters.count_media(d.len, d.listeners),
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lag.record(sent_at.saturating_sub(d.due).max(1));
        }
    }
}

impl SenderCounters {
    /// One media packet of `len` bytes sent to `listeners` listeners.
    pub fn count_media(&self, len: usize, listeners: u32) {
        self.media.fetch_add(1, Ordering::Relaxed);
        self.expected.fetch_add(listeners as u64, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::Endpoints;
    use crate::stamp::{parse_datagram, Datagram};
    use std::sync::mpsc::channel;

    #[test]
    fn sends_stamped_packets_at_the_rate_and_stops() {
        let socks = Endpoints::bind(2, 100, 100, 0).unwrap();
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let server = sink.local_addr().unwrap();
        let members: Vec<Member> = socks
            .addrs
            .iter()
            .enumerate()
            .map(|(i, a)| Member {
                channel: 0,
                slot: i as u16,
                addr: *a,
                server_addr: server,
                ssrc: 1,
                payload_type: 111,
                webrtc: false,
            })
            .collect();
        let counters = Arc::new(SenderCounters::default());
        let (tx, rx) = channel();
        let c2 = counters.clone();
        let h = std::thread::spawn(move || {
            run(
                SenderConfig {
                    rate: 100,
                    payload: PayloadModel::Fixed(60),
                    keepalive: Duration::from_secs(3600),
                    seed: 1,
                    spin_ns: SPIN_NS,
                },
                Arc::new(members),
                Arc::new(socks),
                rx,
                c2,
                None,
            )
        });
        tx.send(SendCmd::Start {
            channel: 0,
            member: 1,
            spurt: 7,
            listeners: 1,
        })
        .unwrap();
        let mut buf = [0u8; 2000];
        let mut got = Vec::new();
        while got.len() < 10 {
            let (n, _) = sink.recv_from(&mut buf).expect("packet");
            if let Datagram::Rtp { header, payload } = parse_datagram(&buf[..n]) {
                let st = Stamp::parse(payload).expect("stamp");
                assert_eq!(payload.len(), 60);
                got.push((header, st));
            }
        }
        tx.send(SendCmd::Stop { channel: 0 }).unwrap();
        assert!(got[0].0.marker);
        assert!(!got[1].0.marker);
        for w in got.windows(2) {
            assert_eq!(w[1].0.seq, w[0].0.seq.wrapping_add(1));
            assert_eq!(w[1].0.timestamp, w[0].0.timestamp.wrapping_add(480));
            assert_eq!(w[1].1.sched_ns - w[0].1.sched_ns, 10_000_000);
            assert_eq!(w[1].1.spurt, 7);
            assert_eq!(w[1].1.speaker, 1);
        }
        std::thread::sleep(Duration::from_millis(50));
        tx.send(SendCmd::Shutdown).unwrap();
        h.join().unwrap();
        let media = counters.media.load(Ordering::Relaxed);
        assert!(media >= 10);
        assert_eq!(counters.expected.load(Ordering::Relaxed), media);
    }
}
