//! The loop's order, on real sockets: what a turn does with what woke it.

use std::net::{SocketAddr, UdpSocket};

use super::*;
use crate::channel::SpeakerChange;
use crate::rtp::build_packet;
use crate::shard::engine::OPUS_PT;
use crate::shard::{udp, ShardConfig};

const PATIENCE: Duration = Duration::from_secs(2);

fn member(key: u64, addr: SocketAddr) -> Command {
    Command::AddMember {
        channel: "ops".into(),
        key,
        name: format!("m{key}"),
        addr,
        ssrc: key as u32,
    }
}

/// Waits (bounded) until `media` has a datagram queued, without reading it.
fn queued(media: &Socket) {
    let mut fds = [PollFd::new(media, PollFlags::IN)];
    let patience = timespec(PATIENCE);
    assert_eq!(
        poll(&mut fds, Some(&patience)).unwrap(),
        1,
        "nothing arrived"
    );
}

const ONLY_MEDIA: Ready = Ready {
    media: true,
    relay: false,
    ring: false,
};

/// The race the shard must win: the control thread queues a grant and rings, the member hears of it and
/// sends, and `poll` had already returned for the socket alone — the packet must still meet the grant.
#[test]
fn a_command_queued_before_a_datagram_is_applied_before_it() {
    let media = udp::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let to_shard = media.local_addr().unwrap().as_socket().unwrap();
    let speaker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
    listener.set_read_timeout(Some(PATIENCE)).unwrap();
    let doorbell = Doorbell::new().unwrap();
    let (tx, rx) = flume::bounded(16);
    let (events_tx, events) = flume::bounded(16);
    let core = ShardCore::new(0, ShardConfig::default(), Instant::now());
    let mut shard = Running::new(0, core, &media, None, &doorbell, &rx, events_tx, None);

    tx.send(member(1, speaker.local_addr().unwrap())).unwrap();
    tx.send(member(2, listener.local_addr().unwrap())).unwrap();
    assert!(shard
        .turn(Ready {
            ring: true,
            ..ONLY_MEDIA
        })
        .is_ok());
    // Both latch with a receiver report (the address they send from is where they hear).
    let rr = [0x80, 201, 0, 1, 0, 0, 0, 1];
    for s in [&speaker, &listener] {
        s.send_to(&rr, to_shard).unwrap();
        queued(&media);
        assert!(shard.turn(ONLY_MEDIA).is_ok());
    }

    let grant = SpeakerChange::Granted {
        speaker: Some(1),
        epoch: 9,
        until: None,
    };
    tx.send(Command::Speaker {
        channel: "ops".into(),
        change: grant,
    })
    .unwrap();
    let frame = build_packet(false, OPUS_PT, 1, 960, 77, b"opus-frame");
    speaker.send_to(&frame, to_shard).unwrap();
    queued(&media);
    assert!(shard.turn(ONLY_MEDIA).is_ok());

    let mut buf = [0u8; 1500];
    let (n, _) = listener
        .recv_from(&mut buf)
        .expect("the listener heard the packet sent after the grant");
    assert_eq!(&buf[12..n], b"opus-frame");
    assert_eq!(shard.core.stats().forwarded, 1, "{:?}", shard.core.stats());
    assert!(events.try_iter().any(|e| matches!(
        e,
        Event::Applied {
            epoch: 9,
            applied: true,
            ..
        }
    )));
}

#[test]
fn shutdown_stops_the_turns() {
    let media = udp::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let doorbell = Doorbell::new().unwrap();
    let (tx, rx) = flume::bounded(4);
    let (events_tx, _events) = flume::bounded(4);
    let core = ShardCore::new(0, ShardConfig::default(), Instant::now());
    let mut shard = Running::new(0, core, &media, None, &doorbell, &rx, events_tx, None);
    assert!(shard
        .turn(Ready {
            ring: true,
            ..ONLY_MEDIA
        })
        .is_ok());
    tx.send(Command::Shutdown).unwrap();
    assert!(shard
        .turn(Ready {
            ring: true,
            ..ONLY_MEDIA
        })
        .is_err());
}

/// A busy shard gathers: from the second of two reads closer than the window it sleeps a window (the
/// doorbell excepted) instead of waking per datagram, and stops as soon as a window brings nothing.
#[test]
fn a_busy_shard_gathers_and_a_quiet_one_does_not() {
    let media = udp::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let to_shard = media.local_addr().unwrap().as_socket().unwrap();
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let doorbell = Doorbell::new().unwrap();
    let (_tx, rx) = flume::bounded::<Command>(4);
    let (events_tx, _events) = flume::bounded(4);
    let config = ShardConfig {
        batch_window: Duration::from_secs(60),
        ..ShardConfig::default()
    };
    let core = ShardCore::new(0, config, Instant::now());
    let mut shard = Running::new(0, core, &media, None, &doorbell, &rx, events_tx, None);
    let mut datagram_turn = || {
        // Not a member's: read, counted and dropped — what matters here is that it was read.
        sender.send_to(b"x", to_shard).unwrap();
        queued(&media);
        let next = shard.turn(ONLY_MEDIA).ok().unwrap();
        next.gather_until
    };
    assert_eq!(
        datagram_turn(),
        None,
        "a first datagram: woken for it, no gathering"
    );
    assert!(
        datagram_turn().is_some(),
        "the second within the window: gather"
    );
    assert!(
        datagram_turn().is_some(),
        "and go on while windows bring datagrams"
    );
    // More queued than one read takes: the next read comes at once, not a window (here a minute) later.
    for _ in 0..udp::RECV_BATCH + 8 {
        sender.send_to(b"x", to_shard).unwrap();
    }
    queued(&media);
    let mut immediate = false;
    for _ in 0..10 {
        let before = Instant::now();
        let next = shard.turn(ONLY_MEDIA).ok().unwrap();
        let until = next.gather_until.expect("still gathering");
        if shard.media_rx.read_last() == udp::RECV_BATCH {
            assert!(
                until < before + Duration::from_secs(1),
                "a full read waits no window"
            );
            immediate = true;
        } else {
            assert!(
                until > before + Duration::from_secs(30),
                "a partial read waits the window"
            );
            break;
        }
    }
    assert!(immediate, "no read filled the buffers");
    let next = shard.turn(ONLY_MEDIA).ok().unwrap();
    assert_eq!(
        next.gather_until, None,
        "a window that brought nothing: back to waking per datagram"
    );

    drop(shard);

    // With no window (`--batch-window-us 0`) it never gathers.
    let (events_tx, _events) = flume::bounded(4);
    let core = ShardCore::new(0, ShardConfig::default(), Instant::now());
    let mut shard = Running::new(0, core, &media, None, &doorbell, &rx, events_tx, None);
    for _ in 0..3 {
        sender.send_to(b"x", to_shard).unwrap();
        queued(&media);
        assert_eq!(shard.turn(ONLY_MEDIA).ok().unwrap().gather_until, None);
    }
}

/// A shard where no floor is held sleeps the quiet window after a read — keep-alives and reports wait —
/// and stops as soon as a window brings nothing; with a floor held it wakes per datagram again, and a
/// grant's doorbell ends a quiet sleep at once.
#[test]
fn a_shard_without_a_floor_held_reads_once_per_quiet_window() {
    let media = udp::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let to_shard = media.local_addr().unwrap().as_socket().unwrap();
    let member_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let doorbell = Doorbell::new().unwrap();
    let (tx, rx) = flume::bounded(16);
    let (events_tx, _events) = flume::bounded(16);
    let config = ShardConfig {
        quiet_window: Duration::from_secs(60),
        ..ShardConfig::default()
    };
    let core = ShardCore::new(0, config, Instant::now());
    let mut shard = Running::new(0, core, &media, None, &doorbell, &rx, events_tx, None);
    tx.send(member(1, member_sock.local_addr().unwrap()))
        .unwrap();
    assert!(shard
        .turn(Ready {
            ring: true,
            ..ONLY_MEDIA
        })
        .is_ok());
    let keepalive_turn = |shard: &mut Running<'_>| {
        member_sock
            .send_to(&[0x80, 201, 0, 1, 0, 0, 0, 1], to_shard)
            .unwrap();
        queued(&media);
        let before = Instant::now();
        let next = shard.turn(ONLY_MEDIA).ok().unwrap();
        (before, next.gather_until)
    };
    let (before, until) = keepalive_turn(&mut shard);
    let until = until.expect("no floor held: the next read waits the quiet window");
    assert!(until > before + Duration::from_secs(30), "the quiet window");
    assert!(
        shard.turn(ONLY_MEDIA).ok().unwrap().gather_until.is_none(),
        "a window that brought nothing: back to waking per datagram"
    );

    // A grant rings while the shard sleeps quietly: the sleep ends at once, and with the floor held the
    // shard wakes per datagram again.
    tx.send(Command::Speaker {
        channel: "ops".into(),
        change: SpeakerChange::Granted {
            speaker: Some(1),
            epoch: 3,
            until: None,
        },
    })
    .unwrap();
    let asleep = Instant::now();
    let ready = gather(&doorbell, false, asleep + Duration::from_secs(60));
    assert!(ready.ring, "the doorbell ended the quiet sleep");
    assert!(asleep.elapsed() < PATIENCE);
    assert!(shard.turn(ready).is_ok());
    assert!(shard.core.floor_held());
    let (_, until) = keepalive_turn(&mut shard);
    assert_eq!(until, None, "a floor is held: no quiet window");
}
