//! The scaler core shared by the gRPC service, the stream hub and `probe`: turns metadata into a
//! trigger and reads its depth within the deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::broker::{Armed, ClientSettings, Depth, DepthQuery, ModeSink, NotifySettings, Registry};
use crate::broker_env::BrokerEnv;
use crate::census::{CensusSettings, Censuses};
use crate::error::{Error, Result};
use crate::metadata::{self, Trigger};
use crate::metrics::Metrics;
use crate::tenancy::Tenancy;

/// Settings of the core.
#[derive(Clone, Debug)]
pub struct CoreSettings {
    /// Upper bound on one depth reading, broker connection included.
    pub deadline: Duration,
    /// How long a successful reading answers identical requests (zero: only requests that
    /// arrive while a reading is under way share it).
    pub result_window: Duration,
    /// The worker census behind `scaleOnRunning`.
    pub census: CensusSettings,
    /// Bounds on trigger metadata.
    pub limits: metadata::Limits,
    /// Named brokers per namespace, host allowlist, inline URLs, the scaler's AWS identity.
    pub tenancy: Tenancy,
    /// Change notifications for idle sets (Redis `CLIENT TRACKING`); the core reports each
    /// broker's mode into its metrics, whatever `modes` says.
    pub notify: NotifySettings,
}

impl CoreSettings {
    /// `deadline` with the default result window.
    pub fn with_deadline(deadline: Duration) -> Self {
        CoreSettings {
            deadline,
            result_window: DEFAULT_RESULT_WINDOW,
            census: CensusSettings::for_deadline(deadline),
            limits: metadata::Limits::default(),
            tenancy: Tenancy::default(),
            notify: NotifySettings::default(),
        }
    }
}

/// Default result window: well under KEDA's intervals (15 s HPA sync, 30 s polling), long
/// enough to absorb the GetMetricSpec/GetMetrics/IsActive burst of one KEDA cycle and the
/// identical polls of many ScaledObjects.
pub const DEFAULT_RESULT_WINDOW: Duration = Duration::from_millis(250);

/// Most distinct queries kept in the result window at once.
const MAX_CACHED_QUERIES: u64 = 100_000;

/// How a reading reaches the broker.
enum Mode<'a> {
    /// Every source read.
    Full,
    /// The cheap look first (the full reading only if it finds something), the set armed for
    /// change notifications into the given slot where the broker gives them.
    Armed(&'a mut Option<Armed>),
    /// The ready sources known empty: only the rest is read.
    ReadyEmpty,
}

/// Parses triggers and reads depths. Cheap to share behind an `Arc`.
pub struct Core {
    env: BrokerEnv,
    limits: metadata::Limits,
    tenancy: Tenancy,
    registry: Arc<Registry>,
    deadline: Duration,
    metrics: Arc<Metrics>,
    /// Single flight (concurrent identical reads share one broker round trip) and the result
    /// window (a success answers identical reads for a short while). Errors are never kept.
    recent: moka::future::Cache<DepthQuery, Depth>,
    /// The latest successful reading of each watched query (`None` after a failed one), kept
    /// so the watch list uses what a trigger read within its interval.
    shared: Mutex<HashMap<DepthQuery, Option<(Instant, Depth)>>>,
    censuses: Arc<Censuses>,
}

impl Core {
    /// A core with no broker clients yet.
    pub fn new(env: BrokerEnv, settings: CoreSettings, metrics: Arc<Metrics>) -> Self {
        let modes = {
            let metrics = metrics.clone();
            ModeSink::new(move |mode, delta| metrics.push_mode(mode, delta))
        };
        let registry = Arc::new(Registry::new(ClientSettings {
            timeout: settings.deadline,
            notify: NotifySettings {
                modes,
                ..settings.notify
            },
        }));
        Core {
            env,
            limits: settings.limits,
            tenancy: settings.tenancy,
            censuses: Censuses::new(settings.census, registry.clone(), metrics.clone()),
            registry,
            deadline: settings.deadline,
            metrics,
            recent: moka::future::Cache::builder()
                .max_capacity(MAX_CACHED_QUERIES)
                .time_to_live(settings.result_window.max(Duration::from_nanos(1)))
                .build(),
            shared: Mutex::new(HashMap::new()),
        }
    }

    /// Parses metadata (inline URLs refused first, if the tenancy settings say so), then has the
    /// tenancy settings admit the trigger from `namespace`: no I/O at all (no broker, no DNS),
    /// so `GetMetricSpec` can answer during any outage. A host that only an address range admits
    /// is left in `Trigger::unresolved` for [`Core::admit`].
    pub fn trigger(&self, meta: &HashMap<String, String>, namespace: &str) -> Result<Trigger> {
        let inline = self.tenancy.inline_urls(namespace);
        let result = metadata::parse_for(meta, &self.env, &self.limits, inline)
            .and_then(|trigger| self.tenancy.admit(trigger, namespace, &self.env));
        self.count_refusal(result)
    }

    /// [`Core::trigger`], then the hosts that only an address range admits are resolved within
    /// the deadline, checked, and replaced by the checked address: what every reading uses.
    pub async fn admit(&self, meta: &HashMap<String, String>, namespace: &str) -> Result<Trigger> {
        let mut trigger = self.trigger(meta, namespace)?;
        if trigger.unresolved.is_empty() {
            return Ok(trigger);
        }
        let result = self
            .tenancy
            .resolve(&mut trigger, namespace, self.deadline)
            .await
            .map(|()| trigger);
        self.count_refusal(result)
    }

    fn count_refusal<T>(&self, result: Result<T>) -> Result<T> {
        // Not logged with its message: that quotes metadata values (hosts), which logs never do.
        if let Err(Error::Refused { reason, .. }) = &result {
            self.metrics.refusal(*reason);
            tracing::debug!(reason = reason.label(), "Trigger refused");
        }
        result
    }

    /// The tenancy settings this core applies.
    pub fn tenancy(&self) -> &Tenancy {
        &self.tenancy
    }

    /// The metrics this core records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Number of distinct broker clients (connections or pools) created so far.
    pub fn broker_clients(&self) -> usize {
        self.registry.len()
    }

    /// Reads the depth for `query`: a reading of the last result window, or the one already
    /// under way for an identical query, or a new one. Fails with `DEADLINE_EXCEEDED` when the
    /// broker does not answer within the deadline; never returns a depth for a failed reading.
    pub async fn read(&self, query: &DepthQuery) -> Result<Depth> {
        self.recent
            .try_get_with_by_ref(query, self.read_broker(query, Mode::Full))
            .await
            .map_err(|e| (*e).clone())
    }

    /// Keeps the latest reading of `query`, whoever makes it, for [`Core::read_shared`].
    pub fn share_readings(&self, query: &DepthQuery) {
        self.shared_readings().entry(query.clone()).or_insert(None);
    }

    /// A reading of `query` made after `since`: the latest one (a trigger's, a stream poll's)
    /// if it succeeded after `since` and nothing failed since, otherwise a new one as
    /// [`Core::read`] makes it. `query` must have been passed to [`Core::share_readings`]
    /// first, or every call reads.
    pub async fn read_shared(&self, query: &DepthQuery, since: Instant) -> Result<Depth> {
        if let Some(Some((at, depth))) = self.shared_readings().get(query) {
            if *at > since {
                return Ok(depth.clone());
            }
        }
        self.read(query).await
    }

    fn shared_readings(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<DepthQuery, Option<(Instant, Depth)>>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the broker now (still sharing a reading under way), and refreshes the result
    /// window with the answer. Used by the stream polls, which must not see older readings.
    pub async fn read_fresh(&self, query: &DepthQuery) -> Result<Depth> {
        self.recent.invalidate(query).await;
        self.read(query).await
    }

    /// [`Core::read`] for a query whose ready sources a stream poll knows to be empty (armed, and
    /// nothing written since): only the rest is read (on Redis the `unacked` share, itself
    /// answered from its armed read), plus the census. Shares the result window with `read`.
    pub async fn read_ready_empty(&self, query: &DepthQuery) -> Result<Depth> {
        self.recent
            .try_get_with_by_ref(query, self.read_broker(query, Mode::ReadyEmpty))
            .await
            .map_err(|e| (*e).clone())
    }

    /// Reads the broker now, looking first as cheaply as the backend allows, with the set armed
    /// for change notifications where the broker gives them
    /// ([`crate::broker::Broker::depth_armed`]): the same depth as a full reading, for the stream
    /// polls of inactive sets. Refreshes the result window with the answer, as `read_fresh` does.
    pub async fn read_armed(&self, query: &DepthQuery) -> Result<(Depth, Option<Armed>)> {
        let mut armed = None;
        let depth = self.read_broker(query, Mode::Armed(&mut armed)).await?;
        // The window answers with this reading from now on: a push is followed at once by KEDA's
        // own `IsActive`, which must not get an older reading of the window.
        self.recent.insert(query.clone(), depth.clone()).await;
        Ok((depth, armed))
    }

    /// Stops the worker census loops, waiting for censuses under way (bounded by their
    /// deadline) so they leave nothing on the brokers.
    pub async fn stop_censuses(&self) {
        self.censuses.stop().await;
    }

    /// Number of worker census loops running.
    pub fn census_loops(&self) -> usize {
        self.censuses.loops()
    }

    /// The broker's depth as `mode` says, plus (with `scaleOnRunning`) the acknowledged running
    /// tasks of the latest worker census.
    async fn depth_with_running(&self, query: &DepthQuery, mode: Mode<'_>) -> Result<Depth> {
        let broker = async {
            let depth = match mode {
                Mode::Full => return self.registry.depth(query).await,
                Mode::Armed(armed) => {
                    let (depth, handle) = self.registry.depth_armed(query).await?;
                    *armed = handle;
                    depth
                }
                Mode::ReadyEmpty => self.registry.depth_ready_empty(query).await?,
            };
            Ok(depth.unwrap_or_else(|| Depth::zero(&query.queues)))
        };
        if !query.running || !query.backend.has_remote_control() {
            return broker.await;
        }
        let census = self.censuses.latest(&query.backend);
        let (mut depth, census) = futures::future::try_join(broker, census).await?;
        if let Some(census) = census {
            // A task the broker could have routed to several of the query's queues is counted
            // once, under the first.
            let mut counted = std::collections::HashSet::new();
            for q in &mut depth.queues {
                q.running_workers = census
                    .acknowledged_in(&q.queue)
                    .filter(|t| counted.insert((t.worker.as_str(), t.id.as_str())))
                    .map(|t| t.worker.clone())
                    .collect();
            }
            depth.unresolved = census
                .unresolved()
                .map(|t| {
                    format!(
                        "task {} on {}: exchange `{}`, routing key `{}` match no queue",
                        t.id, t.worker, t.exchange, t.routing_key
                    )
                })
                .collect();
        }
        Ok(depth)
    }

    /// One reading from the broker, bounded by the deadline, recorded in the metrics.
    async fn read_broker(&self, query: &DepthQuery, mode: Mode<'_>) -> Result<Depth> {
        let kind = query.backend.kind();
        let started = Instant::now();
        let reading = self.depth_with_running(query, mode);
        let result = match tokio::time::timeout(self.deadline, reading).await {
            Ok(r) => r,
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "{kind} broker {} did not answer within {:?}",
                query.backend.redacted(),
                self.deadline
            ))),
        };
        {
            let mut shared = self.shared_readings();
            // Without watched queries the map is empty, and a lookup hashes nothing.
            if let Some(slot) = shared.get_mut(query) {
                *slot = result.as_ref().ok().map(|d| (Instant::now(), d.clone()));
            }
        }
        match &result {
            Ok(depth) => self
                .metrics
                .reading(kind, started.elapsed().as_secs_f64(), depth),
            // A master a Sentinel reported, refused by the host allowlist before any connection:
            // a refusal, not a broker error.
            Err(Error::Refused { reason, .. }) => {
                self.metrics.refusal(*reason);
                tracing::debug!(reason = reason.label(), broker = kind, "Reading refused");
            }
            Err(e) => {
                self.metrics.broker_error(kind, e.kind());
                tracing::warn!(broker = kind, error_kind = e.kind(), error = %e, "Depth reading failed");
            }
        }
        result
    }
}
