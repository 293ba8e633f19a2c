//! The Redis depth reading: every priority list of every queue and the `unacked` hash in one
//! pipelined round trip, each unacked entry routed to its queue through the binding tables. An
//! idle poll looks first with one `EXISTS` over every list of the set (an empty Redis list does
//! not exist) and the `unacked` hash as routed for every set of the broker in the last 100 ms,
//! and reads the depth only when something is there. The same look on the change-notification
//! connection arms the set ([`super::tracking`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::connection::RedisBroker;
use super::layout::{printable, route, unacked_routing, RedisLayout};
use crate::broker::armed::Armed;
use crate::broker::census::Census;
use crate::broker::reading::{Broker, Depth, QueueDepth, ReadyPart};
use crate::error::{Error, Result};

#[async_trait]
impl Broker for RedisBroker {
    type Layout = RedisLayout;

    async fn census(&self, layout: &RedisLayout, window: Duration) -> Result<Option<Census>> {
        self.inspect_active(layout, window).await.map(Some)
    }

    async fn depth_if_any(
        &self,
        layout: &RedisLayout,
        queues: &[String],
        in_flight: bool,
    ) -> Result<Option<Depth>> {
        // One command for the whole set, whatever its number of queues and priority steps.
        let keys = ready_keys(layout, queues);
        let mut existing = 0;
        if !keys.is_empty() {
            let mut pipe = redis::pipe();
            pipe.add_command(redis::cmd("EXISTS").arg(&keys).clone());
            (existing,) = self.run(&pipe).await?;
        }
        self.depth_if_found(layout, queues, in_flight, existing > 0)
            .await
    }

    async fn depth_armed(
        &self,
        layout: &RedisLayout,
        queues: &[String],
        in_flight: bool,
    ) -> Result<(Option<Depth>, Option<Armed>)> {
        let keys = ready_keys(layout, queues);
        match self
            .tracker
            .arm(self.master_client(), self.current_host(), &keys)
            .await
        {
            // The arming read was the cheap look.
            Ok(Some(arming)) => {
                let depth = self
                    .depth_if_found(layout, queues, in_flight, arming.existing > 0)
                    .await?;
                Ok((depth, Some(arming.armed)))
            }
            Ok(None) => Ok((self.depth_if_any(layout, queues, in_flight).await?, None)),
            // The notification connection failed: this reading is polled (and fails too if the
            // broker is down); the next one tries to arm again.
            Err(e) => {
                tracing::debug!(error = %e, "Arming failed; polling this time");
                Ok((self.depth_if_any(layout, queues, in_flight).await?, None))
            }
        }
    }

    async fn depth_ready_empty(
        &self,
        layout: &RedisLayout,
        queues: &[String],
        in_flight: bool,
    ) -> Result<Option<Depth>> {
        self.depth_if_found(layout, queues, in_flight, false).await
    }

    async fn depth(
        &self,
        layout: &RedisLayout,
        queues: &[String],
        in_flight: bool,
    ) -> Result<Depth> {
        // One round trip: every priority list of every queue, then the unacked hash. Not a
        // MULTI: kombu itself moves a message from a list to `unacked` in two steps, so a
        // transaction buys no exactness, and the lists are read first so that a message moving
        // from list to `unacked` meanwhile is counted (twice, for one reading) rather than missed.
        let mut pipe = redis::pipe();
        let mut keys = Vec::with_capacity(queues.len());
        for queue in queues {
            let queue_keys = layout.ready_keys(queue);
            for (_, key) in &queue_keys {
                pipe.llen(key);
            }
            keys.push(queue_keys);
        }
        if in_flight {
            pipe.hvals(layout.unacked_key());
        }
        let mut values: Vec<redis::Value> = self.run(&pipe).await?;
        let unacked: Vec<Vec<u8>> = if in_flight {
            let v = values.pop().unwrap_or(redis::Value::Nil);
            redis::from_redis_value(v).map_err(|e| self.unexpected(e))?
        } else {
            Vec::new()
        };
        let mut lens = values.into_iter();
        let mut depths = Vec::with_capacity(queues.len());
        for (queue, queue_keys) in queues.iter().zip(keys) {
            let mut ready = Vec::with_capacity(queue_keys.len());
            for (step, key) in queue_keys {
                let value = lens.next().ok_or_else(|| {
                    Error::Internal("Redis returned fewer replies than commands".into())
                })?;
                let count: u64 = redis::from_redis_value(value).map_err(|e| self.unexpected(e))?;
                ready.push(ReadyPart {
                    source: printable(&key),
                    priority: Some(step),
                    count,
                });
            }
            depths.push(QueueDepth {
                queue: queue.clone(),
                ready,
                in_flight: 0,
                running_workers: Vec::new(),
            });
        }
        if !unacked.is_empty() {
            let counts = self.count_unacked(layout, &unacked).await?;
            for q in &mut depths {
                q.in_flight = counts.get(q.queue.as_str()).copied().unwrap_or(0);
            }
        }
        Ok(Depth {
            queues: depths,
            unresolved: Vec::new(),
            answered_by: self.answered_by(),
        })
    }
}

/// Every priority list of every queue of the set, as key names.
fn ready_keys(layout: &RedisLayout, queues: &[String]) -> Vec<String> {
    queues
        .iter()
        .flat_map(|queue| layout.ready_keys(queue))
        .map(|(_, key)| key)
        .collect()
}

impl RedisBroker {
    /// After a cheap look at the lists (`lists_found`: some exist): `None` if nothing is ready
    /// and (with `in_flight`) the shared `unacked` reading has nothing for the set, else the
    /// full reading.
    async fn depth_if_found(
        &self,
        layout: &RedisLayout,
        queues: &[String],
        in_flight: bool,
        lists_found: bool,
    ) -> Result<Option<Depth>> {
        let mut something = lists_found;
        if !something && in_flight {
            let counts = self.shared_unacked(layout).await?;
            something = queues.iter().any(|q| counts.get(q).is_some_and(|&n| n > 0));
        }
        if !something {
            return Ok(None);
        }
        self.depth(layout, queues, in_flight).await.map(Some)
    }

    /// The `unacked` hash routed to queues under `layout`: read once (`HVALS`, then the binding
    /// tables its entries name) for every idle poll on this broker within
    /// [`super::connection::UNACKED_SHARED_FOR`]; with change notifications, the hash is armed
    /// before it is read, and the routed counts answer until Redis says it changed.
    async fn shared_unacked(&self, layout: &RedisLayout) -> Result<Arc<HashMap<String, u64>>> {
        if let Some(counts) = self.quiet_unacked(layout) {
            return Ok(counts);
        }
        self.unacked
            .try_get_with_by_ref(layout, async {
                // Armed first: a write racing the read below fires the arming.
                let key = [layout.unacked_key()];
                let arming = self
                    .tracker
                    .arm(self.master_client(), self.current_host(), &key)
                    .await
                    .ok()
                    .flatten();
                let mut pipe = redis::pipe();
                pipe.hvals(layout.unacked_key());
                let (values,): (Vec<Vec<u8>>,) = self.run(&pipe).await?;
                let counts = Arc::new(if values.is_empty() {
                    HashMap::new()
                } else {
                    self.count_unacked(layout, &values).await?
                });
                if let Some(arming) = arming {
                    self.unacked_armed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(layout.clone(), (counts.clone(), arming.armed));
                }
                Ok::<_, Error>(counts)
            })
            .await
            .map_err(|e| (*e).clone())
    }

    /// The routed `unacked` counts of the last armed read, if Redis has not said the hash changed
    /// since.
    fn quiet_unacked(&self, layout: &RedisLayout) -> Option<Arc<HashMap<String, u64>>> {
        let armed = self.unacked_armed.lock().unwrap_or_else(|e| e.into_inner());
        armed
            .get(layout)
            .filter(|(_, armed)| armed.quiet())
            .map(|(counts, _)| counts.clone())
    }

    /// Routes each unacked entry to its queue(s) through the exchanges' binding tables, as kombu
    /// does when it restores them, and counts entries per queue.
    async fn count_unacked(
        &self,
        layout: &RedisLayout,
        unacked: &[Vec<u8>],
    ) -> Result<HashMap<String, u64>> {
        let routed: Vec<(String, String)> =
            unacked.iter().filter_map(|v| unacked_routing(v)).collect();
        let tables = self
            .tables(layout, routed.iter().map(|(ex, _)| ex.as_str()))
            .await?;
        let mut counts: HashMap<String, u64> = HashMap::new();
        for (ex, rk) in &routed {
            for queue in route(ex, rk, &tables) {
                *counts.entry(queue.to_string()).or_default() += 1;
            }
        }
        Ok(counts)
    }
}
