//! Floors through the control core: press → store → shard → `granted`, denials, the queue, pre-emption,
//! store outages and hangs (fail safe), lease loss — all in virtual time.

use std::time::Duration;

use serde_json::json;

use super::{config, StoreMode, TestHub};
use crate::control::calls::{StoreCall, StoreReply};
use crate::shard::Command;
use crate::state::{Acquired, StoreEvent};

/// Two members of "ops" on one node.
fn two_members() -> (TestHub, u64, u64) {
    let mut hub = TestHub::new();
    let (a, b) = (hub.connect(), hub.connect());
    hub.join(a, "ops", "alice");
    hub.join(b, "ops", "bob");
    hub.take(a);
    hub.take(b);
    (hub, a, b)
}

#[test]
fn a_press_is_granted_only_after_the_shard_forwards_and_others_see_taken() {
    let (mut hub, a, b) = two_members();
    hub.auto_shard = false;
    hub.press(a, "ops");
    assert!(
        hub.floor_states(a).is_empty(),
        "no granted before the shard"
    );
    let (shard, command) = hub.commands.pop().expect("a speaker change");
    let Command::Speaker { channel, change } = command else {
        panic!("expected a speaker change, got {command:?}");
    };
    assert_eq!(
        (shard, channel.as_str()),
        (crate::shard::shard_of("ops", 2), "ops")
    );
    let crate::channel::SpeakerChange::Granted {
        epoch,
        speaker,
        until: None,
    } = change
    else {
        panic!("{change:?}");
    };
    assert!(speaker.is_some(), "the local member's key is forwarded");
    hub.input(super::Input::Shard(crate::shard::Event::Applied {
        channel: "ops".into(),
        epoch,
        applied: true,
        idle: false,
    }));
    let g = hub.floor(a, "granted");
    assert_eq!(
        (g["speaker"].clone(), g["epoch"].clone()),
        (json!("alice"), json!(epoch))
    );
    let t = hub.floor(b, "taken");
    assert_eq!(t["epoch"], json!(epoch));
    hub.auto_shard = true;
    hub.release(a, "ops");
    assert_eq!(hub.floor(b, "idle")["epoch"], json!(epoch));
    assert_eq!(hub.floor(a, "idle")["epoch"], json!(epoch));
}

#[test]
fn busy_is_denied_a_queued_press_waits_and_is_granted_on_release() {
    let (mut hub, a, b) = two_members();
    let c = hub.connect();
    hub.join(c, "ops", "carol");
    hub.press(a, "ops");
    hub.floor(a, "granted");
    hub.press(b, "ops");
    let d = hub.floor(b, "denied");
    assert_eq!(
        (d["reason"].clone(), d["speaker"].clone()),
        (json!("busy"), json!("alice"))
    );
    hub.send(
        c,
        json!({"type":"ptt","channel":"ops","action":"press","queue":true}),
    );
    assert_eq!(hub.floor(c, "queued")["position"], json!(1));
    hub.release(a, "ops");
    hub.floor(c, "granted");
    assert_eq!(hub.floor(b, "taken")["speaker"], json!("alice"));
    assert_eq!(hub.floor(b, "taken")["speaker"], json!("carol"));
    assert!(
        !hub.floor_states(b).contains(&"idle".to_string()),
        "the queue's head is granted without an idle in between"
    );
}

#[test]
fn a_higher_priority_press_preempts_the_holder() {
    let mut hub = TestHub::new();
    let (a, b) = (hub.connect(), hub.connect());
    hub.join(a, "ops", "alice");
    hub.join_with(b, "ops", "boss", json!({"priority": 5}));
    hub.press(a, "ops");
    hub.floor(a, "granted");
    hub.press(b, "ops");
    let r = hub.floor(a, "revoked");
    assert_eq!(
        (r["reason"].clone(), r["grace_ms"].clone()),
        (json!("preempted"), json!(0))
    );
    assert_eq!(hub.floor(b, "queued")["position"], json!(0));
    let g = hub.floor(b, "granted");
    assert!(g["epoch"].as_u64() > r["epoch"].as_u64());
    assert_eq!(hub.floor(a, "taken")["speaker"], json!("boss"));
}

#[test]
fn while_the_store_subscription_is_down_every_press_is_denied_unavailable() {
    let mut hub = TestHub::with_config(config("a", true));
    let a = hub.connect();
    hub.join(a, "ops", "alice");
    hub.press(a, "ops");
    assert_eq!(
        hub.floor(a, "denied")["reason"],
        json!("unavailable"),
        "down until the first resync"
    );
    hub.store_event(StoreEvent::Resync);
    hub.press(a, "ops");
    hub.floor(a, "granted");
    hub.release(a, "ops");
    hub.floor(a, "idle");
    hub.store_event(StoreEvent::Down);
    hub.calls.clear();
    hub.press(a, "ops");
    assert_eq!(hub.floor(a, "denied")["reason"], json!("unavailable"));
    assert!(
        !hub.calls.iter().any(|c| matches!(c, StoreCall::Acquire(_))),
        "the store is not even asked: grants elsewhere would go unseen"
    );
}

#[test]
fn a_failing_store_denies_unavailable_and_counts_it() {
    let (mut hub, a, _) = two_members();
    hub.mode = StoreMode::Failing;
    hub.press(a, "ops");
    assert_eq!(hub.floor(a, "denied")["reason"], json!("unavailable"));
    assert_eq!(hub.core.counters().store_errors, 1);
}

#[test]
fn a_hanging_store_denies_at_the_deadline_and_a_late_grant_is_given_back() {
    let (mut hub, a, _) = two_members();
    hub.mode = StoreMode::Hanging;
    hub.press(a, "ops");
    hub.advance(Duration::from_millis(999));
    assert!(
        hub.floor_states(a).is_empty(),
        "nothing before the store timeout"
    );
    hub.advance(Duration::from_millis(1));
    assert_eq!(hub.floor(a, "denied")["reason"], json!("unavailable"));
    // The grant did happen; its answer comes late.
    hub.mode = StoreMode::Up;
    hub.calls.clear();
    hub.answer_hanging(|call| match call {
        StoreCall::Acquire(_) => Some(StoreReply::Acquired(Ok(Acquired::Granted { epoch: 42 }))),
        _ => None,
    });
    assert_eq!(
        hub.calls,
        vec![StoreCall::Release {
            channel: "ops".into(),
            epoch: 42
        }],
        "the late grant is released by its epoch"
    );
    assert!(
        hub.floor_states(a).is_empty(),
        "and nobody is told it was granted"
    );
}

#[test]
fn renewals_that_fail_revoke_the_holder_before_its_lease_runs_out() {
    let mut hub = TestHub::with_config(config("a", true));
    let (a, b) = (hub.connect(), hub.connect());
    hub.join(a, "ops", "alice");
    hub.join(b, "ops", "bob");
    hub.store_event(StoreEvent::Resync);
    hub.press(a, "ops");
    hub.floor(a, "granted");
    let granted_at = hub.now;
    // Renewals succeed for a while: the holder keeps talking (T1 silence is the shard's business).
    hub.advance(Duration::from_millis(2500));
    assert!(hub.floor_states(a).is_empty());
    assert!(
        hub.calls
            .iter()
            .filter(|c| matches!(c, StoreCall::Renew { .. }))
            .count()
            >= 2
    );
    // Then every renewal fails: the last good renewal was sent at 2 s, so the lease ends at 5 s and the
    // holder is revoked 250 ms before, at 4.75 s.
    hub.mode = StoreMode::Failing;
    hub.advance(Duration::from_millis(2249));
    assert!(hub.floor_states(a).is_empty(), "still within the lease");
    hub.advance(Duration::from_millis(1));
    let r = hub.floor(a, "revoked");
    assert_eq!(r["reason"], json!("lease_lost"));
    assert_eq!(hub.now - granted_at, Duration::from_millis(4750));
    hub.mode = StoreMode::Up;
    hub.advance(Duration::from_millis(1));
    assert_eq!(hub.floor(b, "idle")["epoch"], r["epoch"]);
}

#[test]
fn an_idle_node_is_not_woken_and_a_held_floor_wakes_it_only_when_something_is_due() {
    let (mut hub, a, _) = two_members();
    // Embedded store: no heartbeat, no registry, no sweep — nothing at all is due.
    assert_eq!(hub.core.poll_timeout(), None, "idle: never woken");
    hub.press(a, "ops");
    hub.floor(a, "granted");
    // Embedded store: no lease, so the next thing due is T2 (30 s).
    assert_eq!(
        hub.core.poll_timeout(),
        Some(hub.now + Duration::from_secs(30))
    );
    hub.advance(Duration::from_secs(30));
    assert_eq!(hub.floor(a, "revoked")["reason"], json!("max_talk_time"));
}

#[test]
fn a_remote_grant_and_its_release_reach_local_members() {
    let mut hub = TestHub::with_config(config("a", true));
    let a = hub.connect();
    hub.join(a, "ops", "alice");
    hub.store_event(StoreEvent::Resync);
    let holder = crate::state::Holder {
        member: "bob".into(),
        node: "b".into(),
        epoch: 900,
        priority: 0,
        emergency: false,
    };
    hub.store_event(StoreEvent::Floor {
        channel: "ops".into(),
        holder: Some(holder),
        epoch: 900,
    });
    assert_eq!(hub.floor(a, "taken")["speaker"], json!("bob"));
    // A stale event (an older epoch) changes nothing.
    hub.store_event(StoreEvent::Floor {
        channel: "ops".into(),
        holder: None,
        epoch: 899,
    });
    assert!(hub.floor_states(a).is_empty());
    hub.store_event(StoreEvent::Floor {
        channel: "ops".into(),
        holder: None,
        epoch: 900,
    });
    assert_eq!(hub.floor(a, "idle")["epoch"], json!(900));
}

#[test]
fn a_speaker_change_lost_to_a_full_shard_queue_is_sent_again_not_dropped() {
    let (mut hub, a, _) = two_members();
    hub.auto_shard = false;
    hub.commands.clear();
    hub.press(a, "ops");
    let (shard, command) = hub.commands.pop().expect("the grant's speaker change");
    hub.input(super::Input::ShardFull { shard, command });
    assert!(hub.commands.is_empty());
    hub.advance(Duration::from_millis(10));
    let (_, again) = hub.commands.pop().expect("sent again");
    assert!(matches!(again, Command::Speaker { .. }));
    assert_eq!(hub.core.counters().shard_queue_full, 1);
    // Acknowledged this time: the member hears `granted`.
    let Command::Speaker { change, .. } = again else {
        unreachable!()
    };
    hub.input(super::Input::Shard(crate::shard::Event::Applied {
        channel: "ops".into(),
        epoch: change.epoch(),
        applied: true,
        idle: false,
    }));
    hub.floor(a, "granted");
}

#[test]
fn the_shard_is_told_the_lease_and_the_remote_holders_node() {
    let mut hub = TestHub::with_config(config("a", true));
    let a = hub.connect();
    hub.join(a, "ops", "alice");
    hub.store_event(StoreEvent::Resync);
    hub.press(a, "ops");
    hub.floor(a, "granted");
    let granted_at = hub.now;
    let until = hub.commands.iter().find_map(|(_, c)| match c {
        Command::Speaker {
            change: crate::channel::SpeakerChange::Granted { until, .. },
            ..
        } => *until,
        _ => None,
    });
    assert_eq!(
        until,
        Some(granted_at + Duration::from_millis(2750)),
        "lease less the margin"
    );
    hub.commands.clear();
    hub.advance(Duration::from_secs(1));
    assert!(
        hub.commands
            .iter()
            .any(|(_, c)| matches!(c, Command::Speaker {
            change: crate::channel::SpeakerChange::Lease { until, .. }, ..
        } if *until == granted_at + Duration::from_millis(3750))),
        "a renewal extends it: {:?}",
        hub.commands
    );
    hub.release(a, "ops");
    hub.commands.clear();
    let holder = |epoch| crate::state::Holder {
        member: "bob".into(),
        node: "b".into(),
        epoch,
        priority: 0,
        emergency: false,
    };
    // An epoch out of range is no grant any store made: ignored.
    let forged = crate::floor::MAX_EPOCH;
    hub.store_event(StoreEvent::Floor {
        channel: "ops".into(),
        holder: Some(holder(forged)),
        epoch: forged,
    });
    assert!(hub.commands.is_empty(), "{:?}", hub.commands);
    let epoch = 9_000_000_000_000_000;
    hub.store_event(StoreEvent::Floor {
        channel: "ops".into(),
        holder: Some(holder(epoch)),
        epoch,
    });
    assert!(
        hub.commands
            .iter()
            .any(|(_, c)| matches!(c, Command::Speaker {
            change: crate::channel::SpeakerChange::Remote { node, .. }, ..
        } if node == "b")),
        "relay accepted from b only: {:?}",
        hub.commands
    );
}

#[test]
fn an_emergency_preempts_any_holder_at_once_and_every_event_of_its_burst_says_so() {
    let mut c = config("a", false);
    c.floor.t3 = Duration::from_secs(2); // a grace that an emergency ignores
    let mut hub = TestHub::with_config(c);
    let (a, b, e, f) = (hub.connect(), hub.connect(), hub.connect(), hub.connect());
    hub.join_with(a, "ops", "chief", json!({"priority": 255}));
    hub.join(b, "ops", "bob");
    hub.join(e, "ops", "eve");
    hub.join(f, "ops", "fay");
    hub.press(a, "ops");
    hub.floor(a, "granted");
    for conn in [a, b, e, f] {
        hub.take(conn);
    }
    hub.send(
        e,
        json!({"type":"ptt","channel":"ops","action":"press","emergency":true}),
    );
    let r = hub.floor(a, "revoked");
    assert_eq!(
        (r["reason"].clone(), r["grace_ms"].clone()),
        (json!("preempted"), json!(0))
    );
    assert_eq!(hub.floor(e, "queued")["position"], json!(0));
    let g = hub.floor(e, "granted");
    assert_eq!(g["emergency"], json!(true));
    let t = hub.floor(b, "taken");
    assert_eq!(
        (t["speaker"].clone(), t["emergency"].clone()),
        (json!("eve"), json!(true))
    );
    // Another emergency while this one holds: first in line, ahead of everyone.
    hub.send(
        a,
        json!({"type":"ptt","channel":"ops","action":"press","queue":true}),
    );
    hub.send(
        f,
        json!({"type":"ptt","channel":"ops","action":"press","emergency":true}),
    );
    assert_eq!(hub.floor(f, "queued")["position"], json!(1));
    hub.release(e, "ops");
    let g2 = hub.floor(f, "granted");
    assert_eq!(g2["emergency"], json!(true));
    hub.release(f, "ops");
    let g3 = hub.floor(a, "granted");
    assert!(
        g3.get("emergency").is_none(),
        "a normal burst is not flagged: {g3}"
    );
    hub.release(a, "ops");
    let idle = hub.floor(b, "idle");
    assert!(idle.get("emergency").is_none());
}

#[test]
fn every_local_burst_is_written_to_the_transmission_log_with_its_packets() {
    let (mut hub, a, b) = two_members();
    hub.core
        .set_wall_clock(hub.now, Duration::from_secs(1_800_000_000));
    hub.press(a, "ops");
    let epoch = hub.floor(a, "granted")["epoch"].as_u64().unwrap();
    hub.advance(Duration::from_millis(2500));
    hub.release(a, "ops");
    // The shard reports the packets it forwarded for the burst.
    hub.input(super::Input::Shard(crate::shard::Event::BurstEnded {
        channel: "ops".into(),
        epoch,
        packets: 125,
    }));
    let burst = hub.store.history.pop().expect("a burst was written");
    assert_eq!(
        (
            burst.channel.as_str(),
            burst.member.as_str(),
            burst.node.as_str()
        ),
        ("ops", "alice", "a")
    );
    assert_eq!(
        (burst.epoch, burst.packets, burst.emergency),
        (epoch, 125, false)
    );
    assert_eq!(burst.end_reason, "released");
    assert_eq!(burst.start_ms, 1_800_000_000_000);
    assert_eq!(burst.end_ms - burst.start_ms, 2500);
    // A revoked burst whose count never comes is written anyway, after a second, with its reason.
    hub.press(b, "ops");
    hub.floor(b, "granted");
    hub.advance(Duration::from_secs(30));
    assert!(
        hub.store.history.is_empty(),
        "waiting for the shard's count"
    );
    hub.advance(Duration::from_secs(1));
    let burst = hub.store.history.pop().expect("written without the count");
    assert_eq!(
        (burst.member.as_str(), burst.end_reason.as_str()),
        ("bob", "max_talk_time")
    );
}
