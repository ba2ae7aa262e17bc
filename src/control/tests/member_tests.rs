//! Joining and leaving through the control core, in virtual time.

use std::time::Duration;

use serde_json::json;

use super::{StoreMode, TestHub};
use crate::control::calls::StoreCall;
use crate::control::Input;
use crate::shard::Command;

#[test]
fn a_join_goes_to_the_shard_then_the_session_store_then_is_answered_and_announced() {
    let mut hub = TestHub::new();
    let (a, b) = (hub.connect(), hub.connect());
    hub.auto_shard = false;
    hub.send(
        a,
        json!({"type":"join","channel":"ops","member":"alice","transport":"rtp",
               "rtp_addr":"127.0.0.1:5000","id":7}),
    );
    assert!(
        hub.take(a).is_empty(),
        "nothing before the shard has the member"
    );
    let (
        _,
        Command::AddMember {
            key, addr, ssrc, ..
        },
    ) = hub.commands.pop().expect("a command")
    else {
        panic!("expected AddMember");
    };
    assert_eq!(
        addr,
        "127.0.0.1:5000".parse::<std::net::SocketAddr>().unwrap()
    );
    hub.input(Input::Shard(crate::shard::Event::MemberAdded { key }));
    assert_eq!(hub.call_names(), vec!["join"]);
    let joined = hub.expect(a, |v| v["type"] == "joined");
    assert_eq!(joined["id"], json!(7));
    assert_eq!(joined["rtp"]["ssrc"], json!(ssrc));
    let port = 40000 + crate::shard::shard_of("ops", 2) as u64;
    assert_eq!(
        joined["rtp"]["server_addr"],
        json!(format!("127.0.0.1:{port}"))
    );
    hub.auto_shard = true;
    let jb = hub.join(b, "ops", "bob");
    assert_eq!(jb["members"], json!(["alice"]));
    assert_eq!(
        hub.expect(a, |v| v["type"] == "presence")["joined"],
        json!("bob")
    );
    hub.send(b, json!({"type":"leave","channel":"ops","id":"x"}));
    assert_eq!(hub.expect(b, |v| v["type"] == "left")["id"], json!("x"));
    assert_eq!(
        hub.expect(a, |v| v["type"] == "presence")["left"],
        json!("bob")
    );
    assert!(hub.calls.contains(&StoreCall::Leave {
        channel: "ops".into(),
        member: "bob".into(),
        node: "a".into()
    }));
    assert!(matches!(
        hub.commands.last(),
        Some((_, Command::RemoveMember { .. }))
    ));
}

#[test]
fn a_session_store_that_does_not_answer_costs_only_the_remote_names() {
    let mut hub = TestHub::new();
    let a = hub.connect();
    hub.mode = StoreMode::Hanging;
    hub.send(
        a,
        json!({"type":"join","channel":"ops","member":"alice","transport":"rtp","rtp_addr":"127.0.0.1:5000"}),
    );
    hub.advance(Duration::from_millis(499));
    assert!(hub.take(a).is_empty());
    hub.advance(Duration::from_millis(1));
    let joined = hub.expect(a, |v| v["type"] == "joined");
    assert_eq!(joined["members"], json!([]));
}

#[test]
fn bad_requests_are_answered_with_errors_that_name_the_problem() {
    let mut hub = TestHub::new();
    let a = hub.connect();
    let e = hub.join(a, "bad/name", "alice");
    assert_eq!(e["code"], json!("bad_request"));
    assert!(e["message"].as_str().unwrap().contains("'/'"), "{e}");
    hub.send(a, json!({"type":"join","channel":"ops","member":"alice","transport":"rtp","rtp_addr":"8.8.8.8:5"}));
    let e = hub.expect(a, |v| v["type"] == "error");
    assert_eq!(e["code"], json!("unauthorized"));
    assert!(e["message"].as_str().unwrap().contains("--rtp-allow"));
    hub.press(a, "ops");
    assert_eq!(
        hub.expect(a, |v| v["type"] == "error")["code"],
        json!("not_joined")
    );
    hub.join(a, "ops", "alice");
    let e = hub.join(a, "ops", "alice2");
    assert_eq!(e["code"], json!("already_joined"));
    let b = hub.connect();
    let e = hub.join(b, "ops", "alice");
    assert_eq!(e["code"], json!("already_joined"));
    assert_eq!(hub.core.counters().errors["already_joined"], 2);
}

#[test]
fn a_full_shard_queue_refuses_the_join_unavailable() {
    let mut hub = TestHub::new();
    let a = hub.connect();
    hub.auto_shard = false;
    hub.send(
        a,
        json!({"type":"join","channel":"ops","member":"alice","transport":"rtp",
               "rtp_addr":"127.0.0.1:5000","id":1}),
    );
    let (shard, command) = hub.commands.pop().unwrap();
    hub.input(Input::ShardFull { shard, command });
    let e = hub.expect(a, |v| v["type"] == "error");
    assert_eq!(
        (e["code"].clone(), e["id"].clone()),
        (json!("unavailable"), json!(1))
    );
    assert!(
        hub.core.channels().is_empty(),
        "nothing is left of the join"
    );
    assert_eq!(hub.core.counters().shard_queue_full, 1);
}

#[test]
fn a_webrtc_join_carries_the_shards_answer() {
    let mut hub = TestHub::new();
    let a = hub.connect();
    let offer = crate::peer::offer::test_offer("sendrecv");
    hub.send(
        a,
        json!({"type":"join","channel":"ops","member":"web","transport":"webrtc","sdp":offer}),
    );
    let joined = hub.expect(a, |v| v["type"] == "joined");
    assert_eq!(joined["sdp"], json!("v=0 (answer)"));
    assert!(joined.get("rtp").is_none());
}

#[test]
fn disconnecting_leaves_every_channel_and_a_client_that_does_not_read_is_dropped() {
    let mut hub = TestHub::new();
    let (a, b) = (hub.connect(), hub.connect());
    hub.join(a, "ops", "alice");
    hub.join(a, "fire", "alice");
    hub.join(b, "ops", "bob");
    hub.press(a, "ops");
    hub.floor(a, "granted");
    hub.input(Input::Unwritable { conn: a });
    assert_eq!(hub.closed, vec![a]);
    assert_eq!(hub.core.counters().slow_clients, 1);
    // Its socket is gone; its memberships wait for a resume for the window, then leave.
    hub.take(b);
    hub.advance(Duration::from_secs(29));
    assert!(
        hub.take(b).is_empty(),
        "nothing seen before the resume window ends"
    );
    hub.advance(Duration::from_secs(1));
    assert_eq!(
        hub.expect(b, |v| v["type"] == "presence" && v["left"].is_string())["left"],
        json!("alice")
    );
    hub.floor(b, "idle");
    let rows = hub.core.channels();
    assert_eq!(rows.len(), 1, "fire is forgotten: {rows:?}");
    assert_eq!((rows[0].members, rows[0].speaker.clone()), (1, None));
}

#[test]
fn shutdown_releases_the_floor_tells_members_and_stops_the_shards() {
    let mut hub = TestHub::new();
    let (a, b) = (hub.connect(), hub.connect());
    hub.join(a, "ops", "alice");
    hub.join(b, "ops", "bob");
    hub.press(a, "ops");
    let epoch = hub.floor(a, "granted")["epoch"].clone();
    hub.calls.clear();
    hub.input(Input::Shutdown);
    assert_eq!(hub.floor(b, "idle")["epoch"], epoch);
    hub.expect(a, |v| v["type"] == "left");
    hub.expect(b, |v| v["type"] == "left");
    assert!(hub.calls.contains(&StoreCall::Release {
        channel: "ops".into(),
        epoch: epoch.as_u64().unwrap()
    }));
    let mut closed = hub.closed.clone();
    closed.sort();
    assert_eq!(closed, vec![a, b]);
    let stops = hub
        .commands
        .iter()
        .filter(|(_, c)| matches!(c, Command::Shutdown))
        .count();
    assert_eq!(stops, 2);
    assert_eq!(hub.core.calls_in_flight(), 0);
}
