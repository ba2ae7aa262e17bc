//! Session resume through the control core, in virtual time.

use std::time::Duration;

use serde_json::{json, Value};

use super::TestHub;
use crate::control::Input;

/// `resume` from a new connection for the session `conn` had.
fn resume_frame(hub: &TestHub, conn: u64) -> Value {
    let hello = &hub.hellos[&conn];
    json!({"type":"resume","session":hello["session"],"resume_token":hello["resume_token"],"id":1})
}

#[test]
fn a_dropped_connection_resumes_with_its_memberships_and_its_floor_and_nobody_notices() {
    let mut hub = TestHub::new();
    let (a, b) = (hub.connect(), hub.connect());
    hub.join(a, "ops", "alice");
    hub.join(a, "fire", "alice");
    hub.join(b, "ops", "bob");
    hub.press(a, "ops");
    let epoch = hub.floor(a, "granted")["epoch"].clone();
    hub.take(b);
    hub.calls.clear();
    hub.input(Input::Dropped { conn: a });
    hub.advance(Duration::from_secs(5));
    let a2 = hub.connect();
    let frame = resume_frame(&hub, a);
    hub.send(a2, frame);
    let resumed = hub.expect(a2, |v| v["type"] == "resumed");
    assert_eq!(resumed["id"], json!(1));
    assert_eq!(resumed["session"], hub.hellos[&a]["session"]);
    let channels = resumed["channels"].as_array().unwrap().clone();
    assert_eq!(channels.len(), 2);
    assert!(channels.contains(&json!({"channel":"ops","speaker":"alice","epoch":epoch})));
    assert_eq!(
        hub.floor(a2, "granted")["epoch"],
        epoch,
        "it still holds the floor"
    );
    assert!(hub.take(b).is_empty(), "bob saw no left and no joined");
    assert!(
        !hub.calls.iter().any(|c| c.name() == "leave"),
        "the session store was not told either: {:?}",
        hub.calls
    );
    // The session goes on over the new connection.
    hub.release(a2, "ops");
    hub.floor(b, "idle");
    hub.floor(a2, "idle");
    hub.press(b, "ops");
    assert_eq!(hub.floor(a2, "taken")["speaker"], json!("bob"));
    // Long after the window, nothing leaves: the session was resumed.
    hub.advance(Duration::from_secs(60));
    assert!(hub.take(b).iter().all(|v| v["type"] != "presence"));
    assert_eq!(
        hub.core.channels().iter().map(|c| c.members).sum::<usize>(),
        3
    );
}

#[test]
fn a_resume_after_the_window_or_with_a_wrong_token_is_refused() {
    let mut hub = TestHub::new();
    let (a, b) = (hub.connect(), hub.connect());
    hub.join(a, "ops", "alice");
    hub.join(b, "ops", "bob");
    hub.take(b);
    hub.input(Input::Dropped { conn: a });
    let a2 = hub.connect();
    let mut wrong = resume_frame(&hub, a);
    wrong["resume_token"] = json!("guess");
    hub.send(a2, wrong);
    let e = hub.expect(a2, |v| v["type"] == "error");
    assert_eq!(e["code"], json!("bad_request"));
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("wrong resume token"),
        "{e}"
    );
    hub.advance(Duration::from_secs(30));
    assert_eq!(
        hub.expect(b, |v| v["type"] == "presence")["left"],
        json!("alice"),
        "after the window the member leaves as on any disconnect"
    );
    let frame = resume_frame(&hub, a);
    let a3 = hub.connect();
    hub.send(a3, frame);
    let e = hub.expect(a3, |v| v["type"] == "error");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("unknown or expired"),
        "{e}"
    );
}

#[test]
fn a_goodbye_is_not_resumable_and_resume_must_come_first() {
    let mut hub = TestHub::new();
    let (a, b) = (hub.connect(), hub.connect());
    hub.join(a, "ops", "alice");
    hub.join(b, "ops", "bob");
    hub.take(b);
    // bob already holds a membership on its connection: it cannot take over another session.
    let frame = resume_frame(&hub, a);
    hub.send(b, frame);
    let e = hub.expect(b, |v| v["type"] == "error");
    assert!(
        e["message"].as_str().unwrap().contains("first request"),
        "{e}"
    );
    // A WebSocket close is a goodbye: alice leaves at once.
    hub.input(Input::Disconnect { conn: a });
    assert_eq!(
        hub.expect(b, |v| v["type"] == "presence")["left"],
        json!("alice")
    );
}

#[test]
fn a_half_open_connection_is_taken_over() {
    let mut hub = TestHub::new();
    let a = hub.connect();
    hub.join(a, "ops", "alice");
    // The client noticed the network change first and reconnected; the server has not noticed yet.
    let a2 = hub.connect();
    let frame = resume_frame(&hub, a);
    hub.send(a2, frame);
    hub.expect(a2, |v| v["type"] == "resumed");
    assert!(hub.closed.contains(&a), "the stale connection is closed");
    // Its late disconnect changes nothing.
    hub.input(Input::Dropped { conn: a });
    hub.advance(Duration::from_secs(60));
    assert_eq!(hub.core.channels()[0].members, 1);
    hub.press(a2, "ops");
    hub.floor(a2, "granted");
}
