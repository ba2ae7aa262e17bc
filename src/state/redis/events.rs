//! Pub/sub: what the scripts and the session store publish, and the subscriber task that turns it into
//! [`StoreEvent`]s (with `Resync` after every (re)connection and `Down` when the link drops).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::conn::Connector;
use super::link::Link;
use crate::state::{Holder, StateError, StoreEvent};

/// Events a subscriber may queue before its task stops reading; Redis then buffers, and past its pub/sub
/// output limit drops the connection, which the task reports as `Down` and repairs with `Resync`.
pub(super) const EVENT_QUEUE: usize = 1024;
/// Reconnection backoff of the subscriber, doubled per failure.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A quiet subscription is pinged this often, so a connection that died without a reset is noticed.
const PING_EVERY: Duration = Duration::from_secs(1);
/// How long a ping or a (re)connection may take; longer than a command's timeout, because a busy but
/// healthy Redis must not make the subscription flap.
pub(super) const LINK_TIMEOUT: Duration = Duration::from_secs(2);

/// A pub/sub message, as the scripts and [`SessionStore`] publish it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Wire {
    Grant {
        channel: String,
        epoch: String,
        member: String,
        node: String,
        priority: u8,
        #[serde(default)]
        emergency: bool,
    },
    Idle {
        channel: String,
        epoch: String,
    },
    Join {
        channel: String,
        member: String,
        node: String,
    },
    Leave {
        channel: String,
        member: String,
        node: String,
    },
}

/// Turns a published message into an event; `None` (and a warning) for anything it does not understand.
fn decode(payload: &[u8]) -> Option<StoreEvent> {
    let wire: Wire = match serde_json::from_slice(payload) {
        Ok(wire) => wire,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable store event");
            return None;
        }
    };
    let epoch = |s: &str| match s.parse::<u64>() {
        Ok(e) => Some(e),
        Err(_) => {
            tracing::warn!(epoch = s, "ignoring a store event with a bad epoch");
            None
        }
    };
    Some(match wire {
        Wire::Grant {
            channel,
            epoch: e,
            member,
            node,
            priority,
            emergency,
        } => {
            let epoch = epoch(&e)?;
            let holder = Holder {
                member,
                node,
                epoch,
                priority,
                emergency,
            };
            StoreEvent::Floor {
                channel,
                holder: Some(holder),
                epoch,
            }
        }
        Wire::Idle { channel, epoch: e } => StoreEvent::Floor {
            channel,
            holder: None,
            epoch: epoch(&e)?,
        },
        Wire::Join {
            channel,
            member,
            node,
        } => StoreEvent::Presence {
            channel,
            member,
            node,
            joined: true,
        },
        Wire::Leave {
            channel,
            member,
            node,
        } => StoreEvent::Presence {
            channel,
            member,
            node,
            joined: false,
        },
    })
}

/// What a subscriber listens to: the one events channel, or (sharded pub/sub on a Cluster) the events
/// channels of the talkgroups this node serves, followed as they open and close.
#[derive(Clone)]
pub(super) enum Subscriptions {
    /// One channel for every event (`P:tg:events`).
    One(String),
    /// One channel per talkgroup (`P:tg:{ch}:events`): the set this node serves.
    Watched(Arc<watch::Sender<BTreeSet<String>>>),
}

impl Subscriptions {
    /// An empty watched set.
    pub(super) fn watched() -> Subscriptions {
        Subscriptions::Watched(Arc::new(watch::Sender::new(BTreeSet::new())))
    }

    /// Adds or removes an events channel of the watched set (nothing for `One`).
    pub(super) fn watch(&self, events: String, present: bool) {
        if let Subscriptions::Watched(set) = self {
            set.send_if_modified(|set| {
                if present {
                    set.insert(events)
                } else {
                    set.remove(&events)
                }
            });
        }
    }
}

/// The subscriber: connect, `Resync`, forward messages, `Down` when the link drops, back off, again.
pub(super) async fn run_subscriber(
    connector: Connector,
    subscriptions: Subscriptions,
    tx: mpsc::Sender<StoreEvent>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut watched = match &subscriptions {
            Subscriptions::One(_) => None,
            Subscriptions::Watched(set) => Some(set.subscribe()),
        };
        let opened = tokio::select! {
            _ = tx.closed() => return,
            opened = open_subscription(&connector, &subscriptions) => opened,
        };
        match opened {
            Ok((link, subscribed)) => {
                backoff = BACKOFF_MIN;
                if tx.send(StoreEvent::Resync).await.is_err() {
                    return;
                }
                if !forward(link, subscribed, watched.as_mut(), &tx).await {
                    return;
                }
                tracing::warn!("redis subscription lost; reconnecting");
                if tx.send(StoreEvent::Down).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "redis subscription: connect failed"),
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A link subscribed to every channel of `subscriptions` (each `subscribe` returns once Redis confirmed
/// it), and the channels it is subscribed to.
async fn open_subscription(
    connector: &Connector,
    subscriptions: &Subscriptions,
) -> Result<(Link, BTreeSet<String>), StateError> {
    let mut link = Link::open(connector).await?;
    let channels = match subscriptions {
        Subscriptions::One(channel) => BTreeSet::from([channel.clone()]),
        Subscriptions::Watched(set) => set.borrow().clone(),
    };
    for channel in &channels {
        link.subscribe(channel).await?;
    }
    Ok((link, channels))
}

/// Forwards messages until the link drops (`true`) or the receiver is gone (`false`), following the
/// watched set when there is one.
async fn forward(
    mut link: Link,
    mut subscribed: BTreeSet<String>,
    mut watched: Option<&mut watch::Receiver<BTreeSet<String>>>,
    tx: &mpsc::Sender<StoreEvent>,
) -> bool {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        let changed = async {
            match watched.as_mut() {
                Some(w) => w.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tx.closed() => return false,
            msg = link.next() => match msg {
                None => return true,
                Some((_, payload)) => {
                    if let Some(event) = decode(&payload) {
                        if tx.send(event).await.is_err() {
                            return false;
                        }
                    }
                }
            },
            _ = ping.tick() => {
                if link.ping().await.is_err() {
                    return true;
                }
            }
            alive = changed => {
                let Some(w) = watched.as_mut().filter(|_| alive) else { return false };
                let wanted = w.borrow_and_update().clone();
                for gone in subscribed.difference(&wanted) {
                    if link.unsubscribe(gone).await.is_err() {
                        return true;
                    }
                }
                for new in wanted.difference(&subscribed) {
                    if link.subscribe(new).await.is_err() {
                        return true;
                    }
                }
                subscribed = wanted;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_scripts_publish() {
        let grant = br#"{"kind":"grant","channel":"c","epoch":"1700000000000001","member":"m","node":"n","priority":3}"#;
        let holder = Holder {
            member: "m".into(),
            node: "n".into(),
            epoch: 1_700_000_000_000_001,
            priority: 3,
            emergency: false,
        };
        assert_eq!(
            decode(grant),
            Some(StoreEvent::Floor {
                channel: "c".into(),
                holder: Some(holder),
                epoch: 1_700_000_000_000_001
            })
        );
        let idle = br#"{"kind":"idle","channel":"c","epoch":"7"}"#;
        assert_eq!(
            decode(idle),
            Some(StoreEvent::Floor {
                channel: "c".into(),
                holder: None,
                epoch: 7
            })
        );
        assert_eq!(decode(b"not json"), None);
        assert_eq!(
            decode(br#"{"kind":"idle","channel":"c","epoch":"x"}"#),
            None
        );
    }
}
