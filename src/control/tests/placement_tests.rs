//! The registry and placement in virtual time: what an idle node costs the store, a channel's floor read
//! once its subscription is confirmed, and joins redirected to a channel's home by load.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use super::{config, TestHub};
use crate::control::calls::StoreCall;
use crate::control::Placement;
use crate::state::{NodeInfo, NodeLoad, StoreEvent};

fn relay(port: u16) -> Vec<SocketAddr> {
    vec![format!("127.0.0.1:{port}").parse().unwrap()]
}

/// Node "a" with the relay on and its subscription up, placing channels as told.
fn node(placement: Placement) -> TestHub {
    let mut c = config("a", true);
    c.relay_addrs = Some(relay(51000));
    c.placement = placement;
    let mut hub = TestHub::with_config(c);
    hub.store_event(StoreEvent::Resync);
    hub
}

/// Another node, alive in the store's table with this load.
fn announce(hub: &mut TestHub, id: &str, members: u64, draining: bool) {
    let info = NodeInfo {
        node: id.into(),
        relay: relay(52000),
        draining,
        url: Some(format!("ws://{id}.test/ws")),
        load: NodeLoad {
            members,
            pps: 0,
            cpu_permille: 0,
        },
    };
    let call = StoreCall::Announce {
        info,
        ttl: Duration::from_secs(3600),
    };
    hub.store.answer(&call, id, hub.now, hub.t0);
    hub.store.published.clear();
}

#[test]
fn an_idle_node_costs_the_store_a_few_calls_per_channel_per_sweep_not_per_second() {
    let mut hub = node(Placement::Relay);
    let channels = 600;
    // Ten channels per connection (one address holds at most 256 connections).
    let mut conn = 0;
    for i in 0..channels {
        if i % 10 == 0 {
            conn = hub.connect();
        }
        let joined = hub.join(conn, &format!("ch-{i}"), "m");
        assert_eq!(joined["type"], json!("joined"), "{joined}");
    }
    assert_eq!(hub.core.channels().len(), channels);
    hub.advance(Duration::from_secs(5));
    hub.calls.clear();
    // 25 minutes: one renewal of each channel falls due (20 minutes) and is reached by the sweep.
    let window = Duration::from_secs(1500);
    hub.advance(window);
    let per_channel_per_minute = hub.calls.len() as f64 / channels as f64 / 25.0;
    // The sweep reads a channel's floor and nodes once per 5 minutes, and renews its members' sessions
    // and its registration once per 20 minutes: ≈ 0.5 calls per channel per minute (one member each),
    // plus the node's own liveness and node-table reads. Per-channel polling would be ≥ 60.
    assert!(
        per_channel_per_minute < 0.7,
        "{per_channel_per_minute:.2} calls per channel per minute ({} calls)",
        hub.calls.len()
    );
    let table_reads = hub.calls.iter().filter(|c| **c == StoreCall::Nodes).count();
    assert!(
        (1490..=1510).contains(&table_reads),
        "one table read per second: {table_reads}"
    );
    let refreshes = hub
        .calls
        .iter()
        .filter(|c| matches!(c, StoreCall::Refresh { .. }))
        .count();
    assert_eq!(
        refreshes, channels,
        "one heartbeat per member per 20 minutes, reached by the sweep"
    );
}

#[test]
fn a_channel_opened_here_reads_its_floor_once_its_events_are_followed() {
    let mut hub = node(Placement::Relay);
    // b granted "ops" before this node followed the channel: nothing published reaches a.
    hub.store.answer(
        &StoreCall::Acquire(crate::state::AcquireRequest {
            channel: "ops".into(),
            member: "bob".into(),
            priority: 0,
            emergency: false,
            ttl: Duration::from_secs(3),
        }),
        "b",
        hub.now,
        hub.t0,
    );
    hub.store.published.clear();
    let a = hub.connect();
    hub.join(a, "ops", "alice");
    assert!(
        hub.calls.contains(&StoreCall::Holder {
            channel: "ops".into()
        }),
        "{:?}",
        hub.calls
    );
    hub.press(a, "ops");
    let denied = hub.expect(a, |v| v["type"] == "floor");
    assert_eq!(denied["state"], json!("denied"), "{denied}");
}

#[test]
fn a_new_channel_is_placed_on_the_least_loaded_node_and_joins_elsewhere_are_redirected() {
    let mut hub = node(Placement::Redirect);
    announce(&mut hub, "b", 0, false);
    announce(&mut hub, "c", 50, false);
    // This node is busier than b.
    for i in 0..3 {
        let c = hub.connect();
        hub.send(
            c,
            json!({"type":"join","channel":format!("here-{i}"),"member":"m","transport":"rtp",
                "rtp_addr":format!("127.0.0.1:{}", 50000 + c)}),
        );
    }
    hub.advance(Duration::from_secs(2));
    let c = hub.connect();
    hub.send(
        c,
        json!({"id":7,"type":"join","channel":"ops","member":"ann","transport":"rtp",
            "rtp_addr":format!("127.0.0.1:{}", 50000 + c)}),
    );
    let r = hub.expect(c, |v| v["type"] == "redirect" || v["type"] == "joined");
    assert_eq!(
        r,
        json!({"type":"redirect","channel":"ops","url":"ws://b.test/ws","id":7})
    );
    assert_eq!(hub.store.homes["ops"], "b");
    // b starts draining: the next join places the channel again, here or on c (here: fewer members).
    announce(&mut hub, "b", 0, true);
    hub.advance(Duration::from_secs(2));
    let joined = hub.join(c, "ops", "ann");
    assert_eq!(joined["type"], json!("joined"), "{joined}");
    assert_eq!(hub.store.homes["ops"], "a");
    assert_eq!(hub.core.counters().redirects, 1);
    // The channel is open here now: a join to it is served here whatever the table says.
    announce(&mut hub, "b", 0, false);
    hub.advance(Duration::from_secs(2));
    let d = hub.connect();
    assert_eq!(hub.join(d, "ops", "dan")["type"], json!("joined"));
    // The last member leaves: this node is no longer the home.
    for conn in [c, d] {
        hub.send(conn, json!({"type":"leave","channel":"ops"}));
    }
    assert!(
        !hub.store.homes.contains_key("ops"),
        "{:?}",
        hub.store.homes
    );
}

#[test]
fn relay_placement_serves_every_join_where_it_arrives() {
    let mut hub = node(Placement::Relay);
    announce(&mut hub, "b", 0, false);
    hub.advance(Duration::from_secs(2));
    let c = hub.connect();
    assert_eq!(hub.join(c, "ops", "ann")["type"], json!("joined"));
    assert!(hub.store.homes.is_empty());
}
