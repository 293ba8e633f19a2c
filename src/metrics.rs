//! Prometheus metrics served on the admin port. Every label value is bounded: RPC method names,
//! gRPC codes, broker kinds, error kinds, push modes, and the queue names of configured triggers.

use std::sync::Mutex;

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::broker::{Depth, PushMode, QueueDepth};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BrokerLabels {
    broker: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BrokerErrorLabels {
    broker: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PushModeLabels {
    broker: &'static str,
    mode: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    broker: &'static str,
    queue: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchedLabels {
    broker: String,
    queue: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchedUpLabels {
    broker: String,
    queue: String,
}

/// The states a queue's tasks are exported in.
const STATES: [&str; 3] = ["ready", "in_flight", "running"];

/// A queue's tasks in each of [`STATES`].
fn by_state(q: &QueueDepth) -> [(&'static str, i64); 3] {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    [
        (STATES[0], count(q.ready_total())),
        (STATES[1], count(q.in_flight)),
        (STATES[2], count(q.running())),
    ]
}

/// The scaler's metrics and the registry that encodes them.
pub struct Metrics {
    registry: Mutex<Registry>,
    rpcs: Family<RpcLabels, Counter>,
    rpc_seconds: Family<RpcLabels, Histogram>,
    broker_seconds: Family<BrokerLabels, Histogram>,
    broker_errors: Family<BrokerErrorLabels, Counter>,
    queue_depth: Family<QueueLabels, Gauge>,
    streams: Gauge,
    polls: Gauge,
    push_modes: Family<PushModeLabels, Gauge>,
    census_age: Family<BrokerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    census_failures: Family<BrokerLabels, Counter>,
    census_unresolved: Family<BrokerLabels, Counter>,
    tls_reloads: Family<ResultLabels, Counter>,
    tls_handshake_failures: Counter,
    refusals: Family<ReasonLabels, Counter>,
    /// The (broker, queue) pairs exported in `queue_depth`, at most `max_queue_series`.
    queue_series: Mutex<std::collections::HashSet<(&'static str, String)>>,
    max_queue_series: usize,
    queue_series_dropped: Counter,
    watched_tasks: Family<WatchedLabels, Gauge>,
    watched_up: Family<WatchedUpLabels, Gauge>,
}

/// Default bound on exported queue series.
pub const DEFAULT_MAX_QUEUE_SERIES: usize = 1000;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~6.5 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric, with the default bound on queue series.
    pub fn new() -> Self {
        Self::with_max_queue_series(DEFAULT_MAX_QUEUE_SERIES)
    }

    /// Registers every metric; at most `max_queue_series` (broker, queue) pairs get depth gauges.
    pub fn with_max_queue_series(max_queue_series: usize) -> Self {
        let mut registry = Registry::with_prefix("celery_keda");
        let rpcs = Family::<RpcLabels, Counter>::default();
        let rpc_seconds = Family::<RpcLabels, Histogram>::new_with_constructor(latency_histogram);
        let broker_seconds =
            Family::<BrokerLabels, Histogram>::new_with_constructor(latency_histogram);
        let broker_errors = Family::<BrokerErrorLabels, Counter>::default();
        let queue_depth = Family::<QueueLabels, Gauge>::default();
        let streams = Gauge::default();
        let polls = Gauge::default();
        let push_modes = Family::<PushModeLabels, Gauge>::default();
        // Every mode starts at zero, so an alert can watch for polling brokers at once.
        for mode in PushMode::ALL {
            let _ = push_modes.get_or_create(&push_mode_labels(mode));
        }
        let census_age =
            Family::<BrokerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let census_failures = Family::<BrokerLabels, Counter>::default();
        let census_unresolved = Family::<BrokerLabels, Counter>::default();
        // Every broker kind with a census starts at zero, so `rate()` sees its first increase.
        for broker in ["redis", "rabbitmq"] {
            let _ = census_unresolved.get_or_create(&BrokerLabels { broker });
        }
        let tls_reloads = Family::<ResultLabels, Counter>::default();
        let tls_handshake_failures = Counter::default();
        let queue_series_dropped = Counter::default();
        let refusals = Family::<ReasonLabels, Counter>::default();
        // Every reason starts at zero, so an alert can watch the series before the first refusal.
        for reason in crate::error::Refusal::ALL {
            let _ = refusals.get_or_create(&ReasonLabels {
                reason: reason.label(),
            });
        }
        registry.register(
            "refusals",
            "Triggers refused by the tenancy settings before any connection to the refused host, by reason (namespace, inline_url, host, address, ambient_identity); a master reported by an inline trigger's Sentinel is refused at each reading",
            refusals.clone(),
        );
        registry.register(
            "queue_series_dropped",
            "Queue readings not exported in queue_depth because --max-queue-series was reached",
            queue_series_dropped.clone(),
        );
        registry.register(
            "tls_reloads",
            "Certificate file changes seen on the gRPC port, by result (ok, error: the old certificates stay)",
            tls_reloads.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "gRPC connections dropped because the TLS handshake failed or timed out",
            tls_handshake_failures.clone(),
        );
        registry.register(
            "census_age_seconds",
            "Age of the worker census used by the last reading that counted running tasks",
            census_age.clone(),
        );
        registry.register(
            "census_failures",
            "Worker censuses (inspect active broadcasts) that failed, by broker kind",
            census_failures.clone(),
        );
        registry.register(
            "census_unresolved_tasks",
            "Running, acknowledged tasks a worker census found that no queue could be found for (counted nowhere; each census counts them again), by broker kind",
            census_unresolved.clone(),
        );
        registry.register(
            "rpc",
            "gRPC requests answered, by method and status code",
            rpcs.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "Time to answer a gRPC request, by method and status code",
            rpc_seconds.clone(),
        );
        registry.register(
            "broker_read_duration_seconds",
            "Time of one depth reading from a broker, by broker kind",
            broker_seconds.clone(),
        );
        registry.register(
            "broker_errors",
            "Failed depth readings, by broker kind and error kind",
            broker_errors.clone(),
        );
        registry.register(
            "queue_depth",
            "Last depth read per queue and state (ready, in_flight, running)",
            queue_depth.clone(),
        );
        registry.register("streams", "Open StreamIsActive streams", streams.clone());
        registry.register(
            "shared_polls",
            "Background polls shared by StreamIsActive streams (one per distinct query)",
            polls.clone(),
        );
        registry.register(
            "push_brokers",
            "Redis broker clients by how their idle push streams learn of new tasks: mode tracking (the server notifies, CLIENT TRACKING) or polling, with the reason (disabled, resp3_unsupported, no_permission, refused); the log names each polling broker",
            push_modes.clone(),
        );
        let watched_tasks = Family::<WatchedLabels, Gauge>::default();
        let watched_up = Family::<WatchedUpLabels, Gauge>::default();
        registry.register(
            "watched_queue_tasks",
            "Tasks of each queue of the watch list (--watch) by state: ready (waiting in the broker, every priority), in_flight (delivered to a worker, not acknowledged: reserved, or running with acks_late), running (running, already acknowledged); broker is the named broker or default. Absent while the queue's last reading failed",
            watched_tasks.clone(),
        );
        registry.register(
            "watched_queue_up",
            "1 when the last reading of a watched queue succeeded, 0 when it failed (its watched_queue_tasks samples are then removed, never exported as 0)",
            watched_up.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            rpcs,
            rpc_seconds,
            broker_seconds,
            broker_errors,
            queue_depth,
            streams,
            polls,
            push_modes,
            census_age,
            census_failures,
            census_unresolved,
            tls_reloads,
            tls_handshake_failures,
            refusals,
            queue_series: Mutex::new(Default::default()),
            max_queue_series,
            queue_series_dropped,
            watched_tasks,
            watched_up,
        }
    }

    /// Exports one reading of a watched set: every queue's tasks by state and `up` 1, or, for a
    /// failed reading (`None`), `up` 0 and no task samples.
    pub fn watched(&self, broker: &str, queues: &[String], depth: Option<&Depth>) {
        for queue in queues {
            let tasks = |state| WatchedLabels {
                broker: broker.to_string(),
                queue: queue.clone(),
                state,
            };
            let read = depth.and_then(|d| d.queues.iter().find(|q| &q.queue == queue));
            match read {
                Some(q) => {
                    for (state, value) in by_state(q) {
                        self.watched_tasks.get_or_create(&tasks(state)).set(value);
                    }
                }
                None => {
                    for state in STATES {
                        self.watched_tasks.remove(&tasks(state));
                    }
                }
            }
            self.watched_up
                .get_or_create(&WatchedUpLabels {
                    broker: broker.to_string(),
                    queue: queue.clone(),
                })
                .set(i64::from(read.is_some()));
        }
    }

    /// Counts one reload of the TLS files (`ok` or `error`).
    pub fn tls_reload(&self, result: &'static str) {
        self.tls_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Counts one failed TLS handshake.
    pub fn tls_handshake_failure(&self) {
        self.tls_handshake_failures.inc();
    }

    /// Records the age of the census a reading used.
    pub fn census_age(&self, broker: &'static str, seconds: f64) {
        self.census_age
            .get_or_create(&BrokerLabels { broker })
            .set(seconds);
    }

    /// Counts one failed census.
    pub fn census_failure(&self, broker: &'static str) {
        self.census_failures
            .get_or_create(&BrokerLabels { broker })
            .inc();
    }

    /// Counts running tasks a census could not attribute to a queue.
    pub fn census_unresolved(&self, broker: &'static str, tasks: u64) {
        self.census_unresolved
            .get_or_create(&BrokerLabels { broker })
            .inc_by(tasks);
    }

    /// Counts one answered RPC.
    pub fn rpc(&self, method: &'static str, code: tonic::Code, seconds: f64) {
        let labels = RpcLabels {
            method,
            code: code_label(code),
        };
        self.rpcs.get_or_create(&labels).inc();
        self.rpc_seconds.get_or_create(&labels).observe(seconds);
    }

    /// Records one successful broker reading and the per-queue gauges.
    pub fn reading(&self, broker: &'static str, seconds: f64, depth: &Depth) {
        self.broker_seconds
            .get_or_create(&BrokerLabels { broker })
            .observe(seconds);
        for q in &depth.queues {
            if !self.admit_series(broker, &q.queue) {
                self.queue_series_dropped.inc();
                continue;
            }
            for (state, value) in by_state(q) {
                self.queue_depth
                    .get_or_create(&QueueLabels {
                        broker,
                        queue: q.queue.clone(),
                        state,
                    })
                    .set(value);
            }
        }
    }

    /// Whether (broker, queue) has, or may get, depth gauges: label values come from client
    /// metadata, so their number is bounded.
    fn admit_series(&self, broker: &'static str, queue: &str) -> bool {
        let mut series = self.queue_series.lock().unwrap_or_else(|e| e.into_inner());
        let key = (broker, queue.to_string());
        if series.contains(&key) {
            return true;
        }
        if series.len() >= self.max_queue_series {
            return false;
        }
        series.insert(key);
        true
    }

    /// Counts one trigger refused by the tenancy settings.
    pub fn refusal(&self, reason: crate::error::Refusal) {
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: reason.label(),
            })
            .inc();
    }

    /// Counts one failed broker reading.
    pub fn broker_error(&self, broker: &'static str, kind: &'static str) {
        self.broker_errors
            .get_or_create(&BrokerErrorLabels { broker, kind })
            .inc();
    }

    /// Open streams gauge.
    pub fn streams(&self) -> &Gauge {
        &self.streams
    }

    /// Shared polls gauge.
    pub fn polls(&self) -> &Gauge {
        &self.polls
    }

    /// A Redis broker client entered (`delta` 1) or left (-1) a push mode.
    pub fn push_mode(&self, mode: PushMode, delta: i64) {
        self.push_modes
            .get_or_create(&push_mode_labels(mode))
            .inc_by(delta);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

fn push_mode_labels(mode: PushMode) -> PushModeLabels {
    PushModeLabels {
        broker: "redis",
        mode: mode.mode_label(),
        reason: mode.reason_label(),
    }
}

fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
