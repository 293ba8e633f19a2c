//! The worker census behind `scaleOnRunning`: one background `inspect active` loop per broker
//! (and key layout), shared by every trigger on it, started on first use and stopped when no
//! reading has asked for it for a while. Readings use the latest census and never wait for one
//! past their deadline; a reading that finds the latest census failed asks for a new one at once
//! and uses that, so readings recover as soon as the broker does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::census::Census;
use crate::broker::{Backend, Registry};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// How the census runs.
#[derive(Clone, Copy, Debug)]
pub struct CensusSettings {
    /// Time between two broadcasts.
    pub interval: Duration,
    /// How long replies are collected after a broadcast (Redis stops early when every
    /// subscriber answered).
    pub window: Duration,
    /// Upper bound on one census, broker I/O included.
    pub deadline: Duration,
}

impl Default for CensusSettings {
    fn default() -> Self {
        CensusSettings {
            interval: Duration::from_secs(2),
            window: Duration::from_secs(1),
            deadline: Duration::from_millis(2500),
        }
    }
}

impl CensusSettings {
    /// The default reply window for a reading deadline: 1 s, or 40% of the deadline if that is
    /// less. A census waits its whole window (RabbitMQ), inside the reading's deadline.
    pub fn default_window(deadline: Duration) -> Duration {
        Duration::from_secs(1).min(deadline * 2 / 5)
    }

    /// Default interval and window for readings bounded by `deadline`.
    pub fn for_deadline(deadline: Duration) -> Self {
        CensusSettings {
            window: Self::default_window(deadline),
            deadline,
            ..CensusSettings::default()
        }
    }

    /// The oldest census a reading accepts: a loop that has not completed one for this long is
    /// failing, and the reading fails with it rather than use stale numbers.
    pub fn max_age(&self) -> Duration {
        self.interval * 2 + self.window + self.deadline
    }

    /// A loop nobody read for this long stops.
    fn idle(&self) -> Duration {
        (self.interval * 30).max(Duration::from_secs(60))
    }
}

/// One completed census (or its failure) and when it completed.
#[derive(Clone)]
struct Snapshot {
    at: Instant,
    result: Result<Option<Arc<Census>>>,
}

struct Entry {
    rx: watch::Receiver<Option<Snapshot>>,
    last_used: Mutex<Instant>,
    /// Starts the next census now instead of after the interval: a reading found the last one
    /// failed (the broker may be back: the first reading after an outage must not fail on the
    /// outage's census).
    retry: tokio::sync::Notify,
}

/// The running census loops.
pub struct Censuses {
    settings: CensusSettings,
    /// The broker clients the censuses ask through.
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    entries: Mutex<HashMap<Backend, Arc<Entry>>>,
    /// Cancelled on shutdown: loops start no new census.
    stop: CancellationToken,
    /// Censuses under way: shutdown waits for them, so that what they bound on the broker is
    /// removed before the process exits.
    busy: watch::Sender<usize>,
}

impl Censuses {
    pub fn new(
        settings: CensusSettings,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Censuses {
            settings,
            registry,
            metrics,
            entries: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            busy: watch::Sender::new(0),
        })
    }

    /// Stops every loop, and waits (at most one census deadline) for the censuses under way to
    /// end, so each one removes its reply binding from the broker.
    pub async fn stop(&self) {
        self.stop.cancel();
        let mut busy = self.busy.subscribe();
        let _ = tokio::time::timeout(self.settings.deadline, busy.wait_for(|n| *n == 0)).await;
    }

    /// Number of running census loops.
    pub fn loops(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The latest census of `backend` (started now if none runs), waiting for the first one.
    /// `Ok(None)`: the broker has no worker remote control.
    pub async fn latest(self: &Arc<Self>, backend: &Backend) -> Result<Option<Arc<Census>>> {
        let entry = self.entry(backend);
        *entry.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let mut rx = entry.rx.clone();
        let stopped = || Error::Unavailable("the worker census stopped".into());
        let mut snapshot = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| stopped())?
            .clone()
            .ok_or_else(stopped)?;
        if snapshot.result.is_err() {
            // Ask again now and wait for that answer (the reading's deadline bounds the wait).
            entry.retry.notify_one();
            rx.changed().await.map_err(|_| stopped())?;
            snapshot = rx.borrow_and_update().clone().ok_or_else(stopped)?;
        }
        let age = snapshot.at.elapsed();
        self.metrics.census_age(backend.kind(), age.as_secs_f64());
        if age > self.settings.max_age() {
            return Err(Error::Unavailable(format!(
                "the worker census of {} is {:.1} s old (limit {:.1} s): workers cannot be asked what they run",
                backend.redacted(),
                age.as_secs_f64(),
                self.settings.max_age().as_secs_f64()
            )));
        }
        snapshot.result
    }

    fn entry(self: &Arc<Self>, backend: &Backend) -> Arc<Entry> {
        let key = backend.clone();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get(&key) {
            return e.clone();
        }
        let (tx, rx) = watch::channel(None);
        let entry = Arc::new(Entry {
            rx,
            last_used: Mutex::new(Instant::now()),
            retry: tokio::sync::Notify::new(),
        });
        entries.insert(key.clone(), entry.clone());
        let this = self.clone();
        let e = entry.clone();
        tokio::spawn(async move { this.run(key, e, tx).await });
        entry
    }

    async fn run(
        self: Arc<Self>,
        key: Backend,
        entry: Arc<Entry>,
        tx: watch::Sender<Option<Snapshot>>,
    ) {
        let kind = key.kind();
        loop {
            if self.stop.is_cancelled() {
                self.entries
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                break;
            }
            self.busy.send_modify(|n| *n += 1);
            let result = match tokio::time::timeout(
                self.settings.deadline,
                self.registry.census(&key, self.settings.window),
            )
            .await
            {
                Ok(r) => r.map(|c| c.map(Arc::new)),
                Err(_) => Err(Error::DeadlineExceeded(format!(
                    "the worker census of {} did not complete within {:?}",
                    key.redacted(),
                    self.settings.deadline
                ))),
            };
            self.busy.send_modify(|n| *n = n.saturating_sub(1));
            if let Ok(Some(census)) = &result {
                let unresolved = census.unresolved().count() as u64;
                if unresolved > 0 {
                    self.metrics.census_unresolved(kind, unresolved);
                    tracing::warn!(
                        broker = kind,
                        tasks = unresolved,
                        "Running tasks not attributed to any queue (see probe)"
                    );
                }
            }
            if let Err(e) = &result {
                self.metrics.census_failure(kind);
                match e {
                    // Not logged with its message, which quotes hosts (a refused
                    // Sentinel-reported master); the reading that waits for this census counts
                    // the refusal.
                    Error::Refused { reason, .. } => tracing::debug!(
                        broker = kind,
                        reason = reason.label(),
                        "Worker census refused"
                    ),
                    e => {
                        tracing::warn!(broker = kind, error_kind = e.kind(), error = %e, "Worker census failed")
                    }
                }
            }
            tx.send_replace(Some(Snapshot {
                at: Instant::now(),
                result,
            }));
            tokio::select! {
                _ = tokio::time::sleep(self.settings.interval) => {}
                _ = entry.retry.notified() => {}
                _ = self.stop.cancelled() => {}
            }
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let idle = entry
                .last_used
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed();
            if idle > self.settings.idle() {
                entries.remove(&key);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_window_fits_inside_the_deadline() {
        assert_eq!(
            CensusSettings::default_window(Duration::from_millis(2500)),
            Duration::from_secs(1)
        );
        let probe = CensusSettings::for_deadline(Duration::from_secs(1));
        assert_eq!(probe.window, Duration::from_millis(400));
        assert_eq!(probe.deadline, Duration::from_secs(1));
    }
}
