//! How the store reaches Redis: one server, a master found through Sentinel ([`super::sentinel`]), or a
//! Redis Cluster. Everything else in the store talks through [`Conn`] for commands and [`Link`] for
//! pub/sub ([`super::link`]), so the topology is decided here once.
//!
//! | topology | commands | pub/sub | publish verb |
//! |---|---|---|---|
//! | single | [`ConnectionManager`] (reconnects with backoff) | `SUBSCRIBE` on a dedicated connection | `PUBLISH` |
//! | Sentinel | a multiplexed connection to the master the sentinels name, pinged every second; dropped on a connection error, a timeout or `READONLY`, so the next call asks the sentinels again | `SUBSCRIBE` on the master; the link fails once the sentinels name another master | `PUBLISH` |
//! | Cluster | the crate's cluster connection (slot map, `MOVED`, reconnection) | `SSUBSCRIBE` over RESP3 pushes; the link ends when a node's connection drops or a slot moves | `SPUBLISH` |
//!
//! [`Link`]: super::link::Link

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{
    Client, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, Value,
};

use super::sentinel::{Sentinel, SentinelConn};
use super::timing::{BACKOFF_MAX, BACKOFF_MIN, LINK_TIMEOUT};
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

/// What a store needs to open connections and links: made once from the configuration, cheap to clone.
#[derive(Clone)]
pub(super) struct Connector {
    pub(super) kind: Kind,
    response_timeout: Duration,
}

/// The topology, ready to connect.
#[derive(Clone)]
pub(super) enum Kind {
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
                Kind::Sentinel(Arc::new(Sentinel::new(
                    sentinels,
                    master.clone(),
                    base,
                    response_timeout,
                )))
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
            Kind::Sentinel(sentinel) => Ok(Conn::Sentinel(
                SentinelConn::connect(sentinel.clone()).await?,
            )),
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

impl Conn {
    /// `WAIT 1 timeout_ms` on the master holding `key` (on a Cluster, that slot's master only: the
    /// others have nothing of ours to replicate, and one without a replica would hold every grant for
    /// the whole timeout). The number of replicas that acknowledged this connection's writes.
    pub(super) async fn wait_for_replica(
        &mut self,
        key: &str,
        timeout_ms: i64,
    ) -> RedisResult<i64> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(1).arg(timeout_ms);
        match self {
            Conn::Cluster(c) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(key, SlotAddr::Master),
                ));
                let reply = c.route_command(wait, route).await?;
                Ok(redis::from_redis_value(reply)?)
            }
            Conn::Single(_) | Conn::Sentinel(_) => wait.query_async(self).await,
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
}
