//! WebRTC members (`--transport webrtc|mixed`): one str0m `Rtc` per member as the *client* side of the
//! protocol (ICE controlling agent, DTLS client, SRTP), so the server sees exactly what a browser makes
//! it do: connectivity checks, a DTLS handshake per member, SRTP both ways, RTCP.
//!
//! str0m is sans-IO, so one engine thread owns every client `Rtc`: it applies the answers the WebSocket
//! tasks hand over, drives ICE and DTLS, sends the WebRTC speakers' stamped packets on the same
//! [`Schedule`] as the plain-RTP sender, and receives, decrypts and accounts the listeners' streams with
//! the same [`Tally`] as the plain receivers. The stamp is written before encryption and the receive time
//! is read right after `recvmmsg`, before decryption: the SRTP work of the harness is in the measured
//! latency only as far as it delays the next receive, as it would in any client.
//!
//! In a ceiling run's raw phases the same members speak plain RTP to the raw forwarder from the same
//! sockets: the raw forwarder does no SRTP, which is the point of the WebRTC ceiling ratio.

use crate::model::{Member, Target};
use crate::receiver::{sockaddr_to, RecvReport, RecvShared, Tally};
use crate::sender::{Schedule, SendCmd, SenderConfig, SenderCounters, SPIN_NS};
use crate::sockets::Endpoints;
use crate::stamp::RtpHeader;
use crate::stats::LatencyHist;
use crate::sys::mono_ns;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

/// Which members use WebRTC: all (`webrtc`), every odd slot (`mixed`: both kinds in every channel, both
/// kinds speak), or none (`rtp`).
pub fn is_webrtc(transport: &str, slot: u16) -> bool {
    match transport {
        "webrtc" => true,
        "mixed" => slot % 2 == 1,
        _ => false,
    }
}

/// Commands to the engine.
#[derive(Debug)]
pub enum EngineCmd {
    /// The server's SDP answer to member `member`'s offer.
    Answer { member: u32, sdp: String },
    /// The run's tables, once everyone has joined: from now on media is sent and accounted.
    Begin(Box<Begin>),
    /// Forwarded by the plain-RTP sender: speakers that are WebRTC members, targets, lag, shutdown.
    Send(SendCmd),
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

/// One client peer, built before joining.
pub struct ClientPeer {
    member: u32,
    rtc: Rtc,
    pending: Option<SdpPendingOffer>,
    mid: Mid,
    local: SocketAddr,
    pt: Pt,
    deadline: Instant,
    connected: bool,
    failed: bool,
}

/// Builds client peers for `members` (index, local address) and their SDP offers. One DTLS certificate
/// serves all of them: generating one per peer would cost the harness seconds for thousands of members.
pub fn prepare(members: &[(u32, SocketAddr)]) -> Result<(Vec<ClientPeer>, Vec<String>), String> {
    let crypto = Arc::new(str0m::crypto::from_feature_flags());
    let cert = crypto
        .dtls_provider
        .generate_certificate()
        .ok_or("cannot generate a DTLS certificate for the WebRTC members")?;
    let now = Instant::now();
    let mut peers = Vec::with_capacity(members.len());
    let mut offers = Vec::with_capacity(members.len());
    for &(member, local) in members {
        let mut rtc = Rtc::builder()
            .set_rtp_mode(true)
            .set_dtls_cert(cert.clone())
            .set_crypto_provider(crypto.clone())
            .clear_codecs()
            .enable_opus(true, false)
            .build(now);
        let cand = Candidate::host(local, "udp").map_err(|e| format!("candidate {local}: {e}"))?;
        rtc.add_local_candidate(cand);
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, pending) = api.apply().ok_or("str0m made no offer")?;
        offers.push(offer.to_sdp_string());
        peers.push(ClientPeer {
            member,
            rtc,
            pending: Some(pending),
            mid,
            local,
            pt: Pt::from(crate::stamp::PT_OPUS),
            deadline: now,
            connected: false,
            failed: false,
        });
    }
    Ok((peers, offers))
}

/// What the harness needs from an SDP answer: the server's candidate, the SSRC and payload type of the
/// stream the member will hear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerInfo {
    pub server_addr: SocketAddr,
    pub ssrc: u32,
    pub payload_type: u8,
}

/// Reads [`AnswerInfo`] from an SDP answer (a UDP host candidate, the first `a=ssrc`, Opus's `rtpmap`).
pub fn parse_answer(sdp: &str) -> Result<AnswerInfo, String> {
    let mut server_addr = None;
    let mut ssrc = None;
    let mut payload_type = None;
    for line in sdp.lines().map(str::trim) {
        if let Some(c) = line.strip_prefix("a=candidate:") {
            // foundation component transport priority address port typ host
            let f: Vec<&str> = c.split_whitespace().collect();
            if server_addr.is_none() && f.len() >= 8 && f[2].eq_ignore_ascii_case("udp") {
                server_addr = format!("{}:{}", f[4], f[5]).parse::<SocketAddr>().ok();
            }
        } else if let Some(rest) = line.strip_prefix("a=ssrc:") {
            if ssrc.is_none() {
                ssrc = rest.split_whitespace().next().and_then(|s| s.parse().ok());
            }
        } else if let Some(rest) = line.strip_prefix("a=rtpmap:") {
            let mut it = rest.split_whitespace();
            if let (Some(pt), Some(codec)) = (it.next(), it.next()) {
                if payload_type.is_none() && codec.to_ascii_lowercase().starts_with("opus/") {
                    payload_type = pt.parse().ok();
                }
            }
        }
    }
    let server_addr = server_addr.ok_or("SDP answer without a UDP candidate")?;
    if !server_addr.ip().is_loopback() {
        return Err(format!(
            "the server's candidate is {server_addr}, not loopback; the harness only sends to 127.0.0.0/8 \
             (start the server with --announce-ip 127.0.0.1)"
        ));
    }
    Ok(AnswerInfo {
        server_addr,
        ssrc: ssrc.ok_or("SDP answer without a=ssrc for the member's stream")?,
        payload_type: payload_type.ok_or("SDP answer without Opus")?,
    })
}

const BATCH: usize = 16;
const BUF: usize = 2048;

/// The engine: owns `peers` (on their members' dedicated sockets in `eps`) until `Shutdown` or the
/// receivers' stop flag.
pub fn run(
    mut peers: Vec<ClientPeer>,
    eps: Arc<Endpoints>,
    cmds: Receiver<EngineCmd>,
    ec: Arc<EngineCounters>,
) {
    crate::sys::tight_timer_slack();
    ec.tid.store(crate::sys::gettid(), Ordering::Release);
    // SAFETY: epoll_create1 with a valid flag.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        eprintln!(
            "webrtc engine: epoll_create1 failed: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let mut by_member: HashMap<u32, usize> = HashMap::with_capacity(peers.len());
    for (i, p) in peers.iter().enumerate() {
        by_member.insert(p.member, i);
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        let fd = eps.socks[p.member as usize].as_raw_fd();
        // SAFETY: ep and the socket are open descriptors; ev is valid for the call.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    }
    let mut engine = Engine {
        eps,
        ec,
        timers: BinaryHeap::new(),
        live: None,
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut bufs = vec![[0u8; BUF]; BATCH];
    // SAFETY: all-zero sockaddr_in / iovec / mmsghdr are valid initial values; pointers are set below.
    let mut names: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut iovs: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut out = [0u8; BUF];

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
                Ok(EngineCmd::Send(c)) => {
                    if engine.command(c) {
                        // SAFETY: ep is our epoll descriptor.
                        unsafe { libc::close(ep) };
                        return;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    // SAFETY: ep is our epoll descriptor.
                    unsafe { libc::close(ep) };
                    return;
                }
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
        // SAFETY: events has room for events.len() entries.
        let n =
            unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, timeout_ms) };
        if n <= 0 {
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
        for ev in events.iter().take(n as usize) {
            let i = ev.u64 as usize;
            let fd = engine.eps.socks[peers[i].member as usize].as_raw_fd();
            loop {
                for k in 0..BATCH {
                    iovs[k].iov_base = bufs[k].as_mut_ptr() as *mut libc::c_void;
                    iovs[k].iov_len = BUF;
                    msgs[k].msg_hdr.msg_name =
                        &mut names[k] as *mut libc::sockaddr_in as *mut libc::c_void;
                    msgs[k].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                    msgs[k].msg_hdr.msg_iov = &mut iovs[k];
                    msgs[k].msg_hdr.msg_iovlen = 1;
                    msgs[k].msg_len = 0;
                }
                // SAFETY: msgs/iovs/names/bufs outlive the call and describe valid buffers.
                let got = unsafe {
                    libc::recvmmsg(
                        fd,
                        msgs.as_mut_ptr(),
                        BATCH as u32,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if got <= 0 {
                    break;
                }
                let recv_ns = mono_ns();
                let at = Instant::now();
                for k in 0..got as usize {
                    let len = (msgs[k].msg_len as usize).min(BUF);
                    let src = sockaddr_to(&names[k]);
                    engine.datagram(&mut peers[i], i, src, &bufs[k][..len], recv_ns, at);
                }
                if (got as usize) < BATCH {
                    break;
                }
            }
        }
        if let Some(l) = engine.live.as_mut() {
            l.tally.tick();
        }
    }
    // SAFETY: ep is our epoll descriptor.
    unsafe { libc::close(ep) };
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
                    match p.rtc.direct_api().stream_tx_by_mid(p.mid, None) {
                        Some(tx) => {
                            tx.write_rtp(
                                RtpWrite::new(
                                    p.pt,
                                    d.ext_seq.into(),
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
                l.counters.errors.fetch_add(1, Ordering::Relaxed);
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

/// How long to wait for every WebRTC member to connect, for `n` members.
pub fn connect_timeout(n: usize) -> Duration {
    Duration::from_secs(30 + n as u64 / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=ice-lite\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendrecv\r\n\
        a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n\
        a=ssrc:305419896 cname:x\r\n\
        a=candidate:1 1 udp 2130706431 127.0.0.1 40001 typ host\r\na=end-of-candidates\r\n";

    #[test]
    fn answers_are_read() {
        let a = parse_answer(ANSWER).unwrap();
        assert_eq!(a.server_addr, "127.0.0.1:40001".parse().unwrap());
        assert_eq!(a.ssrc, 305_419_896);
        assert_eq!(a.payload_type, 111);
        let remote = ANSWER.replace("127.0.0.1", "10.0.0.5");
        assert!(parse_answer(&remote).unwrap_err().contains("loopback"));
        let no_ssrc = ANSWER.replace("a=ssrc:305419896 cname:x\r\n", "");
        assert!(parse_answer(&no_ssrc).unwrap_err().contains("a=ssrc"));
    }

    #[test]
    fn transports_pick_members() {
        assert!(!is_webrtc("rtp", 1));
        assert!(is_webrtc("webrtc", 0));
        assert!(!is_webrtc("mixed", 0) && is_webrtc("mixed", 1));
    }

    #[test]
    fn offers_are_one_opus_audio_line_with_our_candidate() {
        let local: SocketAddr = "127.0.0.3:5000".parse().unwrap();
        let (peers, offers) = prepare(&[(7, local)]).unwrap();
        assert_eq!(peers.len(), 1);
        let o = &offers[0];
        assert_eq!(o.matches("m=audio").count(), 1, "{o}");
        assert!(!o.contains("m=video"), "{o}");
        assert!(o.to_ascii_lowercase().contains("opus/48000"), "{o}");
        assert!(o.contains("127.0.0.3 5000 typ host"), "{o}");
    }
}
