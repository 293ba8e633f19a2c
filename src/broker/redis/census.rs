//! The worker census on Redis: `inspect active` and `active_queues` broadcast over kombu's
//! pidbox, the replies collected from a reply list of the census's own, and the tasks attributed
//! to queues through the binding tables.

use std::time::Duration;

use super::connection::RedisBroker;
use super::layout::{printable, route, RedisLayout};
use super::pidbox;
use crate::broker::census::{new_oid, Census, Command, Tickets, MAILBOX, REPLY_EXCHANGE};
use crate::error::{Error, Result};

impl RedisBroker {
    /// `inspect active` and `active_queues` over kombu's Redis pidbox.
    ///
    /// Writes only what the workers read the same way, and only for the census itself: the
    /// separator is the one of the workers' own bindings to `celery.pidbox` (a trigger whose
    /// `separator` differs gets the error, and writes nothing); with no worker bound nobody can
    /// answer, so the census is empty and writes nothing. Otherwise a fresh reply id is bound
    /// in `_kombu.binding.reply.celery.pidbox` just before the broadcast and unbound, with its
    /// list, as soon as the replies are in (as kombu's own `inspect` does). The list expires by
    /// itself, and members this scaler left behind (a kill mid-census) are removed by the next
    /// census once they are [`STALE_REPLY`] old.
    pub(super) async fn inspect_active(
        &self,
        layout: &RedisLayout,
        window: Duration,
    ) -> Result<Census> {
        let broadcast_table = layout.binding_key(MAILBOX);
        let reply_table = layout.binding_key(REPLY_EXCHANGE);
        let mut pipe = redis::pipe();
        pipe.smembers(&broadcast_table).smembers(&reply_table);
        let (workers, replies): (Vec<String>, Vec<String>) = self.run(&pipe).await?;
        let mut census = Census::default();
        if workers.is_empty() {
            return Ok(census);
        }
        if let Some(foreign) = workers
            .iter()
            .find(|m| !pidbox::is_worker_binding(layout, m))
        {
            return Err(Error::invalid(
                "separator",
                format!(
                    "the workers' remote-control bindings (`{}`, for example `{}`) do not split with separator `{}`: the workers use another kombu `sep`; set `separator` to theirs, or scaleOnRunning: \"false\"",
                    printable(&broadcast_table),
                    printable(foreign),
                    printable(&layout.separator)
                ),
            ));
        }
        let now = unix_now();
        let mut pipe = redis::pipe();
        let mut stale = 0;
        for member in &replies {
            if let Some(list) = pidbox::stale_own_member(layout, member, now, STALE_REPLY.as_secs())
            {
                pipe.srem(&reply_table, member).ignore().del(list).ignore();
                stale += 1;
            } else if layout.parse_binding(member).is_none() {
                // Workers split this table's members with their own separator: one that does not
                // split makes every worker's reply fail (kombu's `_lookup` raises), ours included.
                return Err(Error::Unavailable(format!(
                    "a remote-control reply binding in `{}` (`{}`) does not split with the workers' separator `{}`: no worker can answer `celery inspect` (or this scaler) until it is removed (SREM)",
                    printable(&reply_table),
                    printable(member),
                    printable(&layout.separator)
                )));
            }
        }
        if stale > 0 {
            tracing::info!(
                stale,
                "Removing reply bindings a stopped scaler left behind"
            );
        }
        let oid = new_oid();
        let tickets = Tickets::new();
        let (reply_key, _, member) = pidbox::reply_queue(layout, &oid);
        // The list exists, with its expiry, before any worker can push to it: a push keeps the
        // expiry, so a process killed from here on leaves nothing that lasts. The placeholder is
        // not a reply envelope and is skipped when the replies are read.
        pipe.sadd(&reply_table, &member)
            .ignore()
            .rpush(&reply_key, REPLY_PLACEHOLDER)
            .ignore()
            .pexpire(&reply_key, STALE_REPLY.as_millis() as i64)
            .ignore();
        let channel = pidbox::broadcast_channel(layout, self.target.db);
        for command in Command::ALL {
            pipe.publish(
                &channel,
                pidbox::broadcast_message(command, tickets.of(command), &oid, window),
            );
        }
        let (receivers, _): (u64, u64) = self.run(&pipe).await?;
        let collected = self
            .collect_replies(&reply_key, receivers * 2 + 1, window)
            .await;
        // Unbound first, so a worker that answers late finds no binding rather than refilling
        // the list after it is deleted (kombu's `after_reply_message_received` does the same).
        let mut pipe = redis::pipe();
        pipe.srem(&reply_table, &member)
            .ignore()
            .lrange(&reply_key, 0, -1)
            .del(&reply_key)
            .ignore();
        let cleaned: Result<(Vec<Vec<u8>>,)> = self.run(&pipe).await;
        collected?;
        let (raw,) = cleaned?;
        pidbox::collect(&raw, &tickets, &mut census);
        tracing::debug!(
            receivers,
            replies = raw.len(),
            workers = census.workers.len(),
            tasks = census.tasks.len(),
            "Worker census collected"
        );
        let tables = self
            .tables(layout, census.tasks.iter().map(|t| t.exchange.as_str()))
            .await?;
        census.resolve(|ex, rk| {
            route(ex, rk, &tables)
                .into_iter()
                .map(str::to_string)
                .collect()
        });
        Ok(census)
    }

    /// Waits until `reply_key` holds `expected` entries (the placeholder and the replies) or
    /// `window` ends.
    async fn collect_replies(
        &self,
        reply_key: &str,
        expected: u64,
        window: Duration,
    ) -> Result<()> {
        if expected <= 1 {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        loop {
            let mut pipe = redis::pipe();
            pipe.llen(reply_key);
            let (len,): (u64,) = self.run(&pipe).await?;
            if len >= expected || started.elapsed() >= window {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The first entry of a reply list, so that the list exists with its expiry before the replies.
const REPLY_PLACEHOLDER: &str = "celery-keda-scaler: waiting for replies";

/// How long a reply binding and list of this scaler can be in use: a census lasts at most its
/// deadline (seconds), so an older one is a leftover of a stopped process. Also the reply list's
/// expiry.
const STALE_REPLY: Duration = Duration::from_secs(30);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
