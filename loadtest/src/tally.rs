//! What a listener received, accounted: one [`Tally`] per receiving thread (each plain-RTP receiver and
//! the WebRTC engine) owns its listeners' stream state, so the hot path shares nothing; it ships interval
//! reports (histograms + counters) to the coordinator about once a second and a final one, with the
//! per-stream sequence totals, whenever the phase number changes.
//!
//! The receive time is taken by the caller right after the receive syscall; the accounting itself —
//! stamps, sequence numbers, the protocol v1 checks at a listener — is here, without I/O, so it is tested
//! on hand-made packets.

use crate::model::{ChannelShared, Member, Target, TargetCell};
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
    /// RTP packets from the current target carrying our stamp, duplicates included.
    pub packets: u64,
    /// … without duplicates: what counts as delivered.
    pub unique: u64,
    pub bytes: u64,
    /// The server's own RTCP (sender reports).
    pub rtcp: u64,
    /// Datagrams without our stamp.
    pub foreign: u64,
    /// From an address that is not this phase's target (late packets of the previous phase).
    pub stray: u64,
    /// Protocol checks (plain-RTP rules of protocol v1), counted on the server's streams only.
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
        self.unique += o.unique;
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
    /// Unique samples so far, all phases (for the live progress line; reports carry the exact counts).
    pub delivered: AtomicU64,
}

#[derive(Default, Clone)]
struct Listener {
    seq: SeqTracker,
    last_spurt: u32,
    last_ts: Option<u32>,
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
    latency: LatencyHist,
    switch: LatencyHist,
    c: RecvCounters,
    last_report: u64,
    unique_reported: u64,
}

impl Tally {
    pub fn new(shared: Arc<RecvShared>, out: Sender<RecvReport>) -> Tally {
        Tally {
            listeners: vec![Listener::default(); shared.members.len()],
            phase: shared.phase.load(Ordering::Acquire),
            shared,
            out,
            latency: LatencyHist::new(),
            switch: LatencyHist::new(),
            c: RecvCounters::default(),
            last_report: mono_ns(),
            unique_reported: 0,
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
        self.shared
            .delivered
            .fetch_add(self.c.unique - self.unique_reported, Ordering::Relaxed);
        self.unique_reported = self.c.unique;
        if mono_ns() - self.last_report > 1_000_000_000 {
            self.flush(false);
        }
    }

    fn flush(&mut self, last: bool) {
        self.shared
            .delivered
            .fetch_add(self.c.unique - self.unique_reported, Ordering::Relaxed);
        self.unique_reported = 0;
        let mut seq = SeqTotals::default();
        if last {
            for l in self.listeners.iter_mut() {
                seq.add(&l.seq.totals());
                *l = Listener::default();
            }
        }
        let _ = self.out.send(RecvReport {
            phase: self.phase,
            last,
            latency: std::mem::take(&mut self.latency),
            switch: std::mem::take(&mut self.switch),
            counters: std::mem::take(&mut self.c),
            seq,
        });
        self.last_report = mono_ns();
    }

    /// A datagram received by member `m` at `now` (plain RTP, RTCP or anything else).
    pub fn datagram(&mut self, m: usize, src: SocketAddr, buf: &[u8], now: u64) {
        let target = self.shared.target.get();
        on_datagram(
            &self.shared,
            &self.shared.members[m],
            target,
            src,
            buf,
            now,
            &mut self.listeners[m],
            &mut self.latency,
            &mut self.switch,
            &mut self.c,
        );
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
            self.c.stray += 1;
            return;
        }
        on_rtp(
            &self.shared,
            &self.shared.members[m],
            true,
            header,
            payload,
            len,
            now,
            &mut self.listeners[m],
            &mut self.latency,
            &mut self.switch,
            &mut self.c,
        );
    }

    /// A datagram that was not ours at all.
    pub fn foreign(&mut self) {
        self.c.foreign += 1;
    }
}

/// Account one datagram received by member `me` at `now`.
#[allow(clippy::too_many_arguments)]
fn on_datagram(
    shared: &RecvShared,
    me: &Member,
    target: Target,
    src: SocketAddr,
    buf: &[u8],
    now: u64,
    l: &mut Listener,
    latency: &mut LatencyHist,
    switch: &mut LatencyHist,
    c: &mut RecvCounters,
) {
    let (header, payload) = match parse_datagram(buf) {
        Datagram::Rtp { header, payload } => (header, payload),
        Datagram::Rtcp => {
            c.rtcp += 1;
            return;
        }
        Datagram::Other => {
            c.foreign += 1;
            return;
        }
    };
    let expected_src = match target {
        Target::Server => me.server_addr,
        Target::Raw(a) => a,
    };
    if src != expected_src {
        c.stray += 1;
        return;
    }
    on_rtp(
        shared,
        me,
        target == Target::Server,
        header,
        payload,
        buf.len(),
        now,
        l,
        latency,
        switch,
        c,
    );
}

/// Account one RTP packet of `len` bytes on the wire, from the current target (`server`: talkgroup,
/// whose streams are also checked against protocol v1).
#[allow(clippy::too_many_arguments)]
fn on_rtp(
    shared: &RecvShared,
    me: &Member,
    server: bool,
    header: RtpHeader,
    payload: &[u8],
    len: usize,
    now: u64,
    l: &mut Listener,
    latency: &mut LatencyHist,
    switch: &mut LatencyHist,
    c: &mut RecvCounters,
) {
    let Some(st) = Stamp::parse(payload) else {
        c.foreign += 1;
        return;
    };
    c.packets += 1;
    c.bytes += len as u64;
    let ev = l.seq.on_packet(header.seq);
    if ev == SeqEvent::Duplicate {
        return;
    }
    c.unique += 1;
    if st.channel != me.channel {
        c.misrouted += 1;
    } else if st.speaker == me.slot {
        c.echo += 1;
    }
    if server {
        if header.ssrc != me.ssrc {
            c.ssrc_mismatch += 1;
        }
        if header.payload_type != me.payload_type {
            c.pt_mismatch += 1;
        }
    }
    if matches!(
        ev,
        SeqEvent::InOrder | SeqEvent::Gap { .. } | SeqEvent::First
    ) {
        if let Some(prev) = l.last_ts {
            if server && (header.timestamp.wrapping_sub(prev) as i32) < 0 {
                c.ts_backwards += 1;
            }
        }
        l.last_ts = Some(header.timestamp);
    }
    latency.record(now.saturating_sub(st.sched_ns));
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
                    switch.record(now - from);
                    c.switches += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Arc<RecvShared>, SocketAddr) {
        let server: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let members = (0..3u16)
            .map(|s| Member {
                channel: 0,
                slot: s,
                addr: "127.0.0.1:1".parse().unwrap(),
                server_addr: server,
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
        (shared, server)
    }

    fn pkt(
        seq: u16,
        ts: u32,
        marker: bool,
        ssrc: u32,
        speaker: u16,
        spurt: u32,
        sched: u64,
    ) -> Vec<u8> {
        let mut b = vec![0u8; 12 + 60];
        RtpHeader {
            marker,
            payload_type: 111,
            seq,
            timestamp: ts,
            ssrc,
        }
        .write(&mut b);
        Stamp {
            channel: 0,
            speaker,
            spurt,
            seq: 0,
            sched_ns: sched,
        }
        .write(&mut b[12..]);
        b
    }

    #[test]
    fn accounting_of_a_listener_stream() {
        let (sh, server) = setup();
        let me = sh.members[1].clone();
        let mut l = Listener::default();
        let (mut lat, mut sw, mut c) = (
            LatencyHist::new(),
            LatencyHist::new(),
            RecvCounters::default(),
        );
        let mut feed = |b: Vec<u8>, src: SocketAddr, now: u64, l: &mut Listener| {
            on_datagram(
                &sh,
                &me,
                Target::Server,
                src,
                &b,
                now,
                l,
                &mut lat,
                &mut sw,
                &mut c,
            );
        };
        feed(pkt(10, 0, true, 101, 0, 1, 1_000), server, 51_000, &mut l);
        feed(
            pkt(11, 960, false, 101, 0, 1, 2_000),
            server,
            52_000,
            &mut l,
        );
        feed(
            pkt(11, 960, false, 101, 0, 1, 2_000),
            server,
            52_500,
            &mut l,
        ); // duplicate
        feed(
            pkt(13, 2880, false, 101, 0, 1, 4_000),
            server,
            54_000,
            &mut l,
        ); // gap: 12 missing
           // A switch is being timed: speaker 2 takes over as spurt 2; its first packet lacks the marker.
        sh.channels[0].next_spurt.store(2, Ordering::Release);
        sh.channels[0]
            .switch_from_ns
            .store(50_000, Ordering::Release);
        feed(
            pkt(14, 9000, false, 101, 2, 2, 5_000),
            server,
            60_000,
            &mut l,
        );
        feed(
            pkt(15, 100, false, 999, 1, 2, 6_000),
            server,
            61_000,
            &mut l,
        ); // echo, wrong SSRC, ts back
        feed(
            pkt(16, 9960, false, 101, 2, 2, 7_000),
            "127.0.0.9:1".parse().unwrap(),
            62_000,
            &mut l,
        ); // stray
        assert_eq!(c.packets, 6);
        assert_eq!(c.unique, 5);
        assert_eq!(c.stray, 1);
        assert_eq!(c.echo, 1);
        assert_eq!(c.ssrc_mismatch, 1);
        assert_eq!(c.ts_backwards, 1);
        assert_eq!(c.marker_missing, 1);
        assert_eq!(c.switches, 1);
        assert_eq!(sw.len(), 1);
        assert!(
            (sw.quantile(1.0) as i64 - 10_000).abs() < 20,
            "{}",
            sw.quantile(1.0)
        );
        assert_eq!(lat.len(), 5);
        assert!((lat.quantile(0.0) as i64 - 50_000).abs() < 100);
        let t = l.seq.totals();
        assert_eq!(t.lost, 1);
        assert_eq!(t.duplicates, 1);
        // Only the first listener to see the new speaker times the switch.
        assert_eq!(sh.channels[0].switch_from_ns.load(Ordering::Acquire), 0);
    }

    #[test]
    fn rtcp_and_garbage_are_not_samples() {
        let (sh, server) = setup();
        let me = sh.members[0].clone();
        let mut l = Listener::default();
        let (mut lat, mut sw, mut c) = (
            LatencyHist::new(),
            LatencyHist::new(),
            RecvCounters::default(),
        );
        let mut sr = vec![0u8; 28];
        sr[0] = 0x80;
        sr[1] = 200;
        on_datagram(
            &sh,
            &me,
            Target::Server,
            server,
            &sr,
            1,
            &mut l,
            &mut lat,
            &mut sw,
            &mut c,
        );
        on_datagram(
            &sh,
            &me,
            Target::Server,
            server,
            &[1, 2, 3],
            1,
            &mut l,
            &mut lat,
            &mut sw,
            &mut c,
        );
        let mut nostamp = pkt(1, 0, false, 100, 1, 1, 0);
        nostamp[12] = b'x';
        on_datagram(
            &sh,
            &me,
            Target::Server,
            server,
            &nostamp,
            1,
            &mut l,
            &mut lat,
            &mut sw,
            &mut c,
        );
        assert_eq!((c.rtcp, c.foreign, c.packets), (1, 2, 0));
        assert!(lat.is_empty());
    }
}
