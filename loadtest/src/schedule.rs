//! The talk schedule: which member of each channel is sending, and a deadline heap of their next 20 ms
//! packets, each written (RTP header + stamp + padding) when it falls due. The plain-RTP sender and the
//! WebRTC engine each own one, so both send the same streams the same way.
//!
//! Each packet is stamped with the time it was *scheduled* for, not when it left: a harness that falls
//! behind charges its own lag to the measured latency (no coordinated omission).

use crate::model::Member;
use crate::scenario::PayloadModel;
use crate::stamp::{RtpHeader, Stamp, RTP_HEADER_LEN};
use crate::sys::mono_ns;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

struct Active {
    member: u32,
    spurt: u32,
    pkt: u32,
    listeners: u32,
    gen: u32,
}

/// Per-member RTP state: a speaker's own stream continues across its spurts, as a real client's would.
/// `seq` is extended (str0m wants the 64-bit counter; the wire carries its low 16 bits).
struct Uplink {
    seq: u64,
    ts: u32,
    ssrc: u32,
}

pub struct SenderConfig {
    pub rate: u32,
    pub payload: PayloadModel,
    pub keepalive: Duration,
    pub seed: u64,
    /// Spin (yielding) this close to a deadline instead of sleeping through it.
    pub spin_ns: u64,
}

/// One packet that is due, already written (RTP header + stamp + padding) into the caller's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Due {
    pub member: usize,
    pub len: usize,
    /// Listeners that should receive it.
    pub listeners: u32,
    /// When it was scheduled (the stamp), mono ns.
    pub due: u64,
    pub header: RtpHeader,
    /// `header.seq` extended to 64 bits.
    pub ext_seq: u64,
}

/// The talk schedule: which member of each channel is sending, and a deadline heap of their next
/// packets. Shared by the plain-RTP sender and the WebRTC engine, so both send the same streams.
pub struct Schedule {
    interval: u64,
    ts_step: u32,
    payload: PayloadModel,
    rng: SmallRng,
    uplinks: Vec<Uplink>,
    active: Vec<Option<Active>>,
    gen: u32,
    heap: BinaryHeap<Reverse<(u64, u32, u32)>>,
}

impl Schedule {
    pub fn new(cfg: &SenderConfig, members: &[Member], salt: u64) -> Schedule {
        let mut rng = SmallRng::seed_from_u64(cfg.seed ^ 0x5e4d ^ salt);
        let uplinks = (0..members.len())
            .map(|_| Uplink {
                seq: u64::from(rng.random::<u16>()),
                ts: rng.random(),
                ssrc: rng.random(),
            })
            .collect();
        let n_channels = members.last().map(|m| m.channel as usize + 1).unwrap_or(0);
        Schedule {
            interval: 1_000_000_000 / cfg.rate.max(1) as u64,
            ts_step: 48_000 / cfg.rate.max(1),
            payload: cfg.payload.clone(),
            rng,
            uplinks,
            active: (0..n_channels).map(|_| None).collect(),
            gen: 0,
            heap: BinaryHeap::new(),
        }
    }

    /// `member` starts spurt `spurt` on `channel` now.
    pub fn start(&mut self, channel: u32, member: u32, spurt: u32, listeners: u32) {
        if let Some(slot) = self.active.get_mut(channel as usize) {
            self.gen = self.gen.wrapping_add(1);
            *slot = Some(Active {
                member,
                spurt,
                pkt: 0,
                listeners,
                gen: self.gen,
            });
            self.heap.push(Reverse((mono_ns(), channel, self.gen)));
        }
    }

    pub fn stop(&mut self, channel: u32) {
        if let Some(slot) = self.active.get_mut(channel as usize) {
            *slot = None;
        }
    }

    /// The next deadline, mono ns.
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((d, _, _))| *d)
    }

    /// The SSRC member `m` sends with.
    pub fn ssrc(&self, m: usize) -> u32 {
        self.uplinks[m].ssrc
    }

    /// Pops the next packet due at or before `now` and writes it into `buf`.
    pub fn pop_due(&mut self, now: u64, buf: &mut [u8], members: &[Member]) -> Option<Due> {
        while let Some(&Reverse((due, ch, g))) = self.heap.peek() {
            if due > now {
                return None;
            }
            self.heap.pop();
            let Some(a) = self.active.get_mut(ch as usize).and_then(|s| s.as_mut()) else {
                continue;
            };
            if a.gen != g {
                continue; // a stale deadline of a stopped spurt
            }
            let m = a.member as usize;
            let up = &mut self.uplinks[m];
            let size = self
                .payload
                .size(a.pkt as u64 + ch as u64, self.rng.random());
            let header = RtpHeader {
                marker: a.pkt == 0,
                payload_type: crate::stamp::PT_OPUS,
                seq: up.seq as u16,
                timestamp: up.ts,
                ssrc: up.ssrc,
            };
            header.write(buf);
            Stamp {
                channel: ch,
                speaker: members[m].slot,
                spurt: a.spurt,
                seq: a.pkt,
                sched_ns: due,
            }
            .write(&mut buf[RTP_HEADER_LEN..]);
            let out = Due {
                member: m,
                len: RTP_HEADER_LEN + size,
                listeners: a.listeners,
                due,
                header,
                ext_seq: up.seq,
            };
            up.seq += 1;
            up.ts = up.ts.wrapping_add(self.ts_step);
            a.pkt += 1;
            self.heap.push(Reverse((due + self.interval, ch, g)));
            return Some(out);
        }
        None
    }
}
