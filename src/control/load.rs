//! This node's load for the registry (placement compares it): media packets forwarded per second, from
//! the shards' counters, and the process's CPU, from `/proc` — sampled by a task of its own every
//! [`LOAD_EVERY`] and handed to the control core as a value ([`HubMsg::Load`]), so neither the core nor the
//! shards wait for it.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::runner::HubMsg;
use crate::metrics::ProcessStats;
use crate::shard::Command;

/// How often the load is sampled (the node announces it every 3 s).
pub const LOAD_EVERY: Duration = Duration::from_secs(2);
/// How long a shard may take to hand over its counters.
const STATS_WAIT: Duration = Duration::from_millis(500);

/// Samples the load until the control thread is gone.
pub async fn sample_load(shards: Vec<flume::Sender<Command>>, hub: mpsc::Sender<HubMsg>) {
    let mut last: Option<(Instant, u64, f64)> = None;
    let mut tick = tokio::time::interval(LOAD_EVERY);
    loop {
        tick.tick().await;
        let mut forwarded = 0u64;
        for shard in &shards {
            let (tx, rx) = flume::bounded(1);
            if shard.try_send(Command::Stats { reply: tx }).is_err() {
                continue;
            }
            if let Ok(Ok(stats)) = tokio::time::timeout(STATS_WAIT, rx.recv_async()).await {
                forwarded += stats.forwarded;
            }
        }
        let cpu = ProcessStats::read().cpu_seconds;
        let now = Instant::now();
        if let Some((then, f0, c0)) = last {
            let secs = now.duration_since(then).as_secs_f64().max(1e-3);
            let pps = (forwarded.saturating_sub(f0) as f64 / secs) as u64;
            let cpu_permille = ((cpu - c0).max(0.0) / secs * 1000.0) as u64;
            if hub.send(HubMsg::Load { pps, cpu_permille }).await.is_err() {
                return;
            }
        }
        last = Some((now, forwarded, cpu));
    }
}
