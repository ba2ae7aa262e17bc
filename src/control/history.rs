//! The transmission log, written by the node whose member spoke: when a local burst ends, the floor says
//! who, since when and why; the channel's shard says how many packets it forwarded. Once both are known
//! (or [`BURST_WAIT`] has passed: the shard's count may be lost to a full queue) the burst is written to
//! the history store — off the packet path, as a store call like any other.

use std::time::{Duration, Instant};

use super::calls::{Purpose, StoreCall};
use super::HubCore;
use crate::state::history::Burst;

/// How long a finished burst waits for the shard's packet count before it is written without it.
const BURST_WAIT: Duration = Duration::from_secs(1);

/// A burst whose end the floor reported, waiting for the shard's count (or the other way round).
#[derive(Debug, Default)]
pub(super) struct PendingBurst {
    /// From the floor: (member, started, ended, reason, emergency).
    floor: Option<(String, Instant, Instant, &'static str, bool)>,
    /// The channel was recorded when the burst ended.
    recorded: bool,
    /// From the shard.
    packets: Option<u64>,
    /// Written without the missing half after this.
    deadline: Option<Instant>,
}

impl HubCore {
    /// The floor's side of an ended local burst.
    #[allow(clippy::too_many_arguments)] // one record's fields, passed on once
    pub(super) fn floor_burst_ended(
        &mut self,
        channel: &str,
        member: String,
        epoch: u64,
        started: Instant,
        reason: &'static str,
        emergency: bool,
        now: Instant,
    ) {
        let recorded = self.is_recorded(channel);
        let pending = self.bursts.entry((channel.to_string(), epoch)).or_default();
        pending.floor = Some((member, started, now, reason, emergency));
        pending.deadline.get_or_insert(now + BURST_WAIT);
        pending.recorded = recorded;
        self.write_burst_if_complete(channel, epoch, now);
    }

    /// The shard's side: the packets it forwarded for the burst.
    pub(super) fn shard_burst_ended(
        &mut self,
        channel: &str,
        epoch: u64,
        packets: u64,
        now: Instant,
    ) {
        let pending = self.bursts.entry((channel.to_string(), epoch)).or_default();
        pending.packets = Some(packets);
        pending.deadline.get_or_insert(now + BURST_WAIT);
        self.write_burst_if_complete(channel, epoch, now);
    }

    fn write_burst_if_complete(&mut self, channel: &str, epoch: u64, now: Instant) {
        let key = (channel.to_string(), epoch);
        let complete = self
            .bursts
            .get(&key)
            .is_some_and(|p| p.floor.is_some() && p.packets.is_some());
        if complete {
            if let Some(p) = self.bursts.remove(&key) {
                self.write_burst(channel, epoch, p, now);
            }
        }
    }

    /// Writes the bursts whose missing half did not come in time.
    pub(super) fn flush_bursts(&mut self, now: Instant) {
        let due: Vec<(String, u64)> = self
            .bursts
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for (channel, epoch) in due {
            if let Some(p) = self.bursts.remove(&(channel.clone(), epoch)) {
                self.write_burst(&channel, epoch, p, now);
            }
        }
    }

    /// Whether `channel`'s local bursts are recorded.
    pub(super) fn is_recorded(&self, channel: &str) -> bool {
        match self.config.record_all {
            None => false,
            Some(all) => self.recorded.get(channel).copied().unwrap_or(all),
        }
    }

    /// The admin API turns a channel's recording on or off (now, and for when it is opened again).
    pub(super) fn set_recording(&mut self, channel: String, on: bool) {
        if self.config.record_all.is_none() {
            return;
        }
        self.recorded.insert(channel.clone(), on);
        if let Some(shard) = self.channels.get(&channel).map(|ch| ch.shard) {
            self.shard_command(shard, crate::shard::Command::SetRecording { channel, on });
        }
    }

    /// The earliest deadline of a waiting burst.
    pub(super) fn bursts_timeout(&self) -> Option<Instant> {
        self.bursts.values().filter_map(|p| p.deadline).min()
    }

    fn write_burst(&mut self, channel: &str, epoch: u64, p: PendingBurst, now: Instant) {
        // Only a burst the floor saw end is a burst (a count alone is a shard change nobody spoke in).
        let Some((member, started, ended, reason, emergency)) = p.floor else {
            return;
        };
        let burst = Burst {
            channel: channel.to_string(),
            member,
            node: self.config.node.clone(),
            epoch,
            start_ms: self.unix_ms(started),
            end_ms: self.unix_ms(ended),
            end_reason: reason.to_string(),
            packets: p.packets.unwrap_or(0),
            emergency,
            recording: p
                .recorded
                .then(|| crate::record::recording_url(channel, epoch)),
        };
        self.counters.bursts += 1;
        self.call(StoreCall::RecordBurst(Box::new(burst)), Purpose::None, now);
    }
}
