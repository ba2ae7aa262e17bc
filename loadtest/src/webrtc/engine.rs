//! The WebRTC engine: one thread owns every client `Rtc` (str0m is sans-IO). It applies the answers the
//! WebSocket tasks hand over, drives ICE and DTLS, sends the WebRTC speakers' stamped packets on the same
//! [`Schedule`] as the plain-RTP sender, and receives, decrypts and accounts the listeners' streams with
//! the same [`Tally`] as the plain receivers.
//!
//! The stamp is written before encryption and the receive time is read right after `recvmmsg`, before
//! decryption: the SRTP work of the harness is in the measured latency only as far as it delays the next
//! receive, as it would in any client.
//!
//! Two inboxes: [`EngineCmd`] from the coordinator and the WebSocket tasks (answers, the run's tables),
//! and the plain-RTP sender's [`SendCmd`]s for speakers that are WebRTC members — the sender sits below
//! the engine and knows it only as a channel.

use super::peer::{parse_answer, ClientPeer};
use crate::mmsg::RecvBatch;
use crate::model::{Member, Target};
use crate::schedule::{Schedule, SenderConfig};
use crate::sender::{SendCmd, SenderCounters};
use crate::sockets::Endpoints;
use crate::stamp::RtpHeader;
use crate::stats::LatencyHist;
use crate::sys::{mono_ns, Epoll, SPIN_NS};
use crate::tally::{RecvReport, RecvShared, Tally};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;
use str0m::change::SdpAnswer;
use str0m::media::Pt;
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Event, IceConnectionState, Input, Output};

/// Commands to the engine.
#[derive(Debug)]
pub enum EngineCmd {
    /// The server's SDP answer to member `member`'s offer.
    Answer { member: u32, sdp: String },
    /// The run's tables, once everyone has joined: from now on media is sent and accounted.
    Begin(Box<Begin>),
}

/// What the engine needs once the members are known.
pub struct Begin {
    pub cfg: SenderConfig,
    pub members: Arc<Vec<Member>>,
    pub shared: Arc<RecvShared>,
    pub reports: Sender<RecvReport>,
    pub counters: Arc<SenderCounters>,
}

impl std::fmt::Debug for Begin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Begin")
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

/// Counters the coordinator reads.
#[derive(Debug, Default)]
pub struct EngineCounters {
    pub connected: AtomicU64,
    /// Peers whose ICE gave up or whose `Rtc` failed.
    pub failed: AtomicU64,
    /// Datagrams str0m refused (not STUN/DTLS/SRTP of a live peer).
    pub rejected: AtomicU64,
    pub srtp_in: AtomicU64,
    pub tid: AtomicI32,
}

const BATCH: usize = 16;

/// The engine: owns `peers` (on their members' dedicated sockets in `eps`) until `Shutdown` (from the
/// sender, in `sends`), the receivers' stop flag, or `cmds` closing.
pub fn run(
    mut peers: Vec<ClientPeer>,
    eps: Arc<Endpoints>,
    cmds: Receiver<EngineCmd>,
    sends: Receiver<SendCmd>,
    ec: Arc<EngineCounters>,
) {
    crate::sys::tight_timer_slack();
    ec.tid.store(crate::sys::gettid(), Ordering::Release);
    let mut ep = match Epoll::new() {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("webrtc engine: epoll_create1 failed: {e}");
            return;
        }
    };
    let mut by_member: HashMap<u32, usize> = HashMap::with_capacity(peers.len());
    for (i, p) in peers.iter().enumerate() {
        by_member.insert(p.member, i);
        ep.add(eps.socks[p.member as usize].as_raw_fd(), i as u64);
    }
    let mut engine = Engine {
        eps,
        ec,
        timers: BinaryHeap::new(),
        live: None,
    };
    let mut batch = RecvBatch::new(BATCH, false);
    let mut out = [0u8; crate::mmsg::BUF];

    loop {
        if let Some(l) = engine.live.as_mut() {
            if l.tally.poll_phase() {
                break;
            }
        }
        // Commands.
        loop {
            match cmds.try_recv() {
                Ok(EngineCmd::Answer { member, sdp }) => {
                    let Some(&i) = by_member.get(&member) else {
                        continue;
                    };
                    engine.answer(&mut peers[i], i, &sdp);
                }
                Ok(EngineCmd::Begin(b)) => {
                    let sched = Schedule::new(&b.cfg, &b.members, 0x77eb);
                    engine.live = Some(Live {
                        sched,
                        tally: Tally::new(b.shared, b.reports),
                        members: b.members,
                        counters: b.counters,
                        target: Target::Server,
                        lag: LatencyHist::new(),
                    });
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    return;
                }
            }
        }
        // The sender's commands wait until `Begin` has been applied: the two inboxes are not ordered
        // with each other. (Before it there is nothing to send; a run that ends first closes `cmds`.)
        while engine.live.is_some() {
            let Ok(c) = sends.try_recv() else { break };
            if engine.command(c) {
                return;
            }
        }
        // Due packets and str0m timeouts.
        engine.send_due(&mut peers, &by_member, &mut out);
        engine.fire_timers(&mut peers);

        // Wait for a datagram or the next deadline; commands are polled at least every 2 ms.
        let now = mono_ns();
        let mut next = now + 2_000_000;
        if let Some(d) = engine.live.as_ref().and_then(|l| l.sched.next_due()) {
            next = next.min(d);
        }
        if let Some(Reverse((t, _))) = engine.timers.peek() {
            let in_ns = t.saturating_duration_since(Instant::now()).as_nanos() as u64;
            next = next.min(now + in_ns);
        }
        let wait = next.saturating_sub(now);
        let timeout_ms = if wait > SPIN_NS {
            ((wait - SPIN_NS) / 1_000_000) as i32
        } else {
            0
        };
        let t0 = (timeout_ms == 0).then(crate::sys::thread_cpu_ns);
        let n = ep.wait(timeout_ms);
        if n == 0 {
            if let Some(t0) = t0 {
                // Close to a deadline: poll instead of sleeping (a timer wake-up overshoots by 50–150 µs
                // on a VM), yielding so the other harness threads on this core still run.
                std::thread::yield_now();
                if let Some(l) = engine.live.as_ref() {
                    l.counters.spin_ns.fetch_add(
                        crate::sys::thread_cpu_ns().saturating_sub(t0),
                        Ordering::Relaxed,
                    );
                }
            }
            continue;
        }
        for r in 0..n {
            let i = ep.token(r) as usize;
            let fd = engine.eps.socks[peers[i].member as usize].as_raw_fd();
            loop {
                let got = batch.recv(fd, libc::MSG_DONTWAIT);
                if got == 0 {
                    break;
                }
                let recv_ns = mono_ns();
                let at = Instant::now();
                for k in 0..got {
                    let (data, src) = batch.datagram(k);
                    engine.datagram(&mut peers[i], i, src, data, recv_ns, at);
                }
                if got < BATCH {
                    break;
                }
            }
        }
        if let Some(l) = engine.live.as_mut() {
            l.tally.tick();
        }
    }
}

struct Engine {
    eps: Arc<Endpoints>,
    ec: Arc<EngineCounters>,
    /// str0m deadlines (lazy: an entry counts only while it equals its peer's `deadline`).
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    live: Option<Live>,
}

/// The measuring part, from `Begin` on.
struct Live {
    sched: Schedule,
    tally: Tally,
    members: Arc<Vec<Member>>,
    counters: Arc<SenderCounters>,
    target: Target,
    lag: LatencyHist,
}

impl Engine {
    fn answer(&mut self, p: &mut ClientPeer, i: usize, sdp: &str) {
        let Some(pending) = p.pending.take() else {
            return; // a second answer (a retried join): the first one stands
        };
        let answer = match SdpAnswer::from_sdp_string(sdp) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("webrtc member {}: bad SDP answer: {e}", p.member);
                self.fail(p);
                return;
            }
        };
        if let Err(e) = p.rtc.sdp_api().accept_answer(pending, answer) {
            eprintln!("webrtc member {}: answer refused: {e}", p.member);
            self.fail(p);
            return;
        }
        if let Ok(a) = parse_answer(sdp) {
            p.pt = Pt::from(a.payload_type);
        }
        let now = Instant::now();
        let _ = p.rtc.handle_input(Input::Timeout(now));
        self.drain(p, i, 0, 0);
    }

    fn fail(&mut self, p: &mut ClientPeer) {
        if !p.failed {
            p.failed = true;
            self.ec.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `true`: shut down.
    fn command(&mut self, c: SendCmd) -> bool {
        let Some(l) = self.live.as_mut() else {
            return matches!(c, SendCmd::Shutdown);
        };
        match c {
            SendCmd::Start {
                channel,
                member,
                spurt,
                listeners,
            } => l.sched.start(channel, member, spurt, listeners),
            SendCmd::Stop { channel } => l.sched.stop(channel),
            SendCmd::Target(t) => l.target = t,
            SendCmd::Relatch => {}
            SendCmd::TakeLag(tx) => {
                let _ = tx.send(std::mem::take(&mut l.lag));
            }
            SendCmd::Shutdown => return true,
        }
        false
    }

    fn send_due(
        &mut self,
        peers: &mut [ClientPeer],
        by_member: &HashMap<u32, usize>,
        buf: &mut [u8],
    ) {
        let Some(l) = self.live.as_mut() else {
            return;
        };
        let now = mono_ns();
        let mut fed = Vec::new();
        while let Some(d) = l.sched.pop_due(now, buf, &l.members) {
            let Some(&i) = by_member.get(&(d.member as u32)) else {
                continue;
            };
            let p = &mut peers[i];
            let sent = match l.target {
                Target::Raw(raw) => self.eps.send_from(d.member, &buf[..d.len], raw).is_ok(),
                Target::Server if p.connected && !p.failed => {
                    let at = Instant::now();
                    let seq = p.srtp_seq(d.ext_seq);
                    match p.rtc.direct_api().stream_tx_by_mid(p.mid, None) {
                        Some(tx) => {
                            tx.write_rtp(
                                RtpWrite::new(
                                    p.pt,
                                    seq.into(),
                                    d.header.timestamp,
                                    at,
                                    &buf[crate::stamp::RTP_HEADER_LEN..d.len],
                                )
                                .marker(d.header.marker)
                                .nackable(false),
                            );
                            let _ = p.rtc.handle_input(Input::Timeout(at));
                            fed.push(i);
                            true
                        }
                        None => false,
                    }
                }
                Target::Server => false,
            };
            if sent {
                l.counters.count_media(d.len, d.listeners);
            } else {
                l.counters.count_failed(d.listeners);
            }
            l.lag.record(mono_ns().saturating_sub(d.due).max(1));
        }
        for i in fed {
            self.drain(&mut peers[i], i, 0, 0);
        }
    }

    fn fire_timers(&mut self, peers: &mut [ClientPeer]) {
        let now = Instant::now();
        while let Some(&Reverse((t, i))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let p = &mut peers[i];
            if p.deadline != t || p.failed {
                continue;
            }
            let _ = p.rtc.handle_input(Input::Timeout(now));
            self.drain(p, i, 0, 0);
        }
    }

    /// One datagram for peer `i` received at `recv_ns` (mono) / `at`.
    fn datagram(
        &mut self,
        p: &mut ClientPeer,
        i: usize,
        src: SocketAddr,
        data: &[u8],
        recv_ns: u64,
        at: Instant,
    ) {
        if let Some(l) = self.live.as_mut() {
            if l.target == Target::Raw(src) {
                l.tally.datagram(p.member as usize, src, data, recv_ns);
                return;
            }
        }
        if p.failed {
            return;
        }
        let Ok(r) = Receive::new(Protocol::Udp, src, p.local, data) else {
            self.ec.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if p.rtc.handle_input(Input::Receive(at, r)).is_err() {
            self.ec.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.drain(p, i, recv_ns, data.len());
    }

    /// str0m's `poll_output` until `Timeout`: transmits go out of the member's socket, RTP is accounted
    /// as received at `recv_ns` with `wire_len` bytes on the wire.
    fn drain(&mut self, p: &mut ClientPeer, i: usize, recv_ns: u64, wire_len: usize) {
        loop {
            match p.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    if t != p.deadline {
                        p.deadline = t;
                        self.timers.push(Reverse((t, i)));
                    }
                    return;
                }
                Ok(Output::Transmit(t)) => {
                    let _ = self.eps.socks[p.member as usize].send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(e)) => match e {
                    Event::Connected if !p.connected => {
                        p.connected = true;
                        self.ec.connected.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        self.fail(p);
                    }
                    Event::RtpPacket(pkt) => {
                        self.ec.srtp_in.fetch_add(1, Ordering::Relaxed);
                        let Some(l) = self.live.as_mut() else {
                            continue;
                        };
                        let h = &pkt.header;
                        let header = RtpHeader {
                            marker: h.marker,
                            payload_type: *h.payload_type,
                            seq: h.sequence_number,
                            timestamp: h.timestamp,
                            ssrc: *h.ssrc,
                        };
                        let now = if recv_ns == 0 { mono_ns() } else { recv_ns };
                        l.tally
                            .server_rtp(p.member as usize, header, &pkt.payload, wire_len, now);
                    }
                    _ => {}
                },
                Err(e) => {
                    eprintln!("webrtc member {}: {e}", p.member);
                    self.fail(p);
                    return;
                }
            }
        }
    }
}
