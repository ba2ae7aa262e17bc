//! The shard's I/O shell: one pinned thread that sleeps in one `poll(2)` — on its media socket, its
//! relay socket, its [`Doorbell`] (commands) and its next deadline — then feeds what woke it to the
//! [`ShardCore`] and sends what the core produced. The only code that touches the sockets and the clock.
//!
//! Why not an executor's reactor: at 20 ms per channel a shard wakes for nearly every datagram, so the
//! cost of one wake-up is paid per packet. glommio's reactor cycle (three io_uring rings flushed before
//! and after each sleep, preemption and user timers re-armed, a `membarrier`) measured ≈ 6.5
//! `io_uring_enter` per wake-up here; this loop pays one `poll` and one `recvmmsg`, like the load
//! harness's raw forwarder pays one blocking `recvmmsg` (README, "Shards"). Under load it pays even
//! less: it gathers datagrams for a window ([`ShardConfig::batch_window`](super::ShardConfig)) and reads
//! them in one go; and while no floor is held on the shard, what arrives (keep-alives, reports) waits a
//! longer quiet window ([`ShardConfig::quiet_window`](super::ShardConfig)). What a turn does with its
//! sockets is in `shard/io.rs`.

#![warn(missing_docs)]

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use socket2::Socket;
use tracing::{info, warn};

use super::io::{timespec, Drain, Io};
use super::wakeup::{Doorbell, Inbox};
use super::{Command, Event, ShardCore};

/// Peers' deadlines are served on a grid this coarse: their timers (DTLS retransmits before a peer
/// settles, consent and reports after) tolerate a few milliseconds of lateness, and peers due in the same
/// slot share one wake-up — 1,600 idle peers each due every ~2.5 s would otherwise wake the shard 640
/// times a second.
pub const TIMER_SLACK: Duration = Duration::from_millis(20);

/// `at` rounded up to the next [`TIMER_SLACK`] boundary (since `epoch`).
pub fn coalesce(at: Instant, epoch: Instant) -> Instant {
    let slack = TIMER_SLACK.as_nanos();
    let since = at.saturating_duration_since(epoch).as_nanos();
    let slots = since.div_ceil(slack);
    epoch + Duration::from_nanos(u64::try_from(slots * slack).unwrap_or(u64::MAX))
}

/// What a shard thread runs with: its core, sockets and the queues to and from the control thread.
pub struct Shard {
    /// The shard's index (logs).
    pub index: usize,
    /// The sans-IO core.
    pub core: ShardCore,
    /// Members' media (and WebRTC signalling datagrams) arrive here; every listener's copy leaves here.
    pub media: Socket,
    /// Other nodes' relayed media arrive here and relay copies leave here; `None` without a cluster.
    pub relay: Option<Socket>,
    /// Commands from the control thread.
    pub commands: flume::Receiver<Command>,
    /// Events to the control thread (`try_send`: a full queue loses the event, counted).
    pub events: flume::Sender<Event>,
    /// Rung by the commands' and the fault's senders.
    pub doorbell: Arc<Doorbell>,
    /// Testing only (`--fault-injection`): a message makes the shard panic.
    pub fault: Option<flume::Receiver<()>>,
}

/// The control thread's side of the loop: the commands' inbox and the doorbell that says it has mail.
struct Commands<'a> {
    index: usize,
    doorbell: &'a Doorbell,
    waker: std::task::Waker,
    inbox: Inbox<'a, Command>,
    fault: Option<Inbox<'a, ()>>,
}

/// [`Command::Shutdown`] arrived or the control thread is gone.
struct Stop;

impl Commands<'_> {
    /// Applies everything queued (and arms the doorbell for the next command).
    fn apply(&mut self, core: &mut ShardCore, io: &mut Io, media: &Socket) -> Result<bool, Stop> {
        self.doorbell.answer();
        if let Some(f) = self.fault.as_mut() {
            if let Ok(Some(())) = f.take(&self.waker) {
                panic!("fault injection: shard {} was told to panic", self.index);
            }
        }
        let mut retick = false;
        loop {
            match self.inbox.take(&self.waker) {
                Ok(Some(Command::Shutdown)) | Err(_) => return Err(Stop),
                Ok(Some(cmd)) => {
                    if let Some(event) = core.handle_command(cmd, Instant::now()) {
                        io.send_event(core, event);
                    }
                    retick |= io.flush(core, media);
                }
                Ok(None) => return Ok(retick),
            }
        }
    }
}

impl Shard {
    /// Runs until [`Command::Shutdown`] or until the control thread drops its sender.
    pub fn run(self) {
        let Shard {
            index,
            core,
            media,
            relay,
            commands,
            events,
            doorbell,
            fault,
        } = self;
        info!(shard = index, addr = ?media.local_addr().ok().and_then(|a| a.as_socket()), "shard started");
        let mut running = Running::new(
            index,
            core,
            &media,
            relay.as_ref(),
            &doorbell,
            &commands,
            events,
            fault.as_ref(),
        );
        // Commands queued before the loop started (and arming the doorbell).
        let mut ready = Ready {
            media: false,
            relay: false,
            ring: true,
        };
        while let Ok(next) = running.turn(ready) {
            ready = match next.gather_until {
                Some(until) => gather(&doorbell, relay.is_some(), until.min(next.wake_at)),
                None => wait(&media, relay.as_ref(), &doorbell, next.wake_at),
            };
        }
        info!(shard = index, "shard stopped");
    }
}

/// What woke the shard: readable sockets, the doorbell.
#[derive(Debug, Clone, Copy)]
struct Ready {
    media: bool,
    relay: bool,
    ring: bool,
}

/// How a turn wants the shard to wait.
#[derive(Debug, Clone, Copy)]
struct Next {
    /// The next deadline (timers, tick), or now.
    wake_at: Instant,
    /// Busy: sleep until then whatever arrives (commands excepted), then read the sockets — see
    /// [`ShardConfig::batch_window`](super::ShardConfig::batch_window). Now when the last read filled its
    /// buffers (more is queued: a window's wait would cap the shard at one batch per window).
    gather_until: Option<Instant>,
}

/// A running shard between two waits: its core, what it borrows of the [`Shard`], its buffers.
struct Running<'a> {
    core: ShardCore,
    media: &'a Socket,
    relay: Option<&'a Socket>,
    commands: Commands<'a>,
    io: Io,
    media_rx: Drain,
    relay_rx: Drain,
    /// A grant was applied: [`ShardCore::handle_tick`] runs at once.
    retick: bool,
    /// When a turn last read a datagram.
    last_read: Option<Instant>,
    /// Datagrams come closer than the batch window: the shard gathers them (see [`Next`]).
    gathering: bool,
}

impl<'a> Running<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        index: usize,
        core: ShardCore,
        media: &'a Socket,
        relay: Option<&'a Socket>,
        doorbell: &'a Arc<Doorbell>,
        commands: &'a flume::Receiver<Command>,
        events: flume::Sender<Event>,
        fault: Option<&'a flume::Receiver<()>>,
    ) -> Self {
        let io = Io::new(events, core.config().tick, Instant::now());
        Running {
            core,
            media,
            relay,
            commands: Commands {
                index,
                doorbell,
                waker: doorbell.waker(),
                inbox: Inbox::new(commands),
                fault: fault.map(Inbox::new),
            },
            io,
            media_rx: Drain::default(),
            relay_rx: Drain::default(),
            retick: false,
            last_read: None,
            gathering: false,
        }
    }

    /// Serves what woke the shard — datagrams, commands, due timers and the tick — and says when and how
    /// it must wake next.
    fn turn(&mut self, mut ready: Ready) -> Result<Next, Stop> {
        let now = Instant::now();
        let mut read = 0;
        // A read that filled its buffers left more queued: the next one must not wait a window.
        let mut full = false;
        for from_relay in [false, true] {
            let (fd, rx) = match (from_relay, self.relay) {
                (false, _) if ready.media => (self.media.as_raw_fd(), &mut self.media_rx),
                (true, Some(r)) if ready.relay => (r.as_raw_fd(), &mut self.relay_rx),
                _ => continue,
            };
            let n = rx.read(fd);
            read += n;
            full |= n == rx.capacity();
            // Commands before the datagrams just read: a command queued before a datagram arrived must
            // meet it — a grant's command is queued before the member can hear of the grant and send.
            // The queue is looked at after `recvmmsg`, so a command queued before these datagrams came
            // is seen, even when `poll` returned before the doorbell rang.
            if ready.ring || !self.commands.inbox.is_empty() {
                ready.ring = false;
                self.retick |= self
                    .commands
                    .apply(&mut self.core, &mut self.io, self.media)?;
            }
            self.retick |=
                self.io
                    .forward(&mut self.core, self.media, self.relay, rx, from_relay, now);
        }
        if ready.ring {
            self.retick |= self
                .commands
                .apply(&mut self.core, &mut self.io, self.media)?;
        }
        let (core, io, media) = (&mut self.core, &mut self.io, self.media);
        if core.next_deadline().is_some_and(|d| d <= now) {
            core.handle_timers(now);
            self.retick |= io.flush(core, media);
        }
        if std::mem::take(&mut self.retick) || now >= io.next_tick {
            io.tick(core, media, now);
            self.retick |= io.flush(core, media);
        }
        let wake_at = if self.retick {
            Instant::now()
        } else {
            core.next_deadline()
                .map_or(io.next_tick, |d| coalesce(d, io.epoch).min(io.next_tick))
        };
        Ok(Next {
            wake_at,
            gather_until: self.gather(now, read, full),
        })
    }

    /// Whether to gather the next datagrams for a window rather than wake for each, and until when.
    ///
    /// Busy ([`ShardConfig::batch_window`](super::ShardConfig::batch_window)): from the second of two
    /// reads closer than the window, for as long as every window brings something. Under load a wake-up
    /// (a `poll`, a `recvmmsg`, a round of `sendmmsg`) is then paid per window, not per datagram.
    ///
    /// Quiet ([`ShardConfig::quiet_window`](super::ShardConfig::quiet_window)): while no floor is held on
    /// the shard nothing that arrives is media to forward — keep-alives, reports, consent checks,
    /// handshakes, a member's audio without the floor — and none of it needs an answer within
    /// milliseconds, so after a read the shard sleeps the (longer) quiet window, for as long as windows
    /// bring something. That is the whole cost of an idle shard: 8,000 plain members' keep-alives woke it
    /// 2,000 times a second. A grant arrives as a command, whose doorbell ends the sleep, so the first
    /// packet of a burst is never held back.
    ///
    /// After a read that filled its buffers (`full`), at once: more is queued.
    fn gather(&mut self, now: Instant, read: usize, full: bool) -> Option<Instant> {
        let config = self.core.config();
        let (window, quiet) = (config.batch_window, config.quiet_window);
        if read == 0 {
            self.gathering = false;
            return None;
        }
        let until = |window: Duration| if full { now } else { now + window };
        let close = self
            .last_read
            .is_some_and(|t| now.saturating_duration_since(t) < window);
        self.last_read = Some(now);
        // Quiet first: idle traffic comes closer than the busy window too (8,000 keep-alives every 4 s
        // are two a millisecond), and would otherwise keep the shard waking every window.
        if !quiet.is_zero() && !self.core.floor_held() {
            self.gathering = false;
            return Some(until(quiet));
        }
        if window.is_zero() {
            return None;
        }
        self.gathering |= close;
        self.gathering.then(|| until(window))
    }
}

/// Sleeps until `until` or the doorbell, whichever first, while datagrams gather in the sockets' queues;
/// then both sockets are read (a `recvmmsg` that finds nothing costs less than a wake-up per datagram).
fn gather(doorbell: &Doorbell, relay: bool, until: Instant) -> Ready {
    let nap = until.saturating_duration_since(Instant::now());
    let timeout = timespec(nap);
    let mut fds = [PollFd::new(doorbell, PollFlags::IN)];
    let ring = !matches!(poll(&mut fds, Some(&timeout)), Ok(0));
    Ready {
        media: true,
        relay,
        ring,
    }
}

/// Sleeps until a socket is readable, the doorbell rings or `until`; says which of the three fired.
fn wait(media: &Socket, relay: Option<&Socket>, doorbell: &Doorbell, until: Instant) -> Ready {
    let nap = until.saturating_duration_since(Instant::now());
    let timeout = timespec(nap);
    let mut fds = [
        PollFd::new(media, PollFlags::IN),
        PollFd::new(doorbell, PollFlags::IN),
        PollFd::new(relay.unwrap_or(media), PollFlags::IN),
    ];
    let n = if relay.is_some() { 3 } else { 2 };
    match poll(&mut fds[..n], Some(&timeout)) {
        Ok(0) => Ready {
            media: false,
            relay: false,
            ring: false,
        },
        Ok(_) => {
            let ready = |fd: &PollFd<'_>| !fd.revents().is_empty();
            Ready {
                media: ready(&fds[0]),
                relay: n == 3 && ready(&fds[2]),
                ring: ready(&fds[1]),
            }
        }
        // EINTR: look at everything once; the sockets are non-blocking.
        Err(_) => Ready {
            media: true,
            relay: relay.is_some(),
            ring: true,
        },
    }
}

#[cfg(test)]
mod tests;
