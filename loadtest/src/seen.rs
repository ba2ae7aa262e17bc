//! Which stamped packets a listener has already had, to tell a delivery from a repeat.
//!
//! The key is what the *speaker* sent — (speaker slot, spurt, packet number) from the stamp — not the RTP
//! sequence number the server rewrote: a server that sends the same packet twice under two sequence
//! numbers has delivered it once, and a stream whose sequence numbers repeat over different packets has
//! delivered each of them. (Sequence numbers are still accounted, apart, in `seq.rs`.)
//!
//! A listener hears one spurt at a time, in order but for the odd late packet, so a window of the last
//! 1,024 packet numbers of the current spurt and of the one before is enough; a packet of an older spurt,
//! or further back than the window, cannot be told apart and counts as new (20 s late: never seen here).

/// Packet numbers remembered per spurt.
const WINDOW: u32 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// One spurt's recent packet numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spurt {
    speaker: u16,
    spurt: u32,
    /// Highest packet number seen.
    max: u32,
    bits: [u64; WORDS],
}

impl Spurt {
    fn new(speaker: u16, spurt: u32, pkt: u32) -> Spurt {
        let mut s = Spurt {
            speaker,
            spurt,
            max: pkt,
            bits: [0; WORDS],
        };
        s.set(pkt);
        s
    }

    fn is(&self, speaker: u16, spurt: u32) -> bool {
        self.speaker == speaker && self.spurt == spurt
    }

    fn bit(&self, pkt: u32) -> bool {
        let i = (pkt % WINDOW) as usize;
        self.bits[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, pkt: u32) {
        let i = (pkt % WINDOW) as usize;
        self.bits[i / 64] |= 1 << (i % 64);
    }

    fn clear(&mut self, pkt: u32) {
        let i = (pkt % WINDOW) as usize;
        self.bits[i / 64] &= !(1 << (i % 64));
    }

    /// `true` the first time `pkt` is seen.
    fn first_time(&mut self, pkt: u32) -> bool {
        if pkt > self.max {
            if pkt - self.max >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for p in self.max + 1..pkt {
                    self.clear(p);
                }
            }
            self.max = pkt;
            self.set(pkt);
            return true;
        }
        if self.max - pkt >= WINDOW {
            return true; // too old to know
        }
        let first = !self.bit(pkt);
        self.set(pkt);
        first
    }
}

/// A listener's record of the packets it has had.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    current: Option<Spurt>,
    previous: Option<Spurt>,
}

impl Seen {
    /// `true` the first time packet `pkt` of `speaker`'s spurt `spurt` arrives; `false` for a repeat.
    pub fn first_time(&mut self, speaker: u16, spurt: u32, pkt: u32) -> bool {
        if let Some(c) = self.current.as_mut().filter(|c| c.is(speaker, spurt)) {
            return c.first_time(pkt);
        }
        if let Some(p) = self.previous.as_mut().filter(|p| p.is(speaker, spurt)) {
            return p.first_time(pkt);
        }
        self.previous = self.current.take();
        self.current = Some(Spurt::new(speaker, spurt, pkt));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_caught_by_speaker_and_stamp() {
        let mut s = Seen::default();
        assert!(s.first_time(1, 7, 0));
        assert!(s.first_time(1, 7, 1));
        assert!(!s.first_time(1, 7, 1));
        assert!(!s.first_time(1, 7, 0));
        // A gap, then the late one: new; then again: a repeat.
        assert!(s.first_time(1, 7, 5));
        assert!(s.first_time(1, 7, 3));
        assert!(!s.first_time(1, 7, 3));
        // The same packet number of another spurt or speaker is another packet.
        assert!(s.first_time(2, 8, 1));
        assert!(s.first_time(1, 9, 1));
    }

    #[test]
    fn the_previous_spurt_is_still_remembered() {
        let mut s = Seen::default();
        for p in 0..10 {
            assert!(s.first_time(0, 1, p));
        }
        assert!(s.first_time(2, 2, 0));
        // A late packet of spurt 1, then its repeat.
        assert!(!s.first_time(0, 1, 9));
        assert!(s.first_time(0, 1, 10));
        assert!(!s.first_time(0, 1, 10));
        assert!(!s.first_time(2, 2, 0));
    }

    #[test]
    fn the_window_slides() {
        let mut s = Seen::default();
        assert!(s.first_time(0, 1, 0));
        assert!(s.first_time(0, 1, 2000));
        // Far behind the window: cannot tell, counted as new.
        assert!(s.first_time(0, 1, 0));
        // Inside the window, cleared by the jump: new once, then a repeat.
        assert!(s.first_time(0, 1, 1990));
        assert!(!s.first_time(0, 1, 1990));
        // Slot reuse across the window: 2000 + 1024 lands on 2000's bit, which the slide clears.
        assert!(s.first_time(0, 1, 3024));
        assert!(!s.first_time(0, 1, 3024));
    }
}
