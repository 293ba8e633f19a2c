//! What a reading returns (`Depth`, per queue and per source) and the trait every backend
//! implements: a depth reading, the same reading skipped when a cheap look finds nothing (what
//! the idle push streams poll), the same again with the set armed for change notifications, and
//! a worker census.

use std::time::Duration;

use async_trait::async_trait;

use super::armed::{Armed, ModeSink};
use super::census::Census;
use crate::error::Result;

/// Ready messages in one list or queue (for Redis: one priority step).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ReadyPart {
    /// Where they wait: a Redis key, shown printable.
    pub source: String,
    /// The priority step the source holds, when the broker splits queues by priority.
    pub priority: Option<u8>,
    pub count: u64,
}

/// The reading of one queue.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct QueueDepth {
    pub queue: String,
    pub ready: Vec<ReadyPart>,
    /// Delivered, not yet acknowledged; 0 when the query did not ask for it.
    pub in_flight: u64,
    /// Running and already acknowledged, by the worker running each (one entry per task);
    /// empty when the query did not ask for it.
    pub running_workers: Vec<String>,
}

impl QueueDepth {
    /// Ready messages over all parts.
    pub fn ready_total(&self) -> u64 {
        self.ready.iter().map(|p| p.count).sum()
    }

    /// Running tasks that were already acknowledged.
    pub fn running(&self) -> u64 {
        self.running_workers.len() as u64
    }

    /// What this queue adds to the depth.
    pub fn total(&self) -> u64 {
        self.ready_total() + self.in_flight + self.running()
    }
}

/// One depth reading over every queue of a query.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Depth {
    pub queues: Vec<QueueDepth>,
    /// Running, acknowledged tasks whose queue could not be resolved (exchange and routing key
    /// match no binding, or a `headers` exchange): counted nowhere, shown by `probe`. One line
    /// per task; empty when the query did not count running tasks.
    pub unresolved: Vec<String>,
    /// For a `;`-separated failover list: the host that answered, as a URL for people (its
    /// password `***`); `None` for a single host.
    pub answered_by: Option<String>,
}

impl Depth {
    /// Nothing ready and nothing in flight in any of `queues`.
    pub fn zero(queues: &[String]) -> Self {
        Depth {
            queues: queues
                .iter()
                .map(|q| QueueDepth {
                    queue: q.clone(),
                    ready: Vec::new(),
                    in_flight: 0,
                    running_workers: Vec::new(),
                })
                .collect(),
            unresolved: Vec::new(),
            answered_by: None,
        }
    }

    /// The number reported to KEDA.
    pub fn total(&self) -> u64 {
        self.queues.iter().map(QueueDepth::total).sum()
    }
}

/// A broker backend: one client per target, shared by every trigger on it. Implementations
/// hold their own connection and reconnect by themselves; the caller bounds the time each call
/// may take.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// The trigger's options on this backend (key layout, management API, queue name prefix).
    type Layout: Send + Sync;

    /// Reads the depth of `queues`; `in_flight`: also the delivered, unacknowledged tasks.
    async fn depth(
        &self,
        layout: &Self::Layout,
        queues: &[String],
        in_flight: bool,
    ) -> Result<Depth>;

    /// The same reading as [`Broker::depth`], but `Ok(None)` (nothing ready, nothing in flight)
    /// when a cheaper look than the full reading shows the queues empty: what the push streams
    /// poll while a set is idle. Backends without a cheaper look read the depth.
    async fn depth_if_any(
        &self,
        layout: &Self::Layout,
        queues: &[String],
        in_flight: bool,
    ) -> Result<Option<Depth>> {
        let depth = self.depth(layout, queues, in_flight).await?;
        Ok((depth.total() > 0).then_some(depth))
    }

    /// [`Broker::depth_if_any`], with the set armed on the broker first when the backend can
    /// notify changes: the [`Armed`] handle then wakes the caller when the set's sources are
    /// written, so it need not poll. `None` where the backend or this broker cannot notify (the
    /// caller polls). The default arms nothing.
    async fn depth_armed(
        &self,
        layout: &Self::Layout,
        queues: &[String],
        in_flight: bool,
    ) -> Result<(Option<Depth>, Option<Armed>)> {
        Ok((self.depth_if_any(layout, queues, in_flight).await?, None))
    }

    /// The reading when the ready sources are known to be empty (an armed set that nothing
    /// wrote since its arming read found them empty): only what is not armed is read (on Redis
    /// the `unacked` share; the ready lists are not touched). `None` if that is empty too. The
    /// default reads everything, as [`Broker::depth_if_any`].
    async fn depth_ready_empty(
        &self,
        layout: &Self::Layout,
        queues: &[String],
        in_flight: bool,
    ) -> Result<Option<Depth>> {
        self.depth_if_any(layout, queues, in_flight).await
    }

    /// Asks the workers what they are running (Celery remote control), collecting replies for
    /// up to `window`. `None` when the broker has no worker remote control (SQS). No worker
    /// answering is an empty census, not an error.
    async fn census(&self, layout: &Self::Layout, window: Duration) -> Result<Option<Census>>;
}

/// Settings every backend client is built with.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Connect and response timeout for broker I/O (the RPC deadline).
    pub timeout: Duration,
    /// Change notifications for idle sets, where the backend has them (Redis).
    pub notify: NotifySettings,
}

/// Change notifications for idle sets ([`Broker::depth_armed`]).
#[derive(Clone, Debug)]
pub struct NotifySettings {
    /// Whether to ask the server for them at all (Redis `CLIENT TRACKING`).
    pub enabled: bool,
    /// How often one safety read per broker looks at every armed set's sources at once, bounding
    /// what a lost notification can cost.
    pub safety_interval: Duration,
    /// Told which mode each broker client is in.
    pub modes: ModeSink,
}

impl Default for NotifySettings {
    fn default() -> Self {
        NotifySettings {
            enabled: true,
            safety_interval: DEFAULT_SAFETY_INTERVAL,
            modes: ModeSink::none(),
        }
    }
}

/// Default [`NotifySettings::safety_interval`].
pub const DEFAULT_SAFETY_INTERVAL: Duration = Duration::from_secs(30);
