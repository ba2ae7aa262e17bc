//! The shard's one timer structure: a min-heap of (deadline, id) with lazy deletion. Generic over the id
//! so that it knows nothing of what it times (the shard uses it for WebRTC peers).
//!
//! Every WebRTC peer has at most one *live* deadline (the next `Output::Timeout` its `Rtc` asked for). When
//! a peer's deadline changes, the new one is pushed and the old entry is left in the heap; on expiry an
//! entry is honoured only if it still equals the peer's current deadline. So rescheduling is O(log n), the
//! shard loop sleeps until the heap's head, and nothing walks every peer on every packet (str0m's chat
//! example pokes each `Rtc` with a timeout after every datagram, which does not scale to thousands).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// Deadlines further away than this are not queued (str0m says "not happening" with a far-future
/// instant); the peer gets a new deadline the next time it is driven anyway.
const HORIZON: Duration = Duration::from_secs(3600);

/// Deadlines of ids, earliest first; an entry counts only while it equals its id's current deadline.
#[derive(Debug)]
pub struct Timers<Id> {
    heap: BinaryHeap<Reverse<(Instant, Id)>>,
}

impl<Id: Ord> Default for Timers<Id> {
    fn default() -> Self {
        Timers {
            heap: BinaryHeap::new(),
        }
    }
}

impl<Id: Copy + Ord> Timers<Id> {
    /// Queues `id` at `at` (the caller keeps `at` as the id's current deadline).
    pub fn schedule(&mut self, id: Id, at: Instant, now: Instant) {
        if at.saturating_duration_since(now) <= HORIZON {
            self.heap.push(Reverse((at, id)));
        }
    }

    /// The earliest queued deadline (possibly stale: waking early is harmless).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Pops every entry due at `now` whose deadline is still the id's current one (`current`).
    pub fn expired(
        &mut self,
        now: Instant,
        current: impl Fn(Id) -> Option<Instant>,
        out: &mut Vec<Id>,
    ) {
        while let Some(Reverse((at, id))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            if current(id) == Some(at) && !out.contains(&id) {
                out.push(id);
            }
        }
    }

    /// Rebuilds the heap from the live deadlines, dropping the stale entries (call it when they
    /// outnumber the live ones: many reschedules between expiries).
    pub fn compact(&mut self, live: impl Iterator<Item = (Id, Instant)>, now: Instant) {
        self.heap.clear();
        for (id, at) in live {
            self.schedule(id, at, now);
        }
    }

    /// Entries in the heap, stale ones included.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_current_deadlines_fire() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut timers = Timers::<usize>::default();
        timers.schedule(1, ms(10), t0);
        timers.schedule(2, ms(20), t0);
        timers.schedule(1, ms(30), t0); // peer 1 rescheduled: the 10 ms entry is stale
        timers.schedule(3, t0 + Duration::from_secs(7200), t0); // beyond the horizon
        assert_eq!(timers.next_deadline(), Some(ms(10)));
        let current = |p| match p {
            1 => Some(ms(30)),
            2 => Some(ms(20)),
            _ => None,
        };
        let mut out = vec![];
        timers.expired(ms(25), current, &mut out);
        assert_eq!(out, vec![2]);
        out.clear();
        timers.expired(ms(30), current, &mut out);
        assert_eq!(out, vec![1]);
        assert!(timers.is_empty());
    }
}
