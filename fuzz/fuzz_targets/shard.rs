//! The whole sans-IO shard core ([`ShardCore`]) fed an arbitrary sequence of datagrams (media port and
//! relay port), control-thread commands and clock ticks, starting from two channels with latched members
//! and a floor held. The commands are ones the control thread can send (unique membership keys, epochs
//! around the channel's, leases); the datagrams are anything, from members, nodes and strangers.
//!
//! Beyond "no panic", every step checks the floor's safety as the shard sees it:
//! - a local datagram is forwarded only from the address of its channel's current holder, and never at or
//!   after the end of the lease the shard was given for that grant;
//! - a relayed datagram is forwarded only into a channel with no local holder, at the packet's epoch;
//! - no fan-out goes back to the sender.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use talkgroup::channel::SpeakerChange;
use talkgroup::forward::Batch;
use talkgroup::relay::RelayKey;
use talkgroup::rtp::{self, SR_LEN};
use talkgroup::shard::engine::{RelayState, ShardConfig, ShardCore, Verdict, OPUS_PT};
use talkgroup::shard::{Command, Event};

const CHANNELS: [&str; 3] = ["alpha", "bravo", "charlie"];
const MEMBERS_PER_CHANNEL: u64 = 4;
const SECRET: &[u8] = b"fuzz cluster secret";
/// Nodes that may relay to this shard, and the id each may speak for.
const NODES: [(&str, &str); 2] = [("127.0.0.2:7000", "node-b"), ("127.0.0.3:7000", "node-c")];
/// At most this many operations of an input are run (a longer input is not a different test).
const MAX_OPS: usize = 256;

/// The source address of a datagram: a member's port, a node's relay address, or a stranger.
fn source(i: u8) -> SocketAddr {
    match i % 8 {
        n @ 0..=4 => SocketAddr::from(([127, 0, 0, 1], 6001 + u16::from(n))),
        5 => NODES[0].0.parse().expect("address"),
        6 => NODES[1].0.parse().expect("address"),
        _ => SocketAddr::from(([127, 0, 0, 9], 9999)),
    }
}

#[derive(Arbitrary, Debug)]
enum Epoch {
    /// The channel's epoch plus one plus this.
    Newer(u8),
    /// The channel's epoch.
    Same,
    /// The channel's epoch less one less this.
    Older(u8),
    /// Any value (out of range ones included).
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Payload {
    /// A well-formed RTP packet with these fields.
    Rtp {
        marker: bool,
        opus: bool,
        seq: u16,
        ts: u32,
        ssrc: u32,
        padding: u8,
        payload: Vec<u8>,
    },
    /// The next packet of the sender's stream (what a talking member sends most of the time).
    Next { gap: u8, payload_len: u8 },
    /// A receiver report (latching).
    Rtcp,
    /// Any bytes.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Datagram {
        from: u8,
        payload: Payload,
    },
    Relay {
        from: u8,
        channel: u8,
        epoch: Epoch,
        node: u8,
        speaker: String,
        payload: Payload,
    },
    RelayRaw {
        from: u8,
        data: Vec<u8>,
    },
    Grant {
        channel: u8,
        member: Option<u8>,
        epoch: Epoch,
        lease_ms: Option<u16>,
    },
    Remote {
        channel: u8,
        epoch: Epoch,
        node: u8,
    },
    Lease {
        channel: u8,
        epoch: Epoch,
        lease_ms: u16,
    },
    Idle {
        channel: u8,
        epoch: Epoch,
    },
    Add {
        channel: u8,
        member: u8,
        addr: u8,
        ssrc: u32,
    },
    Remove {
        channel: u8,
        member: u8,
    },
    Listens {
        channel: u8,
        member: u8,
        listens: bool,
    },
    Targets {
        channel: u8,
        n: u8,
    },
    Tick {
        advance_ms: u16,
    },
}

/// What the target knows of the shard's state from the commands it sent.
struct Model {
    /// Membership key → (channel index, address).
    members: HashMap<u64, (usize, SocketAddr)>,
    /// Per channel: the epoch of the last grant applied and the latest lease end the shard was told
    /// for it (`None`: a grant without lease, not bounded).
    lease: [Option<(u64, Option<Instant>)>; 3],
    /// Per source address: the next sequence number and timestamp of its stream.
    streams: HashMap<SocketAddr, (u16, u32)>,
}

fn key(channel: usize, member: u8) -> u64 {
    channel as u64 * 16 + u64::from(member) % MEMBERS_PER_CHANNEL + 1
}

fn epoch_of(core: &ShardCore, channel: usize, e: &Epoch) -> u64 {
    let cur = core.channel(CHANNELS[channel]).map_or(0, |c| c.epoch());
    match *e {
        Epoch::Newer(n) => cur.saturating_add(1 + u64::from(n)),
        Epoch::Same => cur,
        Epoch::Older(n) => cur.saturating_sub(1 + u64::from(n)),
        Epoch::Raw(v) => v,
    }
}

fn packet(model: &mut Model, from: SocketAddr, p: &Payload) -> Vec<u8> {
    match p {
        Payload::Rtp {
            marker,
            opus,
            seq,
            ts,
            ssrc,
            padding,
            payload,
        } => {
            let pt = if *opus { OPUS_PT } else { 0 };
            let mut v = rtp::build_packet(*marker, pt, *seq, *ts, *ssrc, payload);
            if *padding > 0 {
                v[0] |= 0x20;
                v.extend(std::iter::repeat_n(0, usize::from(*padding) - 1));
                v.push(*padding);
            }
            v
        }
        Payload::Next { gap, payload_len } => {
            let (seq, ts) = model.streams.entry(from).or_insert((1000, 50_000));
            *seq = seq.wrapping_add(1 + u16::from(*gap));
            *ts = ts.wrapping_add(960 * (1 + u32::from(*gap)));
            let payload = vec![0xfc; usize::from(*payload_len)];
            rtp::build_packet(false, OPUS_PT, *seq, *ts, 0xabcd, &payload)
        }
        Payload::Rtcp => rtp::receiver_report(1).to_vec(),
        Payload::Raw(data) => data.clone(),
    }
}

fn command(core: &mut ShardCore, cmd: Command, now: Instant) -> Option<Event> {
    core.handle_command(cmd, now)
}

/// Sends a speaker change and records, when the shard applied it, the lease it bounds the holder by.
fn speaker(
    core: &mut ShardCore,
    model: &mut Model,
    channel: usize,
    change: SpeakerChange,
    now: Instant,
) {
    let before = core
        .channel(CHANNELS[channel])
        .map(|c| (c.epoch(), c.speaker()));
    let model_change = match &change {
        SpeakerChange::Granted {
            speaker: Some(_),
            epoch,
            until,
        } => Some((*epoch, *until, true)),
        SpeakerChange::Lease { epoch, until } => Some((*epoch, Some(*until), false)),
        _ => None,
    };
    let event = command(
        core,
        Command::Speaker {
            channel: CHANNELS[channel].into(),
            change,
        },
        now,
    );
    let applied = matches!(event, Some(Event::Applied { applied: true, .. }));
    match model_change {
        Some((epoch, until, true)) if applied => model.lease[channel] = Some((epoch, until)),
        Some((epoch, Some(until), false)) => {
            // A lease is not acknowledged: it counts when it is for the holder of the current epoch.
            if let Some((cur, Some(_))) = before {
                if cur == epoch {
                    model.lease[channel] = Some((
                        epoch,
                        Some(match model.lease[channel] {
                            Some((e, Some(u))) if e == epoch => u.max(until),
                            _ => until,
                        }),
                    ));
                }
            }
        }
        _ => {}
    }
}

fn add(
    core: &mut ShardCore,
    model: &mut Model,
    channel: usize,
    member: u8,
    addr: SocketAddr,
    ssrc: u32,
    now: Instant,
) {
    let key = key(channel, member);
    // The control thread never adds a membership twice, nor two memberships of one channel at one
    // address (a second join of a channel on the same connection is refused `already_joined`, and an
    // address is owned by one connection).
    if model.members.contains_key(&key)
        || model
            .members
            .values()
            .any(|&(c, a)| c == channel && a == addr)
    {
        return;
    }
    let event = command(
        core,
        Command::AddMember {
            channel: CHANNELS[channel].into(),
            key,
            name: format!("m{key}"),
            addr,
            ssrc,
        },
        now,
    );
    assert_eq!(event, Some(Event::MemberAdded { key }));
    model.members.insert(key, (channel, addr));
}

fn setup(now: Instant) -> (ShardCore, Model) {
    let relay = RelayState {
        key: RelayKey::new(SECRET),
        node: "node-a".into(),
        peers: NODES
            .iter()
            .map(|(a, n)| (a.parse().expect("address"), n.to_string()))
            .collect(),
    };
    let config = ShardConfig {
        seed: Some(7),
        ..ShardConfig::default()
    };
    let mut core = ShardCore::with_relay(0, config, Some(relay), now);
    let mut model = Model {
        members: HashMap::new(),
        lease: [None; 3],
        streams: HashMap::new(),
    };
    // alpha: members 1..=3 at ports 6001..=6003; bravo: a dispatcher sharing 6001, and 6004.
    for m in 0..3u8 {
        add(
            &mut core,
            &mut model,
            0,
            m,
            source(m),
            u32::from(m) + 1,
            now,
        );
    }
    add(&mut core, &mut model, 1, 0, source(0), 21, now);
    add(&mut core, &mut model, 1, 1, source(3), 22, now);
    for i in 0..4 {
        let rr = rtp::receiver_report(1);
        core.handle_datagram(source(i), &rr, now, &mut Batch::default());
    }
    // alpha's floor held by member 1 (port 6001) with a 3 s lease; bravo's by node-b.
    speaker(
        &mut core,
        &mut model,
        0,
        SpeakerChange::Granted {
            speaker: Some(key(0, 0)),
            epoch: 10,
            until: Some(now + Duration::from_secs(3)),
        },
        now,
    );
    speaker(
        &mut core,
        &mut model,
        1,
        SpeakerChange::Remote {
            epoch: 20,
            node: "node-b".into(),
        },
        now,
    );
    (core, model)
}

fn check_local_forward(
    core: &ShardCore,
    model: &Model,
    src: SocketAddr,
    batch: &Batch,
    now: Instant,
) {
    let holders: Vec<usize> = (0..CHANNELS.len())
        .filter(|&c| {
            core.channel(CHANNELS[c])
                .and_then(|ch| ch.speaker())
                .and_then(|k| model.members.get(&k))
                .is_some_and(|&(_, addr)| addr == src)
        })
        .collect();
    assert!(
        !holders.is_empty(),
        "forwarded from {src}, which holds no floor"
    );
    // A dispatcher's address may hold the floor of several channels; the packet went to one of them,
    // which must be within its lease.
    let within_lease = |c: &usize| match model.lease[*c] {
        Some((epoch, Some(until))) => {
            core.channel(CHANNELS[*c]).map(|ch| ch.epoch()) != Some(epoch) || now < until
        }
        _ => true,
    };
    assert!(
        holders.iter().any(within_lease),
        "forwarded from {src} at or after the lease end of every floor it holds"
    );
    for d in &batch.dests {
        assert_ne!(
            d.to_socket_addr(),
            src,
            "the speaker was sent its own packet"
        );
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let start = Instant::now();
    let mut now = start;
    let (mut core, mut model) = setup(now);
    let key_b = RelayKey::new(SECRET);
    let mut batch = Batch::default();
    let mut events = Vec::new();
    let mut reports: Vec<([u8; SR_LEN], _)> = Vec::new();
    let mut relay_buf = Vec::new();
    for op in ops.iter().take(MAX_OPS) {
        batch.clear();
        match op {
            Op::Datagram { from, payload } => {
                let src = source(*from);
                let data = packet(&mut model, src, payload);
                let verdict = core.handle_datagram(src, &data, now, &mut batch);
                match verdict {
                    Verdict::Forward(range) => {
                        assert!(range.end <= data.len());
                        check_local_forward(&core, &model, src, &batch, now);
                    }
                    Verdict::ForwardShared(_) => panic!("a plain-RTP packet became a WebRTC one"),
                    _ => assert!(batch.is_empty() && batch.relay.is_empty()),
                }
            }
            Op::Relay {
                from,
                channel,
                epoch,
                node,
                speaker,
                payload,
            } => {
                let c = usize::from(*channel) % CHANNELS.len();
                let epoch = epoch_of(&core, c, epoch);
                let src = source(*from);
                let rtp = packet(&mut model, src, payload);
                let node = NODES[usize::from(*node) % NODES.len()].1;
                key_b.encode(&mut relay_buf, CHANNELS[c], epoch, speaker, node, &rtp);
                if let Verdict::Forward(range) =
                    core.handle_relay_datagram(src, &relay_buf, now, &mut batch)
                {
                    assert!(range.end <= relay_buf.len());
                    let ch = core.channel(CHANNELS[c]).expect("forwarded into a channel");
                    assert_eq!(
                        ch.speaker(),
                        None,
                        "relayed while a local member holds the floor"
                    );
                    assert_eq!(
                        ch.epoch(),
                        epoch,
                        "relayed at another epoch than the grant's"
                    );
                }
            }
            Op::RelayRaw { from, data } => {
                if let Verdict::Forward(_) =
                    core.handle_relay_datagram(source(*from), data, now, &mut batch)
                {
                    panic!("an unsigned relay datagram was forwarded");
                }
            }
            Op::Grant {
                channel,
                member,
                epoch,
                lease_ms,
            } => {
                let c = usize::from(*channel) % CHANNELS.len();
                let change = SpeakerChange::Granted {
                    speaker: member.map(|m| key(c, m)),
                    epoch: epoch_of(&core, c, epoch),
                    until: lease_ms.map(|ms| now + Duration::from_millis(u64::from(ms))),
                };
                speaker(&mut core, &mut model, c, change, now);
            }
            Op::Remote {
                channel,
                epoch,
                node,
            } => {
                let c = usize::from(*channel) % CHANNELS.len();
                let change = SpeakerChange::Remote {
                    epoch: epoch_of(&core, c, epoch),
                    node: NODES[usize::from(*node) % NODES.len()].1.into(),
                };
                speaker(&mut core, &mut model, c, change, now);
            }
            Op::Lease {
                channel,
                epoch,
                lease_ms,
            } => {
                let c = usize::from(*channel) % CHANNELS.len();
                let change = SpeakerChange::Lease {
                    epoch: epoch_of(&core, c, epoch),
                    until: now + Duration::from_millis(u64::from(*lease_ms)),
                };
                speaker(&mut core, &mut model, c, change, now);
            }
            Op::Idle { channel, epoch } => {
                let c = usize::from(*channel) % CHANNELS.len();
                let change = SpeakerChange::Idle {
                    epoch: epoch_of(&core, c, epoch),
                };
                speaker(&mut core, &mut model, c, change, now);
            }
            Op::Add {
                channel,
                member,
                addr,
                ssrc,
            } => {
                let c = usize::from(*channel) % CHANNELS.len();
                add(&mut core, &mut model, c, *member, source(*addr), *ssrc, now);
            }
            Op::Remove { channel, member } => {
                let c = usize::from(*channel) % CHANNELS.len();
                let key = key(c, *member);
                command(
                    &mut core,
                    Command::RemoveMember {
                        channel: CHANNELS[c].into(),
                        key,
                    },
                    now,
                );
                model.members.remove(&key);
            }
            Op::Listens {
                channel,
                member,
                listens,
            } => {
                let c = usize::from(*channel) % CHANNELS.len();
                command(
                    &mut core,
                    Command::SetListens {
                        channel: CHANNELS[c].into(),
                        key: key(c, *member),
                        listens: *listens,
                    },
                    now,
                );
            }
            Op::Targets { channel, n } => {
                let c = usize::from(*channel) % CHANNELS.len();
                let targets = (0..n % 3)
                    .map(|i| SocketAddr::from(([127, 0, 0, 20 + i], 7000)))
                    .collect();
                command(
                    &mut core,
                    Command::RelayTargets {
                        channel: CHANNELS[c].into(),
                        targets,
                    },
                    now,
                );
            }
            Op::Tick { advance_ms } => {
                now += Duration::from_millis(u64::from(*advance_ms));
                let unix = Duration::from_secs(1_800_000_000) + (now - start);
                core.handle_tick(now, unix, &mut events, &mut reports);
                core.handle_timers(now);
                core.poll_events(&mut events);
                events.clear();
                reports.clear();
            }
        }
    }
    let stats = core.stats();
    assert!(stats.packets_in >= stats.rtcp_in);
});
