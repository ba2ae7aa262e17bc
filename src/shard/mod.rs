//! Shards: one glommio executor per core, pinned, each owning a UDP media port and the channels hashed to
//! it. The loop here is the I/O shell: the only code that touches the socket and the clock. All decisions
//! are in [`engine::ShardCore`]; the values that cross to the control thread are in [`command`] and
//! [`stats`], which both sides import (the engine never imports this shell).
//!
//! A shard talks to the control thread only by values over bounded flume channels, with `try_send`, so
//! neither side ever waits on the other. The packet path — receive, classify, find the member, check the
//! floor, rewrite, batch, `sendmmsg` — takes no lock and allocates nothing per listener.

#![warn(missing_docs)]

pub mod command;
pub mod engine;
pub mod stats;
pub mod timers;
pub mod udp;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glommio::{LocalExecutorBuilder, Placement};
use tracing::{debug, info, warn};

use crate::forward::Batch;
use crate::peer::webrtc::Transmit;

pub use self::command::{Command, Event, PeerRefused, COMMAND_QUEUE};
pub use self::engine::{
    RelayState, ShardConfig, ShardCore, Verdict, EVICT_GRACE, MAX_HANDSHAKES, OPUS_PT,
};
pub use self::stats::{drop_reason_names, DropReason, ShardStats, DROP_REASONS};

/// The control thread's handle on a shard.
#[derive(Clone)]
pub struct ShardHandle {
    /// The shard's index (`shard_of` picks it).
    pub index: usize,
    /// The shard's media port: the ICE host candidate and the plain-RTP `server_addr`.
    pub media_addr: SocketAddr,
    /// Where other nodes send this shard relayed media (relay enabled only).
    pub relay_addr: Option<SocketAddr>,
    /// The shard's bounded command queue (use `try_send`).
    pub commands: flume::Sender<Command>,
}

/// A stable shard for a channel name (FNV-1a: the same on every node and every run, unlike `DefaultHasher`).
pub fn shard_of(channel: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in channel.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// Binds the socket and starts shard `index` on its own thread, pinned to `cpu` (if given). The returned
/// thread ends when the shard does: `Err` with the panic's message if it panicked. `fault` is testing
/// only (`--fault-injection`): a message on it makes the shard panic.
pub fn spawn(
    index: usize,
    bind: SocketAddr,
    cpu: Option<usize>,
    mut config: ShardConfig,
    relay: Option<(SocketAddr, RelayState)>,
    events: flume::Sender<Event>,
    fault: Option<flume::Receiver<()>>,
) -> std::io::Result<(ShardHandle, std::thread::JoinHandle<Result<(), String>>)> {
    let socket = udp::bind(bind)?;
    let media_addr = socket.local_addr()?.as_socket().unwrap_or(bind);
    if let Some(w) = config.webrtc.as_mut() {
        w.candidate.set_port(media_addr.port());
    }
    let (relay_fd, relay_addr, relay_state) = match relay {
        Some((relay_bind, state)) => {
            let s = udp::bind(relay_bind)?;
            let addr = s.local_addr()?.as_socket().unwrap_or(relay_bind);
            (Some(s.into_raw_fd()), Some(addr), Some(state))
        }
        None => (None, None, None),
    };
    let (tx, rx) = flume::bounded(COMMAND_QUEUE);
    let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
    let fd = socket.into_raw_fd();
    let builder = LocalExecutorBuilder::new(placement)
        .name(&format!("shard-{index}"))
        .io_memory(1 << 20)
        .spin_before_park(Duration::from_micros(0));
    let join = builder
        .spawn(move || async move {
            // SAFETY: `fd` is a bound UDP socket whose ownership moves here.
            let socket = unsafe { glommio::net::UdpSocket::from_raw_fd(fd) };
            // SAFETY: likewise for the relay socket.
            let relay_socket =
                relay_fd.map(|fd| unsafe { glommio::net::UdpSocket::from_raw_fd(fd) });
            let core = ShardCore::with_relay(index, config, relay_state, Instant::now());
            if let Some(fault) = fault {
                glommio::spawn_local(async move {
                    if fault.recv_async().await.is_ok() {
                        panic!("fault injection: shard {index} was told to panic");
                    }
                })
                .detach();
            }
            run(index, socket, relay_socket, core, rx, events).await;
        })
        .map_err(|e| std::io::Error::other(format!("shard {index}: {e}")))?;
    let handle = ShardHandle {
        index,
        media_addr,
        relay_addr,
        commands: tx,
    };
    // glommio's join handle is not std's; wrap it in a thread that waits for it and says how the shard
    // ended (a panic is the node's to report and act on).
    let join = std::thread::Builder::new()
        .name(format!("shard-{index}-join"))
        .spawn(move || match join.join() {
            Ok(()) => Ok(()),
            Err(glommio::GlommioError::BuilderError(glommio::BuilderErrorKind::ThreadPanic(p))) => {
                Err(p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panicked".to_string()))
            }
            Err(e) => Err(e.to_string()),
        })?;
    Ok((handle, join))
}

/// What the shard's tasks share. One thread: `Rc` and `RefCell`, never a lock.
struct Loop {
    core: RefCell<ShardCore>,
    socket: glommio::net::UdpSocket,
    /// Relay copies leave from (and other nodes' copies arrive on) this socket; `None` without a cluster.
    relay: Option<glommio::net::UdpSocket>,
    events: flume::Sender<Event>,
    /// Wakes the timer task when a peer's deadline became earlier than the one it sleeps until.
    wake: glommio::channels::local_channel::LocalSender<()>,
    sleeping_until: Cell<Option<Instant>>,
    /// A grant was applied: the clock runs `handle_tick` at once instead of at its heartbeat.
    retick: Cell<bool>,
    /// Origin of the clock's [`TIMER_SLACK`] grid.
    epoch: Instant,
    scratch: RefCell<(Vec<Transmit>, Vec<Event>, rtpio::Sender)>,
}

impl Loop {
    fn send_event(&self, event: Event) {
        if self.events.try_send(event).is_err() {
            self.core.borrow_mut().count_lost_event();
            warn!("control event queue full: event lost");
        }
    }

    /// After every input: send what the WebRTC peers produced, pass their events on, and wake the timer
    /// task if a deadline moved earlier than the one it sleeps until.
    fn flush(&self) {
        let mut scratch = self.scratch.borrow_mut();
        let (transmits, events, sender) = &mut *scratch;
        {
            let mut core = self.core.borrow_mut();
            core.poll_transmits(transmits);
            core.poll_events(events);
        }
        if !transmits.is_empty() {
            let sent = sender.send_each(self.socket.as_raw_fd(), transmits);
            let mut core = self.core.borrow_mut();
            core.count_sent(sent.sent, sent.failed + sent.would_block);
            core.count_would_block(sent.would_block);
            transmits.clear();
        }
        for event in events.drain(..) {
            self.send_event(event);
        }
        if self.core.borrow_mut().take_retick() {
            self.retick.set(true);
            let _ = self.wake.try_send(());
        } else if let (Some(sleeping), Some(next)) = (
            self.sleeping_until.get(),
            self.core.borrow().next_deadline(),
        ) {
            if coalesce(next, self.epoch) < sleeping {
                let _ = self.wake.try_send(());
            }
        }
    }
}

async fn run(
    index: usize,
    socket: glommio::net::UdpSocket,
    relay_socket: Option<glommio::net::UdpSocket>,
    core: ShardCore,
    commands: flume::Receiver<Command>,
    events: flume::Sender<Event>,
) {
    let (wake, wake_rx) = glommio::channels::local_channel::new_bounded(1);
    let has_relay = relay_socket.is_some();
    let lp = Rc::new(Loop {
        core: RefCell::new(core),
        socket,
        relay: relay_socket,
        events,
        wake,
        sleeping_until: Cell::new(None),
        retick: Cell::new(false),
        epoch: Instant::now(),
        scratch: RefCell::new(Default::default()),
    });
    info!(shard = index, addr = ?lp.socket.local_addr().ok(), "shard started");
    let rx = glommio::spawn_local(receive_loop(lp.clone(), Port::Media)).detach();
    let relay_rx =
        has_relay.then(|| glommio::spawn_local(receive_loop(lp.clone(), Port::Relay)).detach());
    let timers = glommio::spawn_local(timer_loop(lp.clone(), wake_rx)).detach();
    while let Ok(cmd) = commands.recv_async().await {
        if matches!(cmd, Command::Shutdown) {
            break;
        }
        let event = lp.core.borrow_mut().handle_command(cmd, Instant::now());
        if let Some(event) = event {
            lp.send_event(event);
        }
        lp.flush();
    }
    rx.cancel();
    if let Some(r) = relay_rx {
        r.cancel();
    }
    timers.cancel();
    info!(shard = index, "shard stopped");
}

/// Which socket a receive loop serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    /// Members' media: forward a holder's packets to local listeners, and relay them to other nodes.
    Media,
    /// Other nodes' relayed media: forward to local listeners.
    Relay,
}

/// Receive → decide → send. The loop parks in glommio until a datagram arrives, then drains what else is
/// queued with one `recvmmsg` and sends the fan-outs of all of them with `sendmmsg` calls covering the
/// whole batch — under load a handful of system calls per 33 received datagrams instead of two each.
/// Listeners always get their packets from the media socket (the address `joined` announced); relay
/// copies (the batch's `relay` part, filled by the same calls) leave from the relay socket, which is what
/// the receiving node accepts. WebRTC listeners' packets, sealed by the shard, leave in the same drain;
/// what their `Rtc`s produced (STUN, DTLS, RTCP) goes out in `flush`.
async fn receive_loop(lp: Rc<Loop>, port: Port) {
    let media_fd = lp.socket.as_raw_fd();
    let relay_fd = lp.relay.as_ref().map(|r| r.as_raw_fd());
    let recv_fd = match (port, &lp.relay) {
        (Port::Relay, Some(r)) => r.as_raw_fd(),
        _ => media_fd,
    };
    let mut first = vec![0u8; rtpio::RECV_BUF];
    let mut receiver = rtpio::Receiver::default();
    let mut batch = Batch::default();
    // For each batch entry, which payload it carries; the payloads: a range of a received datagram, or
    // a WebRTC speaker's packet that str0m decrypted (shared, not copied).
    let mut segment: Vec<u32> = Vec::new();
    let mut ranges: Vec<Payload> = Vec::new();
    let mut shared: Vec<std::sync::Arc<[u8]>> = Vec::new();
    let mut sender = rtpio::Sender::default();
    // Forwarded packets until the next one is timed (two clock reads per sample, none in between); the
    // first is, so that a quiet node has a figure too.
    let mut until_sample = 1;
    loop {
        let socket = match (port, &lp.relay) {
            (Port::Relay, Some(r)) => r,
            _ => &lp.socket,
        };
        let (len, src) = match socket.recv_from(&mut first).await {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "recv_from failed");
                continue;
            }
        };
        batch.clear();
        segment.clear();
        ranges.clear();
        shared.clear();
        let now = Instant::now();
        // Datagram 0 is `first`; datagram k + 1 is the receiver's k-th.
        let queued = receiver.drain(recv_fd);
        for d in 0..=queued {
            let (data, src) = if d == 0 {
                (&first[..len], Some(src))
            } else {
                receiver.datagram(d - 1)
            };
            let Some(src) = src else { continue };
            let verdict = match port {
                Port::Media => lp
                    .core
                    .borrow_mut()
                    .handle_datagram(src, data, now, &mut batch),
                Port::Relay => lp
                    .core
                    .borrow_mut()
                    .handle_relay_datagram(src, data, now, &mut batch),
            };
            let payload = match verdict {
                Verdict::Forward(range) => Payload::Datagram(d, range),
                Verdict::ForwardShared(p) => {
                    shared.push(p);
                    Payload::Shared(shared.len() - 1)
                }
                _ => continue,
            };
            segment.resize(batch.len(), ranges.len() as u32);
            ranges.push(payload);
        }
        // A local speaker's packets (plain or WebRTC) go once to every other node of their channel.
        if let (Some(fd), false) = (relay_fd, batch.relay.is_empty()) {
            let sent = udp::send_relay(&mut sender, fd, &batch.relay);
            lp.core.borrow_mut().count_relayed(sent.sent);
        }
        // What the peers produced first (a DTLS flight that completes a handshake must reach the client
        // before the media sealed with its keys), then the listeners' datagrams sealed by the shard.
        lp.flush();
        if !batch.sealed.is_empty() {
            let sent = udp::send_sealed(&mut sender, media_fd, &batch.sealed);
            let mut c = lp.core.borrow_mut();
            c.count_sent(sent.sent, sent.failed + sent.would_block);
            c.count_media(sent.sent);
            c.count_would_block(sent.would_block);
        }
        if batch.is_empty() {
            sample_latency(&lp, now, ranges.len(), &mut until_sample);
            continue;
        }
        let payloads: Vec<&[u8]> = ranges
            .iter()
            .map(|p| match p {
                Payload::Datagram(0, r) => &first[r.clone()],
                Payload::Datagram(d, r) => &receiver.datagram(d - 1).0[r.clone()],
                Payload::Shared(i) => &shared[*i][..],
            })
            .collect();
        let sent = udp::send_fanouts(&mut sender, media_fd, &batch, &segment, &payloads);
        let mut slow = 0;
        if sent.would_block > 0 {
            // The socket buffer is full: wait for room with glommio for the rest of this batch.
            let first_unsent = batch.len() - sent.would_block;
            let mut datagram = Vec::new();
            for i in first_unsent..batch.len() {
                datagram.clear();
                datagram.extend_from_slice(&batch.headers[i]);
                datagram.extend_from_slice(payloads[segment[i] as usize]);
                let dest = batch.dests[i].to_socket_addr();
                if lp.socket.send_to(&datagram, dest).await.is_ok() {
                    slow += 1;
                }
            }
        }
        let mut c = lp.core.borrow_mut();
        c.count_sent(sent.sent + slow, sent.failed + sent.would_block - slow);
        c.count_media(sent.sent + slow);
        c.count_would_block(sent.would_block);
        drop(c);
        sample_latency(&lp, now, ranges.len(), &mut until_sample);
    }
}

/// After a batch's last `sendmmsg`: when about [`FORWARD_LATENCY_SAMPLE`](crate::metrics::buckets::FORWARD_LATENCY_SAMPLE)
/// packets have been forwarded since the last sample, the time since the wake-up that read this batch
/// goes into the forwarding-latency histogram (the batch's packets all waited at least that long for
/// their last copy to leave).
fn sample_latency(lp: &Loop, woke: Instant, forwarded: usize, until_sample: &mut u64) {
    let n = forwarded as u64;
    if n == 0 {
        return;
    }
    if n < *until_sample {
        *until_sample -= n;
        return;
    }
    *until_sample = crate::metrics::buckets::FORWARD_LATENCY_SAMPLE;
    let ns = u64::try_from(woke.elapsed().as_nanos()).unwrap_or(u64::MAX);
    lp.core.borrow_mut().sample_forward_latency(ns);
}

/// Where the payload of a fan-out is.
enum Payload {
    /// A range of received datagram `d` (plain RTP, relay).
    Datagram(usize, std::ops::Range<usize>),
    /// Index into the decrypted packets of WebRTC speakers.
    Shared(usize),
}

/// Peers' deadlines are served on a grid this coarse: str0m's timers (ICE consent, RTCP, DTLS
/// retransmits) tolerate a few milliseconds of lateness, and peers due in the same slot share one
/// wake-up — 1,600 idle peers each due every ~2.5 s would otherwise wake the shard 640 times a second.
const TIMER_SLACK: Duration = Duration::from_millis(20);

/// `at` rounded up to the next [`TIMER_SLACK`] boundary (since `epoch`).
fn coalesce(at: Instant, epoch: Instant) -> Instant {
    let slack = TIMER_SLACK.as_nanos();
    let since = at.saturating_duration_since(epoch).as_nanos();
    let slots = since.div_ceil(slack);
    epoch + Duration::from_nanos(u64::try_from(slots * slack).unwrap_or(u64::MAX))
}

/// The shard's clock: peers' deadlines from the timer heap (coalesced on a grid), and T1 and sender
/// reports when [`ShardCore::handle_tick`] says they are next due — at the latest every `tick` (the
/// heartbeat that notices a grant or media after an idle spell). Sleeps until the earliest; `flush`
/// wakes it when a nearer peer deadline appears.
async fn timer_loop(lp: Rc<Loop>, wake: glommio::channels::local_channel::LocalReceiver<()>) {
    let fd = lp.socket.as_raw_fd();
    let tick = lp.core.borrow().config().tick;
    let mut sender = rtpio::Sender::default();
    let mut out_events = Vec::new();
    let mut reports = Vec::new();
    let epoch = lp.epoch;
    let mut next_tick = epoch + tick;
    loop {
        let wake_at = lp
            .core
            .borrow()
            .next_deadline()
            .map_or(next_tick, |d| coalesce(d, epoch).min(next_tick));
        let nap = wake_at.saturating_duration_since(Instant::now());
        if nap.is_zero() {
            // A deadline already due: let the receive loop run before serving it (no busy spin).
            glommio::yield_if_needed().await;
        } else {
            lp.sleeping_until.set(Some(wake_at));
            let sleep = std::pin::pin!(glommio::timer::sleep(nap));
            let woken = std::pin::pin!(wake.recv());
            futures_util::future::select(sleep, woken).await;
            lp.sleeping_until.set(None);
        }
        let now = Instant::now();
        lp.core.borrow_mut().handle_timers(now);
        if lp.retick.take() || now >= next_tick {
            let unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let due = lp
                .core
                .borrow_mut()
                .handle_tick(now, unix, &mut out_events, &mut reports);
            next_tick = due.map_or(now + tick, |d| {
                d.clamp(now + Duration::from_millis(1), now + tick)
            });
            for event in out_events.drain(..) {
                lp.send_event(event);
            }
            if !reports.is_empty() {
                let sent = sender.send_each(fd, &reports);
                lp.core.borrow_mut().count_reports(sent.sent);
                reports.clear();
            }
        }
        lp.flush();
    }
}
