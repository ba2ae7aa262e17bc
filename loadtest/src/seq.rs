//! Per-listener RTP sequence accounting: gaps, duplicates and reordering on the one stream each listener
//! receives (protocol v1: sequence numbers continue across speaker changes, so any hole is a loss).
//!
//! Sequence numbers are extended to 64 bits as in RFC 3550 A.1; a 1,024-entry bitmap of recently seen
//! numbers tells a duplicate from a late (reordered) packet.

/// How many recent sequence numbers are remembered for duplicate detection.
const WINDOW: u64 = 1024;

/// What one packet was, relative to the stream so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqEvent {
    First,
    InOrder,
    /// Ahead of the next expected number: `missing` numbers were skipped (maybe to arrive late).
    Gap {
        missing: u64,
    },
    /// Behind the highest seen and not seen before.
    Reordered,
    Duplicate,
}

/// Totals for one stream (or a sum of streams).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeqTotals {
    /// Packets received, duplicates included.
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Number of forward jumps (each may hide several lost packets).
    pub gap_events: u64,
    /// Sequence numbers never received between the first and the highest: expected − unique received.
    pub lost: u64,
    /// Sequence numbers spanned, first to highest.
    pub expected: u64,
}

impl SeqTotals {
    pub fn add(&mut self, o: &SeqTotals) {
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.gap_events += o.gap_events;
        self.lost += o.lost;
        self.expected += o.expected;
    }
}

/// Tracks one RTP stream.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    started: bool,
    base: u64,
    max: u64,
    received: u64,
    unique: u64,
    duplicates: u64,
    reordered: u64,
    gap_events: u64,
    seen: Vec<u64>,
}

impl SeqTracker {
    fn bit(&self, ext: u64) -> bool {
        let i = (ext % WINDOW) as usize;
        self.seen[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, ext: u64, on: bool) {
        let i = (ext % WINDOW) as usize;
        if on {
            self.seen[i / 64] |= 1 << (i % 64);
        } else {
            self.seen[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Account one packet with 16-bit sequence number `seq`.
    pub fn on_packet(&mut self, seq: u16) -> SeqEvent {
        self.received += 1;
        if !self.started {
            self.started = true;
            // Start the extended space high enough that a reordered predecessor does not underflow.
            self.base = (1 << 32) + seq as u64;
            self.max = self.base;
            self.seen = vec![0; (WINDOW / 64) as usize];
            self.set(self.max, true);
            self.unique = 1;
            return SeqEvent::First;
        }
        let delta = seq.wrapping_sub(self.max as u16) as i16 as i64;
        if delta > 0 {
            let new_max = self.max + delta as u64;
            if delta as u64 >= WINDOW {
                self.seen.iter_mut().for_each(|w| *w = 0);
            } else {
                for e in self.max + 1..=new_max {
                    self.set(e, false);
                }
            }
            self.max = new_max;
            self.set(new_max, true);
            self.unique += 1;
            if delta == 1 {
                SeqEvent::InOrder
            } else {
                self.gap_events += 1;
                SeqEvent::Gap {
                    missing: delta as u64 - 1,
                }
            }
        } else {
            let ext = self.max - (-delta) as u64;
            if delta == 0 || (self.max - ext < WINDOW && self.bit(ext)) {
                self.duplicates += 1;
                return SeqEvent::Duplicate;
            }
            if ext < self.base {
                // Older than the first packet: extend the span backwards.
                self.base = ext;
            }
            if self.max - ext < WINDOW {
                self.set(ext, true);
            }
            self.unique += 1;
            self.reordered += 1;
            SeqEvent::Reordered
        }
    }

    /// Totals so far (a packet lost at the very end of a stream cannot be seen here; the end-to-end
    /// count against what was sent covers that).
    pub fn totals(&self) -> SeqTotals {
        if !self.started {
            return SeqTotals::default();
        }
        let expected = self.max - self.base + 1;
        SeqTotals {
            received: self.received,
            duplicates: self.duplicates,
            reordered: self.reordered,
            gap_events: self.gap_events,
            lost: expected.saturating_sub(self.unique),
            expected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(seqs: &[u16]) -> (Vec<SeqEvent>, SeqTotals) {
        let mut t = SeqTracker::default();
        let ev = seqs.iter().map(|&s| t.on_packet(s)).collect();
        (ev, t.totals())
    }

    #[test]
    fn in_order_stream_has_no_loss() {
        let (_, t) = feed(&[10, 11, 12, 13]);
        assert_eq!(
            t,
            SeqTotals {
                received: 4,
                expected: 4,
                ..Default::default()
            }
        );
    }

    #[test]
    fn gap_counts_lost_packets() {
        let (ev, t) = feed(&[1, 2, 5, 6]);
        assert_eq!(ev[2], SeqEvent::Gap { missing: 2 });
        assert_eq!(t.lost, 2);
        assert_eq!(t.gap_events, 1);
        assert_eq!(t.expected, 6);
    }

    #[test]
    fn late_packet_is_reordered_not_lost() {
        let (ev, t) = feed(&[1, 2, 4, 3, 5]);
        assert_eq!(ev[3], SeqEvent::Reordered);
        assert_eq!(t.reordered, 1);
        assert_eq!(t.lost, 0);
        assert_eq!(t.duplicates, 0);
    }

    #[test]
    fn duplicates_are_detected_old_and_new() {
        let (ev, t) = feed(&[1, 2, 3, 3, 2, 4]);
        assert_eq!(ev[3], SeqEvent::Duplicate);
        assert_eq!(ev[4], SeqEvent::Duplicate);
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.received, 6);
        assert_eq!(t.lost, 0);
    }

    #[test]
    fn wraparound_is_continuous() {
        let (ev, t) = feed(&[65_534, 65_535, 0, 1]);
        assert!(ev[1..].iter().all(|e| *e == SeqEvent::InOrder));
        assert_eq!(t.lost, 0);
        assert_eq!(t.expected, 4);
    }

    #[test]
    fn reordered_across_wrap_and_before_first() {
        let (ev, t) = feed(&[0, 65_535, 1]);
        assert_eq!(ev[1], SeqEvent::Reordered);
        assert_eq!(t.expected, 3);
        assert_eq!(t.lost, 0);
    }

    #[test]
    fn big_jump_clears_window() {
        let mut t = SeqTracker::default();
        t.on_packet(0);
        assert_eq!(t.on_packet(5000), SeqEvent::Gap { missing: 4999 });
        // 0 is now far behind: counted as reordered (too old to know), not a duplicate.
        assert_eq!(t.on_packet(4999), SeqEvent::Reordered);
        assert_eq!(t.on_packet(4999), SeqEvent::Duplicate);
        assert_eq!(t.totals().lost, 4998);
    }

    #[test]
    fn totals_add_up() {
        let mut a = SeqTotals {
            received: 1,
            duplicates: 2,
            reordered: 3,
            gap_events: 4,
            lost: 5,
            expected: 6,
        };
        a.add(&a.clone());
        assert_eq!(a.lost, 10);
        assert_eq!(a.expected, 12);
    }
}
