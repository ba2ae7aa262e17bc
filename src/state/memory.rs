//! The embedded store: one node, no set-up. Same rules as Redis (epochs never go back, leases expire,
//! release and renew only at the holder's epoch), so one contract suite covers both.
//!
//! A `std::sync::Mutex` is right here (as in mini-redis `db.rs`): the store lives on the control thread,
//! critical sections are a few map operations and never span an `.await`.
// The lock is control-plane only (clippy.toml bans it elsewhere).
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{
    wall_clock_us, AcquireRequest, Acquired, FloorStore, Holder, NodeInfo, NodeTable, Registry,
    SessionStore, StoreFuture,
};

/// How long (µs) a channel's last epoch is remembered after its grant.
const EPOCH_MEMORY_US: u64 = 60_000_000;

struct Lock {
    holder: Holder,
    expires: Instant,
}

#[derive(Default)]
struct Floors {
    locks: HashMap<String, Lock>,
    last_epoch: HashMap<String, u64>,
}

/// In-memory floor locks.
pub struct MemoryFloorStore {
    node: String,
    inner: Mutex<Floors>,
}

impl MemoryFloorStore {
    /// An empty store for node `node` (recorded as every lock's node).
    pub fn new(node: impl Into<String>) -> Self {
        MemoryFloorStore {
            node: node.into(),
            inner: Mutex::new(Floors::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Floors> {
        // A poisoned lock means a panic while holding it; the maps are still consistent (every critical
        // section is a single insert or remove), so carry on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FloorStore for MemoryFloorStore {
    fn acquire(&self, req: AcquireRequest) -> StoreFuture<'_, Acquired> {
        let now = Instant::now();
        let mut f = self.lock();
        let answer = match f.locks.get(&req.channel) {
            // An emergency takes the lock from any holder not itself in an emergency burst.
            Some(lock) if lock.expires > now && (!req.emergency || lock.holder.emergency) => {
                Acquired::Busy(lock.holder.clone())
            }
            _ => {
                let clock = wall_clock_us();
                let last = f.last_epoch.get(&req.channel).copied().unwrap_or(0);
                let epoch = (last + 1).max(clock);
                if f.last_epoch.len() >= 1024 {
                    // One entry per channel name ever used must not stay forever: an epoch older than a
                    // minute is below the clock, which alone keeps the next epoch above it.
                    f.last_epoch.retain(|_, e| *e + EPOCH_MEMORY_US > clock);
                }
                f.last_epoch.insert(req.channel.clone(), epoch);
                let holder = Holder {
                    member: req.member,
                    node: self.node.clone(),
                    epoch,
                    priority: req.priority,
                    emergency: req.emergency,
                };
                f.locks.insert(
                    req.channel,
                    Lock {
                        holder,
                        expires: now + req.ttl,
                    },
                );
                Acquired::Granted { epoch }
            }
        };
        Box::pin(std::future::ready(Ok(answer)))
    }

    fn renew<'a>(&'a self, channel: &'a str, epoch: u64, ttl: Duration) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let mut f = self.lock();
        let ok = match f.locks.get_mut(channel) {
            Some(lock) if lock.holder.epoch == epoch && lock.expires > now => {
                lock.expires = now + ttl;
                true
            }
            _ => false,
        };
        Box::pin(std::future::ready(Ok(ok)))
    }

    fn release<'a>(&'a self, channel: &'a str, epoch: u64) -> StoreFuture<'a, bool> {
        let mut f = self.lock();
        let ok = match f.locks.get(channel) {
            Some(lock) if lock.holder.epoch == epoch => {
                let still_valid = lock.expires > Instant::now();
                f.locks.remove(channel);
                still_valid
            }
            _ => false,
        };
        Box::pin(std::future::ready(Ok(ok)))
    }

    fn holder<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Option<Holder>> {
        let now = Instant::now();
        let f = self.lock();
        let h = f
            .locks
            .get(channel)
            .filter(|l| l.expires > now)
            .map(|l| l.holder.clone());
        Box::pin(std::future::ready(Ok(h)))
    }
}

#[derive(Default)]
struct Sessions {
    /// channel → member → node.
    by_channel: HashMap<String, HashMap<String, String>>,
    by_member: HashMap<String, HashSet<String>>,
}

/// In-memory membership. One node sees everything, so there is nothing to expire: members leave when their
/// connection closes.
#[derive(Default)]
pub struct MemorySessionStore {
    inner: Mutex<Sessions>,
}

impl MemorySessionStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SessionStore for MemorySessionStore {
    fn join<'a>(
        &'a self,
        channel: &'a str,
        member: &'a str,
        node: &'a str,
    ) -> StoreFuture<'a, bool> {
        let mut s = self.lock();
        let members = s.by_channel.entry(channel.to_string()).or_default();
        if members.get(member).is_some_and(|n| n != node) {
            return Box::pin(std::future::ready(Ok(false)));
        }
        members.insert(member.to_string(), node.to_string());
        s.by_member
            .entry(member.to_string())
            .or_default()
            .insert(channel.to_string());
        Box::pin(std::future::ready(Ok(true)))
    }

    fn leave<'a>(
        &'a self,
        channel: &'a str,
        member: &'a str,
        _node: &'a str,
    ) -> StoreFuture<'a, ()> {
        let mut s = self.lock();
        if let Some(m) = s.by_channel.get_mut(channel) {
            m.remove(member);
            if m.is_empty() {
                s.by_channel.remove(channel);
            }
        }
        if let Some(c) = s.by_member.get_mut(member) {
            c.remove(channel);
            if c.is_empty() {
                s.by_member.remove(member);
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn refresh<'a>(
        &'a self,
        _channel: &'a str,
        _member: &'a str,
        _node: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn members<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Vec<String>> {
        let s = self.lock();
        let mut v: Vec<String> = s
            .by_channel
            .get(channel)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        Box::pin(std::future::ready(Ok(v)))
    }

    fn channels_of<'a>(&'a self, member: &'a str) -> StoreFuture<'a, Vec<String>> {
        let s = self.lock();
        let mut v: Vec<String> = s
            .by_member
            .get(member)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default();
        v.sort();
        Box::pin(std::future::ready(Ok(v)))
    }
}

/// One node alone: no other node to relay to, none to outlive.
#[derive(Default)]
pub struct MemoryRegistry;

impl Registry for MemoryRegistry {
    fn announce<'a>(&'a self, _node: &'a NodeInfo, _ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn withdraw<'a>(&'a self, _node: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn set_channel_node<'a>(
        &'a self,
        _channel: &'a str,
        _node: &'a str,
        _present: bool,
    ) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn channel_nodes<'a>(&'a self, _channel: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    fn nodes(&self) -> StoreFuture<'_, NodeTable> {
        Box::pin(std::future::ready(Ok(NodeTable::default())))
    }

    fn place<'a>(
        &'a self,
        _channel: &'a str,
        candidate: &'a str,
        _usable: &'a [String],
        _ttl: Duration,
    ) -> StoreFuture<'a, String> {
        // One node: the channel is always here.
        Box::pin(std::future::ready(Ok(candidate.to_string())))
    }

    fn unplace<'a>(&'a self, _channel: &'a str, _node: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn evict_node<'a>(&'a self, _channel: &'a str, _node: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    fn cluster_key<'a>(&'a self, proposed: &'a str) -> StoreFuture<'a, String> {
        // One node, no relay: nothing to agree with.
        Box::pin(std::future::ready(Ok(proposed.to_string())))
    }
}
