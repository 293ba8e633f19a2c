//! The broker abstraction: one small trait, the query and reading types, and the registry that
//! keeps one client (connection pool) per distinct broker.

pub mod census;
pub mod rabbitmq;
pub mod redis;
pub mod sqs;
pub mod url;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

pub use self::url::BrokerTarget;
use crate::error::Result;
use redis::RedisLayout;

/// What one depth reading asks of a broker. Equal queries can share one reading.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct DepthQuery {
    /// Which broker to ask.
    pub target: BrokerTarget,
    /// Celery queue names; the depth is the sum over them.
    pub queues: Vec<String>,
    /// Count delivered but unacknowledged tasks (reserved, ETA, `acks_late` running).
    pub in_flight: bool,
    /// Count running tasks that were already acknowledged (from the worker census).
    pub running: bool,
    /// Backend-specific key layout.
    pub layout: Layout,
}

/// Backend-specific options of a query, taken from the trigger metadata.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Layout {
    /// kombu's Redis transport options.
    Redis(RedisLayout),
    /// RabbitMQ: where the management API is.
    RabbitMq(rabbitmq::RabbitLayout),
    /// SQS: kombu's queue name prefix.
    Sqs(sqs::SqsLayout),
}

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
}

impl Depth {
    /// The number reported to KEDA.
    pub fn total(&self) -> u64 {
        self.queues.iter().map(QueueDepth::total).sum()
    }
}

/// A broker backend. Implementations hold their own connection and reconnect by themselves.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Reads the depth of `query.queues`. The caller bounds the time it may take.
    async fn depth(&self, query: &DepthQuery) -> Result<Depth>;

    /// Asks the workers what they are running (Celery remote control), collecting replies for
    /// up to `window`. `None` when the broker has no worker remote control (SQS). No worker
    /// answering is an empty census, not an error.
    async fn census(&self, _layout: &Layout, _window: Duration) -> Result<Option<census::Census>> {
        Ok(None)
    }
}

/// Settings every backend client is built with.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Connect and response timeout for broker I/O (the RPC deadline).
    pub timeout: Duration,
}

/// One client per distinct [`BrokerTarget`], created on first use (creation does no I/O) and
/// shared by every trigger that names the same broker.
pub struct Registry {
    settings: ClientSettings,
    clients: Mutex<HashMap<BrokerTarget, Arc<dyn Broker>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new(settings: ClientSettings) -> Self {
        Registry {
            settings,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client for `target`, created if it does not exist yet.
    pub fn client(&self, target: &BrokerTarget) -> Result<Arc<dyn Broker>> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(target) {
            return Ok(client.clone());
        }
        let client: Arc<dyn Broker> = match target {
            BrokerTarget::Redis(t) => Arc::new(redis::RedisBroker::new(t.clone(), &self.settings)?),
            BrokerTarget::RabbitMq(t) => {
                Arc::new(rabbitmq::RabbitBroker::new(t.clone(), &self.settings)?)
            }
            BrokerTarget::Sqs(t) => Arc::new(sqs::SqsBroker::new(t.clone(), &self.settings)?),
        };
        clients.insert(target.clone(), client.clone());
        Ok(client)
    }

    /// How many distinct broker clients exist.
    pub fn len(&self) -> usize {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no client exists yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
