//! Shared polls for `StreamIsActive`: one background poll per distinct depth query, whatever the
//! number of streams watching it. The poll stops when its last watcher leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::broker::{Backend, DepthQuery};
use crate::error::Error;
use crate::scaler::Core;

/// The latest reading of a shared poll: `None` until the first one completes.
pub type Reading = Option<Result<u64, Error>>;

/// How often shared polls read, per broker kind.
#[derive(Clone, Copy, Debug)]
pub struct PollIntervals {
    /// Redis and RabbitMQ: cheap reads, so a short interval for fast activation.
    pub default: Duration,
    /// SQS: every `GetQueueAttributes` is a billed request.
    pub sqs: Duration,
}

/// Runs and shares the polls.
pub struct Hub {
    core: Arc<Core>,
    intervals: PollIntervals,
    shutdown: CancellationToken,
    polls: Mutex<HashMap<DepthQuery, Arc<watch::Sender<Reading>>>>,
}

impl Hub {
    /// A hub polling at `intervals`, stopping all polls when `shutdown` is cancelled.
    pub fn new(
        core: Arc<Core>,
        intervals: PollIntervals,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Hub {
            core,
            intervals,
            shutdown,
            polls: Mutex::new(HashMap::new()),
        })
    }

    /// Watches `query`: joins its running poll, or starts one that reads at once.
    pub fn watch(self: &Arc<Self>, query: &DepthQuery) -> watch::Receiver<Reading> {
        let mut polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = polls.get(query) {
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(None);
        let sender = Arc::new(sender);
        polls.insert(query.clone(), sender.clone());
        self.core.metrics().polls().inc();
        let hub = self.clone();
        let query = query.clone();
        tokio::spawn(async move { hub.poll(query, sender).await });
        receiver
    }

    /// Number of running polls.
    pub fn polls(&self) -> usize {
        self.polls.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    async fn poll(self: Arc<Self>, query: DepthQuery, sender: Arc<watch::Sender<Reading>>) {
        let interval = match query.backend {
            Backend::Sqs { .. } => self.intervals.sqs,
            Backend::Redis { .. } | Backend::RabbitMq { .. } => self.intervals.default,
        };
        loop {
            let reading = tokio::select! {
                r = self.core.read_fresh(&query) => r.map(|d| d.total()),
                _ = sender.closed() => Err(Error::Internal(String::new())),
                _ = self.shutdown.cancelled() => break,
            };
            if sender.receiver_count() > 0 {
                sender.send_replace(Some(reading));
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = sender.closed() => {}
                _ = self.shutdown.cancelled() => break,
            }
            // Leave only under the lock, so a watcher joining right now either finds this poll
            // alive (and is counted) or finds it gone and starts a new one.
            let mut polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
            if sender.receiver_count() == 0 {
                polls.remove(&query);
                break;
            }
        }
        let mut polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        if polls.get(&query).is_some_and(|s| Arc::ptr_eq(s, &sender)) {
            polls.remove(&query);
        }
        self.core.metrics().polls().dec();
    }
}
