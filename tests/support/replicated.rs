//! What the replicated-Redis suites (`redis_cluster`, `redis_sentinel`) share: store events, presses,
//! taking the floor, hearing a speaker.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use talkgroup::server::LEASE;
use talkgroup::state::redis::Link;
use talkgroup::state::{AcquireRequest, StoreEvent};
use tokio::sync::mpsc;

use super::client::{floor_any, RtpMember, Signal};

pub const PREFIX: &str = "test";

/// A normal press for `member` with the server's lease.
pub fn press(channel: &str, member: &str) -> AcquireRequest {
    AcquireRequest {
        channel: channel.into(),
        member: member.into(),
        priority: 0,
        ttl: LEASE.ttl,
        emergency: false,
    }
}

/// The next event matching `want` within `limit`, skipping others.
pub async fn next_event(
    rx: &mut mpsc::Receiver<StoreEvent>,
    limit: Duration,
    want: impl Fn(&StoreEvent) -> bool,
) -> StoreEvent {
    let deadline = tokio::time::Instant::now() + limit;
    let mut skipped = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) if want(&event) => return event,
            Ok(Some(event)) => skipped.push(event),
            Ok(None) => panic!("subscription closed; skipped {skipped:?}"),
            Err(_) => panic!("no matching event within {limit:?}; skipped {skipped:?}"),
        }
    }
}

/// A floor event of `channel`: a grant (`granted`) or a release.
pub fn is_floor(channel: &str, granted: bool) -> impl Fn(&StoreEvent) -> bool + '_ {
    move |e| {
        matches!(e, StoreEvent::Floor { channel: c, holder, .. }
            if c == channel && holder.is_some() == granted)
    }
}

/// The channel of the next message on `link` within 2 s (`None`: the link dropped).
pub async fn next_channel(link: &mut Link) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(2), link.next())
        .await
        .expect("a message within 2 s")
        .map(|(channel, _)| channel)
}

/// Presses until granted (the store subscription may not be up yet), within `limit`.
pub async fn take_floor(s: &mut Signal, channel: &str, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        s.press(channel).await;
        let v = floor_any(s, channel, &["granted", "denied"]).await;
        if v["state"] == "granted" {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "never granted within {limit:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Talks until `listener` hears `speaker` (relay targets and subscriptions settle), within `limit`.
pub async fn heard(speaker: &mut RtpMember, listener: &RtpMember, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        speaker.send_rtp(&[7, 7, 7]).await;
        if !listener
            .recv_rtp(1, Duration::from_millis(20))
            .await
            .is_empty()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never heard {} within {limit:?}",
            listener.name,
            speaker.name
        );
    }
}
