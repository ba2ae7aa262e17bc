//! Thin wrappers over the few Linux calls the harness needs: the monotonic clock, CPU pinning, the
//! open-file limit and the timer slack.
//!
//! Everything runs on one machine, so the sender's stamp and the receiver's clock are the same
//! `CLOCK_MONOTONIC`: one-way latency is a plain subtraction, no clock sync needed.

use std::io;
use std::time::Duration;

/// Nanoseconds on `CLOCK_MONOTONIC` (the clock `std::time::Instant` uses on Linux, but as a number that
/// fits in a packet).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// How close to a deadline the harness's paced threads stop sleeping and spin: timer wake-ups overshoot
/// by 50–150 µs on a VM, which would otherwise show up as latency.
pub const SPIN_NS: u64 = 200_000;

/// Wait until `due` (mono ns): sleep most of the way, spin (yielding) the rest.
pub fn wait_until(due: u64) {
    let now = mono_ns();
    if due > now + SPIN_NS {
        std::thread::sleep(Duration::from_nanos(due - now - SPIN_NS));
    }
    while mono_ns() < due {
        std::thread::yield_now();
    }
}

/// CPU time the calling thread has used, ns (`CLOCK_THREAD_CPUTIME_ID`: a real syscall, ~0.2 µs).
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel thread id of the calling thread (for `/proc/self/task/<tid>/schedstat`).
pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// The CPUs thread `tid` (0 = the caller) may run on.
pub fn affinity_of(tid: i32) -> io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; the size passed matches the buffer.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cpus = Vec::new();
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: cpu < CPU_SETSIZE.
        if unsafe { libc::CPU_ISSET(cpu, &set) } {
            cpus.push(cpu);
        }
    }
    Ok(cpus)
}

/// Pin the calling thread to `cpus`. Threads spawned afterwards inherit the mask.
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    pin_thread(0, cpus)
}

/// Pin thread `tid` of this process (0: the caller) to `cpus`; nothing to do when `cpus` is empty.
pub fn pin_thread(tid: i32, cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu < libc::CPU_SETSIZE as usize {
            // SAFETY: cpu < CPU_SETSIZE.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
    }
    // SAFETY: valid set and size.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Make `nanosleep`/futex timeouts of the calling thread precise: the default 50 µs slack would show up
/// as harness jitter in every latency sample.
pub fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// Raise RLIMIT_NOFILE so that at least `want` descriptors can be open: the soft limit up to the hard
/// one, and the hard one too when we may (root) — thousands of members need one UDP socket each.
/// Returns the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    if lim.rlim_max < want {
        // Only root can raise the hard limit; the kernel caps it at fs.nr_open.
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(1 << 20);
        let raised = libc::rlimit {
            rlim_cur: want.min(nr_open),
            rlim_max: want.min(nr_open),
        };
        // SAFETY: valid pointer to an rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(raised.rlim_cur);
        }
    }
    let soft = libc::rlimit {
        rlim_cur: want.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(soft.rlim_cur)
}

/// An epoll set (closed on drop): the receiving threads wait on all their sockets at once.
pub struct Epoll {
    fd: i32,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 with a valid flag.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
        })
    }

    /// Watch `fd` for input; its events carry `token`.
    pub fn add(&self, fd: i32, token: u64) {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both descriptors are open; ev is valid for the call.
        unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    }

    /// Wait up to `timeout_ms` for input; the number of ready descriptors (see [`Epoll::token`]).
    pub fn wait(&mut self, timeout_ms: i32) -> usize {
        let cap = self.events.len() as i32;
        // SAFETY: `events` has room for `cap` entries.
        let n = unsafe { libc::epoll_wait(self.fd, self.events.as_mut_ptr(), cap, timeout_ms) };
        n.max(0) as usize
    }

    /// The token of ready descriptor `i` of the last `wait`.
    pub fn token(&self, i: usize) -> u64 {
        self.events[i].u64
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// Set a socket buffer size option (SO_RCVBUF / SO_SNDBUF), best effort.
pub fn set_sock_buf(fd: i32, opt: libc::c_int, bytes: usize) {
    let v = bytes as libc::c_int;
    // SAFETY: fd is an open socket owned by the caller; the option value is a c_int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mono_clock_moves_forward() {
        let a = mono_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = mono_ns();
        assert!(b >= a + 1_000_000);
    }

    #[test]
    fn affinity_is_readable() {
        let cpus = affinity_of(0).expect("sched_getaffinity");
        assert!(!cpus.is_empty());
    }
}
