//! Shards: one thread per core, pinned, each owning a UDP media port and the channels hashed to it. The
//! [`runner`] is the I/O shell: the only code that touches the sockets and the clock, one `poll(2)` per
//! wake-up. All decisions are in [`engine::ShardCore`]; the values that cross to the control thread are
//! in [`command`] and [`stats`], which both sides import (the engine never imports this shell).
//!
//! A shard talks to the control thread only by values over bounded flume channels, with `try_send`, so
//! neither side ever waits on the other. The packet path — receive, classify, find the member, check the
//! floor, rewrite, batch, `sendmmsg` — takes no lock and allocates nothing per listener.

#![warn(missing_docs)]

pub mod command;
pub mod engine;
mod io;
pub mod runner;
pub mod stats;
pub mod timers;
pub mod udp;
pub mod wakeup;

use std::net::SocketAddr;
use std::time::Instant;

use tracing::warn;

use self::runner::Shard;
use self::wakeup::Doorbell;

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

/// Binds the socket and starts shard `index` on its own thread (named `shard-<index>-<core>`), pinned to
/// `cpu` (if given). The returned thread ends when the shard does: `Err` with the panic's message if it
/// panicked. `fault` is testing only (`--fault-injection`): a message on it makes the shard panic.
pub fn spawn(
    index: usize,
    bind: SocketAddr,
    cpu: Option<usize>,
    mut config: ShardConfig,
    relay: Option<(SocketAddr, RelayState)>,
    events: flume::Sender<Event>,
    fault: Option<flume::Receiver<()>>,
) -> std::io::Result<(ShardHandle, std::thread::JoinHandle<Result<(), String>>)> {
    let media = udp::bind(bind)?;
    let media_addr = media.local_addr()?.as_socket().unwrap_or(bind);
    if let Some(w) = config.webrtc.as_mut() {
        w.candidate.set_port(media_addr.port());
    }
    let (relay_socket, relay_addr, relay_state) = match relay {
        Some((relay_bind, state)) => {
            let s = udp::bind(relay_bind)?;
            let addr = s.local_addr()?.as_socket().unwrap_or(relay_bind);
            (Some(s), Some(addr), Some(state))
        }
        None => (None, None, None),
    };
    let (tx, rx) = flume::bounded(COMMAND_QUEUE);
    let doorbell = Doorbell::new()?;
    let name = format!("shard-{index}-{}", cpu.unwrap_or(index));
    let join = std::thread::Builder::new().name(name).spawn(move || {
        if let Some(cpu) = cpu {
            pin_to(cpu, index);
        }
        let shard = Shard {
            index,
            core: ShardCore::with_relay(index, config, relay_state, Instant::now()),
            media,
            relay: relay_socket,
            commands: rx,
            events,
            doorbell,
            fault,
        };
        // A panic is the node's to report and act on: say how the shard ended.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.run())).map_err(|p| {
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panicked".to_string())
        })
    })?;
    let handle = ShardHandle {
        index,
        media_addr,
        relay_addr,
        commands: tx,
    };
    Ok((handle, join))
}

/// Pins the calling thread to `cpu`; a shard that cannot be pinned still runs (and says so).
fn pin_to(cpu: usize, index: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        warn!(shard = index, cpu, error = %e, "cannot pin the shard to its core");
    }
}
