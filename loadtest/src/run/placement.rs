//! CPU placement. The warm-up shows which server threads do the work and on which (single) CPUs they are
//! pinned: the shards' cores. The harness then pins its own threads to the CPUs left over, so that on a
//! small machine it competes with the packet path as little as it can, and the raw forwarder of a
//! ceiling run goes onto the shard's core, where it meets the same conditions the server does.

use crate::procfs::{self, ThreadCpu};
use std::collections::BTreeMap;

/// Where things ended up after the warm-up.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// The server's shard cores.
    pub shard_cpus: Vec<usize>,
    /// The CPUs the harness pinned itself to (empty: not pinned).
    pub harness_cpus: Vec<usize>,
}

/// Decide and apply the placement from the server threads' CPU over the warm-up (`a` → `b`). `pin`:
/// pin the harness at all; `raw`: the raw forwarder's thread, which goes to `raw_cpu` or else the first
/// shard core.
pub fn after_warmup(
    a: &BTreeMap<i32, ThreadCpu>,
    b: &BTreeMap<i32, ThreadCpu>,
    pid: Option<i32>,
    pin: bool,
    raw: Option<i32>,
    raw_cpu: Option<usize>,
) -> Placement {
    let shard_cpus = busy_pinned_cpus(a, b, pid);
    let mut harness_cpus = Vec::new();
    if pin && !shard_cpus.is_empty() {
        let free: Vec<usize> = crate::sys::affinity_of(0)
            .unwrap_or_default()
            .into_iter()
            .filter(|c| !shard_cpus.contains(c))
            .collect();
        if !free.is_empty() {
            pin_own_threads(&free, raw);
            harness_cpus = free;
        }
    }
    if let (Some(tid), Some(cpu)) = (raw, raw_cpu.or(shard_cpus.first().copied())) {
        let _ = crate::sys::pin_thread(tid, &[cpu]);
    }
    Placement {
        shard_cpus,
        harness_cpus,
    }
}

/// CPUs of the server threads that did at least a quarter of the busiest thread's work over the
/// warm-up and are pinned to a single CPU: the shards' cores.
fn busy_pinned_cpus(
    a: &BTreeMap<i32, ThreadCpu>,
    b: &BTreeMap<i32, ThreadCpu>,
    pid: Option<i32>,
) -> Vec<usize> {
    let Some(pid) = pid else {
        return Vec::new();
    };
    let deltas: Vec<(i32, u64)> = b
        .iter()
        .map(|(tid, t)| {
            let before = a.get(tid).map(|x| x.run_ns).unwrap_or(0);
            (*tid, t.run_ns.saturating_sub(before))
        })
        .collect();
    let max = deltas.iter().map(|d| d.1).max().unwrap_or(0);
    if max == 0 {
        return procfs::pinned_cpus(pid);
    }
    procfs::single_cpus(
        deltas
            .iter()
            .filter(|(_, d)| *d * 4 >= max)
            .map(|(tid, _)| *tid),
    )
}

/// Pin every thread of this process but `except` (the raw forwarder, which sits on the server's core).
pub fn pin_own_threads(cpus: &[usize], except: Option<i32>) {
    let me = std::process::id() as i32;
    for tid in procfs::threads_cpu(me).keys() {
        if Some(*tid) != except {
            let _ = crate::sys::pin_thread(*tid, cpus);
        }
    }
}
