//! The sender thread: every plain-RTP speaker's 20 ms packets (on a [`Schedule`]), and every member's
//! latching keep-alive, from one thread.
//!
//! Each packet is stamped with the time it was *scheduled* for; if this thread falls behind, the lag
//! lands in the measured latency (no coordinated omission) and separately in `lag`, so a slow harness is
//! visible as such. Speakers start at random phases, so load is smooth rather than a 20 ms pulse.
//!
//! WebRTC speakers are the WebRTC engine's: the sender passes their commands on over a plain channel of
//! [`SendCmd`]s, so it needs to know nothing of the engine (which sits above it and imports it).

use crate::model::{Member, Target};
use crate::schedule::{Schedule, SenderConfig};
use crate::sockets::Endpoints;
use crate::stamp::rtcp_keepalive;
use crate::stats::LatencyHist;
use crate::sys::mono_ns;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

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
    /// Media packets sent.
    pub media: AtomicU64,
    /// Σ listeners of each media packet the harness *tried* to send, sent or not: what should arrive if
    /// nothing is lost. A failed send is a loss like any other, and fails the run besides.
    pub expected: AtomicU64,
    pub keepalives: AtomicU64,
    /// Media packets whose send failed.
    pub errors: AtomicU64,
    /// Keep-alives whose send failed (a member that may not stay latched).
    pub keepalive_errors: AtomicU64,
    pub bytes: AtomicU64,
    /// CPU time spent spinning (yielding) just before deadlines, ns.
    pub spin_ns: AtomicU64,
}

/// Run the sender loop on the calling thread until `Shutdown`. Commands about WebRTC members go on to
/// the WebRTC engine (`webrtc`), which sends their media itself.
pub fn run(
    cfg: SenderConfig,
    members: Arc<Vec<Member>>,
    socks: Arc<Endpoints>,
    cmds: Receiver<SendCmd>,
    counters: Arc<SenderCounters>,
    webrtc: Option<Sender<SendCmd>>,
) {
    crate::sys::tight_timer_slack();
    let mut sched = Schedule::new(&cfg, &members, 0);
    let mut target = Target::Server;
    let mut lag = LatencyHist::new();
    let mut buf = [0u8; 1500];
    let to_engine = |c: SendCmd| {
        if let Some(w) = &webrtc {
            let _ = w.send(c);
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
            Err(_) => counters.keepalive_errors.fetch_add(1, Ordering::Relaxed),
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
                        if w.send(SendCmd::TakeLag(etx)).is_ok() {
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
                Err(_) => counters.count_failed(d.listeners),
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

    /// One media packet for `listeners` listeners that could not be sent: expected all the same.
    pub fn count_failed(&self, listeners: u32) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.expected.fetch_add(listeners as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::PayloadModel;
    use crate::sockets::Endpoints;
    use crate::stamp::Stamp;
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
                    spin_ns: crate::sys::SPIN_NS,
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

    #[test]
    fn a_failed_send_is_still_expected() {
        let c = SenderCounters::default();
        c.count_media(100, 3);
        c.count_failed(3);
        assert_eq!(c.media.load(Ordering::Relaxed), 1);
        assert_eq!(c.errors.load(Ordering::Relaxed), 1);
        assert_eq!(c.expected.load(Ordering::Relaxed), 6);
    }
}
