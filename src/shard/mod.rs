//! Shards: one glommio executor per core, pinned, each owning a UDP media port and the channels hashed to
//! it. The loop here is the only code that touches the socket and the clock; all decisions are in
//! [`core::ShardCore`].
//!
//! A shard talks to the control thread only by values over bounded flume channels, with `try_send`, so
//! neither side ever waits on the other. The packet path — receive, classify, find the member, check the
//! floor, rewrite, batch, `sendmmsg` — takes no lock and allocates nothing per listener.

pub mod core;
pub mod udp;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glommio::{LocalExecutorBuilder, Placement};
use tracing::{debug, info, warn};

use self::core::{RelayState, ShardConfig, ShardCore, Verdict};
use crate::channel::{MemberKey, SpeakerChange};
use crate::forward::Batch;

/// Number of drop reasons counted per shard.
pub const DROP_REASONS: usize = 9;
/// Capacity of the command channel into a shard.
pub const COMMAND_QUEUE: usize = 8192;

/// Commands from the control thread.
#[derive(Debug)]
pub enum Command {
    AddMember {
        channel: String,
        key: MemberKey,
        name: String,
        addr: SocketAddr,
        ssrc: u32,
    },
    RemoveMember {
        channel: String,
        key: MemberKey,
    },
    Speaker {
        channel: String,
        change: SpeakerChange,
    },
    /// Other nodes' relay addresses for the channel (this shard's index on each node).
    RelayTargets {
        channel: String,
        targets: Vec<SocketAddr>,
    },
    /// Relay addresses of every registered node: the only accepted relay senders.
    RelayPeers {
        peers: Vec<SocketAddr>,
    },
    Stats {
        reply: flume::Sender<ShardStats>,
    },
    Shutdown,
}

/// Events for the control thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    MemberAdded {
        key: MemberKey,
    },
    /// A speaker change reached the shard; `applied` is false when the epoch rules discarded it.
    Applied {
        channel: String,
        epoch: u64,
        applied: bool,
    },
    /// T1: no media from the holder of `epoch`.
    Silence {
        channel: String,
        epoch: u64,
    },
}

/// Counters of one shard (plain integers: only the shard writes them; the control thread gets copies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub shard: usize,
    pub packets_in: u64,
    pub forwarded: u64,
    pub dropped: [u64; DROP_REASONS],
    pub rtcp_in: u64,
    pub send_errors: u64,
    pub send_would_block: u64,
    pub sender_reports: u64,
    pub stale_speaker_changes: u64,
    pub events_lost: u64,
    pub relay_sent: u64,
    pub relay_in: u64,
    pub relay_dropped: [u64; core::RELAY_DROPS],
    pub channels: u64,
    pub members: u64,
}

/// The control thread's handle on a shard.
#[derive(Clone)]
pub struct ShardHandle {
    pub index: usize,
    pub media_addr: SocketAddr,
    /// Where other nodes send this shard relayed media (relay enabled only).
    pub relay_addr: Option<SocketAddr>,
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

/// Binds the socket and starts shard `index` on its own thread, pinned to `cpu` (if given).
pub fn spawn(
    index: usize,
    bind: SocketAddr,
    cpu: Option<usize>,
    config: ShardConfig,
    relay: Option<(SocketAddr, RelayState)>,
    events: flume::Sender<Event>,
) -> std::io::Result<(ShardHandle, std::thread::JoinHandle<()>)> {
    let socket = udp::bind(bind)?;
    let media_addr = socket.local_addr()?.as_socket().unwrap_or(bind);
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
            run(index, socket, relay_socket, core, rx, events).await;
        })
        .map_err(|e| std::io::Error::other(format!("shard {index}: {e}")))?;
    let handle = ShardHandle {
        index,
        media_addr,
        relay_addr,
        commands: tx,
    };
    // glommio's join handle is not std's; wrap it in a thread that waits for it.
    let join = std::thread::Builder::new()
        .name(format!("shard-{index}-join"))
        .spawn(move || {
            let _ = join.join();
        })?;
    Ok((handle, join))
}

async fn run(
    index: usize,
    socket: glommio::net::UdpSocket,
    relay_socket: Option<glommio::net::UdpSocket>,
    core: ShardCore,
    commands: flume::Receiver<Command>,
    events: flume::Sender<Event>,
) {
    let core = Rc::new(RefCell::new(core));
    let socket = Rc::new(socket);
    let relay_socket = relay_socket.map(Rc::new);
    info!(shard = index, addr = ?socket.local_addr().ok(), "shard started");
    let rx = glommio::spawn_local(receive_loop(
        core.clone(),
        socket.clone(),
        relay_socket.clone(),
        Port::Media,
    ))
    .detach();
    let relay_rx = relay_socket.clone().map(|relay| {
        glommio::spawn_local(receive_loop(
            core.clone(),
            socket.clone(),
            Some(relay),
            Port::Relay,
        ))
        .detach()
    });
    let tick =
        glommio::spawn_local(tick_loop(core.clone(), socket.clone(), events.clone())).detach();
    while let Ok(cmd) = commands.recv_async().await {
        if matches!(cmd, Command::Shutdown) {
            break;
        }
        let event = core.borrow_mut().handle_command(cmd, Instant::now());
        if let Some(event) = event {
            send_event(&core, &events, event);
        }
    }
    rx.cancel();
    if let Some(r) = relay_rx {
        r.cancel();
    }
    tick.cancel();
    info!(shard = index, "shard stopped");
}

fn send_event(core: &Rc<RefCell<ShardCore>>, events: &flume::Sender<Event>, event: Event) {
    if events.try_send(event).is_err() {
        core.borrow_mut().count_lost_event();
        warn!("control event queue full: event lost");
    }
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
/// copies leave from the relay socket, which is what the receiving node accepts.
async fn receive_loop(
    core: Rc<RefCell<ShardCore>>,
    media: Rc<glommio::net::UdpSocket>,
    relay: Option<Rc<glommio::net::UdpSocket>>,
    port: Port,
) {
    let (media_fd, relay_fd) = (media.as_raw_fd(), relay.as_ref().map(|r| r.as_raw_fd()));
    let socket = match (port, &relay) {
        (Port::Relay, Some(r)) => r.clone(),
        _ => media.clone(),
    };
    let recv_fd = socket.as_raw_fd();
    let mut first = vec![0u8; udp::RECV_BUF];
    let mut receiver = udp::Receiver::default();
    let mut batch = Batch::default();
    // For each batch entry, which received datagram carries its payload; and that payload's range.
    let mut segment: Vec<u32> = Vec::new();
    let mut ranges: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    let mut sender = udp::Sender::default();
    loop {
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
                Port::Media => core
                    .borrow_mut()
                    .handle_datagram(src, data, now, &mut batch),
                Port::Relay => core
                    .borrow_mut()
                    .handle_relay_datagram(src, data, now, &mut batch),
            };
            let Verdict::Forward(payload) = verdict else {
                continue;
            };
            segment.resize(batch.len(), ranges.len() as u32);
            ranges.push((d, payload));
            if port == Port::Media {
                if let Some(fd) = relay_fd {
                    let c = core.borrow();
                    let out = c.relay_out();
                    if !out.dests.is_empty() {
                        let sent = sender.send_same(fd, &out.data, &out.dests);
                        drop(c);
                        core.borrow_mut().count_relayed(sent.sent);
                    }
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let payloads: Vec<&[u8]> = ranges
            .iter()
            .map(|(d, r)| {
                if *d == 0 {
                    &first[r.clone()]
                } else {
                    &receiver.datagram(d - 1).0[r.clone()]
                }
            })
            .collect();
        let sent = sender.send_fanouts(media_fd, &batch, &segment, &payloads);
        let mut slow = 0;
        if sent.would_block > 0 {
            // The socket buffer is full: wait for room with glommio for the rest of this batch.
            let first_unsent = batch.len() - sent.would_block;
            let mut datagram = Vec::new();
            for i in first_unsent..batch.len() {
                datagram.clear();
                datagram.extend_from_slice(&batch.headers[i]);
                datagram.extend_from_slice(payloads[segment[i] as usize]);
                let dest = raw_to_std(&batch.dests[i]);
                if media.send_to(&datagram, dest).await.is_ok() {
                    slow += 1;
                }
            }
        }
        let mut c = core.borrow_mut();
        c.count_sent(sent.sent + slow, sent.failed + sent.would_block - slow);
        c.count_would_block(sent.would_block);
    }
}

fn raw_to_std(raw: &crate::forward::RawAddr) -> SocketAddr {
    // SAFETY: `storage` holds a sockaddr_in or sockaddr_in6 of length `len`, written by `RawAddr::new`.
    let sa = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            std::ptr::copy_nonoverlapping(
                &raw.storage as *const _ as *const u8,
                storage as *mut u8,
                raw.len as usize,
            );
            *len = raw.len;
            Ok(())
        })
    };
    sa.ok()
        .and_then(|(_, a)| a.as_socket())
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

async fn tick_loop(
    core: Rc<RefCell<ShardCore>>,
    socket: Rc<glommio::net::UdpSocket>,
    events: flume::Sender<Event>,
) {
    let fd = socket.as_raw_fd();
    let tick = core.borrow().config().tick;
    let mut sender = udp::Sender::default();
    let mut out_events = Vec::new();
    let mut reports = Vec::new();
    loop {
        glommio::timer::sleep(tick).await;
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        core.borrow_mut()
            .handle_tick(Instant::now(), unix, &mut out_events, &mut reports);
        for event in out_events.drain(..) {
            send_event(&core, &events, event);
        }
        if !reports.is_empty() {
            let sent = sender.send_each(fd, &reports);
            core.borrow_mut().count_reports(sent.sent);
            reports.clear();
        }
    }
}
