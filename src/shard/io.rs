//! The shard loop's state beside its core ([`Io`]): the receive buffers ([`Drain`]), the sender, and
//! what one turn does with them — forward what a `recvmmsg` read (decide, then `sendmmsg` the whole
//! batch), flush what the WebRTC peers produced, run the tick. [`super::runner`] decides when.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use socket2::Socket;
use tracing::warn;

use super::{udp, Event, ShardCore, Verdict};
use crate::forward::Batch;
use crate::peer::webrtc::Transmit;

/// The longest a full socket buffer may hold up the rest of a batch before its datagrams count as failed.
const SEND_STALL: Duration = Duration::from_millis(20);

/// Where the payload of a fan-out is.
enum Payload {
    /// A range of received datagram `d` (plain RTP, relay).
    Datagram(usize, std::ops::Range<usize>),
    /// Index into the decrypted packets of WebRTC speakers.
    Shared(usize),
}

/// The receive side's buffers, reused across wake-ups (nothing on the packet path allocates).
#[derive(Default)]
pub(super) struct Drain {
    receiver: udp::Receiver,
    /// Datagrams the last [`Drain::read`] took (what [`Io::forward`] forwards).
    queued: usize,
    batch: Batch,
    /// For each batch entry, which payload it carries.
    segment: Vec<u32>,
    ranges: Vec<Payload>,
    /// WebRTC speakers' packets, decrypted once and shared by all their listeners' copies.
    shared: Vec<Arc<[u8]>>,
}

impl Drain {
    /// How many datagrams the last [`Drain::read`] took (tests).
    #[cfg(test)]
    pub(super) fn read_last(&self) -> usize {
        self.queued
    }

    /// The most datagrams one [`Drain::read`] takes.
    pub(super) fn capacity(&self) -> usize {
        self.receiver.capacity()
    }

    /// One `recvmmsg` of what `fd` has queued, without waiting; how many datagrams it read.
    pub(super) fn read(&mut self, fd: std::os::fd::RawFd) -> usize {
        self.queued = self.receiver.drain(fd);
        self.queued
    }
}

/// The loop's state beside the core: clocks, scratch buffers, the sender.
pub(super) struct Io {
    events: flume::Sender<Event>,
    sender: udp::Sender,
    transmits: Vec<Transmit>,
    out_events: Vec<Event>,
    reports: Vec<([u8; crate::rtp::SR_LEN], udp::RawAddr)>,
    /// Origin of the [`TIMER_SLACK`](super::runner::TIMER_SLACK) grid.
    pub(super) epoch: Instant,
    /// When [`ShardCore::handle_tick`] is next due.
    pub(super) next_tick: Instant,
    /// Forwarded packets until the next latency sample (the first is, so a quiet node has a figure).
    until_sample: u64,
}

impl Io {
    /// The state of a shard starting at `now`, whose events go to `events`.
    pub(super) fn new(events: flume::Sender<Event>, tick: Duration, now: Instant) -> Self {
        Io {
            events,
            sender: udp::Sender::default(),
            transmits: Vec::new(),
            out_events: Vec::new(),
            reports: Vec::new(),
            epoch: now,
            next_tick: now + tick,
            until_sample: 1,
        }
    }

    /// Passes an event to the control thread (a full queue loses it, counted).
    pub(super) fn send_event(&mut self, core: &mut ShardCore, event: Event) {
        if self.events.try_send(event).is_err() {
            core.count_lost_event();
            warn!("control event queue full: event lost");
        }
    }

    /// After every input: send what the WebRTC peers produced and pass their events on. True when a
    /// grant was applied and the clock should run [`ShardCore::handle_tick`] now.
    pub(super) fn flush(&mut self, core: &mut ShardCore, media: &Socket) -> bool {
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
    pub(super) fn tick(&mut self, core: &mut ShardCore, media: &Socket, now: Instant) {
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
    pub(super) fn forward(
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
        let queued = *queued;
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
                    let timeout = timespec(nap);
                    let mut fds = [PollFd::new(media, PollFlags::OUT)];
                    let _ = poll(&mut fds, Some(&timeout));
                }
                Err(_) => break,
            }
        }
    }
    sent
}

/// A `poll(2)` timeout of `d`.
pub(super) fn timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: d.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: d.subsec_nanos().into(),
    }
}
