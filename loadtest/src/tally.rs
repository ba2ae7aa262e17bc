//! What a listener received, accounted: one [`Tally`] per receiving thread (each plain-RTP receiver and
//! the WebRTC engine) owns its listeners' stream state, so the hot path shares nothing; it ships interval
//! reports (histograms + counters) to the coordinator about once a second and a final one, with the
//! per-stream sequence totals, whenever the phase number changes.
//!
//! The receive time is taken by the caller right after the receive syscall; the accounting itself —
//! stamps, sequence numbers, the protocol v1 checks at a listener — is here, without I/O, so it is tested
//! on hand-made packets.
//!
//! What counts as a **delivery** is strict: a stamped RTP packet from this phase's target, for this
//! listener's channel, not the listener's own audio, and the first copy of what its speaker sent (by
//! speaker, spurt and packet number from the stamp — see `seen.rs` — never by the sequence number the
//! server rewrote). Echoes and misrouted packets are violations, repeats are `duplicates`; neither is a
//! delivery, so neither can hide a loss.

use crate::model::{ChannelShared, Member, Target, TargetCell};
use crate::seen::Seen;
use crate::seq::{SeqEvent, SeqTotals, SeqTracker};
use crate::stamp::{parse_datagram, Datagram, RtpHeader, Stamp};
use crate::stats::LatencyHist;
use crate::sys::mono_ns;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

/// Counters of one interval or phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RecvCounters {
    /// RTP packets from the current target carrying our stamp, whatever they turn out to be.
    pub packets: u64,
    /// First copies of what a speaker of the listener's channel sent to it: what counts as delivered.
    pub delivered: u64,
    /// Copies of a packet the listener already had (same speaker, spurt and packet number).
    pub duplicates: u64,
    pub bytes: u64,
    /// The server's own RTCP (sender reports).
    pub rtcp: u64,
    /// Datagrams without our stamp.
    pub foreign: u64,
    /// From an address that is not this phase's target (late packets of the previous phase).
    pub stray: u64,
    /// Protocol v1 violations: the listener's own audio, another channel's (checked on every target's
    /// streams), and on the server's streams the header rules (SSRC and payload type from `joined`,
    /// marker on a new speaker's first packet, timestamps never going back).
    pub echo: u64,
    pub misrouted: u64,
    pub ssrc_mismatch: u64,
    pub pt_mismatch: u64,
    pub marker_missing: u64,
    pub ts_backwards: u64,
    pub switches: u64,
}

impl RecvCounters {
    pub fn add(&mut self, o: &RecvCounters) {
        self.packets += o.packets;
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.bytes += o.bytes;
        self.rtcp += o.rtcp;
        self.foreign += o.foreign;
        self.stray += o.stray;
        self.echo += o.echo;
        self.misrouted += o.misrouted;
        self.ssrc_mismatch += o.ssrc_mismatch;
        self.pt_mismatch += o.pt_mismatch;
        self.marker_missing += o.marker_missing;
        self.ts_backwards += o.ts_backwards;
        self.switches += o.switches;
    }

    /// Violations of protocol v1 seen at listeners.
    pub fn violations(&self) -> u64 {
        self.echo
            + self.misrouted
            + self.ssrc_mismatch
            + self.pt_mismatch
            + self.marker_missing
            + self.ts_backwards
    }
}

/// What a receiver thread ships to the coordinator.
#[derive(Debug, Clone)]
pub struct RecvReport {
    /// The phase number (as set in `RecvShared::phase`) these samples belong to.
    pub phase: u32,
    /// The last report of this phase from this thread (carries `seq`).
    pub last: bool,
    pub latency: LatencyHist,
    pub switch: LatencyHist,
    pub counters: RecvCounters,
    pub seq: SeqTotals,
}

/// State shared with the coordinator.
pub struct RecvShared {
    pub members: Arc<Vec<Member>>,
    pub channels: Arc<Vec<ChannelShared>>,
    pub target: Arc<TargetCell>,
    /// Bumped by the coordinator at every phase boundary.
    pub phase: AtomicU32,
    pub stop: AtomicBool,
    /// Deliveries so far, all phases (for the live progress line; reports carry the exact counts).
    pub delivered: AtomicU64,
}

/// One listener's stream state.
#[derive(Default, Clone)]
struct Listener {
    seq: SeqTracker,
    seen: Seen,
    last_spurt: u32,
    last_ts: Option<u32>,
}

/// The current interval's samples.
#[derive(Default)]
struct Books {
    latency: LatencyHist,
    switch: LatencyHist,
    c: RecvCounters,
}

/// One receiving thread's accounting: its listeners' stream state, the current interval's samples, and
/// the phase bookkeeping (an interval report about once a second, a final one when the phase changes).
/// The plain-RTP receiver threads and the WebRTC engine each own one.
pub struct Tally {
    shared: Arc<RecvShared>,
    out: Sender<RecvReport>,
    /// Indexed by member (entries of other threads' members stay unused: simpler than a map).
    listeners: Vec<Listener>,
    phase: u32,
    books: Books,
    last_report: u64,
    /// Deliveries of this interval already added to `shared.delivered`.
    published: u64,
}

impl Tally {
    pub fn new(shared: Arc<RecvShared>, out: Sender<RecvReport>) -> Tally {
        Tally {
            listeners: vec![Listener::default(); shared.members.len()],
            phase: shared.phase.load(Ordering::Acquire),
            shared,
            out,
            books: Books::default(),
            last_report: mono_ns(),
            published: 0,
        }
    }

    /// Close a finished phase *before* touching new datagrams (the coordinator flips the phase after the
    /// old one drained and before the new one's first packet is sent). Returns `true` when told to stop.
    pub fn poll_phase(&mut self) -> bool {
        let p = self.shared.phase.load(Ordering::Acquire);
        let stop = self.shared.stop.load(Ordering::Acquire);
        if p != self.phase || stop {
            self.flush(true);
            self.phase = p;
        }
        stop
    }

    /// Ship an interval report when the last one is a second old; publish progress.
    pub fn tick(&mut self) {
        self.publish();
        if mono_ns() - self.last_report > 1_000_000_000 {
            self.flush(false);
        }
    }

    fn publish(&mut self) {
        let d = self.books.c.delivered;
        self.shared
            .delivered
            .fetch_add(d - self.published, Ordering::Relaxed);
        self.published = d;
    }

    fn flush(&mut self, last: bool) {
        self.publish();
        self.published = 0;
        let mut seq = SeqTotals::default();
        if last {
            for l in self.listeners.iter_mut() {
                seq.add(&l.seq.totals());
                *l = Listener::default();
            }
        }
        let b = std::mem::take(&mut self.books);
        let _ = self.out.send(RecvReport {
            phase: self.phase,
            last,
            latency: b.latency,
            switch: b.switch,
            counters: b.c,
            seq,
        });
        self.last_report = mono_ns();
    }

    /// A datagram received by member `m` at `now` (plain RTP, RTCP or anything else).
    pub fn datagram(&mut self, m: usize, src: SocketAddr, buf: &[u8], now: u64) {
        let (header, payload) = match parse_datagram(buf) {
            Datagram::Rtp { header, payload } => (header, payload),
            Datagram::Rtcp => {
                self.books.c.rtcp += 1;
                return;
            }
            Datagram::Other => {
                self.books.c.foreign += 1;
                return;
            }
        };
        let target = self.shared.target.get();
        let expected_src = match target {
            Target::Server => self.shared.members[m].server_addr,
            Target::Raw(a) => a,
        };
        if src != expected_src {
            self.books.c.stray += 1;
            return;
        }
        self.rtp(m, target == Target::Server, header, payload, buf.len(), now);
    }

    /// An RTP packet that reached member `m` from the server, already authenticated and decrypted (a
    /// WebRTC leg): `len` is what it weighed on the wire.
    pub fn server_rtp(
        &mut self,
        m: usize,
        header: RtpHeader,
        payload: &[u8],
        len: usize,
        now: u64,
    ) {
        if self.shared.target.get() != Target::Server {
            self.books.c.stray += 1;
            return;
        }
        self.rtp(m, true, header, payload, len, now);
    }

    /// A datagram that was not ours at all.
    pub fn foreign(&mut self) {
        self.books.c.foreign += 1;
    }

    /// Account one RTP packet of `len` bytes on the wire for member `m`, from the current target
    /// (`server`: talkgroup, whose headers are also checked against protocol v1).
    fn rtp(
        &mut self,
        m: usize,
        server: bool,
        header: RtpHeader,
        payload: &[u8],
        len: usize,
        now: u64,
    ) {
        let Tally {
            shared,
            listeners,
            books: b,
            ..
        } = self;
        let (me, l, c) = (&shared.members[m], &mut listeners[m], &mut b.c);
        let Some(st) = Stamp::parse(payload) else {
            c.foreign += 1;
            return;
        };
        c.packets += 1;
        c.bytes += len as u64;
        // The stream as the listener sees it: sequence accounting and header rules, once per wire packet.
        let ev = l.seq.on_packet(header.seq);
        if server && ev != SeqEvent::Duplicate {
            if header.ssrc != me.ssrc {
                c.ssrc_mismatch += 1;
            }
            if header.payload_type != me.payload_type {
                c.pt_mismatch += 1;
            }
            if matches!(
                ev,
                SeqEvent::InOrder | SeqEvent::Gap { .. } | SeqEvent::First
            ) {
                if l.last_ts
                    .is_some_and(|prev| (header.timestamp.wrapping_sub(prev) as i32) < 0)
                {
                    c.ts_backwards += 1;
                }
                l.last_ts = Some(header.timestamp);
            }
        }
        // What it carries: only a first copy of a channel-mate's audio is a delivery.
        if st.channel != me.channel {
            c.misrouted += 1;
            return;
        }
        if st.speaker == me.slot {
            c.echo += 1;
            return;
        }
        if !l.seen.first_time(st.speaker, st.spurt, st.seq) {
            c.duplicates += 1;
            return;
        }
        c.delivered += 1;
        b.latency.record(now.saturating_sub(st.sched_ns));
        if st.spurt != l.last_spurt {
            // First packet of a new speaker at this listener.
            if server && l.last_spurt != 0 && ev == SeqEvent::InOrder && !header.marker {
                c.marker_missing += 1;
            }
            l.last_spurt = st.spurt;
            if let Some(ch) = shared.channels.get(st.channel as usize) {
                if ch.next_spurt.load(Ordering::Acquire) == st.spurt {
                    let from = ch.switch_from_ns.swap(0, Ordering::AcqRel);
                    if from != 0 && now > from {
                        b.switch.record(now - from);
                        c.switches += 1;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver};

    const SERVER: &str = "127.0.0.1:40000";

    /// A tally for three members of channel 0, listening to the server.
    fn tally() -> (Tally, Receiver<RecvReport>) {
        let members = (0..3u16)
            .map(|s| Member {
                channel: 0,
                slot: s,
                addr: "127.0.0.1:1".parse().unwrap(),
                server_addr: SERVER.parse().unwrap(),
                ssrc: 100 + s as u32,
                payload_type: 111,
                webrtc: false,
            })
            .collect();
        let shared = Arc::new(RecvShared {
            members: Arc::new(members),
            channels: Arc::new(vec![ChannelShared::new()]),
            target: Arc::new(TargetCell::new(None)),
            phase: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
        });
        let (tx, rx) = channel();
        (Tally::new(shared, tx), rx)
    }

    /// An RTP packet: header (`seq`, `ts`, `marker`, `ssrc`) and stamp (`st`).
    fn pkt(seq: u16, ts: u32, marker: bool, ssrc: u32, st: Stamp) -> Vec<u8> {
        let mut b = vec![0u8; 12 + 60];
        RtpHeader {
            marker,
            payload_type: 111,
            seq,
            timestamp: ts,
            ssrc,
        }
        .write(&mut b);
        st.write(&mut b[12..]);
        b
    }

    /// Packet `n` of `speaker`'s spurt `spurt` on `channel`, scheduled at `sched`.
    fn stamp(channel: u32, speaker: u16, spurt: u32, n: u32, sched: u64) -> Stamp {
        Stamp {
            channel,
            speaker,
            spurt,
            seq: n,
            sched_ns: sched,
        }
    }

    #[test]
    fn accounting_of_a_listener_stream() {
        let (mut t, _rx) = tally();
        let server: SocketAddr = SERVER.parse().unwrap();
        let feed = |t: &mut Tally, b: Vec<u8>, now: u64| t.datagram(1, server, &b, now);
        feed(
            &mut t,
            pkt(10, 0, true, 101, stamp(0, 0, 1, 0, 1_000)),
            51_000,
        );
        feed(
            &mut t,
            pkt(11, 960, false, 101, stamp(0, 0, 1, 1, 2_000)),
            52_000,
        );
        // The same wire packet again: a duplicate, not a delivery.
        feed(
            &mut t,
            pkt(11, 960, false, 101, stamp(0, 0, 1, 1, 2_000)),
            52_500,
        );
        // Gap: 12 missing.
        feed(
            &mut t,
            pkt(13, 2880, false, 101, stamp(0, 0, 1, 3, 4_000)),
            54_000,
        );
        // Packet 1 re-sent under a fresh sequence number: still a duplicate (by speaker and stamp).
        feed(
            &mut t,
            pkt(14, 3840, false, 101, stamp(0, 0, 1, 1, 2_000)),
            54_500,
        );
        // A switch is being timed: speaker 2 takes over as spurt 2; its first packet lacks the marker.
        let shared = t.shared.clone();
        let ch = &shared.channels[0];
        ch.next_spurt.store(2, Ordering::Release);
        ch.switch_from_ns.store(50_000, Ordering::Release);
        feed(
            &mut t,
            pkt(15, 9000, false, 101, stamp(0, 2, 2, 0, 5_000)),
            60_000,
        );
        // A repeated sequence number over a new packet: the packet is delivered.
        feed(
            &mut t,
            pkt(15, 9960, false, 101, stamp(0, 2, 2, 1, 5_500)),
            60_500,
        );
        // Our own audio (wrong SSRC, timestamp back): an echo, not a delivery.
        feed(
            &mut t,
            pkt(16, 100, false, 999, stamp(0, 1, 3, 0, 6_000)),
            61_000,
        );
        // Another channel's audio: misrouted, not a delivery.
        feed(
            &mut t,
            pkt(17, 10_920, false, 101, stamp(1, 0, 1, 5, 6_500)),
            61_500,
        );
        // From an address that is not the server: stray.
        let b = pkt(18, 11_880, false, 101, stamp(0, 2, 2, 2, 7_000));
        t.datagram(1, "127.0.0.9:1".parse().unwrap(), &b, 62_000);
        let c = t.books.c;
        assert_eq!(c.packets, 9);
        assert_eq!(c.delivered, 5);
        assert_eq!(c.duplicates, 2);
        assert_eq!(c.stray, 1);
        assert_eq!(c.echo, 1);
        assert_eq!(c.misrouted, 1);
        assert_eq!(c.ssrc_mismatch, 1);
        assert_eq!(c.ts_backwards, 1);
        assert_eq!(c.marker_missing, 1);
        assert_eq!(c.switches, 1);
        assert_eq!(c.violations(), 5);
        let sw = &t.books.switch;
        assert_eq!(sw.len(), 1);
        assert!(
            (sw.quantile(1.0) as i64 - 10_000).abs() < 20,
            "{}",
            sw.quantile(1.0)
        );
        // Latency is sampled on deliveries only.
        let lat = &t.books.latency;
        assert_eq!(lat.len(), 5);
        assert!((lat.quantile(0.0) as i64 - 50_000).abs() < 100);
        // The sequence numbers tell their own story: 12 lost, 11 and 15 seen twice.
        let s = t.listeners[1].seq.totals();
        assert_eq!(s.lost, 1);
        assert_eq!(s.duplicates, 2);
        // Only the first listener to see the new speaker times the switch.
        assert_eq!(ch.switch_from_ns.load(Ordering::Acquire), 0);
    }

    #[test]
    fn rtcp_and_garbage_are_not_samples() {
        let (mut t, rx) = tally();
        let server: SocketAddr = SERVER.parse().unwrap();
        let mut sr = vec![0u8; 28];
        sr[0] = 0x80;
        sr[1] = 200;
        t.datagram(0, server, &sr, 1);
        t.datagram(0, server, &[1, 2, 3], 1);
        let mut nostamp = pkt(1, 0, false, 100, stamp(0, 1, 1, 0, 0));
        nostamp[12] = b'x';
        t.datagram(0, server, &nostamp, 1);
        let c = t.books.c;
        assert_eq!((c.rtcp, c.foreign, c.packets), (1, 2, 0));
        assert!(t.books.latency.is_empty());
        // Closing the phase ships the books and the sequence totals.
        t.shared.phase.store(1, Ordering::Release);
        assert!(!t.poll_phase());
        let r = rx.try_recv().expect("a final report");
        assert!(r.last && r.phase == 0);
        assert_eq!(r.counters.rtcp, 1);
        assert_eq!(t.books.c, RecvCounters::default());
    }

    #[test]
    fn a_webrtc_leg_is_accounted_the_same_way() {
        let (mut t, _rx) = tally();
        let st = stamp(0, 0, 1, 0, 1_000);
        let b = pkt(5, 0, true, 102, st);
        let h = RtpHeader {
            marker: true,
            payload_type: 111,
            seq: 5,
            timestamp: 0,
            ssrc: 102,
        };
        t.server_rtp(2, h, &b[12..], b.len() + 30, 2_000);
        t.server_rtp(2, h, &b[12..], b.len() + 30, 2_100);
        let c = t.books.c;
        assert_eq!((c.delivered, c.duplicates, c.violations()), (1, 1, 0));
        assert_eq!(c.bytes, 2 * (b.len() as u64 + 30));
    }
}
