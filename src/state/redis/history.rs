//! The transmission log on Redis: a capped stream per channel (`P:tg:{ch}:history`, one field `b` holding
//! the burst as JSON), so any node answers for the whole cluster. Capped at about
//! [`HISTORY_PER_CHANNEL`] entries (`MAXLEN ~`), and the key expires a week after its last burst, so a
//! channel nobody uses any more leaves nothing behind.

use std::time::Duration;

use super::{millis, RedisStore};
use crate::state::history::{decode, newest_first, Burst, History, HISTORY_PER_CHANNEL};
use crate::state::{StateError, StoreFuture};

/// How long a channel's history outlives its last burst.
const HISTORY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

impl History for RedisStore {
    fn record<'a>(&'a self, burst: &'a Burst) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let key = self.keys.channel(&burst.channel, "history");
            let json = serde_json::to_string(burst)
                .map_err(|e| StateError::Protocol(format!("encode burst: {e}")))?;
            let mut pipe = redis::pipe();
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(HISTORY_PER_CHANNEL)
                .arg("*")
                .arg("b")
                .arg(json)
                .ignore()
                .pexpire(&key, millis(HISTORY_TTL))
                .ignore();
            let mut conn = self.conn.clone();
            self.call("history", pipe.query_async::<()>(&mut conn))
                .await
        })
    }

    fn list<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
        before: Option<u64>,
    ) -> StoreFuture<'a, Vec<Burst>> {
        Box::pin(async move {
            let key = self.keys.channel(channel, "history");
            // Paging back by epoch needs the entries older than `before`: read the whole capped stream
            // then (a thousand small entries), only the newest `limit` otherwise.
            let count = if before.is_some() {
                HISTORY_PER_CHANNEL * 2
            } else {
                limit
            };
            let mut conn = self.conn.clone();
            let reply: redis::streams::StreamRangeReply = self
                .call(
                    "history",
                    redis::cmd("XREVRANGE")
                        .arg(&key)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(count)
                        .query_async(&mut conn),
                )
                .await?;
            let mut bursts = Vec::with_capacity(reply.ids.len());
            for entry in reply.ids {
                let json: Option<String> = entry.get("b");
                match json.as_deref().map(decode) {
                    Some(Ok(b)) => bursts.push(b),
                    // A foreign writer's entry: skipped, not fatal for the whole history.
                    _ => tracing::warn!(channel, id = entry.id, "unreadable history entry"),
                }
            }
            Ok(newest_first(bursts.into_iter(), limit, before))
        })
    }
}
