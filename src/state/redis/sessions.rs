//! Membership and presence on Redis: who is in which channel (both ways), with expiries refreshed by
//! heartbeats.

use std::time::Duration;

use super::events::Wire;
use super::{encode, millis, RedisStore};
use crate::state::{wall_clock_us, SessionStore, StateError, StoreFuture};

/// Claims `member` in a channel for a node, with an expiry: refused (0) while the name is joined there
/// from another node — a name is unique in a channel across all nodes (protocol v1.1). Only the channel's
/// keys (one Cluster slot); the member's reverse index is written after it.
/// KEYS: members (zset name → expiry ms), member_nodes (hash name → node).
/// ARGV: member, node, now ms, expiry ms, ttl ms, events channel, event JSON ('' publishes nothing),
/// publish verb.
pub(super) const CLAIM: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local owner = redis.call('HGET', KEYS[2], ARGV[1])
  if owner and owner ~= ARGV[2] then return 0 end
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
if ARGV[7] ~= '' then redis.call(ARGV[8], ARGV[6], ARGV[7]) end
return 1
";

impl RedisStore {
    /// Join and refresh: claims the name in the channel (see [`CLAIM`]) with a new expiry, dropping
    /// expired entries on the way, then records the channel in the member's reverse index. A refresh
    /// re-adds a member that is missing, so a Redis restarted empty fills up again within one heartbeat;
    /// it never takes a name another node holds. `false`: the name is held by another node.
    async fn upsert(
        &self,
        channel: &str,
        member: &str,
        node: &str,
        publish: bool,
    ) -> Result<bool, StateError> {
        let now_ms = millis(Duration::from_micros(wall_clock_us()));
        let ttl_ms = millis(self.session_ttl).max(1);
        let expiry = now_ms.saturating_add(ttl_ms);
        let event = if publish {
            encode(&Wire::Join {
                channel: channel.into(),
                member: member.into(),
                node: node.into(),
            })?
        } else {
            String::new()
        };
        let what = if publish { "join" } else { "refresh" };
        let mut conn = self.conn.clone();
        let mut invocation = self.claim.prepare_invoke();
        invocation
            .key(self.keys.members(channel))
            .key(self.keys.member_nodes(channel))
            .arg(member)
            .arg(node)
            .arg(now_ms)
            .arg(expiry)
            .arg(ttl_ms)
            .arg(self.events_channel(channel))
            .arg(event)
            .arg(self.publish_verb());
        let claimed: i64 = self.call(what, invocation.invoke_async(&mut conn)).await?;
        if claimed != 1 {
            return Ok(false);
        }
        let channels = self.keys.member_channels(member);
        let mut pipe = redis::pipe();
        pipe.zrembyscore(&channels, "-inf", now_ms)
            .ignore()
            .zadd(&channels, channel, expiry)
            .ignore()
            .pexpire(&channels, ttl_ms)
            .ignore();
        self.call(what, pipe.query_async::<()>(&mut conn)).await?;
        Ok(true)
    }

    /// The live entries of a sorted set whose scores are expiry times, sorted by name.
    async fn live(&self, what: &str, key: String) -> Result<Vec<String>, StateError> {
        let now_ms = millis(Duration::from_micros(wall_clock_us()));
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = self
            .call(
                what,
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg(format!("({now_ms}"))
                    .arg("+inf")
                    .query_async(&mut conn),
            )
            .await?;
        names.sort();
        Ok(names)
    }
}

impl SessionStore for RedisStore {
    fn join<'a>(
        &'a self,
        channel: &'a str,
        member: &'a str,
        node: &'a str,
    ) -> StoreFuture<'a, bool> {
        Box::pin(self.upsert(channel, member, node, true))
    }

    /// Idempotent; publishes `leave` even when the member was not there. The channel's keys and the event
    /// go in one transaction (one Cluster slot), the member's reverse index after it (another slot).
    fn leave<'a>(
        &'a self,
        channel: &'a str,
        member: &'a str,
        node: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let event = Wire::Leave {
                channel: channel.into(),
                member: member.into(),
                node: node.into(),
            };
            let mut pipe = redis::pipe();
            pipe.atomic()
                .zrem(self.keys.members(channel), member)
                .ignore()
                .hdel(self.keys.member_nodes(channel), member)
                .ignore()
                .cmd(self.publish_verb())
                .arg(self.events_channel(channel))
                .arg(encode(&event)?)
                .ignore();
            let mut conn = self.conn.clone();
            self.call("leave", pipe.query_async::<()>(&mut conn))
                .await?;
            let cmd = redis::cmd("ZREM")
                .arg(self.keys.member_channels(member))
                .arg(channel)
                .to_owned();
            self.call("leave", cmd.query_async::<()>(&mut conn)).await
        })
    }

    fn refresh<'a>(
        &'a self,
        channel: &'a str,
        member: &'a str,
        node: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.upsert(channel, member, node, false).await.map(|_| ()) })
    }

    fn members<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(self.live("members", self.keys.members(channel)))
    }

    fn channels_of<'a>(&'a self, member: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(self.live("channels_of", self.keys.member_channels(member)))
    }
}
