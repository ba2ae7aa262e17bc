//! Running talkgroup like a service, end to end on the binary: a talk burst in progress at SIGTERM is
//! heard to its end before the process exits 0; a second SIGTERM and the drain timeout stop it; new
//! clients are sent on with `goaway`; `/healthz` and `/readyz` say what is wrong (a draining node, a
//! store that is down, a shard that panicked — after which the process exits non-zero).

#[path = "support/client.rs"]
mod client;

use std::time::{Duration, Instant};

use client::{exited, http_get, http_post, kill, spawn_server, speech_frames, RtpMember, Signal};
use rtpio::testing::RedisServer;

/// Counts the RTP packets `member` hears until `quiet` passes without one (after the first), or `max`.
async fn count_heard(member: RtpMember, quiet: Duration, max: Duration) -> usize {
    let mut buf = [0u8; 2048];
    let mut heard = 0;
    let end = tokio::time::Instant::now() + max;
    loop {
        let wait = if heard == 0 { max } else { quiet };
        let until = (tokio::time::Instant::now() + wait).min(end);
        match tokio::time::timeout_at(until, member.sock.recv_from(&mut buf)).await {
            Ok(Ok((len, _))) => {
                if talkgroup::rtp::classify(&buf[..len]) == talkgroup::rtp::Kind::Rtp {
                    heard += 1;
                }
            }
            _ => return heard,
        }
    }
}

/// alice talks in "ops" (granted), bob listens there.
async fn burst(http: std::net::SocketAddr) -> (Signal, Signal, RtpMember, RtpMember) {
    let mut sa = Signal::connect(http).await;
    let mut sb = Signal::connect(http).await;
    let alice = RtpMember::join(&mut sa, "ops", "alice").await;
    let bob = RtpMember::join(&mut sb, "ops", "bob").await;
    sa.press("ops").await;
    sa.expect_floor("ops", "granted").await;
    (sa, sb, alice, bob)
}

/// A client that connects now is sent `goaway` and closed.
async fn new_clients_are_sent_on(http: std::net::SocketAddr) {
    let mut s = Signal::connect(http).await;
    let g = s.expect_type("goaway").await;
    assert_eq!(g["reason"], "draining");
    assert_eq!(g["retry_after_ms"], 2000);
    assert!(s.closed().await, "closed after goaway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_talk_burst_in_progress_at_sigterm_is_heard_to_its_end() {
    let frames = speech_frames();
    let (mut guard, http) = spawn_server(&["--shards", "2"]);
    let (mut sa, mut sb, mut alice, bob) = burst(http).await;
    let listener = tokio::spawn(count_heard(
        bob,
        Duration::from_secs(2),
        Duration::from_secs(40),
    ));
    let mut checks = None;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let start = Instant::now();
    for (i, frame) in frames.iter().enumerate() {
        tick.tick().await;
        if i == 50 {
            // One second into the sentence.
            kill(&guard.0, libc::SIGTERM);
            checks = Some(tokio::spawn(async move {
                // The load balancer is told at once; the process stays alive.
                let deadline = Instant::now() + Duration::from_secs(2);
                let (status, body) = loop {
                    let (status, body) = http_get(http, "/readyz").await;
                    if status == 503 || Instant::now() > deadline {
                        break (status, body);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                assert_eq!(status, 503, "{body}");
                assert!(body.contains("draining"), "{body}");
                assert_eq!(http_get(http, "/healthz").await.0, 200);
                new_clients_are_sent_on(http).await;
            }));
        }
        alice.send_rtp(frame).await;
    }
    let spoke_for = start.elapsed();
    if let Some(c) = checks {
        c.await.expect("checks while draining");
    }
    assert!(
        guard.0.try_wait().expect("try_wait").is_none(),
        "the node waits for the burst"
    );
    let released = Instant::now();
    sa.release("ops").await;
    for s in [&mut sa, &mut sb] {
        s.expect_floor("ops", "idle").await;
        let g = s.expect_type("goaway").await;
        assert_eq!(g["reason"], "draining");
        assert!(s.closed().await);
    }
    let status = exited(&mut guard.0, Duration::from_secs(10))
        .await
        .expect("the node exits once its clients are gone");
    assert!(status.success(), "exit status {status}");
    let exit_after_release = released.elapsed();
    let heard = listener.await.expect("listener");
    eprintln!(
        "drain: SIGTERM 1 s into {spoke_for:?} of speech; bob heard {heard}/{} packets; exit 0 \
         {exit_after_release:?} after the release",
        frames.len()
    );
    assert_eq!(
        heard,
        frames.len(),
        "bob heard the whole sentence ({spoke_for:?}), SIGTERM 1 s into it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_or_the_drain_timeout_stops_at_once() {
    // A second signal: the usual clean stop (floor released and announced idle, members told `left`).
    let (mut guard, http) = spawn_server(&["--shards", "1"]);
    let (_sa, mut sb, _alice, _bob) = burst(http).await;
    kill(&guard.0, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(guard.0.try_wait().expect("try_wait").is_none());
    kill(&guard.0, libc::SIGTERM);
    sb.expect_floor("ops", "idle").await;
    sb.expect_type("left").await;
    let status = exited(&mut guard.0, Duration::from_secs(5))
        .await
        .expect("stops at the second signal");
    assert!(status.success(), "exit status {status}");

    // The drain timeout: whoever still talks is sent on.
    let (mut guard, http) = spawn_server(&["--shards", "1", "--drain-timeout", "1s"]);
    let (mut sa, _sb, _alice, _bob) = burst(http).await;
    let start = Instant::now();
    kill(&guard.0, libc::SIGTERM);
    sa.expect_type("goaway").await;
    let status = exited(&mut guard.0, Duration::from_secs(5))
        .await
        .expect("stops at the drain timeout");
    assert!(status.success(), "exit status {status}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_drain_refuses_joins_with_goaway_and_exits_zero() {
    let (mut guard, http) = spawn_server(&["--shards", "1"]);
    let (mut sa, mut sb, _alice, _bob) = burst(http).await;
    let (status, body) = http_post(http, "/admin/drain").await;
    assert_eq!(status, 202, "{body}");
    // bob, listening to alice, asks to join another channel: goaway, his connection stays.
    sb.send(
        serde_json::json!({"type":"join","channel":"other","member":"bob",
        "transport":"rtp","rtp_addr":"127.0.0.1:9","id":"j1"}),
    )
    .await;
    let g = sb.expect_type("goaway").await;
    assert_eq!(g["id"], "j1");
    sb.press("ops").await;
    let d = sb.expect_floor("ops", "denied").await;
    assert_eq!(d["reason"], "unavailable");
    sa.release("ops").await;
    assert!(sa.closed().await && sb.closed().await);
    let status = exited(&mut guard.0, Duration::from_secs(10))
        .await
        .expect("exits after an admin drain");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_shard_is_reported_counted_and_ends_the_process_non_zero() {
    let (mut guard, http) = spawn_server(&["--shards", "2", "--fault-injection"]);
    assert_eq!(http_get(http, "/healthz").await, (200, "ok\n".to_string()));
    // alice talks on the channel of shard 0 ("ops" or another name hashing there).
    let channel = (0..100)
        .map(|i| format!("c{i}"))
        .find(|c| talkgroup::shard::shard_of(c, 2) == 0)
        .expect("a name on shard 0");
    let mut sa = Signal::connect(http).await;
    let _alice = RtpMember::join(&mut sa, &channel, "alice").await;
    sa.press(&channel).await;
    sa.expect_floor(&channel, "granted").await;
    let (status, _) = http_post(http, "/admin/fault/panic-shard?shard=1").await;
    assert_eq!(status, 202);
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, body) = loop {
        let (status, body) = http_get(http, "/healthz").await;
        if body.contains("panicked") || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("shard 1: panicked: fault injection"),
        "names the shard and the panic: {body}"
    );
    let (status, body) = http_get(http, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("draining"), "{body}");
    let metrics = http_get(http, "/metrics").await.1;
    assert_eq!(
        client::metric(&metrics, "talkgroup_shard_panics_total"),
        1,
        "{metrics}"
    );
    // The live shard's burst goes on until alice releases; then the process ends, non-zero.
    assert!(guard.0.try_wait().expect("try_wait").is_none());
    sa.release(&channel).await;
    let status = exited(&mut guard.0, Duration::from_secs(10))
        .await
        .expect("exits after the drain");
    assert_eq!(
        status.code(),
        Some(70),
        "EX_SOFTWARE: the supervisor restarts it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_store() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let (_guard, http) = spawn_server(&[
        "--shards",
        "1",
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--key-prefix",
        "readyz",
    ]);
    let ready = |want: u16| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = http_get(http, "/readyz").await;
            if status == want || Instant::now() > deadline {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(ready(200).await, (200, "ready\n".to_string()));
    redis.kill();
    let (status, body) = ready(503).await;
    assert_eq!(status, 503);
    assert!(body.contains("floor store unreachable"), "{body}");
    assert_eq!(
        http_get(http, "/healthz").await.0,
        200,
        "alive all the same: not a reason to restart the process"
    );
    redis.restart();
    assert_eq!(ready(200).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_the_operators_questions_and_the_dashboard_uses_only_them() {
    let (_guard, http) = spawn_server(&["--shards", "2"]);
    let (mut sa, _sb, mut alice, bob) = burst(http).await;
    for frame in speech_frames().iter().take(20) {
        alice.send_rtp(frame).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Bob's receiver report on what he hears: 10 % lost (26/256), jitter 480 units (10 ms at 48 kHz).
    let mut rr = vec![0x81, 201, 0, 7, 0, 0, 0, 2];
    rr.extend_from_slice(&[0, 0, 0, 1, 26, 0, 0, 2, 0, 0, 0, 20, 0, 0, 1, 0xe0]);
    rr.extend_from_slice(&[0; 8]);
    bob.send_raw(&rr).await;
    sa.release("ops").await;
    sa.expect_floor("ops", "idle").await;
    let (status, text) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    for (name, at_least) in [
        ("talkgroup_press_to_grant_seconds_count", 1),
        ("talkgroup_ws_send_queue_bytes_count", 1),
        ("talkgroup_packets_forwarded_total", 20),
        ("talkgroup_media_forwarded_total", 20),
        ("talkgroup_forward_latency_seconds_count", 1),
        ("talkgroup_listener_reports_total", 1),
        ("talkgroup_listener_loss_ratios_count", 1),
        ("talkgroup_listener_jitter_seconds_count", 1),
        ("talkgroup_shard_up", 2),
        ("talkgroup_build_info", 1),
        ("talkgroup_members", 2),
    ] {
        let v = client::metric(&text, name);
        assert!(
            v >= at_least,
            "{name} = {v}, want at least {at_least}\n{text}"
        );
    }
    let shard_cpu: f64 = text
        .lines()
        .filter(|l| l.starts_with("talkgroup_shard_cpu_seconds_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(shard_cpu > 0.0, "shard threads' CPU from /proc: {text}");

    // Every metric the Grafana dashboard queries is one the server exports.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/talkgroup.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    // A sample's name, or a declared family (labelled families have no sample before their first
    // event, e.g. no denial yet).
    let exported: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next(),
        })
        .collect();
    let mut queried = std::collections::BTreeSet::new();
    let mut ids = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_u64().expect("id")),
            "panel ids are unique"
        );
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("talkgroup_") || word.starts_with("process_") {
                    queried.insert(word.to_string());
                }
            }
        }
    }
    assert!(queried.len() >= 20, "{queried:?}");
    let missing: Vec<&String> = queried
        .iter()
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the server does not export: {missing:?}"
    );
}
