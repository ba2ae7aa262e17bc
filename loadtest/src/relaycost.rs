//! CPU attribution for the node-to-node relay (`--nodes N`): what a relayed packet costs at the
//! speaker's node and at a receiving node, against a local forward.
//!
//! Inputs are per-node phase deltas ([`NodePhase`]): busy CPU (schedstat run time less the node's idle
//! CPU over the phase) and the node's `/metrics` counters. Three measurements of the same load:
//!
//! - **reference** (a 1-node cluster: same Redis store, every member on one node): the local cost,
//!   `a` = busy ÷ forwarded packets, and `c` = busy ÷ (packets in + forwarded), the cost of one datagram
//!   handled (received or sent), the unit used to take the local work out of the cluster figures;
//! - **all** (N nodes, any member may speak): total relay overhead per relay datagram (send + receive),
//!   (Σ busy − c·Σ(in + forwarded)) ÷ Σ relay sent;
//! - **split** (N nodes, speakers only on node 0): node 0 only sends relay datagrams, the others only
//!   receive them, so the two sides separate: send = (busy₀ − c·(in₀ + fwd₀)) ÷ relay sent₀;
//!   receive + fan-out = Σ busyⱼ ÷ Σ relay inⱼ, of which beyond sending the fan-out
//!   (Σ busyⱼ − c·Σ fwdⱼ) ÷ Σ relay inⱼ — to compare with `c`, a local speaker packet received.

use crate::report::{NodePhase, RelayCost, Report, SPLIT_PHASE};

fn sum(nodes: &[NodePhase], f: impl Fn(&NodePhase) -> f64) -> f64 {
    nodes.iter().map(f).sum()
}

fn div(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// `reference`: the 1-node measure phase; `all`: the N-node measure phase (with its seconds);
/// `split`: the N-node phase with speakers on node 0 only.
pub fn attribute(
    reference: &NodePhase,
    all: Option<(&[NodePhase], f64)>,
    split: Option<&[NodePhase]>,
) -> Option<RelayCost> {
    let busy = |n: &NodePhase| n.busy_ns();
    let a = div(busy(reference), reference.forwarded)?;
    let c = div(busy(reference), reference.packets_in + reference.forwarded)?;
    let mut r = RelayCost {
        local_ns_per_fwd: a,
        local_ns_per_datagram: c,
        local_fanout: div(reference.forwarded, reference.packets_in).unwrap_or(0.0),
        method:
            "busy = schedstat run time − idle CPU; c = reference busy ÷ (in + forwarded); \
                 relay cost = (busy − c·local datagrams) ÷ relay datagrams (see loadtest/README.md)"
                .into(),
        ..Default::default()
    };
    if let Some((nodes, secs)) = all {
        let b = sum(nodes, busy);
        let sent = sum(nodes, |n| n.relay_sent);
        let local = sum(nodes, |n| n.packets_in + n.forwarded);
        r.all_ns_per_fwd = div(b, sum(nodes, |n| n.forwarded));
        r.all_relay_pps = div(sent, secs);
        r.all_extra_ns_per_relay = div(b - c * local, sent);
    }
    if let Some(nodes) = split {
        if let Some((n0, rest)) = nodes.split_first() {
            r.send_ns_per_relay = div(busy(n0) - c * (n0.packets_in + n0.forwarded), n0.relay_sent);
            let b = sum(rest, busy);
            let rin = sum(rest, |n| n.relay_in);
            let fwd = sum(rest, |n| n.forwarded);
            r.recv_ns_per_relay = div(b, rin);
            r.recv_fanout = div(fwd, rin);
            r.recv_extra_ns_per_relay = div(b - c * fwd, rin);
            r.recv_local_equiv_ns = r.recv_fanout.map(|f| c * (1.0 + f));
        }
    }
    Some(r)
}

/// From the 1-node reference report and the N-node report: their `measure` phases and the split phase.
/// `shards`: from the shard threads' CPU alone.
pub fn from_reports(reference: &Report, cluster: &Report, shards: bool) -> Option<RelayCost> {
    let phase = |r: &'_ Report, name: &str| {
        r.phases
            .iter()
            .find(|p| p.name == name && !p.nodes.is_empty())
            .map(|p| {
                let mut p = p.clone();
                if shards {
                    p.nodes = p.nodes.iter().map(NodePhase::shards_only).collect();
                }
                p
            })
    };
    let rf = phase(reference, "measure")?;
    let all = phase(cluster, "measure");
    let split = phase(cluster, SPLIT_PHASE);
    attribute(
        &rf.nodes[0],
        all.as_ref().map(|p| (p.nodes.as_slice(), p.seconds)),
        split.as_ref().map(|p| p.nodes.as_slice()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cpu: f64, idle: f64, inn: f64, fwd: f64, sent: f64, rin: f64) -> NodePhase {
        NodePhase {
            cpu_ns: cpu,
            idle_ns: idle,
            packets_in: inn,
            forwarded: fwd,
            relay_sent: sent,
            relay_in: rin,
            ..Default::default()
        }
    }

    #[test]
    fn synthetic_costs_are_recovered() {
        // Model: 1000 ns per datagram in or out, 1500 ns extra per relay sent, 2500 ns per relay in
        // (on top of sending its fan-out); idle 1e6 ns per node.
        let (d, s, ri, idle) = (1000.0, 1500.0, 2500.0, 1e6);
        let cost =
            |inn: f64, fwd: f64, sent: f64, rin: f64| idle + d * (inn + fwd) + s * sent + ri * rin;
        // Reference: 1000 packets in, 5 listeners each.
        let reference = node(
            cost(1000.0, 5000.0, 0.0, 0.0),
            idle,
            1000.0,
            5000.0,
            0.0,
            0.0,
        );
        // Split: node 0 has the speakers (1000 in, 1 local listener, 2 relays each); nodes 1, 2 get
        // 1000 relays each and fan out to 2 listeners.
        let split = [
            node(
                cost(1000.0, 1000.0, 2000.0, 0.0),
                idle,
                1000.0,
                1000.0,
                2000.0,
                0.0,
            ),
            node(
                cost(0.0, 2000.0, 0.0, 1000.0),
                idle,
                0.0,
                2000.0,
                0.0,
                1000.0,
            ),
            node(
                cost(0.0, 2000.0, 0.0, 1000.0),
                idle,
                0.0,
                2000.0,
                0.0,
                1000.0,
            ),
        ];
        let r = attribute(&reference, Some((&split, 10.0)), Some(&split)).unwrap();
        assert_eq!(r.local_ns_per_datagram, 1000.0);
        assert_eq!(r.local_ns_per_fwd, 1200.0);
        assert_eq!(r.local_fanout, 5.0);
        assert_eq!(r.send_ns_per_relay, Some(1500.0));
        assert_eq!(r.recv_extra_ns_per_relay, Some(2500.0));
        assert_eq!(r.recv_fanout, Some(2.0));
        assert_eq!(r.recv_ns_per_relay, Some(2500.0 + 2000.0));
        assert_eq!(r.recv_local_equiv_ns, Some(3000.0));
        // Send and receive together, per relay datagram.
        assert_eq!(r.all_extra_ns_per_relay, Some(1500.0 + 2500.0));
        assert_eq!(r.all_relay_pps, Some(200.0));
    }

    #[test]
    fn nothing_forwarded_gives_nothing() {
        assert!(attribute(&node(1e6, 0.0, 0.0, 0.0, 0.0, 0.0), None, None).is_none());
        let reference = node(2e6, 0.0, 100.0, 100.0, 0.0, 0.0);
        let r = attribute(
            &reference,
            None,
            Some(&[node(1.0, 0.0, 0.0, 0.0, 0.0, 0.0)]),
        )
        .unwrap();
        assert_eq!(r.send_ns_per_relay, None);
        assert_eq!(r.recv_ns_per_relay, None);
    }

    #[test]
    fn from_reports_finds_the_phases_and_the_shard_threads() {
        use crate::report::PhaseResult;
        let phase = |name: &str, nodes: Vec<NodePhase>| PhaseResult {
            name: name.into(),
            seconds: 10.0,
            nodes,
            ..Default::default()
        };
        let mut reference = node(3000.0, 0.0, 1.0, 2.0, 0.0, 0.0);
        reference.shard_cpu_ns = 300.0;
        let reference = Report {
            phases: vec![phase("warmup", vec![]), phase("measure", vec![reference])],
            ..Default::default()
        };
        let cluster = Report {
            phases: vec![
                phase("measure", vec![node(1.0, 0.0, 1.0, 1.0, 1.0, 0.0)]),
                phase(SPLIT_PHASE, vec![node(1.0, 0.0, 1.0, 1.0, 1.0, 0.0)]),
            ],
            ..Default::default()
        };
        let all = from_reports(&reference, &cluster, false).unwrap();
        assert_eq!(all.local_ns_per_datagram, 1000.0);
        assert_eq!(all.all_relay_pps, Some(0.1));
        assert!(all.send_ns_per_relay.is_some());
        let shards = from_reports(&reference, &cluster, true).unwrap();
        assert_eq!(shards.local_ns_per_datagram, 100.0);
        // No measure phase in the reference: nothing to compare with.
        assert!(from_reports(&Report::default(), &cluster, false).is_none());
    }
}
