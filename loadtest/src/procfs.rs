//! Reading the server's (and our own) cost from `/proc`: per-thread `schedstat` run time in ns (the design
//! asks for it over `utime` ticks, which are 10 ms coarse), RSS, per-CPU busy time and the kernel's UDP
//! drop counters (`RcvbufErrors` tells kernel buffer overflow apart from loss in the server).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;

/// CPU time one thread has run, from `/proc/<pid>/task/<tid>/schedstat` (first field, ns).
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// One thread's identity and CPU time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadCpu {
    pub tid: i32,
    pub name: String,
    pub run_ns: u64,
}

/// Run time of every thread of `pid`, by tid.
pub fn threads_cpu(pid: i32) -> BTreeMap<i32, ThreadCpu> {
    let mut out = BTreeMap::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Some(run_ns) = fs::read_to_string(e.path().join("schedstat"))
            .ok()
            .and_then(|s| parse_schedstat(&s))
        else {
            continue;
        };
        let name = fs::read_to_string(e.path().join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        out.insert(tid, ThreadCpu { tid, name, run_ns });
    }
    out
}

/// CPU time of one thread, ns.
pub fn thread_cpu_ns(pid: i32, tid: i32) -> Option<u64> {
    parse_schedstat(&fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?)
}

/// utime + stime of the whole process (ticks → ns), which also counts threads that have exited.
pub fn process_cpu_ns(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu_ns(&text, clock_ticks())
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf is always safe to call.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// utime + stime from a `/proc/<pid>/stat` line, in ns. The command name may hold spaces and parentheses,
/// so fields are counted from the last `)`.
pub fn parse_stat_cpu_ns(text: &str, ticks_per_s: u64) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15 (1-based) → indices 11, 12 here.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) * 1_000_000_000 / ticks_per_s.max(1))
}

/// Resident set size of `pid` in bytes (`VmRSS`).
pub fn rss_bytes(pid: i32) -> Option<u64> {
    parse_vmrss(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Whether `pid` still exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Busy and total jiffies per CPU from `/proc/stat`.
pub fn cpu_times() -> BTreeMap<usize, (u64, u64)> {
    parse_proc_stat(&fs::read_to_string("/proc/stat").unwrap_or_default())
}

pub fn parse_proc_stat(text: &str) -> BTreeMap<usize, (u64, u64)> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let Some(name) = it.next() else { continue };
        let Some(idx) = name
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let v: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
        if v.len() < 5 {
            continue;
        }
        // user nice system idle iowait irq softirq steal ...
        let total: u64 = v.iter().take(8).sum();
        let idle = v[3] + v[4];
        out.insert(idx, (total - idle, total));
    }
    out
}

/// Busy fraction per CPU between two `cpu_times` snapshots.
pub fn cpu_busy(
    a: &BTreeMap<usize, (u64, u64)>,
    b: &BTreeMap<usize, (u64, u64)>,
) -> BTreeMap<usize, f64> {
    b.iter()
        .filter_map(|(cpu, (busy1, tot1))| {
            let (busy0, tot0) = a.get(cpu)?;
            let dt = tot1.saturating_sub(*tot0);
            (dt > 0).then(|| (*cpu, busy1.saturating_sub(*busy0) as f64 / dt as f64))
        })
        .collect()
}

/// The kernel's UDP counters (`/proc/net/snmp`, line pair starting with `Udp:`).
pub fn udp_counters() -> BTreeMap<String, u64> {
    parse_snmp_udp(&fs::read_to_string("/proc/net/snmp").unwrap_or_default())
}

pub fn parse_snmp_udp(text: &str) -> BTreeMap<String, u64> {
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let mut out = BTreeMap::new();
    if lines.len() >= 2 {
        for (k, v) in lines[0]
            .split_whitespace()
            .zip(lines[1].split_whitespace())
            .skip(1)
        {
            if let Ok(v) = v.parse() {
                out.insert(k.to_string(), v);
            }
        }
    }
    out
}

/// CPUs that the threads of `pid` are pinned to, each thread with a single-CPU mask (a thread-per-core
/// server's shards); empty when nothing is pinned.
pub fn pinned_cpus(pid: i32) -> Vec<usize> {
    single_cpus(threads_cpu(pid).keys().copied())
}

/// The CPUs of those of `tids` whose affinity mask is a single CPU, sorted, without repeats.
pub fn single_cpus(tids: impl Iterator<Item = i32>) -> Vec<usize> {
    let mut cpus: Vec<usize> = tids
        .filter_map(|tid| crate::sys::affinity_of(tid).ok())
        .filter(|m| m.len() == 1)
        .map(|m| m[0])
        .collect();
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// Find a running process whose command name is `comm` (when the harness attaches to a server it did
/// not start). `None` unless exactly one matches.
pub fn find_process(comm: &str) -> Option<i32> {
    let me = std::process::id() as i32;
    let found: Vec<i32> = fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect();
    (found.len() == 1).then(|| found[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_and_stat() {
        assert_eq!(parse_schedstat("123456789 2000 30\n"), Some(123_456_789));
        assert_eq!(parse_schedstat(""), None);
        let stat = "1234 (tg (weird) name) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_stat_cpu_ns(stat, 100), Some(2_000_000_000));
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(rss_bytes(me).unwrap_or(0) > 0);
        let t = threads_cpu(me);
        assert!(!t.is_empty());
        assert!(process_cpu_ns(me).is_some());
        assert!(!alive(i32::MAX));
    }

    #[test]
    fn vmrss_proc_stat_and_snmp() {
        assert_eq!(
            parse_vmrss("Name:\tx\nVmRSS:\t  2048 kB\n"),
            Some(2048 * 1024)
        );
        let a = parse_proc_stat(
            "cpu  1 2 3 4 5 6 7 8\ncpu0 10 0 10 80 0 0 0 0\ncpu1 0 0 0 100 0 0 0 0\n",
        );
        let b = parse_proc_stat("cpu0 60 0 10 130 0 0 0 0\ncpu1 0 0 0 200 0 0 0 0\n");
        let busy = cpu_busy(&a, &b);
        assert!((busy[&0] - 0.5).abs() < 1e-9);
        assert_eq!(busy[&1], 0.0);
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\nUdp: 10 0 3 9 2\nUdpLite: x\n";
        let u = parse_snmp_udp(snmp);
        assert_eq!(u["RcvbufErrors"], 2);
        assert_eq!(u["InErrors"], 3);
    }
}
