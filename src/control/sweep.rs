//! Repairing what pub/sub may have lost, at a pace that costs nothing per idle channel.
//!
//! Pub/sub is at-most-once and an expiring key publishes nothing. Three things make up for it:
//! - after every reconnect of the subscription, everything is read again (`StoreEvent::Resync`);
//! - every [`RESYNC_EVERY`](super::RESYNC_EVERY), the floors of the channels held from another node are
//!   re-read (that node may have died and its lease run out in silence) — only those, so an idle channel
//!   costs nothing here;
//! - a slow sweep re-reads every channel once per [`SWEEP_ROUND`] — its floor, its registered nodes —
//!   spread evenly over the round (a slice every [`SWEEP_STEP`]) so ten thousand channels never turn into
//!   one burst of calls; every [`REFRESH_EVERY`](super::REFRESH_EVERY) the visit also renews the channel's
//!   members' sessions, its registration and its home in the store (heartbeats, spread the same way).

use std::time::{Duration, Instant};

use super::{HubCore, REFRESH_EVERY, RESYNC_EVERY};

/// How often a slice of the sweep runs.
pub(super) const SWEEP_STEP: Duration = Duration::from_secs(1);
/// How long one round of the sweep takes: every channel is re-read once per round.
pub(super) const SWEEP_ROUND: Duration = Duration::from_secs(300);

impl HubCore {
    /// Runs the targeted re-reads and the sweep's slice when due.
    pub(super) fn tick_sweep(&mut self, now: Instant) {
        if now >= self.periodic.resync {
            self.periodic.resync = now + RESYNC_EVERY;
            if self.store_up {
                let held: Vec<String> = self
                    .channels
                    .iter()
                    .filter(|(_, ch)| ch.floor.remote().is_some())
                    .map(|(name, _)| name.clone())
                    .collect();
                for channel in held {
                    self.read_holder(&channel, now);
                }
            }
        }
        if now < self.periodic.sweep {
            return;
        }
        self.periodic.sweep = now + SWEEP_STEP;
        if !self.store_up {
            return;
        }
        if self.sweep.is_empty() {
            let mut all: Vec<String> = self.channels.keys().cloned().collect();
            all.sort();
            self.sweep.extend(all);
        }
        let steps = (SWEEP_ROUND.as_secs() / SWEEP_STEP.as_secs()).max(1) as usize;
        let slice = self.channels.len().div_ceil(steps).max(1);
        for _ in 0..slice {
            let Some(channel) = self.sweep.pop_front() else {
                break;
            };
            let Some(ch) = self.channels.get_mut(&channel) else {
                continue;
            };
            let renew = now.duration_since(ch.refreshed) >= REFRESH_EVERY;
            if renew {
                ch.refreshed = now;
            }
            self.read_holder(&channel, now);
            if self.uses_registry() {
                self.read_channel_nodes(&channel, now);
            }
            if renew {
                self.refresh_channel_sessions(&channel, now);
                if self.uses_registry() {
                    self.refresh_registration(&channel, now);
                }
                self.refresh_home(&channel, now);
            }
        }
    }
}
