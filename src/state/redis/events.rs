//! Pub/sub: what the scripts and the session store publish, and the subscriber task that turns it into
//! [`StoreEvent`]s (with `Resync` after every (re)connection and `Down` when the link drops).
//!
//! The task follows the node channel always and each talkgroup's channel while the control thread
//! watches it; a watch is confirmed with [`StoreEvent::Watching`] once Redis has confirmed the
//! subscription, so the control thread reads the channel's keys after that and misses nothing between
//! its read and the first event.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::conn::Connector;
use super::link::Link;
use super::timing::{BACKOFF_MAX, BACKOFF_MIN};
use crate::state::{Holder, StateError, StoreEvent};

/// Events a subscriber may queue before its task stops reading; Redis then buffers, and past its pub/sub
/// output limit drops the connection, which the task reports as `Down` and repairs with `Resync`.
pub(super) const EVENT_QUEUE: usize = 1024;
/// A quiet subscription is pinged this often, so a connection that died without a reset is noticed.
const PING_EVERY: Duration = Duration::from_secs(1);

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
    ChannelNode {
        channel: String,
        node: String,
        present: bool,
    },
    Node {
        node: String,
        live: bool,
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
        Wire::ChannelNode {
            channel,
            node,
            present,
        } => StoreEvent::ChannelNode {
            channel,
            node,
            present,
        },
        Wire::Node { node, live } => StoreEvent::Node { node, live },
    })
}

/// The pub/sub channel names the subscriber needs.
pub(crate) struct Names {
    /// Node arrivals and departures.
    pub nodes: String,
    /// A talkgroup's events channel.
    pub channel: Box<dyn Fn(&str) -> String + Send + Sync>,
}

/// The subscriber: connect, subscribe to everything watched, `Resync`, forward messages and apply watches,
/// `Down` when the link drops, back off, again.
pub(super) async fn run_subscriber(
    connector: Connector,
    names: Names,
    mut watches: mpsc::UnboundedReceiver<(String, bool)>,
    tx: mpsc::Sender<StoreEvent>,
) {
    let mut watched: BTreeSet<String> = BTreeSet::new();
    let mut backoff = BACKOFF_MIN;
    loop {
        // Watches made while the link was down need no confirmation: `Resync` re-reads everything.
        while let Ok((channel, on)) = watches.try_recv() {
            apply(&mut watched, channel, on);
        }
        let all: Vec<String> = std::iter::once(names.nodes.clone())
            .chain(watched.iter().map(|c| (names.channel)(c)))
            .collect();
        let opened = tokio::select! {
            _ = tx.closed() => return,
            opened = open_subscription(&connector, &all) => opened,
        };
        match opened {
            Ok(link) => {
                backoff = BACKOFF_MIN;
                if tx.send(StoreEvent::Resync).await.is_err() {
                    return;
                }
                let live = Live {
                    link,
                    names: &names,
                    watched: &mut watched,
                    watches: &mut watches,
                };
                if !live.forward(&tx).await {
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

/// Adds or removes a watched channel; whether the set changed.
fn apply(watched: &mut BTreeSet<String>, channel: String, on: bool) -> bool {
    if on {
        watched.insert(channel)
    } else {
        watched.remove(&channel)
    }
}

/// A link subscribed to `channels` (each `subscribe` returns once Redis confirmed it).
async fn open_subscription(connector: &Connector, channels: &[String]) -> Result<Link, StateError> {
    let mut link = Link::open(connector).await?;
    for channel in channels {
        link.subscribe(channel).await?;
    }
    Ok(link)
}

/// One live subscription.
struct Live<'a> {
    link: Link,
    names: &'a Names,
    watched: &'a mut BTreeSet<String>,
    watches: &'a mut mpsc::UnboundedReceiver<(String, bool)>,
}

impl Live<'_> {
    /// Forwards messages and applies watches until the link drops (`true`) or the receiver is gone
    /// (`false`).
    async fn forward(mut self, tx: &mpsc::Sender<StoreEvent>) -> bool {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                _ = tx.closed() => return false,
                msg = self.link.next() => match msg {
                    None => return true,
                    Some((_, payload)) => {
                        if let Some(event) = decode(&payload) {
                            if tx.send(event).await.is_err() {
                                return false;
                            }
                        }
                    }
                },
                watch = self.watches.recv() => {
                    let Some((channel, on)) = watch else { return false };
                    if !apply(self.watched, channel.clone(), on) {
                        continue;
                    }
                    let name = (self.names.channel)(&channel);
                    let done = if on {
                        self.link.subscribe(&name).await
                    } else {
                        self.link.unsubscribe(&name).await
                    };
                    if done.is_err() {
                        return true;
                    }
                    if on && tx.send(StoreEvent::Watching { channel }).await.is_err() {
                        return false;
                    }
                }
                _ = ping.tick() => {
                    if self.link.ping().await.is_err() {
                        return true;
                    }
                }
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
        assert_eq!(
            decode(br#"{"kind":"channel_node","channel":"c","node":"n","present":true}"#),
            Some(StoreEvent::ChannelNode {
                channel: "c".into(),
                node: "n".into(),
                present: true
            })
        );
        assert_eq!(
            decode(br#"{"kind":"node","node":"n","live":false}"#),
            Some(StoreEvent::Node {
                node: "n".into(),
                live: false
            })
        );
        assert_eq!(decode(b"not json"), None);
        assert_eq!(
            decode(br#"{"kind":"idle","channel":"c","epoch":"x"}"#),
            None
        );
    }
}
