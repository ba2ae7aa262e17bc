//! Membership and presence on Redis: who is in which channel (both ways), with expiries refreshed by
//! heartbeats.

use std::time::Duration;

use super::events::Wire;
use super::{encode, millis, RedisStore};
use crate::state::{wall_clock_us, SessionStore, StateError, StoreFuture};

impl RedisStore {
    /// Join and refresh: (re)writes both directions with a new expiry and drops expired entries on the way.
    /// A refresh re-adds a member that is missing, so a Redis restarted empty fills up again within one
    /// heartbeat. Keys of two slots: fine on one Redis (`MULTI`); on Cluster this would be two transactions.
    async fn upsert(
        &self,
        channel: &str,
        member: &str,
        node: &str,
        publish: bool,
    ) -> Result<(), StateError> {
        let now_ms = millis(Duration::from_micros(wall_clock_us()));
        let ttl_ms = millis(self.session_ttl).max(1);
        let expiry = now_ms.saturating_add(ttl_ms);
        let members = self.keys.members(channel);
        let nodes = self.keys.member_nodes(channel);
        let channels = self.keys.member_channels(member);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrembyscore(&members, "-inf", now_ms)
            .ignore()
            .zadd(&members, member, expiry)
            .ignore()
            .hset(&nodes, member, node)
            .ignore()
            .pexpire(&members, ttl_ms)
            .ignore()
            .pexpire(&nodes, ttl_ms)
            .ignore()
            .zrembyscore(&channels, "-inf", now_ms)
            .ignore()
            .zadd(&channels, channel, expiry)
            .ignore()
            .pexpire(&channels, ttl_ms)
            .ignore();
        if publish {
            let event = Wire::Join {
                channel: channel.into(),
                member: member.into(),
                node: node.into(),
            };
            pipe.publish(self.keys.events(), encode(&event)?).ignore();
        }
        let mut conn = self.conn.clone();
        let what = if publish { "join" } else { "refresh" };
        self.call(what, pipe.query_async::<()>(&mut conn)).await
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
    fn join<'a>(&'a self, channel: &'a str, member: &'a str, node: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(self.upsert(channel, member, node, true))
    }

    /// Idempotent; publishes `leave` even when the member was not there.
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
                .zrem(self.keys.member_channels(member), channel)
                .ignore()
                .publish(self.keys.events(), encode(&event)?)
                .ignore();
            let mut conn = self.conn.clone();
            self.call("leave", pipe.query_async::<()>(&mut conn)).await
        })
    }

    fn refresh<'a>(
        &'a self,
        channel: &'a str,
        member: &'a str,
        node: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.upsert(channel, member, node, false))
    }

    fn members<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(self.live("members", self.keys.members(channel)))
    }

    fn channels_of<'a>(&'a self, member: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(self.live("channels_of", self.keys.member_channels(member)))
    }
}
