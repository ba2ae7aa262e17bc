//! The shard's I/O shell: one pinned thread that sleeps in one `poll(2)` — on its media socket, its
//! relay socket, its [`Doorbell`] (commands) and its next deadline — then feeds what woke it to the
//! [`ShardCore`] and sends what the core produced. The only code that touches the sockets and the clock.
//!
//! Why not an executor's reactor: at 20 ms per channel a shard wakes for nearly every datagram, so the
//! cost of one wake-up is paid per packet. glommio's reactor cycle (three io_uring rings flushed before
//! and after each sleep, preemption and user timers re-armed, a `membarrier`) measured ≈ 6.5
//! `io_uring_enter` per wake-up here; this loop pays one `poll` and one `recvmmsg`, like the load
//! harness's raw forwarder pays one blocking `recvmmsg` (README, "Shards").

#![warn(missing_docs)]

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use socket2::Socket;
use tracing::{info, warn};

use super::wakeup::{Doorbell, Inbox};
use super::{udp, Command, Event, ShardCore, Verdict};
use crate::forward::Batch;
use crate::peer::webrtc::Transmit;

/// Peers' deadlines are served on a grid this coarse: their timers (DTLS retransmits before a peer
/// settles, consent and reports after) tolerate a few milliseconds of lateness, and peers due in the same
/// slot share one wake-up — 1,600 idle peers each due every ~2.5 s would otherwise wake the shard 640
/// times a second.
pub const TIMER_SLACK: Duration = Duration::from_millis(20);

/// The longest a full socket buffer may hold up the rest of a batch before its datagrams count as failed.
const SEND_STALL: Duration = Duration::from_millis(20);

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

/// Where the payload of a fan-out is.
enum Payload {
    /// A range of received datagram `d` (plain RTP, relay).
    Datagram(usize, std::ops::Range<usize>),
    /// Index into the decrypted packets of WebRTC speakers.
    Shared(usize),
}

/// The receive side's buffers, reused across wake-ups (nothing on the packet path allocates).
#[derive(Default)]
struct Drain {
    receiver: udp::Receiver,
    /// Datagrams the last [`Drain::read`] took, not yet forwarded.
    queued: usize,
    batch: Batch,
    /// For each batch entry, which payload it carries.
    segment: Vec<u32>,
    ranges: Vec<Payload>,
    /// WebRTC speakers' packets, decrypted once and shared by all their listeners' copies.
    shared: Vec<Arc<[u8]>>,
}

impl Drain {
    /// One `recvmmsg` of what `fd` has queued, without waiting.
    fn read(&mut self, fd: std::os::fd::RawFd) {
        self.queued = self.receiver.drain(fd);
    }
}

/// The loop's state beside the core: clocks, scratch buffers, the sender.
struct Io {
    events: flume::Sender<Event>,
    sender: udp::Sender,
    transmits: Vec<Transmit>,
    out_events: Vec<Event>,
    reports: Vec<([u8; crate::rtp::SR_LEN], udp::RawAddr)>,
    /// Origin of the [`TIMER_SLACK`] grid.
    epoch: Instant,
    /// When [`ShardCore::handle_tick`] is next due.
    next_tick: Instant,
    /// Forwarded packets until the next latency sample (the first is, so a quiet node has a figure).
    until_sample: u64,
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
        while let Ok(wake_at) = running.turn(ready) {
            ready = wait(&media, relay.as_ref(), &doorbell, wake_at);
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
        let now = Instant::now();
        let io = Io {
            events,
            sender: udp::Sender::default(),
            transmits: Vec::new(),
            out_events: Vec::new(),
            reports: Vec::new(),
            epoch: now,
            next_tick: now + core.config().tick,
            until_sample: 1,
        };
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
        }
    }

    /// Serves what woke the shard — datagrams, commands, due timers and the tick — and says when it must
    /// wake next.
    fn turn(&mut self, mut ready: Ready) -> Result<Instant, Stop> {
        let now = Instant::now();
        for from_relay in [false, true] {
            let (fd, rx) = match (from_relay, self.relay) {
                (false, _) if ready.media => (self.media.as_raw_fd(), &mut self.media_rx),
                (true, Some(r)) if ready.relay => (r.as_raw_fd(), &mut self.relay_rx),
                _ => continue,
            };
            rx.read(fd);
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
        Ok(if self.retick {
            Instant::now()
        } else {
            core.next_deadline()
                .map_or(io.next_tick, |d| coalesce(d, io.epoch).min(io.next_tick))
        })
    }
}

/// Sleeps until a socket is readable, the doorbell rings or `until`; says which of the three fired.
fn wait(media: &Socket, relay: Option<&Socket>, doorbell: &Doorbell, until: Instant) -> Ready {
    let nap = until.saturating_duration_since(Instant::now());
    let timeout = Timespec {
        tv_sec: nap.as_secs() as _,
        tv_nsec: nap.subsec_nanos() as _,
    };
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

impl Io {
    fn send_event(&mut self, core: &mut ShardCore, event: Event) {
        if self.events.try_send(event).is_err() {
            core.count_lost_event();
            warn!("control event queue full: event lost");
        }
    }

    /// After every input: send what the WebRTC peers produced and pass their events on. True when a
    /// grant was applied and the clock should run [`ShardCore::handle_tick`] now.
    fn flush(&mut self, core: &mut ShardCore, media: &Socket) -> bool {
        core.poll_transmits(&mut self.transmits);
        core.poll_events(&mut self.out_events);
        if !self.transmits.is_empty() {
            let sent = self.sender.send_each(media.as_raw_fd(), &self.transmits);
            core.count_sent(sent.sent, sent.failed + sent.would_block);
            core.count_would_block(sent.would_block);
            self.transmits.clear();
        }
        let mut events = std::mem::take(&mut self.out_events);
        for event in events.drain(..) {
            self.send_event(core, event);
        }
        self.out_events = events;
        core.take_retick()
    }

    /// T1 and sender reports ([`ShardCore::handle_tick`]), and when they are next due.
    fn tick(&mut self, core: &mut ShardCore, media: &Socket, now: Instant) {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let tick = core.config().tick;
        let due = core.handle_tick(now, unix, &mut self.out_events, &mut self.reports);
        self.next_tick = due.map_or(now + tick, |d| {
            d.clamp(now + Duration::from_millis(1), now + tick)
        });
        if !self.reports.is_empty() {
            let sent = self.sender.send_each(media.as_raw_fd(), &self.reports);
            core.count_reports(sent.sent);
            self.reports.clear();
        }
    }

    /// Decide → send, for what [`Drain::read`] took from one socket in one `recvmmsg`: the fan-outs of the
    /// whole batch in `sendmmsg` calls covering all of it — under load a handful of system calls per 33
    /// received datagrams. Listeners always get their packets from the media socket (the address `joined`
    /// announced); relay copies leave from the relay socket, which is what the receiving node accepts.
    /// What the peers produced (a DTLS flight that completes a handshake) leaves before the media sealed
    /// with its keys. True when a grant was applied (see [`Io::flush`]).
    fn forward(
        &mut self,
        core: &mut ShardCore,
        media: &Socket,
        relay: Option<&Socket>,
        rx: &mut Drain,
        from_relay: bool,
        now: Instant,
    ) -> bool {
        let media_fd = media.as_raw_fd();
        let Drain {
            receiver,
            queued,
            batch,
            segment,
            ranges,
            shared,
        } = rx;
        let queued = std::mem::take(queued);
        batch.clear();
        segment.clear();
        ranges.clear();
        shared.clear();
        for d in 0..queued {
            let (data, src) = receiver.datagram(d);
            let Some(src) = src else { continue };
            let verdict = if from_relay {
                core.handle_relay_datagram(src, data, now, batch)
            } else {
                core.handle_datagram(src, data, now, batch)
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
        if let (Some(r), false) = (relay, batch.relay.is_empty()) {
            let sent = udp::send_relay(&mut self.sender, r.as_raw_fd(), &batch.relay);
            core.count_relayed(sent.sent);
        }
        let retick = self.flush(core, media);
        if !batch.sealed.is_empty() {
            let sent = udp::send_sealed(&mut self.sender, media_fd, &batch.sealed);
            core.count_sent(sent.sent, sent.failed + sent.would_block);
            core.count_media(sent.sent);
            core.count_would_block(sent.would_block);
        }
        if !batch.is_empty() {
            let payloads: Vec<&[u8]> = ranges
                .iter()
                .map(|p| match p {
                    Payload::Datagram(d, r) => &receiver.datagram(*d).0[r.clone()],
                    Payload::Shared(i) => &shared[*i][..],
                })
                .collect();
            let sent = udp::send_fanouts(&mut self.sender, media_fd, batch, segment, &payloads);
            let mut late = 0;
            if sent.would_block > 0 {
                late = send_late(media, batch, segment, &payloads, sent.would_block);
            }
            core.count_sent(sent.sent + late, sent.failed + sent.would_block - late);
            core.count_media(sent.sent + late);
            core.count_would_block(sent.would_block);
        }
        self.sample_latency(core, now, ranges.len());
        retick
    }

    /// After a batch's last `sendmmsg`: when about
    /// [`FORWARD_LATENCY_SAMPLE`](crate::metrics::buckets::FORWARD_LATENCY_SAMPLE) packets have been
    /// forwarded since the last sample, the time since the wake-up that read this batch goes into the
    /// forwarding-latency histogram (the batch's packets all waited at least that long for their last
    /// copy to leave).
    fn sample_latency(&mut self, core: &mut ShardCore, woke: Instant, forwarded: usize) {
        let n = forwarded as u64;
        if n == 0 {
            return;
        }
        if n < self.until_sample {
            self.until_sample -= n;
            return;
        }
        self.until_sample = crate::metrics::buckets::FORWARD_LATENCY_SAMPLE;
        let ns = u64::try_from(woke.elapsed().as_nanos()).unwrap_or(u64::MAX);
        core.sample_forward_latency(ns);
    }
}

/// The socket buffer was full: the batch's last `unsent` copies wait for room, one at a time, at most
/// [`SEND_STALL`] in all (the shard's other members wait meanwhile, so the wait is bounded). Returns how
/// many left.
fn send_late(
    media: &Socket,
    batch: &Batch,
    segment: &[u32],
    payloads: &[&[u8]],
    unsent: usize,
) -> usize {
    let give_up = Instant::now() + SEND_STALL;
    let mut datagram = Vec::new();
    let mut sent = 0;
    for i in batch.len() - unsent..batch.len() {
        datagram.clear();
        datagram.extend_from_slice(&batch.headers[i]);
        datagram.extend_from_slice(payloads[segment[i] as usize]);
        let dest = socket2::SockAddr::from(batch.dests[i].to_socket_addr());
        loop {
            match media.send_to(&datagram, &dest) {
                Ok(_) => {
                    sent += 1;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let nap = give_up.saturating_duration_since(Instant::now());
                    if nap.is_zero() {
                        return sent;
                    }
                    let timeout = Timespec {
                        tv_sec: 0,
                        tv_nsec: nap.subsec_nanos() as _,
                    };
                    let mut fds = [PollFd::new(media, PollFlags::OUT)];
                    let _ = poll(&mut fds, Some(&timeout));
                }
                Err(_) => break,
            }
        }
    }
    sent
}

#[cfg(test)]
mod tests;
