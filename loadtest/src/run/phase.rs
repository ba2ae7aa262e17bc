//! One phase, start to finish: point the media at its target, open it with a snapshot, let the
//! controllers talk for the phase's time (a progress line a second), then close it cleanly — the
//! controllers stop and release, in-flight packets drain, and only then are the counters read and the
//! receivers told to close their books, so each phase's loss is exact.

use super::plan::Plan;
use super::setup::Rig;
use super::snapshot::{snapshot, Edge, Snapshot};
use crate::controller::{FloorStats, PhaseCtl};
use crate::model::Target;
use crate::protocol::ConnNote;
use crate::report::SeriesPoint;
use crate::sender::SendCmd;
use crate::seq::SeqTotals;
use crate::server::any_exited;
use crate::stats::{loss_pct, LatencyHist};
use crate::sys::mono_ns;
use crate::tally::{RecvCounters, RecvReport};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc as smpsc;
use std::time::{Duration, Instant};

/// What the receivers reported for one phase, merged.
#[derive(Default)]
pub struct Acc {
    pub latency: LatencyHist,
    pub switch: LatencyHist,
    pub counters: RecvCounters,
    pub seq: SeqTotals,
    /// Final reports received (one per receiving thread when the books are closed).
    pub finals: usize,
}

impl Acc {
    pub fn add(&mut self, r: &RecvReport) {
        self.latency.merge(&r.latency);
        self.switch.merge(&r.switch);
        self.counters.add(&r.counters);
        self.seq.add(&r.seq);
        if r.last {
            self.finals += 1;
        }
    }
}

/// What one phase collected.
pub struct Measured {
    pub s0: Snapshot,
    pub s1: Snapshot,
    pub acc: Acc,
    pub floor: FloorStats,
    pub lag: LatencyHist,
    /// The server died during the phase.
    pub crashed: Option<String>,
}

/// What the phase loop carries from one phase to the next.
pub struct Progress {
    run_start: u64,
    floor_by_phase: BTreeMap<u32, FloorStats>,
    target: Target,
    pub lost_conns: usize,
    pub server_errors: Vec<String>,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            run_start: mono_ns(),
            floor_by_phase: BTreeMap::new(),
            target: Target::Server,
            lost_conns: 0,
            server_errors: Vec::new(),
        }
    }

    fn drain_records(&mut self, rig: &mut Rig) {
        while let Ok((ph, r)) = rig.records.try_recv() {
            self.floor_by_phase.entry(ph).or_default().apply(r);
        }
    }

    fn drain_notes(&mut self, rig: &mut Rig) {
        while let Ok(n) = rig.notes.try_recv() {
            match n {
                ConnNote::Lost(e) => {
                    self.lost_conns += 1;
                    if self.lost_conns <= 3 {
                        self.server_errors.push(format!("connection lost: {e}"));
                    }
                }
                ConnNote::ServerError(e) if self.server_errors.len() < 10 => {
                    self.server_errors.push(format!("server error frame: {e}"));
                }
                _ => {}
            }
        }
    }
}

/// Receiver phase number of plan entry `i` (odd: inside the phase; even: between phases).
fn recv_phase(i: usize) -> u32 {
    2 * i as u32 + 1
}

/// Run plan entry `i`; measured phases add a point a second to `series`.
pub async fn run_phase(
    rig: &mut Rig,
    i: usize,
    p: &Plan,
    prog: &mut Progress,
    series: &mut Vec<SeriesPoint>,
) -> Measured {
    let target = match (p.server, rig.raw.as_ref()) {
        (false, Some(r)) => Target::Raw(r.addr),
        _ => Target::Server,
    };
    rig.target.set(target);
    let _ = rig.sender.send(SendCmd::Target(target));
    if target != prog.target && target == Target::Server {
        // Latching lapses after 30 s of raw phases: latch again before talking.
        let _ = rig.sender.send(SendCmd::Relatch);
        tokio::time::sleep(rig.relatch_wait).await;
    }
    prog.target = target;
    let s0 = snapshot(
        Edge::Open,
        &rig.servers,
        rig.raw.as_ref(),
        &rig.sender_counters,
    )
    .await;
    rig.recv.phase.store(recv_phase(i), Ordering::Release);
    let ctl = PhaseCtl {
        id: i as u32,
        running: true,
        active: p.active,
        server: p.server,
        speakers_node: p.speakers_node,
        shutdown: false,
    };
    let _ = rig.phase.send(ctl);
    let mut acc = Acc::default();
    let mut sec = Acc::default();
    let mut crashed = None;
    let mut last_tick = Instant::now();
    let mut last_media = s0.media;
    let delivered0 = rig.recv.delivered.load(Ordering::Relaxed);
    let mut last_delivered = delivered0;
    // Expected deliveries as of the previous 100 ms tick: packets sent since are still in flight.
    let mut prev_expected = s0.expected;
    let started = Instant::now();
    while started.elapsed() < p.duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        while let Ok(r) = rig.reports.try_recv() {
            if r.phase == recv_phase(i) {
                acc.add(&r);
                sec.add(&r);
            }
        }
        prog.drain_records(rig);
        prog.drain_notes(rig);
        if let Some(st) = any_exited(&mut rig.servers) {
            crashed = Some(st);
            break;
        }
        let delivered = rig.recv.delivered.load(Ordering::Relaxed);
        // An estimate: deliveries of packets sent since the last tick may be counted already, so it is
        // shown floored at 0 (the phase's books, closed after the drain, are exact and are not).
        let loss = loss_pct(prev_expected - s0.expected, delivered - delivered0).max(0.0);
        prev_expected = rig.sender_counters.expected.load(Ordering::Relaxed);
        if last_tick.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let dt = last_tick.elapsed().as_secs_f64();
        last_tick = Instant::now();
        let media = rig.sender_counters.media.load(Ordering::Relaxed);
        let pps_in = (media - last_media) as f64 / dt;
        last_media = media;
        let pps_out = (delivered - last_delivered) as f64 / dt;
        last_delivered = delivered;
        let us = |q: f64| sec.latency.quantile(q) as f64 / 1e3;
        let t_s = (mono_ns() - prog.run_start) as f64 / 1e9;
        eprintln!(
            "[{t_s:>5.1}s {:<9} {:>4.0}/{:.0}s] talking {:>5}  in {pps_in:>7.0}/s  out {pps_out:>8.0}/s  p50 {:>7.1} µs  p99 {:>8.1} µs  loss~ {loss:.3} %  viol {}",
            p.name,
            started.elapsed().as_secs_f64(),
            p.duration.as_secs_f64(),
            rig.ctrl.busy.load(Ordering::Relaxed),
            us(0.5),
            us(0.99),
            acc.counters.violations(),
        );
        if p.measured {
            series.push(SeriesPoint {
                t_s,
                phase: p.name.clone(),
                target: if p.server { "talkgroup" } else { "raw" }.into(),
                pps_in,
                pps_out,
                p50_us: us(0.5),
                p99_us: us(0.99),
                max_us: us(1.0),
            });
        }
        sec = Acc::default();
    }
    // Stop talking, let everything drain.
    let _ = rig.phase.send(PhaseCtl {
        running: false,
        ..ctl
    });
    let until = Instant::now() + Duration::from_secs(5);
    while rig.ctrl.busy.load(Ordering::Acquire) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s1 = snapshot(
        Edge::Close,
        &rig.servers,
        rig.raw.as_ref(),
        &rig.sender_counters,
    )
    .await;
    rig.recv.phase.store(recv_phase(i) + 1, Ordering::Release);
    let until = Instant::now() + Duration::from_secs(3);
    while acc.finals < rig.n_recv && Instant::now() < until {
        match rig.reports.recv_timeout(Duration::from_millis(50)) {
            Ok(r) if r.phase == recv_phase(i) => acc.add(&r),
            _ => {}
        }
    }
    prog.drain_records(rig);
    let floor = prog.floor_by_phase.remove(&(i as u32)).unwrap_or_default();
    let (lag_tx, lag_rx) = smpsc::channel();
    let _ = rig.sender.send(SendCmd::TakeLag(lag_tx));
    let lag = lag_rx
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    Measured {
        s0,
        s1,
        acc,
        floor,
        lag,
        crashed,
    }
}
