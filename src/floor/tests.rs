//! Floor tests in virtual time: a tiny harness plays the store and the shard, so every output is checked.

use super::*;
use proptest::prelude::*;

/// Plays an instantly answering store (epochs from a counter) and an instantly acknowledging shard.
struct Harness {
    floor: Floor,
    now: Instant,
    next_epoch: u64,
    store_holder: Option<u64>,
    events: Vec<(To, FloorEvent)>,
    forwarded: Option<(Option<String>, u64)>,
    /// When false, store requests are kept in `pending` for the test to answer.
    auto_store: bool,
    pending: Vec<Output>,
    /// When false, the shard never acknowledges a speaker change.
    auto_shard: bool,
    /// The lease deadline last given to the shard (`Apply`'s `until`, then `Extend`).
    until: Option<Instant>,
}

impl Harness {
    fn new(config: FloorConfig) -> Self {
        Harness {
            floor: Floor::new(config),
            now: Instant::now(),
            next_epoch: 100,
            store_holder: None,
            events: vec![],
            forwarded: None,
            auto_store: true,
            pending: vec![],
            auto_shard: true,
            until: None,
        }
    }

    fn feed(&mut self, input: Input) {
        self.floor.handle(input, self.now);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(out) = self.floor.poll_output() {
            match out {
                Output::Notify { to, event } => self.events.push((to, event)),
                Output::Apply {
                    speaker,
                    epoch,
                    until,
                } => {
                    self.forwarded = Some((speaker.clone(), epoch));
                    self.until = until;
                    if speaker.is_some() && self.auto_shard {
                        self.floor.handle(Input::ShardApplied { epoch }, self.now);
                    }
                }
                Output::Extend { until, .. } => self.until = Some(until),
                Output::BurstEnded { .. } => {}
                // Another node's member: no local member is forwarded (its media comes by relay).
                Output::ApplyRemote { epoch } => self.forwarded = Some((None, epoch)),
                other if !self.auto_store => self.pending.push(other),
                Output::Acquire { member, .. } => {
                    assert!(self.store_holder.is_none(), "store asked for a held lock");
                    self.next_epoch += 1;
                    self.store_holder = Some(self.next_epoch);
                    let epoch = self.next_epoch;
                    self.floor
                        .handle(Input::StoreGranted { member, epoch }, self.now);
                }
                Output::Release { epoch } => {
                    assert_eq!(self.store_holder, Some(epoch), "released a lock not held");
                    self.store_holder = None;
                    self.floor.handle(Input::StoreReleased { epoch }, self.now);
                }
                Output::Renew { .. } => {}
            }
        }
    }

    fn press(&mut self, m: &str, priority: u8) {
        self.feed(Input::Request {
            member: m.into(),
            priority,
            queue: false,
        });
    }

    fn release(&mut self, m: &str) {
        self.feed(Input::Release { member: m.into() });
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.feed(Input::Tick);
    }

    fn take_events(&mut self) -> Vec<(To, FloorEvent)> {
        std::mem::take(&mut self.events)
    }
}

fn to(m: &str) -> To {
    To::Member(m.into())
}

#[test]
fn grant_then_busy_then_release_to_idle() {
    let mut h = Harness::new(FloorConfig::default());
    h.press("alice", 0);
    assert_eq!(
        h.take_events(),
        vec![
            (
                to("alice"),
                FloorEvent::Granted {
                    speaker: "alice".into(),
                    epoch: 101,
                    duration_ms: 30_000
                }
            ),
            (
                To::AllExcept("alice".into()),
                FloorEvent::Taken {
                    speaker: "alice".into(),
                    epoch: 101
                }
            ),
        ]
    );
    assert_eq!(h.forwarded, Some((Some("alice".into()), 101)));
    h.press("bob", 0);
    assert_eq!(
        h.take_events(),
        vec![(
            to("bob"),
            FloorEvent::Denied {
                speaker: Some("alice".into()),
                reason: DenyReason::Busy
            }
        )]
    );
    h.release("bob"); // not the holder: nothing happens
    assert!(h.take_events().is_empty());
    h.release("alice");
    assert_eq!(
        h.take_events(),
        vec![(To::All, FloorEvent::Idle { epoch: 101 })]
    );
    assert_eq!(h.forwarded, Some((None, 101)));
    h.press("bob", 0);
    assert!(matches!(
        &h.take_events()[0].1,
        FloorEvent::Granted { epoch: 102, .. }
    ));
}

#[test]
fn granted_waits_for_the_shard() {
    let mut f = Floor::new(FloorConfig::default());
    let now = Instant::now();
    f.handle(
        Input::Request {
            member: "a".into(),
            priority: 0,
            queue: false,
        },
        now,
    );
    assert_eq!(
        f.poll_output(),
        Some(Output::Acquire {
            member: "a".into(),
            priority: 0,
            emergency: false,
        })
    );
    f.handle(
        Input::StoreGranted {
            member: "a".into(),
            epoch: 5,
        },
        now,
    );
    assert_eq!(
        f.poll_output(),
        Some(Output::Apply {
            speaker: Some("a".into()),
            epoch: 5,
            until: None
        })
    );
    assert_eq!(
        f.poll_output(),
        None,
        "no granted before the shard acknowledges"
    );
    f.handle(Input::ShardApplied { epoch: 4 }, now);
    assert_eq!(f.poll_output(), None, "an old acknowledgement is ignored");
    f.handle(Input::ShardApplied { epoch: 5 }, now);
    assert!(matches!(
        f.poll_output(),
        Some(Output::Notify {
            event: FloorEvent::Granted { .. },
            ..
        })
    ));
}

#[test]
fn t2_max_talk_time_revokes() {
    let mut h = Harness::new(FloorConfig {
        t2: Duration::from_secs(30),
        ..Default::default()
    });
    h.press("a", 0);
    h.take_events();
    h.advance(Duration::from_secs(29));
    assert!(h.take_events().is_empty());
    h.advance(Duration::from_secs(1));
    assert_eq!(
        h.take_events(),
        vec![
            (
                to("a"),
                FloorEvent::Revoked {
                    speaker: "a".into(),
                    epoch: 101,
                    reason: RevokeReason::MaxTalkTime,
                    grace_ms: 0
                }
            ),
            (To::All, FloorEvent::Idle { epoch: 101 }),
        ]
    );
}

#[test]
fn silence_revokes_only_the_current_epoch() {
    let mut h = Harness::new(FloorConfig::default());
    h.press("a", 0);
    h.take_events();
    h.feed(Input::MediaSilence { epoch: 99 });
    assert!(h.take_events().is_empty());
    h.feed(Input::MediaSilence { epoch: 101 });
    let ev = h.take_events();
    assert!(matches!(
        ev[0].1,
        FloorEvent::Revoked {
            reason: RevokeReason::Silence,
            ..
        }
    ));
    assert_eq!(ev[1].1, FloorEvent::Idle { epoch: 101 });
}

#[test]
fn queue_then_grant_in_priority_order() {
    let mut h = Harness::new(FloorConfig::default());
    h.press("a", 5);
    h.feed(Input::Request {
        member: "b".into(),
        priority: 1,
        queue: true,
    });
    h.feed(Input::Request {
        member: "c".into(),
        priority: 3,
        queue: true,
    });
    h.take_events();
    h.release("a");
    let ev = h.take_events();
    assert!(ev.contains(&(
        to("c"),
        FloorEvent::Granted {
            speaker: "c".into(),
            epoch: 102,
            duration_ms: 30_000
        }
    )));
    assert!(ev.contains(&(to("b"), FloorEvent::Queued { position: 1 })));
    assert!(
        !ev.iter().any(|(_, e)| matches!(e, FloorEvent::Idle { .. })),
        "no idle while the queue hands over"
    );
    // A queued member withdraws with a release.
    h.release("b");
    h.release("c");
    assert_eq!(
        h.take_events(),
        vec![(To::All, FloorEvent::Idle { epoch: 102 })]
    );
}

#[test]
fn higher_priority_preempts_immediately_without_t3() {
    let mut h = Harness::new(FloorConfig::default());
    h.press("a", 0);
    h.take_events();
    h.press("b", 0); // equal priority never pre-empts
    assert!(matches!(
        h.take_events()[0].1,
        FloorEvent::Denied {
            reason: DenyReason::Busy,
            ..
        }
    ));
    h.press("boss", 9);
    let ev = h.take_events();
    assert_eq!(
        ev,
        vec![
            (
                to("a"),
                FloorEvent::Revoked {
                    speaker: "a".into(),
                    epoch: 101,
                    reason: RevokeReason::Preempted,
                    grace_ms: 0
                }
            ),
            (to("boss"), FloorEvent::Queued { position: 0 }),
            (
                to("boss"),
                FloorEvent::Granted {
                    speaker: "boss".into(),
                    epoch: 102,
                    duration_ms: 30_000
                }
            ),
            (
                To::AllExcept("boss".into()),
                FloorEvent::Taken {
                    speaker: "boss".into(),
                    epoch: 102
                }
            ),
        ]
    );
}

#[test]
fn preemption_with_t3_grace_keeps_the_holder_until_the_deadline() {
    let mut h = Harness::new(FloorConfig {
        t3: Duration::from_millis(500),
        ..Default::default()
    });
    h.press("a", 0);
    h.press("boss", 9);
    let ev = h.take_events();
    assert!(ev.contains(&(
        to("a"),
        FloorEvent::Revoked {
            speaker: "a".into(),
            epoch: 101,
            reason: RevokeReason::Preempted,
            grace_ms: 500
        }
    )));
    assert_eq!(
        h.forwarded,
        Some((Some("a".into()), 101)),
        "still forwarded during the grace"
    );
    h.advance(Duration::from_millis(499));
    assert!(h.take_events().is_empty());
    h.advance(Duration::from_millis(1));
    let ev = h.take_events();
    assert!(ev.contains(&(
        to("boss"),
        FloorEvent::Granted {
            speaker: "boss".into(),
            epoch: 102,
            duration_ms: 30_000
        }
    )));
    assert!(
        !ev.iter().any(|(t, _)| *t == to("a")),
        "the holder was told once, at the start of its grace"
    );
}

#[test]
fn holder_leaving_is_revoked_with_left() {
    let mut h = Harness::new(FloorConfig::default());
    h.press("a", 0);
    h.take_events();
    h.feed(Input::Leave { member: "a".into() });
    let ev = h.take_events();
    assert!(matches!(
        ev[0].1,
        FloorEvent::Revoked {
            reason: RevokeReason::Left,
            ..
        }
    ));
    assert_eq!(ev[1].1, FloorEvent::Idle { epoch: 101 });
}

#[test]
fn release_while_acquiring_gives_the_lock_back() {
    let mut h = Harness::new(FloorConfig::default());
    h.auto_store = false;
    h.press("a", 0);
    assert_eq!(
        h.pending,
        vec![Output::Acquire {
            member: "a".into(),
            priority: 0,
            emergency: false,
        }]
    );
    h.release("a");
    h.pending.clear();
    h.feed(Input::StoreGranted {
        member: "a".into(),
        epoch: 7,
    });
    assert_eq!(h.pending, vec![Output::Release { epoch: 7 }]);
    assert!(
        h.take_events().is_empty(),
        "nobody is told of a grant that was withdrawn"
    );
}

#[test]
fn store_failure_denies_unavailable() {
    let mut h = Harness::new(FloorConfig::default());
    h.auto_store = false;
    h.press("a", 0);
    h.feed(Input::StoreDenied {
        member: "a".into(),
        holder: None,
        reason: DenyReason::Unavailable,
    });
    assert_eq!(
        h.take_events(),
        vec![(
            to("a"),
            FloorEvent::Denied {
                speaker: None,
                reason: DenyReason::Unavailable
            }
        )]
    );
}

#[test]
fn lease_is_renewed_and_lost_when_renewals_fail() {
    let lease = Lease {
        ttl: Duration::from_secs(3),
        renew_every: Duration::from_secs(1),
        margin: Duration::from_millis(250),
    };
    let mut h = Harness::new(FloorConfig {
        lease: Some(lease),
        ..Default::default()
    });
    h.auto_store = false;
    h.press("a", 0);
    let start = h.now;
    h.feed(Input::StoreGranted {
        member: "a".into(),
        epoch: 9,
    });
    h.take_events();
    h.pending.clear();
    h.advance(Duration::from_secs(1));
    assert_eq!(h.pending, vec![Output::Renew { epoch: 9 }]);
    h.pending.clear();
    let sent = h.now;
    h.feed(Input::Renewed {
        epoch: 9,
        sent_at: sent,
        outcome: Renewal::Renewed,
    });
    // Renewals now fail: revoked at last success + TTL − margin = start + 1 s + 2.75 s.
    for _ in 0..7 {
        h.advance(Duration::from_millis(250));
        for out in std::mem::take(&mut h.pending) {
            if let Output::Renew { epoch } = out {
                h.feed(Input::Renewed {
                    epoch,
                    sent_at: h.now,
                    outcome: Renewal::Failed,
                });
            }
        }
    }
    assert!(
        h.take_events().is_empty(),
        "still within the lease at {:?}",
        h.now - start
    );
    h.advance(Duration::from_millis(1000));
    let ev = h.take_events();
    assert!(
        matches!(
            ev[0].1,
            FloorEvent::Revoked {
                reason: RevokeReason::LeaseLost,
                ..
            }
        ),
        "{ev:?}"
    );
    assert_eq!(h.forwarded, Some((None, 9)));
}

#[test]
fn remote_grant_revokes_a_stale_local_holder() {
    let mut h = Harness::new(FloorConfig::default());
    h.press("a", 0);
    h.take_events();
    h.feed(Input::Remote {
        speaker: Some("zed".into()),
        epoch: 50,
        emergency: false,
    });
    assert!(
        h.take_events().is_empty(),
        "an older remote epoch changes nothing"
    );
    h.feed(Input::Remote {
        speaker: Some("zed".into()),
        epoch: 500,
        emergency: false,
    });
    let ev = h.take_events();
    assert!(matches!(
        ev[0],
        (
            _,
            FloorEvent::Revoked {
                reason: RevokeReason::LeaseLost,
                ..
            }
        )
    ));
    assert!(ev.contains(&(
        To::All,
        FloorEvent::Taken {
            speaker: "zed".into(),
            epoch: 500
        }
    )));
    assert_eq!(h.floor.speaker(), Some("zed"));
    assert_eq!(
        h.forwarded,
        Some((None, 500)),
        "a remote grant never makes a local member the speaker"
    );
    // A press while another node holds asks the store (the holder's node may be dead); the store says busy.
    h.auto_store = false;
    h.press("b", 0);
    assert_eq!(
        h.pending,
        vec![Output::Acquire {
            member: "b".into(),
            priority: 0,
            emergency: false,
        }]
    );
    h.pending.clear();
    h.feed(Input::StoreDenied {
        member: "b".into(),
        holder: Some(("zed".into(), 500)),
        reason: DenyReason::Busy,
    });
    assert!(matches!(
        h.take_events()[0].1,
        FloorEvent::Denied {
            reason: DenyReason::Busy,
            ..
        }
    ));
    assert_eq!(h.floor.remote(), Some(("zed", 500)));
    h.auto_store = true;
    h.feed(Input::Remote {
        speaker: None,
        epoch: 499,
        emergency: false,
    });
    assert_eq!(
        h.floor.speaker(),
        Some("zed"),
        "idle of another epoch changes nothing"
    );
    h.feed(Input::Remote {
        speaker: None,
        epoch: 500,
        emergency: false,
    });
    assert_eq!(
        h.take_events(),
        vec![(To::All, FloorEvent::Idle { epoch: 500 })]
    );
}

#[derive(Debug, Clone)]
enum Op {
    Press(usize, u8, bool),
    Release(usize),
    Leave(usize),
    Silence,
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4usize, 0..3u8, any::<bool>()).prop_map(|(m, p, q)| Op::Press(m, p, q)),
        (0..4usize).prop_map(Op::Release),
        (0..4usize).prop_map(Op::Leave),
        Just(Op::Silence),
        (0..40_000u64).prop_map(Op::Advance),
    ]
}

proptest! {
    /// At most one speaker at any time; the one forwarded is always the one last granted; epochs only grow.
    #[test]
    fn at_most_one_speaker(ops in proptest::collection::vec(op(), 1..200),
                           t3 in prop_oneof![Just(0u64), Just(300u64)]) {
        let mut h = Harness::new(FloorConfig { t3: Duration::from_millis(t3), ..Default::default() });
        let names = ["a", "b", "c", "d"];
        let mut holder: Option<(String, u64)> = None;
        // Set while a pre-empted holder is in its T3 grace: the next grant ends it.
        let mut in_grace = false;
        let mut last_epoch = 0;
        for op in ops {
            match op.clone() {
                Op::Press(m, p, q) => h.feed(Input::Request { member: names[m].into(), priority: p, queue: q }),
                Op::Release(m) | Op::Leave(m) => {
                    // A holder that lets go is told nothing when the queue takes over.
                    if holder.as_ref().is_some_and(|(s, _)| s == names[m]) {
                        holder = None;
                        in_grace = false;
                    }
                    if matches!(op, Op::Release(_)) {
                        h.release(names[m]);
                    } else {
                        h.feed(Input::Leave { member: names[m].into() });
                    }
                }
                Op::Silence => {
                    let epoch = h.floor.epoch();
                    h.feed(Input::MediaSilence { epoch });
                }
                Op::Advance(ms) => h.advance(Duration::from_millis(ms)),
            }
            for (_, e) in h.take_events() {
                match e {
                    FloorEvent::Granted { speaker, epoch, .. }
                        if holder.as_ref() == Some(&(speaker.clone(), epoch)) => {} // a repeated press
                    FloorEvent::Granted { speaker, epoch, .. } => {
                        prop_assert!(holder.is_none() || in_grace, "granted {speaker} while {holder:?} holds");
                        in_grace = false;
                        prop_assert!(epoch > last_epoch);
                        last_epoch = epoch;
                        holder = Some((speaker, epoch));
                    }
                    FloorEvent::Idle { epoch } => {
                        prop_assert!(holder.is_none() || holder.as_ref().unwrap().1 == epoch);
                        holder = None;
                        in_grace = false;
                    }
                    FloorEvent::Revoked { speaker, .. } if in_grace => {
                        // Only a holder leaving during its grace is told again.
                        prop_assert_eq!(holder.as_ref().map(|h| h.0.clone()), Some(speaker));
                        holder = None;
                        in_grace = false;
                    }
                    FloorEvent::Revoked { speaker, grace_ms, .. } if grace_ms > 0 => {
                        prop_assert_eq!(holder.as_ref().map(|h| h.0.clone()), Some(speaker));
                        in_grace = true;
                    }
                    FloorEvent::Revoked { grace_ms: 0, speaker, .. } => {
                        // (A holder that left is told `left` after the model already let it go.)
                        prop_assert!(holder.as_ref().is_none_or(|h| h.0 == speaker));
                        holder = None;
                    }
                    _ => {}
                }
            }
            // The shard forwards exactly the granted holder (or, during a T3 grace, the pre-empted one).
            let forwarded = h.forwarded.clone().and_then(|(s, e)| s.map(|s| (s, e)));
            if let (Some(hd), false) = (&holder, in_grace) {
                prop_assert_eq!(forwarded.as_ref(), Some(hd));
            }
            prop_assert!(h.floor.speaker().is_none() || forwarded.is_some());
        }
    }
}

#[test]
fn losing_a_race_to_another_node_still_sees_its_release() {
    for event_first in [true, false] {
        let mut h = Harness::new(FloorConfig::default());
        h.auto_store = false;
        h.press("a", 0);
        let zed = Input::Remote {
            speaker: Some("zed".into()),
            epoch: 50,
            emergency: false,
        };
        let denied = Input::StoreDenied {
            member: "a".into(),
            holder: Some(("zed".into(), 50)),
            reason: DenyReason::Busy,
        };
        if event_first {
            h.feed(zed.clone());
            h.feed(denied);
        } else {
            h.feed(denied);
            h.feed(zed.clone());
        }
        let ev = h.take_events();
        assert!(ev.contains(&(
            to("a"),
            FloorEvent::Denied {
                speaker: Some("zed".into()),
                reason: DenyReason::Busy
            }
        )));
        assert_eq!(
            ev.iter()
                .filter(|(_, e)| matches!(e, FloorEvent::Taken { .. }))
                .count(),
            1,
            "{ev:?}"
        );
        assert_eq!(h.floor.remote(), Some(("zed", 50)));
        h.feed(Input::Remote {
            speaker: None,
            epoch: 50,
            emergency: false,
        });
        assert_eq!(
            h.take_events(),
            vec![(To::All, FloorEvent::Idle { epoch: 50 })]
        );
    }
}

#[test]
fn presses_racing_a_release_are_settled_not_queued() {
    let mut h = Harness::new(FloorConfig::default());
    h.press("b", 0);
    h.take_events();
    // b releases; the store's answer is slow, and a, c, d press meanwhile (none asked to queue).
    h.auto_store = false;
    h.release("b");
    for m in ["a", "c", "d"] {
        h.press(m, 0);
    }
    assert!(
        h.take_events().is_empty(),
        "nobody is told `queued`: {:?}",
        h.events
    );
    let Some(Output::Release { epoch }) = h.pending.pop() else {
        panic!("expected the release: {:?}", h.pending);
    };
    h.auto_store = true;
    h.store_holder = None;
    h.feed(Input::StoreReleased { epoch });
    let ev = h.take_events();
    assert!(
        ev.iter()
            .any(|e| matches!(e, (To::Member(m), FloorEvent::Granted { .. }) if m == "a")),
        "{ev:?}"
    );
    for m in ["c", "d"] {
        assert!(
            ev.iter().any(|e| matches!(e, (To::Member(x), FloorEvent::Denied { reason: DenyReason::Busy, speaker: Some(s) }) if x == m && s == "a")),
            "{m} is denied busy: {ev:?}"
        );
    }
    assert!(
        !ev.iter().any(|e| matches!(e.1, FloorEvent::Idle { .. })),
        "no idle between b and a"
    );
    assert!(h.floor.is_quiet() || h.floor.speaker() == Some("a"));
}

#[test]
fn a_higher_priority_racer_wins_and_a_racer_that_lets_go_is_forgotten() {
    let mut h = Harness::new(FloorConfig::default());
    h.press("b", 0);
    h.auto_store = false;
    h.release("b");
    h.press("a", 0);
    h.press("boss", 7);
    h.press("c", 0);
    h.release("c");
    let Some(Output::Release { epoch }) = h.pending.pop() else {
        panic!();
    };
    h.auto_store = true;
    h.store_holder = None;
    h.take_events();
    h.feed(Input::StoreReleased { epoch });
    let ev = h.take_events();
    assert!(
        ev.iter()
            .any(|e| matches!(e, (To::Member(m), FloorEvent::Granted { .. }) if m == "boss")),
        "{ev:?}"
    );
    assert!(ev
        .iter()
        .any(|e| matches!(e, (To::Member(m), FloorEvent::Denied { .. }) if m == "a")));
    assert!(
        !ev.iter().any(|e| matches!(&e.0, To::Member(m) if m == "c")),
        "c let go: told nothing"
    );
}

#[test]
fn a_grant_the_shard_never_acknowledges_is_given_up() {
    let mut h = Harness::new(FloorConfig::default());
    h.auto_shard = false;
    h.press("a", 0);
    assert!(h.take_events().is_empty());
    assert_eq!(h.floor.poll_timeout(), Some(h.now + APPLY_TIMEOUT));
    h.advance(APPLY_TIMEOUT - Duration::from_millis(1));
    assert!(h.take_events().is_empty());
    h.advance(Duration::from_millis(1));
    let ev = h.take_events();
    assert!(
        ev.contains(&(
            to("a"),
            FloorEvent::Denied {
                speaker: None,
                reason: DenyReason::Unavailable
            }
        )),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| matches!(e.1, FloorEvent::Idle { .. })),
        "the floor is free again: {ev:?}"
    );
    assert_eq!(
        h.forwarded.as_ref().map(|f| f.0.clone()),
        Some(None),
        "the shard is told nobody speaks"
    );
    assert!(h.floor.is_quiet());
}

#[test]
fn the_lease_is_counted_from_when_the_grant_was_asked_for() {
    let lease = Lease {
        ttl: Duration::from_secs(3),
        renew_every: Duration::from_secs(1),
        margin: Duration::from_millis(250),
    };
    let mut h = Harness::new(FloorConfig {
        lease: Some(lease),
        ..FloorConfig::default()
    });
    let asked = h.now;
    h.auto_store = false;
    h.press("a", 0);
    // The store's answer takes 500 ms to come back.
    h.advance(Duration::from_millis(500));
    h.pending.clear();
    h.auto_store = true;
    h.store_holder = Some(7);
    h.feed(Input::StoreGranted {
        member: "a".into(),
        epoch: 7,
    });
    assert_eq!(
        h.until,
        Some(asked + Duration::from_millis(2750)),
        "the shard's deadline"
    );
    // Renewals fail from now on: revoked at asked + 2.75 s, not at the acknowledgement + 2.75 s.
    h.advance(Duration::from_millis(2249));
    assert!(h
        .take_events()
        .iter()
        .all(|e| !matches!(e.1, FloorEvent::Revoked { .. })));
    h.advance(Duration::from_millis(1));
    let ev = h.take_events();
    assert!(
        ev.iter().any(|e| matches!(
            e.1,
            FloorEvent::Revoked {
                reason: RevokeReason::LeaseLost,
                ..
            }
        )),
        "{ev:?}"
    );
    assert_eq!(h.now, asked + Duration::from_millis(2750));
}
