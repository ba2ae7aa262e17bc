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
struct Uplink {
    seq: u16,
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

/// Run the sender loop on the calling thread until `Shutdown`.
pub fn run(
    cfg: SenderConfig,
    members: Arc<Vec<Member>>,
    socks: Arc<Endpoints>,
    cmds: Receiver<SendCmd>,
    counters: Arc<SenderCounters>,
) {
    crate::sys::tight_timer_slack();
    let interval = 1_000_000_000 / cfg.rate.max(1) as u64;
    let ts_step = 48_000 / cfg.rate.max(1);
    let mut rng = SmallRng::seed_from_u64(cfg.seed ^ 0x5e4d);
    let mut uplinks: Vec<Uplink> = (0..members.len())
        .map(|_| Uplink {
            seq: rng.random(),
            ts: rng.random(),
            ssrc: rng.random(),
        })
        .collect();
    let n_channels = members.last().map(|m| m.channel as usize + 1).unwrap_or(0);
    let mut active: Vec<Option<Active>> = (0..n_channels).map(|_| None).collect();
    let mut gen = 0u32;
    let mut heap: BinaryHeap<Reverse<(u64, u32, u32)>> = BinaryHeap::new();
    let mut target = Target::Server;
    let mut lag = LatencyHist::new();
    let mut buf = [0u8; 1500];

    // Keep-alives spread evenly over the period: one member every `ka_step` ns.
    let ka_step = (cfg.keepalive.as_nanos() as u64 / members.len().max(1) as u64).max(1);
    let mut ka_due = mono_ns() + ka_step;
    let mut ka_cursor = 0usize;

    let dest_of = |m: usize, target: Target| -> SocketAddr {
        match target {
            Target::Server => members[m].server_addr,
            Target::Raw(a) => a,
        }
    };
    let send_keepalive = |m: usize, target: Target, uplinks: &[Uplink]| {
        let pkt = rtcp_keepalive(uplinks[m].ssrc);
        match socks.send_from(m, &pkt, dest_of(m, target)) {
            Ok(_) => counters.keepalives.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
        };
    };

    loop {
        // Wait for the next deadline or a command.
        let now = mono_ns();
        let next = heap
            .peek()
            .map(|Reverse((d, _, _))| *d)
            .unwrap_or(u64::MAX)
            .min(ka_due);
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
                    if let Some(slot) = active.get_mut(channel as usize) {
                        gen = gen.wrapping_add(1);
                        *slot = Some(Active {
                            member,
                            spurt,
                            pkt: 0,
                            listeners,
                            gen,
                        });
                        heap.push(Reverse((mono_ns(), channel, gen)));
                    }
                }
                SendCmd::Stop { channel } => {
                    if let Some(slot) = active.get_mut(channel as usize) {
                        *slot = None;
                    }
                }
                SendCmd::Target(t) => target = t,
                SendCmd::Relatch => {
                    // Paced (256 per ms): a burst of thousands would overflow the server's receive
                    // buffer and leave members unlatched until their next periodic keep-alive.
                    for m in 0..members.len() {
                        send_keepalive(m, target, &uplinks);
                        if m % 256 == 255 {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                SendCmd::TakeLag(tx) => {
                    let _ = tx.send(std::mem::take(&mut lag));
                }
                SendCmd::Shutdown => return,
            }
            continue;
        }

        let now = mono_ns();
        while ka_due <= now && !members.is_empty() {
            send_keepalive(ka_cursor, target, &uplinks);
            ka_cursor = (ka_cursor + 1) % members.len();
            ka_due += ka_step;
        }
        while let Some(&Reverse((due, ch, g))) = heap.peek() {
            if due > now {
                break;
            }
            heap.pop();
            let Some(a) = active.get_mut(ch as usize).and_then(|s| s.as_mut()) else {
                continue;
            };
            if a.gen != g {
                continue; // a stale deadline of a stopped spurt
            }
            let m = a.member as usize;
            let up = &mut uplinks[m];
            let size = cfg.payload.size(a.pkt as u64 + ch as u64, rng.random());
            RtpHeader {
                marker: a.pkt == 0,
                payload_type: crate::stamp::PT_OPUS,
                seq: up.seq,
                timestamp: up.ts,
                ssrc: up.ssrc,
            }
            .write(&mut buf);
            Stamp {
                channel: ch,
                speaker: members[m].slot,
                spurt: a.spurt,
                seq: a.pkt,
                sched_ns: due,
            }
            .write(&mut buf[RTP_HEADER_LEN..]);
            let len = RTP_HEADER_LEN + size;
            let sent_at = mono_ns();
            match socks.send_from(m, &buf[..len], dest_of(m, target)) {
                Ok(_) => {
                    counters.media.fetch_add(1, Ordering::Relaxed);
                    counters
                        .expected
                        .fetch_add(a.listeners as u64, Ordering::Relaxed);
                    counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lag.record(sent_at.saturating_sub(due).max(1));
            up.seq = up.seq.wrapping_add(1);
            up.ts = up.ts.wrapping_add(ts_step);
            a.pkt += 1;
            heap.push(Reverse((due + interval, ch, g)));
        }
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
