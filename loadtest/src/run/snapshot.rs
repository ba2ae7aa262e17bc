//! Counters read at a phase boundary: the sender's, the raw forwarder's, every node's `/metrics` and
//! per-thread schedstat CPU, this process's CPU, per-CPU busy time and the kernel's UDP counters. A
//! phase's figures are the differences between the snapshot that opens it and the one that closes it.

use super::cost::is_shard_thread;
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
    /// Media packets the sender failed to send, so far.
    pub send_errors: u64,
    pub keepalive_errors: u64,
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

/// Σ run time of a process's threads (`shards`: only the shard threads, the packet path).
pub fn cpu_sum(t: &BTreeMap<i32, ThreadCpu>, shards: bool) -> u64 {
    t.values()
        .filter(|x| !shards || is_shard_thread(&x.name))
        .map(|x| x.run_ns)
        .sum()
}

/// Which end of a phase a snapshot is taken at. A `/metrics` scrape costs the server CPU (its control
/// thread renders the text, its shards report their counters), so the scrapes stay outside the window the
/// CPU is measured over: taken *before* the CPU is read when a phase opens, *after* when it closes. The
/// counters it reads do not move meanwhile: a phase opens before anyone talks and closes after the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    Open,
    Close,
}

/// Every node's `/metrics`, in node order.
async fn scrape(servers: &[Server]) -> Vec<Option<Samples>> {
    let mut out = Vec::with_capacity(servers.len());
    for s in servers {
        out.push(
            match metrics::http_get(s.http, "/metrics", Duration::from_secs(3)).await {
                Ok((200, body)) => Some(Samples::parse(&body)),
                _ => None,
            },
        );
    }
    out
}

pub async fn snapshot(
    edge: Edge,
    servers: &[Server],
    raw: Option<&RawForwarder>,
    sc: &SenderCounters,
) -> Snapshot {
    let opening = match edge {
        Edge::Open => Some(scrape(servers).await),
        Edge::Close => None,
    };
    let mut cpu = Vec::with_capacity(servers.len());
    let mut threads = BTreeMap::new();
    for s in servers {
        let t = s.pid.map(procfs::threads_cpu).unwrap_or_default();
        cpu.push((cpu_sum(&t, false), cpu_sum(&t, true)));
        // Thread ids are unique across processes: the union is every node's threads.
        threads.extend(t);
    }
    let proc_cpu = servers
        .iter()
        .map(|s| s.pid.and_then(procfs::process_cpu_ns))
        .sum::<Option<u64>>();
    let me = std::process::id() as i32;
    let mut snap = Snapshot {
        nodes: Vec::new(),
        t_ns: mono_ns(),
        media: sc.media.load(Ordering::Acquire),
        expected: sc.expected.load(Ordering::Acquire),
        send_errors: sc.errors.load(Ordering::Acquire),
        keepalive_errors: sc.keepalive_errors.load(Ordering::Acquire),
        spin_ns: sc.spin_ns.load(Ordering::Acquire),
        metrics: None,
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
    };
    let scraped = match opening {
        Some(m) => m,
        None => scrape(servers).await,
    };
    // One node: its samples as they are; several: every series labelled with its node, so sums by
    // metric name cover the cluster.
    snap.metrics = if scraped.len() == 1 {
        scraped[0].clone()
    } else {
        scraped
            .iter()
            .enumerate()
            .map(|(i, m)| m.as_ref().map(|m| m.with_label("node", &i.to_string())))
            .try_fold(Samples::default(), |mut acc, m| {
                acc.0.extend(m?.0);
                Some(acc)
            })
    };
    snap.nodes = scraped
        .into_iter()
        .zip(cpu)
        .map(|(m, (c, h))| (m, c, h))
        .collect();
    snap
}
