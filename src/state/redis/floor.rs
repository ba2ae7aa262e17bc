//! The floor lock on Redis: one Lua script per operation, so no node ever reads a lock and writes it in
//! two steps.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{millis, parse_epoch, RedisStore};
use crate::state::{AcquireRequest, Acquired, FloorStore, Holder, StateError, StoreFuture};

/// Takes the floor if free — or, for an emergency press (`ARGV[7] == '1'`), from any holder not itself in
/// an emergency burst (its node learns of the newer epoch and revokes it). The epoch is
/// `max(last + 1, TIME in µs)`: `last + 1` orders grants on a running Redis, the clock keeps epochs going
/// up when Redis restarts empty (an `INCR` counter would restart at 1 and every shard would ignore the new
/// grants as stale) — and when the epoch key has expired (`ARGV[8]` ms after the last grant: one key per
/// channel name ever used must not stay forever under `noeviction`). The clock also keeps epochs going up
/// across a failover that lost the last grants (replication is asynchronous): the new master's `TIME` is
/// past theirs as long as the servers' clocks differ by less than the failover takes. `ARGV[9]` is the
/// publish verb (`PUBLISH`, or `SPUBLISH` on a Cluster, to `ARGV[6]` in the channel's slot). `%d` prints the epoch exactly (a Lua
/// number printed plainly keeps 14 digits); 2^53 bounds it, beyond which the double would round.
pub(super) const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  local h = redis.call('HMGET', KEYS[1], 'epoch', 'member', 'node', 'priority', 'emergency')
  if ARGV[7] ~= '1' or h[5] == '1' then
    return {'busy', h[1], h[2], h[3], h[4], h[5] or '0'}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local e = math.max((tonumber(redis.call('GET', KEYS[2])) or 0) + 1, now)
if e >= 9007199254740992 then return redis.error_reply('epoch beyond 2^53') end
local es = string.format('%d', e)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'epoch', es, 'member', ARGV[2], 'node', ARGV[3], 'priority', ARGV[4],
  'emergency', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], es, 'PX', ARGV[8])
redis.call(ARGV[9], ARGV[6], cjson.encode({kind = 'grant', channel = ARGV[1], epoch = es,
  member = ARGV[2], node = ARGV[3], priority = tonumber(ARGV[4]), emergency = ARGV[7] == '1'}))
return {'granted', es}
";

/// How long a channel's last epoch is kept after its last grant. Past it the next epoch comes from the
/// clock alone, which is still above every epoch granted before (they were at most the clock then, plus
/// one per grant in the same microsecond).
const EPOCH_TTL: Duration = Duration::from_secs(24 * 3600);

/// Extends the lease only while the lock is held at the caller's epoch (the epoch is the token).
pub(super) const RENEW: &str = r"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Frees the lock only at the caller's epoch and announces `idle` with that epoch, which shards compare
/// with the epoch they cached. `ARGV[4]`: the publish verb.
pub(super) const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call(ARGV[4], ARGV[3], cjson.encode({kind = 'idle', channel = ARGV[2], epoch = ARGV[1]}))
  return 1
end
return 0
";

/// How long a grant waits for one replica to acknowledge it (Sentinel, Cluster).
const REPLICATION_WAIT: Duration = Duration::from_millis(50);
/// After a `WAIT` that no replica answered (none connected, e.g. after a failover until the old master
/// comes back as a replica), grants skip `WAIT` this long: a master without a replica would otherwise
/// hold every grant, and the connection it shares with every other call, for [`REPLICATION_WAIT`].
const NO_REPLICA_BACKOFF: Duration = Duration::from_secs(5);

impl RedisStore {
    /// `WAIT 1`: holds the grant's answer until one replica has it, or [`REPLICATION_WAIT`] passed.
    /// Replication stays asynchronous — a master that dies within that bound (or while no replica is
    /// connected) may take the grant with it, and its replica, promoted, grants the floor again with a
    /// greater epoch (the clock floor of [`ACQUIRE`]); the first holder's renewals then fail and its node
    /// revokes it. `WAIT` narrows that window from the replication lag of the moment to one round trip in
    /// the common case. It blocks the shared connection while it waits (one replication round trip,
    /// [`REPLICATION_WAIT`] at worst, then [`NO_REPLICA_BACKOFF`] without); a failed or short `WAIT`
    /// does not fail the grant.
    async fn wait_for_replica(&self, channel: &str) {
        if !self.connector.replicated()
            || self.skip_wait_until.load(Ordering::Relaxed) > self.now_ms()
        {
            return;
        }
        let mut conn = self.conn.clone();
        let key = self.keys.floor(channel);
        let waited = conn.wait_for_replica(&key, millis(REPLICATION_WAIT));
        match self.call("WAIT", waited).await {
            Ok(n) if n >= 1 => {}
            Ok(_) => {
                tracing::info!(
                    "a grant reached no replica within {REPLICATION_WAIT:?}; not waiting for one \
                     for {NO_REPLICA_BACKOFF:?}"
                );
                self.skip_wait_until.store(
                    self.now_ms() + millis(NO_REPLICA_BACKOFF).unsigned_abs(),
                    Ordering::Relaxed,
                );
            }
            Err(e) => tracing::debug!(error = %e, "WAIT after a grant"),
        }
    }

    /// Milliseconds since the store was made (for [`Self::wait_for_replica`]'s backoff).
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl FloorStore for RedisStore {
    fn acquire(&self, req: AcquireRequest) -> StoreFuture<'_, Acquired> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut invocation = self.acquire.prepare_invoke();
            invocation
                .key(self.keys.floor(&req.channel))
                .key(self.keys.epoch(&req.channel))
                .arg(&req.channel)
                .arg(&req.member)
                .arg(&self.node)
                .arg(req.priority)
                .arg(millis(req.ttl).max(1))
                .arg(self.events_channel(&req.channel))
                .arg(if req.emergency { "1" } else { "0" })
                .arg(millis(EPOCH_TTL))
                .arg(self.publish_verb());
            let reply: Vec<Option<String>> = self
                .call("acquire", invocation.invoke_async(&mut conn))
                .await?;
            match reply.as_slice() {
                [Some(tag), Some(epoch)] if tag == "granted" => {
                    let epoch = parse_epoch(epoch)?;
                    self.wait_for_replica(&req.channel).await;
                    Ok(Acquired::Granted { epoch })
                }
                [Some(tag), epoch, member, node, priority, emergency] if tag == "busy" => {
                    holder_from(epoch, member, node, priority, emergency)?
                        .map(Acquired::Busy)
                        .ok_or_else(|| {
                            StateError::Protocol("acquire: busy lock without fields".into())
                        })
                }
                _ => Err(StateError::Protocol(format!(
                    "acquire: unexpected reply {reply:?}"
                ))),
            }
        })
    }

    fn renew<'a>(&'a self, channel: &'a str, epoch: u64, ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut invocation = self.renew.prepare_invoke();
            invocation
                .key(self.keys.floor(channel))
                .arg(epoch)
                .arg(millis(ttl).max(1));
            let matched: i64 = self
                .call("renew", invocation.invoke_async(&mut conn))
                .await?;
            Ok(matched == 1)
        })
    }

    fn release<'a>(&'a self, channel: &'a str, epoch: u64) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut invocation = self.release.prepare_invoke();
            invocation
                .key(self.keys.floor(channel))
                .arg(epoch)
                .arg(channel)
                .arg(self.events_channel(channel))
                .arg(self.publish_verb());
            let matched: i64 = self
                .call("release", invocation.invoke_async(&mut conn))
                .await?;
            Ok(matched == 1)
        })
    }

    fn holder<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Option<Holder>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let fields: Vec<Option<String>> = self
                .call(
                    "holder",
                    redis::cmd("HMGET")
                        .arg(self.keys.floor(channel))
                        .arg(&["epoch", "member", "node", "priority", "emergency"])
                        .query_async(&mut conn),
                )
                .await?;
            match fields.as_slice() {
                [epoch, member, node, priority, emergency] => {
                    holder_from(epoch, member, node, priority, emergency)
                }
                _ => Err(StateError::Protocol(format!(
                    "holder: unexpected reply {fields:?}"
                ))),
            }
        })
    }
}

/// A holder from the lock's fields: `None` when the lock is absent (all fields missing), an error when only
/// some are there (a foreign writer).
fn holder_from(
    epoch: &Option<String>,
    member: &Option<String>,
    node: &Option<String>,
    priority: &Option<String>,
    emergency: &Option<String>,
) -> Result<Option<Holder>, StateError> {
    match (epoch, member, node, priority) {
        (None, None, None, None) => Ok(None),
        (Some(epoch), Some(member), Some(node), Some(priority)) => Ok(Some(Holder {
            member: member.clone(),
            node: node.clone(),
            epoch: parse_epoch(epoch)?,
            priority: priority
                .parse()
                .map_err(|_| StateError::Protocol(format!("priority {priority:?} is not a u8")))?,
            // Absent in locks written before emergencies existed.
            emergency: emergency.as_deref() == Some("1"),
        })),
        _ => Err(StateError::Protocol(
            "floor lock with missing fields".into(),
        )),
    }
}
