//! The registry of broker clients: one per distinct target, created on first use (creation does
//! no I/O) and shared by every trigger that names the same broker. Each reading goes to the
//! client of its backend's variant, with that variant's layout.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::armed::Armed;
use super::census::Census;
use super::query::{Backend, DepthQuery};
use super::rabbitmq::{RabbitBroker, RabbitTarget};
use super::reading::{Broker, ClientSettings, Depth};
use super::redis::{RedisBroker, RedisTarget};
use super::sqs::{SqsBroker, SqsTarget};
use crate::error::Result;

/// The clients of one backend, by target.
struct Clients<T, B>(Mutex<HashMap<T, Arc<B>>>);

impl<T: Clone + Eq + Hash, B> Clients<T, B> {
    fn new() -> Self {
        Clients(Mutex::new(HashMap::new()))
    }

    /// The client for `target`, created by `new` if it does not exist yet.
    fn get(&self, target: &T, new: impl FnOnce(T) -> Result<B>) -> Result<Arc<B>> {
        let mut clients = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(target) {
            return Ok(client.clone());
        }
        let client = Arc::new(new(target.clone())?);
        clients.insert(target.clone(), client.clone());
        Ok(client)
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// One client per distinct broker target.
pub struct Registry {
    settings: ClientSettings,
    redis: Clients<RedisTarget, RedisBroker>,
    rabbitmq: Clients<RabbitTarget, RabbitBroker>,
    sqs: Clients<SqsTarget, SqsBroker>,
}

impl Registry {
    /// An empty registry.
    pub fn new(settings: ClientSettings) -> Self {
        Registry {
            settings,
            redis: Clients::new(),
            rabbitmq: Clients::new(),
            sqs: Clients::new(),
        }
    }

    /// Reads the depth `query` asks for, from its broker's client (created if needed).
    pub async fn depth(&self, query: &DepthQuery) -> Result<Depth> {
        let (queues, in_flight) = (&query.queues, query.in_flight);
        match &query.backend {
            Backend::Redis { target, layout } => {
                self.redis_client(target)?
                    .depth(layout, queues, in_flight)
                    .await
            }
            Backend::RabbitMq { target, layout } => {
                self.rabbitmq_client(target)?
                    .depth(layout, queues, in_flight)
                    .await
            }
            Backend::Sqs { target, layout } => {
                self.sqs_client(target)?
                    .depth(layout, queues, in_flight)
                    .await
            }
        }
    }

    /// [`Registry::depth`], or `None` when the backend's cheap look finds the queues empty, with
    /// the set armed for change notifications where the broker gives them
    /// ([`Broker::depth_armed`]).
    pub async fn depth_armed(&self, query: &DepthQuery) -> Result<(Option<Depth>, Option<Armed>)> {
        let (queues, in_flight) = (&query.queues, query.in_flight);
        match &query.backend {
            Backend::Redis { target, layout } => {
                self.redis_client(target)?
                    .depth_armed(layout, queues, in_flight)
                    .await
            }
            Backend::RabbitMq { target, layout } => {
                self.rabbitmq_client(target)?
                    .depth_armed(layout, queues, in_flight)
                    .await
            }
            Backend::Sqs { target, layout } => {
                self.sqs_client(target)?
                    .depth_armed(layout, queues, in_flight)
                    .await
            }
        }
    }

    /// The reading of `query` when its ready sources are known to be empty
    /// ([`Broker::depth_ready_empty`]).
    pub async fn depth_ready_empty(&self, query: &DepthQuery) -> Result<Option<Depth>> {
        let (queues, in_flight) = (&query.queues, query.in_flight);
        match &query.backend {
            Backend::Redis { target, layout } => {
                self.redis_client(target)?
                    .depth_ready_empty(layout, queues, in_flight)
                    .await
            }
            Backend::RabbitMq { target, layout } => {
                self.rabbitmq_client(target)?
                    .depth_ready_empty(layout, queues, in_flight)
                    .await
            }
            Backend::Sqs { target, layout } => {
                self.sqs_client(target)?
                    .depth_ready_empty(layout, queues, in_flight)
                    .await
            }
        }
    }

    /// A worker census on `backend`'s broker, collecting replies for up to `window`.
    pub async fn census(&self, backend: &Backend, window: Duration) -> Result<Option<Census>> {
        match backend {
            Backend::Redis { target, layout } => {
                self.redis_client(target)?.census(layout, window).await
            }
            Backend::RabbitMq { target, layout } => {
                self.rabbitmq_client(target)?.census(layout, window).await
            }
            Backend::Sqs { target, layout } => {
                self.sqs_client(target)?.census(layout, window).await
            }
        }
    }

    fn redis_client(&self, target: &RedisTarget) -> Result<Arc<RedisBroker>> {
        self.redis
            .get(target, |t| RedisBroker::new(t, &self.settings))
    }

    fn rabbitmq_client(&self, target: &RabbitTarget) -> Result<Arc<RabbitBroker>> {
        self.rabbitmq
            .get(target, |t| RabbitBroker::new(t, &self.settings))
    }

    fn sqs_client(&self, target: &SqsTarget) -> Result<Arc<SqsBroker>> {
        self.sqs.get(target, |t| SqsBroker::new(t, &self.settings))
    }

    /// How many distinct broker clients exist.
    pub fn len(&self) -> usize {
        self.redis.len() + self.rabbitmq.len() + self.sqs.len()
    }

    /// Whether no client exists yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
