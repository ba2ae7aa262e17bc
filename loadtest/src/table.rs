//! The end-of-run table on stdout: a row per phase, then the summary, ceiling, knee, per-node and relay
//! figures, the warnings and the verdict.

use crate::report::Report;
use std::fmt::Write as _;

/// The end-of-run table.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n== talkgroup loadtest: {} — {} ==",
        r.scenario,
        if r.description.is_empty() {
            "ad hoc"
        } else {
            &r.description
        }
    );
    let _ = writeln!(
            s,
            "{:<12} {:>6} {:>5} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>5} {:>5} {:>8} {:>8} {:>8} {:>8}",
            "phase", "target", "chan", "in/s", "out/s", "p50µs", "p90µs", "p99µs", "p99.9µs", "maxµs", "loss%",
            "dup", "reord", "gaps", "grant99", "switch99", "path/pkt", "proc/pkt"
        );
    for p in &r.phases {
        // Per delivered media packet: the packet path (talkgroup's shard threads, the raw forwarder's
        // thread), then the whole process.
        let (path, proc) = match (&p.server, &p.raw) {
            (Some(x), _) => (x.shard_cpu_per_delivered_ns, x.cpu_per_delivered_ns),
            (None, Some(x)) => (x.cpu_per_delivered_ns, x.cpu_per_delivered_ns),
            (None, None) => (None, None),
        };
        let ns = |v: Option<f64>| v.map(|c| format!("{c:.0}ns")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
                s,
                "{:<12} {:>6} {:>5} {:>8.0} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.3} {:>5} {:>5} {:>5} {:>8} {:>8} {:>8} {:>8}",
                truncate(&p.name, 12),
                if p.target == "talkgroup" { "tg" } else { "raw" },
                p.active_channels,
                p.pps_in,
                p.pps_out,
                p.latency.p50_us,
                p.latency.p90_us,
                p.latency.p99_us,
                p.latency.p999_us,
                p.latency.max_us,
                p.loss_pct,
                p.recv.duplicates,
                p.seq.reordered,
                p.seq.gap_events,
                opt_us(p.grant.count, p.grant.p99_us),
                opt_us(p.switch.count, p.switch.p99_us),
                ns(path),
                ns(proc),
            );
    }
    let m = &r.summary;
    let _ = writeln!(
            s,
            "forwarding latency (measured talkgroup phases): p50 {:.1} µs  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  ({} samples; harness loopback floor p50 {:.1} µs, p99 {:.1})",
            m.latency.p50_us,
            m.latency.p90_us,
            m.latency.p99_us,
            m.latency.p999_us,
            m.latency.max_us,
            m.latency.count,
            r.harness.loopback_floor.p50_us,
            r.harness.loopback_floor.p99_us
        );
    let _ = writeln!(
            s,
            "loss {:.4} % ({} of {} deliveries missing)  duplicates {}  send errors {}  protocol violations {}  (seq: duplicates {} reordered {} gaps {} ({} numbers))",
            m.loss_pct,
            m.expected_deliveries as i64 - m.delivered as i64,
            m.expected_deliveries,
            m.duplicates,
            m.send_errors + m.keepalive_errors,
            m.protocol_violations,
            m.seq_duplicates,
            m.reordered,
            m.seq_gap_events,
            m.seq_lost,
        );
    let _ = writeln!(
            s,
            "press→granted p50 {:.0} µs p99 {:.0} µs ({} grants)   speaker switch p50 {:.0} µs p99 {:.0} µs ({} timed)",
            m.grant.p50_us, m.grant.p99_us, m.grant.count, m.switch.p50_us, m.switch.p99_us, m.switch.count
        );
    let _ = writeln!(
            s,
            "packets/s in {:.0}, out {:.0}; server CPU per delivered media packet {} ns (shard threads {} ns; idle server: {} of a core); RSS per member {}",
            m.pps_in,
            m.pps_out,
            fmt_opt(m.server_cpu_per_delivered_ns, 0),
            fmt_opt(m.server_shard_cpu_per_delivered_ns, 0),
            r.setup
                .server_idle_cpu_pct
                .map(|c| format!("{c:.1} %"))
                .unwrap_or_else(|| "n/a".into()),
            r.setup
                .rss_per_member_bytes
                .map(|b| format!("{:.0} B", b))
                .unwrap_or_else(|| "n/a".into())
        );
    if let Some(idle) = r.setup.redis_idle_commands_per_s {
        let run = r
            .setup
            .redis_run_commands_per_s
            .map(|c| format!("{c:.0}"))
            .unwrap_or_else(|| "n/a".into());
        let _ = writeln!(
            s,
            "redis commands/s from all nodes: {idle:.0} idle, {run} over the run"
        );
    }
    if let Some(c) = &r.ceiling {
        let _ = writeln!(
                s,
                "ceiling: raw {} ns vs talkgroup shard threads {} ns per delivered packet (medians of {} A/B rounds) → ratio {} (whole process: {} ns, ratio {}; goal ≥ {:.2}{})",
                fmt_opt(c.median_raw_ns, 0),
                fmt_opt(c.median_talkgroup_shard_ns, 0),
                c.rounds.len(),
                fmt_opt(c.ratio, 3),
                fmt_opt(c.median_talkgroup_process_ns, 0),
                fmt_opt(c.ratio_process, 3),
                c.goal,
                match c.meets_goal {
                    Some(true) => ", met",
                    Some(false) => ", NOT met",
                    None => "",
                }
            );
    }
    if let Some(k) = &r.knee {
        match &k.knee {
            Some(st) => {
                let _ = writeln!(
                        s,
                        "knee: {} channels, {:.0} pkt/s in, {:.0} out (p99 {:.0} µs, loss {:.3} %) — {}",
                        st.active_channels, st.pps_in, st.pps_out, st.p99_us, st.loss_pct, k.note
                    );
            }
            None => {
                let _ = writeln!(s, "knee: {}", k.note);
            }
        }
    }
    if r.phases.iter().any(|p| p.nodes.len() > 1) {
        let _ = writeln!(
            s,
            "per node: {:<12} {:>4} {:>9} {:>8} {:>9} {:>10} {:>9} {:>8}",
            "phase", "node", "cpu ms", "idle ms", "in", "forwarded", "relay out", "relay in"
        );
        for p in r.phases.iter().filter(|p| p.nodes.len() > 1 && p.measured) {
            for n in &p.nodes {
                let _ = writeln!(
                    s,
                    "          {:<12} {:>4} {:>9.0} {:>8.0} {:>9.0} {:>10.0} {:>9.0} {:>8.0}{}",
                    truncate(&p.name, 12),
                    n.node,
                    n.cpu_ns / 1e6,
                    n.idle_ns / 1e6,
                    n.packets_in,
                    n.forwarded,
                    n.relay_sent,
                    n.relay_in,
                    if n.relay_dropped > 0.0 {
                        format!(
                            "  relay dropped {:.0} {:?}",
                            n.relay_dropped, n.relay_dropped_by_reason
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    for (what, rc) in [
        ("process", &r.relay_cost),
        ("shard threads", &r.relay_cost_shards),
    ] {
        let Some(rc) = rc else { continue };
        let _ = writeln!(s, "relay cost, {what} CPU:");
        let _ = writeln!(
                s,
                "relay cost: local forward (1-node reference) {:.0} ns per forwarded packet, {:.0} ns per datagram in or out (fan-out {:.1})",
                rc.local_ns_per_fwd, rc.local_ns_per_datagram, rc.local_fanout
            );
        let _ = writeln!(
                s,
                "relay cost: per relay datagram sent at the speaker's node +{} ns; received + fanned out at a receiving node {} ns \
                 (fan-out {}; a local packet with that fan-out: {} ns; beyond its fan-out: +{} ns)",
                fmt_opt(rc.send_ns_per_relay, 0),
                fmt_opt(rc.recv_ns_per_relay, 0),
                fmt_opt(rc.recv_fanout, 1),
                fmt_opt(rc.recv_local_equiv_ns, 0),
                fmt_opt(rc.recv_extra_ns_per_relay, 0),
            );
        let _ = writeln!(
                s,
                "relay cost: all nodes talking: {} ns per delivered packet (vs {:.0} on one node), {} relay datagrams/s, +{} ns per relay datagram (send + receive)",
                fmt_opt(rc.all_ns_per_fwd, 0),
                rc.local_ns_per_fwd,
                fmt_opt(rc.all_relay_pps, 0),
                fmt_opt(rc.all_extra_ns_per_relay, 0),
            );
    }
    for w in &r.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    let _ = writeln!(
        s,
        "verdict: {}{}",
        if r.verdict.pass { "PASS" } else { "FAIL" },
        if r.verdict.reasons.is_empty() {
            String::new()
        } else {
            format!(" — {}", r.verdict.reasons.join("; "))
        }
    );
    s
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn opt_us(count: u64, v: f64) -> String {
    if count == 0 {
        "-".into()
    } else {
        format!("{v:.0}")
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "n/a".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn table_mentions_the_key_figures() {
        let t = table(&sample_report());
        assert!(t.contains("A1") && t.contains("B1"));
        assert!(t.contains("ratio 0.935"), "{t}");
        assert!(t.contains("knee: 30 channels"), "{t}");
        assert!(t.contains("verdict: PASS"));
    }
}
