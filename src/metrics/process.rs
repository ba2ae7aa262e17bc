//! CPU and memory of the process and of its threads, read from `/proc` at scrape time: how busy each
//! shard really is (the design's yardstick is CPU per forwarded packet, from per-thread `schedstat`).
//!
//! A shard is every thread named `shard-<i>-<n>` (`<n>`: its core; `shard-<i>-join` and `-watch`, if any,
//! only wait). `schedstat`'s first
//! field is the time on CPU in nanoseconds, exact where `stat`'s ticks are 10 ms coarse.

use std::collections::BTreeMap;

/// What one scrape reads from `/proc` (zeros where it cannot: not Linux, or `/proc` not mounted).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    /// CPU seconds of each shard's threads, by shard index.
    pub shard_cpu_seconds: BTreeMap<usize, f64>,
    /// CPU seconds of the control thread (signaling, floors, stores, metrics).
    pub control_cpu_seconds: f64,
    /// CPU seconds of the whole process (user + system).
    pub cpu_seconds: f64,
    /// Resident memory in bytes.
    pub resident_bytes: u64,
    /// Open file descriptors (sockets included).
    pub open_fds: u64,
    /// Limit on open file descriptors.
    pub max_fds: u64,
    /// Threads of the process.
    pub threads: u64,
    /// Start time, Unix seconds.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Reads the current values.
    pub fn read() -> ProcessStats {
        let mut p = ProcessStats::default();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                p.threads += 1;
                let path = task.path();
                let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                let Some(secs) = std::fs::read_to_string(path.join("schedstat"))
                    .ok()
                    .and_then(|s| cpu_seconds(&s))
                else {
                    continue;
                };
                match thread_role(name.trim()) {
                    Some(Role::Shard(i)) => *p.shard_cpu_seconds.entry(i).or_default() += secs,
                    Some(Role::Control) => p.control_cpu_seconds += secs,
                    None => {}
                }
            }
        }
        let ticks = clock_ticks();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces), from field 3 on.
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                // utime (14) and stime (15), starttime (22), rss pages (24); here 0 is field 3.
                p.cpu_seconds = (num(11) + num(12)) / ticks;
                p.resident_bytes = (num(21) as u64).saturating_mul(page_size());
                p.start_time_seconds = boot_time() + num(19) / ticks;
            }
        }
        p.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        // SAFETY: getrlimit only writes the struct it is given.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            p.max_fds = lim.rlim_cur;
        }
        p
    }
}

/// What a thread does, from its name.
#[derive(Debug, PartialEq, Eq)]
enum Role {
    Shard(usize),
    Control,
}

fn thread_role(name: &str) -> Option<Role> {
    if name == "control" {
        return Some(Role::Control);
    }
    let rest = name.strip_prefix("shard-")?;
    let (index, n) = rest.split_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None; // our join and watch threads only wait
    }
    index.parse().ok().map(Role::Shard)
}

/// The first field of `schedstat` (ns on CPU), in seconds.
fn cpu_seconds(schedstat: &str) -> Option<f64> {
    let ns: u64 = schedstat.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn page_size() -> u64 {
    // SAFETY: as above.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096)
}

/// When the system booted, Unix seconds (`btime` of `/proc/stat`).
fn boot_time() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_threads_are_known_by_name_and_waiting_threads_are_not() {
        assert_eq!(thread_role("shard-0-1"), Some(Role::Shard(0)));
        assert_eq!(thread_role("shard-12-13"), Some(Role::Shard(12)));
        assert_eq!(thread_role("shard-0-join"), None);
        assert_eq!(thread_role("shard-1-watch"), None);
        assert_eq!(thread_role("control"), Some(Role::Control));
        assert_eq!(thread_role("tokio-runtime-w"), None);
        assert_eq!(cpu_seconds("1500000000 20 3\n"), Some(1.5));
    }

    #[test]
    fn this_process_reads_itself() {
        let p = ProcessStats::read();
        assert!(p.threads >= 1);
        assert!(p.resident_bytes > 0);
        assert!(p.open_fds > 0);
        assert!(p.start_time_seconds > 1e9, "{p:?}");
    }
}
