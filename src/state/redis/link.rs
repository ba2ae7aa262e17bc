//! A pub/sub link of any topology: subscribe and unsubscribe while messages keep flowing. A link never
//! repairs itself: when [`Link::next`] returns `None` (or a ping fails) events may have been lost, so the
//! subscriber opens a new one, subscribes again and resynchronises from the store.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{ConnectionAddr, ProtocolVersion, PushInfo, PushKind, RedisResult, Value};
use tokio::sync::mpsc;

use super::conn::{Connector, Kind};
use super::sentinel::Sentinel;
use super::timing::LINK_TIMEOUT;
use crate::state::StateError;

/// Pushes (messages, confirmations) a Cluster link may queue before it counts as broken.
const PUSH_QUEUE: usize = 4096;

/// How long a ping waits for the sentinels to name the master before it lets the `PING` alone decide.
const SENTINEL_CHECK: Duration = Duration::from_millis(500);

/// A pub/sub connection: subscribe and unsubscribe while messages keep flowing. It does not repair
/// itself: `next` returning `None` or a failed `ping` means messages may have been lost — open another.
pub struct Link {
    inner: LinkInner,
    /// Behind Sentinel: who to ask whether the master is still the one this link listens to.
    sentinel: Option<(Arc<Sentinel>, ConnectionAddr)>,
}

enum LinkInner {
    Plain {
        sink: PubSubSink,
        stream: PubSubStream,
    },
    Cluster {
        conn: ClusterConnection,
        pushes: mpsc::Receiver<PushInfo>,
        /// Set when a push found the queue full (and was dropped): the link has lost messages.
        overflow: Arc<AtomicBool>,
        /// The channels subscribed and not since unsubscribed by us: a `sunsubscribe` push for one of
        /// them comes from the server (its slot moved).
        channels: HashSet<String>,
    },
}

impl Link {
    /// Opens a link (bounded by [`LINK_TIMEOUT`]) with no subscription yet.
    pub(super) async fn open(connector: &Connector) -> Result<Link, StateError> {
        match tokio::time::timeout(LINK_TIMEOUT, Self::open_unbounded(connector)).await {
            Ok(Ok(link)) => Ok(link),
            Ok(Err(e)) => Err(StateError::Unavailable(format!("pub/sub link: {e}"))),
            Err(_) => Err(StateError::Unavailable(format!(
                "pub/sub link: no answer within {LINK_TIMEOUT:?}"
            ))),
        }
    }

    async fn open_unbounded(connector: &Connector) -> RedisResult<Link> {
        match &connector.kind {
            Kind::Single(client) => {
                let (sink, stream) = client.get_async_pubsub().await?.split();
                Ok(Link {
                    inner: LinkInner::Plain { sink, stream },
                    sentinel: None,
                })
            }
            Kind::Sentinel(sentinel) => {
                let (addr, client) = sentinel.master_client().await?;
                let (sink, stream) = client.get_async_pubsub().await?.split();
                Ok(Link {
                    inner: LinkInner::Plain { sink, stream },
                    sentinel: Some((sentinel.clone(), addr)),
                })
            }
            Kind::Cluster(nodes) => {
                // Bounded: a reader that falls behind loses the link (and resynchronises) rather than
                // grow the queue without end. The sender must not block the connection.
                let (tx, pushes) = mpsc::channel(PUSH_QUEUE);
                let overflow = Arc::new(AtomicBool::new(false));
                let flag = overflow.clone();
                let tx = move |push: PushInfo| {
                    tx.try_send(push)
                        .map_err(|_| flag.store(true, Ordering::Relaxed))
                };
                let client = ClusterClientBuilder::new(nodes.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(tx)
                    .connection_timeout(LINK_TIMEOUT)
                    .response_timeout(LINK_TIMEOUT)
                    .build()?;
                let conn = client.get_async_connection().await?;
                Ok(Link {
                    inner: LinkInner::Cluster {
                        conn,
                        pushes,
                        overflow,
                        channels: HashSet::new(),
                    },
                    sentinel: None,
                })
            }
        }
    }

    /// Subscribes to `channel` (`SSUBSCRIBE` on a Cluster); returns once the server confirmed it.
    pub async fn subscribe(&mut self, channel: &str) -> Result<(), StateError> {
        let done = match &mut self.inner {
            LinkInner::Plain { sink, .. } => {
                tokio::time::timeout(LINK_TIMEOUT, sink.subscribe(channel)).await
            }
            LinkInner::Cluster { conn, channels, .. } => {
                channels.insert(channel.to_string());
                tokio::time::timeout(LINK_TIMEOUT, conn.ssubscribe(channel)).await
            }
        };
        settled("subscribe", done)
    }

    /// Unsubscribes from `channel`; messages already on their way may still arrive.
    pub async fn unsubscribe(&mut self, channel: &str) -> Result<(), StateError> {
        let done = match &mut self.inner {
            LinkInner::Plain { sink, .. } => {
                tokio::time::timeout(LINK_TIMEOUT, sink.unsubscribe(channel)).await
            }
            LinkInner::Cluster { conn, channels, .. } => {
                channels.remove(channel);
                tokio::time::timeout(LINK_TIMEOUT, conn.sunsubscribe(channel)).await
            }
        };
        settled("unsubscribe", done)
    }

    /// The next message as (channel, payload); `None` once the link dropped (on a Cluster: a node's
    /// connection dropped, or the server moved a subscribed slot away, as after a failover).
    pub async fn next(&mut self) -> Option<(String, Vec<u8>)> {
        match &mut self.inner {
            LinkInner::Plain { stream, .. } => {
                let msg = stream.next().await?;
                Some((
                    msg.get_channel_name().to_string(),
                    msg.get_payload_bytes().to_vec(),
                ))
            }
            LinkInner::Cluster {
                pushes,
                channels,
                overflow,
                ..
            } => loop {
                if overflow.load(Ordering::Relaxed) {
                    tracing::warn!(
                        "redis cluster: pub/sub messages dropped (reader behind); reopening"
                    );
                    return None;
                }
                let push = pushes.recv().await?;
                match push.kind {
                    PushKind::Message | PushKind::SMessage => {
                        if let [channel, payload] = push.data.as_slice() {
                            if let (Some(c), Some(p)) = (bytes(channel), bytes(payload)) {
                                return Some((String::from_utf8_lossy(c).into_owned(), p.to_vec()));
                            }
                        }
                        tracing::warn!(kind = %push.kind, "ignoring an unreadable pub/sub message");
                    }
                    PushKind::Disconnection => return None,
                    PushKind::SUnsubscribe => {
                        let channel = push.data.first().and_then(bytes);
                        if channel.is_some_and(|c| channels.contains(&*String::from_utf8_lossy(c)))
                        {
                            tracing::info!("redis cluster: a subscribed slot moved; reopening");
                            return None;
                        }
                    }
                    _ => {}
                }
            },
        }
    }

    /// Checks the link still works: a `PING` (every master on a Cluster), and behind Sentinel that the
    /// sentinels still name the master this link listens to (a demoted master keeps its subscribers but
    /// no longer receives what is published).
    pub async fn ping(&mut self) -> Result<(), StateError> {
        let pong = match &mut self.inner {
            LinkInner::Plain { sink, .. } => {
                tokio::time::timeout(LINK_TIMEOUT, sink.ping::<Value>()).await
            }
            LinkInner::Cluster { conn, .. } => {
                let route = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                ));
                tokio::time::timeout(LINK_TIMEOUT, conn.route_command(redis::cmd("PING"), route))
                    .await
            }
        };
        settled("ping", pong.map(|r| r.map(|_| ())))?;
        if let Some((sentinel, addr)) = &self.sentinel {
            // Sentinels that do not answer (soon) say nothing about the master: the PING above decides.
            if let Ok(Ok(now)) = tokio::time::timeout(SENTINEL_CHECK, sentinel.master_addr()).await
            {
                if &now != addr {
                    return Err(StateError::Unavailable(format!(
                        "the sentinels now name {now} as the master, not {addr}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The bytes of a bulk or simple string.
fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn settled(
    what: &str,
    done: Result<RedisResult<()>, tokio::time::error::Elapsed>,
) -> Result<(), StateError> {
    match done {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(StateError::Unavailable(format!("pub/sub {what}: {e}"))),
        Err(_) => Err(StateError::Unavailable(format!(
            "pub/sub {what}: no answer within {LINK_TIMEOUT:?}"
        ))),
    }
}
