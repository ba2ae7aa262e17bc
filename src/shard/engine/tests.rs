//! The shard without a socket: every kind of bad input is counted under its reason and changes nothing.

use super::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A shard with channel "ops": members 1..=3 at ports 6001..=6003, all latched, member 1 holding the floor.
fn shard() -> (ShardCore, Instant) {
    let now = Instant::now();
    let mut s = ShardCore::new(0, ShardConfig::default(), now);
    for k in 1..=3u64 {
        let ev = s.handle_command(
            Command::AddMember {
                channel: "ops".into(),
                key: k,
                name: format!("m{k}"),
                addr: addr(6000 + k as u16),
                ssrc: k as u32,
            },
            now,
        );
        assert_eq!(ev, Some(Event::MemberAdded { key: k }));
        let rr = [0x80, 201, 0, 1, 0, 0, 0, 1];
        assert_eq!(
            s.handle_datagram(addr(6000 + k as u16), &rr, now, &mut Batch::default()),
            Verdict::Rtcp
        );
    }
    let ev = s.handle_command(
        Command::Speaker {
            channel: "ops".into(),
            change: SpeakerChange::Granted {
                speaker: Some(1),
                epoch: 9,
                until: None,
            },
        },
        now,
    );
    assert_eq!(
        ev,
        Some(Event::Applied {
            channel: "ops".into(),
            epoch: 9,
            applied: true,
            idle: false,
        })
    );
    (s, now)
}

fn dropped(s: &ShardCore, d: DropReason) -> u64 {
    s.stats().dropped[d as usize]
}

#[test]
fn holder_media_is_forwarded_with_the_payload_range() {
    let (mut s, now) = shard();
    let p = rtp::build_packet(false, OPUS_PT, 1, 960, 77, b"opus-frame");
    let mut batch = Batch::default();
    let v = s.handle_datagram(addr(6001), &p, now, &mut batch);
    assert_eq!(v, Verdict::Forward(12..22));
    assert_eq!(batch.len(), 2);
}

#[test]
fn bad_input_is_counted_and_dropped() {
    let (mut s, now) = shard();
    let mut batch = Batch::default();
    let good = rtp::build_packet(false, OPUS_PT, 1, 960, 77, b"x");
    let cases: Vec<(SocketAddr, Vec<u8>, DropReason)> = vec![
        (addr(6001), vec![0x80, 111, 0, 1], DropReason::TooShort),
        (
            addr(6001),
            {
                let mut p = good.clone();
                p[0] = 0x40;
                p
            },
            DropReason::BadVersion,
        ),
        (
            addr(6001),
            {
                let mut p = good.clone();
                p[0] |= 0x0f;
                p
            },
            DropReason::Malformed,
        ),
        (addr(6001), vec![0x80; 4000], DropReason::Oversized),
        (addr(7000), good.clone(), DropReason::UnknownSource),
        (addr(6002), good.clone(), DropReason::NotHolder),
        (
            addr(6001),
            rtp::build_packet(false, 0, 2, 1920, 77, b"pcmu"),
            DropReason::NotOpus,
        ),
        (
            addr(6001),
            vec![
                0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            ],
            DropReason::NotRtp,
        ),
        (
            addr(6001),
            vec![22, 254, 253, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            DropReason::NotRtp,
        ),
    ];
    for (src, data, reason) in cases {
        let before = dropped(&s, reason);
        batch.clear();
        assert_eq!(
            s.handle_datagram(src, &data, now, &mut batch),
            Verdict::Dropped(reason),
            "{reason:?}"
        );
        assert!(batch.is_empty());
        assert_eq!(dropped(&s, reason), before + 1);
    }
    // The holder still gets through afterwards.
    assert!(matches!(
        s.handle_datagram(addr(6001), &good, now, &mut batch),
        Verdict::Forward(_)
    ));
    assert_eq!(s.stats().packets_in, 3 + 10);
}

#[test]
fn removing_members_and_channels_cleans_the_maps() {
    let (mut s, now) = shard();
    for k in 1..=3 {
        s.handle_command(
            Command::RemoveMember {
                channel: "ops".into(),
                key: k,
            },
            now,
        );
    }
    assert!(s.channel("ops").is_none());
    let st = s.stats();
    assert_eq!((st.channels, st.members), (0, 0));
    let p = rtp::build_packet(false, OPUS_PT, 1, 960, 77, b"x");
    assert_eq!(
        s.handle_datagram(addr(6001), &p, now, &mut Batch::default()),
        Verdict::Dropped(DropReason::UnknownSource)
    );
}

#[test]
fn silence_is_reported_after_t1() {
    let (mut s, now) = shard();
    let mut events = vec![];
    let mut reports = vec![];
    s.handle_tick(
        now + Duration::from_secs(1),
        Duration::ZERO,
        &mut events,
        &mut reports,
    );
    assert!(events.is_empty());
    s.handle_tick(
        now + Duration::from_secs(5),
        Duration::ZERO,
        &mut events,
        &mut reports,
    );
    assert_eq!(
        events,
        vec![Event::Silence {
            channel: "ops".into(),
            epoch: 9
        }]
    );
}

/// The shard's clock wakes when something is due, not on a fixed tick: an idle shard has nothing due, a
/// grant makes T1 due, media makes sender reports due — in one batch a second, every listener stream
/// once per `sr_interval`.
#[test]
fn the_tick_says_when_it_is_next_due() {
    let t0 = Instant::now();
    let mut idle = ShardCore::new(0, ShardConfig::default(), t0);
    let (mut events, mut reports) = (vec![], vec![]);
    assert_eq!(
        idle.handle_tick(t0, Duration::ZERO, &mut events, &mut reports),
        None,
        "nothing to do: sleep until the heartbeat"
    );

    let (mut s, now) = shard();
    assert!(s.take_retick(), "the grant asks the clock to look");
    assert!(!s.take_retick(), "once");
    let due = s.handle_tick(now, Duration::ZERO, &mut events, &mut reports);
    assert!(
        due.is_some_and(|d| d <= now + ShardConfig::default().t1),
        "{due:?}"
    );

    // The holder talks for 12 s, 20 ms packets: each listener's stream gets a report every 5 s, from
    // batches at most one a second.
    let (mut wakes, mut t, mut next) = (0, now, now);
    for i in 0..600u32 {
        t = now + Duration::from_millis(20 * u64::from(i));
        let p = rtp::build_packet(false, OPUS_PT, i as u16, 960 * i, 77, b"x");
        let v = s.handle_datagram(addr(6001), &p, t, &mut Batch::default());
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        if t >= next {
            wakes += 1;
            next = s
                .handle_tick(t, Duration::ZERO, &mut events, &mut reports)
                .expect("due while media flows");
            assert!(next > t && next <= t + SR_BATCH, "{:?}", next - t);
        }
    }
    assert!(events.is_empty(), "no silence while the holder talks");
    assert!((12..=14).contains(&wakes), "{wakes} wake-ups in 12 s");
    assert!(
        (4..=6).contains(&reports.len()),
        "2 listeners, a report each per 5 s: {}",
        reports.len()
    );
    // Silent from t: T1 is next due, then reported once.
    let due = s.handle_tick(t, Duration::ZERO, &mut events, &mut reports);
    assert!(due.is_some());
    let t1 = t + ShardConfig::default().t1;
    s.handle_tick(t1, Duration::ZERO, &mut events, &mut reports);
    assert_eq!(events.len(), 1, "{events:?}");
}

#[test]
fn shard_of_is_stable() {
    assert_eq!(
        crate::shard::shard_of("ops-1", 4),
        crate::shard::shard_of("ops-1", 4)
    );
    assert_eq!(crate::shard::shard_of("anything", 1), 0);
    let spread: std::collections::HashSet<usize> = (0..64)
        .map(|i| crate::shard::shard_of(&format!("ch{i}"), 2))
        .collect();
    assert_eq!(spread.len(), 2);
}

#[test]
fn relay_accepts_only_registered_peers_with_the_current_remote_epoch() {
    use crate::relay::RelayKey;
    let now = Instant::now();
    let key = RelayKey::new(b"k");
    let peer = addr(9000);
    let relay = RelayState {
        key: key.clone(),
        node: "me".into(),
        peers: [
            (peer, "other".to_string()),
            (addr(9001), "third".to_string()),
        ]
        .into_iter()
        .collect(),
    };
    let mut s = ShardCore::with_relay(0, ShardConfig::default(), Some(relay), now);
    for k in 1..=2u64 {
        s.handle_command(
            Command::AddMember {
                channel: "ops".into(),
                key: k,
                name: format!("m{k}"),
                addr: addr(6000 + k as u16),
                ssrc: k as u32,
            },
            now,
        );
        s.handle_datagram(
            addr(6000 + k as u16),
            &[0x80, 201, 0, 1, 0, 0, 0, 1],
            now,
            &mut Batch::default(),
        );
    }
    // Another node's member holds the floor at epoch 20.
    s.handle_command(
        Command::Speaker {
            channel: "ops".into(),
            change: SpeakerChange::Granted {
                speaker: None,
                epoch: 20,
                until: None,
            },
        },
        now,
    );
    let rtp = rtp::build_packet(false, OPUS_PT, 1, 960, 5, b"remote");
    let mut buf = Vec::new();
    let mut batch = Batch::default();
    key.encode(&mut buf, "ops", 20, "zed", "other", &rtp);
    assert!(matches!(
        s.handle_relay_datagram(peer, &buf, now, &mut batch),
        Verdict::Forward(_)
    ));
    assert_eq!(
        batch.len(),
        2,
        "every local member hears the remote speaker"
    );
    batch.clear();
    assert_eq!(
        s.handle_relay_datagram(addr(9999), &buf, now, &mut batch),
        Verdict::Dropped(DropReason::NotRtp)
    );
    key.encode(&mut buf, "ops", 19, "old", "other", &rtp);
    assert_eq!(
        s.handle_relay_datagram(peer, &buf, now, &mut batch),
        Verdict::Dropped(DropReason::NotRtp)
    );
    RelayKey::new(b"wrong").encode(&mut buf, "ops", 20, "zed", "other", &rtp);
    assert_eq!(
        s.handle_relay_datagram(peer, &buf, now, &mut batch),
        Verdict::Dropped(DropReason::NotRtp)
    );
    key.encode(&mut buf, "nope", 20, "zed", "other", &rtp);
    assert_eq!(
        s.handle_relay_datagram(peer, &buf, now, &mut batch),
        Verdict::Dropped(DropReason::NotRtp)
    );
    assert!(batch.is_empty());
    let st = s.stats();
    assert_eq!(
        st.relay_dropped,
        [0, 1, 1, 1, 1, 0],
        "malformed, bad_tag, unknown_node, stale_epoch, unknown_channel, not_grant_holder"
    );
    // A relayed packet of a newer epoch is not a grant: it waits for the control thread to confirm it.
    key.encode(&mut buf, "ops", 30, "zed", "other", &rtp);
    assert_eq!(
        s.handle_relay_datagram(peer, &buf, now, &mut batch),
        Verdict::Dropped(DropReason::NotRtp)
    );
    assert_eq!(s.channel("ops").map(|c| c.epoch()), Some(20));
    // The store says node "other" holds epoch 30: its relay is accepted, no other node's.
    s.handle_command(
        Command::Speaker {
            channel: "ops".into(),
            change: SpeakerChange::Remote {
                epoch: 30,
                node: "other".into(),
            },
        },
        now,
    );
    assert!(matches!(
        s.handle_relay_datagram(peer, &buf, now, &mut batch),
        Verdict::Forward(_)
    ));
    batch.clear();
    // A registered node that does not hold the grant, and one that names another node than its own.
    key.encode(&mut buf, "ops", 30, "zed", "third", &rtp);
    assert_eq!(
        s.handle_relay_datagram(addr(9001), &buf, now, &mut batch),
        Verdict::Dropped(DropReason::NotRtp)
    );
    key.encode(&mut buf, "ops", 30, "zed", "other", &rtp);
    assert_eq!(
        s.handle_relay_datagram(addr(9001), &buf, now, &mut batch),
        Verdict::Dropped(DropReason::NotRtp)
    );
    assert_eq!(
        s.stats().relay_dropped[5],
        2,
        "both counted as not_grant_holder"
    );
    assert!(batch.is_empty());
    // A local grant ends the remote one: relayed packets of the old epoch stop.
    s.handle_command(
        Command::Speaker {
            channel: "ops".into(),
            change: SpeakerChange::Granted {
                speaker: Some(1),
                epoch: 31,
                until: None,
            },
        },
        now,
    );
    key.encode(&mut buf, "ops", 30, "zed", "other", &rtp);
    assert_eq!(
        s.handle_relay_datagram(peer, &buf, now, &mut batch),
        Verdict::Dropped(DropReason::NotRtp)
    );
    assert_eq!(s.channel("ops").and_then(|c| c.speaker()), Some(1));
    // A newer epoch while a local member speaks: another node was granted the floor, so the local
    // holder is stale — fenced at once, though the newer stream itself waits for confirmation.
    key.encode(&mut buf, "ops", 32, "zed", "other", &rtp);
    assert_eq!(
        s.handle_relay_datagram(peer, &buf, now, &mut batch),
        Verdict::Dropped(DropReason::NotRtp)
    );
    assert_eq!(s.channel("ops").and_then(|c| c.speaker()), None, "fenced");
    assert!(batch.is_empty());
}

/// The runner's quiet window asks [`ShardCore::floor_held`] per wake-up: it follows grants (local and
/// remote), idles, a holder leaving and a channel disappearing, and stale changes move nothing.
#[test]
fn floor_held_follows_grants_idles_and_leaves() {
    let (mut s, now) = shard();
    assert!(s.floor_held(), "member 1 holds the floor of ops");
    let speaker = |change| Command::Speaker {
        channel: "ops".into(),
        change,
    };
    s.handle_command(speaker(SpeakerChange::Idle { epoch: 8 }), now);
    assert!(s.floor_held(), "an idle for an older epoch is stale");
    s.handle_command(speaker(SpeakerChange::Idle { epoch: 9 }), now);
    assert!(!s.floor_held(), "idle");
    s.handle_command(
        speaker(SpeakerChange::Remote {
            epoch: 10,
            node: "b".into(),
        }),
        now,
    );
    assert!(
        s.floor_held(),
        "held on another node: its media comes by relay"
    );
    s.handle_command(
        speaker(SpeakerChange::Granted {
            speaker: Some(2),
            epoch: 11,
            until: None,
        }),
        now,
    );
    assert!(s.floor_held(), "a local speaker after the remote one");
    s.handle_command(
        Command::RemoveMember {
            channel: "ops".into(),
            key: 2,
        },
        now,
    );
    assert!(!s.floor_held(), "the holder left");
    s.handle_command(
        speaker(SpeakerChange::Remote {
            epoch: 12,
            node: "b".into(),
        }),
        now,
    );
    assert!(s.floor_held());
    for key in [1, 3] {
        s.handle_command(
            Command::RemoveMember {
                channel: "ops".into(),
                key,
            },
            now,
        );
    }
    assert!(
        s.channel("ops").is_none(),
        "the last member took the channel"
    );
    assert!(!s.floor_held(), "a channel that is gone holds nothing");
}
