//! The cluster side of the control core in virtual time: liveness before registration, relay targets,
//! a dead node's members removed, and re-registration when the store comes back empty.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use super::{config, StoreMode, TestHub};
use crate::control::calls::StoreCall;
use crate::shard::Command;
use crate::state::{NodeInfo, StoreEvent};

fn relay(port: u16) -> Vec<SocketAddr> {
    vec![
        format!("127.0.0.1:{port}").parse().unwrap(),
        format!("127.0.0.1:{}", port + 1).parse().unwrap(),
    ]
}

/// Node "a" with the relay on, its store subscription up, and "alice" in "ops".
fn node_a() -> (TestHub, u64) {
    let mut c = config("a", true);
    c.relay_addrs = Some(relay(51000));
    let mut hub = TestHub::with_config(c);
    hub.store_event(StoreEvent::Resync);
    let a = hub.connect();
    hub.join(a, "ops", "alice");
    (hub, a)
}

/// Node "b", as the store sees it: alive, serving "ops", with "bob" joined there.
fn node_b_joins(hub: &mut TestHub) {
    let info = NodeInfo {
        node: "b".into(),
        relay: relay(52000),
        ..NodeInfo::default()
    };
    let calls = [
        StoreCall::Announce {
            info,
            ttl: Duration::from_secs(10),
        },
        StoreCall::SetChannelNode {
            channel: "ops".into(),
            node: "b".into(),
            present: true,
        },
        StoreCall::Join {
            channel: "ops".into(),
            member: "bob".into(),
            node: "b".into(),
        },
    ];
    for call in &calls {
        hub.store.answer(call, "b", hub.now, hub.t0);
    }
    // What b's calls published reaches a (which follows "ops").
    for event in std::mem::take(&mut hub.store.published) {
        hub.store_event(event);
    }
    hub.store_event(StoreEvent::Presence {
        channel: "ops".into(),
        member: "bob".into(),
        node: "b".into(),
        joined: true,
    });
}

#[test]
fn liveness_is_announced_before_channels_are_registered() {
    let mut c = config("a", true);
    c.relay_addrs = Some(relay(51000));
    let mut hub = TestHub::with_config(c);
    hub.mode = StoreMode::Hanging;
    hub.store_event(StoreEvent::Resync);
    let a = hub.connect();
    hub.mode = StoreMode::Up;
    hub.join(a, "ops", "alice");
    hub.calls.clear();
    hub.mode = StoreMode::Hanging;
    hub.store_event(StoreEvent::Resync);
    let names = hub.call_names();
    assert!(names.contains(&"announce"), "{names:?}");
    assert!(
        !names.contains(&"set_channel_node"),
        "no registration before the announce is answered: {names:?}"
    );
    hub.mode = StoreMode::Up;
    let store = &mut hub.store;
    let (now, t0) = (hub.now, hub.t0);
    let mut answers = vec![];
    for (id, call) in std::mem::take(&mut hub.hanging) {
        answers.push((id, store.answer(&call, "a", now, t0)));
    }
    for (id, reply) in answers {
        hub.input(super::Input::Store { id, reply });
    }
    assert!(hub.calls.contains(&StoreCall::SetChannelNode {
        channel: "ops".into(),
        node: "a".into(),
        present: true
    }));
}

#[test]
fn speakers_are_relayed_once_to_each_other_live_node_and_only_live_nodes_are_accepted() {
    let (mut hub, _) = node_a();
    node_b_joins(&mut hub);
    hub.commands.clear();
    hub.advance(Duration::from_secs(1));
    let shard = crate::shard::shard_of("ops", 2);
    let targets: Vec<_> = hub
        .commands
        .iter()
        .filter_map(|(s, c)| match c {
            Command::RelayTargets { channel, targets } if channel == "ops" => Some((*s, targets)),
            _ => None,
        })
        .collect();
    assert_eq!(targets, vec![(shard, &vec![relay(52000)[shard]])]);
    let peers = hub
        .commands
        .iter()
        .filter(|(_, c)| {
            let want: Vec<_> = relay(52000)
                .into_iter()
                .map(|a| (a, "b".to_string()))
                .collect();
            matches!(c, Command::RelayPeers { peers } if *peers == want)
        })
        .count();
    assert_eq!(peers, 2, "every shard accepts relay from b's addresses");
    // Nothing changed: nothing is sent again.
    hub.commands.clear();
    hub.advance(Duration::from_secs(1));
    assert!(hub.commands.is_empty(), "{:?}", hub.commands);
}

#[test]
fn a_dead_nodes_members_leave_and_are_evicted_from_the_store() {
    let (mut hub, a) = node_a();
    node_b_joins(&mut hub);
    assert_eq!(
        hub.expect(a, |v| v["type"] == "presence")["joined"],
        json!("bob")
    );
    hub.advance(Duration::from_secs(9));
    assert!(hub.take(a).is_empty(), "b is alive for 10 s");
    // b stops announcing: its liveness key expires at 10 s, the next registry read finds it dead.
    hub.advance(Duration::from_secs(2));
    let left = hub.expect(a, |v| v["type"] == "presence");
    assert_eq!(left["left"], json!("bob"));
    assert!(hub.calls.contains(&StoreCall::EvictNode {
        channel: "ops".into(),
        node: "b".into()
    }));
    assert!(hub.take(a).is_empty(), "told once");
}

#[test]
fn a_store_that_comes_back_empty_is_filled_again_by_re_registration() {
    let (mut hub, _) = node_a();
    hub.store_event(StoreEvent::Down);
    hub.store.wipe();
    // The command connection is still in its backoff for a moment: calls fail, and are retried.
    hub.mode = StoreMode::Failing;
    hub.calls.clear();
    hub.store_event(StoreEvent::Resync);
    hub.advance(Duration::from_millis(500));
    let announces = hub
        .calls
        .iter()
        .filter(|c| matches!(c, StoreCall::Announce { .. }))
        .count();
    assert!(announces >= 2, "retried: {:?}", hub.calls);
    hub.mode = StoreMode::Up;
    hub.advance(Duration::from_millis(250));
    assert!(hub.store.nodes.contains_key("a"), "alive again");
    assert!(
        hub.store.channel_nodes["ops"].contains("a"),
        "registered again"
    );
    assert!(
        hub.store.members["ops"].contains("alice"),
        "session re-added"
    );
}

#[test]
fn an_agreed_relay_key_is_put_back_when_the_store_comes_back_empty() {
    let mut c = config("a", true);
    c.relay_addrs = Some(relay(51000));
    c.cluster_key = Some("k1".into());
    let mut hub = TestHub::with_config(c);
    hub.store_event(StoreEvent::Resync);
    assert_eq!(hub.store.cluster_key.as_deref(), Some("k1"));
    // Redis restarts empty: the key comes back with the node's other registrations.
    hub.store_event(StoreEvent::Down);
    hub.store.wipe();
    hub.store_event(StoreEvent::Resync);
    assert_eq!(hub.store.cluster_key.as_deref(), Some("k1"));
    assert_eq!(hub.core.counters().cluster_key_mismatch, 0);
    // A node that started meanwhile made another key: this node says relay with it will fail.
    hub.store_event(StoreEvent::Down);
    hub.store.wipe();
    hub.store.cluster_key = Some("k2".into());
    hub.store_event(StoreEvent::Resync);
    assert_eq!(hub.core.counters().cluster_key_mismatch, 1);
}
