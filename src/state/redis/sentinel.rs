//! The master behind Sentinel: asked of the sentinels (`SENTINEL GET-MASTER-ADDR-BY-NAME`, then `ROLE` on
//! the named server, which must say `master`), asked again whenever the connection to it fails.
// The two locks guard the connection cache that the clones of one store's connection share; the store
// lives on the control thread's runtime, never in a shard (clippy.toml bans locks elsewhere).
#![allow(clippy::disallowed_types)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, Pipeline,
    RedisError, RedisFuture, RedisResult, Value,
};

use super::timing::LINK_TIMEOUT;

/// How often the connection to the master is pinged when nothing else checks it.
const WATCH_EVERY: Duration = Duration::from_secs(1);

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
    /// The index of the sentinel that answered last.
    answered: AtomicUsize,
}

impl Sentinel {
    /// The sentinels to ask for `master`; `data` carries the master's credentials and database.
    pub(super) fn new(
        sentinels: Vec<ConnectionInfo>,
        master: String,
        data: ConnectionInfo,
        response_timeout: Duration,
    ) -> Sentinel {
        Sentinel {
            sentinels,
            master,
            data,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(LINK_TIMEOUT))
                .set_response_timeout(Some(response_timeout)),
            current: Mutex::new(None),
            resolving: tokio::sync::Mutex::new(0),
            answered: AtomicUsize::new(0),
        }
    }

    /// A client of the current master (checked to be one) and its address, for a pub/sub link.
    pub(super) async fn master_client(&self) -> RedisResult<(ConnectionAddr, Client)> {
        let (addr, client, _) = self.connect_master(&self.config).await?;
        Ok((addr, client))
    }
    /// The master's address as the first sentinel that answers reports it.
    pub(super) async fn master_addr(&self) -> RedisResult<ConnectionAddr> {
        let mut last = None;
        // The sentinel that answered last is asked first: a dead one costs one timeout, not one per call.
        let first = self.answered.load(Ordering::Relaxed);
        let n = self.sentinels.len();
        for i in (0..n).map(|k| (first + k) % n) {
            let sentinel = &self.sentinels[i];
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
                Ok(Ok(Some((host, port)))) => {
                    self.answered.store(i, Ordering::Relaxed);
                    return Ok(ConnectionAddr::Tcp(host, port));
                }
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
    /// A connection to the master the sentinels name now.
    pub(super) async fn connect(sentinel: Arc<Sentinel>) -> RedisResult<SentinelConn> {
        let conn = SentinelConn(sentinel);
        conn.get().await?;
        Ok(conn)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_master_role_is_a_master() {
        let master = Value::Array(vec![Value::BulkString(b"master".to_vec()), Value::Int(0)]);
        let replica = Value::Array(vec![Value::BulkString(b"slave".to_vec())]);
        assert!(is_master(&master));
        assert!(!is_master(&replica));
        assert!(!is_master(&Value::Nil));
    }
}
