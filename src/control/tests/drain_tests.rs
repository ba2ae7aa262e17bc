//! Draining in virtual time: idle clients are sent on at once, a talk burst in progress is heard to its
//! end (speaker and listeners), new joins, connections and presses are refused, the deadline closes
//! whoever is left, the registry is told, and a dead shard drains the node.

use std::time::Duration;

use serde_json::{json, Value};

use super::{config, TestHub};
use crate::control::Input;
use crate::ids::ConnId;
use crate::state::{Holder, StoreEvent};

fn goaway(hub: &mut TestHub, conn: ConnId) -> Value {
    hub.expect(conn, |v| v["type"] == "goaway")
}

fn has_goaway(hub: &TestHub, conn: ConnId) -> bool {
    hub.frames
        .get(&conn)
        .is_some_and(|f| f.iter().any(|v| v["type"] == "goaway"))
}

/// alice talks in "ops" with bob listening; carol is alone in the quiet "lobby".
fn burst_in_progress() -> (TestHub, ConnId, ConnId, ConnId) {
    let mut hub = TestHub::new();
    let (a, b, c) = (hub.connect(), hub.connect(), hub.connect());
    hub.join(a, "ops", "alice");
    hub.join(b, "ops", "bob");
    hub.join(c, "lobby", "carol");
    hub.press(a, "ops");
    hub.floor(a, "granted");
    for conn in [a, b, c] {
        hub.take(conn);
    }
    (hub, a, b, c)
}

#[test]
fn a_talk_burst_in_progress_is_heard_to_its_end_and_idle_clients_go_at_once() {
    let (mut hub, a, b, c) = burst_in_progress();
    hub.input(Input::Drain);
    assert!(hub.core.is_draining());
    let g = goaway(&mut hub, c);
    assert_eq!(
        g,
        json!({"type":"goaway","reason":"draining","retry_after_ms":2000})
    );
    assert!(hub.closed.contains(&c), "an idle client is closed at once");
    assert!(!hub.closed.contains(&a) && !hub.closed.contains(&b));
    assert!(!has_goaway(&hub, a) && !has_goaway(&hub, b));
    // The burst goes on for a while: nothing happens to its members.
    hub.advance(Duration::from_secs(5));
    assert!(!hub.closed.contains(&a) && !hub.closed.contains(&b));
    assert!(!hub.core.is_drained());
    // The speaker's release ends it: everyone hears `idle`, then `goaway`, then is closed.
    hub.release(a, "ops");
    for conn in [a, b] {
        let frames = hub.take(conn);
        let kinds: Vec<&str> = frames
            .iter()
            .map(|v| {
                v["state"]
                    .as_str()
                    .unwrap_or(v["type"].as_str().unwrap_or(""))
            })
            .collect();
        let idle = kinds.iter().position(|k| *k == "idle");
        let gone = kinds.iter().position(|k| *k == "goaway");
        assert!(
            idle.is_some() && gone > idle,
            "idle, then goaway: {frames:?}"
        );
        assert!(hub.closed.contains(&conn));
    }
    assert!(hub.core.is_drained());
    assert_eq!(hub.core.counters().goaways, 3);
}

#[test]
fn while_draining_joins_connections_and_presses_are_refused() {
    let (mut hub, a, b, _) = burst_in_progress();
    hub.input(Input::Drain);
    // bob, still listening, tries to join another channel: goaway with the join's id, and his
    // connection stays open while "ops" is talking.
    hub.send(
        b,
        json!({"type":"join","channel":"other","member":"bob","transport":"rtp",
               "rtp_addr":"127.0.0.1:50002","id":7}),
    );
    let g = goaway(&mut hub, b);
    assert_eq!(g["id"], json!(7));
    assert!(!hub.closed.contains(&b));
    assert!(hub.core.channels().iter().all(|c| c.channel != "other"));
    // A press is denied: a new burst would only be cut.
    hub.press(b, "ops");
    assert_eq!(hub.floor(b, "denied")["reason"], json!("unavailable"));
    // A new connection is sent on at once.
    let d = hub.connect();
    goaway(&mut hub, d);
    assert!(hub.closed.contains(&d));
    assert_eq!(hub.core.counters().joins_refused_draining, 1);
    hub.release(a, "ops");
    assert!(hub.core.is_drained());
}

#[test]
fn the_drain_deadline_closes_whoever_is_still_talking() {
    let mut c = config("a", false);
    c.drain_timeout = Duration::from_secs(10);
    let mut hub = TestHub::with_config(c);
    let (a, b) = (hub.connect(), hub.connect());
    hub.join(a, "ops", "alice");
    hub.join(b, "ops", "bob");
    hub.press(a, "ops");
    hub.floor(a, "granted");
    hub.input(Input::Drain);
    hub.advance(Duration::from_millis(9_900));
    assert!(!hub.closed.contains(&a) && !hub.closed.contains(&b));
    hub.advance(Duration::from_millis(200));
    for conn in [a, b] {
        goaway(&mut hub, conn);
        assert!(hub.closed.contains(&conn), "closed at the deadline");
    }
    assert!(hub.core.is_drained());
}

#[test]
fn a_listener_of_a_speaker_on_another_node_stays_until_that_burst_ends() {
    let mut hub = TestHub::with_config(config("a", true));
    hub.store_event(StoreEvent::Resync);
    let b = hub.connect();
    hub.join(b, "ops", "bob");
    let holder = Holder {
        member: "zed".into(),
        node: "z".into(),
        epoch: 900,
        priority: 0,
        emergency: false,
    };
    hub.store_event(StoreEvent::Floor {
        channel: "ops".into(),
        holder: Some(holder),
        epoch: 900,
    });
    hub.floor(b, "taken");
    hub.input(Input::Drain);
    assert!(!hub.closed.contains(&b), "zed is still talking");
    hub.store_event(StoreEvent::Floor {
        channel: "ops".into(),
        holder: None,
        epoch: 900,
    });
    hub.floor(b, "idle");
    goaway(&mut hub, b);
    assert!(hub.closed.contains(&b));
}

#[test]
fn a_draining_node_says_so_in_the_registry_at_once() {
    let mut c = config("a", true);
    c.relay_addrs = Some(vec!["127.0.0.1:51000".parse().unwrap()]);
    let mut hub = TestHub::with_config(c);
    hub.store_event(StoreEvent::Resync);
    hub.advance(Duration::from_millis(10));
    assert_eq!(hub.store.nodes.get("a").map(|n| n.0.draining), Some(false));
    hub.input(Input::Drain);
    assert_eq!(
        hub.store.nodes.get("a").map(|n| n.0.draining),
        Some(true),
        "announced without waiting for the next renewal"
    );
    // And it stays so at every renewal.
    hub.advance(Duration::from_secs(4));
    assert_eq!(hub.store.nodes.get("a").map(|n| n.0.draining), Some(true));
}

#[test]
fn a_dead_shard_drains_the_node_and_its_channels_do_not_hold_it_up() {
    let mut hub = TestHub::new();
    // Two channels on different shards, each with a burst in progress.
    let (ch0, ch1) = two_channels_on_two_shards();
    let (a, b) = (hub.connect(), hub.connect());
    hub.join(a, &ch0, "alice");
    hub.join(b, &ch1, "bob");
    hub.press(a, &ch0);
    hub.floor(a, "granted");
    hub.press(b, &ch1);
    hub.floor(b, "granted");
    let dead = crate::shard::shard_of(&ch1, 2);
    hub.input(Input::ShardDied {
        shard: dead,
        reason: "boom".into(),
    });
    let health = hub.core.health();
    assert!(health.draining);
    assert_eq!(health.dead_shards, vec![(dead, "boom".to_string())]);
    assert_eq!(hub.core.counters().shard_panics, 1);
    assert!(
        hub.closed.contains(&b),
        "nobody hears a dead shard's channel"
    );
    assert!(!hub.closed.contains(&a), "the live shard's burst goes on");
    hub.release(a, &ch0);
    assert!(hub.core.is_drained());
}

/// Two channel names that live on different shards (of two).
fn two_channels_on_two_shards() -> (String, String) {
    let first = "ops".to_string();
    let s = crate::shard::shard_of(&first, 2);
    let other = (0..100)
        .map(|i| format!("ch{i}"))
        .find(|c| crate::shard::shard_of(c, 2) != s)
        .expect("some name hashes to the other shard");
    (first, other)
}
