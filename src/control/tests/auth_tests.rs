//! Identity and limits through the control core, in virtual time: tokens (forged, expired, not yet
//! valid, wrong channel, wrong member), rights (talk, priority), and the per-client limits.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde_json::{json, Value};

use super::{config, TestHub};
use crate::auth::keys::{claims, mint, SigningKey};
use crate::auth::token::VerifyKey;
use crate::auth::{Rights, Verifier};
use crate::control::Input;

const SECRET: &[u8] = b"test-secret";
/// The virtual wall clock of these tests (Unix seconds).
const NOW: u64 = 1_800_000_000;

fn hub_with_tokens() -> TestHub {
    let mut c = config("a", false);
    c.auth = Some(Verifier::new(vec![VerifyKey {
        kid: None,
        alg: Algorithm::HS256,
        key: DecodingKey::from_secret(SECRET),
    }]));
    let mut hub = TestHub::with_config(c);
    hub.core.set_wall_clock(hub.now, Duration::from_secs(NOW));
    hub
}

fn token_with(secret: &[u8], sub: &str, rights: Rights, iat: u64, ttl: u64) -> String {
    let key = SigningKey {
        kid: None,
        alg: Algorithm::HS256,
        key: EncodingKey::from_secret(secret),
    };
    mint(&claims(sub, rights, iat, Duration::from_secs(ttl)), &key).unwrap()
}

fn rights(channels: &[&str]) -> Rights {
    Rights {
        channels: channels.iter().map(|c| c.to_string()).collect(),
        ..Rights::default()
    }
}

fn token(sub: &str, channels: &[&str]) -> String {
    token_with(SECRET, sub, rights(channels), NOW, 3600)
}

/// A join with `token` (and no member name: it comes from `sub`); the answer.
fn join_token(hub: &mut TestHub, conn: u64, channel: &str, token: &str, extra: Value) -> Value {
    let mut frame = json!({"type":"join","channel":channel,"transport":"rtp",
        "rtp_addr":format!("127.0.0.1:{}", 50000 + conn),"token":token});
    if let (Some(f), Some(e)) = (frame.as_object_mut(), extra.as_object()) {
        f.extend(e.clone());
    }
    hub.send(conn, frame);
    hub.expect(conn, |v| v["type"] == "joined" || v["type"] == "error")
}

fn refused(v: &Value, needle: &str) {
    assert_eq!(v["code"], json!("unauthorized"), "{v}");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(needle),
        "message {msg:?} should say {needle:?}"
    );
}

#[test]
fn a_valid_token_names_the_member_and_bad_ones_are_refused_naming_why() {
    let mut hub = hub_with_tokens();
    let a = hub.connect();
    let ok = join_token(&mut hub, a, "ops-1", &token("alice", &["ops-*"]), json!({}));
    assert_eq!(
        (ok["type"].clone(), ok["member"].clone()),
        (json!("joined"), json!("alice"))
    );

    let b = hub.connect();
    hub.send(b, json!({"type":"join","channel":"ops-1","member":"bob","transport":"rtp","rtp_addr":"127.0.0.1:6000"}));
    refused(&hub.expect(b, |v| v["type"] == "error"), "needs \"token\"");
    let forged = token_with(b"another-secret", "bob", rights(&["ops-*"]), NOW, 3600);
    refused(
        &join_token(&mut hub, b, "ops-1", &forged, json!({})),
        "signature does not verify",
    );
    let expired = token_with(SECRET, "bob", rights(&["ops-*"]), NOW - 7200, 3600);
    refused(
        &join_token(&mut hub, b, "ops-1", &expired, json!({})),
        "expired",
    );
    let mut early = claims("bob", rights(&["ops-*"]), NOW, Duration::from_secs(3600));
    early.nbf = Some(NOW + 600);
    let key = SigningKey {
        kid: None,
        alg: Algorithm::HS256,
        key: EncodingKey::from_secret(SECRET),
    };
    refused(
        &join_token(
            &mut hub,
            b,
            "ops-1",
            &mint(&early, &key).unwrap(),
            json!({}),
        ),
        "not valid before",
    );
    refused(
        &join_token(&mut hub, b, "fire-1", &token("bob", &["ops-*"]), json!({})),
        "does not grant channel \"fire-1\"",
    );
    refused(
        &join_token(
            &mut hub,
            b,
            "ops-1",
            &token("bob", &["ops-*"]),
            json!({"member":"alice"}),
        ),
        "differs from the token's sub",
    );
    refused(
        &join_token(&mut hub, b, "ops-1", "not.a.jwt", json!({})),
        "malformed",
    );
    // Within the 30 s leeway an expiry is still accepted.
    let just_expired = token_with(SECRET, "bob", rights(&["ops-*"]), NOW - 3620, 3600);
    assert_eq!(
        join_token(&mut hub, b, "ops-1", &just_expired, json!({}))["type"],
        json!("joined")
    );
    let failures = hub.core.counters().auth_failures;
    for reason in [
        "missing",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_channel",
        "wrong_member",
        "malformed",
    ] {
        assert_eq!(failures.get(reason), Some(&1), "{reason}: {failures:?}");
    }
}

#[test]
fn without_the_talk_right_a_press_is_denied_listen_only_and_priority_is_capped() {
    let mut hub = hub_with_tokens();
    let (a, b) = (hub.connect(), hub.connect());
    let listener = Rights {
        talk: false,
        ..rights(&["ops"])
    };
    let t = token_with(SECRET, "ears", listener, NOW, 3600);
    join_token(&mut hub, a, "ops", &t, json!({}));
    hub.press(a, "ops");
    assert_eq!(hub.floor(a, "denied")["reason"], json!("listen_only"));
    let capped = Rights {
        max_priority: 3,
        ..rights(&["ops"])
    };
    let t = token_with(SECRET, "boss", capped, NOW, 3600);
    let joined = join_token(&mut hub, b, "ops", &t, json!({"priority": 200}));
    assert_eq!(joined["priority"], json!(3));
}

#[test]
fn a_connection_cannot_hold_unlimited_memberships() {
    let mut hub = TestHub::new();
    let a = hub.connect();
    let limit = hub.core.config.limits.memberships_per_connection;
    let mut refused = 0;
    for i in 0..10_000 {
        // 10 ms apart: the frame budget is not what stops it.
        hub.advance(Duration::from_millis(10));
        let v = hub.join(a, &format!("ch-{i}"), "alice");
        if v["type"] == "error" {
            assert_eq!(v["code"], json!("rate_limited"), "{v}");
            assert!(v["message"].as_str().unwrap().contains("memberships"));
            refused += 1;
        }
    }
    assert_eq!(refused, 10_000 - limit);
    assert_eq!(hub.core.channels().len(), limit);
}

#[test]
fn presses_and_frames_are_rate_limited() {
    let mut hub = TestHub::new();
    let (a, b) = (hub.connect(), hub.connect());
    hub.join(a, "ops", "alice");
    hub.join(b, "ops", "bob");
    hub.take(a);
    // 1,000 presses in one second: press, release, press, ...
    let (mut denied, mut errors) = (0, 0);
    for i in 0..1000 {
        hub.advance(Duration::from_millis(1));
        if i % 2 == 0 {
            hub.press(a, "ops");
        } else {
            hub.release(a, "ops");
        }
        for v in hub.take(a) {
            if v["state"] == "denied" && v["reason"] == "rate_limited" {
                denied += 1;
            }
            if v["type"] == "error" && v["code"] == "rate_limited" {
                errors += 1;
            }
        }
    }
    assert!(denied > 0, "presses beyond 5/s are denied rate_limited");
    assert!(
        errors > 0,
        "frames beyond the connection's budget are refused"
    );
    let limited = hub.core.counters().limited;
    assert!(limited["presses_per_second"] > 0 && limited["frames_per_second"] > 0);
    // b was never affected.
    hub.advance(Duration::from_secs(5));
    hub.take(b);
    hub.press(b, "ops");
    let v = hub.take(b);
    assert!(
        v.iter()
            .any(|v| v["state"] == "granted" || v["state"] == "denied" && v["reason"] == "busy"),
        "{v:?}"
    );
}

#[test]
fn connections_per_address_are_capped() {
    let mut hub = TestHub::new();
    let limit = hub.core.config.limits.connections_per_ip;
    let conns: Vec<u64> = (0..limit + 1).map(|_| hub.connect()).collect();
    let last = *conns.last().unwrap();
    assert_eq!(hub.closed, vec![last]);
    let e = hub.expect(last, |v| v["type"] == "error");
    assert_eq!(e["code"], json!("rate_limited"));
    // A closed connection frees its slot.
    hub.input(Input::Disconnect { conn: conns[0] });
    let again = hub.connect();
    assert!(!hub.closed.contains(&again));
}

#[test]
fn media_addresses_belong_to_the_connection_that_claimed_them() {
    let mut c = config("a", false);
    c.rtp_allow = vec![
        "127.0.0.0/8".parse().unwrap(),
        "10.0.0.0/8".parse().unwrap(),
    ];
    let mut hub = TestHub::with_config(c);
    let (a, b) = (hub.connect(), hub.connect());
    let join = |hub: &mut TestHub, conn, ch: &str, name: &str, addr: &str| {
        hub.send(
            conn,
            json!({"type":"join","channel":ch,"member":name,"transport":"rtp","rtp_addr":addr}),
        );
        hub.expect(conn, |v| v["type"] == "joined" || v["type"] == "error")
    };
    assert_eq!(
        join(&mut hub, a, "ops", "alice", "127.0.0.1:7000")["type"],
        json!("joined")
    );
    // The same client may use its address in another channel (a dispatcher).
    assert_eq!(
        join(&mut hub, a, "fire", "alice", "127.0.0.1:7000")["type"],
        json!("joined")
    );
    // Another connection claiming it is refused: the hijack of a victim's address.
    let e = join(&mut hub, b, "ops", "mallory", "127.0.0.1:7000");
    assert_eq!(e["code"], json!("unauthorized"));
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("in use by another connection"));
    // An address of another host than the client's is refused.
    let e = join(&mut hub, b, "ops", "mallory", "10.1.2.3:7000");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("not this client's address"),
        "{e}"
    );
    // Once a's memberships are gone, the address is free.
    hub.input(Input::Disconnect { conn: a });
    assert_eq!(
        join(&mut hub, b, "ops", "bob", "127.0.0.1:7000")["type"],
        json!("joined")
    );
}

#[test]
fn webrtc_joins_waiting_for_ice_are_capped_per_connection() {
    let mut hub = TestHub::new();
    let a = hub.connect();
    let limit = hub.core.config.limits.webrtc_pending_per_connection;
    let offer = crate::peer::offer::test_offer("sendrecv");
    let mut answered = 0;
    for i in 0..limit + 3 {
        hub.advance(Duration::from_millis(100));
        hub.send(
            a,
            json!({"type":"join","channel":format!("w{i}"),"member":"web","sdp":offer}),
        );
        let v = hub.expect(a, |v| v["type"] == "joined" || v["type"] == "error");
        if v["type"] == "joined" {
            answered += 1;
        } else {
            assert!(
                v["message"]
                    .as_str()
                    .unwrap()
                    .contains("waiting for ICE/DTLS"),
                "{v}"
            );
        }
    }
    assert_eq!(answered, limit);
    // One of them completes ICE and DTLS: its slot is free again.
    let (channel, key) = hub
        .commands
        .iter()
        .find_map(|(_, c)| match c {
            crate::shard::Command::AddPeer { channel, key, .. } => Some((channel.clone(), *key)),
            _ => None,
        })
        .unwrap();
    hub.input(Input::Shard(crate::shard::Event::PeerConnected {
        channel,
        key,
    }));
    hub.send(
        a,
        json!({"type":"join","channel":"w-last","member":"web","sdp":offer}),
    );
    assert_eq!(
        hub.expect(a, |v| v["type"] == "joined" || v["type"] == "error")["type"],
        json!("joined")
    );
}
