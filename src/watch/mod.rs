//! Watched queues: the queue sets of the watch list read on a fixed interval and exported as
//! gauges per broker, queue and state, for dashboards, alerts and an HPA through Prometheus
//! Adapter. A reading a trigger made since the previous tick is exported instead of a new one.

mod list;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use list::{parse, Watched, DEFAULT_BROKER_LABEL, WATCH_FLAG};

use crate::scaler::Core;

/// Default time between two readings of a watched set (Prometheus' default scrape interval is
/// 15 s to 1 min; the HPA syncs every 15 s).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);

/// Reads every watched set each `interval` until `token` is cancelled, and exports each
/// reading (or its failure) into the core's metrics. Sets are read concurrently, each within
/// the core's deadline, so a broker that does not answer holds up no other.
pub async fn run(
    core: Arc<Core>,
    watched: Vec<Watched>,
    interval: Duration,
    token: CancellationToken,
) {
    if watched.is_empty() {
        return;
    }
    for w in &watched {
        core.share_readings(&w.query);
    }
    tracing::info!(
        sets = watched.len(),
        queues = watched.iter().map(|w| w.queues.len()).sum::<usize>(),
        interval = ?interval,
        "Watching queues"
    );
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Readings made after this instant are new to the watch list: its own end before it is set.
    let mut since = Instant::now();
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let readings = watched.iter().map(|w| {
            let core = &core;
            async move {
                let result = core.read_shared(&w.query, since).await;
                core.metrics().watched(&w.broker, &w.queues, result.as_ref().ok());
                if let Err(e) = result {
                    // The reading itself logged the broker's error; this names the watched set.
                    tracing::debug!(broker = %w.broker, error_kind = e.kind(), "Watched queues not read");
                }
            }
        });
        tokio::select! {
            _ = token.cancelled() => return,
            _ = futures::future::join_all(readings) => {}
        }
        since = Instant::now();
    }
}
