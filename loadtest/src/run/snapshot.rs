//! Counters read at a phase boundary: the sender's, the raw forwarder's, every node's `/metrics` and
//! per-thread schedstat CPU, this process's CPU, per-CPU busy time and the kernel's UDP counters. A
//! phase's figures are the differences between the snapshot that opens it and the one that closes it.

use crate::metrics::{self, Samples};
use crate::procfs::{self, ThreadCpu};
use crate::raw_forwarder::RawForwarder;
use crate::sender::SenderCounters;
use crate::server::Server;
use crate::sys::mono_ns;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Counters read at a phase boundary.
pub struct Snapshot {
    pub t_ns: u64,
    pub media: u64,
    pub expected: u64,
    pub send_errors: u64,
    pub spin_ns: u64,
    pub metrics: Option<Samples>,
    pub threads: BTreeMap<i32, ThreadCpu>,
    pub proc_cpu: Option<u64>,
    pub own_cpu: Option<u64>,
    pub raw: Option<(u64, u64, u64, Option<u64>)>,
    /// Per node: its `/metrics`, schedstat CPU (Σ threads) and that of its shard threads alone.
    pub nodes: Vec<(Option<Samples>, u64, u64)>,
    pub cpus: BTreeMap<usize, (u64, u64)>,
    pub udp: BTreeMap<String, u64>,
}

/// Σ run time of a process's threads (`shards`: only the shard threads, named `shard-…`).
pub fn cpu_sum(t: &BTreeMap<i32, ThreadCpu>, shards: bool) -> u64 {
    t.values()
        .filter(|x| !shards || x.name.starts_with("shard"))
        .map(|x| x.run_ns)
        .sum()
}

pub async fn snapshot(
    servers: &[Server],
    raw: Option<&RawForwarder>,
    sc: &SenderCounters,
) -> Snapshot {
    let mut nodes = Vec::with_capacity(servers.len());
    let mut threads = BTreeMap::new();
    for s in servers {
        let m = match metrics::http_get(s.http, "/metrics", Duration::from_secs(3)).await {
            Ok((200, body)) => Some(Samples::parse(&body)),
            _ => None,
        };
        let t = s.pid.map(procfs::threads_cpu).unwrap_or_default();
        nodes.push((m, cpu_sum(&t, false), cpu_sum(&t, true)));
        // Thread ids are unique across processes: the union is every node's threads.
        threads.extend(t);
    }
    // One node: its samples as they are; several: every series labelled with its node, so sums by
    // metric name cover the cluster.
    let metrics = if nodes.len() == 1 {
        nodes[0].0.clone()
    } else {
        nodes
            .iter()
            .enumerate()
            .map(|(i, (m, _, _))| m.as_ref().map(|m| m.with_label("node", &i.to_string())))
            .try_fold(Samples::default(), |mut acc, m| {
                acc.0.extend(m?.0);
                Some(acc)
            })
    };
    let proc_cpu = servers
        .iter()
        .map(|s| s.pid.and_then(procfs::process_cpu_ns))
        .sum::<Option<u64>>();
    let me = std::process::id() as i32;
    Snapshot {
        nodes,
        t_ns: mono_ns(),
        media: sc.media.load(Ordering::Acquire),
        expected: sc.expected.load(Ordering::Acquire),
        send_errors: sc.errors.load(Ordering::Acquire),
        spin_ns: sc.spin_ns.load(Ordering::Acquire),
        metrics,
        threads,
        proc_cpu,
        own_cpu: procfs::process_cpu_ns(me),
        raw: raw.map(|r| {
            (
                r.counters.received.load(Ordering::Acquire),
                r.counters.forwarded.load(Ordering::Acquire),
                r.counters.dropped.load(Ordering::Acquire),
                r.cpu_ns(),
            )
        }),
        cpus: procfs::cpu_times(),
        udp: procfs::udp_counters(),
    }
}
