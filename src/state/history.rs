//! The transmission log: every talk burst — who spoke, on which node, when, for how long, why it ended,
//! how many packets, whether it was an emergency — recorded off the packet path by the node whose member
//! spoke, and read back by any node (`GET /api/channels/{channel}/history`).
//!
//! The embedded store keeps a bounded history per channel in memory; the Redis store a capped stream
//! per channel (`P:tg:{ch}:history`), so any node answers for the whole cluster.
// The lock is control-plane only (clippy.toml bans it elsewhere).
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{StateError, StoreFuture};

/// Bursts kept per channel (newest first when read).
pub const HISTORY_PER_CHANNEL: usize = 1000;

/// One talk burst, as `GET /api/channels/{channel}/history` returns it (protocol v1.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Burst {
    /// The channel.
    pub channel: String,
    /// Who spoke.
    pub member: String,
    /// The node the speaker was connected to.
    pub node: String,
    /// The grant's epoch (unique per burst of a channel).
    pub epoch: u64,
    /// When the floor was granted (Unix ms).
    pub start_ms: u64,
    /// When it ended (Unix ms).
    pub end_ms: u64,
    /// `released`, or the `revoked` reason (`max_talk_time`, `preempted`, `silence`, `lease_lost`,
    /// `left`).
    pub end_reason: String,
    /// Audio packets forwarded.
    pub packets: u64,
    /// An emergency burst.
    pub emergency: bool,
    /// The URL of its Ogg/Opus recording, when recorded.
    pub recording: Option<String>,
}

/// Where bursts are written and read.
pub trait History: Send + Sync + 'static {
    /// Appends a finished burst to its channel's history.
    fn record<'a>(&'a self, burst: &'a Burst) -> StoreFuture<'a, ()>;
    /// The newest `limit` bursts of `channel` (newest first), only those with an epoch below `before`
    /// when given (paging back).
    fn list<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
        before: Option<u64>,
    ) -> StoreFuture<'a, Vec<Burst>>;
}

/// The embedded history: a ring of [`HISTORY_PER_CHANNEL`] bursts per channel.
#[derive(Default)]
pub struct MemoryHistory {
    inner: Mutex<HashMap<String, VecDeque<Burst>>>,
}

impl MemoryHistory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Burst>>> {
        // A poisoned lock means a panic while holding it; every critical section is one push or read.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl History for MemoryHistory {
    fn record<'a>(&'a self, burst: &'a Burst) -> StoreFuture<'a, ()> {
        let mut all = self.lock();
        let ring = all.entry(burst.channel.clone()).or_default();
        if ring.len() == HISTORY_PER_CHANNEL {
            ring.pop_front();
        }
        ring.push_back(burst.clone());
        Box::pin(std::future::ready(Ok(())))
    }

    fn list<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
        before: Option<u64>,
    ) -> StoreFuture<'a, Vec<Burst>> {
        let all = self.lock();
        let bursts = all
            .get(channel)
            .map(|ring| newest_first(ring.iter().cloned(), limit, before))
            .unwrap_or_default();
        Box::pin(std::future::ready(Ok(bursts)))
    }
}

/// Sorts by epoch, newest first, keeps those below `before`, at most `limit`.
pub fn newest_first(
    bursts: impl Iterator<Item = Burst>,
    limit: usize,
    before: Option<u64>,
) -> Vec<Burst> {
    let mut v: Vec<Burst> = bursts
        .filter(|b| before.is_none_or(|e| b.epoch < e))
        .collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.epoch));
    v.truncate(limit);
    v
}

/// A burst from its JSON form (as the Redis stream stores it).
pub fn decode(json: &str) -> Result<Burst, StateError> {
    serde_json::from_str(json).map_err(|e| StateError::Protocol(format!("history entry: {e}")))
}
