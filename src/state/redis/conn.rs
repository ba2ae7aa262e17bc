//! How the store reaches Redis: one server, a master found through Sentinel, or a Redis Cluster. Everything
//! else in the store talks through the two types of this file — [`Conn`] for commands and [`Link`] for
//! pub/sub — so the topology is decided here once.
//!
//! | topology | commands | pub/sub | publish verb |
//! |---|---|---|---|
//! | single | [`ConnectionManager`] (reconnects with backoff) | `SUBSCRIBE` on a dedicated connection | `PUBLISH` |
//! | Sentinel | a multiplexed connection to the master the sentinels name; dropped on a connection error, a timeout or `READONLY`, so the next call asks the sentinels again | `SUBSCRIBE` on the master; the link fails once the sentinels name another master | `PUBLISH` |
//! | Cluster | the crate's cluster connection (slot map, `MOVED`, reconnection) | `SSUBSCRIBE` over RESP3 pushes; the link ends when a node's connection drops or a slot moves | `SPUBLISH` |
//!
//! A [`Link`] never repairs itself: when it returns `None` (or a ping fails) events may have been lost, so
//! the subscriber opens a new one, subscribes again and resynchronises from the store.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection, PubSubSink,
    PubSubStream,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind,
    IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, PushKind, RedisError, RedisFuture,
    RedisResult, Value,
};
use tokio::sync::mpsc;

use super::events::{BACKOFF_MAX, BACKOFF_MIN, LINK_TIMEOUT};
use crate::state::StateError;

/// Where Redis is. The URL of [`super::RedisConfig`] still carries the password, user and database; with
/// Sentinel or Cluster its host is not used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Topology {
    /// One Redis at the URL.
    #[default]
    Single,
    /// The master named `master`, as the sentinels (`host:port`, asked in order) report it.
    Sentinel {
        /// `host:port` of each sentinel.
        sentinels: Vec<String>,
        /// The master's name in the sentinels' configuration.
        master: String,
    },
    /// A Redis Cluster reached through any of these seed nodes (`host:port`).
    Cluster {
        /// `host:port` of some of the cluster's nodes; the others are discovered.
        nodes: Vec<String>,
    },
}

impl Topology {
    /// One line for logs and errors.
    pub fn describe(&self, url: &str) -> String {
        match self {
            Topology::Single => url.to_string(),
            Topology::Sentinel { sentinels, master } => {
                format!("master {master:?} of sentinels {}", sentinels.join(","))
            }
            Topology::Cluster { nodes } => format!("cluster at {}", nodes.join(",")),
        }
    }
}

/// How often the connection to a master behind Sentinel is pinged when nothing else checks it.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// What a store needs to open connections and links: made once from the configuration, cheap to clone.
#[derive(Clone)]
pub(super) struct Connector {
    kind: Kind,
    response_timeout: Duration,
}

#[derive(Clone)]
enum Kind {
    Single(Client),
    Sentinel(Arc<Sentinel>),
    Cluster(Vec<ConnectionInfo>),
}

impl Connector {
    /// Checks the configuration (no I/O).
    pub(super) fn new(
        url: &str,
        topology: &Topology,
        response_timeout: Duration,
    ) -> Result<Connector, StateError> {
        let bad = |e: RedisError| StateError::Unavailable(format!("bad redis url {url:?}: {e}"));
        let base = url.into_connection_info().map_err(bad)?;
        let kind = match topology {
            Topology::Single => Kind::Single(Client::open(base).map_err(bad)?),
            Topology::Sentinel { sentinels, master } => {
                let sentinels = addresses(sentinels, None)?;
                Kind::Sentinel(Arc::new(Sentinel {
                    sentinels,
                    master: master.clone(),
                    data: base,
                    config: AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(LINK_TIMEOUT))
                        .set_response_timeout(Some(response_timeout)),
                    current: Mutex::new(None),
                    resolving: tokio::sync::Mutex::new(0),
                }))
            }
            Topology::Cluster { nodes } => {
                if base.redis_settings().db() != 0 {
                    return Err(StateError::Unavailable(
                        "a Redis Cluster has only database 0: drop the /db of the redis url".into(),
                    ));
                }
                Kind::Cluster(addresses(nodes, Some(&base))?)
            }
        };
        Ok(Connector {
            kind,
            response_timeout,
        })
    }

    /// The verb the scripts publish events with: sharded pub/sub on a Cluster, where a script may only
    /// publish to a channel of its own slot (`P:tg:{ch}:events` is), and where `PUBLISH` would be
    /// broadcast to every node of the cluster.
    pub(super) fn publish_verb(&self) -> &'static str {
        match self.kind {
            Kind::Cluster(_) => "SPUBLISH",
            Kind::Single(_) | Kind::Sentinel(_) => "PUBLISH",
        }
    }

    /// Whether events go on one channel per talkgroup (sharded pub/sub) rather than one for all.
    pub(super) fn sharded(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// Whether the topology has replicas (Sentinel, Cluster), which a grant should reach before it is
    /// answered (see `WAIT` in the floor).
    pub(super) fn replicated(&self) -> bool {
        !matches!(self.kind, Kind::Single(_))
    }

    /// The command connection, connected now (bounded by [`LINK_TIMEOUT`]); later outages are repaired
    /// by the connection itself.
    pub(super) async fn command(&self) -> RedisResult<Conn> {
        match &self.kind {
            Kind::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_min_delay(BACKOFF_MIN)
                    .set_max_delay(BACKOFF_MAX)
                    .set_connection_timeout(Some(LINK_TIMEOUT))
                    .set_response_timeout(Some(self.response_timeout));
                Ok(Conn::Single(
                    ConnectionManager::new_with_config(client.clone(), config).await?,
                ))
            }
            Kind::Sentinel(sentinel) => {
                let conn = SentinelConn(sentinel.clone());
                conn.get().await?;
                Ok(Conn::Sentinel(conn))
            }
            Kind::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(LINK_TIMEOUT)
                    .response_timeout(self.response_timeout)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

/// `host:port` items as connection infos with the URL's credentials (`base`), or none (sentinels).
fn addresses(
    items: &[String],
    base: Option<&ConnectionInfo>,
) -> Result<Vec<ConnectionInfo>, StateError> {
    if items.is_empty() {
        return Err(StateError::Unavailable(
            "no redis node address given".into(),
        ));
    }
    items
        .iter()
        .map(|item| {
            let (host, port) = item
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
                .ok_or_else(|| StateError::Unavailable(format!("{item:?} is not host:port")))?;
            let addr = ConnectionAddr::Tcp(host.to_string(), port);
            match base {
                Some(base) => Ok(base.clone().set_addr(addr)),
                None => addr
                    .into_connection_info()
                    .map_err(|e| StateError::Unavailable(format!("{item:?}: {e}"))),
            }
        })
        .collect()
}

/// The command connection of a store, whatever the topology; clones share one multiplexed connection.
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis.
    Single(ConnectionManager),
    /// The current master behind Sentinel.
    Sentinel(SentinelConn),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The sentinels, the master's name, and the connection to the master they named last.
pub(super) struct Sentinel {
    sentinels: Vec<ConnectionInfo>,
    master: String,
    /// Credentials and database of the master (its address comes from the sentinels).
    data: ConnectionInfo,
    config: AsyncConnectionConfig,
    /// The connection in use and its generation; `None` after a failure, so the next call re-resolves.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Held while resolving, so that one failure causes one resolution; counts generations.
    resolving: tokio::sync::Mutex<u64>,
}

impl Sentinel {
    /// The master's address as the first sentinel that answers reports it.
    async fn master_addr(&self) -> RedisResult<ConnectionAddr> {
        let mut last = None;
        for sentinel in &self.sentinels {
            let asked = async {
                let client = Client::open(sentinel.clone())?;
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&self.config)
                    .await?;
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.master)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
            };
            match tokio::time::timeout(LINK_TIMEOUT, asked).await {
                Ok(Ok(Some((host, port)))) => return Ok(ConnectionAddr::Tcp(host, port)),
                Ok(Ok(None)) => {
                    last = Some(RedisError::from((
                        ErrorKind::InvalidClientConfig,
                        "the sentinels do not know this master",
                        self.master.clone(),
                    )))
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(RedisError::from((
                        ErrorKind::Io,
                        "a sentinel did not answer",
                        sentinel.addr().to_string(),
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            RedisError::from((ErrorKind::InvalidClientConfig, "no sentinel configured"))
        }))
    }

    /// Connects to the master the sentinels name, checking it says it is one (right after a failover a
    /// sentinel may still name the old master, now a replica).
    async fn connect_master(
        &self,
        config: &AsyncConnectionConfig,
    ) -> RedisResult<(ConnectionAddr, Client, MultiplexedConnection)> {
        let addr = self.master_addr().await?;
        let client = Client::open(self.data.clone().set_addr(addr.clone()))?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(config)
            .await?;
        let role: Value = redis::cmd("ROLE").query_async(&mut conn).await?;
        if !is_master(&role) {
            return Err(RedisError::from((
                ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "the sentinels name a master that is not one (yet)",
                addr.to_string(),
            )));
        }
        Ok((addr, client, conn))
    }

    /// Forgets connection `generation` (not a newer one another call made meanwhile).
    fn forget(&self, generation: u64) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().map(|(g, _)| *g) == Some(generation) {
            *current = None;
        }
    }
}

/// Pings connection `generation` every [`WATCH_EVERY`] while it is the current one, and forgets it when
/// a ping fails: a master that died (or hangs) is left before the next call has to fail on it. Ends when
/// the store is gone or another connection replaced this one.
async fn watch_master(sentinel: Weak<Sentinel>, generation: u64, mut conn: MultiplexedConnection) {
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Some(current) = sentinel.upgrade() else {
            return;
        };
        if current
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(g, _)| *g)
            != Some(generation)
        {
            return;
        }
        let ping = redis::cmd("PING");
        let pong = tokio::time::timeout(LINK_TIMEOUT, ping.query_async::<Value>(&mut conn)).await;
        if !matches!(pong, Ok(Ok(_))) {
            tracing::warn!(name = %current.master, "redis: the master stopped answering; asking the sentinels again");
            current.forget(generation);
            return;
        }
    }
}

/// Whether a `ROLE` reply starts with `master`.
fn is_master(role: &Value) -> bool {
    let first = match role {
        Value::Array(items) => items.first(),
        _ => None,
    };
    match first {
        Some(Value::BulkString(b)) => b.as_slice() == b"master",
        Some(Value::SimpleString(s)) => s == "master",
        _ => false,
    }
}

/// Commands to the master behind Sentinel. A connection error, a timed-out or abandoned call, `READONLY`
/// (the old master, demoted) or `MASTERDOWN` drop the connection; the next call asks the sentinels again.
#[derive(Clone)]
pub(super) struct SentinelConn(Arc<Sentinel>);

impl SentinelConn {
    /// The current connection, resolving the master first when there is none.
    async fn get(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let mut generation = self.0.resolving.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let (addr, _, conn) = self.0.connect_master(&self.0.config).await?;
        *generation += 1;
        tokio::spawn(watch_master(
            Arc::downgrade(&self.0),
            *generation,
            conn.clone(),
        ));
        tracing::info!(master = %addr, name = %self.0.master, "redis: connected to the master named by the sentinels");
        let current = (*generation, conn);
        *self.0.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(current.clone());
        Ok(current)
    }

    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.0
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The connection for one request, and the guard that forgets it unless the request settles well.
    async fn begin(&self) -> RedisResult<(ForgetOnDrop, MultiplexedConnection)> {
        let (generation, conn) = self.get().await?;
        // Armed until the reply: dropped before it (the caller's timeout), the master may be gone
        // without a reset.
        let guard = ForgetOnDrop {
            conn: self.clone(),
            generation,
            armed: true,
        };
        Ok((guard, conn))
    }
}

/// Whether an error means the connection no longer reaches a usable master.
fn master_lost(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                | ErrorKind::Server(redis::ServerErrorKind::MasterDown)
        )
        // A write refused inside a script comes back as the script's error.
        || e.to_string().contains("READONLY")
}

struct ForgetOnDrop {
    conn: SentinelConn,
    generation: u64,
    armed: bool,
}

impl ForgetOnDrop {
    /// Disarms the guard unless `result` says the master is lost.
    fn settle<T>(&mut self, result: &RedisResult<T>) {
        self.armed = matches!(result, Err(e) if master_lost(e));
    }
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.conn.0.forget(self.generation);
        }
    }
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (mut guard, mut conn) = self.begin().await?;
            let result = conn.req_packed_command(cmd).await;
            guard.settle(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (mut guard, mut conn) = self.begin().await?;
            let result = conn.req_packed_commands(cmd, offset, count).await;
            guard.settle(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.0.data.redis_settings().db()
    }
}

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
        pushes: mpsc::UnboundedReceiver<PushInfo>,
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
                let (addr, client, _) = sentinel.connect_master(&sentinel.config).await?;
                let (sink, stream) = client.get_async_pubsub().await?.split();
                Ok(Link {
                    inner: LinkInner::Plain { sink, stream },
                    sentinel: Some((sentinel.clone(), addr)),
                })
            }
            Kind::Cluster(nodes) => {
                let (tx, pushes) = mpsc::unbounded_channel();
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
                pushes, channels, ..
            } => loop {
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
            // Sentinels that do not answer say nothing about the master: the PING above decides.
            if let Ok(now) = sentinel.master_addr().await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_take_the_credentials_of_the_url() {
        let base = "redis://:pw@ignored:1/"
            .into_connection_info()
            .expect("url");
        let nodes = addresses(&["10.0.0.1:7000".into(), "[::1]:7001".into()], Some(&base))
            .expect("addresses");
        assert_eq!(
            nodes[0].addr(),
            &ConnectionAddr::Tcp("10.0.0.1".into(), 7000)
        );
        assert_eq!(nodes[0].redis_settings().password(), Some("pw"));
        assert_eq!(nodes[1].addr(), &ConnectionAddr::Tcp("::1".into(), 7001));
        assert!(addresses(&["nope".into()], None).is_err());
        assert!(addresses(&[], None).is_err());
    }

    #[test]
    fn a_cluster_has_no_database_but_zero() {
        let topology = Topology::Cluster {
            nodes: vec!["127.0.0.1:7000".into()],
        };
        let timeout = Duration::from_millis(250);
        assert!(Connector::new("redis://127.0.0.1/3", &topology, timeout).is_err());
        let ok = Connector::new("redis://127.0.0.1/", &topology, timeout).expect("valid");
        assert_eq!(ok.publish_verb(), "SPUBLISH");
        let single =
            Connector::new("redis://127.0.0.1/", &Topology::Single, timeout).expect("valid");
        assert_eq!(single.publish_verb(), "PUBLISH");
    }

    #[test]
    fn only_a_master_role_is_a_master() {
        let master = Value::Array(vec![Value::BulkString(b"master".to_vec()), Value::Int(0)]);
        let replica = Value::Array(vec![Value::BulkString(b"slave".to_vec())]);
        assert!(is_master(&master));
        assert!(!is_master(&replica));
        assert!(!is_master(&Value::Nil));
    }
}
