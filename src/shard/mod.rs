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

use self::core::{ShardConfig, ShardCore, Verdict};
use crate::channel::{MemberKey, SpeakerChange};
use crate::forward::Batch;

/// Number of drop reasons counted per shard.
pub const DROP_REASONS: usize = 9;
/// Capacity of the command channel into a shard.
pub const COMMAND_QUEUE: usize = 8192;
/// How often the shard checks T1 and sends sender reports.
const TICK: Duration = Duration::from_millis(50);

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
    pub channels: u64,
    pub members: u64,
}

/// The control thread's handle on a shard.
#[derive(Clone)]
pub struct ShardHandle {
    pub index: usize,
    pub media_addr: SocketAddr,
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
    events: flume::Sender<Event>,
) -> std::io::Result<(ShardHandle, std::thread::JoinHandle<()>)> {
    let socket = udp::bind(bind)?;
    let media_addr = socket.local_addr()?.as_socket().unwrap_or(bind);
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
            run(index, socket, config, rx, events).await;
        })
        .map_err(|e| std::io::Error::other(format!("shard {index}: {e}")))?;
    let handle = ShardHandle {
        index,
        media_addr,
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
    config: ShardConfig,
    commands: flume::Receiver<Command>,
    events: flume::Sender<Event>,
) {
    let core = Rc::new(RefCell::new(ShardCore::new(index, config, Instant::now())));
    let socket = Rc::new(socket);
    info!(shard = index, addr = ?socket.local_addr().ok(), "shard started");
    let rx = glommio::spawn_local(receive_loop(core.clone(), socket.clone())).detach();
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
    tick.cancel();
    info!(shard = index, "shard stopped");
}

fn send_event(core: &Rc<RefCell<ShardCore>>, events: &flume::Sender<Event>, event: Event) {
    if events.try_send(event).is_err() {
        core.borrow_mut().count_lost_event();
        warn!("control event queue full: event lost");
    }
}

/// Receive → decide → send, one datagram at a time; glommio's `recv_from` first tries a non-blocking
/// `recvmsg`, so under load this is a syscall per datagram without a trip through the ring.
async fn receive_loop(core: Rc<RefCell<ShardCore>>, socket: Rc<glommio::net::UdpSocket>) {
    let fd = socket.as_raw_fd();
    let mut buf = vec![0u8; 2048];
    let mut batch = Batch::default();
    let mut sender = udp::Sender::default();
    loop {
        let (len, src) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "recv_from failed");
                continue;
            }
        };
        batch.clear();
        let verdict =
            core.borrow_mut()
                .handle_datagram(src, &buf[..len], Instant::now(), &mut batch);
        if let Verdict::Forward(payload) = verdict {
            if batch.is_empty() {
                continue;
            }
            let sent = sender.send_fanout(fd, &batch, &buf[payload.clone()]);
            let mut slow = 0;
            if sent.would_block > 0 {
                // The socket buffer is full: wait for room with glommio for the rest of this batch.
                let first = batch.len() - sent.would_block;
                for i in first..batch.len() {
                    let mut datagram = batch.headers[i].to_vec();
                    datagram.extend_from_slice(&buf[payload.clone()]);
                    let dest = raw_to_std(&batch.dests[i]);
                    if socket.send_to(&datagram, dest).await.is_ok() {
                        slow += 1;
                    }
                }
            }
            let mut c = core.borrow_mut();
            c.count_sent(sent.sent + slow, sent.failed + sent.would_block - slow);
            c.count_would_block(sent.would_block);
        }
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
    let mut sender = udp::Sender::default();
    let mut out_events = Vec::new();
    let mut reports = Vec::new();
    loop {
        glommio::timer::sleep(TICK).await;
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
