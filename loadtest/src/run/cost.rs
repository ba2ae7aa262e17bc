//! The yardstick: server CPU per **delivered media packet**, the same for talkgroup and the raw forwarder.
//!
//! - The denominator is the harness's own count of media packets its listeners received in the phase
//!   (first copies, right channel, not their own audio: `tally.rs`), not the server's
//!   `talkgroup_packets_forwarded_total`, which counts every datagram it transmits — RTCP sender reports,
//!   and for WebRTC legs STUN and DTLS too — and so flattered the WebRTC figures. The raw forwarder is
//!   measured by the same count, not by its own `sendmmsg` tally. (When the server exports a media-only
//!   counter it can be shown next to this one; the yardstick stays what arrived.)
//! - The numerator is schedstat run time over the phase, split by thread: the shard threads (`shard-N`,
//!   the packet path) and the rest (the control plane: signalling, the floor, HTTP, the store client).
//!   Each share is divided by the same delivered count — shard CPU per packet is *all* shards' CPU over
//!   *all* packets, never the busiest thread over everyone's packets.
//! - The `/metrics` scrapes are outside the window (`snapshot.rs`), so they cost nothing here.
//!
//! Raw phases do no signalling (the raw forwarder has no floor; pressing against the server while the
//! media goes elsewhere would be revoked for silence after T1). So the comparison is made where both sides
//! do the same work: the ceiling ratio takes talkgroup's packet path (shard threads) against the raw
//! forwarder's one thread — signalling CPU is excluded from both — and the whole-process ratio, control
//! plane included, is reported beside it.

use crate::report::ThreadDelta;

/// A talkgroup shard thread: the packet path. talkgroup names a shard's thread `shard-N-<core>`; the `shard-N-join` thread only waits. Everything else in the
/// process — the `control` thread (WebSocket signalling, the floor, HTTP and `/metrics`, the store
/// client), the main thread, the join waiters — is the control plane.
pub fn is_shard_thread(name: &str) -> bool {
    name.strip_prefix("shard-").is_some_and(|rest| {
        rest.starts_with(|c: char| c.is_ascii_digit()) && !rest.ends_with("-join")
    })
}

/// A server's CPU over one phase, attributed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attribution {
    /// Σ every thread.
    pub cpu_ns: u64,
    /// Σ the shard threads: the packet path.
    pub shard_cpu_ns: u64,
    /// The rest: the control plane.
    pub control_cpu_ns: u64,
    pub per_delivered_ns: Option<f64>,
    pub shard_per_delivered_ns: Option<f64>,
    /// `cpu_ns` less the idle CPU over the phase (`idle_ns`), per delivered packet: the per-packet cost
    /// without the fixed cost of timers and keep-alives.
    pub marginal_per_delivered_ns: Option<f64>,
}

/// Attribute `threads`' CPU over a phase in which `delivered` media packets reached listeners; `idle_ns`:
/// the server's idle CPU scaled to the phase, when known.
pub fn attribute(threads: &[ThreadDelta], delivered: u64, idle_ns: Option<f64>) -> Attribution {
    let cpu_ns: u64 = threads.iter().map(|t| t.cpu_ns).sum();
    let shard_cpu_ns: u64 = threads
        .iter()
        .filter(|t| is_shard_thread(&t.name))
        .map(|t| t.cpu_ns)
        .sum();
    Attribution {
        cpu_ns,
        shard_cpu_ns,
        control_cpu_ns: cpu_ns - shard_cpu_ns,
        per_delivered_ns: per_packet(cpu_ns as f64, delivered),
        shard_per_delivered_ns: per_packet(shard_cpu_ns as f64, delivered),
        marginal_per_delivered_ns: idle_ns
            .and_then(|idle| per_packet((cpu_ns as f64 - idle).max(0.0), delivered)),
    }
}

/// CPU per delivered packet; `None` when nothing was delivered.
pub fn per_packet(cpu_ns: f64, delivered: u64) -> Option<f64> {
    (delivered > 0).then(|| cpu_ns / delivered as f64)
}

/// The ceiling ratio: raw CPU per packet ÷ talkgroup's (1.0: as cheap as the kernel allows).
pub fn ratio(raw: Option<f64>, talkgroup: Option<f64>) -> Option<f64> {
    match (raw, talkgroup) {
        (Some(r), Some(t)) if t > 0.0 => Some(r / t),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(name: &str, cpu_ns: u64) -> ThreadDelta {
        ThreadDelta {
            tid: 1,
            name: name.into(),
            cpu_ns,
        }
    }

    #[test]
    fn cpu_per_delivered_packet_by_thread_role() {
        // Two shards, 3 ms and 1 ms; the control thread 2 ms (signalling); 2,000 packets delivered.
        let threads = [
            thread("shard-0-1", 3_000_000),
            thread("control", 2_000_000),
            thread("shard-1-2", 1_000_000),
            thread("shard-0-join", 0),
            thread("talkgroup", 0),
        ];
        let a = attribute(&threads, 2_000, Some(1_000_000.0));
        assert_eq!(a.cpu_ns, 6_000_000);
        assert_eq!(a.shard_cpu_ns, 4_000_000);
        assert_eq!(a.control_cpu_ns, 2_000_000);
        assert_eq!(a.per_delivered_ns, Some(3_000.0));
        // All shards over all packets — not the busiest shard (3 ms) over everyone's packets (1,500).
        assert_eq!(a.shard_per_delivered_ns, Some(2_000.0));
        assert_eq!(a.marginal_per_delivered_ns, Some(2_500.0));
    }

    #[test]
    fn nothing_delivered_has_no_cost_per_packet() {
        let a = attribute(&[thread("shard-0", 5)], 0, None);
        assert_eq!(
            (
                a.per_delivered_ns,
                a.shard_per_delivered_ns,
                a.marginal_per_delivered_ns
            ),
            (None, None, None)
        );
        assert_eq!(per_packet(10.0, 4), Some(2.5));
    }

    #[test]
    fn the_ratio_is_raw_over_talkgroup() {
        // The raw forwarder: 2.4 ms for 1,000 packets; talkgroup's shards: 2.6 ms for the same 1,000.
        let raw = per_packet(2_400_000.0, 1_000);
        let tg = attribute(&[thread("shard-0", 2_600_000)], 1_000, None);
        let r = ratio(raw, tg.shard_per_delivered_ns).unwrap();
        assert!((r - 2_400.0 / 2_600.0).abs() < 1e-12);
        assert_eq!(ratio(raw, Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
    }

    #[test]
    fn shard_threads_are_the_packet_path() {
        // As /proc/<pid>/task/*/comm shows them for `talkgroup serve --shards 2`.
        assert!(is_shard_thread("shard-0-1") && is_shard_thread("shard-1-2"));
        assert!(is_shard_thread("shard-12"));
        for other in ["shard-0-join", "shard-", "control", "talkgroup", "shardy"] {
            assert!(!is_shard_thread(other), "{other}");
        }
    }
}
