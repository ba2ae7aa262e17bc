//! The control core's own measurements in virtual time, where they are exact: press → granted runs from
//! the `ptt` frame to the `granted` frame, and a press that waits in the queue is not counted.

use std::time::Duration;

use serde_json::json;

use super::TestHub;
use crate::control::Input;
use crate::metrics::PRESS_TO_GRANT_US;
use crate::shard::{Command, Event};

#[test]
fn press_to_granted_is_measured_from_the_press_frame_to_the_granted_frame() {
    let mut hub = TestHub::new();
    let (a, b) = (hub.connect(), hub.connect());
    hub.join(a, "ops", "alice");
    hub.join(b, "ops", "bob");
    hub.auto_shard = false;
    hub.press(a, "ops");
    // The shard takes 700 µs to acknowledge the new speaker.
    hub.advance(Duration::from_micros(700));
    let Some((_, Command::Speaker { channel, change })) = hub.commands.pop() else {
        panic!("a speaker change");
    };
    let epoch = match change {
        crate::channel::SpeakerChange::Granted { epoch, .. } => epoch,
        other => panic!("{other:?}"),
    };
    hub.input(Input::Shard(Event::Applied {
        channel,
        epoch,
        applied: true,
        idle: false,
    }));
    hub.floor(a, "granted");
    let h = hub.core.counters().press_to_grant;
    assert_eq!((h.count(), h.sum()), (1, 700), "exact in virtual time");
    let buckets = h.cumulative(&PRESS_TO_GRANT_US, 1e6);
    assert_eq!(buckets[2], (0.0005, 0), "not ≤ 500 µs");
    assert_eq!(buckets[3], (0.001, 1), "≤ 1 ms");

    // bob's queued press waits for alice's release: that wait is her talk time, not a grant latency.
    hub.auto_shard = true;
    hub.send(
        b,
        json!({"type":"ptt","channel":"ops","action":"press","queue":true}),
    );
    hub.floor(b, "queued");
    hub.advance(Duration::from_secs(2));
    hub.release(a, "ops");
    hub.floor(b, "granted");
    assert_eq!(hub.core.counters().press_to_grant.count(), 1);
    // A denied press is not counted either.
    hub.press(a, "ops");
    hub.floor(a, "denied");
    assert_eq!(hub.core.counters().press_to_grant.count(), 1);
}
