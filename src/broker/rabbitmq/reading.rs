//! The RabbitMQ depth reading: ready counts over AMQP, one queue after the other, beside the
//! in-flight counts from the management API. An idle poll looks with passive declares alone (no
//! management API) and reads in full only when a queue has messages or a consumer.

use std::time::Duration;

use async_trait::async_trait;

use super::amqp::RabbitBroker;
use super::target::RabbitLayout;
use crate::broker::census::Census;
use crate::broker::failover::did_not_answer;
use crate::broker::reading::{Broker, Depth, QueueDepth, ReadyPart};
use crate::error::{Error, Result};

#[async_trait]
impl Broker for RabbitBroker {
    type Layout = RabbitLayout;

    async fn census(&self, layout: &RabbitLayout, window: Duration) -> Result<Option<Census>> {
        self.inspect_active(layout, window).await.map(Some)
    }

    async fn depth_if_any(
        &self,
        layout: &RabbitLayout,
        queues: &[String],
        in_flight: bool,
    ) -> Result<Option<Depth>> {
        let found = self
            .on_a_live_connection(|| self.anything_in(queues, in_flight))
            .await?;
        if !found {
            return Ok(None);
        }
        self.depth(layout, queues, in_flight).await.map(Some)
    }

    async fn depth(
        &self,
        layout: &RabbitLayout,
        queues: &[String],
        in_flight: bool,
    ) -> Result<Depth> {
        self.on_a_live_connection(|| self.read_depth(layout, queues, in_flight))
            .await
    }
}

impl RabbitBroker {
    /// Runs `read`. On a failover list, a connection that was open before it and turns out dead
    /// (its host went away since) does not fail it: the connection is dropped, and `read` runs
    /// once more on a new connection to the first host that answers.
    async fn on_a_live_connection<T, F, Fut>(&self, read: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let cached = self.target.hosts.len() > 1 && self.connected().await;
        match read().await {
            Err(e) if cached && did_not_answer(&e) => {
                self.forget_connection().await;
                read().await
            }
            other => other,
        }
    }

    /// The idle look: one passive `queue.declare` per queue, no management API. A queue with no
    /// ready message and no consumer has nothing in flight either (only a consumer holds
    /// unacknowledged deliveries), so the full reading runs only when a queue has messages or,
    /// counting in-flight tasks, a consumer.
    async fn anything_in(&self, queues: &[String], in_flight: bool) -> Result<bool> {
        self.channel_in(false).await?;
        for q in queues {
            let (ready, consumers) = self.declare(q).await?;
            if ready > 0 || (in_flight && consumers > 0) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn read_depth(
        &self,
        layout: &RabbitLayout,
        queues: &[String],
        in_flight: bool,
    ) -> Result<Depth> {
        // The connection first: its host (of a failover list) decides which management API a
        // derived one is, and an AMQP failure is the reading's error.
        self.channel_in(false).await?;
        let management = self.management(layout)?;
        // One after the other: a missing queue closes the channel, and its NOT_FOUND must be the
        // error reported, not a closed-channel error of a concurrent declare.
        let ready = async {
            let mut counts = Vec::with_capacity(queues.len());
            for q in queues {
                counts.push(self.ready(q).await?);
            }
            Ok::<_, Error>(counts)
        };
        let unacked = async {
            if in_flight {
                futures::future::try_join_all(queues.iter().map(|q| self.unacked(management, q)))
                    .await
            } else {
                Ok(vec![0; queues.len()])
            }
        };
        // Both run to the end, and the AMQP error wins: the same outage must give the same code
        // (the management API of a node whose AMQP port is down may answer 401 or not at all).
        let (ready, unacked) = futures::future::join(ready, unacked).await;
        let (ready, unacked) = (ready?, unacked?);
        Ok(Depth {
            queues: queues
                .iter()
                .zip(ready.into_iter().zip(unacked))
                .map(|(queue, (ready, in_flight))| QueueDepth {
                    queue: queue.clone(),
                    ready: vec![ReadyPart {
                        source: format!("{queue} (messages ready)"),
                        priority: None,
                        count: ready,
                    }],
                    in_flight,
                    running_workers: Vec::new(),
                })
                .collect(),
            unresolved: Vec::new(),
            answered_by: self.answered_by(),
        })
    }
}
