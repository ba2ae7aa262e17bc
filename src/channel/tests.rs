//! Channel tests in virtual time: members, latching, epochs, and the per-listener stream invariants.

use super::*;
use crate::rtp;
use proptest::prelude::*;
use std::collections::HashMap;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A channel with `n` latched members keyed 1..=n, listening on ports 5001.. .
fn channel(n: u64, now: Instant) -> Channel {
    let mut ch = Channel::new("ops".into(), now);
    for k in 1..=n {
        ch.add(Member::new(
            k,
            format!("m{k}"),
            addr(5000 + k as u16),
            OutStream::new(0x1000 + k as u32, 111, 0, 0),
        ));
        ch.heard(k, now);
    }
    ch
}

fn decode(batch: &Batch) -> Vec<(u32, u16, u32, bool)> {
    batch
        .headers
        .iter()
        .map(|h| {
            let mut p = h.to_vec();
            p.push(0xaa);
            let v = RtpView::parse(&p).unwrap();
            (v.ssrc, v.seq, v.timestamp, v.marker)
        })
        .collect()
}

#[test]
fn a_holder_past_its_lease_is_fenced_by_the_shard_until_a_renewal() {
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let mut ch = channel(2, t0);
    let grant = SpeakerChange::Granted {
        speaker: Some(1),
        epoch: 5,
        until: Some(ms(1000)),
    };
    assert!(ch.apply(grant, t0));
    let mut batch = Batch::default();
    let send = |ch: &mut Channel, seq: u16, at: Instant, batch: &mut Batch| {
        let p = rtp::build_packet(false, 111, seq, u32::from(seq) * 960, 99, b"voice");
        batch.clear();
        ch.forward(1, &RtpView::parse(&p).unwrap(), at, batch)
    };
    assert_eq!(send(&mut ch, 1, ms(999), &mut batch), Ok(()));
    assert_eq!(batch.len(), 1);
    assert_eq!(
        send(&mut ch, 2, ms(1000), &mut batch),
        Err(ForwardDrop::LeaseExpired),
        "at the lease's end the shard stops on its own"
    );
    assert!(batch.is_empty());
    // A lease for another epoch changes nothing; a renewal of this one forwards again.
    assert!(!ch.apply(
        SpeakerChange::Lease {
            epoch: 4,
            until: ms(5000)
        },
        ms(1000)
    ));
    assert_eq!(
        send(&mut ch, 3, ms(1001), &mut batch),
        Err(ForwardDrop::LeaseExpired)
    );
    assert!(ch.apply(
        SpeakerChange::Lease {
            epoch: 5,
            until: ms(2000)
        },
        ms(1001)
    ));
    assert_eq!(send(&mut ch, 4, ms(1500), &mut batch), Ok(()));
    // A renewal never shortens a lease.
    ch.apply(
        SpeakerChange::Lease {
            epoch: 5,
            until: ms(1600),
        },
        ms(1500),
    );
    assert_eq!(send(&mut ch, 5, ms(1800), &mut batch), Ok(()));
}

#[test]
fn a_member_without_the_listen_right_hears_nothing() {
    let now = Instant::now();
    let mut ch = channel(3, now);
    ch.set_listens(3, false);
    ch.apply(
        SpeakerChange::Granted {
            speaker: Some(1),
            epoch: 5,
            until: None,
        },
        now,
    );
    let p = rtp::build_packet(false, 111, 7, 960, 99, b"voice");
    let mut batch = Batch::default();
    ch.forward(1, &RtpView::parse(&p).unwrap(), now, &mut batch)
        .unwrap();
    let ssrcs: Vec<u32> = decode(&batch).iter().map(|h| h.0).collect();
    assert_eq!(ssrcs, vec![0x1002], "only member 2 hears member 1");
}

#[test]
fn only_the_holder_is_forwarded_to_everyone_else() {
    let now = Instant::now();
    let mut ch = channel(3, now);
    let p = rtp::build_packet(false, 111, 7, 960, 99, b"voice");
    let view = RtpView::parse(&p).unwrap();
    let mut batch = Batch::default();
    assert_eq!(
        ch.forward(1, &view, now, &mut batch),
        Err(ForwardDrop::NotHolder)
    );
    assert!(ch.apply(
        SpeakerChange::Granted {
            speaker: Some(1),
            epoch: 5,
            until: None,
        },
        now
    ));
    assert_eq!(
        ch.forward(2, &view, now, &mut batch),
        Err(ForwardDrop::NotHolder)
    );
    assert!(batch.is_empty());
    ch.forward(1, &view, now, &mut batch).unwrap();
    let ssrcs: Vec<u32> = decode(&batch).iter().map(|h| h.0).collect();
    assert_eq!(ssrcs, vec![0x1002, 0x1003], "never back to the holder");
}

#[test]
fn unlatched_members_hear_nothing_until_they_send() {
    let now = Instant::now();
    let mut ch = Channel::new("ops".into(), now);
    ch.add(Member::new(
        1,
        "a".into(),
        addr(1),
        OutStream::new(1, 111, 0, 0),
    ));
    ch.add(Member::new(
        2,
        "b".into(),
        addr(2),
        OutStream::new(2, 111, 0, 0),
    ));
    ch.apply(
        SpeakerChange::Granted {
            speaker: Some(1),
            epoch: 1,
            until: None,
        },
        now,
    );
    let p = rtp::build_packet(false, 111, 1, 0, 9, b"x");
    let mut batch = Batch::default();
    ch.forward(1, &RtpView::parse(&p).unwrap(), now, &mut batch)
        .unwrap();
    assert!(batch.is_empty());
    ch.heard(2, now);
    ch.forward(1, &RtpView::parse(&p).unwrap(), now, &mut batch)
        .unwrap();
    assert_eq!(batch.len(), 1);
    batch.clear();
    let later = now + LATCH_TIMEOUT + Duration::from_secs(1);
    let p = rtp::build_packet(false, 111, 2, 960, 9, b"x");
    ch.forward(1, &RtpView::parse(&p).unwrap(), later, &mut batch)
        .unwrap();
    assert!(batch.is_empty(), "latch expired");
}

#[test]
fn epoch_rules_ignore_stale_and_duplicate_events() {
    let now = Instant::now();
    let mut ch = channel(2, now);
    assert!(ch.apply(
        SpeakerChange::Granted {
            speaker: Some(1),
            epoch: 10,
            until: None,
        },
        now
    ));
    assert!(
        !ch.apply(
            SpeakerChange::Granted {
                speaker: Some(2),
                epoch: 9,
                until: None,
            },
            now
        ),
        "older grant"
    );
    assert!(
        !ch.apply(
            SpeakerChange::Granted {
                speaker: Some(2),
                epoch: 10,
                until: None,
            },
            now
        ),
        "same epoch twice"
    );
    assert!(
        !ch.apply(SpeakerChange::Idle { epoch: 9 }, now),
        "idle of another epoch"
    );
    assert_eq!(ch.speaker(), Some(1));
    assert!(ch.apply(SpeakerChange::Idle { epoch: 10 }, now));
    assert_eq!(ch.speaker(), None);
    assert!(
        !ch.apply(
            SpeakerChange::Granted {
                speaker: Some(2),
                epoch: 10,
                until: None,
            },
            now
        ),
        "reused epoch"
    );
}

#[test]
fn silence_is_reported_once_per_grant() {
    let now = Instant::now();
    let mut ch = channel(2, now);
    let t1 = Duration::from_secs(4);
    assert_eq!(ch.poll_silence(now + t1, t1), None, "nobody speaks");
    ch.apply(
        SpeakerChange::Granted {
            speaker: Some(1),
            epoch: 3,
            until: None,
        },
        now,
    );
    assert_eq!(ch.poll_silence(now + Duration::from_secs(3), t1), None);
    assert_eq!(ch.poll_silence(now + t1, t1), Some(3));
    assert_eq!(ch.poll_silence(now + t1 * 2, t1), None);
}

#[test]
fn sender_reports_for_streams_that_carried_media() {
    let now = Instant::now();
    let mut ch = channel(3, now);
    ch.apply(
        SpeakerChange::Granted {
            speaker: Some(1),
            epoch: 3,
            until: None,
        },
        now,
    );
    let p = rtp::build_packet(false, 111, 1, 0, 9, b"abcd");
    ch.forward(1, &RtpView::parse(&p).unwrap(), now, &mut Batch::default())
        .unwrap();
    let mut out = vec![];
    ch.sender_reports(now, Duration::from_secs(10), 1 << 32, &mut out);
    assert_eq!(out.len(), 2);
    let mut idle = vec![];
    ch.sender_reports(
        now + Duration::from_secs(11),
        Duration::from_secs(10),
        1 << 32,
        &mut idle,
    );
    assert!(
        idle.is_empty(),
        "no report for a stream idle for two intervals"
    );
    assert_eq!(out.len(), 2);
    let sr = &out[0].0;
    assert_eq!(sr[1], 200);
    assert_eq!(
        u32::from_be_bytes(sr[20..24].try_into().unwrap()),
        1,
        "packet count"
    );
    assert_eq!(
        u32::from_be_bytes(sr[24..28].try_into().unwrap()),
        4,
        "octet count"
    );
}

#[derive(Debug, Clone)]
enum Op {
    /// Member `m` gets the floor (a new epoch).
    Grant(u64),
    Idle,
    /// The current speaker sends `n` packets, in order, no loss.
    Talk(u8),
    /// A member that does not hold the floor sends a packet.
    Intrude(u64),
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1..=4u64).prop_map(Op::Grant),
        Just(Op::Idle),
        (1..20u8).prop_map(Op::Talk),
        (1..=4u64).prop_map(Op::Intrude),
        (0..5_000u64).prop_map(Op::Wait),
    ]
}

proptest! {
    /// Over any grant/idle/talk sequence: only the holder is forwarded, never to itself; every listener's
    /// sequence numbers continue by exactly one (no skip, no repeat), timestamps never go back, and the
    /// marker bit is set exactly on the first packet after a speaker change.
    #[test]
    fn listener_streams_stay_continuous(ops in proptest::collection::vec(op(), 1..120)) {
        let mut now = Instant::now();
        let mut ch = channel(4, now);
        let mut epoch = 0;
        // Each member's own RTP seq/ts space, as a real sender would have.
        let mut sender: HashMap<u64, (u16, u32)> = (1..=4).map(|k| (k, (k as u16 * 9000, k as u32 * 77_777))).collect();
        let mut last: HashMap<u32, (u16, u32)> = HashMap::new();
        let mut spoke_since_change: HashMap<u32, bool> = HashMap::new();
        let mut batch = Batch::default();
        for op in ops {
            match op {
                Op::Grant(m) => {
                    epoch += 1;
                    ch.apply(SpeakerChange::Granted { speaker: Some(m), epoch, until: None }, now);
                    spoke_since_change.clear();
                }
                Op::Idle => { ch.apply(SpeakerChange::Idle { epoch }, now); }
                Op::Wait(ms) => {
                    now += Duration::from_millis(ms);
                    for k in 1..=4 { ch.heard(k, now); }
                }
                Op::Intrude(m) if ch.speaker() != Some(m) => {
                    let p = rtp::build_packet(false, 111, 1, 1, 1, b"bad");
                    batch.clear();
                    let r = ch.forward(m, &RtpView::parse(&p).unwrap(), now, &mut batch);
                    prop_assert_eq!(r, Err(ForwardDrop::NotHolder));
                    prop_assert!(batch.is_empty());
                }
                Op::Intrude(_) => {}
                Op::Talk(n) => {
                    let Some(s) = ch.speaker() else { continue };
                    for _ in 0..n {
                        let (seq, ts) = sender[&s];
                        sender.insert(s, (seq.wrapping_add(1), ts.wrapping_add(960)));
                        let p = rtp::build_packet(false, 111, seq, ts, 0xbeef + s as u32, b"payload");
                        batch.clear();
                        ch.forward(s, &RtpView::parse(&p).unwrap(), now, &mut batch).unwrap();
                        prop_assert_eq!(batch.len(), 3);
                        for (ssrc, oseq, ots, marker) in decode(&batch) {
                            prop_assert_ne!(ssrc, 0x1000 + s as u32, "sent back to the speaker");
                            let first = !spoke_since_change.get(&ssrc).copied().unwrap_or(false);
                            prop_assert_eq!(marker, first);
                            if let Some((pseq, pts)) = last.get(&ssrc) {
                                prop_assert_eq!(oseq, pseq.wrapping_add(1), "seq skipped or repeated");
                                let step = ots.wrapping_sub(*pts);
                                prop_assert!(step > 0 && step < 1 << 30, "timestamp went back");
                            }
                            last.insert(ssrc, (oseq, ots));
                            spoke_since_change.insert(ssrc, true);
                        }
                        now += Duration::from_millis(20);
                    }
                }
            }
        }
    }
}

/// What a speaker's uplink does to the next packet it sends.
#[derive(Debug, Clone, Copy)]
enum Uplink {
    /// Sent in order.
    Send,
    /// Lost: its sequence number never arrives.
    Lose,
    /// The next two arrive swapped.
    Swap,
}

fn uplink() -> impl Strategy<Value = Uplink> {
    prop_oneof![6 => Just(Uplink::Send), 1 => Just(Uplink::Lose), 1 => Just(Uplink::Swap)]
}

/// The order in which a burst's sequence numbers arrive, from `start` (wrapping at 2^16).
fn arrivals(start: u16, uplink: &[Uplink]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut next = start;
    for u in uplink {
        match u {
            Uplink::Send => out.push(next),
            Uplink::Lose => {}
            Uplink::Swap => {
                out.push(next.wrapping_add(1));
                out.push(next);
                next = next.wrapping_add(1);
            }
        }
        next = next.wrapping_add(1);
    }
    out
}

proptest! {
    /// Bursts whose uplink loses, reorders and wraps its sequence numbers (starts near 65,535): within a
    /// burst each listener's mapping is one offset for sequence numbers and timestamps (a gap in is a gap
    /// out, a reorder in a reorder out, across the wrap); a packet older than the burst's first is
    /// dropped, never mapped below it; each burst continues right after the highest number the listener
    /// was given before; no number is given twice.
    #[test]
    fn listener_streams_follow_loss_reorder_and_wrap(
        bursts in proptest::collection::vec(
            (1..=4u64, prop_oneof![65_480..=65_535u16, any::<u16>()],
             proptest::collection::vec(uplink(), 1..80)),
            1..8,
        )
    ) {
        let mut now = Instant::now();
        let mut ch = channel(4, now);
        let mut batch = Batch::default();
        // Per listener: the highest output number so far (by input order within the burst), every
        // number given, and the burst's offsets.
        let mut high: HashMap<u32, u16> = HashMap::new();
        let mut given: HashMap<u32, std::collections::HashSet<u16>> = HashMap::new();
        for (epoch, (speaker, start, uplink)) in bursts.into_iter().enumerate() {
            ch.apply(SpeakerChange::Granted { speaker: Some(speaker), epoch: epoch as u64 + 1, until: None }, now);
            let order = arrivals(start, &uplink);
            let Some(&first) = order.first() else { continue }; // every packet of the burst lost
            let mut offsets: HashMap<u32, (u16, u32)> = HashMap::new();
            let mut burst_high: HashMap<u32, u16> = HashMap::new();
            for seq in order {
                // The timestamp follows the sequence number: 20 ms frames.
                let idx = u32::from(seq.wrapping_sub(start));
                let ts = 1_000_000u32.wrapping_add(idx * 960);
                let p = rtp::build_packet(false, 111, seq, ts, 0xbeef + speaker as u32, b"voice");
                batch.clear();
                let r = ch.forward(speaker, &RtpView::parse(&p).unwrap(), now, &mut batch);
                // Older than the burst's first packet (distance backwards, mod 2^16).
                let before_first = first.wrapping_sub(seq) != 0 && first.wrapping_sub(seq) < 1 << 15;
                if before_first {
                    prop_assert_eq!(r, Err(ForwardDrop::TooOld));
                    prop_assert!(batch.is_empty());
                    continue;
                }
                prop_assert_eq!(r, Ok(()));
                prop_assert_eq!(batch.len(), 3);
                for (ssrc, oseq, ots, _) in decode(&batch) {
                    let (off_seq, off_ts) = *offsets.entry(ssrc).or_insert_with(|| {
                        (oseq.wrapping_sub(seq), ots.wrapping_sub(ts))
                    });
                    if seq == first {
                        if let Some(h) = high.get(&ssrc) {
                            prop_assert_eq!(oseq, h.wrapping_add(1), "a burst continues the stream");
                        }
                    }
                    prop_assert_eq!(oseq.wrapping_sub(seq), off_seq, "one sequence offset per burst");
                    prop_assert_eq!(ots.wrapping_sub(ts), off_ts, "one timestamp offset per burst");
                    prop_assert!(given.entry(ssrc).or_default().insert(oseq), "number {} given twice", oseq);
                    let h = burst_high.entry(ssrc).or_insert(oseq);
                    if oseq.wrapping_sub(*h) < 1 << 15 {
                        *h = oseq;
                    }
                }
                now += Duration::from_millis(20);
            }
            high.extend(burst_high);
        }
    }
}
