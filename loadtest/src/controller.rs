//! One controller task per channel drives its talk model: pick a member, press, start its packets on
//! `granted`, hold for a sampled burst, stop, release, wait a sampled gap, repeat.
//!
//! Runs start in steady state: with probability = duty cycle a channel starts mid-burst, else mid-gap
//! (exponential lengths are memoryless, so the residual has the same distribution). When the gap is zero
//! the next speaker presses as soon as `idle` arrives, and the release→first-packet time is recorded as
//! the speaker-switch latency.

use crate::model::ChannelShared;
use crate::protocol::{ConnCmd, FloorEv, FloorMsg};
use crate::scenario::{Dist, TalkModel};
use crate::sender::SendCmd;
use crate::stats::LatencyHist;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};

/// What the coordinator tells the controllers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhaseCtl {
    pub id: u32,
    pub running: bool,
    /// Channels `0..active` talk in this phase (the knee search raises it step by step).
    pub active: u32,
    /// Floor through the talkgroup server (`false`: granted locally, for the raw forwarder).
    pub server: bool,
    /// Speakers only among the members on this node (`u32::MAX`: anyone).
    pub speakers_node: u32,
    pub shutdown: bool,
}

/// Anyone may speak.
pub const ANY_NODE: u32 = u32::MAX;

/// The next speaker's slot from two uniform draws `r1`, `r2` in [0, 1): anyone but `prev`, restricted to
/// the slots on `node` of `nodes` (round robin, see `cluster::node_of`) unless `node` is [`ANY_NODE`].
pub fn pick_slot(r1: f64, r2: f64, members: u32, prev: Option<u16>, nodes: u32, node: u32) -> u16 {
    let (first, step) = if node == ANY_NODE || nodes <= 1 || node >= members {
        (0, 1)
    } else {
        (node, nodes)
    };
    let count = (members - first).div_ceil(step);
    let pick = |r: f64| ((r * count as f64) as u32).min(count - 1);
    let mut k = pick(r1);
    if Some((first + k * step) as u16) == prev && count > 1 {
        k = (k + 1 + pick(r2).min(count - 2)) % count;
    }
    (first + k * step) as u16
}

/// Floor statistics of one phase.
#[derive(Debug, Clone, Default)]
pub struct FloorStats {
    pub grant: LatencyHist,
    pub release_to_idle: LatencyHist,
    pub grants: u64,
    pub presses: u64,
    pub press_timeouts: u64,
    pub idle_timeouts: u64,
    pub queued: u64,
    pub denied: BTreeMap<String, u64>,
    pub revoked: BTreeMap<String, u64>,
}

/// Counts that go in the report next to the histograms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FloorCounts {
    pub presses: u64,
    pub grants: u64,
    pub press_timeouts: u64,
    pub idle_timeouts: u64,
    pub queued: u64,
    pub denied: BTreeMap<String, u64>,
    pub revoked: BTreeMap<String, u64>,
}

impl FloorStats {
    pub fn apply(&mut self, r: FloorRecord) {
        match r {
            FloorRecord::Press => self.presses += 1,
            FloorRecord::Grant(ns) => {
                self.grants += 1;
                if let Some(ns) = ns {
                    self.grant.record(ns);
                }
            }
            FloorRecord::Denied(reason) => *self.denied.entry(reason).or_default() += 1,
            FloorRecord::Queued => self.queued += 1,
            FloorRecord::Revoked(reason) => *self.revoked.entry(reason).or_default() += 1,
            FloorRecord::PressTimeout => self.press_timeouts += 1,
            FloorRecord::IdleTimeout => self.idle_timeouts += 1,
            FloorRecord::ReleaseToIdle(ns) => self.release_to_idle.record(ns),
        }
    }

    pub fn counts(&self) -> FloorCounts {
        FloorCounts {
            presses: self.presses,
            grants: self.grants,
            press_timeouts: self.press_timeouts,
            idle_timeouts: self.idle_timeouts,
            queued: self.queued,
            denied: self.denied.clone(),
            revoked: self.revoked.clone(),
        }
    }
}

/// Shared by all controllers.
pub struct CtrlCtx {
    pub model: TalkModel,
    pub members: u32,
    pub nodes: u32,
    /// Longest burst allowed (T2 minus a margin), seconds.
    pub max_burst: f64,
    pub packet_interval: Duration,
    pub seed: u64,
    pub channels: Arc<Vec<ChannelShared>>,
    /// `conn[channel][slot]`: the connection carrying that member (empty in raw-only runs).
    pub conns: Vec<Vec<UnboundedSender<ConnCmd>>>,
    pub sender: std::sync::mpsc::Sender<SendCmd>,
    pub phase: watch::Receiver<PhaseCtl>,
    /// Controllers pressing or holding right now (the coordinator waits for 0 between phases).
    pub busy: AtomicUsize,
    /// Floor outcomes, as values to the coordinator (no shared tallies: the workspace bans locks).
    pub records: UnboundedSender<(u32, FloorRecord)>,
}

impl CtrlCtx {
    fn record(&self, phase: u32, r: FloorRecord) {
        let _ = self.records.send((phase, r));
    }
}

/// One floor outcome of a phase.
#[derive(Debug, Clone, PartialEq)]
pub enum FloorRecord {
    Press,
    /// Granted, with press→granted in ns when timed.
    Grant(Option<u64>),
    Denied(String),
    Queued,
    Revoked(String),
    PressTimeout,
    IdleTimeout,
    ReleaseToIdle(u64),
}

/// Sleep for `d` unless the phase changes first; `true` when the full time passed.
async fn sleep_in_phase(
    d: Duration,
    phase: &mut watch::Receiver<PhaseCtl>,
    want: PhaseCtl,
) -> bool {
    let until = Instant::now() + d;
    loop {
        if *phase.borrow() != want {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return true,
            r = phase.changed() => if r.is_err() { return false },
        }
    }
}

fn secs(x: f64) -> Duration {
    Duration::from_secs_f64(x.clamp(0.0, 3600.0))
}

/// Drive channel `ch` until shutdown.
pub async fn run_channel(ch: u32, ctx: Arc<CtrlCtx>, mut events: UnboundedReceiver<FloorMsg>) {
    let mut rng =
        SmallRng::seed_from_u64(ctx.seed ^ (ch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut phase_rx = ctx.phase.clone();
    let shared = &ctx.channels[ch as usize];
    let mut spurt: u32 = 0;
    let mut prev: Option<u16> = None;
    let interval = ctx.packet_interval.as_secs_f64();
    let burst_dist = ctx.model.burst;
    let sample_burst = |rng: &mut SmallRng| -> f64 {
        let b = match burst_dist {
            Dist::Const(x) if x.is_infinite() => ctx.max_burst,
            d => d.sample(rng.random()),
        };
        b.clamp(interval, ctx.max_burst.max(interval))
    };
    loop {
        // Wait for a running phase that includes this channel.
        let ph = loop {
            let p = *phase_rx.borrow_and_update();
            if p.shutdown {
                return;
            }
            if p.running && ch < p.active {
                break p;
            }
            if phase_rx.changed().await.is_err() {
                return;
            }
        };
        // Steady state from the start.
        let talking_first = rng.random::<f64>() < ctx.model.duty();
        let first_delay = if talking_first {
            rng.random::<f64>() * interval
        } else {
            match ctx.model.gap {
                Dist::Exp(m) => Dist::Exp(m).sample(rng.random()),
                Dist::Const(g) => rng.random::<f64>() * g,
            }
        };
        if !sleep_in_phase(secs(first_delay), &mut phase_rx, ph).await {
            continue;
        }
        let mut first = talking_first;
        let mut switch_next = false;
        while *phase_rx.borrow() == ph {
            // Next speaker: anyone but the previous one.
            let slot = pick_slot(
                rng.random(),
                rng.random(),
                ctx.members,
                prev,
                ctx.nodes,
                ph.speakers_node,
            );
            ctx.busy.fetch_add(1, Ordering::AcqRel);
            shared.speaker_slot.store(slot as u32, Ordering::Release);
            while events.try_recv().is_ok() {} // stale events of an earlier press
            spurt = spurt.wrapping_add(1).max(1);
            if switch_next {
                shared.next_spurt.store(spurt, Ordering::Release);
            } else {
                shared.next_spurt.store(0, Ordering::Release);
                shared.switch_from_ns.store(0, Ordering::Release);
            }
            let granted = if ph.server {
                press(&ctx, ch, slot, ph.id, &mut events).await
            } else {
                ctx.record(ph.id, FloorRecord::Press);
                ctx.record(ph.id, FloorRecord::Grant(None));
                true
            };
            if !granted {
                shared.speaker_slot.store(u32::MAX, Ordering::Release);
                ctx.busy.fetch_sub(1, Ordering::AcqRel);
                switch_next = false;
                let backoff = 0.05 + rng.random::<f64>() * 0.2;
                if !sleep_in_phase(secs(backoff), &mut phase_rx, ph).await {
                    break;
                }
                continue;
            }
            let member = ch * ctx.members + slot as u32;
            let _ = ctx.sender.send(SendCmd::Start {
                channel: ch,
                member,
                spurt,
                listeners: ctx.members - 1,
            });
            let burst = if first {
                first = false;
                // Residual of a burst in progress: memoryless for exponential, uniform for constant.
                match burst_dist {
                    Dist::Exp(_) => sample_burst(&mut rng),
                    _ => (sample_burst(&mut rng) * rng.random::<f64>()).max(interval),
                }
            } else {
                sample_burst(&mut rng)
            };
            let revoked = hold(&ctx, ph, &mut phase_rx, &mut events, secs(burst), slot).await;
            let _ = ctx.sender.send(SendCmd::Stop { channel: ch });
            // Let the last packets through before the release (like the web page's 200 ms, shorter).
            sleep(ctx.packet_interval * 2).await;
            let still = *phase_rx.borrow() == ph;
            let gap = ctx.model.gap.sample(rng.random());
            switch_next = still && gap <= 0.0;
            if !revoked {
                release(&ctx, ch, slot, ph, switch_next, &mut events).await;
            }
            shared.speaker_slot.store(u32::MAX, Ordering::Release);
            ctx.busy.fetch_sub(1, Ordering::AcqRel);
            prev = Some(slot);
            if !still || !sleep_in_phase(secs(gap), &mut phase_rx, ph).await {
                break;
            }
        }
    }
}

/// Press for `slot` and wait for the outcome; `true` when granted.
async fn press(
    ctx: &CtrlCtx,
    ch: u32,
    slot: u16,
    phase: u32,
    events: &mut UnboundedReceiver<FloorMsg>,
) -> bool {
    let Some(conn) = ctx
        .conns
        .get(ch as usize)
        .and_then(|c| c.get(slot as usize))
    else {
        return false;
    };
    ctx.record(phase, FloorRecord::Press);
    if conn.send(ConnCmd::Press { channel: ch }).is_err() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let msg = match timeout(
            deadline.saturating_duration_since(Instant::now()),
            events.recv(),
        )
        .await
        {
            Ok(Some(m)) => m,
            Ok(None) => return false,
            Err(_) => {
                ctx.record(phase, FloorRecord::PressTimeout);
                // Withdraw a press that may still be pending.
                let _ = conn.send(ConnCmd::Release {
                    channel: ch,
                    time_switch: false,
                });
                return false;
            }
        };
        if msg.slot != slot {
            continue;
        }
        match msg.ev {
            FloorEv::Granted { press_ns } => {
                ctx.record(phase, FloorRecord::Grant(press_ns));
                return true;
            }
            FloorEv::Denied { reason } => {
                ctx.record(phase, FloorRecord::Denied(reason));
                return false;
            }
            FloorEv::Queued => ctx.record(phase, FloorRecord::Queued),
            FloorEv::Revoked { reason } => {
                ctx.record(phase, FloorRecord::Revoked(reason));
                return false;
            }
            FloorEv::Idle { .. } => {}
        }
    }
}

/// Hold the floor for `burst` or until the phase stops; `true` if the server revoked it meanwhile.
async fn hold(
    ctx: &CtrlCtx,
    ph: PhaseCtl,
    phase_rx: &mut watch::Receiver<PhaseCtl>,
    events: &mut UnboundedReceiver<FloorMsg>,
    burst: Duration,
    slot: u16,
) -> bool {
    let until = Instant::now() + burst;
    loop {
        if *phase_rx.borrow() != ph {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return false,
            r = phase_rx.changed() => if r.is_err() { return false },
            m = events.recv() => match m {
                Some(FloorMsg { slot: s, ev: FloorEv::Revoked { reason } }) if s == slot => {
                    ctx.record(ph.id, FloorRecord::Revoked(reason));
                    return true;
                }
                Some(_) => {}
                None => return false,
            },
        }
    }
}

/// Release and wait for `idle` (so the next press cannot race the release).
async fn release(
    ctx: &CtrlCtx,
    ch: u32,
    slot: u16,
    ph: PhaseCtl,
    time_switch: bool,
    events: &mut UnboundedReceiver<FloorMsg>,
) {
    let shared = &ctx.channels[ch as usize];
    if !ph.server {
        if time_switch {
            shared
                .switch_from_ns
                .store(crate::sys::mono_ns(), Ordering::Release);
        }
        return;
    }
    let Some(conn) = ctx
        .conns
        .get(ch as usize)
        .and_then(|c| c.get(slot as usize))
    else {
        return;
    };
    if conn
        .send(ConnCmd::Release {
            channel: ch,
            time_switch,
        })
        .is_err()
    {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match timeout(
            deadline.saturating_duration_since(Instant::now()),
            events.recv(),
        )
        .await
        {
            Ok(Some(FloorMsg {
                slot: s,
                ev: FloorEv::Idle { release_ns },
            })) if s == slot => {
                if let Some(ns) = release_ns {
                    ctx.record(ph.id, FloorRecord::ReleaseToIdle(ns));
                }
                return;
            }
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(_) => {
                ctx.record(ph.id, FloorRecord::IdleTimeout);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speaker_slots() {
        // Anyone: the draw maps uniformly, the previous speaker is skipped.
        assert_eq!(pick_slot(0.0, 0.0, 6, None, 3, ANY_NODE), 0);
        assert_eq!(pick_slot(0.99, 0.0, 6, None, 3, ANY_NODE), 5);
        assert_eq!(pick_slot(0.0, 0.0, 6, Some(0), 1, ANY_NODE), 1);
        assert_eq!(pick_slot(0.0, 0.99, 6, Some(0), 1, ANY_NODE), 5);
        // Node 0 of 3 with 6 members: slots 0 and 3 only.
        for i in 0..100 {
            let r = i as f64 / 100.0;
            let s = pick_slot(r, 1.0 - r, 6, None, 3, 0);
            assert!(s == 0 || s == 3, "{s}");
            assert_eq!(pick_slot(r, 1.0 - r, 6, Some(3), 3, 0), 0);
            let s = pick_slot(r, r, 7, Some(2), 3, 2);
            assert_eq!(s, 5);
        }
        // A single slot on the node: it speaks again.
        assert_eq!(pick_slot(0.5, 0.5, 4, Some(1), 3, 1), 1);
    }

    #[test]
    fn floor_records_are_tallied() {
        let mut a = FloorStats::default();
        for r in [
            FloorRecord::Press,
            FloorRecord::Press,
            FloorRecord::Grant(Some(100_000)),
            FloorRecord::Grant(None),
            FloorRecord::Denied("busy".into()),
            FloorRecord::Revoked("silence".into()),
            FloorRecord::Queued,
            FloorRecord::PressTimeout,
            FloorRecord::IdleTimeout,
            FloorRecord::ReleaseToIdle(50_000),
        ] {
            a.apply(r);
        }
        let c = a.counts();
        assert_eq!((c.grants, c.presses, c.queued), (2, 2, 1));
        assert_eq!((c.press_timeouts, c.idle_timeouts), (1, 1));
        assert_eq!(c.denied["busy"], 1);
        assert_eq!(c.revoked["silence"], 1);
        assert_eq!(a.grant.len(), 1);
        assert_eq!(a.release_to_idle.len(), 1);
    }
}
